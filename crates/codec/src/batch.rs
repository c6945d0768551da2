//! Micro-batching: several records' JSON requests merged into one along the batch dimension, and
//! the answer split back into one answer per record. Per protocol:
//! - v2: inputs concatenated on dim 0 (every datatype, BYTES included); records whose inputs
//!   differ in names, datatypes, other dimensions or parameters do not merge.
//! - seldon: `data.ndarray` rows, or `data.tensor` values along dim 0, with equal `names`;
//!   records with `meta` or other data forms do not merge.
//! - tensorflow: the row format, `instances` rows (answer `predictions`), with equal other keys;
//!   or the columnar format, `inputs` as one array or as named arrays, each along dim 0 (answer
//!   `outputs` in either form, each output split along dim 0), with equal `signature_name` and
//!   no other keys. Columnar records merge only when they have the same input names and, per
//!   input, the same shape of the first row (only the first row is looked at: ragged rows are
//!   for the server to refuse). Scalar inputs, named inputs of unequal or zero dim 0, or a
//!   request with both `instances` and `inputs` do not merge; a row-format and a columnar
//!   record never merge together. A columnar request's answer must be `outputs`
//!   (`predictions` is an error).
//!
//! A request that cannot be merged goes alone ([`Merged`] of one). An answer that does not
//! split (rows missing) is an error: the caller then sends each record alone.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::{CodecError, Protocol};

/// A request's batch key and rows: requests with equal keys merge.
#[derive(Debug)]
pub struct Part {
    key: String,
    rows: usize,
    value: Value,
}

/// Reads a record's JSON request as a batch part, or None when it cannot be merged.
pub fn part(protocol: Protocol, json: &[u8]) -> Option<Part> {
    let value: Value = serde_json::from_slice(json).ok()?;
    let o = value.as_object()?;
    let (key, rows) = match protocol {
        Protocol::V2 => {
            let inputs = o.get("inputs")?.as_array()?;
            let mut rows = None;
            let mut key = Vec::new();
            for i in inputs {
                let shape = i.get("shape")?.as_array()?;
                let b = usize::try_from(shape.first()?.as_u64()?).ok()?;
                if *rows.get_or_insert(b) != b || b == 0 {
                    return None;
                }
                // Values per row must match the shape, or rows would shift between records.
                let per_row: u64 = shape[1..]
                    .iter()
                    .map(Value::as_u64)
                    .product::<Option<u64>>()?;
                if count_leaves(i.get("data")?) as u64 != per_row * b as u64 {
                    return None;
                }
                key.push(serde_json::json!([
                    i.get("name"),
                    i.get("datatype"),
                    &shape[1..],
                    i.get("parameters")
                ]));
            }
            let other: Map<String, Value> = o
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "inputs" | "id"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (
                serde_json::to_string(&(key, other)).ok()?,
                rows.unwrap_or(0),
            )
        }
        Protocol::Seldon => {
            if o.keys().any(|k| k != "data") {
                return None;
            }
            let d = o.get("data")?.as_object()?;
            if d.keys()
                .any(|k| !matches!(k.as_str(), "ndarray" | "tensor" | "names"))
            {
                return None;
            }
            match (d.get("ndarray"), d.get("tensor")) {
                (Some(Value::Array(rows)), None) if rows.iter().all(Value::is_array) => (
                    serde_json::to_string(&("ndarray", d.get("names"))).ok()?,
                    rows.len(),
                ),
                (None, Some(t)) => {
                    let shape = t.get("shape")?.as_array()?;
                    let b = usize::try_from(shape.first()?.as_u64()?).ok()?;
                    let per_row: u64 = shape[1..]
                        .iter()
                        .map(Value::as_u64)
                        .product::<Option<u64>>()?;
                    if t.get("values")?.as_array()?.len() as u64 != per_row * b as u64 {
                        return None;
                    }
                    (
                        serde_json::to_string(&("tensor", &shape[1..], d.get("names"))).ok()?,
                        b,
                    )
                }
                _ => return None,
            }
        }
        Protocol::Tensorflow => match (o.get("instances"), o.get("inputs")) {
            (Some(inst), None) => {
                let inst = inst.as_array()?;
                let other: Map<String, Value> = o
                    .iter()
                    .filter(|(k, _)| k.as_str() != "instances")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (
                    serde_json::to_string(&("instances", other)).ok()?,
                    inst.len(),
                )
            }
            (None, Some(inputs)) => {
                if o.keys()
                    .any(|k| !matches!(k.as_str(), "inputs" | "signature_name"))
                {
                    return None;
                }
                let (columns, rows) = tf_columns(inputs)?;
                (
                    serde_json::to_string(&("inputs", o.get("signature_name"), columns)).ok()?,
                    rows,
                )
            }
            // Both forms in one request, or neither: TF Serving refuses it; it goes alone.
            _ => return None,
        },
    };
    (rows > 0).then_some(Part { key, rows, value })
}

