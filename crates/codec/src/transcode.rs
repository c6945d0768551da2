//! Between each protocol's REST JSON and its protobuf messages, both ways, for requests and
//! responses. Built on proto3 JSON (prost-reflect) plus the protocol's own REST shapes:
//! Seldon's REST JSON is proto3 JSON of SeldonMessage; v2 and TensorFlow reshape tensors.

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions};
use serde_json::{Map, Value, json};

use crate::{
    error::CodecError,
    payload::decode,
    pool::Pool,
    protocol::Protocol,
    tensor::{
        Budget, Limits, check_tensor, decode_raw, f16_to_f32, flatten, nest, num_f64, raw_count,
        shape_of,
    },
};

fn err(why: impl Into<String>) -> CodecError {
    CodecError::Transcode(why.into())
}

fn wrong(protocol: Protocol, why: impl Into<String>) -> CodecError {
    CodecError::WrongProtocol {
        protocol,
        why: why.into(),
    }
}

/// What transcoding needs beyond the bytes.
#[derive(Clone, Debug, Default)]
pub struct Hints {
    /// Model name for v2 `model_name` / TF `model_spec.name` when the JSON has none.
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    /// TF: the input name for unnamed `instances` / `inputs` (a signature's single input).
    pub tf_input_name: Option<String>,
    /// TF: answer in row format (`predictions`) rather than columnar (`outputs`).
    pub tf_row_format: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Transcoder {
    pub pool: Pool,
    /// Checked for every tensor before it is expanded (see [`Limits`]).
    pub limits: Limits,
}

impl Transcoder {
    /// A transcoder with the default [`Limits`].
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            limits: Limits::default(),
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The protocol's REST JSON -> protobuf `message` (a request or a response message).
    pub fn json_to_proto(
        &self,
        protocol: Protocol,
        message: &str,
        json: &[u8],
        hints: &Hints,
    ) -> Result<Bytes, CodecError> {
        let v: Value =
            serde_json::from_slice(json).map_err(|e| CodecError::MalformedJson(e.to_string()))?;
        if !v.is_object() {
            return Err(wrong(protocol, "the body is not a JSON object"));
        }
        let budget = &mut Budget::new(&self.limits);
        let proto_json = match (protocol, message) {
            (Protocol::Seldon, _) => {
                seldon_check(message, &v, budget)?;
                v
            }
            (Protocol::V2, "inference.ModelInferRequest") => {
                v2_rest_to_proto(v, true, hints, budget)?
            }
            (Protocol::V2, "inference.ModelInferResponse") => {
                v2_rest_to_proto(v, false, hints, budget)?
            }
            (Protocol::Tensorflow, "tensorflow.serving.PredictRequest") => {
                tf_request_to_proto(v, hints, budget)?
            }
            (Protocol::Tensorflow, "tensorflow.serving.PredictResponse") => {
                tf_response_to_proto(v, budget)?
            }
            (p, m) => {
                return Err(err(format!(
                    "no JSON form of `{m}` in the {p} protocol is supported"
                )));
            }
        };
        self.from_proto_json(message, proto_json)
    }

    /// Protobuf `message` -> the protocol's REST JSON.
    pub fn proto_to_json(
        &self,
        protocol: Protocol,
        message: &str,
        bytes: &[u8],
        hints: &Hints,
    ) -> Result<Bytes, CodecError> {
        let camel = protocol == Protocol::Seldon;
        let v = self.to_proto_json(message, bytes, camel)?;
        let budget = &mut Budget::new(&self.limits);
        let rest = match (protocol, message) {
            (Protocol::Seldon, _) => {
                seldon_check(message, &v, budget)?;
                v
            }
            (Protocol::V2, "inference.ModelInferRequest") => v2_proto_to_rest(v, true, budget)?,
            (Protocol::V2, "inference.ModelInferResponse") => v2_proto_to_rest(v, false, budget)?,
            (Protocol::Tensorflow, "tensorflow.serving.PredictRequest") => {
                tf_request_to_rest(v, budget)?
            }
            (Protocol::Tensorflow, "tensorflow.serving.PredictResponse") => {
                tf_response_to_rest(v, hints, budget)?
            }
            (p, m) => {
                return Err(err(format!(
                    "no JSON form of `{m}` in the {p} protocol is supported"
                )));
            }
        };
        Ok(Bytes::from(
            serde_json::to_vec(&rest).expect("JSON values serialize"),
        ))
    }

