//! Record batch v2 encoding: the records of one produce batch, written straight from their
//! [`OutRecord`] bytes into the batch buffer (no per-record copies), compressed as a whole when
//! a codec is set, with the header [`crate::fetch`]'s decoder reads (CRC-32C over attributes to
//! end, zigzag varints). The layout is documented in `fetch/records.rs`.

use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};

use super::{CompressionCodec, OutRecord};

/// baseOffset + batchLength.
const LOG_OVERHEAD: usize = 12;
/// The v2 batch header, up to and including the records count.
pub(crate) const BATCH_HEADER: usize = 61;
/// Where the CRC-covered part starts (the attributes).
const CRC_START: usize = 21;

/// What goes in a batch's header besides its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchMeta {
    /// -1 (with epoch -1 and sequence -1) when not idempotent.
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    /// Create time of every record (ms since the epoch).
    pub timestamp_ms: i64,
    /// Part of a transaction (attributes bit 4): readers with read_committed hold it back until
    /// its transaction's marker.
    pub transactional: bool,
}

impl BatchMeta {
    pub const fn plain(timestamp_ms: i64) -> Self {
        Self {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            timestamp_ms,
            transactional: false,
        }
    }
}

fn zigzag64(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn varint_len(v: i64) -> usize {
    let mut u = zigzag64(v);
    let mut n = 1;
    while u >= 0x80 {
        u >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut BytesMut, v: i64) {
    let mut u = zigzag64(v);
    while u >= 0x80 {
        buf.put_u8((u as u8) | 0x80);
        u >>= 7;
    }
    buf.put_u8(u as u8);
}

fn bytes_len(b: Option<&[u8]>) -> usize {
    match b {
        None => varint_len(-1),
        Some(b) => varint_len(b.len() as i64) + b.len(),
    }
}

fn put_bytes(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i64);
            buf.put_slice(b);
        }
    }
}

/// The record's body length (after its own length varint).
fn body_len(r: &OutRecord, offset_delta: i32) -> usize {
    1 // attributes
        + varint_len(0) // timestamp delta
        + varint_len(i64::from(offset_delta))
        + bytes_len(r.key.as_deref())
        + bytes_len(r.value.as_deref())
        + varint_len(r.headers.len() as i64)
        + r.headers
            .iter()
            .map(|(k, v)| bytes_len(Some(k.as_bytes())) + bytes_len(Some(v)))
            .sum::<usize>()
}

fn put_record(buf: &mut BytesMut, r: &OutRecord, offset_delta: i32) {
    let len = body_len(r, offset_delta);
    buf.reserve(len + 5);
    put_varint(buf, len as i64);
    buf.put_u8(0);
    put_varint(buf, 0);
    put_varint(buf, i64::from(offset_delta));
    put_bytes(buf, r.key.as_deref());
    put_bytes(buf, r.value.as_deref());
    put_varint(buf, r.headers.len() as i64);
    for (k, v) in &r.headers {
        put_bytes(buf, Some(k.as_bytes()));
        put_bytes(buf, Some(v));
    }
}

/// The exact encoded size of `records` uncompressed (header included).
pub fn encoded_len<'a>(records: impl IntoIterator<Item = &'a OutRecord>) -> usize {
    BATCH_HEADER
        + records
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let n = body_len(r, i as i32);
                varint_len(n as i64) + n
            })
            .sum::<usize>()
}

