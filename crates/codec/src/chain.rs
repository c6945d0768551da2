//! Chaining: one graph node's answer made into the next node's request, as Seldon's executor
//! does before each predict or transform call (`Chain`). The seldon protocol passes messages
//! unchanged; tensorflow turns `predictions` (or columnar `outputs`) into `instances`
//! (`inputs`) and a PredictResponse into a PredictRequest; v2 turns `outputs` into `inputs`
//! and a ModelInferResponse into a ModelInferRequest (its raw contents kept, which Seldon's
//! gRPC client drops).

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::{
    CodecError, Protocol,
    protocol::{TF_PREDICT_REQUEST, TF_PREDICT_RESPONSE, V2_INFER_REQUEST, V2_INFER_RESPONSE},
};

/// A JSON answer as the next node's request; None when it already is one (unchanged).
pub fn chain_json(protocol: Protocol, json: &[u8]) -> Result<Option<Bytes>, CodecError> {
    let (renames, what): (&[(&str, &str)], &str) = match protocol {
        Protocol::Seldon => return Ok(None),
        Protocol::Tensorflow => (
            &[("predictions", "instances"), ("outputs", "inputs")],
            "`instances`, `inputs`, `predictions` or `outputs`",
        ),
        Protocol::V2 => (&[("outputs", "inputs")], "`inputs` or `outputs`"),
    };
    let mut v: Value =
        serde_json::from_slice(json).map_err(|e| CodecError::MalformedJson(e.to_string()))?;
    let Some(o) = v.as_object_mut() else {
        return Err(wrong(
            protocol,
            format!("an answer to chain is not a JSON object ({what})"),
        ));
    };
    let is_request = match protocol {
        Protocol::Tensorflow => o.contains_key("instances") || o.contains_key("inputs"),
        _ => o.contains_key("inputs"),
    };
    if is_request {
        return Ok(None);
    }
    let Some((from, to)) = renames.iter().find(|(from, _)| o.contains_key(*from)) else {
        return Err(wrong(
            protocol,
            format!("the previous node's answer has none of {what} to pass on"),
        ));
    };
    let t = o.remove(*from).expect("present");
    o.insert((*to).to_owned(), t);
    // The next node is named by its own path (or hints), not by the previous answer.
    o.remove("model_name");
    o.remove("model_version");
    Ok(Some(Bytes::from(
        serde_json::to_vec(&v).expect("serializes"),
    )))
}

/// A protobuf answer as the next node's request: (request message, bytes); None when the
/// message is not a response of the protocol (passed on unchanged).
pub fn chain_proto(
    protocol: Protocol,
    message: &str,
    bytes: &[u8],
    next_model: &str,
) -> Result<Option<(&'static str, Bytes)>, CodecError> {
    let mut out = BytesMut::with_capacity(bytes.len() + next_model.len() + 8);
    match (protocol, message) {
        (Protocol::V2, V2_INFER_RESPONSE) => {
            // ModelInferResponse {model_name 1, model_version 2, id 3, parameters 4,
            // outputs 5, raw_output_contents 6} -> ModelInferRequest {model_name 1, id 3,
            // parameters 4, inputs 5, raw_input_contents 7}; output and input tensors have
            // the same fields.
            put_len_field(&mut out, 1, next_model.as_bytes());
            for f in fields(bytes, message)? {
                match f.number {
                    1 | 2 => {}
                    6 => put_len_field(&mut out, 7, f.payload),
                    _ => out.extend_from_slice(f.raw),
                }
            }
            Ok(Some((V2_INFER_REQUEST, out.freeze())))
        }
        (Protocol::Tensorflow, TF_PREDICT_RESPONSE) => {
            // PredictResponse {outputs 1, model_spec 2} -> PredictRequest {model_spec 1
            // (name 1), inputs 2}.
            let mut spec = BytesMut::new();
            put_len_field(&mut spec, 1, next_model.as_bytes());
            put_len_field(&mut out, 1, &spec);
            for f in fields(bytes, message)? {
                if f.number == 1 {
                    put_len_field(&mut out, 2, f.payload);
                }
            }
            Ok(Some((TF_PREDICT_REQUEST, out.freeze())))
        }
        _ => Ok(None),
    }
}

