//! kafka-infer with SASL/SCRAM against a real broker: tansu's crates.io build with sqlite
//! storage, the only test broker here that has SCRAM users (see the test broker notes). The
//! users are made with tansu's own CLI (`tansu user create`, AlterUserScramCredentials) while
//! authentication is off, then the broker is restarted with `--authentication` on the same
//! database. kafka-infer runs end to end (SCRAM-SHA-256 and SCRAM-SHA-512, SASL_PLAINTEXT and
//! SASL_SSL through stunnel) and answers every request; librdkafka reads the answers back over
//! SCRAM too (an independent client). A wrong password stops kafka-infer at start.
//!
//! The tests are ignored by plain `cargo test`: they need that broker, which takes ~10 minutes
//! to build. `cargo xtask test` (CI) and `cargo xtask scram` build it once per machine into
//! ~/.cache/kafka-infer and run these with KAFKA_INFER_TANSU_SQLITE pointing at it.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use kafka_infer_tests::{
    Proc, free_port,
    models::{self, KafkaInfer},
    read_topic_with, seldon_deployment, stunnel, tls, unique, wait_port, write_stunnel_conf,
};
use kafka_io::{Cluster, ConnectionSettings, OutRecord, Producer, ProducerConfig};
use serde_json::{Value, json};

