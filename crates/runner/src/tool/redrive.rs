//! `kafka-infer redrive`: copy error records from the error topic back to the input topic, with
//! their value, key and headers as kafka-infer kept them, less its own `kafka-infer-*` headers,
//! plus a mark (`kafka-infer-redriven: N`).
//!
//! kafka-infer copies an input's headers onto its error record, the mark included, so a
//! redriven record that fails again carries its count, and redrive skips it once the count
//! reaches `--max-redrives`: no record loops forever. Each partition of the error topic is
//! read from its start (records before `--since` are skipped) up to its end offset taken at
//! start, without joining a group or committing anything.

use std::{
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use clap::Args;
use kafka_io::{OutRecord, Producer, ProducerConfig, fetch::FetchedRecord};
use serde_json::json;

use super::{Progress, header, request_id, row, text, topics};
use crate::{
    config::{Config, RunArgs},
    pipeline::ERROR_KIND_HEADER,
};

/// The mark a redriven record carries: how many times it was redriven.
pub const REDRIVEN_HEADER: &str = "kafka-infer-redriven";
/// On an error record whose input was too large to keep.
const INPUT_DROPPED_HEADER: &str = "kafka-infer-input-dropped";

/// `kafka-infer redrive` flags.
#[derive(Args, Debug, Clone)]
pub struct RedriveArgs {
    /// Only error records of these kinds (their kafka-infer-error-kind: model-rejected,
    /// model-timeout, malformed-json, ...); repeatable or comma-separated. Default: every kind.
    #[arg(long, value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Only error records written at or after this time: RFC 3339 (2026-01-02T15:04:05Z),
    /// milliseconds since the epoch, or a duration ago (30m, 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only error records written before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Print what would be copied; copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip records already redriven this many times (their kafka-infer-redriven header).
    #[arg(long, default_value_t = 1)]
    pub max_redrives: u32,
    /// One JSON object a line per error record that matches the filters (partition, offset,
    /// timestamp_ms, kind, request_id, redriven, action, to_partition, to_offset), then one
    /// {"summary": {...}} line, instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten, next_help_heading = "Settings (as for `kafka-infer run`)")]
    pub run: RunArgs,
}

/// A time bound: RFC 3339, milliseconds since the epoch, or a duration before `now`.
fn parse_time(s: &str, flag: &str, now: SystemTime) -> Result<i64> {
    let s = s.trim();
    let t = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| anyhow!("{flag}: `{s}` is out of range"));
    } else if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        t
    } else if let Ok(d) = humantime::parse_duration(s) {
        now.checked_sub(d)
            .ok_or_else(|| anyhow!("{flag}: `{s}` is too long ago"))?
    } else {
        bail!(
            "{flag}: `{s}` is not a time: give RFC 3339 (2026-01-02T15:04:05Z), milliseconds \
             since the epoch, or a duration ago (30m, 2h)"
        );
    };
    Ok(t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

/// What happens to one error record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Copy,
    /// Already redriven --max-redrives times.
    MaxRedrives,
    /// The error record has no input (too large to keep).
    InputDropped,
    /// Outside the filters: not shown, counted.
    OtherKind,
    OutsideTime,
    /// No kafka-infer-error-kind: not one of ours.
    NotAnErrorRecord,
}

struct Filter {
    kinds: Vec<String>,
    since: Option<i64>,
    until: Option<i64>,
    max_redrives: u32,
}

/// How many times a record was redriven (an unreadable mark counts as too many: never loop).
fn redriven(rec: &FetchedRecord) -> u32 {
    match header(&rec.headers, REDRIVEN_HEADER) {
        None => 0,
        Some(v) => text(v).trim().parse().unwrap_or(u32::MAX),
    }
}

impl Filter {
    fn action(&self, rec: &FetchedRecord) -> Action {
        let Some(kind) = header(&rec.headers, ERROR_KIND_HEADER) else {
            return Action::NotAnErrorRecord;
        };
        if self.since.is_some_and(|s| rec.timestamp_ms < s)
            || self.until.is_some_and(|u| rec.timestamp_ms >= u)
        {
            return Action::OutsideTime;
        }
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k.as_bytes() == kind) {
            return Action::OtherKind;
        }
        if header(&rec.headers, INPUT_DROPPED_HEADER).is_some() {
            return Action::InputDropped;
        }
        if redriven(rec) >= self.max_redrives {
            return Action::MaxRedrives;
        }
        Action::Copy
    }
}

/// The input record again: value, key and headers, less kafka-infer's own headers, marked.
fn redriven_record(rec: &FetchedRecord) -> OutRecord {
    let n = redriven(rec).saturating_add(1);
    let mut headers: Vec<(String, Bytes)> = rec
        .headers
        .iter()
        .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("kafka-infer-"))
        .cloned()
        .collect();
    headers.push((REDRIVEN_HEADER.into(), Bytes::from(n.to_string())));
    OutRecord {
        key: rec.key.clone(),
        value: Some(rec.value.clone().unwrap_or_default()),
        headers,
    }
}