/// Encodes one batch of `records` (at least one) with `codec`.
pub fn encode<'a, I>(records: I, codec: CompressionCodec, meta: BatchMeta) -> std::io::Result<Bytes>
where
    I: IntoIterator<Item = &'a OutRecord>,
    I::IntoIter: Clone,
{
    let records = records.into_iter();
    let count = records.clone().count();
    assert!(count > 0, "a batch holds at least one record");
    let plain = codec == CompressionCodec::None;
    let mut buf = BytesMut::with_capacity(if plain {
        encoded_len(records.clone())
    } else {
        BATCH_HEADER + 64
    });
    buf.put_i64(0); // base offset: the broker assigns it
    buf.put_i32(0); // batch length, below
    buf.put_i32(-1); // partition leader epoch
    buf.put_i8(2); // magic
    buf.put_u32(0); // crc, below
    let codec_bits: i16 = match codec {
        CompressionCodec::None => 0,
        CompressionCodec::Gzip => 1,
        CompressionCodec::Snappy => 2,
        CompressionCodec::Lz4 => 3,
        CompressionCodec::Zstd => 4,
    };
    buf.put_i16(codec_bits | if meta.transactional { 1 << 4 } else { 0 });
    buf.put_i32(count as i32 - 1); // last offset delta
    buf.put_i64(meta.timestamp_ms);
    buf.put_i64(meta.timestamp_ms);
    buf.put_i64(meta.producer_id);
    buf.put_i16(meta.producer_epoch);
    buf.put_i32(meta.base_sequence);
    buf.put_i32(count as i32);
    debug_assert_eq!(buf.len(), BATCH_HEADER);
    if plain {
        for (i, r) in records.enumerate() {
            put_record(&mut buf, r, i as i32);
        }
    } else {
        let mut raw = BytesMut::with_capacity(encoded_len(records.clone()) - BATCH_HEADER);
        for (i, r) in records.enumerate() {
            put_record(&mut raw, r, i as i32);
        }
        let w = (&mut buf).writer();
        match codec {
            CompressionCodec::None => unreachable!(),
            CompressionCodec::Gzip => {
                let mut e = flate2::write::GzEncoder::new(w, flate2::Compression::default());
                e.write_all(&raw)?;
                e.finish()?;
            }
            CompressionCodec::Snappy => {
                // Raw snappy, as librdkafka writes it (every client reads it).
                let out = snap::raw::Encoder::new()
                    .compress_vec(&raw)
                    .map_err(std::io::Error::other)?;
                let mut w = w;
                w.write_all(&out)?;
            }
            CompressionCodec::Lz4 => {
                // The LZ4 frame format with independent blocks, the one Kafka supports.
                let mut e = lz4::EncoderBuilder::new()
                    .block_mode(lz4::BlockMode::Independent)
                    .build(w)?;
                e.write_all(&raw)?;
                let (_, r) = e.finish();
                r?;
            }
            CompressionCodec::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, 3)?;
                e.write_all(&raw)?;
                e.finish()?;
            }
        }
    }
    let len = (buf.len() - LOG_OVERHEAD) as i32;
    buf[8..12].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&buf[CRC_START..]);
    buf[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::records::decode;

    fn records() -> Vec<OutRecord> {
        vec![
            OutRecord {
                key: Some(Bytes::from_static(b"k1")),
                value: Some(Bytes::from(vec![7u8; 300])),
                headers: vec![
                    ("a".into(), Bytes::from_static(b"1")),
                    ("proto-name".into(), Bytes::from_static(b"x.Y")),
                ],
            },
            OutRecord {
                key: None,
                value: None,
                headers: vec![],
            },
            OutRecord {
                key: None,
                value: Some(Bytes::from(
                    (0..100_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
                )),
                headers: vec![("empty".into(), Bytes::new())],
            },
        ]
    }

    #[test]
    fn every_codec_round_trips_through_the_decoder() {
        let recs = records();
        for codec in [
            CompressionCodec::None,
            CompressionCodec::Gzip,
            CompressionCodec::Snappy,
            CompressionCodec::Lz4,
            CompressionCodec::Zstd,
        ] {
            let meta = BatchMeta {
                producer_id: 7,
                producer_epoch: 1,
                base_sequence: 42,
                timestamp_ms: 1_700_000_000_123,
                transactional: false,
            };
            let b = encode(&recs, codec, meta).unwrap();
            if codec == CompressionCodec::None {
                assert_eq!(b.len(), encoded_len(&recs));
            } else {
                assert!(b.len() < encoded_len(&recs), "{codec:?} compresses");
            }
            // The header fields the broker checks.
            assert_eq!(i64::from_be_bytes(b[43..51].try_into().unwrap()), 7);
            assert_eq!(i16::from_be_bytes(b[51..53].try_into().unwrap()), 1);
            assert_eq!(i32::from_be_bytes(b[53..57].try_into().unwrap()), 42);
            assert_eq!(i32::from_be_bytes(b[57..61].try_into().unwrap()), 3);
            let d = decode(&b, 0, &[], 1 << 24).unwrap();
            assert_eq!(d.next_offset, 3, "{codec:?}");
            assert_eq!(d.records.len(), 3, "{codec:?}");
            for (i, (got, want)) in d.records.iter().zip(&recs).enumerate() {
                assert_eq!(got.offset, i as i64);
                assert_eq!(got.key, want.key, "{codec:?}");
                assert_eq!(got.value, want.value, "{codec:?}");
                assert_eq!(got.headers, want.headers, "{codec:?}");
                assert_eq!(got.timestamp_ms, 1_700_000_000_123);
            }
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_crc() {
        let recs = records();
        let mut b = encode(&recs, CompressionCodec::None, BatchMeta::plain(1))
            .unwrap()
            .to_vec();
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(decode(&Bytes::from(b), 0, &[], 1 << 24).is_err());
    }

    #[test]
    fn size_estimate_is_an_upper_bound() {
        for r in records() {
            assert!(encoded_len([&r]) <= r.batch_size(), "{r:?}");
        }
        let recs = records();
        let est: usize =
            super::super::BATCH_OVERHEAD + recs.iter().map(OutRecord::size).sum::<usize>();
        assert!(encoded_len(&recs) <= est);
    }

    #[test]
    fn varints_match_the_protocol() {
        let mut b = BytesMut::new();
        for v in [0i64, -1, 1, 63, -64, 64, 300, i64::from(i32::MAX)] {
            b.clear();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
        b.clear();
        put_varint(&mut b, -1);
        assert_eq!(&b[..], &[1]);
        b.clear();
        put_varint(&mut b, 300);
        assert_eq!(&b[..], &[0xd8, 0x04]);
    }
}
