//! TLS material for tests: a CA, a server certificate for 127.0.0.1/localhost, a client
//! certificate, and a second CA with its own client certificate (to be rejected). Encrypted keys
//! are made with the `openssl` command line, the tool users make them with.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct Material {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

fn ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(p, key)))
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    server: bool,
    key: KeyPair,
) -> Result<(String, KeyPair)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    if server {
        p.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse()?),
            SanType::DnsName("localhost".try_into()?),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key))
}

impl Material {
    /// ca.pem, server.{pem,key}, client.{pem,key} (ECDSA P-256, PKCS#8), client-rsa.{pem,key}
    /// (RSA, PKCS#1), other-ca.pem, other-client.{pem,key}.
    pub fn generate() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut m = Self::generate_in(tmp.path())?;
        m._tmp = Some(tmp);
        Ok(m)
    }

    /// Writes the material into `dir` (kept: for `cargo xtask broker`).
    pub fn generate_in(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let w = |name: &str, data: &str| std::fs::write(dir.join(name), data);
        let (ca_pem, issuer) = ca("kafka-infer test CA")?;
        w("ca.pem", &ca_pem)?;
        let (s, k) = leaf(&issuer, "127.0.0.1", true, KeyPair::generate()?)?;
        w("server.pem", &s)?;
        w("server.key", &k.serialize_pem())?;
        let (c, k) = leaf(&issuer, "client", false, KeyPair::generate()?)?;
        w("client.pem", &c)?;
        w("client.key", &k.serialize_pem())?;
        let m = Self {
            dir: dir.to_path_buf(),
            _tmp: None,
        };
        // An RSA client key, made by openssl so it is in the traditional PKCS#1 form.
        m.openssl(&["genrsa", "-traditional", "-out", "client-rsa.key", "2048"])?;
        let rsa_pem = std::fs::read_to_string(m.path("client-rsa.key"))?;
        let rsa_pkcs8 = m.openssl_out(&["pkcs8", "-topk8", "-nocrypt", "-in", "client-rsa.key"])?;
        let rsa = KeyPair::from_pem(&rsa_pkcs8).context("rsa key")?;
        let (c, _) = leaf(&issuer, "client-rsa", false, rsa)?;
        std::fs::write(m.path("client-rsa.pem"), c)?;
        assert!(rsa_pem.contains("BEGIN RSA PRIVATE KEY"));
        let (other_pem, other) = ca("some other CA")?;
        std::fs::write(m.path("other-ca.pem"), other_pem)?;
        let (c, k) = leaf(&other, "intruder", false, KeyPair::generate()?)?;
        std::fs::write(m.path("other-client.pem"), c)?;
        std::fs::write(m.path("other-client.key"), k.serialize_pem())?;
        Ok(m)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).expect("material file")
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        self.openssl_out(args).map(|_| ())
    }

    fn openssl_out(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `key` encrypted as PKCS#8 "ENCRYPTED PRIVATE KEY" (PBES2, AES-256-CBC).
    pub fn encrypted_pkcs8(&self, key: &str, password: &str) -> Result<String> {
        self.openssl_out(&[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            key,
            "-passout",
            &format!("pass:{password}"),
        ])
    }

    /// An RSA key in OpenSSL's legacy encrypted form ("Proc-Type: 4,ENCRYPTED").
    pub fn legacy_encrypted_rsa(&self, cipher: &str, password: &str) -> Result<String> {
        self.openssl_out(&[
            "rsa",
            "-traditional",
            &format!("-{cipher}"),
            "-in",
            "client-rsa.key",
            "-passout",
            &format!("pass:{password}"),
        ])
    }
}
