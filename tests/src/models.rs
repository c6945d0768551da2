//! Real model servers for the end-to-end tests, and kafka-infer itself as a process.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Result;

use crate::{Proc, free_port, http_get, repo_root, venv, venv_seldon, wait_for};

/// A model server with its REST and gRPC ports.
pub struct Server {
    pub proc: Proc,
    pub http_port: u16,
    pub grpc_port: u16,
}

impl Server {
    pub fn rest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }
}

fn log_file(name: &str) -> Stdio {
    log_file_at(name).0
}

/// [`log_file`] and its path.
fn log_file_at(name: &str) -> (Stdio, PathBuf) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = repo_root().join("target/test-logs");
    let _ = std::fs::create_dir_all(&dir);
    // One file per process started (test process id, then a counter).
    let path = dir.join(format!("{name}-{}-{n}.log", std::process::id()));
    let file = std::fs::File::create(&path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    (file, path)
}

/// MLServer (PyPI) serving tests/models/mlserver (model `doubler`), in-process inference.
pub fn mlserver() -> Result<Server> {
    let (http_port, grpc_port, metrics_port) = (free_port(), free_port(), free_port());
    let proc = Proc::spawn(
        "mlserver",
        Command::new(venv().join("bin/mlserver"))
            .args(["start", "."])
            .current_dir(repo_root().join("tests/models/mlserver"))
            .env("MLSERVER_HTTP_PORT", http_port.to_string())
            .env("MLSERVER_GRPC_PORT", grpc_port.to_string())
            .env("MLSERVER_METRICS_PORT", metrics_port.to_string())
            .env("MLSERVER_HOST", "127.0.0.1")
            .env("MLSERVER_PARALLEL_WORKERS", "0")
            .stdout(log_file("mlserver"))
            .stderr(log_file("mlserver-err")),
    )?;
    wait_for(Duration::from_secs(90), "MLServer ready", || {
        matches!(
            http_get(http_port, "/v2/models/doubler/ready"),
            Ok((200, _))
        )
        .then_some(())
    })?;
    crate::wait_port(grpc_port, Duration::from_secs(30))?;
    Ok(Server {
        proc,
        http_port,
        grpc_port,
    })
}

/// Seldon's Python wrapper serving class `class` of tests/models/seldon as `service_type`.
pub fn seldon(class: &str, service_type: &str) -> Result<Server> {
    seldon_with_env(class, service_type, &[])
}

/// [`seldon`] with environment variables for the model class.
pub fn seldon_with_env(class: &str, service_type: &str, env: &[(&str, &str)]) -> Result<Server> {
    let (http_port, grpc_port, metrics_port) = (free_port(), free_port(), free_port());
    let proc = Proc::spawn(
        "seldon-core-microservice",
        Command::new(venv_seldon().join("bin/seldon-core-microservice"))
            .envs(env.iter().copied())
            .args([
                class,
                "--service-type",
                service_type,
                "--http-port",
                &http_port.to_string(),
                "--grpc-port",
                &grpc_port.to_string(),
                "--metrics-port",
                &metrics_port.to_string(),
                "--workers",
                "1",
                "--log-level",
                "WARNING",
            ])
            .current_dir(repo_root().join("tests/models/seldon"))
            .stdout(log_file(&format!("seldon-{class}")))
            .stderr(log_file(&format!("seldon-{class}-err"))),
    )?;
    wait_for(Duration::from_secs(60), "Seldon wrapper ready", || {
        matches!(http_get(http_port, "/health/ping"), Ok((200, _))).then_some(())
    })?;
    crate::wait_port(grpc_port, Duration::from_secs(30))?;
    Ok(Server {
        proc,
        http_port,
        grpc_port,
    })
}

/// Our own model server (tests/src/bin/test-model.rs): the TF Serving stand-in and echo models.
pub fn test_model(protocol: &str, name: &str, func: &str) -> Result<Server> {
    test_model_on(protocol, name, func, 0, (free_port(), free_port()))
}

/// [`test_model`] on given ports, answering after `delay_ms`.
pub fn test_model_on(
    protocol: &str,
    name: &str,
    func: &str,
    delay_ms: u64,
    ports: (u16, u16),
) -> Result<Server> {
    test_model_with(
        protocol,
        name,
        &["--fn", func, "--delay-ms", &delay_ms.to_string()],
        ports,
    )
}

