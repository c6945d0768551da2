//! Configuration of `kafka-infer run`. Highest precedence first: command-line flags, the
//! process environment, a SeldonDeployment YAML (`-f`): its metadata, spec.protocol,
//! spec.transport, spec.serverType, and one predictor's svcOrchSpec.env and graph.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use codec::{NodeType, Protocol, Transport};
use kafka_io::{ConnectionSettings, OffsetReset};
use serde_norway::Value as Yaml;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `kafka-infer run` flags. Each names its environment variable.
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// A SeldonDeployment YAML (spec.serverType: kafka) to take settings from.
    #[arg(short = 'f', long = "deployment", env = "KAFKA_INFER_DEPLOYMENT")]
    pub deployment: Option<PathBuf>,
    /// Which predictor of the deployment (default: the first).
    #[arg(long, env = "KAFKA_INFER_PREDICTOR")]
    pub predictor: Option<String>,
    /// Bootstrap brokers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKER")]
    pub broker: Option<String>,
    #[arg(long, env = "KAFKA_INPUT_TOPIC")]
    pub input_topic: Option<String>,
    #[arg(long, env = "KAFKA_OUTPUT_TOPIC")]
    pub output_topic: Option<String>,
    /// Topic for records that failed (default: a protocol-shaped error on the output topic).
    #[arg(long, env = "KAFKA_ERROR_TOPIC")]
    pub error_topic: Option<String>,
    /// Consumer group (default <predictor>.<deployment>.<namespace>).
    #[arg(long, env = "KAFKA_GROUP_ID")]
    pub group_id: Option<String>,
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (TLS material and SASL credentials come from
    /// the KAFKA_SSL_* and KAFKA_SASL_* variables).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL")]
    pub security_protocol: Option<String>,
    /// PLAIN (default), SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER (credentials:
    /// KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD[_FILE], or the --sasl-oauthbearer-* settings).
    #[arg(long, env = "KAFKA_SASL_MECHANISM")]
    pub sasl_mechanism: Option<String>,
    /// OAUTHBEARER: oidc (client credentials at a token endpoint), file (a token file, re-read
    /// when it changes), unsecured (an unsigned JWT, development only) or aws_msk_iam. Default: oidc with a
    /// token endpoint URL, file with a token file.
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_METHOD")]
    pub sasl_oauthbearer_method: Option<String>,
    /// OAUTHBEARER oidc: the token endpoint (POST grant_type=client_credentials, basic auth).
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")]
    pub sasl_oauthbearer_token_endpoint_url: Option<String>,
    /// OAUTHBEARER oidc: the client id.
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_CLIENT_ID")]
    pub sasl_oauthbearer_client_id: Option<String>,
    /// OAUTHBEARER oidc: a file holding the client secret (or the secret itself in the
    /// environment as KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET; not a flag, so it stays out of ps).
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE")]
    pub sasl_oauthbearer_client_secret_file: Option<String>,
    /// OAUTHBEARER oidc: the scope asked for (optional).
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_SCOPE")]
    pub sasl_oauthbearer_scope: Option<String>,
    /// OAUTHBEARER: SASL extensions sent with the token, key=value[,key=value] (e.g. Confluent
    /// Cloud's logicalCluster=lkc-...,identityPoolId=pool-...).
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_EXTENSIONS")]
    pub sasl_oauthbearer_extensions: Option<String>,
    /// OAUTHBEARER file: the token file, re-read when it changes or its token nears expiry.
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_TOKEN_FILE")]
    pub sasl_oauthbearer_token_file: Option<String>,
    /// OAUTHBEARER unsecured: `principal=NAME [lifeSeconds=N]` (librdkafka's
    /// sasl.oauthbearer.config).
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_CONFIG")]
    pub sasl_oauthbearer_config: Option<String>,
    /// OAUTHBEARER aws_msk_iam: the cluster's AWS region (default AWS_REGION, then
    /// AWS_DEFAULT_REGION). Credentials come from the standard AWS_* variables.
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_AWS_REGION")]
    pub sasl_oauthbearer_aws_region: Option<String>,
    /// OAUTHBEARER aws_msk_iam: a role to assume (STS AssumeRole) with the credentials found;
    /// its session is named by KAFKA_SASL_OAUTHBEARER_AWS_ROLE_SESSION_NAME (default
    /// kafka-infer).
    #[arg(long, env = "KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN")]
    pub sasl_oauthbearer_aws_role_arn: Option<String>,
    /// seldon, tensorflow, kfserving (= v2).
    #[arg(long, env = "KAFKA_INFER_PROTOCOL")]
    pub protocol: Option<String>,
    /// rest or grpc.
    #[arg(long, env = "KAFKA_INFER_TRANSPORT")]
    pub transport: Option<String>,
    /// The model's base URL (a one-model graph without a YAML), e.g. http://127.0.0.1:8080.
    #[arg(long, env = "KAFKA_INFER_MODEL", hide_env_values = true)]
    pub model: Option<String>,
    /// The model's name (TF and v2 paths), with --model. Default: model.
    #[arg(long, env = "KAFKA_INFER_MODEL_NAME")]
    pub model_name: Option<String>,
    /// REST path for the model node instead of the protocol's, e.g. /api/v1.0/predictions to
    /// call a Seldon deployment's external API.
    #[arg(long, env = "KAFKA_INFER_MODEL_PATH")]
    pub model_path: Option<String>,
    /// TensorFlow: input name for unnamed `instances`/`inputs` sent to a gRPC model.
    #[arg(long, env = "KAFKA_INFER_TF_INPUT_NAME")]
    pub tf_input_name: Option<String>,
    /// Requests in flight per partition (results still leave in input order). Default 16.
    #[arg(long, env = "KAFKA_INFER_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Where /metrics, /live and /ready listen. Default 0.0.0.0:8000.
    #[arg(long, env = "KAFKA_INFER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Consumer group session timeout, e.g. 10s or 6000ms. Default 10s.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT")]
    pub session_timeout: Option<String>,
    /// earliest or latest, for partitions the group never committed. Default earliest.
    #[arg(long, env = "KAFKA_AUTO_OFFSET_RESET")]
    pub auto_offset_reset: Option<String>,
    /// Per-call model timeout. Default 30s.
    #[arg(long, env = "KAFKA_INFER_MODEL_TIMEOUT")]
    pub model_timeout: Option<String>,
    /// How long SIGTERM waits for in-flight records before committing what is done. Default 20s.
    #[arg(long, env = "KAFKA_INFER_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Longest wait between retries of a model call. Default 5s.
    #[arg(long, env = "KAFKA_INFER_RETRY_MAX_BACKOFF")]
    pub retry_max_backoff: Option<String>,
    /// Longest a Fetch waits at the broker for data (Kafka's fetch.max.wait.ms). One Fetch per
    /// leader broker covers every partition it leads; a real Kafka broker answers as soon as data
    /// arrives, so this costs no latency there and sets what an idle member costs the cluster.
    /// Brokers that hold a fetch until max-wait even when data arrives (the test broker, tansu)
    /// need it low. Default 500ms (as the Java client and librdkafka).
    #[arg(long, env = "KAFKA_FETCH_MAX_WAIT")]
    pub fetch_max_wait: Option<String>,
    /// Memory for fetched records not yet finished (answered and written, or given up), in
    /// bytes, counted per decoded record (its bytes plus ~256 bytes of bookkeeping) rather than
    /// per compressed byte; as librdkafka's queued.max.messages.kbytes. Each partition gets an
    /// equal share and is paused while it holds half of it; a batch larger than a share is
    /// handed out in slices. A record larger than the whole budget stops its partition (/ready
    /// 503, kafka_infer_stalled_partitions, a log line). Default 33554432 (32 MiB).
    #[arg(long, env = "KAFKA_INFER_FETCH_BUFFER_BYTES")]
    pub fetch_buffer_bytes: Option<usize>,
    /// Records per partition between the start of their model call and the commit of their
    /// offset: the most a crash (SIGKILL) redoes per partition. Set it to --max-in-flight for the
    /// tightest bound; it costs throughput with fast models (answers wait for commits). Default:
    /// unset (then the running calls plus the answers of one produce round trip and one commit
    /// round, growing with the rate). At least --max-in-flight.
    #[arg(long, env = "KAFKA_INFER_MAX_UNCOMMITTED")]
    pub max_uncommitted: Option<usize>,
    /// How often the input topic's partition count is checked (Kafka's metadata.max.age.ms);
    /// new partitions make the member rejoin so they are consumed. Default 30s.
    #[arg(long, env = "KAFKA_METADATA_MAX_AGE")]
    pub metadata_max_age: Option<String>,
    /// Largest produce request, and so largest answer, in bytes (Kafka's max.request.size);
    /// lowered to the output topic's max.message.bytes where the broker reports it. An answer
    /// above it gets an error record (kind answer-too-large). Default 1048576.
    #[arg(long, env = "KAFKA_MAX_REQUEST_SIZE")]
    pub max_request_size: Option<usize>,
    /// Attempts of a record whose model call times out, loses its connection or gets 502/504
    /// (a poison payload) before it gets an error record, if meanwhile the model answered
    /// other records or answers its health check. A model that fails every record and its
    /// health check (or refuses, 503) is waited for instead. A batch is not retried: it is
    /// split at its first such failure. Default 3.
    #[arg(long, env = "KAFKA_INFER_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// A deadline for real-time requests: a record older than this (by its Kafka timestamp)
    /// when its turn comes gets an error record of kind `expired` instead of a model call
    /// (counted in kafka_infer_records_total{result="expired"}), e.g. 30s or 5m. Default: off.
    #[arg(long, env = "KAFKA_INFER_MAX_RECORD_AGE")]
    pub max_record_age: Option<String>,
    /// How soon finished records are committed: one OffsetCommit for every partition at most
    /// this often (Kafka's auto.commit.interval.ms is 5s). A crash (SIGKILL) redoes what was
    /// answered since the last commit, so up to this long of answers; --max-uncommitted bounds
    /// that in records instead (a worker at its bound asks for a commit at once). Default 1s.
    #[arg(long, env = "KAFKA_COMMIT_INTERVAL")]
    pub commit_interval: Option<String>,
    /// Partition assignment strategies offered to the group, in preference order (as librdkafka's
    /// partition.assignment.strategy): cooperative-sticky, range, roundrobin. Default
    /// cooperative-sticky,range,roundrobin: cooperative when every member offers it.
    #[arg(long, env = "KAFKA_PARTITION_ASSIGNMENT_STRATEGY")]
    pub assignment_strategy: Option<String>,
    /// How long an output partition's writer waits for more answers before it produces a batch
    /// (Kafka's linger.ms); one produce request per partition is in flight at a time, so
    /// batches also grow while the previous one is written (and while records wait for the
    /// model: --linger-max). Default 5ms (as the Java client and librdkafka).
    #[arg(long, env = "KAFKA_LINGER")]
    pub linger: Option<String>,
    /// The writer's linger while records wait for the model (every model slot of a partition
    /// busy: the model sets the pace, so answers that wait for company come out no later on
    /// the whole, in fewer and larger produce requests). Not used with --max-uncommitted.
    /// Default 25ms; equal to --linger turns it off.
    #[arg(long, env = "KAFKA_INFER_LINGER_MAX")]
    pub linger_max: Option<String>,
    /// Idempotent producing (as Kafka's enable.idempotence): the output producer gets a
    /// producer id and numbers its batches, so a batch resent after a lost response is not
    /// written twice. true or false. Default true; a broker (or ACL) that refuses it stops the
    /// process with an error naming this flag: set it to false there.
    #[arg(long, env = "KAFKA_INFER_IDEMPOTENCE")]
    pub idempotence: Option<String>,
    /// Exactly-once (Kafka transactions, KIP-98/KIP-447): each --transaction-window's answers,
    /// error records and input offsets are committed together in one transaction, so readers
    /// with isolation.level=read_committed see each input answered once, across crashes and
    /// rebalances. A revoke or shutdown aborts the open window (its input is redone). Costs:
    /// answers become visible only when their window commits (latency grows with the window),
    /// and every window costs a few coordinator calls. Needs idempotence. true or false
    /// (`--exactly-once` alone: true). Default false.
    #[arg(long, env = "KAFKA_INFER_EXACTLY_ONCE", num_args = 0..=1, default_missing_value = "true")]
    pub exactly_once: Option<String>,
    /// With --exactly-once: how long a transaction collects answers before it commits (and
    /// so the least latency a read_committed reader sees). Default 100ms.
    #[arg(long, env = "KAFKA_INFER_TRANSACTION_WINDOW")]
    pub transaction_window: Option<String>,
    /// With --exactly-once: the producer's transactional.id. It must stay the same when a
    /// replica restarts (its first transaction then fences the dead process and aborts what it
    /// left open) and differ between replicas. Default `kafka-infer-<group id>-<HOSTNAME>` (the
    /// pod name under Kubernetes).
    #[arg(long, env = "KAFKA_INFER_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
    /// Output compression: none, gzip, snappy, lz4, zstd. Default none.
    #[arg(long, env = "KAFKA_COMPRESSION")]
    pub compression: Option<String>,
    /// Extra compiled descriptor set(s) (FileDescriptorSet) for proto-names of your own.
    #[arg(
        long = "descriptor-set",
        env = "KAFKA_INFER_DESCRIPTOR_SETS",
        value_delimiter = ','
    )]
    pub descriptor_sets: Vec<PathBuf>,
    /// text or json.
    #[arg(long, value_enum, env = "KAFKA_INFER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Runtime worker threads. Default 1 (one thread: measured cheaper per answer and faster
    /// than one per CPU beside a model server, docs/performance.md); more help when transcoding
    /// large payloads is what limits the stream.
    #[arg(long, env = "KAFKA_INFER_THREADS")]
    pub threads: Option<usize>,
    /// Largest tensor a record may expand to when transcoded, in bytes of memory (each value
    /// counts 32 bytes, strings add their length); also the limit for all tensors of one
    /// record. Larger ones get an error record (kind tensor-too-large). Default 67108864 (64 MiB).
    #[arg(long, env = "KAFKA_INFER_MAX_TENSOR_BYTES")]
    pub max_tensor_bytes: Option<u64>,
    /// Which input record headers are sent to the model as HTTP headers / gRPC metadata: `*`
    /// (every header, as Seldon's executor does, except credential and proxy headers), `none`,
    /// or a comma-separated list of names and prefixes (`tenant,x-*`; `*,authorization` adds
    /// one to the default). Names compare case-insensitively with `_` read as `-`. Credential
    /// and proxy headers (authorization, cookie, forwarded, x-forwarded-*, x-real-ip,
    /// x-envoy-*, ...) are sent only when named (`x-forwarded-*` names its family, `x-*` does
    /// not). Headers describing the payload (proto-name, content-type), HTTP connection and
    /// framing headers, binary values, the request id and kafka-infer's own are never sent;
    /// the request id and trace context always go, set by kafka-infer. Default `*`.
    #[arg(long, env = "KAFKA_INFER_FORWARD_HEADERS")]
    pub forward_headers: Option<String>,
    /// Records in the graph at once across all partitions (Seldon's KAFKA_WORKERS: the
    /// executor's number of workers; a record holds its place through all its graph's calls,
    /// but not while it waits out a retry backoff). Default: unlimited (each partition still
    /// runs at most --max-in-flight).
    #[arg(long, env = "KAFKA_INFER_MAX_CONCURRENCY")]
    pub max_concurrency: Option<usize>,
    /// Export a span per record (and per model call) over OTLP/HTTP to this collector URL, e.g.
    /// http://127.0.0.1:4318 (`/v1/traces` is added). Off by default; also on when
    /// OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.
    /// OTEL_EXPORTER_OTLP_PROTOCOL=http/json sends JSON instead of protobuf.
    #[arg(long, env = "KAFKA_INFER_OTLP_ENDPOINT", hide_env_values = true)]
    pub otlp_endpoint: Option<String>,
    /// Records of a partition merged into one model request at most (adaptive micro-batching:
    /// batches form from what is queued; a partial one waits for more only while calls run,
    /// never past --batch-linger). v2 inputs along dim 0, seldon ndarray/tensor rows,
    /// tensorflow instances or columnar inputs; requests that cannot merge go alone; a batch
    /// that fails for good is retried record by record. Default: the deployment's env, else the
    /// smallest max_batch_size parameter of the graph's nodes, else 1 (off).
    #[arg(long, env = "KAFKA_INFER_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// The longest a record waits for its batch to fill. Default: the deployment's env, else the
    /// shortest max_batch_time parameter of the graph's nodes (seconds), else 5ms.
    #[arg(long, env = "KAFKA_INFER_BATCH_LINGER")]
    pub batch_linger: Option<String>,
    /// Print the resolved configuration as JSON (no secrets) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// `url` without its userinfo, for what is printed or logged: `http://user:pass@h:1/x` becomes
