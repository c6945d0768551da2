//! AWS MSK IAM over SASL/OAUTHBEARER: the token is a SigV4-presigned
//! `https://kafka.<region>.amazonaws.com/?Action=kafka-cluster:Connect` URL, base64url encoded
//! without padding, as AWS's signer libraries (aws-msk-iam-sasl-signer-*) make it. Credentials
//! come from the environment (AWS_ACCESS_KEY_ID...), a web identity token file (EKS IRSA:
//! STS AssumeRoleWithWebIdentity) or the container credentials endpoint (EKS Pod Identity, ECS).

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use hmac::{Mac, digest::KeyInit};
use sha2::{Digest, Sha256};

use crate::{
    error::{Error, Result},
    secret::Secret,
};

pub const REGION_SETTING: &str = "KAFKA_SASL_OAUTHBEARER_AWS_REGION (or AWS_REGION)";
pub const CREDENTIALS_SETTING: &str = "AWS credentials (AWS_ACCESS_KEY_ID / \
     AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN / AWS_CONTAINER_CREDENTIALS_FULL_URI)";

/// How long a presigned token is valid (the signer libraries' default).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// AWS credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials end.
    pub expires: Option<SystemTime>,
}

/// Where credentials come from (the first of the standard chain that is configured).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN.
    Static(Credentials),
    /// AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (EKS IRSA): STS AssumeRoleWithWebIdentity
    /// with the file's token, read again each time.
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        /// STS endpoint: AWS_ENDPOINT_URL_STS, else `https://sts.<region>.amazonaws.com/`.
        sts_endpoint: String,
    },
    /// AWS_CONTAINER_CREDENTIALS_FULL_URI (or _RELATIVE_URI) with
    /// AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE] (EKS Pod Identity, ECS).
    Container {
        url: String,
        auth_token: Option<Secret>,
        auth_token_file: Option<PathBuf>,
    },
}

/// A role to assume with the credentials found (STS AssumeRole, as the signer libraries'
/// `generate_auth_token_from_role_arn`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssumeRole {
    pub role_arn: String,
    pub session_name: String,
    pub sts_endpoint: String,
}

/// MSK IAM settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MskIam {
    pub region: String,
    pub credentials: CredentialSource,
    /// KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN: assume this role first.
    pub assume_role: Option<AssumeRole>,
}

