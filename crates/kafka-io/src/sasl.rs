//! SASL: PLAIN and SCRAM-SHA-256/512 (rsasl does the mechanism's work) on our own connections,
//! and the same credentials handed to rskafka for its data connections.

use std::io::Cursor;

use crate::{
    conn::BrokerConn,
    error::{Error, Result},
    settings::{SaslMechanism, SaslSettings},
};

/// The same credentials for rskafka's connections.
pub fn rskafka_config(s: &SaslSettings) -> rskafka::client::SaslConfig {
    let c = rskafka::client::Credentials::new(s.username.clone(), s.password.expose().to_owned());
    match s.mechanism {
        SaslMechanism::Plain => rskafka::client::SaslConfig::Plain(c),
        SaslMechanism::ScramSha256 => rskafka::client::SaslConfig::ScramSha256(c),
        SaslMechanism::ScramSha512 => rskafka::client::SaslConfig::ScramSha512(c),
    }
}

/// Runs the SASL exchange over `conn` (rsasl does the mechanism's work).
pub(crate) async fn authenticate(conn: &mut BrokerConn, s: &SaslSettings) -> Result<()> {
    use rsasl::prelude::{Mechname, SASLClient, SASLConfig};
    let mech = s.mechanism.name();
    let fail = |why: String| Error::Sasl {
        mechanism: mech,
        why,
    };
    conn.sasl_handshake(mech).await?;
    let config = SASLConfig::with_credentials(None, s.username.clone(), s.password.expose().into())
        .map_err(|e| fail(e.to_string()))?;
    let client = SASLClient::new(config);
    let name = Mechname::parse(mech.as_bytes()).map_err(|e| fail(e.to_string()))?;
    let mut session = client
        .start_suggested(&[name])
        .map_err(|e| fail(e.to_string()))?;
    let mut received: Option<Vec<u8>> = None;
    for _ in 0..8 {
        let mut out = Cursor::new(Vec::new());
        let state = session
            .step(received.as_deref(), &mut out)
            .map_err(|e| fail(e.to_string()))?;
        if state.has_sent_message() {
            received = Some(conn.sasl_authenticate(mech, out.into_inner()).await?);
        }
        if state.is_finished() {
            return Ok(());
        }
    }
    Err(fail("exchange did not finish".into()))
}

#[cfg(test)]
mod tests {
    //! Our SASL client against a mock broker whose SCRAM server side is written here from
    //! RFC 5802 / RFC 7677 (independent of rsasl), over real Kafka framing.

