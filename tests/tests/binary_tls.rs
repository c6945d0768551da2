//! The kafka-infer binary over mutual TLS (stunnel before the test broker), started from a
//! SeldonDeployment (`-f`) whose `svcOrchSpec.env` carries the TLS settings the way the KEDA
//! example's Secret holds them (ca.crt, user.crt, user.key): as PEM values in the variables, or
//! as paths to files of those names (the mounted Secret), with an encrypted client key and its
//! password. Records go in with kafka-io over mutual TLS; answers are read back with librdkafka
//! over mutual TLS.
//!
//! SASL_SSL is not tested here: the test broker (tansu from PyPI) has no SASL; tests/scram.rs
//! (`cargo xtask scram`, not in CI) runs SCRAM over SASL_SSL against tansu's sqlite build.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use kafka_infer_tests::{
    Proc, TlsBroker, free_port,
    models::{self, KafkaInfer, kafka_infer_bin},
    proxy::run_bounded,
    read_topic_with, unique,
};
use kafka_io::{Cluster, OutRecord, Producer, ProducerConfig};
use serde_json::{Value, json};

/// One `svcOrchSpec.env` entry: a plain value (block literal when it spans lines, as a PEM
/// pasted into a manifest), or `valueFrom` a Secret (resolved by Kubernetes, so here by the
/// process environment).
enum Var {
    Value(&'static str, String),
    FromSecret(&'static str, &'static str),
}

fn env_yaml(vars: &[Var]) -> String {
    let mut out = String::new();
    for v in vars {
        match v {
            Var::Value(name, value) if value.contains('\n') => {
                out.push_str(&format!("      - name: {name}\n        value: |\n"));
                for line in value.lines() {
                    out.push_str(&format!("          {line}\n"));
                }
            }
            Var::Value(name, value) => {
                let value = Value::from(value.as_str());
                out.push_str(&format!("      - {{name: {name}, value: {value}}}\n"));
            }
            Var::FromSecret(name, key) => out.push_str(&format!(
                "      - name: {name}\n        valueFrom: {{secretKeyRef: {{name: kafka-infer-tls, key: {key}}}}}\n"
            )),
        }
    }
    out
}

/// A SeldonDeployment (v2 protocol, REST, serverType kafka) with one MODEL node `m` on
/// 127.0.0.1:`model_port`, its Kafka settings in `vars`.
fn deployment(model_port: u16, vars: &[Var]) -> String {
    format!(
        r#"apiVersion: machinelearning.seldon.io/v1
kind: SeldonDeployment
metadata: {{name: {}, namespace: tls}}
spec:
  protocol: v2
  transport: rest
  serverType: kafka
  predictors:
  - name: default
    svcOrchSpec:
      env:
{}    graph: {{name: m, type: MODEL, endpoint: {{service_port: {model_port}}}, children: []}}
"#,
        unique("dep"),
        env_yaml(vars),
    )
}

fn topics(input: &str, output: &str) -> [Var; 2] {
    [
        Var::Value("KAFKA_INPUT_TOPIC", input.into()),
        Var::Value("KAFKA_OUTPUT_TOPIC", output.into()),
    ]
}

const N: usize = 20;

fn request(i: usize) -> Bytes {
    Bytes::from(
        json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [i, 7]}]})
            .to_string(),
    )
}

/// Produces N requests over mutual TLS, then reads the output topic with librdkafka over mutual
/// TLS and checks one answer per request, its key kept and its values echoed.
async fn answers_every_request(b: &TlsBroker, input: &str, output: &str) -> Result<()> {
    let p = Producer::new(
        Cluster::connect(b.settings()).await?,
        ProducerConfig::default(),
    );
    let mut ds = Vec::new();
    for i in 0..N {
        let r = OutRecord {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(request(i)),
            headers: vec![],
        };
        ds.push(p.send(input, None, r).await?);
    }
    for d in ds {
        d.wait().await?;
    }
    p.close(Duration::from_secs(10)).await?;
    let answers = read_topic_with(&b.librdkafka_config(), &b.bootstrap(), output, N, 60)?;
    let mut by_id: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for a in &answers {
        let v: Value = serde_json::from_slice(&a.value)?;
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            by_id.insert(id.clone(), (a.key.clone(), v)).is_none(),
            "{id} answered twice"
        );
    }
    assert_eq!(by_id.len(), N, "every request answered: {:?}", by_id.keys());
    for i in 0..N {
        let (key, v) = &by_id[&format!("r{i}")];
        assert_eq!(key, &format!("k{i}"), "key kept");
        assert_eq!(v["model_name"], "m");
        assert_eq!(v["outputs"][0]["data"], json!([i, 7]), "r{i} echoed: {v}");
    }
    Ok(())
}

