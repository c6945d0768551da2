//! What a record's value is: protobuf of the message its `proto-name` header names, or JSON.

use bytes::Bytes;
use prost_reflect::{DynamicMessage, MessageDescriptor};

use crate::{error::CodecError, pool::Pool};

pub const PROTO_NAME: &str = "proto-name";
pub const CONTENT_TYPE: &str = "content-type";

#[derive(Clone, Debug)]
pub enum Payload {
    /// A JSON document (already checked to parse).
    Json(Bytes),
    /// Protobuf bytes of `message` (already checked to decode).
    Proto {
        message: MessageDescriptor,
        bytes: Bytes,
    },
}

impl Payload {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Payload::Json(b) | Payload::Proto { bytes: b, .. } => b,
        }
    }

    pub fn message_name(&self) -> Option<&str> {
        match self {
            Payload::Json(_) => None,
            Payload::Proto { message, .. } => Some(message.full_name()),
        }
    }
}

fn header<'a>(headers: &'a [(String, Bytes)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

/// Decides and checks the payload of a record value.
///
/// - `proto-name: <message>`: protobuf of that message; an unknown name or bytes that do not
///   decode are errors.
/// - else a `content-type` naming protobuf without `proto-name` is an error (we cannot know the
///   message); anything else is JSON and must parse.
pub fn detect(
    pool: &Pool,
    value: Bytes,
    headers: &[(String, Bytes)],
) -> Result<Payload, CodecError> {
    if let Some(name) = header(headers, PROTO_NAME) {
        let unknown = || {
            CodecError::UnknownMessage(crate::text::printable(
                &String::from_utf8_lossy(name),
                crate::text::MAX_SUPPLIED,
            ))
        };
        let name = std::str::from_utf8(name).map_err(|_| unknown())?.trim();
        let message = pool.message(name)?;
        decode(&message, &value)?;
        return Ok(Payload::Proto {
            message,
            bytes: value,
        });
    }
    if let Some(ct) = header(headers, CONTENT_TYPE) {
        let ct = crate::text::printable(
            &String::from_utf8_lossy(ct).to_ascii_lowercase(),
            crate::text::MAX_SUPPLIED,
        );
        if ct.contains("protobuf") || ct.contains("grpc") || ct.contains("octet-stream") {
            return Err(CodecError::UnknownMessage(format!(
                "(none: content-type is `{ct}` but there is no proto-name header)"
            )));
        }
    }
    if value.iter().all(u8::is_ascii_whitespace) {
        return Err(CodecError::Empty);
    }
    check_json(&value)?;
    Ok(Payload::Json(value))
}

/// Parses without building a tree.
pub fn check_json(value: &[u8]) -> Result<(), CodecError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(value)
        .map(|_| ())
        .map_err(|e| CodecError::MalformedJson(e.to_string()))
}

pub fn decode(message: &MessageDescriptor, bytes: &[u8]) -> Result<DynamicMessage, CodecError> {
    DynamicMessage::decode(message.clone(), bytes).map_err(|e| CodecError::BadProtobuf {
        message: message.full_name().to_owned(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str, v: &str) -> Vec<(String, Bytes)> {
        vec![(k.to_owned(), Bytes::from(v.to_owned()))]
    }

    #[test]
    fn json_proto_and_errors() {
        let pool = Pool::builtin();
        let p = detect(&pool, Bytes::from_static(br#"{"instances":[1]}"#), &[]).unwrap();
        assert!(matches!(p, Payload::Json(_)));

        // An empty protobuf message is valid (all fields default).
        let p = detect(
            &pool,
            Bytes::new(),
            &h("proto-name", "inference.ModelInferRequest"),
        )
        .unwrap();
        assert_eq!(p.message_name(), Some("inference.ModelInferRequest"));

        let e = detect(&pool, Bytes::new(), &h("proto-name", "no.Such")).unwrap_err();
        assert_eq!(e.kind(), "unknown-proto-name");
        assert!(e.to_string().contains("no.Such"));
        // A record's proto-name reaches logs and error records escaped and cut.
        let forged = format!("no.Such\nWARN forged{}", "x".repeat(400));
        let e = detect(&pool, Bytes::new(), &h("proto-name", &forged)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("no.Such\\nWARN forged"), "{text}");
        assert!(
            !text.contains('\n') && text.contains("more chars cut]"),
            "{text}"
        );

        let e = detect(
            &pool,
            Bytes::from_static(&[0x0a, 0xff, 0x01]),
            &h("Proto-Name", "inference.ModelInferRequest"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), "bad-protobuf");

        let e = detect(&pool, Bytes::from_static(b"{\"a\":"), &[]).unwrap_err();
        assert_eq!(e.kind(), "malformed-json");
        let e = detect(
            &pool,
            Bytes::from_static(b"x"),
            &h("content-type", "application/x-protobuf"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), "unknown-proto-name");
        assert_eq!(
            detect(&pool, Bytes::from_static(b"  "), &[])
                .unwrap_err()
                .kind(),
            "empty"
        );
    }
}
