//! Secrets and credentials as a user of the binary sees them: `run --help` and
//! `--print-config` never show a secret or a URL's userinfo, and SASL PLAIN without TLS is
//! warned about and shown in the metrics. No broker needed: nothing here gets as far as Kafka.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Result;
use kafka_infer_tests::{
    Proc, free_port, http_get, models::kafka_infer_bin, python, wait_for, wait_port,
};

/// Runs the binary to completion with only `env` set; its stdout and stderr together.
fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(kafka_infer_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// clap prints `[env: NAME=value]` for flags read from the environment: the URLs (which may
/// carry credentials) and secrets must not be among the values shown.
#[test]
fn run_help_shows_no_secret_or_url_values() -> Result<()> {
    let help = run_to_end(
        &["run", "--help"],
        &[
            ("KAFKA_INFER_MODEL", "http://alice:pw-model@127.0.0.1:9000"),
            (
                "KAFKA_INFER_OTLP_ENDPOINT",
                "https://tok-otlp@collector:4318",
            ),
            ("KAFKA_SASL_PASSWORD", "pw-sasl"),
            ("KAFKA_SSL_CLIENT_KEY_PASS", "pw-key"),
            ("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "pw-oidc"),
            ("KAFKA_INPUT_TOPIC", "topic-shown"),
        ],
    )?;
    for flag in [
        "--sasl-mechanism",
        "--sasl-oauthbearer-method",
        "--sasl-oauthbearer-token-endpoint-url",
        "--sasl-oauthbearer-client-id",
        "--sasl-oauthbearer-client-secret-file",
        "--sasl-oauthbearer-scope",
        "--sasl-oauthbearer-extensions",
        "--sasl-oauthbearer-token-file",
        "--sasl-oauthbearer-config",
        "--sasl-oauthbearer-aws-region",
    ] {
        assert!(help.contains(flag), "{flag} not in:\n{help}");
    }
    for secret in ["pw-model", "tok-otlp", "pw-sasl", "pw-key", "pw-oidc"] {
        assert!(!help.contains(secret), "{secret} in:\n{help}");
    }
    assert!(help.contains("[env: KAFKA_INFER_MODEL]"), "{help}");
    assert!(help.contains("[env: KAFKA_INFER_OTLP_ENDPOINT]"), "{help}");
    // Other values still show (so the check above can fail).
    assert!(
        help.contains("[env: KAFKA_INPUT_TOPIC=topic-shown]"),
        "{help}"
    );
    Ok(())
}

#[test]
fn print_config_shows_no_url_userinfo_or_password() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pw_file = dir.path().join("password");
    std::fs::write(&pw_file, "pw-from-file\n")?;
    let pw_file = pw_file.display().to_string();
    let printed = run_to_end(
        &["run", "--print-config"],
        &[
            ("KAFKA_BROKER", "127.0.0.1:9092"),
            ("KAFKA_INPUT_TOPIC", "in"),
            ("KAFKA_OUTPUT_TOPIC", "out"),
            ("KAFKA_INFER_MODEL", "http://alice:pw-model@127.0.0.1:9000"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_USERNAME", "alice"),
            ("KAFKA_SASL_PASSWORD_FILE", &pw_file),
        ],
    )?;
    let cfg: serde_json::Value = serde_json::from_str(&printed)
        .unwrap_or_else(|e| panic!("--print-config is JSON ({e}):\n{printed}"));
    assert_eq!(
        cfg["graph"]["url"], "http://***@127.0.0.1:9000",
        "{printed}"
    );
    assert_eq!(cfg["sasl_mechanism"], "PLAIN", "{printed}");
    for secret in ["pw-model", "pw-from-file"] {
        assert!(!printed.contains(secret), "{secret} in:\n{printed}");
    }
    Ok(())
}

/// OAUTHBEARER with a token endpoint that is down: the process ends at start (exit 1) with an
/// error naming the setting, without waiting for the (also absent) broker, and without the
/// client secret; `--print-config` shows the OAUTHBEARER settings but not the secret.
#[test]
fn oauthbearer_endpoint_down_at_start_exits_naming_the_setting() -> Result<()> {
    let endpoint = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let broker = format!("127.0.0.1:{}", free_port());
    let env = [
        ("KAFKA_BROKER", broker.as_str()),
        ("KAFKA_INPUT_TOPIC", "in"),
        ("KAFKA_OUTPUT_TOPIC", "out"),
        ("KAFKA_INFER_MODEL", "http://127.0.0.1:1"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_SASL_MECHANISM", "OAUTHBEARER"),
        (
            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
            endpoint.as_str(),
        ),
        ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "kafka-infer"),
        ("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "pw-oidc-secret"),
        (
            "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
            "logicalCluster=lkc-1,identityPoolId=pool-2",
        ),
    ];
    let printed = run_to_end(&["run", "--print-config"], &env)?;
    let cfg: serde_json::Value = serde_json::from_str(&printed)
        .unwrap_or_else(|e| panic!("--print-config is JSON ({e}):\n{printed}"));
    assert_eq!(cfg["sasl_mechanism"], "OAUTHBEARER", "{printed}");
    assert_eq!(cfg["sasl_oauthbearer"]["method"], "oidc", "{printed}");
    assert_eq!(
        cfg["sasl_oauthbearer"]["extensions"]["identityPoolId"], "pool-2",
        "{printed}"
    );
    assert!(!printed.contains("pw-oidc-secret"), "{printed}");

    let log = tempfile::NamedTempFile::new()?;
    let mut ki = Proc::spawn(
        "kafka-infer",
        Command::new(kafka_infer_bin())
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .env_clear()
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.as_file().try_clone()?)
            .stderr(log.as_file().try_clone()?),
    )?;
    let code = ki.wait_exit(Duration::from_secs(30))?;
    let out = std::fs::read_to_string(log.path())?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL: cannot get an OAUTHBEARER token: cannot reach"),
        "{out}"
    );
    assert!(!out.contains("pw-oidc-secret"), "{out}");
    Ok(())
}

/// A real token endpoint (Python's http.server, its own process) refusing the client: the
/// binary sent RFC 6749's client-credentials request (basic auth, grant_type, scope) and
/// exits 1 at start naming the client settings and the endpoint's error, not the secret.
#[test]
fn oauthbearer_client_refused_by_a_token_endpoint_exits_naming_the_client_settings() -> Result<()> {
    use base64::Engine;
    let dir = tempfile::tempdir()?;
    let seen = dir.path().join("requests");
    let port = free_port();
    let server = r#"
import http.server, sys
seen, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
        with open(seen, "a") as f:
            f.write(self.path + "\n" + self.headers.get("authorization", "") + "\n" + body + "\n")
        answer = b'{"error":"invalid_client","error_description":"client authentication failed"}'
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#;
    let _endpoint = Proc::spawn(
        "token endpoint",
        Command::new(python())
            .args(["-c", server, seen.to_str().unwrap(), &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_port(port, Duration::from_secs(10))?;
    let endpoint = format!("http://127.0.0.1:{port}/oauth2/token");
    let broker = format!("127.0.0.1:{}", free_port());
    let log = tempfile::NamedTempFile::new()?;
    let mut ki = Proc::spawn(
        "kafka-infer",
        Command::new(kafka_infer_bin())
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{}", free_port()),
                "--sasl-oauthbearer-scope",
                "kafka:connect",
            ])
            .env_clear()
            .env("NO_COLOR", "1")
            .envs([
                ("KAFKA_BROKER", broker.as_str()),
                ("KAFKA_INPUT_TOPIC", "in"),
                ("KAFKA_OUTPUT_TOPIC", "out"),
                ("KAFKA_INFER_MODEL", "http://127.0.0.1:1"),
                ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_SASL_MECHANISM", "OAUTHBEARER"),
                (
                    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                    endpoint.as_str(),
                ),
                ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "kafka-infer"),
                ("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "pw-oidc-secret"),
            ])
            .stdin(Stdio::null())
            .stdout(log.as_file().try_clone()?)
            .stderr(log.as_file().try_clone()?),
    )?;
    let code = ki.wait_exit(Duration::from_secs(30))?;
    let out = std::fs::read_to_string(log.path())?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("KAFKA_SASL_OAUTHBEARER_CLIENT_ID / KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET: cannot get an OAUTHBEARER token")
            && out.contains("401")
            && out.contains("invalid_client: client authentication failed"),
        "{out}"
    );
    assert!(!out.contains("pw-oidc-secret"), "{out}");
    let requests = std::fs::read_to_string(&seen)?;
    let lines: Vec<&str> = requests.lines().collect();
    let basic = base64::engine::general_purpose::STANDARD.encode("kafka-infer:pw-oidc-secret");
    assert_eq!(
        &lines[..3],
        [
            "/oauth2/token",
            format!("Basic {basic}").as_str(),
            "grant_type=client_credentials&scope=kafka%3Aconnect"
        ],
        "{requests}"
    );
    Ok(())
}

/// PLAIN (the default mechanism) over SASL_PLAINTEXT sends the password as it is: a warning at
/// start and kafka_infer_sasl_plaintext_credentials 1, while it waits for the (absent) broker.
#[test]
fn sasl_plain_without_tls_is_warned_about_and_shown_in_the_metrics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pw_file = dir.path().join("password");
    std::fs::write(&pw_file, "pw-from-file\n")?;
    let log = tempfile::NamedTempFile::new()?;
    let metrics_port = free_port();
    let broker = format!("127.0.0.1:{}", free_port()); // nothing listens: it keeps retrying
    let _ki = Proc::spawn(
        "kafka-infer",
        Command::new(kafka_infer_bin())
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .env_clear()
            .env("NO_COLOR", "1")
            .env("KAFKA_BROKER", &broker)
            .env("KAFKA_INPUT_TOPIC", "in")
            .env("KAFKA_OUTPUT_TOPIC", "out")
            .env("KAFKA_INFER_MODEL", "http://127.0.0.1:1")
            .env("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
            .env("KAFKA_SASL_USERNAME", "alice")
            .env("KAFKA_SASL_PASSWORD_FILE", &pw_file)
            .stdout(log.as_file().try_clone()?)
            .stderr(log.as_file().try_clone()?),
    )?;
    let gauge = wait_for(Duration::from_secs(20), "the metrics", || {
        let (status, body) = http_get(metrics_port, "/metrics").ok()?;
        (status == 200).then(|| {
            body.lines()
                .find(|l| l.starts_with("kafka_infer_sasl_plaintext_credentials "))
                .map(str::to_owned)
        })?
    })?;
    assert_eq!(gauge, "kafka_infer_sasl_plaintext_credentials 1");
    let text = std::fs::read_to_string(log.path())?;
    assert!(
        text.contains("WARN") && text.contains("sends the Kafka password in clear text"),
        "{text}"
    );
    assert!(!text.contains("pw-from-file"), "{text}");
    Ok(())
}
