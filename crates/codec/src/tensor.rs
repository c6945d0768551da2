//! Tensor helpers shared by the transcoders: nested JSON arrays <-> flat values + shape, and
//! little-endian raw tensor bytes <-> JSON values.

use serde_json::{Number, Value};

use crate::error::CodecError;

fn err(why: impl Into<String>) -> CodecError {
    CodecError::Transcode(why.into())
}

/// Flattens a nested, rectangular JSON array; returns its shape and its leaves in row-major order.
/// A scalar has shape [].
pub fn flatten(v: &Value) -> Result<(Vec<i64>, Vec<&Value>), CodecError> {
    let mut shape = Vec::new();
    let mut probe = v;
    while let Value::Array(a) = probe {
        shape.push(a.len() as i64);
        match a.first() {
            Some(x) => probe = x,
            None => break,
        }
    }
    let mut out = Vec::new();
    walk(v, &shape, 0, &mut out)?;
    Ok((shape, out))
}

fn walk<'a>(
    v: &'a Value,
    shape: &[i64],
    depth: usize,
    out: &mut Vec<&'a Value>,
) -> Result<(), CodecError> {
    match v {
        Value::Array(a) => {
            if depth >= shape.len() || a.len() as i64 != shape[depth] {
                return Err(err(format!(
                    "ragged array: expected {} elements at depth {depth}, found {}",
                    shape.get(depth).copied().unwrap_or(0),
                    a.len()
                )));
            }
            for x in a {
                walk(x, shape, depth + 1, out)?;
            }
            Ok(())
        }
        leaf => {
            if depth != shape.len() {
                return Err(err(format!(
                    "ragged array: a value at depth {depth}, expected {}",
                    shape.len()
                )));
            }
            out.push(leaf);
            Ok(())
        }
    }
}

/// Size limits on what decoding may expand. Set once per [`crate::Transcoder`]; every tensor
/// is checked against them before anything of its size is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most memory one tensor, and all tensors of one message together, may take once
    /// decoded: [`ELEMENT_BYTES`] per element plus the bytes of string contents. The default,
    /// [`Limits::DEFAULT_MAX_TENSOR_BYTES`] (64 MiB, about 2 million values), is twice what the
    /// largest tensor a 1 MiB record can carry expands to (a million 1-byte values).
    pub max_tensor_bytes: u64,
}

impl Limits {
    pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 64 << 20;

    pub fn new(max_tensor_bytes: u64) -> Self {
        Self { max_tensor_bytes }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_TENSOR_BYTES)
    }
}

/// Memory one element takes once decoded (a JSON value), whatever its type on the wire.
pub const ELEMENT_BYTES: u64 = std::mem::size_of::<Value>() as u64;

/// Most dimensions a tensor may have (numpy's limit; TensorFlow's is 254). Deeper nesting would
/// also exceed JSON parsers' depth limits.
pub const MAX_RANK: usize = 64;

/// What the tensors of one message may still take: each tensor is charged before it is built.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    used: u64,
}

impl Budget {
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: *limits,
            used: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Charges a tensor of `elements` decoded values and `string_bytes` of string contents.
    pub fn take(
        &mut self,
        tensor: &str,
        elements: u64,
        string_bytes: u64,
    ) -> Result<(), CodecError> {
        let max = self.limits.max_tensor_bytes;
        let bytes = elements
            .checked_mul(ELEMENT_BYTES)
            .and_then(|b| b.checked_add(string_bytes));
        let too_large = |why: String| CodecError::TensorTooLarge {
            tensor: tensor.to_owned(),
            why,
        };
        let Some(bytes) = bytes.filter(|b| *b <= max) else {
            return Err(too_large(format!(
                "it would take {} once decoded, over the limit of {} per tensor",
                show_bytes(bytes),
                show_bytes(Some(max))
            )));
        };
        match self.used.checked_add(bytes).filter(|t| *t <= max) {
            Some(t) => {
                self.used = t;
                Ok(())
            }
            None => Err(too_large(format!(
                "with the message's other tensors it would take {} once decoded, over the \
                 limit of {} per message",
                show_bytes(self.used.checked_add(bytes)),
                show_bytes(Some(max))
            ))),
        }
    }
}

fn show_bytes(b: Option<u64>) -> String {
    match b {
        None => "more than 2^64 bytes".into(),
        Some(b) if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        Some(b) => format!("{b} bytes"),
    }
}

