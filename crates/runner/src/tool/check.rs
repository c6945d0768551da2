//! `kafka-infer check`: a preflight that consumes nothing (for CI and init containers). Each
//! check is a row: what was checked, whether it passed, what failed, and the setting to look
//! at. Exit 0 only if every check passes.
//!
//! The checks, in order (later ones are skipped when what they need failed):
//! the configuration resolves; the TLS material loads; each broker (bootstrap and advertised)
//! is reachable with the configured TLS/SASL, naming the step that failed (TCP, TLS,
//! ApiVersions, SASL); the input, output and error topics exist (partition counts,
//! max.message.bytes via DescribeConfigs); the group's state and committed offsets are
//! readable; every graph node's model server answers its protocol's readiness endpoint.

use std::{sync::Arc, time::Duration};

use clap::Args;
use kafka_io::{
    Cluster, GroupConfig,
    conn::{ConnectStep, Connector},
    group::Member,
    settings::BrokerAddr,
};
use serde_json::json;

use super::table;
use crate::config::{Config, RunArgs};

/// `kafka-infer check` flags: run's settings and the output form.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Not run: what it needs failed.
    Skip,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Self::Pass => "ok",
            Self::Fail => "FAIL",
            Self::Skip => "skipped",
        }
    }
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found, or what failed.
    pub detail: String,
    /// The setting to look at when it fails.
    pub setting: String,
}

impl Check {
    fn new(name: impl Into<String>, result: Result<String, String>, setting: &str) -> Self {
        let (status, detail) = match result {
            Ok(d) => (Status::Pass, d),
            Err(d) => (Status::Fail, d),
        };
        Self {
            name: name.into(),
            status,
            detail,
            setting: setting.to_owned(),
        }
    }

    fn skip(name: impl Into<String>, why: &str, setting: &str) -> Self {
        Self {
            name: name.into(),
            status: Status::Skip,
            detail: why.to_owned(),
            setting: setting.to_owned(),
        }
    }
}

/// The settings behind a failed connection step.
fn step_setting(step: ConnectStep) -> &'static str {
    match step {
        ConnectStep::Tcp => "KAFKA_BROKER (--broker); the broker's advertised listeners",
        ConnectStep::Tls => {
            "KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_CA_CERT[_FILE], KAFKA_SSL_CLIENT_CERT[_FILE], \
             KAFKA_SSL_CLIENT_KEY[_FILE]"
        }
        ConnectStep::ApiVersions => {
            "KAFKA_SECURITY_PROTOCOL (--security-protocol): does the listener expect TLS?"
        }
        ConnectStep::Sasl => {
            "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD[_FILE], \
             KAFKA_SECURITY_PROTOCOL"
        }
    }
}

async fn broker_check(connector: &Connector, addr: &BrokerAddr, role: &str) -> Check {
    let name = format!("broker {addr} ({role})");
    let steps = match (
        connector.settings.security.uses_tls(),
        connector.settings.sasl.is_some(),
    ) {
        (false, false) => "TCP, ApiVersions",
        (true, false) => "TCP, TLS, ApiVersions",
        (false, true) => "TCP, ApiVersions, SASL",
        (true, true) => "TCP, TLS, ApiVersions, SASL",
    };
    match connector.connect_steps(addr).await {
        Ok(_) => Check::new(name, Ok(format!("{steps}: ok")), ""),
        Err((step, e)) => Check::new(
            name,
            Err(format!("{} failed: {e}", step.name())),
            step_setting(step),
        ),
    }
}

/// Runs every check; never fails itself (a failure is a row).
pub async fn run(args: &RunArgs) -> Vec<Check> {
    let mut out = Vec::new();
    let cfg = match super::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::new(
                "configuration",
                Err(e),
                "the flag or variable the message names (flags > environment > -f)",
            ));
            return out;
        }
    };
    out.push(Check::new(
        "configuration",
        Ok(format!(
            "group {}, input {}, output {}, error topic {}, protocol {}",
            cfg.group_id,
            cfg.input_topic,
            cfg.output_topic,
            cfg.error_topic.as_deref().unwrap_or("(none)"),
            cfg.protocol
        )),
        "",
    ));
    kafka_checks(&cfg, &mut out).await;
    model_checks(&cfg, &mut out).await;
    out
}

