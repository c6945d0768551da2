//! The member's session: heartbeats and offset commits, in their own task on their own
//! coordinator connection, so they never stop while the membership task waits in JoinGroup,
//! reads offsets, or drains partitions. Every call is bounded by the heartbeat timeout
//! (derived from the session timeout, as librdkafka does). What the coordinator says that
//! changes the membership (rebalance, generation gone, fatal) goes back to the membership task
//! as a [`SessionEvent`] tagged with the generation it is about.
//!
//! All commits go through this task, one at a time on its connection, so two commits of one
//! partition are not in flight at once (the broker could apply them out of order), and each
//! reads its positions when it is sent, explicit ones too: positions only move forward, so no
//! commit carries a position below one an earlier commit sent. After a
//! commit times out its connection is dropped; a broker that already read it may still apply
//! it after a later one, moving the committed position back (a restart then redoes records;
//! nothing unanswered is ever committed past).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    error::{Error, Result},
    group::{GroupConfig, Member},
};

/// Who we are in the group, as the last join said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub member_id: String,
    /// -1 while not a member: no heartbeats, no commits.
    pub generation: i32,
}

/// News from the coordinator for the membership task.
#[derive(Debug)]
pub enum SessionEvent {
    /// A rebalance started: rejoin.
    Rebalance,
    /// The generation is gone (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID) or nothing was answered
    /// within the session timeout: the partitions are someone else's now.
    Lost { unknown_member: bool },
    /// A group error no retry fixes.
    Fatal(String),
}

/// An explicit commit of what moved of `partitions`, and where to say how it went. Their
/// positions are read when the session sends the commit, not when it was asked for: positions
/// read earlier could be below what a periodic commit sent meanwhile, and committing them would
/// move the group's committed offsets back.
pub struct CommitRequest {
    pub partitions: Vec<crate::assignor::Tp>,
    pub done: oneshot::Sender<Result<()>>,
}

/// What the session needs from the consumer's shared state.
pub trait Positions: Send + Sync + 'static {
    /// What moved past the last commit, over every owned partition (`only`: of these); never
    /// a position at or below what was committed.
    fn to_commit(&self, only: Option<&[crate::assignor::Tp]>) -> Vec<(crate::assignor::Tp, i64)>;
    fn committed(&self, done: &[(crate::assignor::Tp, i64)]);
    /// Resolves on a completion (a commit is due within the commit interval).
    fn completed(&self) -> impl Future<Output = ()> + Send;
    /// Resolves when a commit is wanted now (a worker waits for one: `--max-uncommitted`).
    fn urgent(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
    fn set_group_ok(&self, ok: bool);
}

pub struct Session {
    pub identity: watch::Sender<Identity>,
    pub events: mpsc::UnboundedReceiver<(i32, SessionEvent)>,
    pub commits: mpsc::Sender<CommitRequest>,
    pub task: tokio::task::JoinHandle<()>,
}

/// The heartbeat (and commit) timeout for a session timeout: several tries fit in a session.
pub fn call_timeout(session_timeout: Duration) -> Duration {
    (session_timeout / 3)
        .max(Duration::from_millis(200))
        .min(Duration::from_secs(10))
}

/// Group errors that end the member: retrying cannot help.
pub fn fatal_group_error(e: &Error) -> Option<String> {
    use kafka_protocol::error::ResponseError as R;
    let why = match e.broker_error()? {
        R::FencedInstanceId => {
            "another member uses the same group.instance.id (FENCED_INSTANCE_ID)"
        }
        R::GroupAuthorizationFailed => "not authorized to join the group",
        R::InvalidSessionTimeout => {
            "the broker refuses the session timeout (group.min/max.session.timeout.ms)"
        }
        R::InconsistentGroupProtocol => {
            "the group's members share no assignment strategy with this member"
        }
        R::GroupMaxSizeReached => "the group is full (group.max.size)",
        R::TopicAuthorizationFailed => "not authorized to read the input topic",
        _ => return None,
    };
    Some(format!("{why}: {e}"))
}

/// Starts the session task with its own connection (made on first use).
pub fn start<P: Positions>(
    connector: crate::conn::Connector,
    group: GroupConfig,
    commit_interval: Duration,
    positions: Arc<P>,
) -> Session {
    let (identity, identity_rx) = watch::channel(Identity {
        member_id: String::new(),
        generation: -1,
    });
    let (events_tx, events) = mpsc::unbounded_channel();
    let (commits, commits_rx) = mpsc::channel(16);
    let member = Member::new(connector, group.clone());
    let task = tokio::spawn(run(
        member,
        group,
        commit_interval,
        positions,
        identity_rx,
        events_tx,
        commits_rx,
    ));
    Session {
        identity,
        events,
        commits,
        task,
    }
}

async fn bounded<T>(
    member: &mut Member,
    call: &'static str,
    after: Duration,
    f: impl AsyncFnOnce(&mut Member) -> Result<T>,
) -> Result<T> {
    match tokio::time::timeout(after, f(member)).await {
        Ok(r) => r,
        Err(_) => {
            // A half-open connection is never reused: the next call reconnects.
            member.drop_coordinator();
            Err(Error::Timeout {
                call,
                broker: String::new(),
                after,
            })
        }
    }
}

