//! TLS client configuration from PEM material (strings or files): CA bundle, client certificate
//! chain, client key in PKCS#8, PKCS#1 or SEC1, optionally password-protected (PKCS#8
//! "ENCRYPTED PRIVATE KEY", or legacy OpenSSL "Proc-Type: 4,ENCRYPTED").
//! Always the `ring` provider: rskafka forces it, and two providers make rustls panic.

use std::sync::Arc;

use base64::Engine as _;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use zeroize::Zeroizing;

use crate::{
    error::TlsError,
    secret::Secret,
    settings::{PemSource, TlsSettings},
};

const CA: &str = "KAFKA_SSL_CA_CERT / KAFKA_SSL_CA_CERT_FILE";
const CERT: &str = "KAFKA_SSL_CLIENT_CERT / KAFKA_SSL_CLIENT_CERT_FILE";
const KEY: &str = "KAFKA_SSL_CLIENT_KEY / KAFKA_SSL_CLIENT_KEY_FILE";
const PASS: &str = "KAFKA_SSL_CLIENT_KEY_PASS";

fn err(setting: &'static str, why: impl Into<String>) -> TlsError {
    TlsError {
        setting,
        why: why.into(),
    }
}

/// The ring provider, shared by every config this crate builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM text; zeroed when dropped (it may be a private key).
fn read(source: &PemSource, setting: &'static str) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    match source {
        PemSource::Inline(s) => Ok(Zeroizing::new(s.expose().as_bytes().to_vec())),
        PemSource::File(p) => std::fs::read(p)
            .map(Zeroizing::new)
            .map_err(|e| err(setting, format!("cannot read {}: {e}", p.display()))),
    }
}

