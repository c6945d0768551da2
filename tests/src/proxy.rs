//! A TCP fault proxy for fault tests: it listens on 127.0.0.1 (a free port), forwards every
//! connection to a target, and can be switched at any time, for current and new connections
//! alike, between [`Mode`]s: pass, delay, blackhole (a silent network), reset.
//!
//! Independently of the mode, [`FaultProxy::cut_responses`] loses responses: every n-th
//! request of one API key (e.g. 0 = Produce) is forwarded to the broker, which handles it, and
//! the connection is then closed before its response reaches the client (a response lost on
//! the way, as after a network failure). With a client that pipelines (kafka-io's idempotent
//! producer keeps up to 5 Produce requests outstanding) the response lost may be that of an
//! earlier request: every request outstanding on the connection loses its response.
//!
//! It runs on a thread of its own with a private single-thread tokio runtime, so it works the
//! same from plain and from `#[tokio::test]` tests. Dropping it stops the thread (joined) and
//! closes every socket it holds.
//!
//! [`ProxiedBroker`] puts the test broker behind one: the broker advertises the proxy's port, so
//! every client connection (metadata, produce, fetch, group coordinator) goes through it.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use std::io::ErrorKind;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    sync::{mpsc, oneshot, watch},
};

use crate::{Broker, free_port, tansu};

/// What the proxy does with the bytes of every connection, current and new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward as it comes.
    Pass,
    /// Forward each chunk once this long has passed since it was read.
    Delay(Duration),
    /// Forward nothing in either direction and close nothing; new connections are accepted
    /// and reach nothing. Bytes read are held (as TCP would retransmit them) and forwarded when
    /// the mode lets data through again.
    Blackhole,
    /// Close every connection with a TCP reset (SO_LINGER 0), and reset new ones at once.
    Reset,
}

/// How long a connection to the target may take before the client is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Chunk size of one read.
const CHUNK: usize = 16 * 1024;
/// Chunks read but not yet written, per direction (backpressure beyond that).
const QUEUED_CHUNKS: usize = 16;

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    open: AtomicUsize,
    /// Kafka requests seen from clients, by API key.
    requests: std::sync::Mutex<std::collections::BTreeMap<i16, u64>>,
    cut: std::sync::Mutex<Option<Cut>>,
    /// Responses lost so far (connections closed by `cut`).
    cuts: AtomicU64,
}

/// Lose the response of every `every`-th request of `api_key`, `left` more times.
#[derive(Clone, Copy, Debug)]
struct Cut {
    api_key: i16,
    every: u64,
    left: u64,
    seen: u64,
}

impl Stats {
    /// A request of `key` starts: true when its response is to be lost.
    fn cut_this(&self, key: i16) -> bool {
        let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = cut.as_mut() else {
            return false;
        };
        if c.api_key != key || c.left == 0 {
            return false;
        }
        c.seen += 1;
        if c.seen % c.every != 0 {
            return false;
        }
        c.left -= 1;
        true
    }
}

/// Splits a client's byte stream into Kafka request frames (4-byte size, then the 2-byte API
/// key) and counts them by API key.
#[derive(Default)]
struct FrameCounter {
    head: Vec<u8>,
    skip: usize,
}

impl FrameCounter {
    /// Counts the frames starting in `data`; true when one of them is to lose its response.
    fn feed(&mut self, mut data: &[u8], stats: &Stats) -> bool {
        let mut cut = false;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let take = (6 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.head.len() == 6 {
                let size =
                    i32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
                let key = i16::from_be_bytes([self.head[4], self.head[5]]);
                *stats
                    .requests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key)
                    .or_default() += 1;
                self.skip = usize::try_from(size).unwrap_or(0).saturating_sub(2);
                self.head.clear();
                cut |= stats.cut_this(key);
            }
        }
        cut
    }
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<Stats>);

