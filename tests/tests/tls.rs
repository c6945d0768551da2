//! TLS and mutual TLS through a real TLS front (stunnel) before the test broker, configured with
//! the same KAFKA_* names a SeldonDeployment uses.

use std::{collections::HashMap, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{TlsBroker, unique};
use kafka_io::{
    Cluster, ConnectionSettings, Consumer, ConsumerConfig, GroupConfig, OutRecord, Producer,
    ProducerConfig,
};

fn settings(pairs: &[(&str, String)]) -> Result<ConnectionSettings> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Ok(ConnectionSettings::from_lookup(|k| m.get(k).cloned())?)
}

/// Connects, produces 3 records and consumes them back in a group: both rskafka's data
/// connections and our coordinator connection go through TLS.
async fn round_trip(s: ConnectionSettings, broker: &TlsBroker) -> Result<()> {
    let topic = unique("tls");
    broker.broker.create_topic(&topic, 1)?;
    let cluster = Cluster::connect(s).await?;
    let p = Producer::new(cluster.clone(), ProducerConfig::default());
    for i in 0..3 {
        let r = OutRecord {
            value: Some(Bytes::from(format!("v{i}"))),
            ..Default::default()
        };
        p.send(&topic, Some(0), r).await?.wait().await?;
    }
    let mut g = GroupConfig::new(unique("g"), vec![topic]);
    g.session_timeout = Duration::from_secs(4);
    g.heartbeat_interval = Duration::from_millis(500);
    let mut cc = ConsumerConfig::new(g);
    cc.fetch_max_wait = Duration::from_millis(10); // the test broker holds fetches until then
    let mut c = Consumer::start(cluster, cc, None);
    let mut n = 0;
    while n < 3 {
        let b = tokio::time::timeout(Duration::from_secs(15), c.recv())
            .await?
            .expect("batch");
        n += b.records.len();
        for r in &b.records {
            c.acker().complete(&b.token(r.offset));
        }
    }
    c.close().await;
    Ok(())
}

fn base(b: &TlsBroker) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", b.bootstrap()),
        ("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_pem_strings_files_and_encrypted_keys() -> Result<()> {
    let b = TlsBroker::start(true)?;
    let m = &b.material;

    // PEM values in the variables.
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")));
    env.push(("KAFKA_SSL_CLIENT_KEY", m.read("client.key")));
    round_trip(settings(&env)?, &b).await?;

    // File paths.
    let mut env = base(&b);
    env.push((
        "KAFKA_SSL_CA_CERT_FILE",
        m.path("ca.pem").display().to_string(),
    ));
    env.push((
        "KAFKA_SSL_CLIENT_CERT_FILE",
        m.path("client.pem").display().to_string(),
    ));
    env.push((
        "KAFKA_SSL_CLIENT_KEY_FILE",
        m.path("client.key").display().to_string(),
    ));
    round_trip(settings(&env)?, &b).await?;

    // Encrypted PKCS#8 key with its password.
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")));
    env.push((
        "KAFKA_SSL_CLIENT_KEY",
        m.encrypted_pkcs8("client.key", "s3cret")?,
    ));
    env.push(("KAFKA_SSL_CLIENT_KEY_PASS", "s3cret".into()));
    round_trip(settings(&env)?, &b).await?;

    // Legacy OpenSSL encrypted RSA keys (PKCS#1 with Proc-Type/DEK-Info), two ciphers.
    for cipher in ["aes256", "des3"] {
        let key = m.legacy_encrypted_rsa(cipher, "pa55")?;
        assert!(key.contains("Proc-Type: 4,ENCRYPTED"), "{cipher}: {key}");
        let mut env = base(&b);
        env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
        env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client-rsa.pem")));
        env.push(("KAFKA_SSL_CLIENT_KEY", key));
        env.push(("KAFKA_SSL_CLIENT_KEY_PASS", "pa55".into()));
        round_trip(settings(&env)?, &b).await?;
    }
    Ok(())
}

