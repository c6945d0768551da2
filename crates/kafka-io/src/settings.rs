//! Connection settings: bootstrap servers, security protocol, TLS material and SASL credentials,
//! read from the same `KAFKA_*` names Seldon's orchestrator uses.

use std::{fmt, path::PathBuf, str::FromStr, sync::Arc};

use crate::{error::ConfigError, secret::Secret};

/// One `host:port` of the bootstrap list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `host:port[,host:port...]`; an optional `scheme://` prefix per entry is ignored.
pub fn parse_bootstrap(list: &str) -> Result<Vec<BrokerAddr>, ConfigError> {
    let bad = |why: String| ConfigError::Invalid {
        setting: "KAFKA_BROKER",
        why,
    };
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let entry = raw.rsplit_once("://").map_or(raw, |(_, rest)| rest);
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| bad(format!("`{raw}` is not [ipv6]:port")))?;
            (h, p)
        } else {
            entry
                .rsplit_once(':')
                .ok_or_else(|| bad(format!("`{raw}` has no port (expected host:port)")))?
        };
        if host.is_empty() {
            return Err(bad(format!("`{raw}` has no host")));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| bad(format!("`{raw}`: port `{port}` is not a number 1-65535")))?;
        out.push(BrokerAddr {
            host: host.to_owned(),
            port,
        });
    }
    if out.is_empty() {
        return Err(bad("empty broker list".into()));
    }
    Ok(out)
}

/// Kafka's `security.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

impl FromStr for SecurityProtocol {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "PLAINTEXT" | "" => Ok(Self::Plaintext),
            "SSL" | "TLS" => Ok(Self::Ssl),
            "SASL_PLAINTEXT" => Ok(Self::SaslPlaintext),
            "SASL_SSL" => Ok(Self::SaslSsl),
            other => Err(ConfigError::Invalid {
                setting: "KAFKA_SECURITY_PROTOCOL",
                why: format!(
                    "`{other}` is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL (any case)"
                ),
            }),
        }
    }
}

/// Where a PEM value comes from: the value itself, or a file holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PemSource {
    Inline(Secret),
    File(PathBuf),
}

/// TLS material. Without a CA, the Mozilla roots (webpki-roots) are trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca: Option<PemSource>,
    pub client_cert: Option<PemSource>,
    pub client_key: Option<PemSource>,
    pub key_password: Option<Secret>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
    /// SASL/OAUTHBEARER (KIP-255): a bearer token from [`crate::oauth::TokenSource`].
    OauthBearer,
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OauthBearer => "OAUTHBEARER",
        }
    }
}

impl FromStr for SaslMechanism {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            "OAUTHBEARER" => Ok(Self::OauthBearer),
            other => Err(ConfigError::Invalid {
                setting: "KAFKA_SASL_MECHANISM",
                why: format!(
                    "`{other}` is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER"
                ),
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaslSettings {
    pub mechanism: SaslMechanism,
    /// PLAIN and SCRAM (empty for OAUTHBEARER).
    pub username: String,
    pub password: Secret,
    /// OAUTHBEARER: the token source, shared by every connection.
    pub oauth: Option<crate::oauth::TokenSource>,
}

/// A TLS client configuration built from [`TlsSettings`] by [`ConnectionSettings::build_tls`].
/// Two are equal when they are the same configuration.
#[derive(Clone)]
pub struct BuiltTls(pub Arc<rustls::ClientConfig>);

impl fmt::Debug for BuiltTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BuiltTls")
    }
}

impl PartialEq for BuiltTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BuiltTls {}

/// Everything needed to open a connection to the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSettings {
    pub bootstrap: Vec<BrokerAddr>,
    pub security: SecurityProtocol,
    pub tls: TlsSettings,
    pub sasl: Option<SaslSettings>,
    pub client_id: String,
    /// The TLS configuration once built ([`ConnectionSettings::build_tls`]); every connection
    /// uses it, so the client key need not be kept.
    pub built_tls: Option<BuiltTls>,
}

/// Reads a secret from the file a `*_FILE` setting names (a mounted Kubernetes Secret, say):
/// its whole content less trailing line ends. An empty file is an error.
fn read_secret_file(setting: &'static str, path: &str) -> Result<Secret, ConfigError> {
    let bad = |why: String| ConfigError::Invalid { setting, why };
    let mut text = std::fs::read_to_string(path)
        .map(Secret::new)
        .map_err(|e| bad(format!("cannot read {path}: {e}")))?;
    let len = text.expose().trim_end_matches(['\n', '\r']).len();
    if len == 0 {
        return Err(bad(format!("{path} is empty")));
    }
    text.truncate(len);
    Ok(text)
}