impl MskIam {
    /// Reads the standard AWS names through `get` (flags, environment, the deployment's env).
    pub fn from_lookup(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, crate::error::ConfigError> {
        let region = get("KAFKA_SASL_OAUTHBEARER_AWS_REGION")
            .or_else(|| get("AWS_REGION"))
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .ok_or(crate::error::ConfigError::Missing(
                "KAFKA_SASL_OAUTHBEARER_AWS_REGION (or AWS_REGION) for MSK IAM",
            ))?;
        let credentials = if let Some(key) = get("AWS_ACCESS_KEY_ID") {
            CredentialSource::Static(Credentials {
                access_key_id: key,
                secret_access_key: get("AWS_SECRET_ACCESS_KEY")
                    .map(Secret::new)
                    .ok_or(crate::error::ConfigError::Missing("AWS_SECRET_ACCESS_KEY"))?,
                session_token: get("AWS_SESSION_TOKEN").map(Secret::new),
                expires: None,
            })
        } else if let Some(file) = get("AWS_WEB_IDENTITY_TOKEN_FILE") {
            CredentialSource::WebIdentity {
                token_file: file.into(),
                role_arn: get("AWS_ROLE_ARN").ok_or(crate::error::ConfigError::Missing(
                    "AWS_ROLE_ARN (with AWS_WEB_IDENTITY_TOKEN_FILE)",
                ))?,
                session_name: get("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "kafka-infer".into()),
                sts_endpoint: get("AWS_ENDPOINT_URL_STS")
                    .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/")),
            }
        } else if let Some(url) = get("AWS_CONTAINER_CREDENTIALS_FULL_URI").or_else(|| {
            get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                .map(|r| format!("http://169.254.170.2{r}"))
        }) {
            CredentialSource::Container {
                url,
                auth_token: get("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(Secret::new),
                auth_token_file: get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            }
        } else {
            return Err(crate::error::ConfigError::Invalid {
                setting: "KAFKA_SASL_OAUTHBEARER_METHOD",
                why: format!("aws_msk_iam needs {CREDENTIALS_SETTING}"),
            });
        };
        let sts_endpoint = get("AWS_ENDPOINT_URL_STS")
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/"));
        let assume_role = get("KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN").map(|role_arn| AssumeRole {
            role_arn,
            session_name: get("KAFKA_SASL_OAUTHBEARER_AWS_ROLE_SESSION_NAME")
                .unwrap_or_else(|| "kafka-infer".into()),
            sts_endpoint,
        });
        Ok(Self {
            region,
            credentials,
            assume_role,
        })
    }
}

/// RFC 3986 percent-encoding as SigV4 wants it (unreserved characters kept).
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `YYYYMMDDTHHMMSSZ` of `at`.
fn amz_date(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let t = chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

/// The SigV4 signature of `string_to_sign` (the derived signing key of the date's scope).
fn signature(
    creds: &Credentials,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> String {
    let secret = Secret::new(format!("AWS4{}", creds.secret_access_key.expose()));
    let k_date = hmac256(secret.expose().as_bytes(), date.as_bytes());
    let k_region = hmac256(&k_date, region.as_bytes());
    let k_service = hmac256(&k_region, service.as_bytes());
    let k_signing = hmac256(&k_service, b"aws4_request");
    hex(&hmac256(&k_signing, string_to_sign.as_bytes()))
}

/// SigV4 header signing of a POST with a form body: the headers to add (x-amz-date,
/// x-amz-security-token when there is one, authorization). Signed: content-type, host and
/// the x-amz-* headers, as botocore signs them.
#[allow(clippy::too_many_arguments)]
pub fn sign_post(
    host: &str,
    path: &str,
    content_type: &str,
    body: &str,
    region: &str,
    service: &str,
    creds: &Credentials,
    at: SystemTime,
) -> Vec<(&'static str, String)> {
    let date_time = amz_date(at);
    let date = &date_time[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let mut headers = vec![
        ("content-type", content_type.to_owned()),
        ("host", host.to_owned()),
        ("x-amz-date", date_time.clone()),
    ];
    if let Some(t) = &creds.session_token {
        headers.push(("x-amz-security-token", t.expose().to_owned()));
    }
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let signed = headers
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "POST\n{path}\n\n{canonical_headers}\n{signed}\n{}",
        hex(&Sha256::digest(body.as_bytes()))
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let sig = signature(creds, date, region, service, &string_to_sign);
    let mut out: Vec<(&'static str, String)> = vec![("x-amz-date", date_time)];
    if let Some(t) = &creds.session_token {
        out.push(("x-amz-security-token", t.expose().to_owned()));
    }
    out.push((
        "authorization",
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}",
            creds.access_key_id
        ),
    ));
    out
}

/// A SigV4 presigned GET URL (query-string auth): `query` (unencoded, in the URL's order) is
/// followed by the X-Amz-* parameters, then the signature; the canonical query is sorted.
#[allow(clippy::too_many_arguments)]
pub fn presign(
    host: &str,
    path: &str,
    query: &[(&str, &str)],
    region: &str,
    service: &str,
    creds: &Credentials,
    at: SystemTime,
    expires: Duration,
    payload_hash: &str,
) -> String {
    let amz_date = amz_date(at);
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let mut params: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    params.push(("X-Amz-Algorithm".into(), "AWS4-HMAC-SHA256".into()));
    params.push((
        "X-Amz-Credential".into(),
        format!("{}/{scope}", creds.access_key_id),
    ));
    params.push(("X-Amz-Date".into(), amz_date.clone()));
    params.push(("X-Amz-Expires".into(), expires.as_secs().to_string()));
    params.push(("X-Amz-SignedHeaders".into(), "host".into()));
    if let Some(tok) = &creds.session_token {
        params.push(("X-Amz-Security-Token".into(), tok.expose().to_owned()));
    }
    let encoded: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    let mut sorted = encoded.clone();
    sorted.sort();
    let canonical_query = sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_request =
        format!("GET\n{path}\n{canonical_query}\nhost:{host}\n\nhost\n{payload_hash}");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let signature = signature(creds, date, region, service, &string_to_sign);
    let url_query = encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!("https://{host}{path}?{url_query}&X-Amz-Signature={signature}")
}

/// The MSK IAM token for `creds` at `at`: the presigned kafka-cluster:Connect URL (plus a
/// User-Agent parameter, as the signer libraries add) in base64url without padding.
pub fn msk_token(region: &str, creds: &Credentials, at: SystemTime) -> Secret {
    msk_token_as(region, creds, at, "kafka-infer")
}

/// The same, with `user_agent` as the User-Agent parameter.
pub fn msk_token_as(region: &str, creds: &Credentials, at: SystemTime, user_agent: &str) -> Secret {
    // botocore signs a presigned https GET with the hash of the empty payload.
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let url = presign(
        &format!("kafka.{region}.amazonaws.com"),
        "/",
        &[("Action", "kafka-cluster:Connect")],
        region,
        "kafka-cluster",
        creds,
        at,
        TOKEN_LIFETIME,
        EMPTY_SHA256,
    );
    Secret::new(B64URL.encode(format!("{url}&User-Agent={}", uri_encode(user_agent))))
}

/// The text of the first `<tag>...</tag>` in `xml`.
fn xml_field<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].trim())
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64))
}