/// Parses every certificate of a PEM bundle; an empty or non-PEM value is an error.
pub fn parse_certs(
    pem: &[u8],
    setting: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(setting, format!("not a valid PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            setting,
            "no PEM certificate found (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// Parses a private key, decrypting it with `password` when it is encrypted.
pub fn parse_key(
    pem: &[u8],
    password: Option<&Secret>,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = std::str::from_utf8(pem).map_err(|_| err(KEY, "not PEM text"))?;
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        let password = password
            .ok_or_else(|| err(PASS, "the client key is encrypted but no password is set"))?;
        let (label, der) = pkcs8::der::pem::decode_vec(pem)
            .map_err(|e| err(KEY, format!("not a valid PEM key: {e}")))?;
        debug_assert_eq!(label, "ENCRYPTED PRIVATE KEY");
        let info = pkcs8::EncryptedPrivateKeyInfo::try_from(der.as_slice())
            .map_err(|e| err(KEY, format!("not a valid encrypted PKCS#8 key: {e}")))?;
        let doc = info.decrypt(password.expose().as_bytes()).map_err(|e| {
            err(
                PASS,
                format!("cannot decrypt the client key (wrong password?): {e}"),
            )
        })?;
        return Ok(PrivateKeyDer::Pkcs8(doc.as_bytes().to_vec().into()));
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        let password = password
            .ok_or_else(|| err(PASS, "the client key is encrypted but no password is set"))?;
        return legacy::decrypt(text, password.expose());
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        err(
            KEY,
            format!("no PKCS#8, PKCS#1 or SEC1 private key found in PEM: {e}"),
        )
    })
}

/// Builds the client configuration: roots from the CA (or webpki-roots), and a client
/// certificate when both certificate and key are set. The key must match the certificate.
pub fn client_config(s: &TlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &s.ca {
        Some(src) => {
            for cert in parse_certs(&read(src, CA)?, CA)? {
                roots
                    .add(cert)
                    .map_err(|e| err(CA, format!("unusable CA certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(CA, e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&s.client_cert, &s.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(err(KEY, "a client certificate is set but no key")),
        (None, Some(_)) => return Err(err(CERT, "a client key is set but no certificate")),
        (Some(c), Some(k)) => {
            let chain = parse_certs(&read(c, CERT)?, CERT)?;
            let key = parse_key(&read(k, KEY)?, s.key_password.as_ref())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| err(KEY, format!("the key does not fit the certificate: {e}")))?
        }
    };
    Ok(Arc::new(config))
}

/// OpenSSL's legacy "traditional" encrypted PEM (RFC 1421 headers, EVP_BytesToKey with MD5).
mod legacy {
    use super::*;
    use aes::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
    use md5::{Digest, Md5};

    pub(super) fn decrypt(text: &str, password: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
        let begin = text
            .lines()
            .position(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"))
            .ok_or_else(|| err(KEY, "no BEGIN ... PRIVATE KEY line"))?;
        let lines: Vec<&str> = text.lines().skip(begin).map(str::trim).collect();
        let kind = lines[0]
            .trim_start_matches("-----BEGIN ")
            .trim_end_matches("-----");
        let mut dek = None;
        let mut body = String::new();
        let mut in_headers = true;
        for line in &lines[1..] {
            if line.starts_with("-----END") {
                break;
            }
            if in_headers {
                if let Some(v) = line.strip_prefix("DEK-Info:") {
                    dek = Some(v.trim().to_owned());
                    continue;
                }
                if line.contains(':') {
                    continue;
                }
                in_headers = false;
            }
            body.push_str(line);
        }
        let dek = dek.ok_or_else(|| err(KEY, "encrypted key without a DEK-Info header"))?;
        let (cipher, iv_hex) = dek
            .split_once(',')
            .ok_or_else(|| err(KEY, "malformed DEK-Info header"))?;
        let iv = hex(iv_hex.trim()).ok_or_else(|| err(KEY, "malformed DEK-Info IV"))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|e| err(KEY, format!("bad base64 in key: {e}")))?;
        let key_len = match cipher {
            "AES-128-CBC" => 16,
            "AES-192-CBC" => 24,
            "AES-256-CBC" => 32,
            "DES-EDE3-CBC" => 24,
            "DES-CBC" => 8,
            other => return Err(err(KEY, format!("unsupported key cipher {other}"))),
        };
        if iv.len() < 8 {
            return Err(err(KEY, "DEK-Info IV too short"));
        }
        let key = bytes_to_key(password.as_bytes(), &iv[..8], key_len);
        let wrong = || err(PASS, "cannot decrypt the client key (wrong password?)");
        let plain = match cipher {
            "AES-128-CBC" => cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, &iv)
                .map_err(|_| wrong())?
                .decrypt_padded_vec_mut::<Pkcs7>(&data),
            "AES-192-CBC" => cbc::Decryptor::<aes::Aes192>::new_from_slices(&key, &iv)
                .map_err(|_| wrong())?
                .decrypt_padded_vec_mut::<Pkcs7>(&data),
            "AES-256-CBC" => cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, &iv)
                .map_err(|_| wrong())?
                .decrypt_padded_vec_mut::<Pkcs7>(&data),
            "DES-EDE3-CBC" => cbc::Decryptor::<des::TdesEde3>::new_from_slices(&key, &iv)
                .map_err(|_| wrong())?
                .decrypt_padded_vec_mut::<Pkcs7>(&data),
            _ => cbc::Decryptor::<des::Des>::new_from_slices(&key, &iv)
                .map_err(|_| wrong())?
                .decrypt_padded_vec_mut::<Pkcs7>(&data),
        }
        .map_err(|_| wrong())?;
        // A wrong password that happens to unpad cleanly leaves garbage: it is not a DER SEQUENCE.
        if plain.first() != Some(&0x30) {
            return Err(wrong());
        }
        Ok(match kind {
            "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(plain.into()),
            "EC PRIVATE KEY" => PrivateKeyDer::Sec1(plain.into()),
            _ => PrivateKeyDer::Pkcs8(plain.into()),
        })
    }

    /// EVP_BytesToKey(MD5, count 1): D_i = MD5(D_{i-1} || password || salt).
    fn bytes_to_key(password: &[u8], salt: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 16);
        let mut prev: Vec<u8> = Vec::new();
        while out.len() < len {
            let mut h = Md5::new();
            h.update(&prev);
            h.update(password);
            h.update(salt);
            prev = h.finalize().to_vec();
            out.extend_from_slice(&prev);
        }
        out.truncate(len);
        out
    }

    fn hex(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) {
            return None;
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    }
}