/// The OAUTHBEARER settings, by librdkafka's `sasl.oauthbearer.*` names:
/// KAFKA_SASL_OAUTHBEARER_METHOD (oidc, file or unsecured; default: oidc with a token endpoint,
/// file with a token file), _TOKEN_ENDPOINT_URL, _CLIENT_ID, _CLIENT_SECRET[_FILE], _SCOPE,
/// _EXTENSIONS, _TOKEN_FILE, _CONFIG (unsecured: `principal=NAME [lifeSeconds=N]`), and for
/// aws_msk_iam _AWS_REGION with the standard AWS_* credential variables ([`crate::aws`]).
fn oauth_from_lookup(
    get: &dyn Fn(&str) -> Option<String>,
    secret: &dyn Fn(&'static str, &'static str) -> Result<Option<Secret>, ConfigError>,
) -> Result<crate::oauth::OauthSettings, ConfigError> {
    use crate::oauth::{OauthMethod, OauthSettings};
    const METHOD: &str = "KAFKA_SASL_OAUTHBEARER_METHOD";
    const URL: &str = "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL";
    const FILE: &str = "KAFKA_SASL_OAUTHBEARER_TOKEN_FILE";
    const CONFIG: &str = "KAFKA_SASL_OAUTHBEARER_CONFIG";
    let method = match get(METHOD).map(|m| m.trim().to_ascii_lowercase()) {
        Some(m) => m,
        None if get(URL).is_some() => "oidc".into(),
        None if get(FILE).is_some() => "file".into(),
        None => {
            return Err(ConfigError::Invalid {
                setting: METHOD,
                why: "KAFKA_SASL_MECHANISM=OAUTHBEARER needs oidc (with \
                      KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL), file (with \
                      KAFKA_SASL_OAUTHBEARER_TOKEN_FILE) or unsecured"
                    .into(),
            });
        }
    };
    let method = match method.as_str() {
        "oidc" => {
            let token_endpoint_url = get(URL).ok_or(ConfigError::Missing(URL))?;
            if !(token_endpoint_url.starts_with("https://")
                || token_endpoint_url.starts_with("http://"))
            {
                return Err(ConfigError::Invalid {
                    setting: URL,
                    why: format!("`{token_endpoint_url}` is not an http(s):// URL"),
                });
            }
            OauthMethod::Oidc {
                token_endpoint_url,
                client_id: get("KAFKA_SASL_OAUTHBEARER_CLIENT_ID")
                    .ok_or(ConfigError::Missing("KAFKA_SASL_OAUTHBEARER_CLIENT_ID"))?,
                client_secret: secret(
                    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
                    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE",
                )?
                .ok_or(ConfigError::Missing(
                    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET (or \
                     KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE)",
                ))?,
                scope: get("KAFKA_SASL_OAUTHBEARER_SCOPE"),
            }
        }
        "file" => OauthMethod::File(PathBuf::from(get(FILE).ok_or(ConfigError::Missing(FILE))?)),
        "unsecured" | "default" => {
            let config = get(CONFIG).unwrap_or_default();
            let mut principal = None;
            let mut life = 3600u64;
            for pair in config.split_whitespace() {
                match pair.split_once('=') {
                    Some(("principal", p)) if !p.is_empty() => principal = Some(p.to_owned()),
                    Some(("lifeSeconds", n)) => {
                        life = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            ConfigError::Invalid {
                                setting: CONFIG,
                                why: format!("lifeSeconds `{n}` is not a number of seconds"),
                            }
                        })?
                    }
                    _ => {
                        return Err(ConfigError::Invalid {
                            setting: CONFIG,
                            why: format!("`{pair}`: expected principal=NAME or lifeSeconds=N"),
                        });
                    }
                }
            }
            OauthMethod::Unsecured {
                principal: principal.ok_or(ConfigError::Invalid {
                    setting: CONFIG,
                    why: "the unsecured method needs principal=NAME".into(),
                })?,
                lifetime: std::time::Duration::from_secs(life),
            }
        }
        "aws_msk_iam" | "aws-msk-iam" => {
            OauthMethod::AwsMskIam(crate::aws::MskIam::from_lookup(get)?)
        }
        other => {
            return Err(ConfigError::Invalid {
                setting: METHOD,
                why: format!("`{other}` is not one of oidc, file, unsecured, aws_msk_iam"),
            });
        }
    };
    let extensions = match get("KAFKA_SASL_OAUTHBEARER_EXTENSIONS") {
        Some(e) => crate::oauth::parse_extensions("KAFKA_SASL_OAUTHBEARER_EXTENSIONS", &e)?,
        None => Vec::new(),
    };
    Ok(OauthSettings { method, extensions })
}