/// application/x-www-form-urlencoded for one value.
fn form(s: &str) -> String {
    uri_encode(s)
}

/// The credentials of an STS answer (AssumeRole, AssumeRoleWithWebIdentity).
fn sts_credentials(
    action: &str,
    role_arn: &str,
    status: hyper::StatusCode,
    body: &[u8],
) -> Result<Credentials> {
    let bad = |why: String| Error::Token {
        setting: CREDENTIALS_SETTING,
        why,
    };
    let text = String::from_utf8_lossy(body);
    if !status.is_success() {
        let msg = xml_field(&text, "Message").unwrap_or("").chars().take(200);
        return Err(bad(format!(
            "STS {action} for {role_arn} answered {status}: {}",
            msg.collect::<String>()
        )));
    }
    let field = |t: &str| {
        xml_field(&text, t)
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("the STS {action} answer has no {t}")))
    };
    Ok(Credentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: Secret::new(field("SecretAccessKey")?),
        session_token: Some(Secret::new(field("SessionToken")?)),
        expires: field("Expiration").ok().and_then(|e| parse_time(&e)),
    })
}

impl AssumeRole {
    /// STS AssumeRole (signed with `base`): the role's temporary credentials.
    pub async fn assume(
        &self,
        base: &Credentials,
        region: &str,
        http: &crate::oauth::HttpClient,
        within: Duration,
    ) -> Result<Credentials> {
        let bad = |why: String| Error::Token {
            setting: "KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN",
            why,
        };
        let uri: hyper::Uri = self
            .sts_endpoint
            .parse()
            .map_err(|e| bad(format!("STS endpoint `{}`: {e}", self.sts_endpoint)))?;
        let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let path = match uri.path() {
            "" => "/",
            p => p,
        };
        let body = format!(
            "Action=AssumeRole&Version=2011-06-15&RoleArn={}&RoleSessionName={}",
            form(&self.role_arn),
            form(&self.session_name)
        );
        const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
        let signed = sign_post(
            &host,
            path,
            CONTENT_TYPE,
            &body,
            region,
            "sts",
            base,
            SystemTime::now(),
        );
        let mut headers: Vec<(&str, &str)> = vec![("content-type", CONTENT_TYPE)];
        headers.extend(signed.iter().map(|(k, v)| (*k, v.as_str())));
        let (status, text) =
            crate::oauth::http_call(http, "POST", &self.sts_endpoint, &headers, body, within)
                .await
                .map_err(|why| bad(format!("STS {}: {why}", self.sts_endpoint)))?;
        sts_credentials("AssumeRole", &self.role_arn, status, &text)
    }
}