/// A request (ModelInferRequest, PredictRequest) sent to the graph node `model`: the model
/// name it carries replaced by `model` (`keep_set`: only filled in where it is empty). None
/// when nothing changes (other messages, or the name is already right).
pub fn name_model(
    message: &str,
    bytes: &[u8],
    model: &str,
    keep_set: bool,
) -> Result<Option<Bytes>, CodecError> {
    // (the field holding the name, and the field of the name inside it for TF's ModelSpec)
    let tf = match message {
        V2_INFER_REQUEST => false,
        TF_PREDICT_REQUEST => true,
        _ => return Ok(None),
    };
    let fs = fields(bytes, message)?;
    // The current name (the last occurrence wins, as protobuf merges).
    let mut current: Option<&[u8]> = None;
    let mut spec_rest: Vec<&[u8]> = Vec::new();
    for f in fs.iter().filter(|f| f.number == 1) {
        if tf {
            for sf in fields(f.payload, "tensorflow.serving.ModelSpec")? {
                if sf.number == 1 {
                    current = Some(sf.payload);
                } else {
                    spec_rest.push(sf.raw);
                }
            }
        } else {
            current = Some(f.payload);
        }
    }
    let current = current.unwrap_or_default();
    if current == model.as_bytes() || (keep_set && !current.is_empty()) {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(bytes.len() + model.len() + 4);
    if tf {
        let mut spec = BytesMut::new();
        put_len_field(&mut spec, 1, model.as_bytes());
        for r in spec_rest {
            spec.extend_from_slice(r);
        }
        put_len_field(&mut out, 1, &spec);
    } else {
        put_len_field(&mut out, 1, model.as_bytes());
    }
    for f in fs.iter().filter(|f| f.number != 1) {
        out.extend_from_slice(f.raw);
    }
    Ok(Some(out.freeze()))
}

fn wrong(protocol: Protocol, why: String) -> CodecError {
    CodecError::WrongProtocol { protocol, why }
}

struct Field<'a> {
    number: u64,
    /// The whole field, tag included.
    raw: &'a [u8],
    /// A length-delimited field's contents (empty for other wire types).
    payload: &'a [u8],
}

/// The top-level fields of a protobuf message, without decoding their contents.
fn fields<'a>(mut b: &'a [u8], message: &str) -> Result<Vec<Field<'a>>, CodecError> {
    let bad = |why: &str| CodecError::BadProtobuf {
        message: message.to_owned(),
        why: why.to_owned(),
    };
    let mut out = Vec::new();
    while !b.is_empty() {
        let start = b;
        let tag = varint(&mut b).ok_or_else(|| bad("truncated tag"))?;
        let (number, wire) = (tag >> 3, tag & 7);
        if number == 0 {
            return Err(bad("field number 0"));
        }
        let mut payload: &[u8] = &[];
        match wire {
            0 => {
                varint(&mut b).ok_or_else(|| bad("truncated varint"))?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                b = b.get(n..).ok_or_else(|| bad("truncated fixed field"))?;
            }
            2 => {
                let n = varint(&mut b).ok_or_else(|| bad("truncated length"))?;
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| *n <= b.len())
                    .ok_or_else(|| bad("length past the end"))?;
                payload = &b[..n];
                b = &b[n..];
            }
            _ => return Err(bad("unsupported wire type")),
        }
        out.push(Field {
            number,
            raw: &start[..start.len() - b.len()],
            payload,
        });
    }
    Ok(out)
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&x, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(x & 0x7f) << (7 * i);
        if x < 0x80 {
            return Some(v);
        }
    }
    None
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.extend_from_slice(&[(v as u8) | 0x80]);
        v >>= 7;
    }
    out.extend_from_slice(&[v as u8]);
}

/// A `seldon.protos.SeldonMessageList` of encoded SeldonMessages (field 1, repeated).
pub fn seldon_message_list<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut out = BytesMut::new();
    for m in messages {
        put_len_field(&mut out, 1, m);
    }
    out.freeze()
}