impl ConnectionSettings {
    /// Plaintext settings for a bootstrap list.
    pub fn plaintext(bootstrap: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            bootstrap: parse_bootstrap(bootstrap)?,
            security: SecurityProtocol::Plaintext,
            tls: TlsSettings::default(),
            sasl: None,
            client_id: "kafka-infer".into(),
            built_tls: None,
        })
    }

    /// Builds the TLS client configuration (reading and checking the TLS material) once, for
    /// every connection made with these settings from now on, and forgets the client key and
    /// its password: an inline key PEM (and the password) are zeroed here rather than kept for
    /// the life of the process. Does nothing without TLS or when already built.
    pub fn build_tls(&mut self) -> Result<(), crate::error::TlsError> {
        if !self.security.uses_tls() || self.built_tls.is_some() {
            return Ok(());
        }
        self.built_tls = Some(BuiltTls(crate::tls::client_config(&self.tls)?));
        self.tls.client_key = None;
        self.tls.key_password = None;
        Ok(())
    }

    /// Reads Seldon's names through `get` (e.g. `|k| std::env::var(k).ok()`): KAFKA_BROKER,
    /// KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_CA_CERT[_FILE], KAFKA_SSL_CLIENT_CERT[_FILE],
    /// KAFKA_SSL_CLIENT_KEY[_FILE], KAFKA_SSL_CLIENT_KEY_PASS[_FILE], KAFKA_SASL_MECHANISM,
    /// KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD[_FILE]. Empty values count as unset. A `_FILE`
    /// password is the file's content less trailing line ends.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let brokers = get("KAFKA_BROKER").ok_or(ConfigError::Missing("KAFKA_BROKER"))?;
        let security: SecurityProtocol = get("KAFKA_SECURITY_PROTOCOL")
            .as_deref()
            .unwrap_or("PLAINTEXT")
            .parse()?;
        let pem = |inline: &'static str, file: &'static str| -> Result<_, ConfigError> {
            match (get(inline), get(file)) {
                (Some(_), Some(_)) => Err(ConfigError::Invalid {
                    setting: inline,
                    why: format!("set either {inline} or {file}, not both"),
                }),
                (Some(v), None) => Ok(Some(PemSource::Inline(Secret::new(v)))),
                (None, Some(f)) => Ok(Some(PemSource::File(PathBuf::from(f)))),
                (None, None) => Ok(None),
            }
        };
        let secret = |inline: &'static str, file: &'static str| -> Result<_, ConfigError> {
            match (get(inline), get(file)) {
                (Some(_), Some(_)) => Err(ConfigError::Invalid {
                    setting: inline,
                    why: format!("set either {inline} or {file}, not both"),
                }),
                (Some(v), None) => Ok(Some(Secret::new(v))),
                (None, Some(f)) => read_secret_file(file, &f).map(Some),
                (None, None) => Ok(None),
            }
        };
        let tls = TlsSettings {
            ca: pem("KAFKA_SSL_CA_CERT", "KAFKA_SSL_CA_CERT_FILE")?,
            client_cert: pem("KAFKA_SSL_CLIENT_CERT", "KAFKA_SSL_CLIENT_CERT_FILE")?,
            client_key: pem("KAFKA_SSL_CLIENT_KEY", "KAFKA_SSL_CLIENT_KEY_FILE")?,
            key_password: secret(
                "KAFKA_SSL_CLIENT_KEY_PASS",
                "KAFKA_SSL_CLIENT_KEY_PASS_FILE",
            )?,
        };
        let sasl = if security.uses_sasl() {
            let mechanism: SaslMechanism = get("KAFKA_SASL_MECHANISM")
                .as_deref()
                .unwrap_or("PLAIN")
                .parse()?;
            if mechanism == SaslMechanism::OauthBearer {
                let oauth = oauth_from_lookup(&get, &secret)?;
                Some(SaslSettings {
                    mechanism,
                    username: String::new(),
                    password: Secret::default(),
                    oauth: Some(crate::oauth::TokenSource::new(oauth)),
                })
            } else {
                Some(SaslSettings {
                    mechanism,
                    username: get("KAFKA_SASL_USERNAME")
                        .ok_or(ConfigError::Missing("KAFKA_SASL_USERNAME"))?,
                    password: secret("KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE")?.ok_or(
                        ConfigError::Missing("KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)"),
                    )?,
                    oauth: None,
                })
            }
        } else {
            None
        };
        Ok(Self {
            bootstrap: parse_bootstrap(&brokers)?,
            security,
            tls,
            sasl,
            client_id: "kafka-infer".into(),
            built_tls: None,
        })
    }

    /// SASL PLAIN without TLS (SASL_PLAINTEXT): the password crosses the network as it is, on
    /// every connection.
    pub fn sends_password_in_clear(&self) -> bool {
        self.security == SecurityProtocol::SaslPlaintext
            && self
                .sasl
                .as_ref()
                .is_some_and(|s| s.mechanism == SaslMechanism::Plain)
    }

    pub fn bootstrap_strings(&self) -> Vec<String> {
        self.bootstrap.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn bootstrap_list_parses_hosts_ports_and_ipv6() {
        let b = parse_bootstrap("a:9092, b.example:19092,[::1]:9093,SSL://c:1").unwrap();
        let s: Vec<String> = b.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["a:9092", "b.example:19092", "[::1]:9093", "c:1"]);
        assert!(parse_bootstrap("nohost").is_err());
        assert!(parse_bootstrap("h:99999").is_err());
        assert!(parse_bootstrap(" , ").is_err());
    }

    #[test]
    fn security_protocol_any_case() {
        for (s, p) in [
            ("plaintext", SecurityProtocol::Plaintext),
            ("ssl", SecurityProtocol::Ssl),
            ("Sasl_Ssl", SecurityProtocol::SaslSsl),
            ("SASL_PLAINTEXT", SecurityProtocol::SaslPlaintext),
        ] {
            assert_eq!(s.parse::<SecurityProtocol>().unwrap(), p);
        }
        let e = "tls13".parse::<SecurityProtocol>().unwrap_err().to_string();
        assert!(e.contains("KAFKA_SECURITY_PROTOCOL"), "{e}");
    }

    #[test]
    fn env_names_as_seldon() {
        let s = ConnectionSettings::from_lookup(lookup(&[
            ("KAFKA_BROKER", "k:9093"),
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_SSL_CA_CERT_FILE", "/ca.pem"),
            ("KAFKA_SSL_CLIENT_KEY", "-----BEGIN PRIVATE KEY-----"),
            ("KAFKA_SASL_MECHANISM", "scram-sha-512"),
            ("KAFKA_SASL_USERNAME", "alice"),
            ("KAFKA_SASL_PASSWORD", "hunter2"),
        ]))
        .unwrap();
        assert_eq!(s.security, SecurityProtocol::SaslSsl);
        assert_eq!(s.tls.ca, Some(PemSource::File("/ca.pem".into())));
        let sasl = s.sasl.clone().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha512);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("BEGIN"), "{dbg}");
    }

    #[test]
    fn missing_and_conflicting_settings_are_named() {
        let e = ConnectionSettings::from_lookup(lookup(&[])).unwrap_err();
        assert!(e.to_string().contains("KAFKA_BROKER"));
        let e = ConnectionSettings::from_lookup(lookup(&[
            ("KAFKA_BROKER", "k:1"),
            ("KAFKA_SSL_CA_CERT", "x"),
            ("KAFKA_SSL_CA_CERT_FILE", "y"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("KAFKA_SSL_CA_CERT_FILE"), "{e}");
        let e = ConnectionSettings::from_lookup(lookup(&[
            ("KAFKA_BROKER", "k:1"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("KAFKA_SASL_USERNAME", "u"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("KAFKA_SASL_PASSWORD"), "{e}");
    }

    /// A file of its own under the temp dir, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn with(name: &str, content: &str) -> Self {
            let p = std::env::temp_dir().join(format!("kafka-io-{}-{name}", std::process::id()));
            std::fs::write(&p, content).unwrap();
            Self(p)
        }
        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn secrets_from_files_lose_their_trailing_line_end() {
        let pw = TempFile::with("sasl", "hunter2\n");
        let kp = TempFile::with("keypass", "s3 cret \r\n");
        let s = ConnectionSettings::from_lookup(lookup(&[
            ("KAFKA_BROKER", "k:9093"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_USERNAME", "alice"),
            ("KAFKA_SASL_PASSWORD_FILE", &pw.path()),
            ("KAFKA_SSL_CLIENT_KEY_PASS_FILE", &kp.path()),
        ]))
        .unwrap();
        assert_eq!(s.sasl.as_ref().unwrap().password.expose(), "hunter2");
        assert_eq!(s.tls.key_password.as_ref().unwrap().expose(), "s3 cret ");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn secret_file_mistakes_are_named_without_the_secret() {
        let pw = TempFile::with("both", "hunter2\n");
        let empty = TempFile::with("empty", "\n");
        let base = [
            ("KAFKA_BROKER", "k:1"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("KAFKA_SASL_USERNAME", "u"),
        ];
        let err = |extra: &[(&str, &str)]| {
            let pairs: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
            ConnectionSettings::from_lookup(lookup(&pairs))
                .unwrap_err()
                .to_string()
        };
        let e = err(&[
            ("KAFKA_SASL_PASSWORD", "other"),
            ("KAFKA_SASL_PASSWORD_FILE", &pw.path()),
        ]);
        assert!(
            e.contains("KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE, not both"),
            "{e}"
        );
        let e = err(&[("KAFKA_SASL_PASSWORD_FILE", "/no/such/file")]);
        assert!(
            e.starts_with("KAFKA_SASL_PASSWORD_FILE: cannot read /no/such/file"),
            "{e}"
        );
        let e = err(&[("KAFKA_SASL_PASSWORD_FILE", &empty.path())]);
        assert!(
            e.contains("KAFKA_SASL_PASSWORD_FILE") && e.contains("empty"),
            "{e}"
        );
        let e = err(&[]);
        assert!(e.contains("KAFKA_SASL_PASSWORD_FILE"), "{e}");
        let e = err(&[("KAFKA_SSL_CLIENT_KEY_PASS_FILE", "/no/such/pass")]);
        assert!(
            e.starts_with("KAFKA_SSL_CLIENT_KEY_PASS_FILE: cannot read"),
            "{e}"
        );
        assert!(!e.contains("hunter2"));
    }

    #[test]
    fn oauthbearer_settings_by_librdkafka_names() {
        use crate::oauth::OauthMethod;
        let secret = TempFile::with("oidc-secret", "cl1ent-s3cret\n");
        let base = [
            ("KAFKA_BROKER", "k:9093"),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_SASL_MECHANISM", "oauthbearer"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let pairs: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
            ConnectionSettings::from_lookup(lookup(&pairs))
        };
        let s = with(&[
            (
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                "https://idp/token",
            ),
            ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "app"),
            ("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE", &secret.path()),
            ("KAFKA_SASL_OAUTHBEARER_SCOPE", "kafka"),
            (
                "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
                "logicalCluster=lkc-1,identityPoolId=pool-2",
            ),
        ])
        .unwrap();
        let sasl = s.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::OauthBearer);
        let o = sasl.oauth.as_ref().unwrap().settings();
        assert_eq!(
            o.method,
            OauthMethod::Oidc {
                token_endpoint_url: "https://idp/token".into(),
                client_id: "app".into(),
                client_secret: "cl1ent-s3cret".into(),
                scope: Some("kafka".into()),
            }
        );
        assert_eq!(o.extensions.len(), 2);
        assert!(!format!("{s:?}").contains("cl1ent-s3cret"));
        let s = with(&[("KAFKA_SASL_OAUTHBEARER_TOKEN_FILE", "/var/run/token")]).unwrap();
        assert_eq!(
            s.sasl.unwrap().oauth.unwrap().settings().method,
            OauthMethod::File("/var/run/token".into())
        );
        let s = with(&[
            ("KAFKA_SASL_OAUTHBEARER_METHOD", "unsecured"),
            (
                "KAFKA_SASL_OAUTHBEARER_CONFIG",
                "principal=admin lifeSeconds=60",
            ),
        ])
        .unwrap();
        assert_eq!(
            s.sasl.unwrap().oauth.unwrap().settings().method,
            OauthMethod::Unsecured {
                principal: "admin".into(),
                lifetime: std::time::Duration::from_secs(60)
            }
        );
        for (extra, named) in [
            (vec![], "KAFKA_SASL_OAUTHBEARER_METHOD"),
            (
                vec![("KAFKA_SASL_OAUTHBEARER_METHOD", "kerberos")],
                "KAFKA_SASL_OAUTHBEARER_METHOD",
            ),
            (
                vec![(
                    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                    "https://idp/token",
                )],
                "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
            ),
            (
                vec![
                    (
                        "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                        "https://idp/token",
                    ),
                    ("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "app"),
                ],
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
            ),
            (
                vec![("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "idp/token")],
                "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
            ),
            (
                vec![("KAFKA_SASL_OAUTHBEARER_METHOD", "unsecured")],
                "KAFKA_SASL_OAUTHBEARER_CONFIG",
            ),
            (
                vec![
                    ("KAFKA_SASL_OAUTHBEARER_TOKEN_FILE", "/t"),
                    ("KAFKA_SASL_OAUTHBEARER_EXTENSIONS", "auth=x"),
                ],
                "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
            ),
        ] {
            let e = with(&extra).unwrap_err().to_string();
            assert!(e.contains(named), "{extra:?}: {e}");
        }
    }
}
