//! `kafka-infer send`: produce requests to the input topic and wait for their answers on the
//! output (or error) topic, matched by request id; curl for a Kafka-served model.
//!
//! The output and error topics are read from their end offsets taken before anything is
//! produced (so older answers are never matched), partition by partition, without joining
//! the deployment's group and without committing anything.

use std::{
    collections::HashMap,
    io::{BufRead, IsTerminal},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Args;
use codec::{Pool, Protocol, Transcoder};
use kafka_io::{Cluster, OutRecord, Producer, ProducerConfig, fetch::FetchedRecord};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};

use super::{Progress, header, request_id, row, text, topics};
use crate::{
    config::{Config, RunArgs, parse_duration},
    meta,
    pipeline::{ERROR_HEADER, ERROR_KIND_HEADER},
};

/// `kafka-infer send` flags.
#[derive(Args, Debug, Clone)]
pub struct SendArgs {
    /// Requests, one record each: the request body (JSON, as the input topic takes it), or
    /// `{"value": BODY, "key": "...", "headers": {"name": "value"}, "proto_name": "..."}` to set
    /// those per record (a string BODY is sent as its text, e.g. to send something that is not
    /// JSON). With a proto_name the BODY is that message in proto3 JSON, sent as protobuf.
    /// Without requests or --file, they are read from stdin, one a line.
    pub requests: Vec<String>,
    /// Read the requests from this file, one a line (JSON lines); `-` is stdin.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The key of every record (a request's own "key" wins).
    #[arg(long)]
    pub key: Option<String>,
    /// A header on every record, NAME=VALUE (repeatable; a request's own "headers" win). A
    /// request id header (x-request-id or Seldon-Puid) is used as the request's id; without
    /// one, a new UUID is set under the protocol's name.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Send every request as protobuf of this message (e.g. inference.ModelInferRequest): the
    /// body is given in proto3 JSON and encoded (--descriptor-set adds messages).
    #[arg(long)]
    pub proto_name: Option<String>,
    /// How long to wait for all the answers, from the first request sent. A request without an
    /// answer by then is reported as timed out (exit 1).
    #[arg(long, default_value = "30s")]
    pub timeout: String,
    /// One JSON object a line per request (index, request_id, result, latency_ms, topic,
    /// partition, offset, key, headers, value, error_kind, error) instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten, next_help_heading = "Settings (as for `kafka-infer run`)")]
    pub run: RunArgs,
}

/// One request to send.
#[derive(Debug)]
struct Request {
    record: OutRecord,
    request_id: String,
}

/// Envelope fields of a request line.
const ENVELOPE: &[&str] = &["value", "key", "headers", "proto_name"];

fn parse_header(h: &str) -> Result<(String, Bytes)> {
    let (k, v) = h
        .split_once('=')
        .ok_or_else(|| anyhow!("--header `{h}`: expected NAME=VALUE"))?;
    let k = k.trim();
    if k.is_empty() {
        bail!("--header `{h}`: the name is empty");
    }
    Ok((k.to_owned(), Bytes::from(v.to_owned())))
}

