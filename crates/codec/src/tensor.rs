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

/// Builds a nested array of `shape` from row-major `values` (a single value is broadcast).
pub fn nest(shape: &[i64], values: Vec<Value>) -> Result<Value, CodecError> {
    let total: i64 = shape.iter().product();
    let values = if values.len() == 1 && total > 1 {
        vec![values[0].clone(); total as usize]
    } else {
        values
    };
    if shape.iter().any(|d| *d < 0) {
        return Err(err(format!("shape {shape:?} has an unknown dimension")));
    }
    if values.len() as i64 != total {
        return Err(err(format!(
            "shape {shape:?} needs {total} values, found {}",
            values.len()
        )));
    }
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
        let back = nest(&shape, leaves.into_iter().cloned().collect()).unwrap();
        assert_eq!(back, v);
        assert!(flatten(&json!([[1, 2], [3]])).is_err());
        assert!(flatten(&json!([[1, 2], 3])).is_err());
        assert_eq!(flatten(&json!(7)).unwrap().0, Vec::<i64>::new());
        assert_eq!(
            nest(&[2, 2], vec![json!(0)]).unwrap(),
            json!([[0, 0], [0, 0]])
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
