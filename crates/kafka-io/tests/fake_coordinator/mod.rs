//! A fake group coordinator: an in-process TCP server on 127.0.0.1 that speaks just enough of
//! the Kafka protocol (kafka-protocol's request and response types, the header versions each
//! API version needs) for the session task: ApiVersions, FindCoordinator (it names itself),
//! Heartbeat and OffsetCommit. What it answers is a script the test changes at any time
//! ([`Reply`]); it records every request it reads ([`Seen`]) and how many OffsetCommits were
//! in flight at once. Dropping it stops the server and closes every connection.
//!
//! JoinGroup, SyncGroup, LeaveGroup and OffsetFetch are advertised (the client checks the
//! versions it uses) but the session never sends them: they are recorded and never answered.

#![allow(dead_code)] // each test binary uses a part

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    error::ResponseError,
    messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, FindCoordinatorRequest,
        FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
        LeaveGroupRequest, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
        ResponseHeader, SyncGroupRequest,
        api_versions_response::ApiVersion,
        offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic},
    },
    protocol::{
        Decodable, Encodable, HeaderVersion, Request, StrBytes, decode_request_header_from_buffer,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// What the fake does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A normal answer (error code 0).
    Answer,
    /// An answer with this error code (every partition's, for OffsetCommit).
    Error(ResponseError),
    /// Read it, never answer, keep the connection open.
    Silent,
}

/// One request the fake read.
#[derive(Clone, Debug)]
pub struct Seen {
    pub api: ApiKey,
    pub version: i16,
    /// Which connection (in accept order, from 0).
    pub conn: usize,
    /// When the whole request had been read.
    pub at: Instant,
    /// Heartbeat and OffsetCommit: the generation and member id sent.
    pub generation: Option<i32>,
    pub member_id: Option<String>,
    /// OffsetCommit: (topic, partition, offset) in request order.
    pub offsets: Vec<(String, i32, i64)>,
    pub reply: Reply,
    /// When the answer was written (None: not answered, or not yet).
    pub answered: Option<Instant>,
}

/// The versions the client may use (its caps in group.rs/conn.rs), per API.
const ADVERTISED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::OffsetCommit, 2, 7),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::OffsetFetch, 1, 8),
];

struct State {
    heartbeat: Reply,
    commit: Reply,
    /// Every API (ApiVersions on new connections too) goes unanswered.
    blackhole: bool,
    /// How long an OffsetCommit takes to be answered.
    commit_delay: Duration,
    seen: Vec<Seen>,
    commits_in_flight: usize,
    max_commits_in_flight: usize,
    connections: usize,
}

#[derive(Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeCoordinator {
    port: u16,
    shared: Shared,
    server: JoinHandle<()>,
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        // The accept task owns the connection tasks: aborting it closes every socket.
        self.server.abort();
    }
}