fn parse_request(
    line: &str,
    place: &str,
    args: &SendArgs,
    protocol: Protocol,
    transcoder: &Transcoder,
) -> Result<Request> {
    let v: Value = serde_json::from_str(line).map_err(|e| {
        anyhow!(
            "{place}: not JSON ({e}); to send text that is not JSON, give {{\"value\": \"the text\"}}"
        )
    })?;
    let envelope = match &v {
        Value::Object(m)
            if m.contains_key("value") && m.keys().all(|k| ENVELOPE.contains(&k.as_str())) =>
        {
            Some(m)
        }
        _ => None,
    };
    let field = |name: &str| envelope.and_then(|m| m.get(name));
    let str_field = |name: &str| -> Result<Option<String>> {
        match field(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => bail!("{place}: \"{name}\" must be a string"),
        }
    };
    let key = str_field("key")?
        .or_else(|| args.key.clone())
        .map(Bytes::from);
    let mut headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>>>()?;
    match field("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(v) = v else {
                    bail!("{place}: header `{k}` must be a string");
                };
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
                headers.push((k.clone(), Bytes::from(v.clone())));
            }
        }
        Some(_) => bail!("{place}: \"headers\" must be an object of strings"),
    }
    let proto_name = str_field("proto_name")?.or_else(|| args.proto_name.clone());
    let body = envelope.map_or(&v, |m| &m["value"]);
    let value = match (&proto_name, body) {
        (Some(name), body) => {
            let b = transcoder
                .from_proto_json(name, body.clone())
                .map_err(|e| anyhow!("{place}: {e}"))?;
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case("proto-name"));
            headers.push(("proto-name".into(), Bytes::from(name.clone())));
            b
        }
        (None, Value::String(s)) => Bytes::from(s.clone()),
        (None, body) => Bytes::from(serde_json::to_vec(body).expect("JSON values serialize")),
    };
    let request_id = match request_id(&headers) {
        Some(id) => id,
        None => {
            let id = meta::new_request_id();
            headers.push((
                meta::request_id_header(protocol).to_owned(),
                Bytes::from(id.clone()),
            ));
            id
        }
    };
    Ok(Request {
        record: OutRecord {
            key,
            value: Some(value),
            headers,
        },
        request_id,
    })
}

/// The requests from the arguments, else --file, else stdin.
fn read_requests(args: &SendArgs, protocol: Protocol, tc: &Transcoder) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    let mut push = |line: &str, place: String| -> Result<()> {
        if !line.trim().is_empty() {
            out.push(parse_request(line, &place, args, protocol, tc)?);
        }
        Ok(())
    };
    if !args.requests.is_empty() {
        if args.file.is_some() {
            bail!("give requests as arguments or with --file, not both");
        }
        for (i, r) in args.requests.iter().enumerate() {
            push(r, format!("request argument {}", i + 1))?;
        }
    } else {
        let (reader, name): (Box<dyn BufRead>, String) = match &args.file {
            Some(p) if p.as_os_str() != "-" => (
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(p).with_context(|| format!("--file {}", p.display()))?,
                )),
                p.display().to_string(),
            ),
            _ => {
                if args.file.is_none() && std::io::stdin().is_terminal() {
                    bail!(
                        "no requests: give them as arguments, with --file, or on stdin (one JSON \
                         value a line)"
                    );
                }
                (Box::new(std::io::stdin().lock()), "stdin".into())
            }
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {name}"))?;
            push(&line, format!("{name} line {}", i + 1))?;
        }
    }
    if out.is_empty() {
        bail!("no requests to send");
    }
    let mut seen = std::collections::HashSet::new();
    for r in &out {
        if !seen.insert(r.request_id.as_str()) {
            bail!(
                "request id `{}` is given twice: answers are matched by request id",
                r.request_id
            );
        }
    }
    Ok(out)
}