/// `http://***@h:1/x`. Other URLs come back as they are.
pub fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &rest[at..]).into(),
        None => url.into(),
    }
}

/// One node of the inference graph, with the SeldonDeployment fields Seldon's executor uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    /// None: `UNKNOWN_TYPE` (or no type); what the node does then comes from `methods` and
    /// `implementation`.
    pub node_type: Option<NodeType>,
    /// Base URL, e.g. http://127.0.0.1:9000; empty for a node that calls nothing (a
    /// RANDOM_ABTEST router).
    pub url: String,
    pub transport: Transport,
    pub children: Vec<Node>,
    /// `methods` of an untyped node: the calls it makes.
    pub methods: Vec<Method>,
    /// `implementation`: RANDOM_ABTEST is run by kafka-infer itself; prepackaged servers
    /// (SKLEARN_SERVER, ...) are MODEL nodes behind their endpoint.
    pub implementation: Option<String>,
    /// `parameters` (name, value): RANDOM_ABTEST reads `ratioA`.
    pub parameters: Vec<(String, String)>,
    /// `logger`: where request and response payloads are sent as CloudEvents.
    pub logger: Option<NodeLogger>,
}

/// A graph node's `methods` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    TransformInput,
    TransformOutput,
    Route,
    Aggregate,
    SendFeedback,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.trim().to_ascii_uppercase().as_str() {
            "TRANSFORM_INPUT" => Self::TransformInput,
            "TRANSFORM_OUTPUT" => Self::TransformOutput,
            "ROUTE" => Self::Route,
            "AGGREGATE" => Self::Aggregate,
            "SEND_FEEDBACK" => Self::SendFeedback,
            o => {
                return Err(format!(
                    "unknown method `{o}` (TRANSFORM_INPUT, TRANSFORM_OUTPUT, ROUTE, AGGREGATE, \
                     SEND_FEEDBACK)"
                ));
            }
        })
    }
}

/// A graph node's `logger`: which payloads go where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLogger {
    pub url: Option<String>,
    pub log_request: bool,
    pub log_response: bool,
}

impl Node {
    /// A MODEL node at `url` with no children.
    pub fn model(name: &str, url: &str, transport: Transport) -> Self {
        Self {
            name: name.to_owned(),
            node_type: Some(NodeType::Model),
            url: url.trim_end_matches('/').to_owned(),
            transport,
            children: Vec::new(),
            methods: Vec::new(),
            implementation: None,
            parameters: Vec::new(),
            logger: None,
        }
    }

    fn has(&self, t: NodeType, m: Method) -> bool {
        self.node_type == Some(t) || self.methods.contains(&m)
    }

    /// The call the node makes on the way in: transform-input (a TRANSFORMER, or the
    /// TRANSFORM_INPUT method, which wins over MODEL as in Seldon's executor) or predict.
    pub fn input_call(&self) -> Option<NodeType> {
        if self.has(NodeType::Transformer, Method::TransformInput) {
            Some(NodeType::Transformer)
        } else if self.node_type == Some(NodeType::Model) {
            Some(NodeType::Model)
        } else {
            None
        }
    }

    pub fn calls_route(&self) -> bool {
        self.has(NodeType::Router, Method::Route)
    }

    pub fn calls_aggregate(&self) -> bool {
        self.has(NodeType::Combiner, Method::Aggregate)
    }

    pub fn calls_transform_output(&self) -> bool {
        self.has(NodeType::OutputTransformer, Method::TransformOutput)
    }

    pub fn is_ab_test(&self) -> bool {
        !self.calls_route() && self.implementation.as_deref() == Some("RANDOM_ABTEST")
    }