async fn kafka_checks(cfg: &Config, out: &mut Vec<Check>) {
    let mut settings = cfg.connection.clone();
    if let Err(e) = settings.build_tls() {
        out.push(Check::new("TLS material", Err(e.to_string()), e.setting));
        return;
    }
    if settings.security.uses_tls() {
        out.push(Check::new("TLS material", Ok("loads".into()), ""));
    }
    let mut connector = match Connector::new(Arc::new(settings.clone())) {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::new(
                "TLS material",
                Err(e.to_string()),
                step_setting(ConnectStep::Tls),
            ));
            return;
        }
    };
    connector.connect_timeout = Duration::from_secs(5);
    connector.request_timeout = Duration::from_secs(10);
    let mut reachable = false;
    let mut seen = Vec::new();
    for addr in &settings.bootstrap {
        let c = broker_check(&connector, addr, "bootstrap").await;
        reachable |= c.status == Status::Pass;
        out.push(c);
        seen.push(addr.clone());
    }
    if !reachable {
        for name in ["input topic", "output topic", "group"] {
            out.push(Check::skip(name, "no broker reachable", ""));
        }
        return;
    }
    // The brokers the cluster advertises: leaders are reached there.
    match kafka_io::admin::brokers(&connector).await {
        Ok(all) => {
            for addr in all.iter().filter(|a| !seen.contains(a)) {
                out.push(broker_check(&connector, addr, "advertised").await);
            }
        }
        Err(e) => out.push(Check::new(
            "advertised brokers",
            Err(format!("Metadata: {e}")),
            "KAFKA_BROKER",
        )),
    }
    let cluster =
        match tokio::time::timeout(Duration::from_secs(30), Cluster::connect(settings)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                out.push(Check::new(
                    "cluster",
                    Err(e.to_string()),
                    "KAFKA_BROKER, KAFKA_SECURITY_PROTOCOL",
                ));
                return;
            }
            Err(_) => {
                out.push(Check::new(
                    "cluster",
                    Err("no answer within 30s".into()),
                    "KAFKA_BROKER",
                ));
                return;
            }
        };
    let mut topics = vec![
        (
            "input topic",
            cfg.input_topic.clone(),
            "KAFKA_INPUT_TOPIC (--input-topic)",
        ),
        (
            "output topic",
            cfg.output_topic.clone(),
            "KAFKA_OUTPUT_TOPIC (--output-topic)",
        ),
    ];
    if let Some(t) = &cfg.error_topic {
        topics.push((
            "error topic",
            t.clone(),
            "KAFKA_ERROR_TOPIC (--error-topic)",
        ));
    }
    let mut input_partitions = None;
    for (what, topic, setting) in topics {
        let result = match cluster.partition_counts(std::slice::from_ref(&topic)).await {
            Ok(counts) => {
                let n = counts.get(&topic).copied().unwrap_or(0);
                if what == "input topic" {
                    input_partitions = Some(n);
                }
                let max = cluster.topic_max_message_bytes(&topic).await;
                let limit = match &max {
                    Ok(Some(b)) => format!("max.message.bytes {b}"),
                    Ok(None) => "max.message.bytes not reported".into(),
                    Err(e) => format!("max.message.bytes unreadable: {e}"),
                };
                let mut d = format!("`{topic}`: {n} partitions, {limit}");
                if what != "input topic"
                    && let Ok(Some(b)) = max
                    && b < cfg.max_request_size
                {
                    d.push_str(&format!(
                        " (answers above {b} bytes get answer-too-large error records)"
                    ));
                }
                Ok(d)
            }
            Err(kafka_io::Error::UnknownTopic(_)) => Err(format!("`{topic}` does not exist")),
            Err(e) => Err(format!("`{topic}`: {e}")),
        };
        out.push(Check::new(what, result, setting));
    }
    let group = &cfg.group_id;
    let described = kafka_io::admin::describe_group(&cluster.connector, group).await;
    let committed = match input_partitions {
        Some(n) => {
            let tps = (0..n).map(|p| (cfg.input_topic.clone(), p)).collect();
            let mut member = Member::new(
                cluster.connector.clone(),
                GroupConfig::new(group.clone(), vec![cfg.input_topic.clone()]),
            );
            match tokio::time::timeout(Duration::from_secs(15), member.committed(&tps)).await {
                Ok(Ok(c)) => Ok(Some((c.values().filter(|o| o.is_some()).count(), n))),
                Ok(Err(e)) => Err(format!("OffsetFetch: {e}")),
                Err(_) => Err("OffsetFetch: no answer within 15s".to_owned()),
            }
        }
        None => Ok(None),
    };
    let result = match (described, committed) {
        (Ok(d), Ok(c)) => Ok(format!(
            "`{group}`: state {}, {} members{}",
            if d.state.is_empty() { "-" } else { &d.state },
            d.members.len(),
            c.map(|(k, n)| format!(", committed offsets on {k} of {n} partitions"))
                .unwrap_or_default()
        )),
        (Err(e), _) => Err(format!("`{group}`: DescribeGroups: {e}")),
        (_, Err(e)) => Err(format!("`{group}`: {e}")),
    };
    out.push(Check::new(
        "group",
        result,
        "KAFKA_GROUP_ID (--group-id), and the group ACLs",
    ));
}