/// A shape for error messages (at most 8 dimensions shown).
pub fn show_shape(shape: &[i64]) -> String {
    if shape.len() <= 8 {
        format!("{shape:?}")
    } else {
        format!("{:?}... ({} dimensions)", &shape[..8], shape.len())
    }
}

fn bad_shape(tensor: &str, why: String) -> CodecError {
    CodecError::BadShape {
        tensor: tensor.to_owned(),
        why,
    }
}

/// The number of elements of `shape`: every dimension known (>= 0), at most [`MAX_RANK`]
/// dimensions, the product computed without overflow.
pub fn element_count(tensor: &str, shape: &[i64]) -> Result<u64, CodecError> {
    if shape.len() > MAX_RANK {
        return Err(bad_shape(
            tensor,
            format!(
                "{} dimensions, more than the {MAX_RANK} supported",
                shape.len()
            ),
        ));
    }
    if let Some(d) = shape.iter().find(|d| **d < 0) {
        return Err(bad_shape(
            tensor,
            format!(
                "shape {} has a negative (unknown) dimension {d}",
                show_shape(shape)
            ),
        ));
    }
    if shape.contains(&0) {
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d as u64))
        .ok_or_else(|| CodecError::TensorTooLarge {
            tensor: tensor.to_owned(),
            why: format!("shape {} has more than 2^64 elements", show_shape(shape)),
        })
}

/// Reads a dimension as proto3 JSON may write it: an integer, a numeric string, or an integral
/// float.
pub fn dim_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A JSON list of dimensions as a shape.
pub fn shape_of(tensor: &str, dims: &[Value]) -> Result<Vec<i64>, CodecError> {
    if dims.len() > MAX_RANK {
        return Err(bad_shape(
            tensor,
            format!(
                "{} dimensions, more than the {MAX_RANK} supported",
                dims.len()
            ),
        ));
    }
    dims.iter()
        .map(|d| {
            dim_of(d).ok_or_else(|| bad_shape(tensor, format!("dimension {d} is not an integer")))
        })
        .collect()
}

/// Checks that `values` values fill `shape` and charges the tensor to `budget`, before
/// anything of the tensor's size exists. `tf`: TensorFlow semantics, where a single value fills
/// any shape and the tensor is built as nested arrays (each array counts as a value too).
/// `string_bytes`: bytes of string contents (of the one value when it is broadcast). Returns
/// the element count.
pub fn check_tensor(
    tensor: &str,
    shape: &[i64],
    values: u64,
    tf: bool,
    string_bytes: u64,
    budget: &mut Budget,
) -> Result<u64, CodecError> {
    let n = element_count(tensor, shape)?;
    let broadcasting = tf && values == 1 && n > 1;
    if values != n && !broadcasting {
        return Err(bad_shape(
            tensor,
            format!(
                "shape {} needs {n} values, found {values}",
                show_shape(shape)
            ),
        ));
    }
    let strings = if broadcasting {
        string_bytes.saturating_mul(n)
    } else {
        string_bytes
    };
    // Nested arrays: one value per element and per array at every level.
    let cells = if tf {
        shape
            .iter()
            .try_fold((1u64, 0u64), |(p, total), d| {
                let p = p.checked_mul(*d as u64)?;
                Some((p, total.checked_add(p)?))
            })
            .map(|(_, total)| total.max(1))
            .unwrap_or(u64::MAX)
    } else {
        n
    };
    budget.take(tensor, cells, strings)?;
    Ok(n)
}

/// Builds a nested array of `shape` from row-major `values` (a single value is broadcast, as
/// TensorFlow does). Checked against `limits` before anything of the shape's size is made.
pub fn nest(
    tensor: &str,
    shape: &[i64],
    values: Vec<Value>,
    limits: &Limits,
) -> Result<Value, CodecError> {
    let string_bytes = values
        .iter()
        .map(|v| v.as_str().map_or(0, |s| s.len() as u64))
        .sum();
    let n = check_tensor(
        tensor,
        shape,
        values.len() as u64,
        true,
        string_bytes,
        &mut Budget::new(limits),
    )?;
    let values = if values.len() == 1 && n > 1 {
        vec![values[0].clone(); n as usize]
    } else {
        values
    };
    fn build(shape: &[i64], it: &mut std::vec::IntoIter<Value>) -> Value {
        match shape.split_first() {
            None => it.next().unwrap_or(Value::Null),
            Some((d, rest)) => Value::Array((0..*d).map(|_| build(rest, it)).collect()),
        }
    }
    Ok(build(shape, &mut values.into_iter()))
}

pub fn num_f64(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// IEEE 754 half -> f32.
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1f);
    let frac = u32::from(bits & 0x3ff);
    let v = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(v)
}