    /// Whether the node calls its endpoint at all.
    pub fn makes_calls(&self) -> bool {
        self.input_call().is_some()
            || self.calls_route()
            || self.calls_aggregate()
            || self.calls_transform_output()
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub connection: ConnectionSettings,
    pub input_topic: String,
    pub output_topic: String,
    pub error_topic: Option<String>,
    pub group_id: String,
    pub protocol: Protocol,
    pub graph: Node,
    pub tf_input_name: Option<String>,
    /// REST path overriding the protocol's for the root node.
    pub model_path: Option<String>,
    pub max_in_flight: usize,
    pub max_uncommitted: usize,
    pub metrics_addr: SocketAddr,
    pub session_timeout: Duration,
    pub auto_offset_reset: OffsetReset,
    pub model_timeout: Duration,
    pub drain_timeout: Duration,
    pub retry_max_backoff: Duration,
    pub fetch_max_wait: Duration,
    pub compression: kafka_io::CompressionCodec,
    /// Idempotent producing (--idempotence).
    pub idempotence: bool,
    /// Transactions (--exactly-once): the transactional id and the window, when on.
    pub exactly_once: Option<ExactlyOnce>,
    /// The producer's linger (Kafka's linger.ms).
    pub linger: Duration,
    /// The producer's linger while the model is the bottleneck.
    pub linger_max: Duration,
    pub max_request_size: usize,
    pub max_attempts: u32,
    /// Records older than this when their turn comes get an `expired` error record.
    pub max_record_age: Option<Duration>,
    pub assignors: Vec<kafka_io::assignor::Assignor>,
    pub commit_interval: Duration,
    pub metadata_max_age: Duration,
    pub descriptor_sets: Vec<PathBuf>,
    pub log_format: LogFormat,
    /// Per-tensor (and per-record) limit on what transcoding expands (codec::Limits).
    pub max_tensor_bytes: u64,
    /// Memory budget of fetched, unfinished records (kafka-io's fetch buffer).
    pub fetch_buffer_bytes: usize,
    pub forward_headers: crate::meta::HeaderPolicy,
    /// Model calls at once across all partitions; None: unlimited.
    pub max_concurrency: Option<usize>,
    /// SELDON_ENABLE_ROUTING_INJECTION: each node's answer gets meta.routing (seldon protocol).
    pub routing_injection: bool,
    /// Where graph nodes' `logger` without a url sends events (REQUEST_LOGGER_DEFAULT_ENDPOINT,
    /// default http://default-broker as Seldon's).
    pub logger_default_endpoint: String,
    /// The deployment's name, namespace and predictor (for payload-logger events).
    pub deployment: (String, String, String),
    /// Notes on settings accepted but not acted on (logged at start).
    pub warnings: Vec<String>,
    /// OpenTelemetry span export on (--otlp-endpoint or the OTEL_EXPORTER_OTLP_* endpoint).
    pub otlp: bool,
    /// --otlp-endpoint; None: the exporter reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT.
    pub otlp_endpoint: Option<String>,
    /// OTEL_SERVICE_NAME, default kafka-infer.
    pub otel_service_name: String,
    /// Records per model request at most (1: no batching).
    pub batch_size: usize,
    pub batch_linger: Duration,
}

/// The range of each duration setting, by environment variable.
const DURATION_RANGES: &[(&str, Duration, Duration)] = &[
    // Brokers refuse what is outside their group.{min,max}.session.timeout.ms (6 s and 30 min
    // by default); test brokers run with a few seconds.
    (
        "KAFKA_SESSION_TIMEOUT",
        Duration::from_secs(1),
        Duration::from_secs(3600),
    ),
    (
        "KAFKA_INFER_MODEL_TIMEOUT",
        Duration::from_millis(1),
        Duration::from_secs(3600),
    ),
    // Zero: stop at once, commit what is done.
    (
        "KAFKA_INFER_DRAIN_TIMEOUT",
        Duration::ZERO,
        Duration::from_secs(3600),
    ),
    // Below 10 ms retries would spin.
    (
        "KAFKA_INFER_RETRY_MAX_BACKOFF",
        Duration::from_millis(10),
        Duration::from_secs(3600),
    ),
    // Zero would poll an idle partition in a tight loop.
    (
        "KAFKA_FETCH_MAX_WAIT",
        Duration::from_millis(1),
        Duration::from_secs(60),
    ),
    (
        "KAFKA_COMMIT_INTERVAL",
        Duration::from_millis(1),
        Duration::from_secs(3600),
    ),
    // Zero: produce each answer at once; above a second answers would wait for nothing.
    ("KAFKA_LINGER", Duration::ZERO, Duration::from_secs(1)),
    (
        "KAFKA_INFER_LINGER_MAX",
        Duration::ZERO,
        Duration::from_secs(1),
    ),
    // Below 100 ms the metadata checks would load the broker for nothing.
    (
        "KAFKA_METADATA_MAX_AGE",
        Duration::from_millis(100),
        Duration::from_secs(86_400),
    ),
];

/// The range of a duration setting not in [`DURATION_RANGES`].
const DURATION_RANGE: (Duration, Duration) =
    (Duration::from_millis(1), Duration::from_secs(86_400));

/// The flag of an environment variable: KAFKA_INFER_MODEL_TIMEOUT -> --model-timeout.
fn flag_of(env: &str) -> String {
    let name = env
        .strip_prefix("KAFKA_INFER_")
        .or_else(|| env.strip_prefix("KAFKA_"))
        .unwrap_or(env);
    format!("--{}", name.to_ascii_lowercase().replace('_', "-"))
}

/// Parses a duration: `10s`, `500ms`, `2m`, `1m30s`, `1.5s` (humantime's units), or a bare
/// number of milliseconds (as Kafka's *.ms settings), and checks it against the setting's
/// range. `setting` is the environment variable (or the flag); errors name both.
pub fn parse_duration(s: &str, setting: &str) -> Result<Duration> {
    let (label, min, max) = DURATION_RANGES
        .iter()
        .find(|(env, ..)| setting == *env || setting == flag_of(env))
        .map_or_else(
            || {
                let label = if setting.starts_with("KAFKA_") {
                    format!("{} ({setting})", flag_of(setting))
                } else {
                    setting.to_owned()
                };
                (label, DURATION_RANGE.0, DURATION_RANGE.1)
            },
            |(env, min, max)| (format!("{} ({env})", flag_of(env)), *min, *max),
        );
    let fmt = humantime::format_duration;
    let out_of_range = || {
        anyhow!(
            "{label}: `{s}` is out of range ({} to {})",
            fmt(min),
            fmt(max)
        )
    };
    let text = s.trim();
    let d = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_millis(text.parse().map_err(|_| out_of_range())?)
    } else {
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(humantime::DurationError::NumberOverflow) => return Err(out_of_range()),
            Err(e) => bail!(
                "{label}: `{s}` is not a duration ({e}); e.g. 10s, 500ms, 2m, 1m30s, or a \
                 number of milliseconds"
            ),
        }
    };
    if d < min || d > max {
        return Err(out_of_range());
    }
    Ok(d)
}

/// The parts of a SeldonDeployment we use.
#[derive(Debug, Default)]
struct Deployment {
    name: Option<String>,
    namespace: Option<String>,
    protocol: Option<String>,
    transport: Option<String>,
    predictor: Option<String>,
    env: HashMap<String, String>,
    graph: Option<Node>,
}