/// The memory a parsed JSON value takes (its nodes and their heap parts; allocator slack not
/// counted).
pub fn value_size(v: &Value) -> usize {
    let node = std::mem::size_of::<Value>();
    node + match v {
        Value::String(s) => s.capacity(),
        Value::Array(a) => {
            a.iter().map(value_size).sum::<usize>() + (a.capacity() - a.len()) * node
        }
        // A map entry: its key, its value and about two words of the map's own.
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| 16 + std::mem::size_of::<String>() + k.capacity() + value_size(v))
            .sum(),
        _ => 0,
    }
}

impl Part {
    /// The memory this part holds (its parsed request).
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.key.capacity() + value_size(&self.value)
    }

    /// Whether `self` and `other` can go in one request.
    pub fn merges_with(&self, other: &Part) -> bool {
        self.key == other.key
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// TensorFlow Serving's columnar `inputs` (one array, or name -> array): its batch key and the
/// rows (each input's dim 0, equal for all), or None when it does not batch. The key holds the
/// form, the input names (sorted) and, per input, the shape below dim 0 of its first row.
fn tf_columns(inputs: &Value) -> Option<(Value, usize)> {
    match inputs {
        Value::Array(rows) => Some((
            serde_json::json!(["unnamed", shape_of(rows.first()?)]),
            rows.len(),
        )),
        Value::Object(named) => {
            let mut rows = None;
            let mut key = Vec::with_capacity(named.len());
            for (name, v) in named {
                let r = v.as_array()?;
                if *rows.get_or_insert(r.len()) != r.len() {
                    return None;
                }
                key.push((name, shape_of(r.first()?)));
            }
            key.sort_unstable();
            Some((serde_json::json!(["named", key]), rows?))
        }
        _ => None,
    }
}

/// The shape of a nested JSON array, following first elements (`[]` for a scalar).
fn shape_of(mut v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    while let Value::Array(a) = v {
        shape.push(a.len());
        match a.first() {
            Some(x) => v = x,
            None => break,
        }
    }
    shape
}

/// The rows at `at` of every part, in order, as one array.
fn concat_rows(parts: &[Part], at: impl Fn(&Value) -> Option<&Vec<Value>>) -> Value {
    Value::Array(
        parts
            .iter()
            .flat_map(|p| at(&p.value).into_iter().flatten().cloned())
            .collect(),
    )
}

/// Whether `parts` are TensorFlow Serving columnar requests (`inputs`, not `instances`).
fn tf_columnar(parts: &[Part]) -> bool {
    parts
        .first()
        .is_some_and(|p| p.value.get("inputs").is_some())
}

fn count_leaves(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.iter().map(count_leaves).sum(),
        _ => 1,
    }
}

fn flatten_into(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten_into(x, out)),
        x => out.push(x.clone()),
    }
}