impl FakeCoordinator {
    /// Listens on 127.0.0.1:0 and answers everything normally.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Shared(Arc::new(Mutex::new(State {
            heartbeat: Reply::Answer,
            commit: Reply::Answer,
            blackhole: false,
            commit_delay: Duration::ZERO,
            seen: Vec::new(),
            commits_in_flight: 0,
            max_commits_in_flight: 0,
            connections: 0,
        })));
        let server = tokio::spawn(accept(listener, port, shared.clone()));
        Self {
            port,
            shared,
            server,
        }
    }

    /// `host:port` for the bootstrap list.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A plaintext connector to this fake.
    pub fn connector(&self) -> kafka_io::conn::Connector {
        let settings =
            kafka_io::ConnectionSettings::plaintext(&self.bootstrap()).expect("settings");
        kafka_io::conn::Connector::new(Arc::new(settings)).expect("connector")
    }

    /// How Heartbeats are answered from now on.
    pub fn heartbeat(&self, r: Reply) {
        self.shared.lock().heartbeat = r;
    }

    /// How OffsetCommits are answered from now on.
    pub fn commit(&self, r: Reply) {
        self.shared.lock().commit = r;
    }

    /// On: nothing is answered any more (also not ApiVersions on a new connection), as a
    /// black-holed network or a hung broker; connections stay open.
    pub fn blackhole(&self, on: bool) {
        self.shared.lock().blackhole = on;
    }

    /// OffsetCommits are answered this long after they were read.
    pub fn commit_delay(&self, d: Duration) {
        self.shared.lock().commit_delay = d;
    }

    /// Every request read so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    pub fn of(&self, api: ApiKey) -> Vec<Seen> {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.api == api)
            .cloned()
            .collect()
    }

    pub fn heartbeats(&self) -> Vec<Seen> {
        self.of(ApiKey::Heartbeat)
    }

    pub fn commits(&self) -> Vec<Seen> {
        self.of(ApiKey::OffsetCommit)
    }

    /// The most OffsetCommits read and not yet answered (nor their connection closed) at once.
    pub fn max_commits_in_flight(&self) -> usize {
        self.shared.lock().max_commits_in_flight
    }

    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Waits (polling, at most `within`) until `f` holds for the requests seen; the
    /// requests, or None on timeout.
    pub async fn wait_for(
        &self,
        within: Duration,
        f: impl Fn(&[Seen]) -> bool,
    ) -> Option<Vec<Seen>> {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.requests();
            if f(&seen) {
                return Some(seen);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn accept(listener: TcpListener, port: u16, shared: Shared) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => {
                let Ok((stream, _)) = a else { continue };
                stream.set_nodelay(true).ok();
                let id = {
                    let mut st = shared.lock();
                    st.connections += 1;
                    st.connections - 1
                };
                conns.spawn(serve(stream, id, port, shared.clone()));
            }
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One connection: reads requests one by one (the client never pipelines) and answers by the
/// script. Unanswered OffsetCommits count as in flight until the connection ends.
async fn serve(mut stream: TcpStream, conn: usize, port: u16, shared: Shared) {
    let mut unanswered_commits = 0usize;
    while let Ok(size) = stream.read_i32().await {
        if !(4..=1 << 20).contains(&size) {
            break;
        }
        let mut frame = vec![0u8; size as usize];
        if stream.read_exact(&mut frame).await.is_err() {
            break;
        }
        let at = Instant::now();
        let mut buf = Bytes::from(frame);
        let Ok(header) = decode_request_header_from_buffer(&mut buf) else {
            break;
        };
        let Ok(api) = ApiKey::try_from(header.request_api_key) else {
            break;
        };
        let version = header.request_api_version;
        let correlation = header.correlation_id;
        let mut seen = Seen {
            api,
            version,
            conn,
            at,
            generation: None,
            member_id: None,
            offsets: Vec::new(),
            reply: Reply::Silent,
            answered: None,
        };
        // Decode the body (a request we cannot read ends the connection) and pick the reply.
        let (reply, delay) = {
            let st = shared.lock();
            let scripted = match api {
                ApiKey::ApiVersions | ApiKey::FindCoordinator => Reply::Answer,
                ApiKey::Heartbeat => st.heartbeat,
                ApiKey::OffsetCommit => st.commit,
                _ => Reply::Silent,
            };
            let reply = if st.blackhole {
                Reply::Silent
            } else {
                scripted
            };
            let delay = if api == ApiKey::OffsetCommit {
                st.commit_delay
            } else {
                Duration::ZERO
            };
            (reply, delay)
        };
        let body: Option<Bytes> = match api {
            ApiKey::ApiVersions => {
                if ApiVersionsRequest::decode(&mut buf, version).is_err() {
                    break;
                }
                let keys = ADVERTISED
                    .iter()
                    .map(|(k, lo, hi)| {
                        ApiVersion::default()
                            .with_api_key(*k as i16)
                            .with_min_version(*lo)
                            .with_max_version(*hi)
                    })
                    .collect();
                encode::<ApiVersionsRequest>(
                    correlation,
                    version,
                    ApiVersionsResponse::default().with_api_keys(keys),
                )
            }
            ApiKey::FindCoordinator => {
                if FindCoordinatorRequest::decode(&mut buf, version).is_err() || version > 3 {
                    break;
                }
                encode::<FindCoordinatorRequest>(
                    correlation,
                    version,
                    FindCoordinatorResponse::default()
                        .with_node_id(0.into())
                        .with_host(StrBytes::from_static_str("127.0.0.1"))
                        .with_port(i32::from(port)),
                )
            }
            ApiKey::Heartbeat => {
                let Ok(req) = HeartbeatRequest::decode(&mut buf, version) else {
                    break;
                };
                seen.generation = Some(req.generation_id);
                seen.member_id = Some(req.member_id.to_string());
                encode::<HeartbeatRequest>(
                    correlation,
                    version,
                    HeartbeatResponse::default().with_error_code(code(reply)),
                )
            }
            ApiKey::OffsetCommit => {
                let Ok(req) = OffsetCommitRequest::decode(&mut buf, version) else {
                    break;
                };
                seen.generation = Some(req.generation_id_or_member_epoch);
                seen.member_id = Some(req.member_id.to_string());
                for t in &req.topics {
                    for p in &t.partitions {
                        seen.offsets.push((
                            t.name.0.to_string(),
                            p.partition_index,
                            p.committed_offset,
                        ));
                    }
                }
                let topics = req
                    .topics
                    .iter()
                    .map(|t| {
                        OffsetCommitResponseTopic::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        OffsetCommitResponsePartition::default()
                                            .with_partition_index(p.partition_index)
                                            .with_error_code(code(reply))
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                encode::<OffsetCommitRequest>(
                    correlation,
                    version,
                    OffsetCommitResponse::default().with_topics(topics),
                )
            }
            // Advertised, never sent by the session: read (checked) and never answered.
            ApiKey::JoinGroup => JoinGroupRequest::decode(&mut buf, version).ok().and(None),
            ApiKey::SyncGroup => SyncGroupRequest::decode(&mut buf, version).ok().and(None),
            ApiKey::LeaveGroup => LeaveGroupRequest::decode(&mut buf, version).ok().and(None),
            ApiKey::OffsetFetch => OffsetFetchRequest::decode(&mut buf, version).ok().and(None),
            _ => break,
        };
        seen.reply = reply;
        let index = {
            let mut st = shared.lock();
            if api == ApiKey::OffsetCommit {
                st.commits_in_flight += 1;
                st.max_commits_in_flight = st.max_commits_in_flight.max(st.commits_in_flight);
            }
            st.seen.push(seen);
            st.seen.len() - 1
        };
        let body = match (reply, body) {
            (Reply::Silent, _) | (_, None) => None,
            (_, Some(b)) => Some(b),
        };
        let Some(body) = body else {
            if api == ApiKey::OffsetCommit {
                unanswered_commits += 1;
            }
            continue;
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let written = stream.write_all(&body).await.is_ok();
        let mut st = shared.lock();
        if api == ApiKey::OffsetCommit {
            st.commits_in_flight -= 1;
        }
        if written {
            st.seen[index].answered = Some(Instant::now());
        } else {
            drop(st);
            break;
        }
    }
    shared.lock().commits_in_flight -= unanswered_commits;
}

fn code(reply: Reply) -> i16 {
    match reply {
        Reply::Error(e) => e.code(),
        Reply::Answer | Reply::Silent => 0,
    }
}

/// A whole response frame: size, header (the version `R`'s response needs), body.
fn encode<R: Request>(correlation: i32, version: i16, resp: R::Response) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0; 4]);
    ResponseHeader::default()
        .with_correlation_id(correlation)
        .encode(
            &mut buf,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .expect("response header");
    resp.encode(&mut buf, version).expect("response body");
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Some(buf.freeze())
}