fn ystr(v: &Yaml, key: &str) -> Option<String> {
    match v.get(key)? {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn parse_node(v: &Yaml, transport: Option<&str>) -> Result<Node> {
    let name = ystr(v, "name").context("a graph node has no name")?;
    let typed = ystr(v, "type").is_some();
    let node_type: Option<NodeType> = match ystr(v, "type") {
        None => None,
        Some(t) if t.eq_ignore_ascii_case("UNKNOWN_TYPE") => None,
        Some(t) => Some(
            t.parse()
                .map_err(|e: String| anyhow!("graph node {name}: {e}"))?,
        ),
    };
    let methods = v
        .get("methods")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
        .map(|m| match m {
            Yaml::String(s) => s
                .parse()
                .map_err(|e: String| anyhow!("graph node {name}: {e}")),
            _ => bail!("graph node {name}: methods are names, e.g. TRANSFORM_INPUT"),
        })
        .collect::<Result<Vec<Method>>>()?;
    let implementation = ystr(v, "implementation")
        .map(|i| i.trim().to_ascii_uppercase())
        .filter(|i| !i.is_empty());
    let parameters = v
        .get("parameters")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|p| Some((ystr(p, "name")?, ystr(p, "value").unwrap_or_default())))
        .collect();
    let logger = v.get("logger").map(|l| {
        let mode = ystr(l, "mode").unwrap_or_else(|| "all".into());
        let mode = mode.to_ascii_lowercase();
        NodeLogger {
            // None: REQUEST_LOGGER_DEFAULT_ENDPOINT, as Seldon's executor.
            url: ystr(l, "url"),
            log_request: mode == "all" || mode == "request",
            log_response: mode == "all" || mode == "response",
        }
    });
    let transport: Transport = match (transport, v.get("endpoint").and_then(|e| ystr(e, "type"))) {
        (Some(t), _) => t.parse().map_err(|e: String| anyhow!(e))?,
        (None, Some(t)) => t.parse().map_err(|e: String| anyhow!(e))?,
        (None, None) => Transport::Rest,
    };
    let url = match v.get("endpoint") {
        None => String::new(),
        Some(ep) => {
            // Seldon's executor calls httpPort over REST and grpcPort over gRPC; the operator
            // fills them from service_port.
            let specific = match transport {
                Transport::Rest => "httpPort",
                Transport::Grpc => "grpcPort",
            };
            let port = ystr(ep, specific)
                .filter(|p| p != "0")
                .or_else(|| ystr(ep, "service_port"));
            match port {
                None => String::new(),
                Some(port) => {
                    let port: u16 = port.parse().map_err(|_| {
                        anyhow!("graph node {name}: endpoint port `{port}` is not a port")
                    })?;
                    let host = ystr(ep, "service_host").unwrap_or_else(|| "127.0.0.1".into());
                    format!("http://{host}:{port}")
                }
            }
        }
    };
    let children = v
        .get("children")
        .and_then(Yaml::as_sequence)
        .map(|c| {
            c.iter()
                .map(|n| parse_node(n, transport_name(transport)))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    // The operator's defaults (`addDefaultsToGraph`): a node with no type, no methods and no
    // implementation, or a prepackaged server, is a MODEL. An explicit UNKNOWN_TYPE (or
    // UNKNOWN_IMPLEMENTATION) is not defaulted: such a node passes its input on.
    let node_type = match node_type {
        None if !typed
            && methods.is_empty()
            && implementation
                .as_deref()
                .is_none_or(|i| i.ends_with("_SERVER")) =>
        {
            Some(NodeType::Model)
        }
        t => t,
    };
    let node = Node {
        name,
        node_type,
        url,
        transport,
        children,
        methods,
        implementation,
        parameters,
        logger,
    };
    if node.makes_calls() && node.url.is_empty() {
        bail!(
            "graph node {}: endpoint.service_port is missing (the node calls its endpoint)",
            node.name
        );
    }
    Ok(node)
}

fn transport_name(t: Transport) -> Option<&'static str> {
    Some(match t {
        Transport::Rest => "rest",
        Transport::Grpc => "grpc",
    })
}

/// Reads a SeldonDeployment text as `-f` does, with the same checks; gives the chosen
/// predictor's graph. Public for the fuzzer ([`crate::fuzz_deployment`]).
pub fn parse_seldon_deployment(text: &str, predictor: Option<&str>) -> Result<Option<Node>> {
    parse_deployment(text, predictor, None).map(|d| d.graph)
}

/// `transport`: the --transport flag, above the deployment's spec.transport.
fn parse_deployment(text: &str, want: Option<&str>, transport: Option<&str>) -> Result<Deployment> {
    let doc: Yaml = serde_norway::from_str(text).context("not valid YAML")?;
    let kind = ystr(&doc, "kind").unwrap_or_default();
    if kind != "SeldonDeployment" {
        bail!("kind is `{kind}`, expected SeldonDeployment");
    }
    let meta = doc.get("metadata");
    let spec = doc.get("spec").context("no spec")?;
    let server_type = ystr(spec, "serverType").unwrap_or_else(|| "rest".into());
    if !server_type.eq_ignore_ascii_case("kafka") {
        bail!(
            "spec.serverType is `{server_type}`: kafka-infer serves `serverType: kafka` deployments"
        );
    }
    let spec_transport = ystr(spec, "transport");
    let predictors = spec
        .get("predictors")
        .and_then(Yaml::as_sequence)
        .context("spec.predictors is missing")?;
    let p = match want {
        Some(w) => predictors
            .iter()
            .find(|p| ystr(p, "name").as_deref() == Some(w))
            .with_context(|| format!("no predictor named `{w}`"))?,
        None => predictors.first().context("spec.predictors is empty")?,
    };
    let mut env = HashMap::new();
    for e in p
        .get("svcOrchSpec")
        .and_then(|s| s.get("env"))
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
    {
        if let (Some(k), Some(v)) = (ystr(e, "name"), ystr(e, "value")) {
            env.insert(k, v);
        }
    }
    let graph = p
        .get("graph")
        .map(|g| parse_node(g, transport.or(spec_transport.as_deref())))
        .transpose()?;
    Ok(Deployment {
        name: meta.and_then(|m| ystr(m, "name")),
        namespace: meta.and_then(|m| ystr(m, "namespace")),
        protocol: ystr(spec, "protocol"),
        transport: spec_transport,
        predictor: ystr(p, "name"),
        env,
        graph,
    })
}

/// `--exactly-once`: the producer's transactional id and the transaction window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExactlyOnce {
    pub transactional_id: String,
    pub window: Duration,
}

/// This host's name: $HOSTNAME (the pod name under Kubernetes), else /etc/hostname.
fn host_name(env: &dyn Fn(&str) -> Option<String>) -> String {
    env("HOSTNAME")
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Resolves flags > `env` (the process environment) > the deployment file.
    pub fn resolve(args: &RunArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        Self::resolve_with(args, env, true)
    }

    /// [`Config::resolve`] for the tools that talk to Kafka only (`send`, `redrive`): the same
    /// settings, but no model is needed (without --model or -f the graph is a placeholder
    /// node with no URL, never called).
    pub fn resolve_kafka(args: &RunArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        Self::resolve_with(args, env, false)
    }

    fn resolve_with(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
        need_model: bool,
    ) -> Result<Self> {
        let dep = match &args.deployment {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                parse_deployment(&text, args.predictor.as_deref(), args.transport.as_deref())
                    .with_context(|| format!("{}", p.display()))?
            }
            None => Deployment::default(),
        };
        // KAFKA_* lookups: flag, then process env, then the deployment's svcOrchSpec.env.
        let flag_env: HashMap<&str, Option<&String>> = HashMap::from([
            ("KAFKA_BROKER", args.broker.as_ref()),
            ("KAFKA_SECURITY_PROTOCOL", args.security_protocol.as_ref()),
            ("KAFKA_SASL_MECHANISM", args.sasl_mechanism.as_ref()),
            (
                "KAFKA_SASL_OAUTHBEARER_METHOD",
                args.sasl_oauthbearer_method.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                args.sasl_oauthbearer_token_endpoint_url.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                args.sasl_oauthbearer_client_id.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                args.sasl_oauthbearer_client_secret_file.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_SCOPE",
                args.sasl_oauthbearer_scope.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
                args.sasl_oauthbearer_extensions.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_TOKEN_FILE",
                args.sasl_oauthbearer_token_file.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_CONFIG",
                args.sasl_oauthbearer_config.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_AWS_REGION",
                args.sasl_oauthbearer_aws_region.as_ref(),
            ),
            (
                "KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN",
                args.sasl_oauthbearer_aws_role_arn.as_ref(),
            ),
        ]);
        let lookup = |k: &str| -> Option<String> {
            flag_env
                .get(k)
                .and_then(|v| v.cloned())
                .or_else(|| env(k))
                .or_else(|| dep.env.get(k).cloned())
                .filter(|v| !v.trim().is_empty())
        };
        let connection = ConnectionSettings::from_lookup(lookup)?;
        let pick = |flag: &Option<String>, name: &str| flag.clone().or_else(|| lookup(name));
        let input_topic =
            pick(&args.input_topic, "KAFKA_INPUT_TOPIC").context("KAFKA_INPUT_TOPIC is not set")?;
        let output_topic = pick(&args.output_topic, "KAFKA_OUTPUT_TOPIC")
            .context("KAFKA_OUTPUT_TOPIC is not set")?;
        let error_topic = pick(&args.error_topic, "KAFKA_ERROR_TOPIC");
        let protocol: Protocol = args
            .protocol
            .clone()
            .or(dep.protocol.clone())
            .unwrap_or_else(|| "seldon".into())
            .parse()
            .map_err(|e: String| anyhow!(e))?;
        let transport: Transport = args
            .transport
            .clone()
            .or(dep.transport.clone())
            .unwrap_or_else(|| "rest".into())
            .parse()
            .map_err(|e: String| anyhow!(e))?;
        let graph = match (&args.model, dep.graph) {
            (Some(url), _) => Node::model(
                args.model_name.as_deref().unwrap_or("model"),
                url,
                transport,
            ),
            (None, Some(g)) => g,
            (None, None) if !need_model => Node::model("model", "", transport),
            (None, None) => bail!("no model: give --model URL or a SeldonDeployment with -f"),
        };
        check_graph(&graph, protocol)?;
        let namespace = dep
            .namespace
            .clone()
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "default".into());
        let group_id = pick(&args.group_id, "KAFKA_GROUP_ID").unwrap_or_else(|| {
            format!(
                "{}.{}.{namespace}",
                dep.predictor.clone().unwrap_or_else(|| "model".into()),
                dep.name.clone().unwrap_or_else(|| graph.name.clone()),
            )
        });
        let deployment = (
            dep.name.clone().unwrap_or_else(|| graph.name.clone()),
            namespace.clone(),
            dep.predictor.clone().unwrap_or_else(|| "default".into()),
        );
        let mut warnings_early = Vec::new();
        // Flag or environment, then the deployment's env, then the graph's nodes.
        let batch_size = match args.batch_size {
            Some(n) => Some(n),
            None => lookup("KAFKA_INFER_BATCH_SIZE")
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        anyhow!("KAFKA_INFER_BATCH_SIZE: `{v}` is not a number of records")
                    })
                })
                .transpose()?,
        };
        let batch_size = match batch_size {
            Some(n) if !(1..=4096).contains(&n) => {
                bail!("--batch-size (KAFKA_INFER_BATCH_SIZE): {n} is outside 1..=4096")
            }
            Some(n) => n,
            None => node_batch_size(&graph)?.unwrap_or(1),
        };
        // A router (or A/B test) decides per request: a batch would take one route for all
        // its records.
        fn routes(n: &Node) -> bool {
            n.calls_route() || n.is_ab_test() || n.children.iter().any(routes)
        }
        let batch_size = if batch_size > 1 && routes(&graph) {
            warnings_early.push(format!(
                "--batch-size {batch_size} is ignored: the graph routes each request (a ROUTER \
                 or RANDOM_ABTEST), and a batch would take one route for all its records"
            ));
            1
        } else {
            batch_size
        };
        let linger = parse_duration(
            &pick(&args.linger, "KAFKA_LINGER").unwrap_or_else(|| "5ms".into()),
            "KAFKA_LINGER",
        )?;
        let linger_max = parse_duration(
            &pick(&args.linger_max, "KAFKA_INFER_LINGER_MAX").unwrap_or_else(|| "25ms".into()),
            "KAFKA_INFER_LINGER_MAX",
        )?
        .max(linger);
        // With --max-uncommitted, answers that linger would hold back new model calls.
        let linger_max = if args.max_uncommitted.is_some() {
            linger
        } else {
            linger_max
        };
        let batch_linger = match pick(&args.batch_linger, "KAFKA_INFER_BATCH_LINGER") {
            Some(v) => parse_duration(&v, "KAFKA_INFER_BATCH_LINGER")?,
            None => node_batch_time(&graph)?.unwrap_or(Duration::from_millis(5)),
        };
        // In flight counts records: by default room for two full batches.
        let max_in_flight = args.max_in_flight.unwrap_or(16.max(2 * batch_size)).max(1);
        let mut warnings = warnings_early;
        graph_warnings(&graph, &mut warnings);
        if connection.sends_password_in_clear() {
            warnings.push(
                "KAFKA_SASL_MECHANISM PLAIN (the default) with KAFKA_SECURITY_PROTOCOL=\
                 SASL_PLAINTEXT sends the Kafka password in clear text on every connection: use \
                 SASL_SSL, or SCRAM-SHA-256/512 (metric kafka_infer_sasl_plaintext_credentials)"
                    .into(),
            );
        }
        // Seldon's settings that would change what runs: refused, never silently ignored.
        if let Some(v) = lookup("KAFKA_FULL_GRAPH")
            && !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "" | "false" | "0" | "f"
            )
        {
            bail!(
                "KAFKA_FULL_GRAPH={v} is not supported: Seldon's full-graph mode (each graph node \
                 consuming and producing its own topics) is not what kafka-infer does; it runs the \
                 whole graph in-process between KAFKA_INPUT_TOPIC and KAFKA_OUTPUT_TOPIC. Remove \
                 the setting (or set it to false) to run that way"
            );
        }
        if let Some(o) = connection.sasl.as_ref().and_then(|s| s.oauth.as_ref()) {
            if let kafka_io::OauthMethod::Unsecured { principal, .. } = &o.settings().method {
                warnings.push(format!(
                    "KAFKA_SASL_OAUTHBEARER_METHOD=unsecured signs in as `{principal}` with an \
                     unsigned token (alg none) that any broker validating tokens refuses: for \
                     development brokers only"
                ));
            }
            if connection.security == kafka_io::SecurityProtocol::SaslPlaintext {
                warnings.push(
                    "KAFKA_SASL_MECHANISM OAUTHBEARER with KAFKA_SECURITY_PROTOCOL=\
                     SASL_PLAINTEXT sends the bearer token in clear text on every connection: \
                     use SASL_SSL"
                        .into(),
                );
            }
        }
        if let Some(v) = lookup("KAFKA_AUTO_COMMIT") {
            warnings.push(format!(
                "KAFKA_AUTO_COMMIT={v} is ignored: kafka-infer commits an offset only after the \
                 record's answer (or error record) is acknowledged by the broker"
            ));
        }
        let max_concurrency = match args.max_concurrency {
            Some(n) => Some(n),
            None => lookup("KAFKA_WORKERS")
                .map(|w| {
                    w.trim()
                        .parse::<usize>()
                        .map_err(|_| anyhow!("KAFKA_WORKERS: `{w}` is not a number of workers"))
                })
                .transpose()?,
        };
        if let Some(n) = max_concurrency
            && !(1..=1 << 20).contains(&n)
        {
            bail!("--max-concurrency (KAFKA_WORKERS): {n} is outside 1..=1048576");
        }
        let dur = |flag: &Option<String>, name: &str, default: &str| -> Result<Duration> {
            parse_duration(&pick(flag, name).unwrap_or_else(|| default.into()), name)
        };
        let exactly_once = match pick(&args.exactly_once, "KAFKA_INFER_EXACTLY_ONCE")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("false") => None,
            Some("true") => {
                let window = dur(
                    &args.transaction_window,
                    "KAFKA_INFER_TRANSACTION_WINDOW",
                    "100ms",
                )?;
                if window.is_zero() {
                    bail!("--transaction-window (KAFKA_INFER_TRANSACTION_WINDOW): must be above 0");
                }
                let transactional_id =
                    match pick(&args.transactional_id, "KAFKA_INFER_TRANSACTIONAL_ID") {
                        Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
                        _ => format!("kafka-infer-{group_id}-{}", host_name(env)),
                    };
                Some(ExactlyOnce {
                    transactional_id,
                    window,
                })
            }
            Some(o) => {
                bail!("--exactly-once (KAFKA_INFER_EXACTLY_ONCE): `{o}` is not true or false")
            }
        };
        Ok(Self {
            connection,
            input_topic,
            output_topic,
            error_topic,
            group_id: group_id.clone(),
            protocol,
            graph,
            tf_input_name: args.tf_input_name.clone(),
            model_path: args.model_path.clone(),
            max_in_flight,
            max_uncommitted: {
                let mif = max_in_flight;
                match args.max_uncommitted {
                    Some(n) if n < mif => bail!(
                        "--max-uncommitted (KAFKA_INFER_MAX_UNCOMMITTED): {n} is below --max-in-flight ({mif})"
                    ),
                    Some(n) => n,
                    None => usize::MAX,
                }
            },
            metrics_addr: args
                .metrics_addr
                .unwrap_or_else(|| "0.0.0.0:8000".parse().expect("addr")),
            session_timeout: dur(&args.session_timeout, "KAFKA_SESSION_TIMEOUT", "10s")?,
            auto_offset_reset: pick(&args.auto_offset_reset, "KAFKA_AUTO_OFFSET_RESET")
                .unwrap_or_else(|| "earliest".into())
                .parse()
                .map_err(|e: String| anyhow!("KAFKA_AUTO_OFFSET_RESET: {e}"))?,
            model_timeout: dur(&args.model_timeout, "KAFKA_INFER_MODEL_TIMEOUT", "30s")?,
            drain_timeout: dur(&args.drain_timeout, "KAFKA_INFER_DRAIN_TIMEOUT", "20s")?,
            retry_max_backoff: dur(
                &args.retry_max_backoff,
                "KAFKA_INFER_RETRY_MAX_BACKOFF",
                "5s",
            )?,
            fetch_max_wait: dur(&args.fetch_max_wait, "KAFKA_FETCH_MAX_WAIT", "500ms")?,
            fetch_buffer_bytes: match args.fetch_buffer_bytes {
                Some(n) if n < 1 << 20 => bail!(
                    "--fetch-buffer-bytes (KAFKA_INFER_FETCH_BUFFER_BYTES): {n} is below 1048576 (1 MiB)"
                ),
                Some(n) => n,
                None => kafka_io::consumer::DEFAULT_FETCH_BUFFER_BYTES,
            },
            idempotence: match pick(&args.idempotence, "KAFKA_INFER_IDEMPOTENCE")
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                None | Some("true") => true,
                Some("false") => false,
                Some(o) => {
                    bail!("--idempotence (KAFKA_INFER_IDEMPOTENCE): `{o}` is not true or false")
                }
            },
            exactly_once,
            compression: pick(&args.compression, "KAFKA_COMPRESSION")
                .unwrap_or_else(|| "none".into())
                .parse()
                .map_err(|e: String| anyhow!("KAFKA_COMPRESSION: {e}"))?,
            max_request_size: match args.max_request_size {
                Some(n) if !(1024..=1 << 30).contains(&n) => {
                    bail!("--max-request-size: {n} is outside 1024..=1073741824 bytes")
                }
                Some(n) => n,
                None => 1024 * 1024,
            },
            max_attempts: match args.max_attempts {
                Some(0) => bail!("--max-attempts: must be at least 1"),
                Some(n) => n,
                None => 3,
            },
            max_record_age: pick(&args.max_record_age, "KAFKA_INFER_MAX_RECORD_AGE")
                .map(|v| parse_duration(&v, "KAFKA_INFER_MAX_RECORD_AGE"))
                .transpose()?,
            commit_interval: dur(&args.commit_interval, "KAFKA_COMMIT_INTERVAL", "1s")?,
            linger,
            linger_max,
            metadata_max_age: dur(&args.metadata_max_age, "KAFKA_METADATA_MAX_AGE", "30s")?,
            assignors: {
                let v = pick(
                    &args.assignment_strategy,
                    "KAFKA_PARTITION_ASSIGNMENT_STRATEGY",
                )
                .unwrap_or_else(|| "cooperative-sticky,range,roundrobin".into());
                let mut out = Vec::new();
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let a = kafka_io::assignor::Assignor::from_name(name).ok_or_else(|| {
                        anyhow!(
                            "--assignment-strategy (KAFKA_PARTITION_ASSIGNMENT_STRATEGY): unknown \
                             `{name}` (cooperative-sticky, range, roundrobin)"
                        )
                    })?;
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                if out.is_empty() {
                    bail!("--assignment-strategy (KAFKA_PARTITION_ASSIGNMENT_STRATEGY): empty");
                }
                out
            },
            descriptor_sets: args.descriptor_sets.clone(),
            log_format: args.log_format.unwrap_or_default(),
            max_tensor_bytes: match args.max_tensor_bytes {
                Some(0) => bail!("--max-tensor-bytes: must be at least 1"),
                Some(n) => n,
                None => codec::Limits::DEFAULT_MAX_TENSOR_BYTES,
            },
            forward_headers: crate::meta::HeaderPolicy::parse(
                &pick(&args.forward_headers, "KAFKA_INFER_FORWARD_HEADERS")
                    .unwrap_or_else(|| "*".into()),
            ),
            max_concurrency,
            routing_injection: lookup("SELDON_ENABLE_ROUTING_INJECTION").is_some(),
            otlp: args.otlp_endpoint.is_some()
                || [
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                ]
                .iter()
                .any(|k| env(k).is_some_and(|v| !v.trim().is_empty())),
            otlp_endpoint: args.otlp_endpoint.clone(),
            otel_service_name: env("OTEL_SERVICE_NAME").unwrap_or_else(|| "kafka-infer".into()),
            batch_size,
            batch_linger,
            logger_default_endpoint: lookup("REQUEST_LOGGER_DEFAULT_ENDPOINT")
                .unwrap_or_else(|| "http://default-broker".into()),
            deployment,
            warnings,
        })
    }
}