/// One request for `parts` (all merging with the first): the rows of each, in order.
pub fn merge(protocol: Protocol, parts: &[Part]) -> Result<Bytes, CodecError> {
    let first = parts.first().ok_or_else(|| err("no request to merge"))?;
    let total: usize = parts.iter().map(|p| p.rows).sum();
    let mut out = first.value.clone();
    match protocol {
        Protocol::V2 => {
            let inputs = out["inputs"].as_array_mut().expect("checked in part()");
            for (n, input) in inputs.iter_mut().enumerate() {
                let mut data = Vec::new();
                for p in parts {
                    flatten_into(&p.value["inputs"][n]["data"], &mut data);
                }
                input["data"] = Value::Array(data);
                input["shape"][0] = Value::from(total);
            }
            if let Some(o) = out.as_object_mut() {
                o.remove("id");
            }
        }
        Protocol::Seldon => {
            let d = &mut out["data"];
            if d.get("ndarray").is_some() {
                let rows: Vec<Value> = parts
                    .iter()
                    .flat_map(|p| {
                        p.value["data"]["ndarray"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect();
                d["ndarray"] = Value::Array(rows);
            } else {
                let values: Vec<Value> = parts
                    .iter()
                    .flat_map(|p| {
                        p.value["data"]["tensor"]["values"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect();
                d["tensor"]["values"] = Value::Array(values);
                d["tensor"]["shape"][0] = Value::from(total);
            }
        }
        Protocol::Tensorflow if tf_columnar(parts) => match &mut out["inputs"] {
            Value::Array(_) => {
                out["inputs"] = concat_rows(parts, |v| v["inputs"].as_array());
            }
            Value::Object(named) => {
                for (name, rows) in named.iter_mut() {
                    *rows = concat_rows(parts, |v| v["inputs"][name.as_str()].as_array());
                }
            }
            _ => return Err(err("a columnar request's inputs are not rows")),
        },
        Protocol::Tensorflow => {
            out["instances"] = concat_rows(parts, |v| v["instances"].as_array());
        }
    }
    Ok(Bytes::from(serde_json::to_vec(&out).expect("serializes")))
}

/// The merged request's JSON answer split into one answer per part, in order.
pub fn split(protocol: Protocol, answer: &[u8], parts: &[Part]) -> Result<Vec<Bytes>, CodecError> {
    let mut v: Value =
        serde_json::from_slice(answer).map_err(|e| CodecError::MalformedJson(e.to_string()))?;
    let total: usize = parts.iter().map(|p| p.rows).sum();
    // The rows are taken out of the answer first, so each record's copy of the rest is small
    // (cloning the whole answer per record would cost batch-size squared), then dealt out.
    let outs = match protocol {
        Protocol::V2 => {
            let outputs = v
                .get_mut("outputs")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| err("the batch answer has no outputs"))?;
            let mut datas = Vec::with_capacity(outputs.len());
            for o in outputs.iter_mut() {
                let shape = o
                    .get("shape")
                    .and_then(Value::as_array)
                    .ok_or_else(|| err("a batch output has no shape"))?;
                if shape.first().and_then(Value::as_u64) != Some(total as u64) {
                    return Err(err(format!(
                        "output {} has {} rows for a batch of {total}",
                        o.get("name").unwrap_or(&Value::Null),
                        shape.first().unwrap_or(&Value::Null)
                    )));
                }
                let per_row: u64 = shape[1..]
                    .iter()
                    .map(Value::as_u64)
                    .product::<Option<u64>>()
                    .ok_or_else(|| err("a batch output's shape is not numbers"))?;
                let mut data = Vec::new();
                flatten_owned(o.get_mut("data").map(Value::take), &mut data);
                if data.len() as u64 != per_row * total as u64 {
                    return Err(err("a batch output's data does not fill its shape"));
                }
                datas.push(deal(data, parts, per_row as usize));
            }
            let mut outs = copies(&v, parts.len());
            for (n, chunks) in datas.into_iter().enumerate() {
                for ((p, out), chunk) in parts.iter().zip(outs.iter_mut()).zip(chunks) {
                    let o = &mut out["outputs"][n];
                    o["data"] = chunk;
                    o["shape"][0] = Value::from(p.rows);
                }
            }
            // Each answer carries its own request's id, where it had one.
            for (p, out) in parts.iter().zip(outs.iter_mut()) {
                if let (Some(o), Some(id)) = (out.as_object_mut(), p.value.get("id")) {
                    o.insert("id".into(), id.clone());
                }
            }
            outs
        }
        Protocol::Seldon => {
            let d = v
                .get_mut("data")
                .ok_or_else(|| err("the batch answer has no data"))?;
            if let Some(rows) = d.get_mut("ndarray").and_then(Value::as_array_mut) {
                check_rows(rows.len(), total)?;
                let rows = std::mem::take(rows);
                per_record(&v, rows, parts, 1, |out, chunk, _| {
                    out["data"]["ndarray"] = chunk;
                })
            } else if let Some(t) = d.get_mut("tensor") {
                let shape = t
                    .get("shape")
                    .and_then(Value::as_array)
                    .ok_or_else(|| err("a batch tensor has no shape"))?;
                check_rows(
                    shape.first().and_then(Value::as_u64).unwrap_or(0) as usize,
                    total,
                )?;
                let per_row: u64 = shape[1..]
                    .iter()
                    .map(Value::as_u64)
                    .product::<Option<u64>>()
                    .ok_or_else(|| err("a batch tensor's shape is not numbers"))?;
                let values = t
                    .get_mut("values")
                    .and_then(Value::as_array_mut)
                    .ok_or_else(|| err("a batch tensor has no values"))?;
                if values.len() as u64 != per_row * total as u64 {
                    return Err(err("a batch tensor's values do not fill its shape"));
                }
                let values = std::mem::take(values);
                per_record(&v, values, parts, per_row as usize, |out, chunk, p| {
                    out["data"]["tensor"]["values"] = chunk;
                    out["data"]["tensor"]["shape"][0] = Value::from(p.rows);
                })
            } else {
                return Err(err("the batch answer has neither ndarray nor tensor rows"));
            }
        }
        // TF Serving answers a columnar request with `outputs`: one array, or name -> array.
        Protocol::Tensorflow if tf_columnar(parts) => match v.get_mut("outputs") {
            Some(Value::Array(rows)) => {
                check_rows(rows.len(), total)?;
                let rows = std::mem::take(rows);
                per_record(&v, rows, parts, 1, |out, chunk, _| out["outputs"] = chunk)
            }
            Some(Value::Object(named)) if !named.is_empty() => {
                let mut dealt = Vec::with_capacity(named.len());
                for (name, rows) in named.iter_mut() {
                    let rows = rows
                        .as_array_mut()
                        .ok_or_else(|| err(format!("output {name} is not rows")))?;
                    if rows.len() != total {
                        return Err(err(format!(
                            "output {name} has {} rows for a batch of {total}",
                            rows.len()
                        )));
                    }
                    dealt.push((name.clone(), deal(std::mem::take(rows), parts, 1)));
                }
                let mut outs = copies(&v, parts.len());
                for (name, chunks) in dealt {
                    for (out, chunk) in outs.iter_mut().zip(chunks) {
                        out["outputs"][name.as_str()] = chunk;
                    }
                }
                outs
            }
            _ => return Err(err("the batch answer has no outputs")),
        },
        Protocol::Tensorflow => {
            let rows = v
                .get_mut("predictions")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| err("the batch answer has no predictions"))?;
            check_rows(rows.len(), total)?;
            let rows = std::mem::take(rows);
            per_record(&v, rows, parts, 1, |out, chunk, _| {
                out["predictions"] = chunk
            })
        }
    };
    Ok(outs
        .into_iter()
        .map(|o| Bytes::from(serde_json::to_vec(&o).expect("serializes")))
        .collect())
}

/// `n` copies of `v` (the answer with its rows taken out).
fn copies(v: &Value, n: usize) -> Vec<Value> {
    (0..n).map(|_| v.clone()).collect()
}

/// One answer per record: a copy of `v` (the answer, its rows taken out) with the record's
/// share of `rows` (`per_row` values a row) put in by `put`.
fn per_record(
    v: &Value,
    rows: Vec<Value>,
    parts: &[Part],
    per_row: usize,
    put: impl Fn(&mut Value, Value, &Part),
) -> Vec<Value> {
    let mut outs = copies(v, parts.len());
    for ((out, chunk), p) in outs.iter_mut().zip(deal(rows, parts, per_row)).zip(parts) {
        put(out, chunk, p);
    }
    outs
}

/// `values` (`per_row` per row, as many rows as the parts hold) dealt out: one array per part.
fn deal(values: Vec<Value>, parts: &[Part], per_row: usize) -> Vec<Value> {
    let mut it = values.into_iter();
    parts
        .iter()
        .map(|p| Value::Array(it.by_ref().take(per_row * p.rows).collect()))
        .collect()
}

/// Like [`flatten_into`], moving the leaves.
fn flatten_owned(v: Option<Value>, out: &mut Vec<Value>) {
    match v {
        Some(Value::Array(a)) => a.into_iter().for_each(|x| flatten_owned(Some(x), out)),
        Some(x) => out.push(x),
        None => out.push(Value::Null),
    }
}

fn check_rows(got: usize, want: usize) -> Result<(), CodecError> {
    if got == want {
        Ok(())
    } else {
        Err(err(format!("the batch answer has {got} rows for {want}")))
    }
}

fn err(why: impl Into<String>) -> CodecError {
    CodecError::Transcode(format!("batch: {}", why.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(protocol: Protocol, v: Value) -> Option<Part> {
        part(protocol, v.to_string().as_bytes())
    }

    #[test]
    fn v2_merges_on_dim_0_and_splits_back() {
        let a = p(Protocol::V2, json!({"id": "a", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})).unwrap();
        let b = p(Protocol::V2, json!({"id": "b", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[3, 4], [5, 6]]}]})).unwrap();
        let c = p(Protocol::V2, json!({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]})).unwrap();
        assert!(a.merges_with(&b) && !a.merges_with(&c));
        // Values that do not fill the shape never merge.
        assert!(
            p(
                Protocol::V2,
                json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1]}]})
            )
            .is_none()
        );
        let parts = [a, b];
        let m: Value = serde_json::from_slice(&merge(Protocol::V2, &parts).unwrap()).unwrap();
        assert_eq!(m["inputs"][0]["shape"], json!([3, 2]));
        assert_eq!(m["inputs"][0]["data"], json!([1, 2, 3, 4, 5, 6]));
        let answer = json!({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [3, 1], "data": [10, 20, 30]}]});
        let s = split(Protocol::V2, answer.to_string().as_bytes(), &parts).unwrap();
        let s: Vec<Value> = s
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(s[0]["outputs"][0]["data"], json!([10]));
        assert_eq!(s[0]["outputs"][0]["shape"], json!([1, 1]));
        assert_eq!(s[0]["id"], "a");
        assert_eq!(s[1]["outputs"][0]["data"], json!([20, 30]));
        assert_eq!(s[1]["id"], "b");
        let short = json!({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [1, 2]}]});
        assert!(split(Protocol::V2, short.to_string().as_bytes(), &parts).is_err());
    }

    #[test]
    fn v2_bytes_merge() {
        let a = p(
            Protocol::V2,
            json!({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}),
        )
        .unwrap();
        let b = p(
            Protocol::V2,
            json!({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["yo"]}]}),
        )
        .unwrap();
        let m: Value = serde_json::from_slice(&merge(Protocol::V2, &[a, b]).unwrap()).unwrap();
        assert_eq!(m["inputs"][0]["data"], json!(["hi", "yo"]));
    }

    #[test]
    fn seldon_rows_and_tensors() {
        let a = p(
            Protocol::Seldon,
            json!({"data": {"names": ["a", "b"], "ndarray": [[1, 2]]}}),
        )
        .unwrap();
        let b = p(
            Protocol::Seldon,
            json!({"data": {"names": ["a", "b"], "ndarray": [[3, 4], [5, 6]]}}),
        )
        .unwrap();
        assert!(a.merges_with(&b));
        assert!(
            p(
                Protocol::Seldon,
                json!({"meta": {"puid": "x"}, "data": {"ndarray": [[1]]}})
            )
            .is_none()
        );
        assert!(p(Protocol::Seldon, json!({"strData": "x"})).is_none());
        let parts = [a, b];
        let m: Value = serde_json::from_slice(&merge(Protocol::Seldon, &parts).unwrap()).unwrap();
        assert_eq!(m["data"]["ndarray"], json!([[1, 2], [3, 4], [5, 6]]));
        let ans = json!({"data": {"names": ["t"], "ndarray": [[10], [30], [50]]}, "meta": {"tags": {"x": 1}}});
        let s = split(Protocol::Seldon, ans.to_string().as_bytes(), &parts).unwrap();
        let s1: Value = serde_json::from_slice(&s[1]).unwrap();
        assert_eq!(s1["data"]["ndarray"], json!([[30], [50]]));
        assert_eq!(s1["meta"]["tags"]["x"], 1);
        let t1 = p(
            Protocol::Seldon,
            json!({"data": {"tensor": {"shape": [1, 2], "values": [1, 2]}}}),
        )
        .unwrap();
        let t2 = p(
            Protocol::Seldon,
            json!({"data": {"tensor": {"shape": [1, 2], "values": [3, 4]}}}),
        )
        .unwrap();
        let tparts = [t1, t2];
        let m: Value = serde_json::from_slice(&merge(Protocol::Seldon, &tparts).unwrap()).unwrap();
        assert_eq!(
            m["data"]["tensor"],
            json!({"shape": [2, 2], "values": [1, 2, 3, 4]})
        );
        let ans = json!({"data": {"tensor": {"shape": [2, 1], "values": [7, 8]}}});
        let s = split(Protocol::Seldon, ans.to_string().as_bytes(), &tparts).unwrap();
        let s1: Value = serde_json::from_slice(&s[1]).unwrap();
        assert_eq!(
            s1["data"]["tensor"],
            json!({"shape": [1, 1], "values": [8]})
        );
    }

    #[test]
    fn tensorflow_instances() {
        let a = p(Protocol::Tensorflow, json!({"instances": [[1.0], [2.0]]})).unwrap();
        let b = p(Protocol::Tensorflow, json!({"instances": [[3.0]]})).unwrap();
        let c = p(
            Protocol::Tensorflow,
            json!({"signature_name": "x", "instances": [[3.0]]}),
        )
        .unwrap();
        assert!(a.merges_with(&b) && !a.merges_with(&c));
        // A columnar record never merges with a row-format one; both forms at once never merge.
        let col = p(Protocol::Tensorflow, json!({"inputs": [[3.0]]})).unwrap();
        assert!(!a.merges_with(&col) && !col.merges_with(&a));
        assert!(
            p(
                Protocol::Tensorflow,
                json!({"instances": [[1.0]], "inputs": [[1.0]]})
            )
            .is_none()
        );
        let parts = [a, b];
        let ans = json!({"predictions": [[10], [20], [30]]});
        let s = split(Protocol::Tensorflow, ans.to_string().as_bytes(), &parts).unwrap();
        assert_eq!(&s[0][..], br#"{"predictions":[[10],[20]]}"#);
        assert_eq!(&s[1][..], br#"{"predictions":[[30]]}"#);
        let bad = json!({"predictions": [[10]]});
        assert!(split(Protocol::Tensorflow, bad.to_string().as_bytes(), &parts).is_err());
    }

    fn answers(protocol: Protocol, answer: Value, parts: &[Part]) -> Vec<Value> {
        split(protocol, answer.to_string().as_bytes(), parts)
            .unwrap()
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    #[test]
    fn tensorflow_columnar_unnamed() {
        let tf = Protocol::Tensorflow;
        let a = p(tf, json!({"inputs": [[1, 2], [3, 4]]})).unwrap();
        let b = p(tf, json!({"inputs": [[5, 6]]})).unwrap();
        assert_eq!((a.rows(), b.rows()), (2, 1));
        assert!(a.merges_with(&b));
        // Rows of another inner shape do not merge.
        let c = p(tf, json!({"inputs": [[1, 2, 3]]})).unwrap();
        assert!(!a.merges_with(&c));
        let parts = [a, b];
        let m: Value = serde_json::from_slice(&merge(tf, &parts).unwrap()).unwrap();
        assert_eq!(m, json!({"inputs": [[1, 2], [3, 4], [5, 6]]}));
        let s = answers(tf, json!({"outputs": [[10], [30], [50]]}), &parts);
        assert_eq!(s[0], json!({"outputs": [[10], [30]]}));
        assert_eq!(s[1], json!({"outputs": [[50]]}));
        // A model of several outputs answers name -> array even to an unnamed input.
        let s = answers(
            tf,
            json!({"outputs": {"y": [1, 2, 3], "z": [[1], [2], [3]]}}),
            &parts,
        );
        assert_eq!(s[0], json!({"outputs": {"y": [1, 2], "z": [[1], [2]]}}));
        assert_eq!(s[1], json!({"outputs": {"y": [3], "z": [[3]]}}));
        // Rows missing, or a row-format answer, do not split.
        for bad in [
            json!({"outputs": [[10], [30]]}),
            json!({"outputs": {"y": [1, 2, 3], "z": [[1], [2]]}}),
            json!({"outputs": {"y": 1}}),
            json!({"outputs": {}}),
            json!({"predictions": [[10], [30], [50]]}),
        ] {
            assert!(
                split(tf, bad.to_string().as_bytes(), &parts).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tensorflow_columnar_named() {
        let tf = Protocol::Tensorflow;
        let a = p(
            tf,
            json!({"signature_name": "s", "inputs": {"x": [[1.0, 2.0]], "ids": [7]}}),
        )
        .unwrap();
        // Input names in another order merge all the same.
        let b = p(
            tf,
            json!({"signature_name": "s", "inputs": {"ids": [8, 9], "x": [[3.0, 4.0], [5.0, 6.0]]}}),
        )
        .unwrap();
        assert!(a.merges_with(&b));
        assert_eq!(b.rows(), 2);
        let parts = [a, b];
        let m: Value = serde_json::from_slice(&merge(tf, &parts).unwrap()).unwrap();
        assert_eq!(
            m,
            json!({"signature_name": "s", "inputs": {"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "ids": [7, 8, 9]}})
        );
        let s = answers(
            tf,
            json!({"outputs": {"scores": [[0.1], [0.2], [0.3]], "label": ["a", "b", "c"]}}),
            &parts,
        );
        assert_eq!(
            s[0],
            json!({"outputs": {"scores": [[0.1]], "label": ["a"]}})
        );
        assert_eq!(
            s[1],
            json!({"outputs": {"scores": [[0.2], [0.3]], "label": ["b", "c"]}})
        );
        let s = answers(tf, json!({"outputs": [1, 2, 3]}), &parts);
        assert_eq!(s[1], json!({"outputs": [2, 3]}));
        let short = json!({"outputs": {"scores": [[0.1], [0.2]], "label": ["a", "b", "c"]}});
        assert!(split(tf, short.to_string().as_bytes(), &parts).is_err());
    }

    #[test]
    fn tensorflow_columnar_not_merging() {
        let tf = Protocol::Tensorflow;
        let base = p(tf, json!({"inputs": {"x": [[1]]}})).unwrap();
        // signature_name is part of the key (absent differs from any name).
        let sig = p(tf, json!({"signature_name": "s", "inputs": {"x": [[1]]}})).unwrap();
        let sig2 = p(tf, json!({"signature_name": "t", "inputs": {"x": [[1]]}})).unwrap();
        assert!(!base.merges_with(&sig) && !sig.merges_with(&sig2));
        // Other input names, the unnamed form, other inner shapes.
        for other in [
            json!({"inputs": {"y": [[1]]}}),
            json!({"inputs": {"x": [[1]], "y": [[1]]}}),
            json!({"inputs": [[1]]}),
            json!({"inputs": {"x": [[1, 2]]}}),
            json!({"inputs": {"x": [1]}}),
            json!({"instances": [{"x": [1]}]}),
        ] {
            assert!(!base.merges_with(&p(tf, other.clone()).unwrap()), "{other}");
        }
        // Requests that go alone.
        for alone in [
            json!({"inputs": {"x": [[1], [2]], "y": [[1]]}}),
            json!({"inputs": {"x": 1}}),
            json!({"inputs": {"x": [[1]], "y": "s"}}),
            json!({"inputs": 1.5}),
            json!({"inputs": "text"}),
            json!({"inputs": []}),
            json!({"inputs": {"x": []}}),
            json!({"inputs": {}}),
            json!({"inputs": {"x": [[1]]}, "other": 1}),
        ] {
            assert!(p(tf, alone.clone()).is_none(), "{alone}");
        }
    }
}