async fn model_checks(cfg: &Config, out: &mut Vec<Check>) {
    let setting = if cfg.graph.children.is_empty() && cfg.graph.url.is_empty() {
        ""
    } else if cfg.graph.children.is_empty() {
        "--model (KAFKA_INFER_MODEL), or the graph node's endpoint in -f"
    } else {
        "the graph node's endpoint in the SeldonDeployment (-f)"
    };
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let graph = match crate::graph::Graph::new(
        None,
        cfg,
        codec::Transcoder::new(codec::Pool::builtin()),
        Arc::new(crate::metrics::Metrics::new()),
        stop,
    ) {
        Ok(g) => g,
        Err(e) => {
            out.push(Check::new("graph", Err(format!("{e:#}")), setting));
            return;
        }
    };
    for n in graph.readiness().await {
        let name = format!("model {}", n.node);
        let what = format!("{} {}", n.url, n.endpoint);
        out.push(match n.result {
            Ok(()) => Check::new(name, Ok(format!("{what}: ready")), ""),
            Err(e) => Check::new(name, Err(format!("{what}: {e}")), setting),
        });
    }
}

/// `kafka-infer check`: 0 when every check passes, else 1.
pub fn main(args: CheckArgs) -> std::process::ExitCode {
    super::init_logging();
    let checks = super::block_on(run(&args.run));
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if args.json {
        super::print_json(&json!({
            "ok": failed == 0,
            "checks": checks.iter().map(|c| json!({
                "check": c.name,
                "status": c.status.name(),
                "detail": c.detail,
                "setting": (c.status != Status::Pass && !c.setting.is_empty()).then_some(&c.setting),
            })).collect::<Vec<_>>(),
        }));
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.status.name().to_owned(),
                    c.detail.clone(),
                    if c.status == Status::Pass {
                        String::new()
                    } else {
                        c.setting.clone()
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            table(&["CHECK", "RESULT", "DETAIL", "SETTING"], &rows)
        );
        if failed == 0 {
            println!("\nall {} checks passed", checks.len());
        } else {
            println!("\n{failed} of {} checks failed", checks.len());
        }
    }
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        super::exit(1)
    }
}