    /// proto3 JSON (as prost-reflect reads it) -> protobuf bytes. Unknown fields are ignored.
    pub fn from_proto_json(&self, message: &str, v: Value) -> Result<Bytes, CodecError> {
        let desc = self.pool.message(message)?;
        let msg = DynamicMessage::deserialize_with_options(
            desc,
            v,
            &DeserializeOptions::new().deny_unknown_fields(false),
        )
        .map_err(|e| err(format!("JSON does not fit `{message}`: {e}")))?;
        Ok(Bytes::from(msg.encode_to_vec()))
    }

    /// Protobuf bytes -> proto3 JSON (64-bit integers as numbers).
    pub fn to_proto_json(
        &self,
        message: &str,
        bytes: &[u8],
        camel_case: bool,
    ) -> Result<Value, CodecError> {
        let desc = self.pool.message(message)?;
        let msg = decode(&desc, bytes)?;
        let opts = SerializeOptions::new()
            .stringify_64_bit_integers(false)
            .use_proto_field_name(!camel_case);
        msg.serialize_with_options(serde_json::value::Serializer, &opts)
            .map_err(|e| err(e.to_string()))
    }
}

// ---------------------------------------------------------------- Open Inference Protocol (v2)

/// The InferTensorContents field for a v2 datatype.
fn v2_contents_field(datatype: &str) -> Result<&'static str, CodecError> {
    Ok(match datatype {
        "BOOL" => "bool_contents",
        "INT8" | "INT16" | "INT32" => "int_contents",
        "INT64" => "int64_contents",
        "UINT8" | "UINT16" | "UINT32" => "uint_contents",
        "UINT64" => "uint64_contents",
        "FP32" => "fp32_contents",
        "FP64" => "fp64_contents",
        "BYTES" => "bytes_contents",
        "FP16" | "BF16" => {
            return Err(err(format!(
                "{datatype} has no typed contents field in protobuf: send it as protobuf with raw contents"
            )));
        }
        other => return Err(err(format!("unknown v2 datatype `{other}`"))),
    })
}

fn v2_params_to_proto(p: &Value) -> Result<Value, CodecError> {
    let Some(obj) = p.as_object() else {
        return Err(err("`parameters` must be an object"));
    };
    let mut out = Map::new();
    for (k, v) in obj {
        let param = match v {
            Value::Bool(b) => json!({ "bool_param": b }),
            Value::String(s) => json!({ "string_param": s }),
            Value::Number(n) if n.is_i64() => json!({ "int64_param": n }),
            Value::Number(n) if n.is_u64() => json!({ "uint64_param": n }),
            Value::Number(n) => json!({ "double_param": n }),
            other => json!({ "string_param": other.to_string() }),
        };
        out.insert(k.clone(), param);
    }
    Ok(Value::Object(out))
}

fn v2_params_to_rest(p: &Value) -> Value {
    let mut out = Map::new();
    if let Some(obj) = p.as_object() {
        for (k, v) in obj {
            if let Some((_, inner)) = v.as_object().and_then(|o| o.iter().next()) {
                out.insert(k.clone(), inner.clone());
            }
        }
    }
    Value::Object(out)
}

