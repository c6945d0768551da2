//! Per-record log lines, rate-limited: a burst of bad records (a poison batch of a million)
//! must not write a line per record. In each interval the first few are logged in full; the
//! rest are counted, and one summary line per interval says how many, of which kinds, and the
//! first and last of them.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lines logged in full per interval.
pub const FULL_PER_INTERVAL: u32 = 10;
/// The interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Failed records ("record failed").
pub static RECORD_FAILED: RateLog = RateLog::new("records failed");
/// Model calls retried ("model call failed, retrying").
pub static CALL_RETRIED: RateLog = RateLog::new("model calls failed and were retried");
/// Payload-logger events not delivered ("payload logger: event not delivered").
pub static LOGGER_FAILED: RateLog = RateLog::new("payload logger events not delivered");

fn all() -> [&'static RateLog; 3] {
    [&RECORD_FAILED, &CALL_RETRIED, &LOGGER_FAILED]
}

/// Logs the summaries whose interval is over (called about every 250 ms by the runner).
pub fn flush_due() {
    let now = Instant::now();
    for l in all() {
        l.flush(now, false);
    }
}

/// Logs every summary pending (at shutdown).
pub fn flush_all() {
    let now = Instant::now();
    for l in all() {
        l.flush(now, true);
    }
}

/// One kind of per-record line.
pub struct RateLog {
    /// What the summary counts ("records failed").
    what: &'static str,
    full_per_interval: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When the current interval began (None: no line since the last summary).
    since: Option<Instant>,
    /// Lines logged in full in it.
    full: u32,
    /// Lines held back in it, by kind.
    held: BTreeMap<&'static str, u64>,
    /// The partition and offset of the first and the last held back (where known).
    first: Option<(i32, i64)>,
    last: Option<(i32, i64)>,
}

/// What was held back in one interval.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub what: &'static str,
    pub total: u64,
    /// `kind: count` pairs, most frequent first.
    pub kinds: Vec<(&'static str, u64)>,
    pub first: Option<(i32, i64)>,
    pub last: Option<(i32, i64)>,
    pub over: Duration,
}

impl Summary {
    /// The summary line: `1990 more records failed in the last 10s, not logged one by one
    /// (unknown-proto-name: 1990); first partition 0 offset 5, last partition 1 offset 1142`.
    pub fn text(&self) -> String {
        let kinds = self
            .kinds
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{} more {} in the last {}s, not logged one by one ({kinds})",
            self.total,
            self.what,
            self.over.as_secs(),
        );
        if let (Some((fp, fo)), Some((lp, lo))) = (self.first, self.last) {
            s.push_str(&format!(
                "; first partition {fp} offset {fo}, last partition {lp} offset {lo}"
            ));
        }
        s
    }

    fn log(&self) {
        tracing::warn!(held_back = self.total, "{}", self.text());
    }
}

impl RateLog {
    pub const fn new(what: &'static str) -> Self {
        Self::with(what, FULL_PER_INTERVAL, INTERVAL)
    }

    pub const fn with(what: &'static str, full_per_interval: u32, interval: Duration) -> Self {
        Self {
            what,
            full_per_interval,
            interval,
            state: Mutex::new(State {
                since: None,
                full: 0,
                held: BTreeMap::new(),
                first: None,
                last: None,
            }),
        }
    }

    /// Whether this line may be logged in full (true), or is counted in the interval's
    /// summary (false). `at`: the record's partition and offset, where known.
    pub fn admit(&self, kind: &'static str, at: Option<(i32, i64)>) -> bool {
        let (ok, summary) = self.admit_at(Instant::now(), kind, at);
        if let Some(s) = summary {
            s.log();
        }
        ok
    }