/// A length-delimited field.
pub(crate) fn put_len_field(out: &mut BytesMut, number: u64, payload: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hints, Pool, Transcoder};

    fn t() -> Transcoder {
        Transcoder::new(Pool::builtin())
    }

    #[test]
    fn json_answers_become_requests() {
        let v2 = br#"{"model_name":"a","id":"r1","outputs":[{"name":"o","datatype":"FP32","shape":[1],"data":[1.5]}]}"#;
        let out = chain_json(Protocol::V2, v2).unwrap().unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["inputs"][0]["data"][0], 1.5);
        assert_eq!(v["id"], "r1");
        assert!(v.get("outputs").is_none() && v.get("model_name").is_none());
        assert!(
            chain_json(Protocol::V2, br#"{"inputs":[]}"#)
                .unwrap()
                .is_none()
        );
        let tf = chain_json(Protocol::Tensorflow, br#"{"predictions":[[1,2]]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(&tf[..], br#"{"instances":[[1,2]]}"#);
        assert!(chain_json(Protocol::Seldon, b"not json").unwrap().is_none());
        for bad in [&b"[1]"[..], b"{\"x\":1}", b"nope"] {
            assert!(chain_json(Protocol::V2, bad).is_err());
        }
    }

    #[test]
    fn v2_response_becomes_request_with_raw_contents() {
        let t = t();
        let resp = serde_json::json!({
            "model_name": "first", "model_version": "3", "id": "r1",
            "outputs": [{"name": "o", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]
        });
        let h = Hints::default();
        let bytes = t
            .json_to_proto(
                Protocol::V2,
                V2_INFER_RESPONSE,
                &serde_json::to_vec(&resp).unwrap(),
                &h,
            )
            .unwrap();
        // The same tensor as raw contents (as servers answer over gRPC).
        let mut with_raw = BytesMut::from(&bytes[..]);
        put_len_field(&mut with_raw, 6, &[1, 2, 3, 4]);
        let (name, req) = chain_proto(Protocol::V2, V2_INFER_RESPONSE, &with_raw, "second")
            .unwrap()
            .unwrap();
        assert_eq!(name, V2_INFER_REQUEST);
        let f = fields(&req, name).unwrap();
        assert_eq!(f[0].number, 1);
        assert_eq!(f[0].payload, b"second");
        assert!(f.iter().all(|f| f.number != 2));
        assert_eq!(f.last().unwrap().number, 7);
        assert_eq!(f.last().unwrap().payload, [1, 2, 3, 4]);
        let json = t
            .proto_to_json(Protocol::V2, V2_INFER_REQUEST, &bytes_of(&req, 7), &h)
            .unwrap();
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["model_name"], "second");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["inputs"][0]["name"], "o");
        assert_eq!(v["inputs"][0]["data"], serde_json::json!([1.0, 2.0]));
        // Requests and other messages pass unchanged.
        assert!(
            chain_proto(Protocol::V2, V2_INFER_REQUEST, &req, "x")
                .unwrap()
                .is_none()
        );
        assert!(chain_proto(Protocol::V2, V2_INFER_RESPONSE, &[0xff], "x").is_err());
    }

    /// `b` without its fields numbered `drop`.
    fn bytes_of(b: &[u8], drop: u64) -> Vec<u8> {
        fields(b, "m")
            .unwrap()
            .iter()
            .filter(|f| f.number != drop)
            .flat_map(|f| f.raw.to_vec())
            .collect()
    }

    #[test]
    fn requests_are_named_for_their_node() {
        let t = t();
        let h = Hints::default();
        let v2 = |name: &str| {
            t.json_to_proto(
                Protocol::V2,
                V2_INFER_REQUEST,
                serde_json::json!({"model_name": name, "id": "r",
                    "inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
                .to_string()
                .as_bytes(),
                &h,
            )
            .unwrap()
        };
        let named = name_model(V2_INFER_REQUEST, &v2("other"), "node", false)
            .unwrap()
            .unwrap();
        let v = t.to_proto_json(V2_INFER_REQUEST, &named, false).unwrap();
        assert_eq!(v["model_name"], "node");
        assert_eq!(v["inputs"][0]["name"], "i");
        assert!(
            name_model(V2_INFER_REQUEST, &v2("other"), "node", true)
                .unwrap()
                .is_none()
        );
        assert!(
            name_model(V2_INFER_REQUEST, &v2("node"), "node", false)
                .unwrap()
                .is_none()
        );
        let tf = t
            .from_proto_json(
                TF_PREDICT_REQUEST,
                serde_json::json!({"modelSpec": {"name": "other", "signatureName": "sig"},
                    "inputs": {"x": {"dtype": "DT_FLOAT", "floatVal": [1.0]}}}),
            )
            .unwrap();
        let named = name_model(TF_PREDICT_REQUEST, &tf, "node", false)
            .unwrap()
            .unwrap();
        let v = t.to_proto_json(TF_PREDICT_REQUEST, &named, true).unwrap();
        assert_eq!(v["modelSpec"]["name"], "node");
        assert_eq!(v["modelSpec"]["signatureName"], "sig");
        assert_eq!(v["inputs"]["x"]["floatVal"][0], 1.0);
        // An empty name is filled in either way.
        let empty = t
            .from_proto_json(TF_PREDICT_REQUEST, serde_json::json!({"inputs": {}}))
            .unwrap();
        let named = name_model(TF_PREDICT_REQUEST, &empty, "node", true)
            .unwrap()
            .unwrap();
        let v = t.to_proto_json(TF_PREDICT_REQUEST, &named, true).unwrap();
        assert_eq!(v["modelSpec"]["name"], "node");
    }

    #[test]
    fn tf_response_becomes_request() {
        let t = t();
        let h = Hints::default();
        let resp = br#"{"outputs":{"scores":{"dtype":"DT_FLOAT","tensorShape":{"dim":[{"size":"1"}]},"floatVal":[0.5]}},"modelSpec":{"name":"first"}}"#;
        let bytes = t
            .from_proto_json(TF_PREDICT_RESPONSE, serde_json::from_slice(resp).unwrap())
            .unwrap();
        let (name, req) = chain_proto(Protocol::Tensorflow, TF_PREDICT_RESPONSE, &bytes, "second")
            .unwrap()
            .unwrap();
        assert_eq!(name, TF_PREDICT_REQUEST);
        let v = t.to_proto_json(name, &req, true).unwrap();
        assert_eq!(v["modelSpec"]["name"], "second");
        assert_eq!(v["inputs"]["scores"]["floatVal"][0], 0.5);
        let _ = h;
    }
}