fn v2_rest_to_proto(
    mut v: Value,
    request: bool,
    hints: &Hints,
    budget: &mut Budget,
) -> Result<Value, CodecError> {
    let p = Protocol::V2;
    let key = if request { "inputs" } else { "outputs" };
    let obj = v.as_object_mut().expect("checked object");
    let tensors = obj
        .remove(key)
        .ok_or_else(|| wrong(p, format!("no `{key}` list")))?;
    let Value::Array(tensors) = tensors else {
        return Err(wrong(p, format!("`{key}` is not a list")));
    };
    let mut out = Map::new();
    for f in ["id", "model_name", "model_version"] {
        if let Some(x) = obj.get(f) {
            out.insert(f.into(), x.clone());
        }
    }
    if request {
        if !out.contains_key("model_name")
            && let Some(m) = &hints.model_name
        {
            out.insert("model_name".into(), json!(m));
        }
        if !out.contains_key("model_version")
            && let Some(m) = &hints.model_version
        {
            out.insert("model_version".into(), json!(m));
        }
    }
    if let Some(params) = obj.get("parameters") {
        out.insert("parameters".into(), v2_params_to_proto(params)?);
    }
    let mut proto_tensors = Vec::new();
    for t in &tensors {
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| wrong(p, "a tensor without `name`"))?;
        let datatype = t
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| wrong(p, format!("tensor `{name}` has no `datatype`")))?;
        let shape = t
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| wrong(p, format!("tensor `{name}` has no `shape`")))?;
        let data = t
            .get("data")
            .ok_or_else(|| wrong(p, format!("tensor `{name}` has no `data`")))?;
        let shape = shape_of(name, shape)?;
        let (_, leaves) = flatten(data)?;
        let field = v2_contents_field(datatype)?;
        let strings = leaves
            .iter()
            .map(|x| x.as_str().map_or(0, |s| s.len() as u64))
            .sum();
        check_tensor(name, &shape, leaves.len() as u64, false, strings, budget)?;
        let values: Vec<Value> = if datatype == "BYTES" {
            leaves
                .into_iter()
                .map(|x| match x {
                    Value::String(s) => Ok(json!(B64.encode(s.as_bytes()))),
                    other => Err(err(format!(
                        "BYTES tensor `{name}` holds a non-string {other}"
                    ))),
                })
                .collect::<Result<_, _>>()?
        } else {
            leaves.into_iter().cloned().collect()
        };
        let mut pt = json!({ "name": name, "datatype": datatype, "shape": shape, "contents": { field: values } });
        if let Some(params) = t.get("parameters") {
            pt["parameters"] = v2_params_to_proto(params)?;
        }
        proto_tensors.push(pt);
    }
    out.insert(key.into(), Value::Array(proto_tensors));
    if request && let Some(Value::Array(outs)) = obj.get("outputs") {
        let mut req_outs = Vec::new();
        for o in outs {
            let mut ro = json!({ "name": o.get("name").cloned().unwrap_or(Value::Null) });
            if let Some(params) = o.get("parameters") {
                ro["parameters"] = v2_params_to_proto(params)?;
            }
            req_outs.push(ro);
        }
        out.insert("outputs".into(), Value::Array(req_outs));
    }
    Ok(Value::Object(out))
}