impl OpenGuard {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.open.fetch_add(1, Ordering::SeqCst);
        Self(stats.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP proxy with switchable faults. See the module documentation.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`, in [`Mode::Pass`].
    /// The target need not be up yet: a connection it refuses is reset.
    pub fn start(target: SocketAddr) -> Result<Self> {
        let std_listener = StdListener::bind("127.0.0.1:0").context("proxy: binding 127.0.0.1")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("proxy: runtime")?;
        let (mode_rx, st) = (mode.subscribe(), stats.clone());
        let thread = std::thread::Builder::new()
            // Short: Linux keeps 15 bytes of a thread's name.
            .name(format!("fproxy-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("fault proxy on {addr}: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, target, mode_rx, st) => {}
                    }
                });
                // Dropping the runtime here (outside any async context) drops every connection
                // task, which closes its sockets.
                drop(rt);
            })
            .context("proxy: thread")?;
        Ok(Self {
            addr,
            target,
            mode,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`, the proxy's address as a bootstrap string.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Switches every current and new connection to `mode`.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Connections accepted so far (including those reset at once in [`Mode::Reset`]).
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Kafka requests forwarded from clients so far, by API key (e.g. 1 = Fetch, 0 = Produce,
    /// 8 = OffsetCommit, 12 = Heartbeat).
    pub fn requests(&self) -> std::collections::BTreeMap<i16, u64> {
        self.stats
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// From now on, the response of every `every`-th request with `api_key` (counted across
    /// connections) is lost `times` times: the request reaches the broker, then the connection
    /// closes before its response reaches the client. `times` 0 turns it off.
    pub fn cut_responses(&self, api_key: i16, every: u64, times: u64) {
        *self.stats.cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cut {
            api_key,
            every: every.max(1),
            left: times,
            seen: 0,
        });
    }

    /// Responses lost by [`FaultProxy::cut_responses`] so far.
    pub fn cuts(&self) -> u64 {
        self.stats.cuts.load(Ordering::SeqCst)
    }

    /// Connections accepted and not yet closed.
    pub fn open(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }

    /// Waits (polling every 10 ms, at most `within`) until `open()` satisfies `f`.
    pub fn wait_open(&self, within: Duration, f: impl Fn(usize) -> bool) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let n = self.open();
            if f(n) {
                return Ok(n);
            }
            if Instant::now() > deadline {
                bail!("fault proxy: {n} connections open after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            // Prompt: the runtime has only non-blocking tasks, which are dropped, not awaited.
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<Mode>,
    stats: Arc<Stats>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // E.g. out of file descriptors: back off rather than spin.
                eprintln!("fault proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        if *mode.borrow() == Mode::Reset {
            reset(client);
            continue;
        }
        tokio::spawn(connection(
            client,
            target,
            mode.clone(),
            OpenGuard::new(&stats),
            stats.clone(),
        ));
    }
}

/// Closes `s` with a TCP reset instead of a FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    _open: OpenGuard,
    stats: Arc<Stats>,
) {
    // A silent network: the target hears nothing of this client until the blackhole lifts.
    let now = match mode.wait_for(|m| *m != Mode::Blackhole).await {
        Ok(m) => *m,
        Err(_) => return,
    };
    if now == Mode::Reset {
        return reset(client);
    }
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        // What a refused connection looks like from the client's side, near enough.
        _ => return reset(client),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client, mut upstream) = (client, upstream);
    let (m1, m2) = (mode.clone(), mode.clone());
    // Set when a request whose response is to be lost went upstream: the next bytes from the
    // broker (its response) close the connection instead.
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clean = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = Side {
            count: Some(stats.clone()),
            cut: cut.clone(),
        };
        let down = Side { count: None, cut };
        tokio::select! {
            biased;
            _ = mode.wait_for(|m| *m == Mode::Reset) => false,
            r = async { tokio::try_join!(pipe(cr, uw, m1, up), pipe(ur, cw, m2, down)) } => r.is_ok(),
        }
    };
    if !clean {
        // Reset mode, or one side failed (e.g. was reset): the other side sees a reset too.
        reset(client);
        reset(upstream);
    }
}