impl CredentialSource {
    /// Current credentials (fetched for the web identity and container sources).
    pub async fn fetch(
        &self,
        http: &crate::oauth::HttpClient,
        within: Duration,
    ) -> Result<Credentials> {
        let bad = |why: String| Error::Token {
            setting: CREDENTIALS_SETTING,
            why,
        };
        match self {
            Self::Static(c) => Ok(c.clone()),
            Self::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts_endpoint,
            } => {
                let token = tokio::fs::read_to_string(token_file)
                    .await
                    .map(Secret::new)
                    .map_err(|e| {
                        bad(format!(
                            "AWS_WEB_IDENTITY_TOKEN_FILE: cannot read {}: {e}",
                            token_file.display()
                        ))
                    })?;
                let body = format!(
                    "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
                    form(role_arn),
                    form(session_name),
                    form(token.expose().trim())
                );
                let (status, text) = crate::oauth::http_call(
                    http,
                    "POST",
                    sts_endpoint,
                    &[("content-type", "application/x-www-form-urlencoded")],
                    body,
                    within,
                )
                .await
                .map_err(|why| bad(format!("STS {sts_endpoint}: {why}")))?;
                sts_credentials("AssumeRoleWithWebIdentity", role_arn, status, &text)
            }
            Self::Container {
                url,
                auth_token,
                auth_token_file,
            } => {
                let token = match (auth_token, auth_token_file) {
                    (_, Some(f)) => Some(
                        tokio::fs::read_to_string(f)
                            .await
                            .map(|t| Secret::new(t.trim()))
                            .map_err(|e| {
                                bad(format!(
                                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: cannot read {}: {e}",
                                    f.display()
                                ))
                            })?,
                    ),
                    (Some(t), None) => Some(t.clone()),
                    (None, None) => None,
                };
                let headers: Vec<(&str, &str)> = token
                    .as_ref()
                    .map(|t| ("authorization", t.expose()))
                    .into_iter()
                    .collect();
                let (status, body) =
                    crate::oauth::http_call(http, "GET", url, &headers, String::new(), within)
                        .await
                        .map_err(|why| bad(format!("container credentials {url}: {why}")))?;
                if !status.is_success() {
                    return Err(bad(format!(
                        "container credentials {url} answered {status}"
                    )));
                }
                let j: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| bad(format!("container credentials {url}: not JSON")))?;
                let field = |k: &str| {
                    j.get(k)
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("container credentials {url}: no {k}")))
                };
                Ok(Credentials {
                    access_key_id: field("AccessKeyId")?,
                    secret_access_key: Secret::new(field("SecretAccessKey")?),
                    session_token: field("Token").ok().map(Secret::new),
                    expires: field("Expiration").ok().and_then(|e| parse_time(&e)),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// AWS's published presigned-URL example (S3 "Authenticating Requests: Using Query
    /// Parameters", GET examplebucket/test.txt at 20130524T000000Z), which botocore 1.43's
    /// S3SigV4QueryAuth reproduces.
    #[test]
    fn presign_matches_aws_published_example() {
        let creds = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            expires: None,
        };
        let url = presign(
            "examplebucket.s3.amazonaws.com",
            "/test.txt",
            &[],
            "us-east-1",
            "s3",
            &creds,
            at(1_369_353_600), // 2013-05-24T00:00:00Z
            Duration::from_secs(86400),
            "UNSIGNED-PAYLOAD",
        );
        assert_eq!(
            url,
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    /// The MSK token as AWS's Python signer builds it (botocore 1.43 SigV4QueryAuth,
    /// "kafka-cluster", expires 900, at 2024-01-02T03:04:05Z; the generating script is in
    /// docs/notes-msk-iam.md), with and without a session token.
    #[test]
    fn msk_token_matches_botocore() {
        let mut creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            expires: None,
        };
        let t = at(1_704_164_645);
        assert_eq!(
            msk_token("us-west-2", &creds, t).expose(),
            "aHR0cHM6Ly9rYWZrYS51cy13ZXN0LTIuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI0MDEwMiUyRnVzLXdlc3QtMiUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI0MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9Njg4NzVmNzUwMDVkMGE3OGFlMmViNGFkOGUwYTQ2ZDFlYjFlZjA2YTZiMzRlMGJhZGUwNGFkN2U1ZjNjNDM1ZCZVc2VyLUFnZW50PWthZmthLWluZmVy"
        );
        creds.session_token = Some("IQoJb3JpZ2luX2VjEXAMPLE/session+token=".into());
        assert_eq!(
            msk_token("us-west-2", &creds, t).expose(),
            "aHR0cHM6Ly9rYWZrYS51cy13ZXN0LTIuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI0MDEwMiUyRnVzLXdlc3QtMiUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI0MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1JUW9KYjNKcFoybHVYMlZqRVhBTVBMRSUyRnNlc3Npb24lMkJ0b2tlbiUzRCZYLUFtei1TaWduYXR1cmU9NTViNGQwNDUxMTQwNTRhYzkzZGY2NDQ0NjQyOWEzZjY2YWQ4ZGFkOGNhYzRlY2EwMmQyMWI4MzE2MjRjOWExYSZVc2VyLUFnZW50PWthZmthLWluZmVy"
        );
    }

    /// STS requests signed as botocore 1.43's SigV4Auth signs them (script in
    /// docs/notes-msk-iam.md), with and without a session token.
    #[test]
    fn sign_post_matches_botocore() {
        let body = "Action=AssumeRole&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fmsk-client&RoleSessionName=kafka-infer";
        let mut creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            expires: None,
        };
        let sign = |c: &Credentials| {
            sign_post(
                "sts.us-west-2.amazonaws.com",
                "/",
                "application/x-www-form-urlencoded; charset=utf-8",
                body,
                "us-west-2",
                "sts",
                c,
                at(1_704_164_645),
            )
        };
        let h = sign(&creds);
        assert_eq!(h[0], ("x-amz-date", "20240102T030405Z".to_owned()));
        assert_eq!(
            h.last().unwrap().1,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240102/us-west-2/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=32aa9520c4601282411bbd4e46a3f9e9f2ef45d344862e9e4b02f55af55ade44"
        );
        creds.session_token = Some("IQoJb3JpZ2luX2VjEXAMPLE/session+token=".into());
        let h = sign(&creds);
        assert_eq!(
            h[1],
            (
                "x-amz-security-token",
                "IQoJb3JpZ2luX2VjEXAMPLE/session+token=".to_owned()
            )
        );
        assert_eq!(
            h.last().unwrap().1,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240102/us-west-2/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature=665b4b045a9a1fe6d2b3e07198a077a833636c40e2907b44e5c164e2265b4457"
        );
    }

    /// KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN: the role is assumed (STS AssumeRole signed with the
    /// credentials found) and the token carries the role's credentials.
    #[tokio::test]
    async fn an_assumed_role_signs_the_token() {
        let ok = r#"<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIAROLE</AccessKeyId><SecretAccessKey>sk-r</SecretAccessKey><SessionToken>st-r</SessionToken><Expiration>2999-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>"#;
        let ep = crate::oauth::tests::endpoint(vec![(200, ok.into())]).await;
        let src = crate::oauth::TokenSource::new(crate::oauth::OauthSettings {
            method: crate::oauth::OauthMethod::AwsMskIam(MskIam {
                region: "eu-west-1".into(),
                credentials: CredentialSource::Static(Credentials {
                    access_key_id: "AKIABASE".into(),
                    secret_access_key: "sk-base".into(),
                    session_token: None,
                    expires: None,
                }),
                assume_role: Some(AssumeRole {
                    role_arn: "arn:aws:iam::123456789012:role/msk-client".into(),
                    session_name: "kafka-infer".into(),
                    sts_endpoint: ep.url.clone(),
                }),
            }),
            extensions: vec![],
        });
        let url = decoded(&src.token().await.unwrap());
        assert!(url.contains("X-Amz-Credential=ASIAROLE%2F"), "{url}");
        assert!(url.contains("&X-Amz-Security-Token=st-r&"), "{url}");
        let (head, body) = ep.seen.lock().unwrap()[0].clone();
        assert!(
            head.contains("AWS4-HMAC-SHA256 Credential=AKIABASE/")
                && head.contains("/eu-west-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="),
            "{head}"
        );
        assert_eq!(
            body,
            "Action=AssumeRole&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fmsk-client&RoleSessionName=kafka-infer"
        );
    }

    /// Tokens made by AWS's own signer, aws-msk-iam-sasl-signer-python 1.0.2 (script in
    /// docs/notes-msk-iam.md), equal ours byte for byte given its User-Agent value.
    #[test]
    fn msk_token_matches_aws_msk_iam_sasl_signer_python() {
        let mut creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            expires: None,
        };
        let t = at(1_704_164_645);
        let agent = "aws-msk-iam-sasl-signer-python/1.0.2";
        assert_eq!(
            msk_token_as("us-west-2", &creds, t, agent).expose(),
            "aHR0cHM6Ly9rYWZrYS51cy13ZXN0LTIuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI0MDEwMiUyRnVzLXdlc3QtMiUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI0MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9Njg4NzVmNzUwMDVkMGE3OGFlMmViNGFkOGUwYTQ2ZDFlYjFlZjA2YTZiMzRlMGJhZGUwNGFkN2U1ZjNjNDM1ZCZVc2VyLUFnZW50PWF3cy1tc2staWFtLXNhc2wtc2lnbmVyLXB5dGhvbiUyRjEuMC4y"
        );
        creds.session_token = Some("IQoJb3JpZ2luX2VjEXAMPLE/session+token=".into());
        assert_eq!(
            msk_token_as("us-west-2", &creds, t, agent).expose(),
            "aHR0cHM6Ly9rYWZrYS51cy13ZXN0LTIuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI0MDEwMiUyRnVzLXdlc3QtMiUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI0MDEwMlQwMzA0MDVaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1JUW9KYjNKcFoybHVYMlZqRVhBTVBMRSUyRnNlc3Npb24lMkJ0b2tlbiUzRCZYLUFtei1TaWduYXR1cmU9NTViNGQwNDUxMTQwNTRhYzkzZGY2NDQ0NjQyOWEzZjY2YWQ4ZGFkOGNhYzRlY2EwMmQyMWI4MzE2MjRjOWExYSZVc2VyLUFnZW50PWF3cy1tc2staWFtLXNhc2wtc2lnbmVyLXB5dGhvbiUyRjEuMC4y"
        );
    }

    #[test]
    fn xml_fields_and_times() {
        let x = "<R><Credentials><AccessKeyId>ASIA1</AccessKeyId><Expiration>2024-01-02T04:04:05Z</Expiration></Credentials></R>";
        assert_eq!(xml_field(x, "AccessKeyId"), Some("ASIA1"));
        assert_eq!(xml_field(x, "Nope"), None);
        assert_eq!(
            parse_time(xml_field(x, "Expiration").unwrap()),
            Some(at(1_704_168_245))
        );
    }

    fn decoded(token: &Secret) -> String {
        String::from_utf8(B64URL.decode(token.expose()).unwrap()).unwrap()
    }

    fn source(credentials: CredentialSource) -> crate::oauth::TokenSource {
        crate::oauth::TokenSource::new(crate::oauth::OauthSettings {
            method: crate::oauth::OauthMethod::AwsMskIam(MskIam {
                region: "eu-west-1".into(),
                credentials,
                assume_role: None,
            }),
            extensions: vec![],
        })
    }

    fn temp(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("kafka-io-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// EKS Pod Identity / ECS: GET the container credentials endpoint with the authorization
    /// token read from its file; the MSK token carries those credentials.
    #[tokio::test]
    async fn container_credentials_sign_the_token() {
        let ep = crate::oauth::tests::endpoint(vec![(
            200,
            r#"{"AccessKeyId":"ASIACONTAINER","SecretAccessKey":"sk-c","Token":"st-c","Expiration":"2999-01-01T00:00:00Z"}"#
                .into(),
        )])
        .await;
        let file = temp("pod-token", "pod-identity-token\n");
        let src = source(CredentialSource::Container {
            url: ep.url.clone(),
            auth_token: None,
            auth_token_file: Some(file.clone()),
        });
        let url = decoded(&src.token().await.unwrap());
        std::fs::remove_file(&file).unwrap();
        assert!(
            url.starts_with("https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIACONTAINER%2F"),
            "{url}"
        );
        assert!(
            url.contains("%2Feu-west-1%2Fkafka-cluster%2Faws4_request"),
            "{url}"
        );
        assert!(url.contains("&X-Amz-Expires=900&"), "{url}");
        assert!(url.contains("&X-Amz-Security-Token=st-c&"), "{url}");
        let (head, _) = ep.seen.lock().unwrap()[0].clone();
        assert!(head.starts_with("GET /oauth2/token HTTP/1.1"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: pod-identity-token"),
            "{head}"
        );
    }

    /// EKS IRSA: STS AssumeRoleWithWebIdentity with the token file's token; an STS refusal
    /// names the AWS settings and STS's message, not the web identity token.
    #[tokio::test]
    async fn web_identity_assumes_the_role_through_sts() {
        let ok = r#"<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAWEBID</AccessKeyId><SecretAccessKey>sk-w</SecretAccessKey><SessionToken>st-w</SessionToken><Expiration>2999-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"#;
        let ep = crate::oauth::tests::endpoint(vec![(200, ok.into())]).await;
        let file = temp("irsa-token", "eyJ.irsa-jwt.sig\n");
        let web = |url: &str| CredentialSource::WebIdentity {
            token_file: file.clone(),
            role_arn: "arn:aws:iam::123456789012:role/kafka-infer".into(),
            session_name: "kafka-infer".into(),
            sts_endpoint: url.to_owned(),
        };
        let url = decoded(&source(web(&ep.url)).token().await.unwrap());
        assert!(url.contains("X-Amz-Credential=ASIAWEBID%2F"), "{url}");
        assert!(url.contains("&X-Amz-Security-Token=st-w&"), "{url}");
        let (head, body) = ep.seen.lock().unwrap()[0].clone();
        assert!(head.starts_with("POST "), "{head}");
        assert_eq!(
            body,
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fkafka-infer&RoleSessionName=kafka-infer&WebIdentityToken=eyJ.irsa-jwt.sig"
        );
        let refused = crate::oauth::tests::endpoint(vec![(
            403,
            "<ErrorResponse><Error><Code>AccessDenied</Code><Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message></Error></ErrorResponse>".into(),
        )])
        .await;
        let e = source(web(&refused.url))
            .token()
            .await
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(
            e.starts_with("AWS credentials") && e.contains("403") && e.contains("Not authorized"),
            "{e}"
        );
        assert!(!e.contains("irsa-jwt"), "{e}");
    }

    /// Credentials that end in 10 s give a token refreshed after 8 s (80%), not 12 minutes.
    #[tokio::test]
    async fn a_token_lives_no_longer_than_its_credentials() {
        let soon = chrono::Utc::now() + chrono::Duration::seconds(10);
        let answer = format!(
            r#"{{"AccessKeyId":"ASIA1","SecretAccessKey":"sk","Token":"st","Expiration":"{}"}}"#,
            soon.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let ep = crate::oauth::tests::endpoint(vec![(200, answer)]).await;
        let src = source(CredentialSource::Container {
            url: ep.url.clone(),
            auth_token: Some("t".into()),
            auth_token_file: None,
        });
        src.token().await.unwrap();
        src.token().await.unwrap();
        assert_eq!(src.fetched().await, 1);
        let left = src.refresh_in().await.unwrap();
        assert!(left <= Duration::from_secs(8), "{left:?}");
    }

    #[test]
    fn the_credential_chain_and_region_from_settings() {
        let with = |pairs: &[(&str, &str)]| {
            let m: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            MskIam::from_lookup(&move |k: &str| m.get(k).cloned())
        };
        let m = with(&[
            ("AWS_REGION", "us-east-2"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "sk"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
        ])
        .unwrap();
        assert_eq!(m.region, "us-east-2");
        assert!(matches!(m.credentials, CredentialSource::Static(_)));
        assert_eq!(m.assume_role, None);
        let m = with(&[
            ("AWS_REGION", "us-east-2"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "sk"),
            (
                "KAFKA_SASL_OAUTHBEARER_AWS_ROLE_ARN",
                "arn:aws:iam::1:role/msk",
            ),
        ])
        .unwrap();
        assert_eq!(
            m.assume_role,
            Some(AssumeRole {
                role_arn: "arn:aws:iam::1:role/msk".into(),
                session_name: "kafka-infer".into(),
                sts_endpoint: "https://sts.us-east-2.amazonaws.com/".into(),
            })
        );
        let m = with(&[
            ("KAFKA_SASL_OAUTHBEARER_AWS_REGION", "eu-central-1"),
            ("AWS_REGION", "us-east-2"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ])
        .unwrap();
        assert_eq!(m.region, "eu-central-1");
        assert!(
            matches!(&m.credentials, CredentialSource::WebIdentity { sts_endpoint, .. } if sts_endpoint == "https://sts.eu-central-1.amazonaws.com/")
        );
        let m = with(&[
            ("AWS_DEFAULT_REGION", "ap-south-1"),
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token",
            ),
        ])
        .unwrap();
        assert!(matches!(m.credentials, CredentialSource::Container { .. }));
        let e = with(&[("AWS_ACCESS_KEY_ID", "AKID")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_SASL_OAUTHBEARER_AWS_REGION"), "{e}");
        let e = with(&[("AWS_REGION", "r")]).unwrap_err().to_string();
        assert!(e.contains("AWS_WEB_IDENTITY_TOKEN_FILE"), "{e}");
        let e = with(&[("AWS_REGION", "r"), ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("AWS_ROLE_ARN"), "{e}");
    }
}