    use std::sync::Arc;

    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    use bytes::{Buf, BufMut, Bytes, BytesMut};
    use hmac::{Mac, digest::KeyInit};
    use kafka_protocol::{
        messages::{
            ApiKey, ApiVersionsResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
            SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
            api_versions_response::ApiVersion,
        },
        protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use crate::{
        conn::Connector,
        settings::{ConnectionSettings, SaslMechanism, SaslSettings, SecurityProtocol},
    };

    const USER: &str = "alice";
    const PASSWORD: &str = "wonder-land";

    fn hmac(mech: SaslMechanism, key: &[u8], data: &[u8]) -> Vec<u8> {
        match mech {
            SaslMechanism::ScramSha512 => {
                let mut m = <hmac::Hmac<sha2::Sha512> as KeyInit>::new_from_slice(key).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            _ => {
                let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(mech: SaslMechanism, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match mech {
            SaslMechanism::ScramSha512 => sha2::Sha512::digest(data).to_vec(),
            _ => sha2::Sha256::digest(data).to_vec(),
        }
    }

    fn salted(mech: SaslMechanism, password: &str, salt: &[u8], i: u32) -> Vec<u8> {
        match mech {
            SaslMechanism::ScramSha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, i, &mut out);
                out.to_vec()
            }
            _ => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password.as_bytes(), salt, i, &mut out);
                out.to_vec()
            }
        }
    }

    /// The server half of one SCRAM exchange (RFC 5802 section 3).
    struct ScramServer {
        mech: SaslMechanism,
        salt: Vec<u8>,
        iterations: u32,
        client_first_bare: String,
        server_first: String,
    }

    impl ScramServer {
        fn first(&mut self, msg: &str) -> Result<String, String> {
            let bare = msg.strip_prefix("n,,").ok_or("bad gs2 header")?;
            let nonce = bare
                .split(',')
                .find_map(|a| a.strip_prefix("r="))
                .ok_or("no nonce")?;
            let user = bare
                .split(',')
                .find_map(|a| a.strip_prefix("n="))
                .ok_or("no user")?;
            if user != USER {
                return Err(format!("unknown user {user}"));
            }
            self.client_first_bare = bare.to_owned();
            self.server_first = format!(
                "r={nonce}srvNonce42,s={},i={}",
                B64.encode(&self.salt),
                self.iterations
            );
            Ok(self.server_first.clone())
        }

        fn last(&mut self, msg: &str) -> Result<String, String> {
            let (without_proof, proof) = msg.rsplit_once(",p=").ok_or("no proof")?;
            let proof = B64.decode(proof).map_err(|e| e.to_string())?;
            let salted = salted(self.mech, PASSWORD, &self.salt, self.iterations);
            let client_key = hmac(self.mech, &salted, b"Client Key");
            let stored_key = hash(self.mech, &client_key);
            let auth = format!(
                "{},{},{}",
                self.client_first_bare, self.server_first, without_proof
            );
            let sig = hmac(self.mech, &stored_key, auth.as_bytes());
            let recovered: Vec<u8> = proof.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
            if hash(self.mech, &recovered) != stored_key {
                return Err("Authentication failed during authentication due to invalid credentials with SASL mechanism".into());
            }
            let server_key = hmac(self.mech, &salted, b"Server Key");
            Ok(format!(
                "v={}",
                B64.encode(hmac(self.mech, &server_key, auth.as_bytes()))
            ))
        }
    }

    async fn read_frame(s: &mut tokio::net::TcpStream) -> Option<Bytes> {
        let n = s.read_i32().await.ok()?;
        let mut buf = vec![0; n as usize];
        s.read_exact(&mut buf).await.ok()?;
        Some(Bytes::from(buf))
    }

    async fn reply<R: Encodable + HeaderVersion>(
        s: &mut tokio::net::TcpStream,
        correlation: i32,
        resp: R,
        version: i16,
    ) {
        let mut b = BytesMut::new();
        b.put_i32(0);
        ResponseHeader::default()
            .with_correlation_id(correlation)
            .encode(&mut b, R::header_version(version))
            .unwrap();
        resp.encode(&mut b, version).unwrap();
        let n = (b.len() - 4) as i32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        s.write_all(&b).await.unwrap();
    }

    /// A one-connection broker that speaks ApiVersions, SaslHandshake and SaslAuthenticate.
    async fn mock_broker(mech: SaslMechanism) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut scram = ScramServer {
                mech,
                salt: b"pinch of salt".to_vec(),
                iterations: 4096,
                client_first_bare: String::new(),
                server_first: String::new(),
            };
            let mut step = 0;
            while let Some(mut frame) = read_frame(&mut s).await {
                let key = ApiKey::try_from(frame.clone().get_i16()).unwrap();
                let version = frame.clone().slice(2..).get_i16();
                let h =
                    RequestHeader::decode(&mut frame, key.request_header_version(version)).unwrap();
                let c = h.correlation_id;
                match key {
                    ApiKey::ApiVersions => {
                        let keys = [(18, 0, 3), (17, 0, 1), (36, 0, 2)]
                            .map(|(k, lo, hi)| {
                                ApiVersion::default()
                                    .with_api_key(k)
                                    .with_min_version(lo)
                                    .with_max_version(hi)
                            })
                            .to_vec();
                        reply(
                            &mut s,
                            c,
                            ApiVersionsResponse::default().with_api_keys(keys),
                            version,
                        )
                        .await;
                    }
                    ApiKey::SaslHandshake => {
                        let req = SaslHandshakeRequest::decode(&mut frame, version).unwrap();
                        let ok = req.mechanism.as_str() == mech.name();
                        let resp = SaslHandshakeResponse::default()
                            .with_error_code(if ok { 0 } else { 33 })
                            .with_mechanisms(vec![StrBytes::from_static_str(mech.name())]);
                        reply(&mut s, c, resp, version).await;
                    }
                    ApiKey::SaslAuthenticate => {
                        let req = SaslAuthenticateRequest::decode(&mut frame, version).unwrap();
                        let msg = String::from_utf8(req.auth_bytes.to_vec()).unwrap();
                        let out = match mech {
                            SaslMechanism::Plain => {
                                if msg == format!("\0{USER}\0{PASSWORD}") {
                                    Ok(String::new())
                                } else {
                                    Err("Invalid username or password".to_string())
                                }
                            }
                            _ if step == 0 => scram.first(&msg),
                            _ => scram.last(&msg),
                        };
                        step += 1;
                        let resp = match out {
                            Ok(o) => {
                                SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(o))
                            }
                            Err(e) => SaslAuthenticateResponse::default()
                                .with_error_code(58)
                                .with_error_message(Some(StrBytes::from_string(e))),
                        };
                        reply(&mut s, c, resp, version).await;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        port
    }

    fn settings(port: u16, mech: SaslMechanism, password: &str) -> Arc<ConnectionSettings> {
        let mut s = ConnectionSettings::plaintext(&format!("127.0.0.1:{port}")).unwrap();
        s.security = SecurityProtocol::SaslPlaintext;
        s.sasl = Some(SaslSettings {
            mechanism: mech,
            username: USER.into(),
            password: password.into(),
        });
        Arc::new(s)
    }

    #[tokio::test]
    async fn scram_and_plain_authenticate_against_an_rfc_server() {
        for mech in [
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::Plain,
        ] {
            let port = mock_broker(mech).await;
            let c = Connector::new(settings(port, mech, PASSWORD)).unwrap();
            c.connect_any()
                .await
                .unwrap_or_else(|e| panic!("{mech:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn wrong_password_is_a_clear_error_without_the_password() {
        for mech in [
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::Plain,
        ] {
            let port = mock_broker(mech).await;
            let c = Connector::new(settings(port, mech, "not-it")).unwrap();
            let e = c.connect_any().await.err().expect("must fail").to_string();
            assert!(
                e.contains(mech.name()) && e.contains("authentication failed"),
                "{e}"
            );
            assert!(!e.contains("not-it"), "{e}");
        }
    }

    #[tokio::test]
    async fn mechanism_the_broker_lacks_is_named() {
        let port = mock_broker(SaslMechanism::ScramSha512).await;
        let c = Connector::new(settings(port, SaslMechanism::ScramSha256, PASSWORD)).unwrap();
        let e = c.connect_any().await.err().expect("must fail").to_string();
        assert!(
            e.contains("SCRAM-SHA-256") && e.contains("SCRAM-SHA-512"),
            "{e}"
        );
    }
}