impl Node {
    fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "type": self.node_type.map(|t| format!("{t:?}")),
            "methods": (!self.methods.is_empty()).then(|| self.methods.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>()),
            "implementation": self.implementation,
            "url": (!self.url.is_empty()).then(|| without_userinfo(&self.url)),
            "transport": self.transport.to_string(),
            "children": self.children.iter().map(Node::summary).collect::<Vec<_>>(),
        })
    }
}

impl Config {
    /// What `--print-config` shows: everything but TLS material and passwords.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "brokers": self.connection.bootstrap_strings(),
            "security_protocol": format!("{:?}", self.connection.security),
            "sasl_mechanism": self.connection.sasl.as_ref().map(|s| s.mechanism.name()),
            "sasl_username": self.connection.sasl.as_ref().map(|s| s.username.as_str()).filter(|u| !u.is_empty()),
            "sasl_oauthbearer": self.connection.sasl.as_ref().and_then(|s| s.oauth.as_ref()).map(|o| oauth_summary(o.settings())),
            "input_topic": self.input_topic,
            "output_topic": self.output_topic,
            "error_topic": self.error_topic,
            "group_id": self.group_id,
            "protocol": self.protocol.to_string(),
            "graph": self.graph.summary(),
            "model_path": self.model_path,
            "max_in_flight": self.max_in_flight,
            "max_uncommitted": (self.max_uncommitted != usize::MAX).then_some(self.max_uncommitted),
            "max_tensor_bytes": self.max_tensor_bytes,
            "fetch_buffer_bytes": self.fetch_buffer_bytes,
            "metrics_addr": self.metrics_addr.to_string(),
            "session_timeout_ms": self.session_timeout.as_millis() as u64,
            "auto_offset_reset": format!("{:?}", self.auto_offset_reset),
            "drain_timeout_ms": self.drain_timeout.as_millis() as u64,
            "max_request_size": self.max_request_size,
            "max_attempts": self.max_attempts,
            "max_record_age_ms": self.max_record_age.map(|d| d.as_millis() as u64),
            "commit_interval_ms": self.commit_interval.as_millis() as u64,
            "idempotence": self.idempotence,
            "exactly_once": self.exactly_once.as_ref().map(|e| serde_json::json!({
                "transactional_id": e.transactional_id,
                "transaction_window_ms": e.window.as_millis() as u64,
            })),
            "linger_ms": self.linger.as_millis() as u64,
            "linger_max_ms": self.linger_max.as_millis() as u64,
            "assignment_strategy": self.assignors.iter().map(|a| a.name()).collect::<Vec<_>>(),
            "forward_headers": match &self.forward_headers {
                crate::meta::HeaderPolicy::All => serde_json::json!("*"),
                crate::meta::HeaderPolicy::Only(l) => serde_json::json!(l),
            },
            "max_concurrency": self.max_concurrency,
            "otlp_export": self.otlp,
            "batch_size": self.batch_size,
            "batch_linger_ms": self.batch_linger.as_millis() as u64,
        })
    }
}

