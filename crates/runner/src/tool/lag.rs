//! `kafka-infer lag`: the group's committed offset, end offset and lag per partition of the
//! input topic, the age of the oldest unprocessed record (the timestamp of the record at the
//! committed offset, read with one small Fetch), and the members with their assignment
//! (DescribeGroups). The end offset is the Fetch high watermark, not ListOffsets (wrong on
//! some brokers after multi-record batches). `--max-lag` and `--max-lag-age` make it exit 1
//! when over, for CI gates and alerts.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use kafka_io::{Cluster, GroupConfig, OffsetReset, assignor::Tp, group::Member};
use serde_json::{Value, json};

use super::{human_secs, now_ms, table};
use crate::config::{Config, RunArgs, parse_duration};

/// `kafka-infer lag` flags: run's settings, the output form and the limits.
#[derive(Args, Debug, Clone)]
pub struct LagArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 when the group's total lag (records) is above N.
    #[arg(long, value_name = "N")]
    pub max_lag: Option<i64>,
    /// Exit 1 when the oldest unprocessed record is older than this, e.g. 30s or 5m.
    #[arg(long, value_name = "DURATION")]
    pub max_lag_age: Option<String>,
}

/// One partition's lag.
#[derive(Clone, Debug)]
pub struct PartitionLag {
    pub partition: i32,
    /// The group's committed offset (None: never committed).
    pub committed: Option<i64>,
    /// Where the group would read next: the committed offset, else where
    /// KAFKA_AUTO_OFFSET_RESET starts it.
    pub position: i64,
    /// The high watermark (from a Fetch).
    pub end: i64,
    pub lag: i64,
    /// The Kafka timestamp of the oldest unprocessed record (the one at `position`).
    pub oldest_timestamp_ms: Option<i64>,
}

/// What `lag` measured.
#[derive(Clone, Debug)]
pub struct LagReport {
    pub group: String,
    pub topic: String,
    pub partitions: Vec<PartitionLag>,
    pub now_ms: i64,
    pub group_description: Result<kafka_io::admin::GroupDescription, String>,
}