/// Waits while the mode lets nothing through (Blackhole; Reset is the connection's business).
async fn passable(mode: &mut watch::Receiver<Mode>) -> Mode {
    let now = mode
        .wait_for(|m| matches!(m, Mode::Pass | Mode::Delay(_)))
        .await
        .map(|m| *m);
    match now {
        Ok(m) => m,
        // The proxy is stopping: its runtime drops this task.
        Err(_) => std::future::pending().await,
    }
}

/// What one direction of a connection does besides forwarding.
struct Side {
    /// Client to broker: count request frames, and mark `cut` for a request to lose.
    count: Option<Arc<Stats>>,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

/// One direction: a reader that queues chunks with their read time, and a writer that writes
/// each when the mode lets it (after the delay, in Delay mode). EOF is passed on as a shutdown
/// of the write side. Broker to client: bytes arriving while `cut` is set end the connection
/// unwritten (the response is lost).
async fn pipe(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mode: watch::Receiver<Mode>,
    side: Side,
) -> std::io::Result<()> {
    let Side { count, cut } = side;
    let downstream = count.is_none();
    let mut frames = FrameCounter::default();
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let mut rmode = mode.clone();
    let reader = async move {
        loop {
            passable(&mut rmode).await;
            let mut buf = vec![0; CHUNK];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(()); // drops tx: the writer finishes the queue
            }
            buf.truncate(n);
            if let Some(stats) = &count
                && frames.feed(&buf, stats)
            {
                cut.store(true, Ordering::SeqCst);
                stats.cuts.fetch_add(1, Ordering::SeqCst);
            }
            if downstream && cut.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    ErrorKind::ConnectionAborted,
                    "fault proxy: response lost on purpose",
                ));
            }
            if tx.send((Instant::now(), buf)).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut wmode = mode;
    let writer = async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            loop {
                let due = match passable(&mut wmode).await {
                    Mode::Delay(d) => read_at + d,
                    _ => break,
                };
                if Instant::now() >= due {
                    break;
                }
                // Sleep until due, but look again if the mode changes meanwhile.
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = wmode.changed() => {}
                }
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(drop)
}

/// The test broker behind a [`FaultProxy`]: it advertises the proxy's port, so clients that
/// bootstrap from [`ProxiedBroker::bootstrap`] make every connection through the proxy.
pub struct ProxiedBroker {
    pub proxy: FaultProxy,
    pub broker: Broker,
}

impl ProxiedBroker {
    pub fn start() -> Result<Self> {
        let port = free_port();
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)))?;
        let broker = Broker::start_on(port, proxy.port())?;
        Ok(Self { proxy, broker })
    }

    /// The broker and its proxy, for tests that hold them apart.
    pub fn into_parts(self) -> (Broker, FaultProxy) {
        (self.broker, self.proxy)
    }

    /// The proxy's address (what clients bootstrap from).
    pub fn bootstrap(&self) -> String {
        self.proxy.bootstrap()
    }

    pub fn settings(&self) -> kafka_io::ConnectionSettings {
        kafka_io::ConnectionSettings::plaintext(&self.bootstrap()).expect("valid bootstrap")
    }

    /// Creates a topic with the broker's own CLI, through the proxy (at most 30 s).
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        let out = run_bounded(
            Command::new(tansu()).args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://{}", self.bootstrap()),
                "--partitions",
                &partitions.to_string(),
                name,
            ]),
            Duration::from_secs(30),
        )?;
        if !out.status.success() {
            bail!(
                "tansu topic create {name} through the proxy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// Runs `cmd` to its end, or kills it (by its PID) after `within`. Output goes through files,
/// so a chatty child cannot block on a full pipe.
pub fn run_bounded(cmd: &mut Command, within: Duration) -> Result<std::process::Output> {
    let (mut out, mut err) = (tempfile::tempfile()?, tempfile::tempfile()?);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .context("starting a bounded command")?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::io::{Read, Seek};
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    out.rewind()?;
    out.read_to_end(&mut stdout)?;
    err.rewind()?;
    err.read_to_end(&mut stderr)?;
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}