/// [`test_model`] with its flags (`--fn`, `--fail-on`, ...) on given ports.
pub fn test_model_with(
    protocol: &str,
    name: &str,
    more: &[&str],
    (http_port, grpc_port): (u16, u16),
) -> Result<Server> {
    let bin = repo_root().join("target/debug/test-model");
    let bin = std::env::var_os("KAFKA_INFER_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or(bin);
    let proc = Proc::spawn(
        "test-model",
        Command::new(bin)
            .args([
                "--protocol",
                protocol,
                "--name",
                name,
                "--http-port",
                &http_port.to_string(),
                "--grpc-port",
                &grpc_port.to_string(),
            ])
            .args(more),
    )?;
    crate::wait_port(http_port, Duration::from_secs(10))?;
    crate::wait_port(grpc_port, Duration::from_secs(10))?;
    Ok(Server {
        proc,
        http_port,
        grpc_port,
    })
}

/// [`test_model`] whose answer (REST or gRPC) never comes for a body containing `hang_on`.
pub fn test_model_hanging_on(protocol: &str, name: &str, hang_on: &str) -> Result<Server> {
    test_model_hanging_on_with(protocol, name, hang_on, &[])
}

/// [`test_model_hanging_on`] with more flags (e.g. `--unready`: its health checks answer 503).
pub fn test_model_hanging_on_with(
    protocol: &str,
    name: &str,
    hang_on: &str,
    more: &[&str],
) -> Result<Server> {
    let (http_port, grpc_port) = (free_port(), free_port());
    let bin = std::env::var_os("KAFKA_INFER_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/test-model"));
    let proc = Proc::spawn(
        "test-model",
        Command::new(bin)
            .args([
                "--protocol",
                protocol,
                "--name",
                name,
                "--fn",
                "echo",
                "--http-port",
                &http_port.to_string(),
                "--grpc-port",
                &grpc_port.to_string(),
                "--hang-on",
                hang_on,
            ])
            .args(more),
    )?;
    crate::wait_port(http_port, Duration::from_secs(10))?;
    crate::wait_port(grpc_port, Duration::from_secs(10))?;
    Ok(Server {
        proc,
        http_port,
        grpc_port,
    })
}

/// The kafka-infer binary (built by `cargo xtask test`; override with KAFKA_INFER_BIN).
pub fn kafka_infer_bin() -> PathBuf {
    std::env::var_os("KAFKA_INFER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/kafka-infer"))
}

/// A running `kafka-infer run` with its metrics port.
pub struct KafkaInfer {
    pub proc: Proc,
    pub metrics_port: u16,
    /// Where its stdout (the log: tracing writes there) and its stderr go.
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl KafkaInfer {
    /// Starts `kafka-infer run ARGS` with `env` on top of a clean KAFKA_* environment.
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Result<Self> {
        let metrics_port = free_port();
        let bin = kafka_infer_bin();
        assert!(
            bin.exists(),
            "{} missing: run `cargo xtask test` (builds it first)",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        let (stdout, stdout_path) = log_file_at("kafka-infer");
        let (stderr, stderr_path) = log_file_at("kafka-infer-err");
        cmd.arg("run")
            .args(args)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env(
                "RUST_LOG",
                std::env::var("KAFKA_INFER_LOG").unwrap_or_else(|_| "info,rskafka=warn".into()),
            )
            .stdout(stdout)
            .stderr(stderr);
        for (k, _) in std::env::vars() {
            if k.starts_with("KAFKA_") && k != "KAFKA_INFER_LOG" {
                cmd.env_remove(k);
            }
        }
        // The test broker (tansu) holds a Fetch until its max-wait even when data arrives:
        // latency follows it, so the tests, the demo and the bench ask for a short one (the
        // product's default, 500ms, is for a real Kafka cluster). A test's own value wins.
        cmd.env("KAFKA_FETCH_MAX_WAIT", "10ms");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("kafka-infer", &mut cmd)?;
        Ok(Self {
            proc,
            metrics_port,
            stdout_path,
            stderr_path,
        })
    }

    /// What it has written so far to stdout (its log) and stderr, ANSI colours removed.
    pub fn output(&self) -> String {
        let read = |p: &PathBuf| std::fs::read(p).unwrap_or_default();
        let mut all = read(&self.stdout_path);
        all.extend(read(&self.stderr_path));
        strip_ansi(&String::from_utf8_lossy(&all))
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// A metric's value (first sample whose line starts with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The partitions this replica reports lag for (= its assignment).
    pub fn owned_partitions(&self) -> std::collections::BTreeSet<i32> {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("kafka_infer_consumer_lag{"))
            .filter_map(|l| {
                l.split("partition=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        wait_for(within, "kafka-infer /ready", || {
            matches!(http_get(self.metrics_port, "/ready"), Ok((200, _))).then_some(())
        })
    }
}

/// `s` without ANSI colour sequences (ESC [ ... m), as the text log writes them.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a `kafka-infer` tool run (send, redrive, ...) gave.
#[derive(Debug)]
pub struct ToolRun {
    /// None: killed at the test's limit.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl ToolRun {
    /// stdout's lines parsed as JSON (the tools' --json output).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

/// Runs `kafka-infer SUB ARGS` with `env` on top of a clean KAFKA_* environment and `stdin`
/// (none: empty), killing it (by its PID) if it runs past `limit`.
pub fn kafka_infer_tool(
    sub: &str,
    args: &[&str],
    env: &[(&str, String)],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<ToolRun> {
    use std::io::{Read, Write};
    let mut cmd = Command::new(kafka_infer_bin());
    cmd.arg(sub)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("KAFKA_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    // As for `run` in the tests: the test broker holds a Fetch until its max-wait.
    cmd.env("KAFKA_FETCH_MAX_WAIT", "10ms");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = std::time::Instant::now();
    let mut child = cmd.spawn()?;
    let mut input = child.stdin.take().expect("piped");
    let text = stdin.unwrap_or_default().to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let _ = writer.join();
    Ok(ToolRun {
        code,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        took,
    })
}