impl LagReport {
    pub fn total(&self) -> i64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }

    fn age_s(&self, p: &PartitionLag) -> Option<f64> {
        p.oldest_timestamp_ms
            .filter(|_| p.lag > 0)
            .map(|t| (self.now_ms - t).max(0) as f64 / 1000.0)
    }

    /// The age of the oldest unprocessed record of any partition (None: no lag).
    pub fn max_age_s(&self) -> Option<f64> {
        self.partitions
            .iter()
            .filter_map(|p| self.age_s(p))
            .reduce(f64::max)
    }

    pub fn to_json(&self) -> Value {
        let (state, protocol, members, error) = match &self.group_description {
            Ok(d) => (
                Some(d.state.clone()).filter(|s| !s.is_empty()),
                Some(d.protocol.clone()).filter(|s| !s.is_empty()),
                d.members
                    .iter()
                    .map(|m| {
                        json!({
                            "member_id": m.member_id,
                            "instance_id": m.instance_id,
                            "client_id": m.client_id,
                            "client_host": m.client_host,
                            "assignment": m.assignment.iter().map(|(t, p)| json!({"topic": t, "partition": p})).collect::<Vec<_>>(),
                        })
                    })
                    .collect::<Vec<_>>(),
                None,
            ),
            Err(e) => (None, None, Vec::new(), Some(e.clone())),
        };
        json!({
            "group": self.group,
            "topic": self.topic,
            "partitions": self.partitions.iter().map(|p| json!({
                "partition": p.partition,
                "committed": p.committed,
                "end": p.end,
                "lag": p.lag,
                "oldest_unprocessed_timestamp_ms": p.oldest_timestamp_ms.filter(|_| p.lag > 0),
                "oldest_unprocessed_age_seconds": self.age_s(p),
            })).collect::<Vec<_>>(),
            "total_lag": self.total(),
            "max_age_seconds": self.max_age_s(),
            "group_state": state,
            "protocol": protocol,
            "members": members,
            "group_error": error,
        })
    }

    pub fn to_table(&self) -> String {
        let mut out = format!("group {}  topic {}\n\n", self.group, self.topic);
        let mut rows: Vec<Vec<String>> = self
            .partitions
            .iter()
            .map(|p| {
                vec![
                    p.partition.to_string(),
                    p.committed.map_or("-".into(), |c| c.to_string()),
                    p.end.to_string(),
                    p.lag.to_string(),
                    self.age_s(p).map_or("-".into(), human_secs),
                ]
            })
            .collect();
        rows.push(vec![
            "TOTAL".into(),
            String::new(),
            String::new(),
            self.total().to_string(),
            self.max_age_s().map_or("-".into(), human_secs),
        ]);
        out.push_str(&table(
            &["PARTITION", "COMMITTED", "END", "LAG", "OLDEST-UNPROCESSED"],
            &rows,
        ));
        out.push('\n');
        match &self.group_description {
            Ok(d) => {
                out.push_str(&format!(
                    "state {}  protocol {}  members {}\n",
                    if d.state.is_empty() { "-" } else { &d.state },
                    if d.protocol.is_empty() {
                        "-"
                    } else {
                        &d.protocol
                    },
                    d.members.len()
                ));
                if !d.members.is_empty() {
                    let rows: Vec<Vec<String>> = d
                        .members
                        .iter()
                        .map(|m| {
                            vec![
                                m.member_id.clone(),
                                m.client_id.clone(),
                                m.client_host.clone(),
                                m.assignment
                                    .iter()
                                    .map(|(t, p)| format!("{t}/{p}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect();
                    out.push('\n');
                    out.push_str(&table(&["MEMBER", "CLIENT", "HOST", "PARTITIONS"], &rows));
                }
            }
            Err(e) => out.push_str(&format!("members: cannot describe the group: {e}\n")),
        }
        out
    }
}

/// Measures the lag of `cfg`'s group on its input topic.
pub async fn measure(cfg: &Config) -> Result<LagReport> {
    let mut settings = cfg.connection.clone();
    settings.build_tls()?;
    let cluster = Cluster::connect(settings).await?;
    let topic = cfg.input_topic.clone();
    let counts = cluster
        .partition_counts(std::slice::from_ref(&topic))
        .await
        .with_context(|| format!("the input topic (KAFKA_INPUT_TOPIC) `{topic}`"))?;
    let n = counts.get(&topic).copied().unwrap_or(0);
    let tps: BTreeSet<Tp> = (0..n).map(|p| (topic.clone(), p)).collect();
    let mut member = Member::new(
        cluster.connector.clone(),
        GroupConfig::new(cfg.group_id.clone(), vec![topic.clone()]),
    );
    let bound = cluster.request_timeout;
    let committed = tokio::time::timeout(bound, member.committed(&tps))
        .await
        .map_err(|_| anyhow::anyhow!("OffsetFetch: no answer within {bound:?}"))?
        .with_context(|| format!("the group's committed offsets (group `{}`)", cfg.group_id))?;
    let mut partitions = Vec::new();
    for p in 0..n {
        let c = committed.get(&(topic.clone(), p)).copied().flatten();
        partitions.push(partition_lag(&cluster, cfg, &topic, p, c).await?);
    }
    let group_description = kafka_io::admin::describe_group(&cluster.connector, &cfg.group_id)
        .await
        .map_err(|e| e.to_string());
    Ok(LagReport {
        group: cfg.group_id.clone(),
        topic,
        partitions,
        now_ms: now_ms(),
        group_description,
    })
}

async fn partition_lag(
    cluster: &Cluster,
    cfg: &Config,
    topic: &str,
    p: i32,
    committed: Option<i64>,
) -> Result<PartitionLag> {
    let connector = &cluster.connector;
    let earliest = || kafka_io::admin::earliest_offset(cluster, topic, p);
    let mut position = match committed {
        Some(c) => c,
        None => match cfg.auto_offset_reset {
            OffsetReset::Earliest => earliest().await?,
            // Starts at the end: nothing to catch up (read below).
            OffsetReset::Latest => -1,
        },
    };
    let peek_at = position.max(0);
    let fetched = match kafka_io::admin::peek(connector, topic, p, peek_at).await {
        Err(e) if e.is_offset_out_of_range() => {
            // The committed offset was deleted by retention: the group restarts at the log start.
            position = earliest().await?;
            kafka_io::admin::peek(connector, topic, p, position).await?
        }
        r => r.with_context(|| format!("Fetch {topic}/{p}"))?,
    };
    let end = fetched.high_watermark;
    if position < 0 {
        position = end;
    }
    let lag = (end - position).max(0);
    let oldest_timestamp_ms = fetched
        .records
        .iter()
        .find(|r| r.offset >= position && r.timestamp_ms >= 0)
        .map(|r| r.timestamp_ms);
    Ok(PartitionLag {
        partition: p,
        committed,
        position,
        end,
        lag,
        oldest_timestamp_ms,
    })
}

/// `kafka-infer lag`: 0, 1 when over a limit, 2 when it cannot tell.
pub fn main(args: LagArgs) -> std::process::ExitCode {
    super::init_logging();
    // Kafka settings only: lag never calls the model, so none need be configured.
    let cfg = match Config::resolve_kafka(&args.run, &|k| std::env::var(k).ok())
        .map_err(|e| format!("{e:#}"))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-infer lag: configuration error: {e}");
            return super::exit(super::EXIT_ERROR);
        }
    };
    let max_age = match args
        .max_lag_age
        .as_deref()
        .map(|v| parse_duration(v, "--max-lag-age"))
        .transpose()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kafka-infer lag: {e:#}");
            return super::exit(super::EXIT_ERROR);
        }
    };
    let report = super::block_on(async {
        // Every call inside is bounded; this bounds the whole.
        tokio::time::timeout(Duration::from_secs(120), measure(&cfg))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 120s")))
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kafka-infer lag: {e:#}");
            return super::exit(super::EXIT_ERROR);
        }
    };
    let mut over = Vec::new();
    if let Some(max) = args.max_lag
        && report.total() > max
    {
        over.push(format!(
            "total lag {} is above --max-lag {max}",
            report.total()
        ));
    }
    if let Some(max) = max_age
        && let Some(age) = report.max_age_s()
        && age > max.as_secs_f64()
    {
        over.push(format!(
            "the oldest unprocessed record is {} old, above --max-lag-age {}",
            human_secs(age),
            humantime::format_duration(max)
        ));
    }
    if args.json {
        let mut v = report.to_json();
        v["over_limits"] = json!(over);
        super::print_json(&v);
    } else {
        print!("{}", report.to_table());
        for o in &over {
            println!("OVER: {o}");
        }
    }
    if over.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        super::exit(1)
    }
}
