//! kafka-infer as a tool: subcommands besides `run` that take the same settings (flags >
//! environment > `-f deployment.yaml`), print a human table by default and JSON with `--json`,
//! and show progress on stderr only when it is a terminal. `lag` and `check` resolve the whole
//! configuration ([`crate::config::Config::resolve`]); `send` (requests in, answers out: curl
//! for a Kafka-served model) and `redrive` (error records back to the input topic) talk to Kafka
//! only ([`Config::resolve_kafka`]). One module per subcommand; what they share is here.

pub mod check;
pub mod lag;
pub mod redrive;
pub mod send;
mod topics;

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::config::{Config, RunArgs};

/// Exit code of a tool that could not do its job (configuration, cluster unreachable).
pub const EXIT_ERROR: u8 = 2;

/// Resolves the settings as `run` does; an error is printed (naming the setting).
pub fn resolve(args: &RunArgs) -> Result<Config, String> {
    Config::resolve(args, &|k| std::env::var(k).ok()).map_err(|e| format!("{e:#}"))
}

/// Logging for tools: warnings and errors on stderr (RUST_LOG overrides), so stdout holds only
/// the table or the JSON.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a tool's future on a one-thread runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}

/// A plain-text table: the header row, then each row, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A duration in seconds as people read it: 850ms, 12.3s, 4m05s, 2h10m.
pub fn human_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// An exit code from a number.
pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

/// Exit code of a tool whose settings or input are wrong (as `run`'s configuration errors).
pub const EXIT_USAGE: u8 = 2;

/// Resolves the settings as `run` does (flags > environment > `-f`), logs to stderr (warnings
/// only unless RUST_LOG says more), and gives a one-thread runtime. Err: the exit code, the
/// reason already printed.
pub fn start(tool: &str, args: &RunArgs) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let cfg = match Config::resolve_kafka(args, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-infer {tool}: configuration error: {e:#}");
            return Err(ExitCode::from(EXIT_USAGE));
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rskafka=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    Ok((cfg, rt))
}

/// A progress line on stderr, redrawn in place at most every 100 ms; nothing at all when stderr
/// is not a terminal (piped, in CI logs).
pub struct Progress {
    on: bool,
    shown: bool,
    last: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Self {
            on: std::io::stderr().is_terminal(),
            shown: false,
            last: None,
        }
    }

    pub fn show(&mut self, line: impl FnOnce() -> String) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{}", line());
        let _ = e.flush();
        self.shown = true;
    }

    /// Erases the line (before printing a row to the same terminal).
    pub fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
            self.shown = false;
            self.last = None;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// One row of a human table: every cell but the last padded to its width (a longer cell keeps
/// its length), two spaces between columns.
pub fn row(cells: &[(&str, usize)]) -> String {
    let mut out = String::new();
    for (i, (text, width)) in cells.iter().enumerate() {
        if i > 0 {
            out.push_str("  ");
        }
        out.push_str(text);
        if i + 1 < cells.len() {
            out.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(text.chars().count()),
            ));
        }
    }
    out.trim_end().to_owned()
}

/// A header value as text (lossy).
pub(crate) fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// The last value of a header (names are case-insensitive).
pub(crate) fn header<'a>(headers: &'a [(String, bytes::Bytes)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

/// The request id a record carries (`Seldon-Puid` or `x-request-id`), as kafka-infer reads it.
pub(crate) fn request_id(headers: &[(String, bytes::Bytes)]) -> Option<String> {
    ["seldon-puid", "x-request-id"]
        .iter()
        .filter_map(|n| header(headers, n))
        .map(|v| text(v).trim().to_owned())
        .find(|v| !v.is_empty())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["x".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nx    22\n");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human_secs(0.25), "250ms");
        assert_eq!(human_secs(12.34), "12.3s");
        assert_eq!(human_secs(245.0), "4m05s");
        assert_eq!(human_secs(7800.0), "2h10m");
    }

    #[test]
    fn rows_pad_all_but_the_last_cell() {
        assert_eq!(row(&[("a", 3), ("bb", 4), ("c", 9)]), "a    bb    c");
        assert_eq!(row(&[("long", 2), ("x", 1)]), "long  x");
    }
}