fn v2_proto_to_rest(v: Value, request: bool, budget: &mut Budget) -> Result<Value, CodecError> {
    let (key, raw_key) = if request {
        ("inputs", "raw_input_contents")
    } else {
        ("outputs", "raw_output_contents")
    };
    let mut out = Map::new();
    if !request {
        out.insert(
            "model_name".into(),
            v.get("model_name").cloned().unwrap_or(json!("")),
        );
    }
    for f in ["model_name", "model_version", "id"] {
        if let Some(x) = v.get(f) {
            out.insert(f.into(), x.clone());
        }
    }
    if let Some(params) = v.get("parameters") {
        out.insert("parameters".into(), v2_params_to_rest(params));
    }
    let raw: Vec<Vec<u8>> = v
        .get(raw_key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| {
                    B64.decode(x.as_str().unwrap_or_default())
                        .map_err(|e| err(e.to_string()))
                })
                .collect::<Result<_, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    let mut tensors = Vec::new();
    for (i, t) in v
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let datatype = t
            .get("datatype")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
        let shape = shape_of(
            name,
            t.get("shape")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice),
        )?;
        // Counted and checked against the shape and the limits before anything is decoded.
        let data: Vec<Value> = if let Some(r) = raw.get(i) {
            let (n, strings) = raw_count(datatype, r)?;
            check_tensor(name, &shape, n, false, strings, budget)?;
            decode_raw(datatype, r)?
        } else {
            let field = v2_contents_field(datatype)?;
            let vals = t
                .get("contents")
                .and_then(|c| c.get(field))
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            let strings = vals
                .iter()
                .map(|x| x.as_str().map_or(0, |s| s.len() as u64))
                .sum();
            check_tensor(name, &shape, vals.len() as u64, false, strings, budget)?;
            if datatype == "BYTES" {
                vals.iter()
                    .map(|x| {
                        let b = B64
                            .decode(x.as_str().unwrap_or_default())
                            .map_err(|e| err(e.to_string()))?;
                        Ok(json!(String::from_utf8_lossy(&b)))
                    })
                    .collect::<Result<_, CodecError>>()?
            } else {
                vals.to_vec()
            }
        };
        let mut rt = json!({
            "name": t.get("name").cloned().unwrap_or(json!("")),
            "shape": t.get("shape").cloned().unwrap_or(json!([])),
            "datatype": datatype,
            "data": data,
        });
        if let Some(params) = t.get("parameters") {
            rt["parameters"] = v2_params_to_rest(params);
        }
        tensors.push(rt);
    }
    out.insert(key.into(), Value::Array(tensors));
    if request && let Some(outs) = v.get("outputs") {
        let outs: Vec<Value> = outs
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                let mut ro = json!({ "name": o.get("name").cloned().unwrap_or(json!("")) });
                if let Some(p) = o.get("parameters") {
                    ro["parameters"] = v2_params_to_rest(p);
                }
                ro
            })
            .collect();
        out.insert("outputs".into(), Value::Array(outs));
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------- TensorFlow Serving

/// JSON values -> a TensorProto in proto3 JSON (proto field names). Numbers are DT_FLOAT
/// unless `ints_as_int64` and all are integers.
fn tf_tensor(
    name: &str,
    v: &Value,
    ints_as_int64: bool,
    budget: &mut Budget,
) -> Result<Value, CodecError> {
    let (shape, leaves) = flatten(v)?;
    let strings = leaves
        .iter()
        .map(|x| x.as_str().map_or(0, |s| s.len() as u64))
        .sum();
    check_tensor(name, &shape, leaves.len() as u64, false, strings, budget)?;
    let dims: Vec<Value> = shape.iter().map(|d| json!({ "size": d })).collect();
    let first = leaves.first().copied();
    let (dtype, field, vals): (&str, &str, Vec<Value>) = match first {
        Some(Value::String(_)) | Some(Value::Object(_)) => {
            let vals = leaves
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(json!(B64.encode(s.as_bytes()))),
                    Value::Object(o) => o
                        .get("b64")
                        .and_then(Value::as_str)
                        .map(|s| json!(s))
                        .ok_or_else(|| err("an object in a tensor must be {\"b64\": \"...\"}")),
                    other => Err(err(format!("mixed strings and {other} in one tensor"))),
                })
                .collect::<Result<_, _>>()?;
            ("DT_STRING", "string_val", vals)
        }
        Some(Value::Bool(_)) => {
            let vals = leaves
                .iter()
                .map(|x| {
                    x.as_bool()
                        .map(Value::Bool)
                        .ok_or_else(|| err("mixed booleans and other values in one tensor"))
                })
                .collect::<Result<_, _>>()?;
            ("DT_BOOL", "bool_val", vals)
        }
        _ => {
            if leaves.iter().any(|x| !x.is_number()) {
                return Err(err("a numeric tensor holds a non-number"));
            }
            let all_int = leaves.iter().all(|x| x.is_i64() || x.is_u64());
            if ints_as_int64 && all_int {
                (
                    "DT_INT64",
                    "int64_val",
                    leaves.into_iter().cloned().collect(),
                )
            } else {
                (
                    "DT_FLOAT",
                    "float_val",
                    leaves.into_iter().cloned().collect(),
                )
            }
        }
    };
    Ok(json!({ "dtype": dtype, "tensor_shape": { "dim": dims }, field: vals }))
}