/// Starts kafka-infer from `yaml` (plus `env` in the process environment), checks that its
/// resolved configuration shows no secret, and that it answers every request.
async fn serve_over_tls(
    b: &TlsBroker,
    input: &str,
    output: &str,
    yaml: &str,
    env: &[(&str, String)],
    secrets: &[&str],
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("sdep.yaml");
    std::fs::write(&file, yaml)?;
    let file = file.to_str().unwrap();

    let mut cmd = std::process::Command::new(kafka_infer_bin());
    cmd.args(["run", "-f", file, "--print-config"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    let out = run_bounded(&mut cmd, Duration::from_secs(10))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let cfg: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(cfg["security_protocol"], "Ssl", "{cfg}");
    assert_eq!(cfg["brokers"][0], b.bootstrap(), "{cfg}");
    for s in secrets.iter().chain(&["PRIVATE KEY", "BEGIN CERTIFICATE"]) {
        assert!(!text.contains(s), "--print-config shows a secret: {text}");
    }

    let ki = KafkaInfer::start(&["-f", file, "--session-timeout", "4s"], env)?;
    answers_every_request(b, input, output).await?;
    ki.wait_ready(Duration::from_secs(10))?;
    let errors = ki
        .metric("kafka_infer_records_total{result=\"error\"}")
        .unwrap_or(0.0);
    assert_eq!(errors, 0.0, "no error records");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_pem_values_in_the_deployment_and_an_encrypted_key() -> Result<()> {
    let b = TlsBroker::start(true)?;
    let m = &b.material;
    let model = models::test_model("v2", "m", "echo")?;
    let (input, output) = (unique("in"), unique("out"));
    b.broker.create_topic(&input, 2)?;
    b.broker.create_topic(&output, 2)?;
    let password = "pem-s3cret";
    let mut vars = vec![
        Var::Value("KAFKA_BROKER", b.bootstrap()),
        Var::Value("KAFKA_SECURITY_PROTOCOL", "SSL".into()),
        Var::Value("KAFKA_SSL_CA_CERT", m.read("ca.pem")),
        Var::Value("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")),
        Var::Value(
            "KAFKA_SSL_CLIENT_KEY",
            m.encrypted_pkcs8("client.key", password)?,
        ),
        Var::Value("KAFKA_SSL_CLIENT_KEY_PASS", password.into()),
    ];
    vars.extend(topics(&input, &output));
    let yaml = deployment(model.http_port, &vars);
    assert!(yaml.contains("BEGIN ENCRYPTED PRIVATE KEY"), "{yaml}");
    serve_over_tls(&b, &input, &output, &yaml, &[], &[password]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_secrets_files_and_a_legacy_encrypted_key() -> Result<()> {
    let b = TlsBroker::start(true)?;
    let m = &b.material;
    let model = models::test_model("v2", "m", "echo")?;
    let (input, output) = (unique("in"), unique("out"));
    b.broker.create_topic(&input, 2)?;
    b.broker.create_topic(&output, 2)?;
    // The Secret as Kubernetes mounts it: one file per key, named as in the KEDA example.
    let secret = tempfile::tempdir()?;
    let password = "file-pa55";
    let key = m.legacy_encrypted_rsa("aes256", password)?;
    assert!(key.contains("Proc-Type: 4,ENCRYPTED"), "{key}");
    std::fs::write(secret.path().join("ca.crt"), m.read("ca.pem"))?;
    std::fs::write(secret.path().join("user.crt"), m.read("client-rsa.pem"))?;
    std::fs::write(secret.path().join("user.key"), key)?;
    let f = |name: &str| secret.path().join(name).display().to_string();
    let mut vars = vec![
        Var::Value("KAFKA_BROKER", b.bootstrap()),
        Var::Value("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
        Var::Value("KAFKA_SSL_CA_CERT_FILE", f("ca.crt")),
        Var::Value("KAFKA_SSL_CLIENT_CERT_FILE", f("user.crt")),
        Var::Value("KAFKA_SSL_CLIENT_KEY_FILE", f("user.key")),
        // From the Secret, as Kubernetes would put it in the container's environment.
        Var::FromSecret("KAFKA_SSL_CLIENT_KEY_PASS", "user.password"),
    ];
    vars.extend(topics(&input, &output));
    let yaml = deployment(model.http_port, &vars);
    let env = [("KAFKA_SSL_CLIENT_KEY_PASS", password.to_owned())];
    serve_over_tls(&b, &input, &output, &yaml, &env, &[password]).await
}

/// kafka-infer started from a deployment whose CA did not sign the broker's certificate (client
/// certificate and encrypted key otherwise right), its stdout and stderr (log and final error)
/// in one file.
struct WrongCa {
    ki: Proc,
    log: tempfile::NamedTempFile,
    password: &'static str,
    _model: models::Server,
    _broker: TlsBroker,
    _dir: tempfile::TempDir,
}

impl WrongCa {
    /// `wrong_client`: the right CA but a client certificate from another CA (the broker
    /// refuses it); else a CA that did not sign the broker's certificate.
    fn start(wrong_client: bool) -> Result<Self> {
        let b = TlsBroker::start(true)?;
        let m = &b.material;
        let model = models::test_model("v2", "m", "echo")?;
        let (input, output) = (unique("in"), unique("out"));
        b.broker.create_topic(&input, 1)?;
        b.broker.create_topic(&output, 1)?;
        let password = "wrong-ca-s3cret";
        let mut vars = vec![
            Var::Value("KAFKA_BROKER", b.bootstrap()),
            Var::Value("KAFKA_SECURITY_PROTOCOL", "SSL".into()),
            Var::Value(
                "KAFKA_SSL_CA_CERT",
                m.read(if wrong_client {
                    "ca.pem"
                } else {
                    "other-ca.pem"
                }),
            ),
            Var::Value(
                "KAFKA_SSL_CLIENT_CERT",
                m.read(if wrong_client {
                    "other-client.pem"
                } else {
                    "client.pem"
                }),
            ),
            Var::Value(
                "KAFKA_SSL_CLIENT_KEY",
                m.encrypted_pkcs8(
                    if wrong_client {
                        "other-client.key"
                    } else {
                        "client.key"
                    },
                    password,
                )?,
            ),
            Var::Value("KAFKA_SSL_CLIENT_KEY_PASS", password.into()),
        ];
        vars.extend(topics(&input, &output));
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("sdep.yaml");
        std::fs::write(&file, deployment(model.http_port, &vars))?;
        let log = tempfile::NamedTempFile::new()?;
        let metrics_port = free_port();
        let child = std::process::Command::new(kafka_infer_bin())
            .arg("run")
            .arg("-f")
            .arg(&file)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env_clear()
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            // The log goes to stdout, the final error to stderr.
            .stdout(log.as_file().try_clone()?)
            .stderr(log.as_file().try_clone()?)
            .spawn()?;
        Ok(Self {
            // Stopped by its PID when dropped, also when an assertion fails.
            ki: Proc::from_child("kafka-infer", child),
            log,
            password,
            _model: model,
            _broker: b,
            _dir: dir,
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

/// A CA that did not sign the broker's certificate is a settings mistake: kafka-infer stops at
/// start, naming the TLS failure and the setting to check (it does not retry forever).
#[test]
fn a_ca_that_did_not_sign_the_broker_certificate_stops_kafka_infer_at_start() -> Result<()> {
    let mut w = WrongCa::start(false)?;
    let started = Instant::now();
    let code = w.ki.wait_exit(Duration::from_secs(20));
    let output = w.output();
    let code = code.map_err(|e| anyhow!("{e}; its output so far:\n{output}"))?;
    eprintln!("exit {code:?} after {:?}", started.elapsed());
    assert!(
        code.is_some_and(|c| c != 0),
        "exits non-zero ({code:?}): {output}"
    );
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kafka-infer: ")
            && last.contains("TLS")
            && last.contains("UnknownIssuer")
            && last.contains("KAFKA_SSL_CA_CERT"),
        "the final error names TLS and the untrusted certificate: {output}"
    );
    assert!(!output.contains(w.password), "the password must not leak");
    Ok(())
}

/// A client certificate the broker does not trust (signed by another CA) stops kafka-infer at
/// start too, naming the client certificate setting (under TLS 1.3 the broker's refusal comes
/// after the handshake, on the first read).
#[test]
fn a_client_certificate_the_broker_refuses_stops_kafka_infer_at_start() -> Result<()> {
    let mut w = WrongCa::start(true)?;
    let code = w.ki.wait_exit(Duration::from_secs(20));
    let output = w.output();
    let code = code.map_err(|e| anyhow!("{e}; its output so far:\n{output}"))?;
    assert!(
        code.is_some_and(|c| c != 0),
        "exits non-zero ({code:?}): {output}"
    );
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kafka-infer: ") && last.contains("KAFKA_SSL_CLIENT_CERT"),
        "the final error names the client certificate: {output}"
    );
    assert!(!output.contains(w.password), "the password must not leak");
    Ok(())
}