pub fn main(args: SendArgs) -> ExitCode {
    let (mut cfg, rt) = match super::start("send", &args.run) {
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
    let usage = |e: anyhow::Error| {
        eprintln!("kafka-infer send: {e:#}");
        ExitCode::from(super::EXIT_USAGE)
    };
    let timeout = match parse_duration(&args.timeout, "--timeout") {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    let mut pool = Pool::builtin();
    for p in &cfg.descriptor_sets {
        let added = std::fs::read(p)
            .map_err(|e| anyhow!("--descriptor-set {}: {e}", p.display()))
            .and_then(|b| Ok(pool.add_descriptor_set(&b, &p.display().to_string())?));
        if let Err(e) = added {
            return usage(e);
        }
    }
    let tc = Transcoder::new(pool);
    let requests = match read_requests(&args, cfg.protocol, &tc) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    rt.block_on(async {
        match send(&mut cfg, &args, &tc, requests, timeout).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("kafka-infer send: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// What the readers and the producer report to the main loop.
enum Event {
    Record(String, i32, FetchedRecord),
    NotSent(usize, String),
}

/// Reads one partition from `offset` on until the main loop is done (then it is aborted).
async fn follow(
    mut r: topics::Reader,
    mut offset: i64,
    max_wait: Duration,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut backoff =
        kafka_io::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut warned = false;
    loop {
        match r.read(offset, max_wait).await {
            Ok((records, next)) => {
                backoff.reset();
                for rec in records {
                    if tx
                        .send(Event::Record(r.topic.clone(), r.partition, rec))
                        .is_err()
                    {
                        return;
                    }
                }
                offset = next;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!("{e:#} (retrying)");
                    warned = true;
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// What came back for one request.
struct Outcome {
    result: &'static str,
    latency: Option<Duration>,
    rec: Option<(String, i32, FetchedRecord)>,
    error: Option<String>,
}

/// Sends, waits, prints; Ok(true) when every request got an answer (no error record).
async fn send(
    cfg: &mut Config,
    args: &SendArgs,
    tc: &Transcoder,
    requests: Vec<Request>,
    timeout: Duration,
) -> Result<bool> {
    let cluster = topics::connect(cfg).await?;
    topics::partitions(&cluster, &cfg.input_topic, "KAFKA_INPUT_TOPIC").await?;
    let mut watched = vec![(cfg.output_topic.clone(), "KAFKA_OUTPUT_TOPIC")];
    if let Some(e) = &cfg.error_topic {
        watched.push((e.clone(), "KAFKA_ERROR_TOPIC"));
    }
    // End offsets first, then produce: an answer older than our requests is never read.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (topic, setting) in &watched {
        for p in 0..topics::partitions(&cluster, topic, setting).await? {
            let mut r = topics::Reader::new(&cluster, topic, p);
            let end = r.end_offset().await?;
            readers.push(tokio::spawn(follow(r, end, cfg.fetch_max_wait, tx.clone())));
        }
    }
    let result = exchange(cfg, args, tc, &cluster, requests, timeout, tx, &mut rx).await;
    for r in readers {
        r.abort();
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    cfg: &Config,
    args: &SendArgs,
    tc: &Transcoder,
    cluster: &Arc<Cluster>,
    requests: Vec<Request>,
    timeout: Duration,
    tx: mpsc::UnboundedSender<Event>,
    rx: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<bool> {
    let producer = Producer::new(
        cluster.clone(),
        ProducerConfig {
            compression: cfg.compression,
            idempotent: cfg.idempotence,
            max_request_size: cfg.max_request_size,
            linger: Duration::ZERO,
            linger_max: Duration::ZERO,
            ..Default::default()
        },
    );
    let total = requests.len();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut sent_at = Vec::with_capacity(total);
    let mut outcomes: Vec<Option<Outcome>> = (0..total).map(|_| None).collect();
    let mut progress = Progress::new();
    let mut out = Printer::new(args.json, cfg.protocol, tc);
    out.header();
    let start = Instant::now();
    let deadline = start + timeout;
    let mut deliveries = Vec::new();
    for (i, r) in requests.into_iter().enumerate() {
        by_id.insert(r.request_id.clone(), i);
        out.ids.push(r.request_id);
        sent_at.push(Instant::now());
        match producer.send(&cfg.input_topic, None, r.record).await {
            Ok(d) => deliveries.push((i, d)),
            Err(e) => {
                let _ = tx.send(Event::NotSent(i, e.to_string()));
            }
        }
        progress.show(|| format!("sent {}/{total}", i + 1));
    }
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            for (i, d) in deliveries {
                if let Err(e) = d.wait().await {
                    let _ = tx.send(Event::NotSent(i, e.to_string()));
                }
            }
        });
    }
    drop(tx);
    let mut done = 0;
    while done < total {
        // Woken at least every 200 ms to redraw the progress line (on a terminal).
        let wake = deadline.min(Instant::now() + Duration::from_millis(200));
        let ev = match tokio::time::timeout_at(wake, rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(_) if Instant::now() >= deadline => break,
            Err(_) => {
                let left = deadline.saturating_duration_since(Instant::now());
                progress.show(|| {
                    format!(
                        "answered {done}/{total}, waiting {:.0}s more",
                        left.as_secs_f64()
                    )
                });
                continue;
            }
        };
        let (i, outcome) = match ev {
            Event::NotSent(i, why) => (
                i,
                Outcome {
                    result: "not-sent",
                    latency: None,
                    rec: None,
                    error: Some(why),
                },
            ),
            Event::Record(topic, partition, rec) => {
                let Some(&i) = request_id(&rec.headers).and_then(|id| by_id.get(&id)) else {
                    continue; // someone else's answer
                };
                let is_error = cfg.error_topic.as_deref() == Some(topic.as_str())
                    || header(&rec.headers, ERROR_HEADER).is_some();
                (
                    i,
                    Outcome {
                        result: if is_error { "error" } else { "ok" },
                        latency: Some(sent_at[i].elapsed()),
                        rec: Some((topic, partition, rec)),
                        error: None,
                    },
                )
            }
        };
        if outcomes[i].is_some() {
            continue; // a second answer (a redo after a crash): the first one counted
        }
        progress.clear();
        out.print(i, &outcome);
        outcomes[i] = Some(outcome);
        done += 1;
        progress.show(|| format!("answered {done}/{total}"));
    }
    progress.clear();
    for (i, o) in outcomes.iter_mut().enumerate() {
        if o.is_none() {
            let t = Outcome {
                result: "timeout",
                latency: None,
                rec: None,
                error: Some(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )),
            };
            out.print(i, &t);
            *o = Some(t);
        }
    }
    let _ = producer.close(Duration::from_secs(5)).await;
    let count = |r: &str| outcomes.iter().flatten().filter(|o| o.result == r).count();
    let (ok, errors, timeouts, unsent) = (
        count("ok"),
        count("error"),
        count("timeout"),
        count("not-sent"),
    );
    if !args.json {
        let mut s = format!("{total} sent: {ok} answered, {errors} error records");
        if timeouts > 0 {
            s.push_str(&format!(
                ", {timeouts} without an answer within {}",
                humantime::format_duration(timeout)
            ));
        }
        if unsent > 0 {
            s.push_str(&format!(", {unsent} not written to the input topic"));
        }
        println!("{s}");
    }
    Ok(ok == total)
}

/// Prints one line per request, as a table or JSON lines.
struct Printer<'a> {
    json: bool,
    protocol: Protocol,
    tc: &'a Transcoder,
    ids: Vec<String>,
}

impl<'a> Printer<'a> {
    fn new(json: bool, protocol: Protocol, tc: &'a Transcoder) -> Self {
        Self {
            json,
            protocol,
            tc,
            ids: Vec::new(),
        }
    }

    const WIDTHS: [usize; 4] = [3, 36, 16, 9];

    fn header(&self) {
        if !self.json {
            let w = Self::WIDTHS;
            println!(
                "{}",
                row(&[
                    ("#", w[0]),
                    ("REQUEST ID", w[1]),
                    ("RESULT", w[2]),
                    ("LATENCY", w[3]),
                    ("ANSWER", 0)
                ])
            );
        }
    }

    /// A record's value for display: protobuf as proto3 JSON, JSON as itself, else text.
    fn value(&self, rec: &FetchedRecord) -> Value {
        let Some(v) = rec.value.as_deref() else {
            return Value::Null;
        };
        if let Some(name) = header(&rec.headers, "proto-name") {
            let name = text(name);
            if let Ok(j) = self
                .tc
                .to_proto_json(&name, v, self.protocol == Protocol::Seldon)
            {
                return j;
            }
        }
        serde_json::from_slice(v).unwrap_or_else(|_| Value::String(text(v)))
    }

    fn print(&self, i: usize, o: &Outcome) {
        let latency_ms = o
            .latency
            .map(|l| (l.as_secs_f64() * 10_000.0).round() / 10.0);
        let (kind, error) = match &o.rec {
            Some((_, _, rec)) if o.result == "error" => (
                header(&rec.headers, ERROR_KIND_HEADER).map(text),
                header(&rec.headers, ERROR_HEADER).map(text),
            ),
            _ => (None, o.error.clone()),
        };
        if self.json {
            let mut line = json!({
                "index": i + 1,
                "request_id": self.ids[i],
                "result": o.result,
                "latency_ms": latency_ms,
            });
            if let Some((topic, partition, rec)) = &o.rec {
                line["topic"] = json!(topic);
                line["partition"] = json!(partition);
                line["offset"] = json!(rec.offset);
                line["key"] = json!(rec.key.as_deref().map(text));
                line["headers"] = rec
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(text(v))))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                line["value"] = self.value(rec);
            }
            if let Some(k) = kind {
                line["error_kind"] = json!(k);
            }
            if let Some(e) = error {
                line["error"] = json!(e);
            }
            println!("{line}");
            return;
        }
        let result = match (&kind, o.result) {
            (Some(k), "error") => format!("error: {k}"),
            (_, r) => r.to_owned(),
        };
        let latency = latency_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        let answer = match (&error, &o.rec) {
            (Some(e), _) => e.clone(),
            (None, Some((_, _, rec))) => self.value(rec).to_string(),
            (None, None) => String::new(),
        };
        let w = Self::WIDTHS;
        println!(
            "{}",
            row(&[
                (&(i + 1).to_string(), w[0]),
                (&self.ids[i], w[1]),
                (&result, w[2]),
                (&latency, w[3]),
                (&answer, 0),
            ])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        send: SendArgs,
    }

    fn args(a: &[&str]) -> SendArgs {
        Cli::parse_from(std::iter::once("send").chain(a.iter().copied())).send
    }

    fn h<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
        header(&r.record.headers, name).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn a_body_is_sent_as_it_is_with_a_new_request_id() {
        let a = args(&["-H", "tenant=a", "--key", "k"]);
        let tc = Transcoder::default();
        let r = parse_request(r#"{"inputs": []}"#, "x", &a, Protocol::V2, &tc).unwrap();
        assert_eq!(r.record.value.as_deref(), Some(&br#"{"inputs":[]}"#[..]));
        assert_eq!(r.record.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(h(&r, "tenant"), Some("a"));
        assert_eq!(h(&r, "x-request-id"), Some(r.request_id.as_str()));
        assert_eq!(r.request_id.len(), 36);
        let s = parse_request(r#"{"data": {}}"#, "x", &a, Protocol::Seldon, &tc).unwrap();
        assert_eq!(h(&s, "Seldon-Puid"), Some(s.request_id.as_str()));
    }

    #[test]
    fn an_envelope_sets_key_headers_and_proto_name() {
        let a = args(&["-H", "tenant=a", "--key", "k"]);
        let tc = Transcoder::default();
        let r = parse_request(
            r#"{"value": "not json", "key": "k2", "headers": {"tenant": "b", "x-request-id": "r1"}}"#,
            "x",
            &a,
            Protocol::V2,
            &tc,
        )
        .unwrap();
        assert_eq!(r.record.value.as_deref(), Some(&b"not json"[..]));
        assert_eq!(r.record.key.as_deref(), Some(&b"k2"[..]));
        assert_eq!(h(&r, "tenant"), Some("b"));
        assert_eq!(r.request_id, "r1");
        let p = parse_request(
            r#"{"value": {"model_name": "m"}, "proto_name": "inference.ModelInferRequest"}"#,
            "x",
            &a,
            Protocol::V2,
            &tc,
        )
        .unwrap();
        assert_eq!(h(&p, "proto-name"), Some("inference.ModelInferRequest"));
        assert_eq!(p.record.value.as_deref(), Some(&b"\n\x01m"[..]));
        let e = parse_request("{oops", "line 3", &a, Protocol::V2, &tc).unwrap_err();
        assert!(e.to_string().starts_with("line 3: not JSON"), "{e}");
    }
}