pub fn main(args: RedriveArgs) -> ExitCode {
    let (mut cfg, rt) = match super::start("redrive", &args.run) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if args.run.print_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&cfg.summary()).expect("JSON")
        );
        return ExitCode::SUCCESS;
    }
    let now = SystemTime::now();
    let filter = (|| -> Result<Filter> {
        if cfg.error_topic.is_none() {
            bail!(
                "no error topic (KAFKA_ERROR_TOPIC, --error-topic): redrive copies records from it"
            );
        }
        Ok(Filter {
            kinds: args
                .kind
                .iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect(),
            since: args
                .since
                .as_deref()
                .map(|s| parse_time(s, "--since", now))
                .transpose()?,
            until: args
                .until
                .as_deref()
                .map(|s| parse_time(s, "--until", now))
                .transpose()?,
            max_redrives: args.max_redrives,
        })
    })();
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("kafka-infer redrive: {e:#}");
            return ExitCode::from(super::EXIT_USAGE);
        }
    };
    rt.block_on(async {
        match redrive(&mut cfg, &args, &filter).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("kafka-infer redrive: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

#[derive(Default)]
struct Counts {
    read: u64,
    copied: u64,
    failed: u64,
    max_redrives: u64,
    input_dropped: u64,
    other_kind: u64,
    outside_time: u64,
    not_error_records: u64,
    /// The newest write time of the records read within --since/--until.
    newest_ms: Option<i64>,
}

const WIDTHS: [usize; 5] = [12, 24, 18, 36, 0];

/// Ok(false) when a record could not be copied.
async fn redrive(cfg: &mut Config, args: &RedriveArgs, filter: &Filter) -> Result<bool> {
    let error_topic = cfg.error_topic.clone().expect("checked");
    let cluster = topics::connect(cfg).await?;
    let input_partitions =
        topics::partitions(&cluster, &cfg.input_topic, "KAFKA_INPUT_TOPIC").await?;
    let partitions = topics::partitions(&cluster, &error_topic, "KAFKA_ERROR_TOPIC").await?;
    // Every partition's range first: what arrives later (our copies failing again) waits for
    // the next run.
    let mut ranges = Vec::new();
    for p in 0..partitions {
        let mut r = topics::Reader::new(&cluster, &error_topic, p);
        let start = r.start_offset().await?;
        let end = r.end_offset().await?;
        ranges.push((r, start, end));
    }
    let producer = (!args.dry_run).then(|| {
        Producer::new(
            cluster.clone(),
            ProducerConfig {
                compression: cfg.compression,
                idempotent: cfg.idempotence,
                max_request_size: cfg.max_request_size,
                ..Default::default()
            },
        )
    });
    let total: i64 = ranges.iter().map(|(_, s, e)| (e - s).max(0)).sum();
    let mut c = Counts::default();
    let mut progress = Progress::new();
    if !args.json {
        println!(
            "{}",
            row(&[
                ("ERROR RECORD", WIDTHS[0]),
                ("WRITTEN", WIDTHS[1]),
                ("KIND", WIDTHS[2]),
                ("REQUEST ID", WIDTHS[3]),
                ("ACTION", 0),
            ])
        );
    }
    for (mut reader, start, end) in ranges {
        let p = reader.partition;
        let mut offset = start;
        let mut empty = 0;
        while offset < end {
            let (records, next) = reader.read(offset, Duration::from_millis(100)).await?;
            // Bounded: a range the broker keeps giving nothing of is an error, not a hang.
            empty = if records.is_empty() && next <= offset {
                empty + 1
            } else {
                0
            };
            if empty >= 50 {
                bail!(
                    "{error_topic}/{p}: the broker gives no records from offset {offset} though \
                     its end offset was {end}"
                );
            }
            offset = next.max(offset);
            let mut shown = Vec::new();
            for rec in records.into_iter().filter(|r| r.offset < end) {
                c.read += 1;
                let action = filter.action(&rec);
                if action != Action::OutsideTime {
                    c.newest_ms = c.newest_ms.max(Some(rec.timestamp_ms));
                }
                match action {
                    Action::OtherKind => c.other_kind += 1,
                    Action::OutsideTime => c.outside_time += 1,
                    Action::NotAnErrorRecord => c.not_error_records += 1,
                    Action::MaxRedrives => c.max_redrives += 1,
                    Action::InputDropped => c.input_dropped += 1,
                    Action::Copy => {}
                }
                if matches!(
                    action,
                    Action::Copy | Action::MaxRedrives | Action::InputDropped
                ) {
                    let delivery = match (&producer, action) {
                        (Some(prod), Action::Copy) => {
                            let out = redriven_record(&rec);
                            // By key as kafka-infer's producer does; a record without one goes
                            // back to the partition its error record came from (kafka-infer
                            // writes it on the input's partition number).
                            let n = input_partitions.max(1);
                            let to = match &out.key {
                                Some(k) => kafka_io::producer::partition_for_key(k, n),
                                None => p % n,
                            };
                            let sent = prod.send(&cfg.input_topic, Some(to), out).await;
                            Some(sent.map(|d| (to, d)).map_err(|e| e.to_string()))
                        }
                        _ => None,
                    };
                    shown.push((rec, action, delivery));
                }
            }
            // The batch's copies acknowledged, then its rows.
            for (rec, action, delivery) in shown {
                let written = match delivery {
                    None => None,
                    Some(Ok((to, d))) => {
                        Some(d.wait().await.map(|o| (to, o)).map_err(|e| e.to_string()))
                    }
                    Some(Err(e)) => Some(Err(e)),
                };
                progress.clear();
                print_row(args, filter, p, &rec, action, written.as_ref(), &mut c);
            }
            progress.show(|| {
                format!(
                    "redrive: {}/{total} error records read, {} copied",
                    c.read, c.copied
                )
            });
            if offset >= end {
                break;
            }
        }
    }
    progress.clear();
    if let Some(prod) = &producer {
        let _ = prod.close(Duration::from_secs(10)).await;
    }
    print_summary(args, filter, &error_topic, &cfg.input_topic, &c);
    Ok(c.failed == 0)
}

fn print_row(
    args: &RedriveArgs,
    filter: &Filter,
    partition: i32,
    rec: &FetchedRecord,
    action: Action,
    written: Option<&Result<(i32, i64), String>>,
    c: &mut Counts,
) {
    let kind = header(&rec.headers, ERROR_KIND_HEADER)
        .map(text)
        .unwrap_or_default();
    let id = request_id(&rec.headers).unwrap_or_default();
    let n = redriven(rec);
    let (name, what) = match (action, written) {
        (Action::Copy, None) => ("would-copy", "would copy".to_owned()),
        (Action::Copy, Some(Ok((to, off)))) => {
            c.copied += 1;
            ("copied", format!("copied to {to}@{off}"))
        }
        (Action::Copy, Some(Err(e))) => {
            c.failed += 1;
            ("failed", format!("not copied: {e}"))
        }
        (Action::MaxRedrives, _) => (
            "skipped-max-redrives",
            format!(
                "skipped: redriven {n} time{} already (--max-redrives {})",
                if n == 1 { "" } else { "s" },
                filter.max_redrives
            ),
        ),
        (Action::InputDropped, _) => (
            "skipped-input-dropped",
            "skipped: its input was too large to keep (kafka-infer-input-dropped)".to_owned(),
        ),
        _ => return,
    };
    if args.json {
        let mut line = json!({
            "partition": partition,
            "offset": rec.offset,
            "timestamp_ms": rec.timestamp_ms,
            "kind": kind,
            "request_id": id,
            "redriven": n,
            "action": name,
        });
        if let Some(Ok((to, off))) = written {
            line["to_partition"] = json!(to);
            line["to_offset"] = json!(off);
        }
        if let Some(Err(e)) = written {
            line["error"] = json!(e);
        }
        println!("{line}");
        return;
    }
    let when = humantime::format_rfc3339_millis(
        UNIX_EPOCH + Duration::from_millis(rec.timestamp_ms.max(0) as u64),
    )
    .to_string();
    println!(
        "{}",
        row(&[
            (&format!("{partition}@{}", rec.offset), WIDTHS[0]),
            (&when, WIDTHS[1]),
            (&kind, WIDTHS[2]),
            (&id, WIDTHS[3]),
            (&what, 0),
        ])
    );
}

fn print_summary(args: &RedriveArgs, filter: &Filter, from: &str, to: &str, c: &Counts) {
    if args.json {
        println!(
            "{}",
            json!({"summary": {
                "read": c.read,
                "copied": c.copied,
                "would_copy": if args.dry_run { c.read - c.other_kind - c.outside_time - c.not_error_records - c.max_redrives - c.input_dropped } else { 0 },
                "failed": c.failed,
                "skipped_max_redrives": c.max_redrives,
                "skipped_input_dropped": c.input_dropped,
                "other_kind": c.other_kind,
                "outside_time": c.outside_time,
                "not_error_records": c.not_error_records,
                "dry_run": args.dry_run,
                "next_since_ms": c.newest_ms.map(|t| t + 1),
            }})
        );
        return;
    }
    let matched = c.read - c.other_kind - c.outside_time - c.not_error_records;
    let copy = matched - c.max_redrives - c.input_dropped;
    let mut s = if args.dry_run {
        format!(
            "dry run: would copy {copy} of {} error records read from `{from}` to `{to}`",
            c.read
        )
    } else {
        format!(
            "copied {} of {} error records read from `{from}` to `{to}`",
            c.copied, c.read
        )
    };
    let mut why = Vec::new();
    if c.max_redrives > 0 {
        why.push(format!(
            "{} already redriven --max-redrives ({}) times",
            c.max_redrives, filter.max_redrives
        ));
    }
    if c.input_dropped > 0 {
        why.push(format!(
            "{} whose input was too large to keep (cannot be redriven)",
            c.input_dropped
        ));
    }
    if c.other_kind > 0 {
        why.push(format!("{} of other kinds", c.other_kind));
    }
    if c.outside_time > 0 {
        why.push(format!("{} outside --since/--until", c.outside_time));
    }
    if c.not_error_records > 0 {
        why.push(format!(
            "{} without kafka-infer-error-kind",
            c.not_error_records
        ));
    }
    if c.failed > 0 {
        why.push(format!("{} failed to be written", c.failed));
    }
    if !why.is_empty() {
        s.push_str(&format!("; skipped: {}", why.join(", ")));
    }
    println!("{s}");
    // Each run copies what matches in its range: this is where the next one can start.
    if let Some(t) = c.newest_ms {
        println!(
            "to go on after these records next time: --since {}",
            humantime::format_rfc3339_millis(
                UNIX_EPOCH + Duration::from_millis((t + 1).max(0) as u64)
            )
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(headers: &[(&str, &str)], ts: i64) -> FetchedRecord {
        FetchedRecord {
            offset: 7,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"{\"inputs\":[]}")),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Bytes::from(v.to_string())))
                .collect(),
            timestamp_ms: ts,
        }
    }

    fn filter(kinds: &[&str]) -> Filter {
        Filter {
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            since: Some(100),
            until: Some(200),
            max_redrives: 1,
        }
    }

    #[test]
    fn the_filters_decide_in_order() {
        let f = filter(&["model-rejected"]);
        let bad = [
            ("kafka-infer-error", "400"),
            ("kafka-infer-error-kind", "model-rejected"),
        ];
        assert_eq!(f.action(&rec(&bad, 150)), Action::Copy);
        assert_eq!(f.action(&rec(&bad, 99)), Action::OutsideTime);
        assert_eq!(f.action(&rec(&bad, 200)), Action::OutsideTime);
        assert_eq!(
            f.action(&rec(&[("kafka-infer-error-kind", "malformed-json")], 150)),
            Action::OtherKind
        );
        assert_eq!(f.action(&rec(&[], 150)), Action::NotAnErrorRecord);
        let mut once = bad.to_vec();
        once.push(("kafka-infer-redriven", "1"));
        assert_eq!(f.action(&rec(&once, 150)), Action::MaxRedrives);
        assert_eq!(
            Filter {
                max_redrives: 2,
                ..filter(&[])
            }
            .action(&rec(&once, 150)),
            Action::Copy
        );
        let mut junk = bad.to_vec();
        junk.push(("kafka-infer-redriven", "x"));
        assert_eq!(f.action(&rec(&junk, 150)), Action::MaxRedrives);
        let mut dropped = bad.to_vec();
        dropped.push(("kafka-infer-input-dropped", "too-large"));
        assert_eq!(f.action(&rec(&dropped, 150)), Action::InputDropped);
    }

    #[test]
    fn the_copy_keeps_the_input_and_drops_our_headers() {
        let r = rec(
            &[
                ("tenant", "a"),
                ("x-request-id", "r1"),
                ("Kafka-Infer-Error", "boom"),
                ("kafka-infer-error-kind", "model-rejected"),
                ("kafka-infer-redriven", "1"),
                ("proto-name", "inference.ModelInferRequest"),
            ],
            0,
        );
        let out = redriven_record(&r);
        assert_eq!(out.key, r.key);
        assert_eq!(out.value, r.value);
        let names: Vec<(&str, &[u8])> = out
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        assert_eq!(
            names,
            [
                ("tenant", &b"a"[..]),
                ("x-request-id", b"r1"),
                ("proto-name", b"inference.ModelInferRequest"),
                ("kafka-infer-redriven", b"2"),
            ]
        );
    }

    #[test]
    fn times_are_rfc3339_epoch_millis_or_ago() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_time("1500", "--since", now).unwrap(), 1500);
        assert_eq!(
            parse_time("1970-01-01T00:00:02Z", "--since", now).unwrap(),
            2000
        );
        assert_eq!(parse_time("1h", "--since", now).unwrap(), 6_400_000);
        assert!(parse_time("yesterday", "--since", now).is_err());
    }
}
