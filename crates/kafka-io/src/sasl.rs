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