/// The OAUTHBEARER settings as `--print-config` shows them: no client secret, no token.
fn oauth_summary(o: &kafka_io::OauthSettings) -> serde_json::Value {
    use kafka_io::OauthMethod;
    let mut v = match &o.method {
        OauthMethod::Oidc {
            token_endpoint_url,
            client_id,
            scope,
            ..
        } => serde_json::json!({
            "token_endpoint_url": without_userinfo(token_endpoint_url),
            "client_id": client_id,
            "scope": scope,
        }),
        OauthMethod::File(p) => serde_json::json!({ "token_file": p.display().to_string() }),
        OauthMethod::Unsecured {
            principal,
            lifetime,
        } => serde_json::json!({ "principal": principal, "life_seconds": lifetime.as_secs() }),
        OauthMethod::AwsMskIam(msk) => {
            use kafka_io::aws::CredentialSource;
            let (source, role_arn, url) = match &msk.credentials {
                CredentialSource::Static(_) => ("environment", None, None),
                CredentialSource::WebIdentity { role_arn, .. } => {
                    ("web_identity", Some(role_arn.clone()), None)
                }
                CredentialSource::Container { url, .. } => {
                    ("container", None, Some(without_userinfo(url).into_owned()))
                }
            };
            serde_json::json!({
                "region": msk.region,
                "aws_credentials": source,
                "role_arn": role_arn,
                "credentials_url": url,
                "assume_role_arn": msk.assume_role.as_ref().map(|r| r.role_arn.clone()),
            })
        }
    };
    v["method"] = o.method.name().into();
    v["extensions"] = o
        .extensions
        .iter()
        .map(|(k, val)| (k.clone(), serde_json::Value::from(val.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into();
    v
}

/// What Seldon's executor would refuse or fail on at the first request, refused at start.
fn check_graph(n: &Node, protocol: Protocol) -> Result<()> {
    if protocol != Protocol::Seldon && (n.calls_route() || n.calls_aggregate()) {
        bail!(
            "graph node {}: the {protocol} protocol has no route or aggregate call (routers and \
             combiners need the seldon protocol; RANDOM_ABTEST works with every protocol)",
            n.name
        );
    }
    if (n.calls_route() || n.is_ab_test() || n.calls_aggregate()) && n.children.is_empty() {
        bail!("graph node {}: a router or combiner needs children", n.name);
    }
    if n.is_ab_test() {
        // Seldon picks child 0 or 1 (more children are never chosen).
        if n.children.len() < 2 {
            bail!(
                "graph node {}: RANDOM_ABTEST needs 2 children, it has {}",
                n.name,
                n.children.len()
            );
        }
        ab_ratio(n)?;
    }
    for c in &n.children {
        check_graph(c, protocol)?;
    }
    Ok(())
}

/// Graph settings Seldon's executor accepts and does nothing with.
fn graph_warnings(n: &Node, out: &mut Vec<String>) {
    if let Some(i) = &n.implementation
        && i != "RANDOM_ABTEST"
        && i != "UNKNOWN_IMPLEMENTATION"
        && !i.ends_with("_SERVER")
    {
        out.push(format!(
            "graph node {}: implementation {i} does nothing in Seldon's executor, nor here{}",
            n.name,
            if n.makes_calls() {
                ""
            } else {
                " (the node passes its input on; its children all get it)"
            }
        ));
    }
    for c in &n.children {
        graph_warnings(c, out);
    }
}

/// The least value of parameter `name` over the graph's nodes, each read by `read`.
fn least_param<T: Ord>(
    n: &Node,
    name: &str,
    read: &impl Fn(&Node, &str) -> Result<T>,
) -> Result<Option<T>> {
    let mut least = None;
    for (k, v) in &n.parameters {
        if k == name {
            least = least.into_iter().chain([read(n, v)?]).min();
        }
    }
    for c in &n.children {
        if let Some(x) = least_param(c, name, read)? {
            least = least.into_iter().chain([x]).min();
        }
    }
    Ok(least)
}

/// The smallest `max_batch_size` parameter of the graph's nodes (the names Triton and MLServer
/// give the largest batch a model takes): the batch size when no flag or variable sets one.
fn node_batch_size(n: &Node) -> Result<Option<usize>> {
    // 0 is Triton's and MLServer's "no batching"; above 4096 is taken as 4096.
    least_param(n, "max_batch_size", &|n: &Node, v: &str| {
        Ok(v.trim()
            .parse::<usize>()
            .map_err(|_| {
                anyhow!(
                    "graph node {}: max_batch_size `{v}` is not a number of records",
                    n.name
                )
            })?
            .clamp(1, 4096))
    })
}

/// The shortest `max_batch_time` parameter of the graph's nodes: seconds as MLServer takes it
/// (`0.005`), or a duration (`5ms`); the batch linger when no flag or variable sets one.
fn node_batch_time(n: &Node) -> Result<Option<Duration>> {
    least_param(n, "max_batch_time", &|n: &Node, v: &str| {
        let label = format!("graph node {}: max_batch_time", n.name);
        Ok(match v.trim().parse::<f64>() {
            Ok(s) if (0.0..=60.0).contains(&s) => Duration::from_secs_f64(s),
            Ok(_) => bail!("{label} `{v}` is out of range (0 to 60 seconds)"),
            Err(_) => parse_duration(v, &label)?,
        })
    })
}

/// RANDOM_ABTEST's ratioA parameter (the share of the first child), default 0.5.
pub fn ab_ratio(n: &Node) -> Result<f64> {
    match n.parameters.iter().find(|(k, _)| k == "ratioA") {
        None => Ok(0.5),
        Some((_, v)) => match v.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
            _ => bail!(
                "graph node {}: ratioA `{v}` is not a number from 0 to 1",
                n.name
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIFAR: &str = r#"
apiVersion: machinelearning.seldon.io/v1
kind: SeldonDeployment
metadata: {name: tfserving-cifar10, namespace: kafka}
spec:
  protocol: tensorflow
  transport: rest
  serverType: kafka
  predictors:
  - name: model
    svcOrchSpec:
      env:
      - {name: KAFKA_BROKER, value: "broker:9092"}
      - {name: KAFKA_INPUT_TOPIC, value: cifar10-rest-input}
      - {name: KAFKA_OUTPUT_TOPIC, value: cifar10-rest-output}
    graph: {name: resnet32, type: MODEL, endpoint: {service_port: 8501}, children: []}
    replicas: 1
"#;

    fn args_with(path: &std::path::Path) -> RunArgs {
        RunArgs {
            deployment: Some(path.to_owned()),
            ..Default::default()
        }
    }

    fn tmp(text: &str) -> tempfile_like::Tmp {
        tempfile_like::Tmp::new(text)
    }

    mod tempfile_like {
        pub struct Tmp(pub std::path::PathBuf);
        impl Tmp {
            pub fn new(text: &str) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "kafka-infer-cfg-{}-{}.yaml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).unwrap();
                Self(p)
            }
        }
        impl Drop for Tmp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn cifar10_deployment_as_seldon_reads_it() {
        let f = tmp(CIFAR);
        let c = Config::resolve(&args_with(&f.0), &|_| None).unwrap();
        assert_eq!(c.group_id, "model.tfserving-cifar10.kafka");
        assert_eq!(c.protocol, Protocol::Tensorflow);
        assert_eq!(c.input_topic, "cifar10-rest-input");
        assert_eq!(c.graph.url, "http://127.0.0.1:8501");
        assert_eq!(c.graph.name, "resnet32");
        assert_eq!(c.connection.bootstrap_strings(), ["broker:9092"]);
    }

    #[test]
    fn idempotence_is_on_by_default_and_turned_off_by_flag_or_env() {
        let f = tmp(CIFAR);
        let c = Config::resolve(&args_with(&f.0), &|_| None).unwrap();
        assert!(c.idempotence);
        let env = |k: &str| (k == "KAFKA_INFER_IDEMPOTENCE").then(|| "false".to_string());
        let c = Config::resolve(&args_with(&f.0), &env).unwrap();
        assert!(!c.idempotence);
        let mut a = args_with(&f.0);
        a.idempotence = Some("TRUE".into());
        assert!(Config::resolve(&a, &env).unwrap().idempotence);
        a.idempotence = Some("maybe".into());
        let e = Config::resolve(&a, &env).unwrap_err().to_string();
        assert!(e.contains("--idempotence") && e.contains("maybe"), "{e}");
    }

    #[test]
    fn max_record_age_is_off_by_default_and_named_in_its_errors() {
        let f = tmp(CIFAR);
        let c = Config::resolve(&args_with(&f.0), &|_| None).unwrap();
        assert_eq!(c.max_record_age, None);
        let env = |k: &str| (k == "KAFKA_INFER_MAX_RECORD_AGE").then(|| "30s".to_string());
        let c = Config::resolve(&args_with(&f.0), &env).unwrap();
        assert_eq!(c.max_record_age, Some(Duration::from_secs(30)));
        assert_eq!(c.summary()["max_record_age_ms"], 30_000);
        let mut a = args_with(&f.0);
        a.max_record_age = Some("2m".into());
        let c = Config::resolve(&a, &env).unwrap();
        assert_eq!(
            c.max_record_age,
            Some(Duration::from_secs(120)),
            "flag wins"
        );
        a.max_record_age = Some("soon".into());
        let e = Config::resolve(&a, &env).unwrap_err().to_string();
        assert!(
            e.contains("--max-record-age (KAFKA_INFER_MAX_RECORD_AGE)") && e.contains("soon"),
            "{e}"
        );
    }

    #[test]
    fn exactly_once_is_off_by_default_and_derives_its_transactional_id() {
        let f = tmp(CIFAR);
        let c = Config::resolve(&args_with(&f.0), &|_| None).unwrap();
        assert_eq!(c.exactly_once, None);
        let env = |k: &str| match k {
            "KAFKA_INFER_EXACTLY_ONCE" => Some("true".to_string()),
            "HOSTNAME" => Some("pod-7".to_string()),
            _ => None,
        };
        let c = Config::resolve(&args_with(&f.0), &env).unwrap();
        let e = c.exactly_once.expect("on");
        assert_eq!(e.window, Duration::from_millis(100));
        assert_eq!(
            e.transactional_id,
            format!("kafka-infer-{}-pod-7", c.group_id)
        );
        let mut a = args_with(&f.0);
        a.exactly_once = Some("true".into());
        a.transaction_window = Some("250ms".into());
        a.transactional_id = Some("replica-a".into());
        let e = Config::resolve(&a, &|_| None)
            .unwrap()
            .exactly_once
            .unwrap();
        assert_eq!(e.window, Duration::from_millis(250));
        assert_eq!(e.transactional_id, "replica-a");
        a.transaction_window = Some("0s".into());
        let err = Config::resolve(&a, &|_| None).unwrap_err().to_string();
        assert!(err.contains("--transaction-window"), "{err}");
        a.exactly_once = Some("perhaps".into());
        let err = Config::resolve(&a, &|_| None).unwrap_err().to_string();
        assert!(
            err.contains("--exactly-once") && err.contains("perhaps"),
            "{err}"
        );
    }

    #[test]
    fn flags_beat_env_beat_yaml() {
        let f = tmp(CIFAR);
        let env = |k: &str| (k == "KAFKA_INPUT_TOPIC").then(|| "from-env".to_string());
        let c = Config::resolve(&args_with(&f.0), &env).unwrap();
        assert_eq!(c.input_topic, "from-env");
        let mut a = args_with(&f.0);
        a.input_topic = Some("from-flag".into());
        a.broker = Some("127.0.0.1:1".into());
        let c = Config::resolve(&a, &env).unwrap();
        assert_eq!(c.input_topic, "from-flag");
        assert_eq!(c.connection.bootstrap_strings(), ["127.0.0.1:1"]);
        assert_eq!(c.output_topic, "cifar10-rest-output");
    }

    #[test]
    fn seldon_workers_and_auto_commit() {
        let f = tmp(CIFAR);
        let env = |k: &str| match k {
            "KAFKA_WORKERS" => Some("8".to_string()),
            "KAFKA_AUTO_COMMIT" => Some("true".to_string()),
            _ => None,
        };
        let c = Config::resolve(&args_with(&f.0), &env).unwrap();
        assert_eq!(c.max_concurrency, Some(8));
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("KAFKA_AUTO_COMMIT=true is ignored"))
        );
        let mut a = args_with(&f.0);
        a.max_concurrency = Some(2);
        assert_eq!(Config::resolve(&a, &env).unwrap().max_concurrency, Some(2));
        let bad = |k: &str| (k == "KAFKA_WORKERS").then(|| "many".to_string());
        let e = format!("{:#}", Config::resolve(&args_with(&f.0), &bad).unwrap_err());
        assert!(e.contains("KAFKA_WORKERS"), "{e}");
        let c = Config::resolve(&args_with(&f.0), &|_| None).unwrap();
        assert_eq!(c.max_concurrency, None);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn seldon_full_graph_mode_is_refused_not_ignored() {
        let f = tmp(CIFAR);
        for (v, ok) in [
            ("true", false),
            ("TRUE", false),
            ("1", false),
            ("false", true),
            ("", true),
        ] {
            let env = |k: &str| (k == "KAFKA_FULL_GRAPH").then(|| v.to_string());
            match Config::resolve(&args_with(&f.0), &env) {
                Ok(_) => assert!(ok, "KAFKA_FULL_GRAPH={v} accepted"),
                Err(e) => {
                    assert!(!ok, "KAFKA_FULL_GRAPH={v} refused: {e:#}");
                    assert!(format!("{e:#}").contains("KAFKA_FULL_GRAPH"), "{e:#}");
                }
            }
        }
    }

    fn graph_of(protocol: &str, transport: &str, graph: &str) -> Result<Config> {
        let text = format!(
            "kind: SeldonDeployment\nmetadata: {{name: d}}\nspec:\n  protocol: {protocol}\n  \
             transport: {transport}\n  serverType: kafka\n  predictors:\n  - name: p\n    \
             svcOrchSpec: {{env: [{{name: KAFKA_BROKER, value: \"b:9092\"}}, {{name: KAFKA_INPUT_TOPIC, \
             value: i}}, {{name: KAFKA_OUTPUT_TOPIC, value: o}}]}}\n    graph: {graph}\n"
        );
        let f = tmp(&text);
        Config::resolve(&args_with(&f.0), &|_| None)
    }

    #[test]
    fn graph_fields_as_seldon_reads_them() {
        let c = graph_of(
            "seldon",
            "grpc",
            "{name: ab, implementation: RANDOM_ABTEST, parameters: [{name: ratioA, value: '0.3', \
             type: FLOAT}], children: [{name: a, endpoint: {service_port: 1, httpPort: 2, \
             grpcPort: 3}, logger: {mode: response}}, {name: m, type: UNKNOWN_TYPE, methods: \
             [TRANSFORM_INPUT, AGGREGATE], endpoint: {service_host: h, service_port: 4}, \
             children: [{name: s, implementation: SKLEARN_SERVER, endpoint: {service_port: 5}}]}]}",
        )
        .unwrap();
        let g = &c.graph;
        assert!(g.is_ab_test() && !g.makes_calls() && g.url.is_empty());
        assert_eq!(ab_ratio(g).unwrap(), 0.3);
        let a = &g.children[0];
        // No type, methods or implementation: a MODEL (the operator's default); grpcPort over gRPC.
        assert_eq!(a.node_type, Some(NodeType::Model));
        assert_eq!(a.url, "http://127.0.0.1:3");
        let l = a.logger.as_ref().unwrap();
        assert!(!l.log_request && l.log_response && l.url.is_none());
        let m = &g.children[1];
        assert_eq!(m.node_type, None);
        assert_eq!(m.input_call(), Some(NodeType::Transformer));
        assert!(m.calls_aggregate() && !m.calls_route() && !m.calls_transform_output());
        assert_eq!(m.url, "http://h:4");
        assert_eq!(m.children[0].node_type, Some(NodeType::Model));
        assert_eq!(c.logger_default_endpoint, "http://default-broker");
        // Over REST: httpPort.
        let c = graph_of(
            "seldon",
            "rest",
            "{name: a, endpoint: {service_port: 1, httpPort: 2, grpcPort: 3}}",
        )
        .unwrap();
        assert_eq!(c.graph.url, "http://127.0.0.1:2");
    }

    #[test]
    fn batching_defaults_and_routed_graphs() {
        let f = tmp(CIFAR);
        let mut a = args_with(&f.0);
        a.batch_size = Some(32);
        let c = Config::resolve(&a, &|_| None).unwrap();
        assert_eq!((c.batch_size, c.max_in_flight), (32, 64));
        assert_eq!(c.batch_linger, Duration::from_millis(5));
        a.max_in_flight = Some(8);
        assert_eq!(Config::resolve(&a, &|_| None).unwrap().max_in_flight, 8);
        a.batch_size = Some(0);
        assert!(Config::resolve(&a, &|_| None).is_err());
        // A graph that routes each request is not batched.
        let text = "kind: SeldonDeployment\nmetadata: {name: d}\nspec:\n  serverType: kafka\n  \
             predictors:\n  - name: p\n    svcOrchSpec: {env: [{name: KAFKA_BROKER, value: \
             \"b:1\"}, {name: KAFKA_INPUT_TOPIC, value: i}, {name: KAFKA_OUTPUT_TOPIC, \
             value: o}]}\n    graph: {name: r, type: ROUTER, endpoint: {service_port: 1}, \
             children: [{name: a, endpoint: {service_port: 2}}]}\n";
        let g = tmp(text);
        let mut a = args_with(&g.0);
        a.batch_size = Some(8);
        let c = Config::resolve(&a, &|_| None).unwrap();
        assert_eq!(c.batch_size, 1);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("--batch-size 8 is ignored"))
        );
    }

    #[test]
    fn batching_from_node_parameters_and_deployment_env() {
        let dep = |env: &str, params_a: &str, params_b: &str| {
            format!(
                "kind: SeldonDeployment\nmetadata: {{name: d}}\nspec:\n  serverType: kafka\n  \
                 predictors:\n  - name: p\n    svcOrchSpec: {{env: [{{name: KAFKA_BROKER, value: \
                 \"b:1\"}}, {{name: KAFKA_INPUT_TOPIC, value: i}}, {{name: KAFKA_OUTPUT_TOPIC, \
                 value: o}}{env}]}}\n    graph: {{name: t, type: TRANSFORMER, endpoint: \
                 {{service_port: 1}}, parameters: [{params_a}], children: [{{name: m, type: \
                 MODEL, endpoint: {{service_port: 2}}, parameters: [{params_b}]}}]}}\n"
            )
        };
        let resolve = |text: String, flag: Option<usize>| {
            let g = tmp(&text);
            let mut a = args_with(&g.0);
            a.batch_size = flag;
            Config::resolve(&a, &|_| None)
        };
        // The smallest max_batch_size of the nodes, and the shortest max_batch_time (seconds).
        let c = resolve(
            dep(
                "",
                "{name: max_batch_size, value: '32', type: INT}, {name: max_batch_time, value: '0.02', type: FLOAT}",
                "{name: max_batch_size, value: '8', type: INT}, {name: max_batch_time, value: 10ms}",
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (c.batch_size, c.batch_linger),
            (8, Duration::from_millis(10))
        );
        // The deployment's env wins over the nodes, and the flag over both.
        let text = dep(
            ", {name: KAFKA_INFER_BATCH_SIZE, value: '4'}, {name: KAFKA_INFER_BATCH_LINGER, value: 1ms}",
            "{name: max_batch_size, value: '32', type: INT}",
            "",
        );
        let c = resolve(text.clone(), None).unwrap();
        assert_eq!(
            (c.batch_size, c.batch_linger),
            (4, Duration::from_millis(1))
        );
        assert_eq!(resolve(text, Some(16)).unwrap().batch_size, 16);
        // No parameter: off.
        assert_eq!(resolve(dep("", "", ""), None).unwrap().batch_size, 1);
        // Bad values are named.
        let e = resolve(dep("", "{name: max_batch_size, value: many}", ""), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("graph node t: max_batch_size `many`"), "{e}");
        // 0 is "no batching" (Triton, MLServer), not an error.
        let c = resolve(dep("", "{name: max_batch_size, value: '0'}", ""), None).unwrap();
        assert_eq!(c.batch_size, 1);
        let e = resolve(dep("", "", "{name: max_batch_time, value: soon}"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("graph node m: max_batch_time"), "{e}");
    }

    #[test]
    fn graphs_seldon_would_crash_on_are_refused_at_start() {
        let err = |p, g| format!("{:#}", graph_of(p, "rest", g).unwrap_err());
        let e = err(
            "seldon",
            "{name: ab, implementation: RANDOM_ABTEST, children: [{name: a, endpoint: {service_port: 1}}]}",
        );
        assert!(e.contains("needs 2 children"), "{e}");
        let e = err(
            "v2",
            "{name: r, type: ROUTER, endpoint: {service_port: 1}, children: [{name: a, endpoint: {service_port: 2}}]}",
        );
        assert!(e.contains("route or aggregate"), "{e}");
        let e = err(
            "seldon",
            "{name: r, type: ROUTER, endpoint: {service_port: 1}}",
        );
        assert!(e.contains("needs children"), "{e}");
        let e = err("seldon", "{name: t, type: TRANSFORMER}");
        assert!(e.contains("service_port is missing"), "{e}");
        let e = err(
            "seldon",
            "{name: ab, implementation: RANDOM_ABTEST, parameters: [{name: ratioA, value: x}], \
             children: [{name: a, endpoint: {service_port: 1}}, {name: b, endpoint: {service_port: 2}}]}",
        );
        assert!(e.contains("ratioA"), "{e}");
        // Accepted with a warning: does nothing in Seldon either.
        let c = graph_of(
            "seldon",
            "rest",
            "{name: s, implementation: SIMPLE_ROUTER, children: [{name: a, endpoint: {service_port: 1}}]}",
        )
        .unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("SIMPLE_ROUTER")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn clear_errors() {
        let f = tmp(&CIFAR.replace("serverType: kafka", "serverType: rest"));
        let e = format!(
            "{:#}",
            Config::resolve(&args_with(&f.0), &|_| None).unwrap_err()
        );
        assert!(e.contains("serverType"), "{e}");
        let e = format!(
            "{:#}",
            Config::resolve(&RunArgs::default(), &|_| None).unwrap_err()
        );
        assert!(e.contains("KAFKA_BROKER"), "{e}");
        let mut a = RunArgs {
            broker: Some("b:1".into()),
            input_topic: Some("i".into()),
            output_topic: Some("o".into()),
            ..Default::default()
        };
        let e = format!("{:#}", Config::resolve(&a, &|_| None).unwrap_err());
        assert!(e.contains("--model"), "{e}");
        a.model = Some("http://127.0.0.1:1".into());
        a.session_timeout = Some("ten".into());
        let e = format!("{:#}", Config::resolve(&a, &|_| None).unwrap_err());
        assert!(e.contains("KAFKA_SESSION_TIMEOUT"), "{e}");
        a.session_timeout = Some("6000".into());
        assert_eq!(
            Config::resolve(&a, &|_| None).unwrap().session_timeout,
            Duration::from_secs(6)
        );
    }

    /// The README's cloud sign-in recipes, each resolved as `--print-config` would (no
    /// network), with its secret files present: every recipe is there, parses, and gives the
    /// settings its platform expects; no secret reaches the summary.
    #[test]
    fn readme_cloud_recipes() {
        let readme = include_str!("../../../README.md");
        let mut recipes: Vec<(String, Vec<(String, String)>)> = Vec::new();
        let mut current: Option<(String, Vec<(String, String)>)> = None;
        for line in readme.lines() {
            if let Some(name) = line.strip_prefix("# recipe: ") {
                current = Some((name.trim().to_owned(), Vec::new()));
            } else if line.starts_with("```") {
                recipes.extend(current.take());
            } else if let Some((_, vars)) = current.as_mut() {
                let (k, v) = line.split_once('=').expect("KEY=value");
                let v = v.trim();
                let v = v
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .unwrap_or(v);
                vars.push((k.trim().to_owned(), v.to_owned()));
            }
        }
        let names: Vec<&str> = recipes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "confluent-cloud-oauth",
                "confluent-cloud-api-key",
                "event-hubs-oauth",
                "event-hubs-connection-string",
                "aiven-scram",
                "token-file",
                "msk-iam",
            ]
        );
        let base = RunArgs {
            input_topic: Some("in".into()),
            output_topic: Some("out".into()),
            model: Some("http://127.0.0.1:9000".into()),
            ..Default::default()
        };
        for (name, vars) in &recipes {
            // Secret files as Kubernetes would mount them; what EKS sets for IRSA.
            let mut files = Vec::new();
            let eks = [
                ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/kafka-infer"),
                (
                    "AWS_WEB_IDENTITY_TOKEN_FILE",
                    "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
                ),
            ];
            let vars: HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| {
                    if k.ends_with("_FILE") && k.contains("SECRET") || k.ends_with("PASSWORD_FILE")
                    {
                        let f = tmp("s3cret-from-file\n");
                        let path = f.0.display().to_string();
                        files.push(f);
                        (k.clone(), path)
                    } else {
                        (k.clone(), v.clone())
                    }
                })
                .chain(
                    (name == "msk-iam")
                        .then_some(eks)
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.to_owned(), v.to_owned())),
                )
                .collect();
            let c = Config::resolve(&base, &|k| vars.get(k).cloned())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let sum = c.summary();
            let printed = sum.to_string();
            assert!(!printed.contains("s3cret"), "{name}: {printed}");
            assert_eq!(sum["security_protocol"], "SaslSsl", "{name}");
            let port = c.connection.bootstrap[0].port;
            let o = &sum["sasl_oauthbearer"];
            match name.as_str() {
                "confluent-cloud-oauth" => {
                    assert_eq!(sum["sasl_mechanism"], "OAUTHBEARER");
                    assert_eq!(o["method"], "oidc");
                    assert_eq!(o["client_id"], "<client-id>");
                    assert_eq!(o["scope"], "<scope>");
                    assert_eq!(
                        o["extensions"]["logicalCluster"], "<lkc-xxxxx>",
                        "{printed}"
                    );
                    assert_eq!(o["extensions"]["identityPoolId"], "<pool-xxxxx>");
                    assert_eq!(port, 9092);
                }
                "confluent-cloud-api-key" => {
                    assert_eq!(sum["sasl_mechanism"], "PLAIN");
                    assert_eq!(sum["sasl_username"], "<api-key>");
                    assert!(!c.connection.sends_password_in_clear());
                }
                "event-hubs-oauth" => {
                    assert_eq!(sum["sasl_mechanism"], "OAUTHBEARER");
                    assert_eq!(o["method"], "oidc");
                    assert!(
                        o["token_endpoint_url"]
                            .as_str()
                            .unwrap()
                            .starts_with("https://login.microsoftonline.com/")
                    );
                    assert_eq!(
                        o["scope"],
                        "https://<namespace>.servicebus.windows.net/.default"
                    );
                    assert_eq!(port, 9093);
                }
                "event-hubs-connection-string" => {
                    assert_eq!(sum["sasl_mechanism"], "PLAIN");
                    assert_eq!(sum["sasl_username"], "$ConnectionString");
                    assert_eq!(port, 9093);
                }
                "aiven-scram" => {
                    assert_eq!(sum["sasl_mechanism"], "SCRAM-SHA-256");
                    assert!(c.connection.tls.ca.is_some());
                }
                "token-file" => {
                    assert_eq!(o["method"], "file");
                    assert_eq!(o["token_file"], "/var/run/secrets/tokens/kafka-token");
                }
                "msk-iam" => {
                    assert_eq!(o["method"], "aws_msk_iam");
                    assert_eq!(o["region"], "<region>");
                    assert_eq!(o["aws_credentials"], "web_identity");
                    assert_eq!(o["role_arn"], eks[0].1);
                    assert_eq!(port, 9098);
                    continue;
                }
                other => panic!("no check for recipe {other}"),
            }
            let secret = c.connection.sasl.as_ref().map(|s| {
                match s.oauth.as_ref().map(|o| &o.settings().method) {
                    Some(kafka_io::OauthMethod::Oidc { client_secret, .. }) => {
                        client_secret.expose().to_owned()
                    }
                    Some(_) => "s3cret-from-file".into(),
                    None => s.password.expose().to_owned(),
                }
            });
            assert_eq!(secret.as_deref(), Some("s3cret-from-file"), "{name}");
            assert!(c.warnings.is_empty(), "{name}: {:?}", c.warnings);
        }
    }

    /// OAUTHBEARER from a SeldonDeployment's env and from flags; unsecured and over
    /// SASL_PLAINTEXT are warned about.
    #[test]
    fn oauthbearer_from_the_deployment_and_flags_with_warnings() {
        let f = tmp(r#"
apiVersion: machinelearning.seldon.io/v1
kind: SeldonDeployment
metadata: {name: m, namespace: ns}
spec:
  serverType: kafka
  predictors:
  - name: p
    graph: {name: model, type: MODEL, endpoint: {service_host: 127.0.0.1, service_port: 9000}}
    svcOrchSpec:
      env:
      - {name: KAFKA_BROKER, value: "b:9093"}
      - {name: KAFKA_INPUT_TOPIC, value: in}
      - {name: KAFKA_OUTPUT_TOPIC, value: out}
      - {name: KAFKA_SECURITY_PROTOCOL, value: SASL_PLAINTEXT}
      - {name: KAFKA_SASL_MECHANISM, value: OAUTHBEARER}
      - {name: KAFKA_SASL_OAUTHBEARER_METHOD, value: unsecured}
      - {name: KAFKA_SASL_OAUTHBEARER_CONFIG, value: "principal=dev-user"}
"#);
        let c = Config::resolve(&args_with(&f.0), &|_| None).unwrap();
        assert_eq!(c.summary()["sasl_oauthbearer"]["principal"], "dev-user");
        assert!(
            c.warnings.iter().any(|w| w.contains("unsigned token")),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("bearer token in clear text")),
            "{:?}",
            c.warnings
        );
        // Flags over the deployment's env.
        let mut a = args_with(&f.0);
        a.security_protocol = Some("SASL_SSL".into());
        a.sasl_oauthbearer_method = Some("file".into());
        a.sasl_oauthbearer_token_file = Some("/t/token".into());
        a.sasl_oauthbearer_extensions = Some("logicalCluster=lkc-1".into());
        let c = Config::resolve(&a, &|_| None).unwrap();
        let o = &c.summary()["sasl_oauthbearer"];
        assert_eq!(o["method"], "file");
        assert_eq!(o["token_file"], "/t/token");
        assert_eq!(o["extensions"]["logicalCluster"], "lkc-1");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    fn ok(s: &str, setting: &str) -> Duration {
        parse_duration(s, setting).unwrap_or_else(|e| panic!("{s}: {e:#}"))
    }

    fn err(s: &str, setting: &str) -> String {
        format!("{:#}", parse_duration(s, setting).unwrap_err())
    }

    #[test]
    fn units_and_bare_milliseconds() {
        let ms = Duration::from_millis;
        let s = "KAFKA_INFER_MODEL_TIMEOUT";
        assert_eq!(ok("10s", s), ms(10_000));
        assert_eq!(ok("500ms", s), ms(500));
        assert_eq!(ok("2m", s), ms(120_000));
        assert_eq!(ok("1m30s", s), ms(90_000));
        assert_eq!(ok("1.5s", s), ms(1_500));
        assert_eq!(ok("6000", s), ms(6_000), "a bare number is milliseconds");
        assert_eq!(ok(" 250 ", s), ms(250));
        assert_eq!(ok("1h", s), ms(3_600_000));
    }

    #[test]
    fn huge_values_are_range_errors_not_panics() {
        for s in [
            "99999999999999999999999s",
            "99999999999999999999",
            "18446744073709551615",
            "1000000000000h",
            "100000d",
            "2h",
        ] {
            let e = err(s, "KAFKA_SESSION_TIMEOUT");
            assert!(
                e.starts_with("--session-timeout (KAFKA_SESSION_TIMEOUT): ")
                    && e.contains("out of range (1s to 1h)"),
                "{s}: {e}"
            );
        }
        // Settings without a range of their own: at most a day.
        assert!(err("25h", "--some-wait").contains("out of range (1ms to 1day)"));
        assert_eq!(ok("24h", "--some-wait"), Duration::from_secs(86_400));
    }

    #[test]
    fn zero_only_where_it_means_something() {
        for env in [
            "KAFKA_SESSION_TIMEOUT",
            "KAFKA_INFER_MODEL_TIMEOUT",
            "KAFKA_INFER_RETRY_MAX_BACKOFF",
            "KAFKA_FETCH_MAX_WAIT",
            "KAFKA_COMMIT_INTERVAL",
        ] {
            for zero in ["0", "0ms", "0s"] {
                let e = err(zero, env);
                assert!(e.contains(env) && e.contains("out of range"), "{e}");
            }
        }
        // Drain timeout zero: stop at once.
        assert_eq!(ok("0", "KAFKA_INFER_DRAIN_TIMEOUT"), Duration::ZERO);
        // Retries below 10 ms would spin.
        assert!(err("5ms", "KAFKA_INFER_RETRY_MAX_BACKOFF").contains("10ms to 1h"));
    }

    #[test]
    fn errors_name_the_flag_and_the_variable() {
        let e = err("ten", "KAFKA_FETCH_MAX_WAIT");
        assert!(
            e.starts_with("--fetch-max-wait (KAFKA_FETCH_MAX_WAIT): `ten` is not a duration"),
            "{e}"
        );
        for bad in ["", "10x", "1.5", "-5s", "5 s s"] {
            let e = err(bad, "KAFKA_INFER_DRAIN_TIMEOUT");
            assert!(
                e.starts_with("--drain-timeout (KAFKA_INFER_DRAIN_TIMEOUT): "),
                "{e}"
            );
        }
        // Looked up by flag too.
        assert!(err("2h", "--session-timeout").contains("(1s to 1h)"));
    }

    #[test]
    fn resolve_checks_every_duration_setting() {
        let base = RunArgs {
            broker: Some("b:1".into()),
            input_topic: Some("i".into()),
            output_topic: Some("o".into()),
            model: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        let c = Config::resolve(&base, &|_| None).expect("defaults are in range");
        assert_eq!(c.fetch_max_wait, Duration::from_millis(500));
        let mut a = base.clone();
        a.session_timeout = Some("100000000000000000000s".into());
        let e = format!("{:#}", Config::resolve(&a, &|_| None).unwrap_err());
        assert!(e.contains("--session-timeout"), "{e}");
        let env = |k: &str| (k == "KAFKA_FETCH_MAX_WAIT").then(|| "0".to_string());
        let e = format!("{:#}", Config::resolve(&base, &env).unwrap_err());
        assert!(e.contains("--fetch-max-wait (KAFKA_FETCH_MAX_WAIT)"), "{e}");
        let mut a = base.clone();
        a.model_timeout = Some("90s".into());
        a.drain_timeout = Some("0".into());
        let c = Config::resolve(&a, &|_| None).unwrap();
        assert_eq!(c.model_timeout, Duration::from_secs(90));
        assert_eq!(c.drain_timeout, Duration::ZERO);
    }

    #[test]
    fn userinfo_is_stripped_from_printed_urls() {
        for (url, shown) in [
            ("http://alice:pw@h:1/x", "http://***@h:1/x"),
            ("https://token@h", "https://***@h"),
            ("http://a:b@c@h:1", "http://***@h:1"),
            ("alice:pw@h:1", "***@h:1"),
            ("http://h:1/p@th?q=a@b#f@g", "http://h:1/p@th?q=a@b#f@g"),
            ("http://[::1]:8080", "http://[::1]:8080"),
        ] {
            assert_eq!(without_userinfo(url), shown, "{url}");
        }
        let a = RunArgs {
            broker: Some("b:1".into()),
            input_topic: Some("i".into()),
            output_topic: Some("o".into()),
            model: Some("http://alice:pw-in-url@127.0.0.1:9000".into()),
            ..Default::default()
        };
        let c = Config::resolve(&a, &|_| None).unwrap();
        let printed = c.summary().to_string();
        assert!(!printed.contains("pw-in-url"), "{printed}");
        assert!(printed.contains("http://***@127.0.0.1:9000"), "{printed}");
        // The client still gets the URL as given.
        assert_eq!(c.graph.url, "http://alice:pw-in-url@127.0.0.1:9000");
    }

    #[test]
    fn sasl_plain_without_tls_is_warned_about() {
        let base = RunArgs {
            broker: Some("b:1".into()),
            input_topic: Some("i".into()),
            output_topic: Some("o".into()),
            model: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        let warned = |protocol: &str, mechanism: Option<&str>| {
            let env = |k: &str| {
                match k {
                    "KAFKA_SECURITY_PROTOCOL" => Some(protocol),
                    "KAFKA_SASL_MECHANISM" => mechanism,
                    "KAFKA_SASL_USERNAME" => Some("alice"),
                    "KAFKA_SASL_PASSWORD" => Some("pw-in-the-clear"),
                    _ => None,
                }
                .map(String::from)
            };
            let c = Config::resolve(&base, &env).unwrap();
            assert!(!format!("{:?}", c.warnings).contains("pw-in-the-clear"));
            assert_eq!(
                c.connection.sends_password_in_clear(),
                c.warnings.iter().any(|w| w.contains("clear text")),
                "{:?}",
                c.warnings
            );
            c.connection.sends_password_in_clear()
        };
        assert!(warned("SASL_PLAINTEXT", None));
        assert!(warned("SASL_PLAINTEXT", Some("PLAIN")));
        assert!(!warned("SASL_PLAINTEXT", Some("SCRAM-SHA-256")));
        assert!(!warned("SASL_SSL", None));
    }

    #[test]
    fn max_tensor_bytes_default_and_flag() {
        let mut a = RunArgs {
            broker: Some("b:1".into()),
            input_topic: Some("i".into()),
            output_topic: Some("o".into()),
            model: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        let c = Config::resolve(&a, &|_| None).unwrap();
        assert_eq!(c.max_tensor_bytes, 64 << 20);
        assert_eq!(c.summary()["max_tensor_bytes"], 64 << 20);
        a.max_tensor_bytes = Some(1000);
        assert_eq!(
            Config::resolve(&a, &|_| None).unwrap().max_tensor_bytes,
            1000
        );
        a.max_tensor_bytes = Some(0);
        let e = format!("{:#}", Config::resolve(&a, &|_| None).unwrap_err());
        assert!(e.contains("--max-tensor-bytes"), "{e}");
    }
}