/// `tensor_shape` -> `tensorShape`: proto3 JSON may use either name.
fn lower_camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut up = false;
    for c in snake.chars() {
        match c {
            '_' => up = true,
            c if up => {
                out.push(c.to_ascii_uppercase());
                up = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// A field of a message in proto3 JSON, by its proto name or its lowerCamel JSON name.
fn field<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    v.get(snake).or_else(|| v.get(lower_camel(snake)))
}

/// A TensorProto in proto3 JSON (proto or lowerCamel field names) -> its shape and row-major
/// values (one value when it fills the whole shape, as TensorFlow reads it). The shape, the
/// number of values and the size are checked (and charged to `budget`) before any value is
/// decoded.
fn tf_values(
    name: &str,
    t: &Value,
    budget: &mut Budget,
) -> Result<(Vec<i64>, Vec<Value>), CodecError> {
    let f = |snake: &str| field(t, snake);
    let dtype = f("dtype").and_then(Value::as_str).unwrap_or("DT_INVALID");
    let dims = f("tensor_shape")
        .and_then(|s| s.get("dim"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let shape = shape_of(
        name,
        &dims
            .iter()
            .map(|d| d.get("size").cloned().unwrap_or(json!(0)))
            .collect::<Vec<_>>(),
    )?;
    if let Some(content) = f("tensor_content").and_then(Value::as_str) {
        let raw = B64.decode(content).map_err(|e| err(e.to_string()))?;
        let dt = match dtype {
            "DT_FLOAT" => "FP32",
            "DT_DOUBLE" => "FP64",
            "DT_INT32" => "INT32",
            "DT_INT64" => "INT64",
            "DT_INT16" => "INT16",
            "DT_INT8" => "INT8",
            "DT_UINT8" => "UINT8",
            "DT_UINT16" => "UINT16",
            "DT_UINT32" => "UINT32",
            "DT_UINT64" => "UINT64",
            "DT_BOOL" => "BOOL",
            "DT_HALF" => "FP16",
            "DT_BFLOAT16" => "BF16",
            other => return Err(err(format!("tensor_content of {other} is not supported"))),
        };
        let (n, _) = raw_count(dt, &raw)?;
        check_tensor(name, &shape, n, true, 0, budget)?;
        return Ok((shape, decode_raw(dt, &raw)?));
    }
    let field = match dtype {
        "DT_FLOAT" => "float_val",
        "DT_DOUBLE" => "double_val",
        "DT_INT32" | "DT_INT16" | "DT_INT8" | "DT_UINT8" | "DT_UINT16" => "int_val",
        "DT_INT64" => "int64_val",
        "DT_UINT32" => "uint32_val",
        "DT_UINT64" => "uint64_val",
        "DT_BOOL" => "bool_val",
        "DT_HALF" | "DT_BFLOAT16" => "half_val",
        "DT_STRING" => "string_val",
        other => return Err(err(format!("tensors of {other} are not supported in JSON"))),
    };
    let vals = f(field)
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let strings = vals
        .iter()
        .map(|x| x.as_str().map_or(0, |s| s.len() as u64))
        .sum();
    check_tensor(name, &shape, vals.len() as u64, true, strings, budget)?;
    let values = match dtype {
        "DT_HALF" | "DT_BFLOAT16" => vals
            .iter()
            .map(|x| {
                let bits = x.as_u64().unwrap_or(0) as u16;
                let f = if dtype == "DT_HALF" {
                    f16_to_f32(bits)
                } else {
                    f32::from_bits(u32::from(bits) << 16)
                };
                num_f64(f64::from(f))
            })
            .collect(),
        "DT_STRING" => vals
            .iter()
            .map(|x| {
                let b = B64
                    .decode(x.as_str().unwrap_or_default())
                    .map_err(|e| err(e.to_string()))?;
                Ok(match String::from_utf8(b) {
                    Ok(s) => json!(s),
                    Err(e) => json!({ "b64": B64.encode(e.as_bytes()) }),
                })
            })
            .collect::<Result<_, CodecError>>()?,
        _ => vals.to_vec(),
    };
    Ok((shape, values))
}

/// A TensorProto in proto3 JSON -> nested JSON values.
fn tf_tensor_to_json(name: &str, t: &Value, budget: &mut Budget) -> Result<Value, CodecError> {
    let (shape, values) = tf_values(name, t, budget)?;
    nest(name, &shape, values, &budget.limits())
}

/// Rows of objects (TF row format with named tensors) -> one tensor per name, stacked on the
/// first dimension. Every row must carry every name of the first row.
fn named_columns(
    rows: &[Value],
    ints_as_int64: bool,
    budget: &mut Budget,
) -> Result<Map<String, Value>, CodecError> {
    let names: Vec<&String> = rows[0]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    let mut out = Map::new();
    for name in names {
        let col: Vec<Value> = rows
            .iter()
            .map(|r| {
                r.get(name)
                    .cloned()
                    .ok_or_else(|| wrong(Protocol::Tensorflow, format!("a row lacks `{name}`")))
            })
            .collect::<Result<_, _>>()?;
        out.insert(
            name.clone(),
            tf_tensor(name, &Value::Array(col), ints_as_int64, budget)?,
        );
    }
    Ok(out)
}

fn tf_request_to_proto(v: Value, hints: &Hints, budget: &mut Budget) -> Result<Value, CodecError> {
    let p = Protocol::Tensorflow;
    let mut spec = Map::new();
    if let Some(m) = &hints.model_name {
        spec.insert("name".into(), json!(m));
    }
    if let Some(s) = v.get("signature_name").and_then(Value::as_str) {
        spec.insert("signature_name".into(), json!(s));
    }
    let unnamed = || {
        hints.tf_input_name.clone().ok_or_else(|| {
            wrong(
                p,
                "unnamed inputs need the signature's input name: send {\"inputs\": {\"<name>\": ...}} \
                 or instances of objects, or set the TF input name",
            )
        })
    };
    let mut inputs = Map::new();
    match (v.get("instances"), v.get("inputs")) {
        (Some(_), Some(_)) => return Err(wrong(p, "both `instances` and `inputs`: use one")),
        (Some(Value::Array(rows)), None) => {
            if rows.first().is_some_and(Value::is_object) {
                inputs = named_columns(rows, false, budget)?;
            } else {
                let name = unnamed()?;
                let t = tf_tensor(&name, &Value::Array(rows.clone()), false, budget)?;
                inputs.insert(name, t);
            }
        }
        (Some(_), None) => return Err(wrong(p, "`instances` must be a list")),
        (None, Some(Value::Object(named))) => {
            for (name, t) in named {
                inputs.insert(name.clone(), tf_tensor(name, t, false, budget)?);
            }
        }
        (None, Some(t)) => {
            let name = unnamed()?;
            let t = tf_tensor(&name, t, false, budget)?;
            inputs.insert(name, t);
        }
        (None, None) => return Err(wrong(p, "neither `instances` nor `inputs`")),
    }
    Ok(json!({ "model_spec": spec, "inputs": inputs }))
}

fn tf_request_to_rest(v: Value, budget: &mut Budget) -> Result<Value, CodecError> {
    let mut inputs = Map::new();
    for (name, t) in v
        .get("inputs")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        inputs.insert(name.clone(), tf_tensor_to_json(name, t, budget)?);
    }
    let mut out = json!({ "inputs": inputs });
    if let Some(s) = v
        .pointer("/model_spec/signature_name")
        .and_then(Value::as_str)
    {
        out["signature_name"] = json!(s);
    }
    Ok(out)
}

fn tf_response_to_rest(v: Value, hints: &Hints, budget: &mut Budget) -> Result<Value, CodecError> {
    let mut outputs = Map::new();
    for (name, t) in v
        .get("outputs")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        outputs.insert(name.clone(), tf_tensor_to_json(name, t, budget)?);
    }
    if !hints.tf_row_format {
        return Ok(if outputs.len() == 1 {
            json!({ "outputs": outputs.into_iter().next().expect("one").1 })
        } else {
            json!({ "outputs": outputs })
        });
    }
    if outputs.len() == 1 {
        return Ok(json!({ "predictions": outputs.into_iter().next().expect("one").1 }));
    }
    // Several outputs in row format: one object per row.
    let rows = outputs
        .values()
        .filter_map(Value::as_array)
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    let preds: Vec<Value> = (0..rows)
        .map(|i| {
            Value::Object(
                outputs
                    .iter()
                    .map(|(k, t)| (k.clone(), t.get(i).cloned().unwrap_or(Value::Null)))
                    .collect(),
            )
        })
        .collect();
    Ok(json!({ "predictions": preds }))
}

fn tf_response_to_proto(v: Value, budget: &mut Budget) -> Result<Value, CodecError> {
    let p = Protocol::Tensorflow;
    let mut outputs = Map::new();
    match (v.get("predictions"), v.get("outputs")) {
        (Some(Value::Array(rows)), _) if rows.first().is_some_and(Value::is_object) => {
            outputs = named_columns(rows, true, budget)?;
        }
        (Some(pred), _) => {
            outputs.insert(
                "predictions".into(),
                tf_tensor("predictions", pred, true, budget)?,
            );
        }
        (None, Some(Value::Object(named))) => {
            for (name, t) in named {
                outputs.insert(name.clone(), tf_tensor(name, t, true, budget)?);
            }
        }
        (None, Some(t)) => {
            outputs.insert("outputs".into(), tf_tensor("outputs", t, true, budget)?);
        }
        (None, None) => {
            return Err(wrong(
                p,
                "neither `predictions` nor `outputs` in the response",
            ));
        }
    }
    Ok(json!({ "outputs": outputs }))
}

// ---------------------------------------------------------------- Seldon

/// Seldon messages keep their proto3 JSON form, so nothing is expanded; still, a `data.tensor`
/// must fill its shape (the wrapper reshapes it with numpy), a `data.tftensor` its own, and
/// every tensor counts against the limits.
fn seldon_check(message: &str, v: &Value, budget: &mut Budget) -> Result<(), CodecError> {
    match message {
        "seldon.protos.SeldonMessage" => seldon_message_check(v, budget),
        "seldon.protos.SeldonMessageList" => {
            for m in field(v, "seldon_messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                seldon_message_check(m, budget)?;
            }
            Ok(())
        }
        "seldon.protos.Feedback" => {
            for part in ["request", "response", "truth"] {
                if let Some(m) = v.get(part) {
                    seldon_message_check(m, budget)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn seldon_message_check(m: &Value, budget: &mut Budget) -> Result<(), CodecError> {
    let Some(data) = m.get("data") else {
        return Ok(());
    };
    if let Some(t) = data.get("tensor") {
        let dims = t
            .get("shape")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let shape = shape_of("data.tensor", dims)?;
        let n = t
            .get("values")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        check_tensor("data.tensor", &shape, n as u64, false, 0, budget)?;
    }
    if let Some(nd) = data.get("ndarray") {
        let (cells, strings) = json_size(nd);
        budget.take("data.ndarray", cells, strings)?;
    }
    if let Some(t) = data.get("tftensor") {
        tf_values("data.tftensor", t, budget)?;
    }
    Ok(())
}

/// Values (arrays and objects count as one each) and string bytes of a JSON tree.
fn json_size(v: &Value) -> (u64, u64) {
    match v {
        Value::Array(a) => a.iter().map(json_size).fold((1, 0), |(c, s), (c2, s2)| {
            (c.saturating_add(c2), s.saturating_add(s2))
        }),
        Value::Object(o) => o.values().map(json_size).fold((1, 0), |(c, s), (c2, s2)| {
            (c.saturating_add(c2), s.saturating_add(s2))
        }),
        Value::String(s) => (1, s.len() as u64),
        _ => (1, 0),
    }
}