    /// [`Self::admit`] at `now`; also the summary of an interval that just ended, to log
    /// before this line.
    pub fn admit_at(
        &self,
        now: Instant,
        kind: &'static str,
        at: Option<(i32, i64)>,
    ) -> (bool, Option<Summary>) {
        let mut s = self.state.lock().expect("not poisoned");
        let mut summary = None;
        match s.since {
            Some(t) if now.saturating_duration_since(t) < self.interval => {}
            _ => {
                summary = self.take(&mut s, now);
                s.since = Some(now);
                s.full = 0;
            }
        }
        if s.full < self.full_per_interval {
            s.full += 1;
            return (true, summary);
        }
        *s.held.entry(kind).or_default() += 1;
        if s.first.is_none() {
            s.first = at;
        }
        if at.is_some() {
            s.last = at;
        }
        (false, summary)
    }

    /// Logs the summary of the interval if it is over (or `force`) and lines were held back.
    pub fn flush(&self, now: Instant, force: bool) {
        if let Some(s) = self.flush_at(now, force) {
            s.log();
        }
    }

    /// The summary [`Self::flush`] would log; the next line starts a new interval.
    pub fn flush_at(&self, now: Instant, force: bool) -> Option<Summary> {
        let mut s = self.state.lock().expect("not poisoned");
        let due = s
            .since
            .is_some_and(|t| force || now.saturating_duration_since(t) >= self.interval);
        if !due {
            return None;
        }
        let summary = self.take(&mut s, now);
        s.since = None;
        summary
    }

    /// The held-back lines as a summary (None if there were none), cleared.
    fn take(&self, s: &mut State, now: Instant) -> Option<Summary> {
        if s.held.is_empty() {
            return None;
        }
        let mut kinds: Vec<(&'static str, u64)> = std::mem::take(&mut s.held).into_iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        Some(Summary {
            what: self.what,
            total: kinds.iter().map(|(_, n)| n).sum(),
            kinds,
            first: s.first.take(),
            last: s.last.take(),
            over: s
                .since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_few_are_logged_then_one_summary_per_interval() {
        let log = RateLog::with("records failed", 3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let admitted: Vec<bool> = (0..10)
            .map(|i| {
                let kind = if i % 4 == 3 {
                    "model-timeout"
                } else {
                    "unknown-proto-name"
                };
                let (ok, summary) = log.admit_at(at(i), kind, Some((1, 100 + i as i64)));
                assert!(summary.is_none());
                ok
            })
            .collect();
        assert_eq!(admitted.iter().filter(|a| **a).count(), 3);
        assert!(admitted[..3].iter().all(|a| *a));
        // Not yet due.
        assert_eq!(log.flush_at(at(9_999), false), None);
        let s = log.flush_at(at(10_000), false).expect("a summary");
        assert_eq!(s.total, 7);
        assert_eq!(
            s.kinds,
            [("unknown-proto-name", 5), ("model-timeout", 2)],
            "{s:?}"
        );
        assert_eq!((s.first, s.last), (Some((1, 103)), Some((1, 109))));
        assert_eq!(
            s.text(),
            "7 more records failed in the last 10s, not logged one by one \
             (unknown-proto-name: 5, model-timeout: 2); first partition 1 offset 103, \
             last partition 1 offset 109"
        );
        // Said once; the next line starts a new interval, logged in full again.
        assert_eq!(log.flush_at(at(20_000), false), None);
        assert!(log.admit_at(at(30_000), "empty", None).0);
    }

    #[test]
    fn a_line_after_the_interval_brings_the_summary_first() {
        let log = RateLog::with("records failed", 1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(log.admit_at(t0, "a", Some((0, 1))).0);
        assert!(!log.admit_at(t0, "a", Some((0, 2))).0);
        let (ok, summary) = log.admit_at(t0 + Duration::from_secs(11), "b", Some((0, 3)));
        assert!(ok);
        let s = summary.expect("the last interval's summary");
        assert_eq!((s.total, s.first, s.last), (1, Some((0, 2)), Some((0, 2))));
        // Nothing held back: no summary, even when forced.
        assert_eq!(log.flush_at(t0 + Duration::from_secs(12), true), None);
    }
}
