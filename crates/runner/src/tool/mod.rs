//! The tools beside `run`: `send` (requests in, answers out: curl for a Kafka-served model) and
//! `redrive` (error records back to the input topic). They take `run`'s settings
//! ([`crate::config::RunArgs`], resolved by [`Config::resolve_kafka`]) and talk to Kafka only.
//! Each prints a human table by default and JSON lines with `--json`; a progress line goes to
//! stderr only when stderr is a terminal.

pub mod redrive;
pub mod send;
mod topics;

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::config::{Config, RunArgs};

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
    fn rows_pad_all_but_the_last_cell() {
        assert_eq!(row(&[("a", 3), ("bb", 4), ("c", 9)]), "a    bb    c");
        assert_eq!(row(&[("long", 2), ("x", 1)]), "long  x");
    }
}