async fn run<P: Positions>(
    mut member: Member,
    group: GroupConfig,
    commit_interval: Duration,
    positions: Arc<P>,
    mut identity: watch::Receiver<Identity>,
    events: mpsc::UnboundedSender<(i32, SessionEvent)>,
    mut commits: mpsc::Receiver<CommitRequest>,
) {
    let after = call_timeout(group.session_timeout);
    let mut heartbeat = tokio::time::interval(group.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A slow sweep in case a completion's notice was missed.
    let mut sweep = tokio::time::interval(commit_interval.max(Duration::from_secs(1)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = Instant::now();
    let mut last_commit = tokio::time::Instant::now();
    let mut commit_at: Option<tokio::time::Instant> = None;
    // Reported once per generation: the membership task acts on the first.
    let mut reported = -2;
    // A generation the coordinator said is gone: no more calls with it until the next join.
    let mut fenced = -2;
    loop {
        let generation = if member.generation() == fenced {
            -1
        } else {
            member.generation()
        };
        let at = commit_at.unwrap_or_else(tokio::time::Instant::now);
        let (call, r) = tokio::select! {
            // First: a new identity must be in place before the next call (a commit with an
            // old generation would fail).
            biased;
            changed = identity.changed() => {
                if changed.is_err() {
                    return; // the consumer is gone
                }
                let id = identity.borrow_and_update().clone();
                tracing::debug!(generation = id.generation, "session: identity");
                member.adopt(&id.member_id, id.generation);
                // A new join: its generation may repeat an old number (a restarted broker).
                fenced = -2;
                reported = -2;
                last_ok = Instant::now();
                positions.set_group_ok(id.generation >= 0);
                continue;
            }
            _ = heartbeat.tick(), if generation >= 0 => {
                ("Heartbeat", bounded(&mut member, "Heartbeat", after, async |m: &mut Member| m.heartbeat(after).await).await.map(|()| true))
            }
            _ = positions.completed(), if commit_at.is_none() => {
                commit_at = Some(at.max(last_commit + commit_interval));
                continue;
            }
            _ = positions.urgent(), if generation >= 0 => {
                commit_at = Some(tokio::time::Instant::now());
                continue;
            }
            _ = tokio::time::sleep_until(at), if commit_at.is_some() && generation >= 0 => {
                commit_at = None;
                last_commit = tokio::time::Instant::now();
                ("OffsetCommit", commit(&mut member, after, &*positions, None).await)
            }
            _ = sweep.tick(), if generation >= 0 && commit_at.is_none() => {
                last_commit = tokio::time::Instant::now();
                ("OffsetCommit", commit(&mut member, after, &*positions, None).await)
            }
            req = commits.recv() => {
                let Some(req) = req else { return };
                if generation < 0 {
                    let _ = req.done.send(Err(Error::Closed));
                    continue;
                }
                let r = commit(&mut member, after, &*positions, Some(&req.partitions)).await;
                // The requester learns how it went; the session judges the answer as any other.
                let reply = match &r {
                    Ok(_) => Ok(()),
                    Err(e) => Err(Error::Protocol {
                        call: "OffsetCommit",
                        why: e.to_string(),
                    }),
                };
                let _ = req.done.send(reply);
                ("OffsetCommit", r)
            }
        };
        match r {
            // Nothing was said to the coordinator (nothing to commit): no news.
            Ok(false) => {}
            Ok(true) => {
                last_ok = Instant::now();
                positions.set_group_ok(true);
            }
            Err(e) => {
                use kafka_protocol::error::ResponseError as R;
                let event = if let Some(why) = fatal_group_error(&e) {
                    Some(SessionEvent::Fatal(why))
                } else {
                    match e.broker_error() {
                        // The coordinator still counts us: a heartbeat answered is an answer.
                        Some(R::RebalanceInProgress) => {
                            last_ok = Instant::now();
                            positions.set_group_ok(true);
                            (call == "Heartbeat").then_some(SessionEvent::Rebalance)
                        }
                        Some(R::IllegalGeneration) => Some(SessionEvent::Lost {
                            unknown_member: false,
                        }),
                        Some(R::UnknownMemberId) => Some(SessionEvent::Lost {
                            unknown_member: true,
                        }),
                        _ => {
                            positions.set_group_ok(false);
                            tracing::warn!(group = %group.group_id, error = %e, "coordinator call failed");
                            (last_ok.elapsed() > group.session_timeout).then_some(
                                SessionEvent::Lost {
                                    unknown_member: false,
                                },
                            )
                        }
                    }
                };
                if let Some(ev) = event {
                    // (Readiness follows the membership task: a generation that ends while we
                    // rejoin is normal; timeouts already turned it off.)
                    if matches!(ev, SessionEvent::Lost { .. } | SessionEvent::Fatal(_)) {
                        fenced = generation;
                    }
                    // Rebalance is told once per generation; a loss ends the generation's calls.
                    let once = matches!(ev, SessionEvent::Rebalance);
                    if !(once && reported == generation) {
                        if once {
                            reported = generation;
                        }
                        tracing::debug!(generation, event = ?ev, "session: membership news");
                        if events.send((generation, ev)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Commits what moved (of `only`) within `after`, and records what was committed.
/// Ok(false) when there was nothing to commit (no broker call).
async fn commit<P: Positions>(
    member: &mut Member,
    after: Duration,
    positions: &P,
    only: Option<&[crate::assignor::Tp]>,
) -> Result<bool> {
    // Read now, not when asked for: the latest positions, never below what was committed.
    let todo = positions.to_commit(only);
    if todo.is_empty() {
        return Ok(false);
    }
    bounded(member, "OffsetCommit", after, async |m: &mut Member| {
        m.commit(&todo).await
    })
    .await?;
    tracing::debug!(positions = ?todo, "committed");
    positions.committed(&todo);
    Ok(true)
}