/// How many values little-endian raw tensor bytes of a v2 datatype hold, and the bytes of their
/// string contents (BYTES), read without decoding anything (a malformed length prefix is an
/// error here, like in [`decode_raw`]).
pub fn raw_count(datatype: &str, raw: &[u8]) -> Result<(u64, u64), CodecError> {
    let width = match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        "BYTES" => {
            let (mut n, mut strings) = (0u64, 0u64);
            let mut rest = raw;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err(err("BYTES raw contents: truncated length prefix"));
                }
                let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                rest = &rest[4..];
                if rest.len() < len {
                    return Err(err("BYTES raw contents: element longer than the data"));
                }
                rest = &rest[len..];
                n += 1;
                strings += len as u64;
            }
            return Ok((n, strings));
        }
        other => return Err(err(format!("unknown datatype `{other}`"))),
    };
    if !raw.len().is_multiple_of(width) {
        return Err(err(format!(
            "{} raw bytes are not a whole number of {datatype} values",
            raw.len()
        )));
    }
    Ok(((raw.len() / width) as u64, 0))
}

/// Decodes little-endian raw tensor bytes of a v2 datatype (or TF dtype name mapped to one).
pub fn decode_raw(datatype: &str, raw: &[u8]) -> Result<Vec<Value>, CodecError> {
    fn chunks<const N: usize>(raw: &[u8], dt: &str) -> Result<Vec<[u8; N]>, CodecError> {
        if !raw.len().is_multiple_of(N) {
            return Err(err(format!(
                "{} raw bytes are not a whole number of {dt} values",
                raw.len()
            )));
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| c.try_into().expect("chunk of N"))
            .collect())
    }
    Ok(match datatype {
        "BOOL" => raw.iter().map(|b| Value::Bool(*b != 0)).collect(),
        "UINT8" => raw.iter().map(|b| Value::from(*b)).collect(),
        "INT8" => raw.iter().map(|b| Value::from(*b as i8)).collect(),
        "UINT16" => chunks::<2>(raw, datatype)?
            .into_iter()
            .map(|c| Value::from(u16::from_le_bytes(c)))
            .collect(),
        "INT16" => chunks::<2>(raw, datatype)?
            .into_iter()
            .map(|c| Value::from(i16::from_le_bytes(c)))
            .collect(),
        "UINT32" => chunks::<4>(raw, datatype)?
            .into_iter()
            .map(|c| Value::from(u32::from_le_bytes(c)))
            .collect(),
        "INT32" => chunks::<4>(raw, datatype)?
            .into_iter()
            .map(|c| Value::from(i32::from_le_bytes(c)))
            .collect(),
        "UINT64" => chunks::<8>(raw, datatype)?
            .into_iter()
            .map(|c| Value::from(u64::from_le_bytes(c)))
            .collect(),
        "INT64" => chunks::<8>(raw, datatype)?
            .into_iter()
            .map(|c| Value::from(i64::from_le_bytes(c)))
            .collect(),
        "FP16" => chunks::<2>(raw, datatype)?
            .into_iter()
            .map(|c| num_f64(f64::from(f16_to_f32(u16::from_le_bytes(c)))))
            .collect(),
        "BF16" => chunks::<2>(raw, datatype)?
            .into_iter()
            .map(|c| {
                num_f64(f64::from(f32::from_bits(
                    u32::from(u16::from_le_bytes(c)) << 16,
                )))
            })
            .collect(),
        "FP32" => chunks::<4>(raw, datatype)?
            .into_iter()
            .map(|c| num_f64(f64::from(f32::from_le_bytes(c))))
            .collect(),
        "FP64" => chunks::<8>(raw, datatype)?
            .into_iter()
            .map(|c| num_f64(f64::from_le_bytes(c)))
            .collect(),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err(err("BYTES raw contents: truncated length prefix"));
                }
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                rest = &rest[4..];
                if rest.len() < n {
                    return Err(err("BYTES raw contents: element longer than the data"));
                }
                out.push(Value::String(
                    String::from_utf8_lossy(&rest[..n]).into_owned(),
                ));
                rest = &rest[n..];
            }
            out
        }
        other => return Err(err(format!("unknown datatype `{other}`"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flatten_and_nest_round_trip() {
        let v = json!([[1, 2, 3], [4, 5, 6]]);
        let (shape, leaves) = flatten(&v).unwrap();
        assert_eq!(shape, [2, 3]);
        let l = Limits::default();
        let back = nest("t", &shape, leaves.into_iter().cloned().collect(), &l).unwrap();
        assert_eq!(back, v);
        assert!(flatten(&json!([[1, 2], [3]])).is_err());
        assert!(flatten(&json!([[1, 2], 3])).is_err());
        assert_eq!(flatten(&json!(7)).unwrap().0, Vec::<i64>::new());
        assert_eq!(
            nest("t", &[2, 2], vec![json!(0)], &l).unwrap(),
            json!([[0, 0], [0, 0]])
        );
    }

    #[test]
    fn shapes_are_checked_before_anything_is_built() {
        let l = Limits::default();
        let kind = |r: Result<Value, CodecError>| r.unwrap_err().kind();
        // One value broadcast to 2^40 elements, 2^64+ elements, unknown dimensions.
        assert_eq!(
            kind(nest("t", &[1 << 40], vec![json!(1)], &l)),
            "tensor-too-large"
        );
        assert_eq!(
            kind(nest("t", &[1 << 62, 1 << 62], vec![json!(1)], &l)),
            "tensor-too-large"
        );
        assert_eq!(kind(nest("t", &[-1, 3], vec![json!(1)], &l)), "bad-shape");
        assert_eq!(kind(nest("t", &[2, 3], vec![json!(1); 5], &l)), "bad-shape");
        assert_eq!(kind(nest("t", &[0], vec![json!(1)], &l)), "bad-shape");
        // No elements, but 2^40 empty arrays to build.
        assert_eq!(
            kind(nest("t", &[1 << 40, 0], vec![], &l)),
            "tensor-too-large"
        );
        assert_eq!(nest("t", &[3, 0], vec![], &l).unwrap(), json!([[], [], []]));
        // Too many dimensions (deep nesting would overflow the stack when built or dropped).
        assert_eq!(kind(nest("t", &[1; 100], vec![json!(1)], &l)), "bad-shape");
        // A broadcast string counts its bytes once per element.
        let small = Limits::new(10_000);
        let s = json!("x".repeat(100));
        assert!(nest("t", &[10], vec![s.clone()], &small).is_ok());
        assert_eq!(kind(nest("t", &[100], vec![s], &small)), "tensor-too-large");
        let e = nest("big", &[1 << 40], vec![json!(1)], &l).unwrap_err();
        assert!(
            e.to_string().contains("`big`") && e.to_string().contains("64 MiB"),
            "{e}"
        );
    }

    #[test]
    fn counts_and_budget() {
        assert_eq!(element_count("t", &[]).unwrap(), 1);
        assert_eq!(element_count("t", &[1 << 62, 1 << 62, 0]).unwrap(), 0);
        assert_eq!(
            element_count("t", &[i64::MAX, 3]).unwrap_err().kind(),
            "tensor-too-large"
        );
        assert_eq!(raw_count("FP32", &[0; 8]).unwrap(), (2, 0));
        assert!(raw_count("FP32", &[0; 7]).is_err());
        let bytes = [2u32.to_le_bytes().as_slice(), b"hi"].concat();
        assert_eq!(raw_count("BYTES", &bytes).unwrap(), (1, 2));
        assert!(raw_count("BYTES", &u32::MAX.to_le_bytes()).is_err());
        // Each tensor fits, all of them together do not.
        let mut b = Budget::new(&Limits::new(100 * ELEMENT_BYTES));
        assert!(b.take("a", 60, 0).is_ok());
        let e = b.take("b", 60, 0).unwrap_err();
        assert!(e.to_string().contains("per message"), "{e}");
        assert!(b.take("c", 40, 0).is_ok());
        assert_eq!(
            shape_of("t", &[json!(2), json!("3"), json!(4.0)]).unwrap(),
            [2, 3, 4]
        );
        assert_eq!(
            shape_of("t", &[json!("x")]).unwrap_err().kind(),
            "bad-shape"
        );
    }

    #[test]
    fn raw_decoding() {
        let raw: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(
            decode_raw("FP32", &raw).unwrap(),
            vec![json!(1.5), json!(-2.0)]
        );
        let bytes = [
            2u32.to_le_bytes().as_slice(),
            b"hi",
            0u32.to_le_bytes().as_slice(),
        ]
        .concat();
        assert_eq!(
            decode_raw("BYTES", &bytes).unwrap(),
            vec![json!("hi"), json!("")]
        );
        assert!(decode_raw("FP32", &[0, 0, 0]).is_err());
        assert!(decode_raw("BYTES", &[9, 0, 0, 0, 1]).is_err());
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }
}