/// The client key (an encrypted PEM in the variable, and its password) is needed only to build
/// the TLS configuration: `build_tls` forgets both, and every connection made afterwards (as
/// a reconnect would) uses the built configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inline_client_key_is_forgotten_once_the_tls_config_is_built() -> Result<()> {
    let b = TlsBroker::start(true)?;
    let m = &b.material;
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")));
    env.push((
        "KAFKA_SSL_CLIENT_KEY",
        m.encrypted_pkcs8("client.key", "s3cret")?,
    ));
    env.push(("KAFKA_SSL_CLIENT_KEY_PASS", "s3cret".into()));
    let mut s = settings(&env)?;
    assert!(s.tls.client_key.is_some() && s.tls.key_password.is_some());
    s.build_tls()?;
    assert!(s.built_tls.is_some());
    assert_eq!(s.tls.client_key, None);
    assert_eq!(s.tls.key_password, None);
    round_trip(s.clone(), &b).await?;
    // Another connection from the same settings, as after a broker restart.
    kafka_io::conn::Connector::new(std::sync::Arc::new(s))?
        .connect_any()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_only_tls_with_a_ca_and_no_client_certificate() -> Result<()> {
    let b = TlsBroker::start(false)?;
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", b.material.read("ca.pem")));
    round_trip(settings(&env)?, &b).await
}

async fn connect_err(env: &[(&str, String)]) -> String {
    match Cluster::connect(settings(env).expect("settings parse")).await {
        Ok(_) => panic!("connected, but should have failed"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material_fails_with_a_clear_error() -> Result<()> {
    let b = TlsBroker::start(true)?;
    let m = &b.material;
    let client = |env: &mut Vec<(&'static str, String)>| {
        env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")));
        env.push(("KAFKA_SSL_CLIENT_KEY", m.read("client.key")));
    };

    // A CA that did not sign the broker's certificate.
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("other-ca.pem")));
    client(&mut env);
    let e = connect_err(&env).await;
    assert!(
        e.contains("TLS handshake failed") && e.contains("UnknownIssuer"),
        "{e}"
    );

    // No client certificate for a broker that requires one.
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    let e = connect_err(&env).await;
    assert!(e.contains("alert") || e.contains("handshake"), "{e}");

    // A client certificate from another CA.
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    env.push(("KAFKA_SSL_CLIENT_CERT", m.read("other-client.pem")));
    env.push(("KAFKA_SSL_CLIENT_KEY", m.read("other-client.key")));
    let e = connect_err(&env).await;
    assert!(e.contains("alert") || e.contains("handshake"), "{e}");

    // Wrong password: PKCS#8 and legacy.
    for (key, cert) in [
        (m.encrypted_pkcs8("client.key", "right")?, "client.pem"),
        (m.legacy_encrypted_rsa("aes128", "right")?, "client-rsa.pem"),
    ] {
        let mut env = base(&b);
        env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
        env.push(("KAFKA_SSL_CLIENT_CERT", m.read(cert)));
        env.push(("KAFKA_SSL_CLIENT_KEY", key));
        env.push(("KAFKA_SSL_CLIENT_KEY_PASS", "wrong".into()));
        let e = connect_err(&env).await;
        assert!(
            e.contains("KAFKA_SSL_CLIENT_KEY_PASS") && e.contains("wrong password"),
            "{e}"
        );
        assert!(!e.contains("right"), "the password must not leak: {e}");
    }

    // An encrypted key without a password; a key that does not match its certificate;
    // a value that is not PEM.
    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")));
    env.push((
        "KAFKA_SSL_CLIENT_KEY",
        m.encrypted_pkcs8("client.key", "x")?,
    ));
    let e = connect_err(&env).await;
    assert!(
        e.contains("KAFKA_SSL_CLIENT_KEY_PASS") && e.contains("no password"),
        "{e}"
    );

    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", m.read("ca.pem")));
    env.push(("KAFKA_SSL_CLIENT_CERT", m.read("client.pem")));
    env.push(("KAFKA_SSL_CLIENT_KEY", m.read("other-client.key")));
    let e = connect_err(&env).await;
    assert!(
        e.contains("KAFKA_SSL_CLIENT_KEY") && e.contains("does not fit"),
        "{e}"
    );

    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT", "not a certificate".into()));
    let e = connect_err(&env).await;
    assert!(
        e.contains("KAFKA_SSL_CA_CERT") && e.contains("no PEM certificate"),
        "{e}"
    );

    let mut env = base(&b);
    env.push(("KAFKA_SSL_CA_CERT_FILE", "/nonexistent/ca.pem".into()));
    let e = connect_err(&env).await;
    assert!(
        e.contains("KAFKA_SSL_CA_CERT") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    Ok(())
}