/// The sqlite build of tansu (KAFKA_INFER_TANSU_SQLITE, set by `cargo xtask scram`).
fn tansu_sqlite() -> PathBuf {
    let p = std::env::var_os("KAFKA_INFER_TANSU_SQLITE")
        .map(PathBuf::from)
        .expect("KAFKA_INFER_TANSU_SQLITE unset: run `cargo xtask scram`");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask scram`",
        p.display()
    );
    p
}

const USER: &str = "ki-user";
const PASSWORD: &str = "scram-pa55-word";

/// A tansu (sqlite storage, authentication on) with the SCRAM users `ki-user-256` and
/// `ki-user-512` and two topics, optionally behind a TLS front (stunnel).
struct ScramBroker {
    dir: tempfile::TempDir,
    port: u16,
    /// The port clients use (stunnel's with TLS).
    advertised: u16,
    material: Option<tls::Material>,
    input: String,
    output: String,
    // Dropped (stopped by PID) in this order: stunnel first, then the broker.
    stunnel: Option<Proc>,
    broker: Option<Proc>,
}

impl ScramBroker {
    fn start(tls: bool) -> Result<Self> {
        let port = free_port();
        let advertised = if tls { free_port() } else { port };
        let mut b = Self {
            dir: tempfile::tempdir()?,
            port,
            advertised,
            material: None,
            input: unique("in"),
            output: unique("out"),
            stunnel: None,
            broker: None,
        };
        // Users and topics while authentication is off (tansu's CLI speaks no SASL).
        b.run_broker(false)?;
        for (name, partitions) in [(b.input.clone(), 2), (b.output.clone(), 2)] {
            b.cli(&[
                "topic",
                "create",
                "--partitions",
                &partitions.to_string(),
                &name,
            ])?;
        }
        for (user, mechanism) in [
            (format!("{USER}-256"), "scram256"),
            (format!("{USER}-512"), "scram512"),
        ] {
            b.cli(&["user", "create", "--mechanism", mechanism, &user, PASSWORD])?;
        }
        b.run_broker(true)?;
        if tls {
            let material = tls::Material::generate()?;
            let conf = write_stunnel_conf(&material, advertised, port, false)?;
            b.stunnel = Some(Proc::spawn(
                "stunnel",
                Command::new(stunnel()?)
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?);
            wait_port(advertised, Duration::from_secs(10))?;
            b.material = Some(material);
        }
        Ok(b)
    }

    /// (Re)starts the broker on the same port and database.
    fn run_broker(&mut self, authentication: bool) -> Result<()> {
        if let Some(mut p) = self.broker.take() {
            p.stop();
        }
        let log = std::fs::File::create(self.dir.path().join(format!(
            "tansu-{}.log",
            if authentication { "auth" } else { "setup" }
        )))?;
        let mut cmd = Command::new(tansu_sqlite());
        cmd.current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised),
                // Relative to the working directory: the test's own directory.
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(log.try_clone()?)
            .stderr(log);
        if authentication {
            cmd.arg("--authentication");
        }
        self.broker = Some(Proc::spawn("tansu (sqlite)", &mut cmd)?);
        wait_port(self.port, Duration::from_secs(20))
    }

    /// tansu's own CLI against the broker (authentication off).
    fn cli(&self, args: &[&str]) -> Result<()> {
        let (sub, rest) = args.split_at(2);
        let out = Command::new(tansu_sqlite())
            .args(sub)
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(rest)
            .output()?;
        if !out.status.success() {
            bail!(
                "tansu {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// A client's KAFKA_* settings for `mechanism` ("SCRAM-SHA-256" or "SCRAM-SHA-512").
    fn kafka_env(&self, mechanism: &str, password: &str) -> Vec<(&'static str, String)> {
        let user = format!("{USER}-{}", &mechanism[mechanism.len() - 3..]);
        let mut env = vec![
            ("KAFKA_BROKER", self.bootstrap()),
            (
                "KAFKA_SECURITY_PROTOCOL",
                if self.material.is_some() {
                    "SASL_SSL"
                } else {
                    "SASL_PLAINTEXT"
                }
                .into(),
            ),
            ("KAFKA_SASL_MECHANISM", mechanism.into()),
            ("KAFKA_SASL_USERNAME", user),
            ("KAFKA_SASL_PASSWORD", password.into()),
        ];
        if let Some(m) = &self.material {
            env.push((
                "KAFKA_SSL_CA_CERT_FILE",
                m.path("ca.pem").display().to_string(),
            ));
        }
        env
    }

    /// The same settings for librdkafka (the reference client).
    fn librdkafka_config(&self, mechanism: &str) -> Vec<(&'static str, String)> {
        let user = format!("{USER}-{}", &mechanism[mechanism.len() - 3..]);
        let mut c = vec![
            ("sasl.mechanisms", mechanism.to_owned()),
            ("sasl.username", user),
            ("sasl.password", PASSWORD.to_owned()),
        ];
        match &self.material {
            Some(m) => {
                c.push(("security.protocol", "sasl_ssl".into()));
                c.push(("ssl.ca.location", m.path("ca.pem").display().to_string()));
            }
            None => c.push(("security.protocol", "sasl_plaintext".into())),
        }
        c
    }

    /// A SeldonDeployment with the topics and one MODEL node `m` on 127.0.0.1:`model_port`;
    /// the SASL settings come from the process environment (as from a Secret).
    fn deployment_file(&self, model_port: u16) -> Result<PathBuf> {
        let yaml = seldon_deployment(
            "v2",
            "rest",
            &[
                ("KAFKA_INPUT_TOPIC", self.input.clone()),
                ("KAFKA_OUTPUT_TOPIC", self.output.clone()),
            ],
            &format!(
                "{{name: m, type: MODEL, endpoint: {{service_port: {model_port}}}, children: []}}"
            ),
        );
        let file = self.dir.path().join("sdep.yaml");
        std::fs::write(&file, yaml)?;
        Ok(file)
    }

    /// The broker's log so far (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu-auth.log")).unwrap_or_default()
    }
}

const N: usize = 30;

fn request(i: usize) -> Bytes {
    Bytes::from(
        json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [i, 7]}]})
            .to_string(),
    )
}

/// kafka-io settings for `env` (KAFKA_* pairs).
fn settings(env: &[(&'static str, String)]) -> Result<ConnectionSettings> {
    Ok(ConnectionSettings::from_lookup(|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })?)
}

/// Produces requests `ids` (keyed `k{i}`) over SCRAM with kafka-io, `pause` between them.
async fn produce(
    b: &ScramBroker,
    env: &[(&'static str, String)],
    ids: std::ops::Range<usize>,
    pause: Duration,
) -> Result<()> {
    let p = Producer::new(
        Cluster::connect(settings(env)?)
            .await
            .with_context(|| format!("connecting over SCRAM; broker log:\n{}", b.log()))?,
        ProducerConfig::default(),
    );
    let mut ds = Vec::new();
    for i in ids {
        let r = OutRecord {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(request(i)),
            headers: vec![],
        };
        ds.push(p.send(&b.input, None, r).await?);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    for d in ds {
        d.wait().await?;
    }
    p.close(Duration::from_secs(10)).await?;
    Ok(())
}

/// Reads the output topic with librdkafka over SCRAM and checks one answer per request
/// `0..n`, its key kept and its values echoed, and no error record.
fn check_answers(b: &ScramBroker, ki: &KafkaInfer, mechanism: &str, n: usize) -> Result<()> {
    let answers = read_topic_with(
        &b.librdkafka_config(mechanism),
        &b.bootstrap(),
        &b.output,
        n,
        90,
    )?;
    let mut by_id: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for a in &answers {
        let v: Value = serde_json::from_slice(&a.value)?;
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            by_id.insert(id.clone(), (a.key.clone(), v)).is_none(),
            "{id} answered twice"
        );
    }
    assert_eq!(
        by_id.len(),
        n,
        "every request answered: {:?}\nkafka-infer:\n{}\nbroker:\n{}",
        by_id.keys(),
        ki.output(),
        b.log()
    );
    for i in 0..n {
        let (key, v) = &by_id[&format!("r{i}")];
        assert_eq!(key, &format!("k{i}"), "key kept");
        assert_eq!(v["model_name"], "m");
        assert_eq!(v["outputs"][0]["data"], json!([i, 7]), "r{i} echoed: {v}");
    }
    ki.wait_ready(Duration::from_secs(10))?;
    let errors = ki
        .metric("kafka_infer_records_total{result=\"error\"}")
        .unwrap_or(0.0);
    assert_eq!(errors, 0.0, "no error records");
    assert!(
        !ki.output().contains(PASSWORD),
        "the password must not reach the log"
    );
    Ok(())
}

/// A backlog of N requests (produced with kafka-io over SCRAM before kafka-infer starts), then
/// kafka-infer over SCRAM answers every one.
async fn answers_every_request(tls: bool, mechanism: &str) -> Result<()> {
    let b = ScramBroker::start(tls)?;
    let model = models::test_model("v2", "m", "echo")?;
    let env = b.kafka_env(mechanism, PASSWORD);
    produce(&b, &env, 0..N, Duration::ZERO).await?;
    let file = b.deployment_file(model.http_port)?;
    let ki = KafkaInfer::start(
        &["-f", file.to_str().unwrap(), "--session-timeout", "4s"],
        &env,
    )?;
    check_answers(&b, &ki, mechanism, N)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
async fn scram_sha_256_over_sasl_plaintext_answers_every_request() -> Result<()> {
    answers_every_request(false, "SCRAM-SHA-256").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
async fn scram_sha_512_over_sasl_plaintext_answers_every_request() -> Result<()> {
    answers_every_request(false, "SCRAM-SHA-512").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
async fn scram_sha_256_over_sasl_ssl_answers_every_request() -> Result<()> {
    answers_every_request(true, "SCRAM-SHA-256").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
async fn scram_sha_512_over_sasl_ssl_answers_every_request() -> Result<()> {
    answers_every_request(true, "SCRAM-SHA-512").await
}

/// tansu gives every SASL session 60 s (SaslAuthenticate's session_lifetime_ms) and answers a
/// second SaslHandshake on a connection with UNSUPPORTED_SASL_MECHANISM, so re-authentication
/// (KIP-368) fails there: kafka-infer must reconnect and keep answering, no request lost or
/// answered twice, while requests arrive for 75 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
async fn scram_keeps_answering_past_the_brokers_60_s_session_lifetime() -> Result<()> {
    let b = ScramBroker::start(false)?;
    let model = models::test_model("v2", "m", "echo")?;
    let mechanism = "SCRAM-SHA-512";
    let env = b.kafka_env(mechanism, PASSWORD);
    let file = b.deployment_file(model.http_port)?;
    let ki = KafkaInfer::start(
        &["-f", file.to_str().unwrap(), "--session-timeout", "4s"],
        &env,
    )?;
    let n = 50;
    produce(&b, &env, 0..n, Duration::from_millis(1500)).await?;
    check_answers(&b, &ki, mechanism, n)
}

/// A wrong password is a settings mistake: kafka-infer exits 1 at start, its last line naming
/// the setting to check, and the password is in none of its output.
fn wrong_password_exits_at_start(tls: bool, mechanism: &str) -> Result<()> {
    let b = ScramBroker::start(tls)?;
    let model = models::test_model("v2", "m", "echo")?;
    let wrong = "not-the-Pa55word";
    let file = b.deployment_file(model.http_port)?;
    let mut ki = KafkaInfer::start(
        &["-f", file.to_str().unwrap(), "--session-timeout", "4s"],
        &b.kafka_env(mechanism, wrong),
    )?;
    let started = Instant::now();
    let code = ki.proc.wait_exit(Duration::from_secs(30));
    let output = ki.output();
    let code = code.map_err(|e| anyhow!("{e}; its output so far:\n{output}"))?;
    eprintln!("exit {code:?} after {:?}", started.elapsed());
    assert_eq!(code, Some(1), "exits 1: {output}\nbroker:\n{}", b.log());
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kafka-infer: ")
            && last.contains(mechanism)
            && last.contains("KAFKA_SASL_PASSWORD"),
        "the final error names the mechanism and the password setting: {output}"
    );
    assert!(!output.contains(wrong), "the password must not leak");
    Ok(())
}

#[test]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
fn a_wrong_scram_sha_256_password_exits_1_at_start_naming_the_setting() -> Result<()> {
    wrong_password_exits_at_start(false, "SCRAM-SHA-256")
}

#[test]
#[ignore = "needs tansu's crates.io build with sqlite storage: run `cargo xtask scram`"]
fn a_wrong_scram_sha_512_password_over_sasl_ssl_exits_1_at_start_naming_the_setting() -> Result<()>
{
    wrong_password_exits_at_start(true, "SCRAM-SHA-512")
}
