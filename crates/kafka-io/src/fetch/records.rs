//! Record batch v2 decoding for a read_committed fetch: the `records` bytes of one partition of a
//! Fetch response in, the records a read_committed consumer may see and the next offset out.
//!
//! Layout of a batch (all big-endian; varints are zigzag LEB128):
//! ```text
//! baseOffset i64 | batchLength i32 | partitionLeaderEpoch i32 | magic i8 (=2) | crc u32 (CRC-32C
//! of everything after it) | attributes i16 (bits 0-2 codec, 3 log-append time, 4 transactional,
//! 5 control) | lastOffsetDelta i32 | baseTimestamp i64 | maxTimestamp i64 | producerId i64 |
//! producerEpoch i16 | baseSequence i32 | recordsCount i32 | records (compressed as a whole)
//! record: length varint | attributes i8 | timestampDelta varlong | offsetDelta varint |
//!         key (varint length, -1 = null) | value (same) | headers count varint |
//!         header: key (varint length, UTF-8) | value (varint length, -1 = null)
//! ```
//!
//! Every length read is checked against the bytes left before anything is sliced or reserved;
//! decompression is bounded by a byte budget. Nothing here panics on any input.

use std::{
    collections::{HashMap, HashSet},
    io::Read,
};

use bytes::Bytes;

use super::FetchedRecord;

/// baseOffset + batchLength.
const LOG_OVERHEAD: usize = 12;
/// The v2 batch header, up to and including the records count.
const BATCH_HEADER: usize = 61;
/// Where the CRC-covered part of a batch starts (the attributes).
const CRC_START: usize = 21;
/// The smallest possible record: length, attributes, timestamp delta, offset delta, key length,
/// value length, header count, one byte each.
const MIN_RECORD: usize = 7;
/// Raw snappy emits at most 64 bytes per 3 input bytes (a 2-byte-offset copy); a claimed length
/// beyond this ratio is a lie.
const SNAPPY_MAX_RATIO: usize = 22;
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\0";
/// The xerial header: magic, version, compatible version.
const XERIAL_HEADER: usize = 16;

const ATTR_CODEC: i16 = 0x07;
const ATTR_LOG_APPEND_TIME: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// One entry of a Fetch response's aborted_transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
}

/// What one partition's records bytes give a read_committed consumer.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    /// Committed and non-transactional records at or after the fetch offset, in offset order.
    pub records: Vec<FetchedRecord>,
    /// The last offset of the last batch walked + 1 (control and aborted batches included), or
    /// the fetch offset when no batch was walked; after the last record when the cost limit cut
    /// a batch.
    pub next_offset: i64,
    /// The cost limit stopped the walk (more records follow at `next_offset`).
    pub cut: bool,
}

/// A transaction marker: the key of a control batch's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marker {
    Abort,
    Commit,
    /// A control record of another type (e.g. leader change): skipped like the others.
    Other,
}

/// A complete batch whose header and CRC are checked.
#[derive(Debug)]
struct Batch {
    base_offset: i64,
    last_offset: i64,
    attributes: i16,
    producer_id: i64,
    base_timestamp: i64,
    max_timestamp: i64,
    count: i32,
    /// The records part, still compressed.
    body: Bytes,
    /// For control batches, the marker type (None: a control batch without records).
    marker: Option<Marker>,
}

impl Batch {
    fn codec(&self) -> i16 {
        self.attributes & ATTR_CODEC
    }
    fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }
    fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
    fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }
    fn next_offset(&self) -> i64 {
        self.last_offset.saturating_add(1)
    }
}

/// How the walk over the bytes ended.
#[derive(Debug)]
enum End {
    /// Every byte belongs to a complete batch.
    Clean,
    /// A last batch cut short (max_bytes): ignored. `needs` is its full size when known.
    Truncated {
        offset: Option<i64>,
        needs: Option<usize>,
        have: usize,
    },
    /// A batch that cannot be read; the batches before it are fine.
    Bad(String),
}

/// Why decompression gave up.
enum Inflate {
    /// The output would pass the byte budget.
    TooLarge,
    Bad(String),
}

/// Decodes the records bytes of one partition for a read_committed consumer that asked for
/// `fetch_offset`. `aborted` is the response's aborted_transactions list (any order).
/// `max_inflated` bounds the bytes decompressed for this call.
///
/// A batch that cannot be read (corrupt, old format, too large once decompressed) ends the walk:
/// the records before it are returned and `next_offset` stops at it, so the next call starts
/// there and fails with its error; when it is the first batch, the error is returned.
pub fn decode(
    data: &Bytes,
    fetch_offset: i64,
    aborted: &[AbortedTxn],
    max_inflated: usize,
) -> Result<Decoded, String> {
    decode_limited(data, fetch_offset, aborted, max_inflated, usize::MAX)
}

/// [`decode`], handing out records only while their summed [`record_cost`](super::budget::record_cost)
/// stays within `max_cost` (the first record always comes, whatever it costs: the caller judges
/// it). A batch cut this way ends the walk at its last record handed out, and the records taken
/// from it are copied out of its decompressed bytes, so they do not keep the rest alive.
pub fn decode_limited(
    data: &Bytes,
    fetch_offset: i64,
    aborted: &[AbortedTxn],
    max_inflated: usize,
    max_cost: usize,
) -> Result<Decoded, String> {
    let (batches, end) = split(data, max_inflated);

    // Look-ahead: for each transactional data batch, whether the next marker of its producer in
    // these bytes is an ABORT. Always sound (a producer's transactional batches on a partition
    // belong to the transaction its next marker ends), and it catches aborted transactions a
    // broker leaves out of aborted_transactions (tansu does).
    let mut aborted_ahead = vec![false; batches.len()];
    let mut next_marker: HashMap<i64, Marker> = HashMap::new();
    for (i, b) in batches.iter().enumerate().rev() {
        if b.is_control() {
            if let Some(m) = b.marker {
                next_marker.insert(b.producer_id, m);
            }
        } else if b.is_transactional() {
            aborted_ahead[i] = next_marker.get(&b.producer_id) == Some(&Marker::Abort);
        }
    }

    // The Java consumer's walk: the aborted list sorted by first offset; a producer becomes
    // aborted when a batch reaches its aborted transaction's first offset, and stops being so at
    // its ABORT marker.
    let mut pending: Vec<AbortedTxn> = aborted.to_vec();
    pending.sort_by_key(|a| a.first_offset);
    let mut pending = pending.into_iter().peekable();
    let mut aborted_pids: HashSet<i64> = HashSet::new();

    let mut out = Decoded {
        records: Vec::new(),
        next_offset: fetch_offset,
        cut: false,
    };
    let mut cost = 0usize;
    // Records below this offset are not handed out (before the fetch offset, or repeated).
    let mut keep_from = fetch_offset;
    let mut inflated = 0usize;
    let mut stopped: Option<String> = None;
    for (i, b) in batches.iter().enumerate() {
        if b.has_producer_id() {
            while let Some(a) = pending.next_if(|a| a.first_offset <= b.last_offset) {
                aborted_pids.insert(a.producer_id);
            }
            if b.marker == Some(Marker::Abort) {
                aborted_pids.remove(&b.producer_id);
            } else if b.is_transactional()
                && (aborted_pids.contains(&b.producer_id) || aborted_ahead[i])
            {
                out.next_offset = out.next_offset.max(b.next_offset());
                continue;
            }
        }
        if b.is_control() || b.last_offset < keep_from {
            out.next_offset = out.next_offset.max(b.next_offset());
            continue;
        }
        let budget = max_inflated.saturating_sub(inflated);
        let records = match inflate(b, budget) {
            Ok(r) => r,
            Err(Inflate::TooLarge) => {
                stopped = Some(format!(
                    "the batch at offset {} decompresses to more than {budget} bytes \
                     (limit {max_inflated} per fetch)",
                    b.base_offset
                ));
                break;
            }
            Err(Inflate::Bad(why)) => {
                stopped = Some(format!("the batch at offset {}: {why}", b.base_offset));
                break;
            }
        };
        if b.codec() != 0 {
            inflated += records.len();
        }
        // Decoded into a side vector: a batch that fails halfway gives nothing.
        let mut got = Vec::new();
        let first = out.records.is_empty();
        // Entered mid-batch (the rest of a batch cut by an earlier call): the records taken
        // would keep the skipped part of its bytes alive.
        let entered_midway = keep_from > b.base_offset;
        let cut = match decode_records(b, &records, keep_from, &mut got, max_cost, &mut cost, first)
        {
            Ok(cut) => cut,
            Err(why) => {
                stopped = Some(format!("the batch at offset {}: {why}", b.base_offset));
                break;
            }
        };
        if let Some(last) = got.last() {
            keep_from = last.offset + 1;
        }
        if cut || entered_midway {
            compact(&mut got);
        }
        if cut {
            out.records.append(&mut got);
            out.next_offset = out.next_offset.max(keep_from);
            out.cut = true;
            break;
        }
        out.records.append(&mut got);
        out.next_offset = out.next_offset.max(b.next_offset());
    }

    let progressed = out.next_offset > fetch_offset || !out.records.is_empty();
    if let Some(why) = stopped.or(match &end {
        End::Bad(why) => Some(why.clone()),
        _ => None,
    }) {
        if progressed {
            tracing::debug!(error = %why, next = out.next_offset, "fetch: stopped before a bad batch");
            return Ok(out);
        }
        return Err(why);
    }
    if !progressed
        && let End::Truncated {
            offset,
            needs,
            have,
        } = end
    {
        // Kafka sends the first batch whole whatever max_bytes says (Fetch v3+), so this is a
        // broker that cut it: fetching again cannot help, the caller must ask for more bytes.
        let what = match (offset, needs) {
            (Some(o), Some(n)) => format!(": the batch at offset {o} needs {n} bytes"),
            (Some(o), None) => format!(": the batch at offset {o} is cut short"),
            _ => String::new(),
        };
        return Err(format!(
            "no complete record batch in {have} bytes{what}; raise max_bytes"
        ));
    }
    Ok(out)
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

/// Splits the bytes into complete, checked batches, up to the first that cannot be read.
fn split(data: &Bytes, max_inflated: usize) -> (Vec<Batch>, End) {
    let mut batches = Vec::new();
    let mut pos = 0usize;
    let end = loop {
        let rest = data.len() - pos;
        if rest == 0 {
            break End::Clean;
        }
        let b = &data[pos..];
        if rest < LOG_OVERHEAD {
            break End::Truncated {
                offset: (rest >= 8).then(|| be_i64(b, 0)),
                needs: None,
                have: rest,
            };
        }
        let base_offset = be_i64(b, 0);
        let length = be_i32(b, 8);
        // The magic byte sits at the same place in every format; check it first so that an old
        // message set gets a clear error rather than a parse failure.
        if rest > 16 && b[16] != 2 {
            break End::Bad(format!(
                "the batch at offset {base_offset} has message format v{} (magic byte); only \
                 record batch v2 (Kafka 0.11+) is supported",
                b[16] as i8
            ));
        }
        let Ok(length) = usize::try_from(length) else {
            break End::Bad(format!(
                "the batch at offset {base_offset} has a negative length {length}"
            ));
        };
        let total = LOG_OVERHEAD + length;
        if total < BATCH_HEADER {
            break End::Bad(format!(
                "the batch at offset {base_offset} has length {length}, shorter than a v2 header"
            ));
        }
        if total > rest {
            break End::Truncated {
                offset: Some(base_offset),
                needs: Some(total),
                have: rest,
            };
        }
        let b = &b[..total];
        let crc = be_i32(b, 17) as u32;
        let computed = crc32c::crc32c(&b[CRC_START..]);
        if crc != computed {
            break End::Bad(format!(
                "the batch at offset {base_offset} is corrupt (CRC-32C {computed:#010x}, \
                 header says {crc:#010x})"
            ));
        }
        let last_delta = be_i32(b, 23);
        let Some(last_offset) = (last_delta >= 0)
            .then(|| base_offset.checked_add(i64::from(last_delta)))
            .flatten()
        else {
            break End::Bad(format!(
                "the batch at offset {base_offset} has a bad last offset delta {last_delta}"
            ));
        };
        let mut batch = Batch {
            base_offset,
            last_offset,
            attributes: be_i16(b, 21),
            base_timestamp: be_i64(b, 27),
            max_timestamp: be_i64(b, 35),
            producer_id: be_i64(b, 43),
            count: be_i32(b, 57),
            body: data.slice(pos + BATCH_HEADER..pos + total),
            marker: None,
        };
        if batch.is_control() {
            match control_marker(&batch, max_inflated) {
                Ok(m) => batch.marker = m,
                Err(why) => {
                    break End::Bad(format!("the control batch at offset {base_offset}: {why}"));
                }
            }
        }
        batches.push(batch);
        pos += total;
    };
    (batches, end)
}

/// The type of a control batch's first record (as the Java client reads it).
fn control_marker(b: &Batch, max_inflated: usize) -> Result<Option<Marker>, String> {
    let records = match inflate(b, max_inflated) {
        Ok(r) => r,
        Err(Inflate::TooLarge) => return Err("decompresses to too many bytes".into()),
        Err(Inflate::Bad(why)) => return Err(why),
    };
    if b.count == 0 {
        return Ok(None);
    }
    let mut r = Reader::new(&records);
    let rec = r.record()?;
    let Some(key) = rec.key else {
        return Err("control record without a key".into());
    };
    if key.len() < 4 {
        return Err(format!("control record key of {} bytes", key.len()));
    }
    Ok(Some(match be_i16(&key, 2) {
        0 => Marker::Abort,
        1 => Marker::Commit,
        _ => Marker::Other,
    }))
}

/// The batch's records bytes, decompressed within `budget` bytes.
fn inflate(b: &Batch, budget: usize) -> Result<Bytes, Inflate> {
    let input = &b.body[..];
    let out = match b.codec() {
        0 => return Ok(b.body.clone()),
        1 => read_limited(flate2::read::MultiGzDecoder::new(input), budget)?,
        2 => snappy(input, budget)?,
        3 => {
            let d = lz4::Decoder::new(input).map_err(|e| Inflate::Bad(format!("lz4: {e}")))?;
            read_limited(d, budget)?
        }
        4 => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Inflate::Bad(format!("zstd: {e}")))?;
            // The window the frame asks for is allocated up front: keep it within the budget
            // (2^10..2^27, zstd's own default maximum).
            let log = usize::BITS - budget.max(1).leading_zeros();
            d.window_log_max(log.clamp(10, 27))
                .map_err(|e| Inflate::Bad(format!("zstd: {e}")))?;
            read_limited(d, budget)?
        }
        c => return Err(Inflate::Bad(format!("unknown compression codec {c}"))),
    };
    Ok(Bytes::from(out))
}

fn read_limited(r: impl Read, budget: usize) -> Result<Vec<u8>, Inflate> {
    let mut out = Vec::new();
    r.take(budget as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Inflate::Bad(format!("decompression failed: {e}")))?;
    if out.len() > budget {
        return Err(Inflate::TooLarge);
    }
    Ok(out)
}

/// Snappy as Kafka clients write it: raw snappy (librdkafka, newer clients) or the xerial
/// snappy-java framing (the Java client: magic, two version words, then length-prefixed raw
/// blocks), as the Java and librdkafka readers accept both.
fn snappy(input: &[u8], budget: usize) -> Result<Vec<u8>, Inflate> {
    let mut out = Vec::new();
    if input.starts_with(XERIAL_MAGIC) {
        if input.len() < XERIAL_HEADER {
            return Err(Inflate::Bad("snappy: xerial header cut short".into()));
        }
        let mut rest = &input[XERIAL_HEADER..];
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(Inflate::Bad("snappy: xerial block length cut short".into()));
            }
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            rest = &rest[4..];
            if n > rest.len() {
                return Err(Inflate::Bad(format!(
                    "snappy: xerial block of {n} bytes with {} left",
                    rest.len()
                )));
            }
            snappy_raw(&rest[..n], budget, &mut out)?;
            rest = &rest[n..];
        }
    } else {
        snappy_raw(input, budget, &mut out)?;
    }
    Ok(out)
}

fn snappy_raw(input: &[u8], budget: usize, out: &mut Vec<u8>) -> Result<(), Inflate> {
    let bad = |e: snap::Error| Inflate::Bad(format!("snappy: {e}"));
    let n = snap::raw::decompress_len(input).map_err(bad)?;
    if n > input.len().saturating_mul(SNAPPY_MAX_RATIO) {
        return Err(Inflate::Bad(format!(
            "snappy: {} bytes claim to hold {n}",
            input.len()
        )));
    }
    if out.len().saturating_add(n) > budget {
        return Err(Inflate::TooLarge);
    }
    let start = out.len();
    out.resize(start + n, 0);
    let got = snap::raw::Decoder::new()
        .decompress(input, &mut out[start..])
        .map_err(bad)?;
    if got != n {
        return Err(Inflate::Bad(format!(
            "snappy: {got} bytes decoded, {n} announced"
        )));
    }
    Ok(())
}

/// One record as read, before it is kept or dropped.
struct RawRecord {
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Bytes)>,
}

/// Appends the batch's records at or after `keep_from` to `out` while `cost` stays within
/// `max_cost` (the first one regardless when `first`); true when that cut the batch short.
fn decode_records(
    b: &Batch,
    records: &Bytes,
    keep_from: i64,
    out: &mut Vec<FetchedRecord>,
    max_cost: usize,
    cost: &mut usize,
    mut first: bool,
) -> Result<bool, String> {
    let count = usize::try_from(b.count).map_err(|_| format!("record count {}", b.count))?;
    let mut r = Reader::new(records);
    // Never more than the cost limit lets through (a batch may announce a million records).
    let fit = (max_cost / super::budget::RECORD_OVERHEAD).saturating_add(1);
    out.reserve(count.min(r.remaining() / MIN_RECORD).min(fit));
    let mut last_kept = keep_from.saturating_sub(1);
    for i in 0..count {
        if r.remaining() == 0 {
            return Err(format!("{count} records announced, {i} found"));
        }
        let rec = r.record()?;
        let offset = b
            .base_offset
            .checked_add(i64::from(rec.offset_delta))
            .ok_or_else(|| format!("offset delta {} overflows", rec.offset_delta))?;
        // A record outside its batch's range would be handed out again from the next fetch
        // (which starts after the batch's last offset): the batch is corrupt.
        if offset < b.base_offset || offset > b.last_offset {
            return Err(format!(
                "record offset {offset} outside its batch ({}..={})",
                b.base_offset, b.last_offset
            ));
        }
        if offset <= last_kept {
            continue;
        }
        let timestamp_ms = if b.attributes & ATTR_LOG_APPEND_TIME != 0 {
            b.max_timestamp
        } else {
            b.base_timestamp.wrapping_add(rec.timestamp_delta)
        };
        let c = super::budget::record_cost(rec.key.as_ref(), rec.value.as_ref(), &rec.headers);
        if !first && cost.saturating_add(c) > max_cost {
            return Ok(true);
        }
        first = false;
        *cost = cost.saturating_add(c);
        out.push(FetchedRecord {
            offset,
            key: rec.key,
            value: rec.value,
            headers: rec.headers,
            timestamp_ms,
        });
        last_kept = offset;
    }
    if r.remaining() != 0 {
        return Err(format!(
            "{} bytes left after the {count} records announced",
            r.remaining()
        ));
    }
    Ok(false)
}

/// Copies the records' keys, values and header values into one buffer of their own (they were
/// slices of a whole batch's bytes, most of which is not handed out).
pub(crate) fn compact(records: &mut [FetchedRecord]) {
    let total: usize = records
        .iter()
        .map(|r| {
            r.key.as_ref().map_or(0, Bytes::len)
                + r.value.as_ref().map_or(0, Bytes::len)
                + r.headers.iter().map(|(_, v)| v.len()).sum::<usize>()
        })
        .sum();
    let mut buf = bytes::BytesMut::with_capacity(total);
    let mut put = |b: &mut Bytes| {
        if !b.is_empty() {
            buf.extend_from_slice(b);
            *b = buf.split().freeze();
        }
    };
    for r in records.iter_mut() {
        if let Some(k) = r.key.as_mut() {
            put(k);
        }
        if let Some(v) = r.value.as_mut() {
            put(v);
        }
        for (_, v) in r.headers.iter_mut() {
            put(v);
        }
    }
}

/// A cursor over `buf[pos..end]` that never reads past `end`.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Self {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    fn u8(&mut self) -> Result<u8, String> {
        if self.pos >= self.end {
            return Err("record cut short".into());
        }
        self.pos += 1;
        Ok(self.buf[self.pos - 1])
    }

    /// An unsigned LEB128 of at most `max_bytes` bytes.
    fn uleb(&mut self, max_bytes: u32) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..max_bytes {
            let byte = self.u8()?;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn varint(&mut self) -> Result<i32, String> {
        let u = self.uleb(5)?;
        let u = u32::try_from(u).map_err(|_| "varint out of range".to_string())?;
        Ok(((u >> 1) as i32) ^ -((u & 1) as i32))
    }

    fn varlong(&mut self) -> Result<i64, String> {
        let u = self.uleb(10)?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    /// `n` bytes as a slice of the shared buffer (no copy).
    fn take(&mut self, n: usize) -> Result<Bytes, String> {
        if n > self.remaining() {
            return Err(format!("{n} bytes announced, {} left", self.remaining()));
        }
        self.pos += n;
        Ok(self.buf.slice(self.pos - n..self.pos))
    }

    /// A varint length (-1 = null) and the bytes.
    fn nullable(&mut self) -> Result<Option<Bytes>, String> {
        match self.varint()? {
            -1 => Ok(None),
            n if n < 0 => Err(format!("length {n}")),
            n => self.take(n as usize).map(Some),
        }
    }

    /// One whole record; it must use exactly the bytes its length says.
    fn record(&mut self) -> Result<RawRecord, String> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| format!("record length {len}"))?;
        if len > self.remaining() {
            return Err(format!(
                "record of {len} bytes with {} left",
                self.remaining()
            ));
        }
        let at = self.pos;
        let mut r = Reader {
            buf: self.buf,
            pos: at,
            end: at + len,
        };
        r.u8()?; // attributes: unused
        let timestamp_delta = r.varlong()?;
        let offset_delta = r.varint()?;
        let key = r.nullable()?;
        let value = r.nullable()?;
        let n = r.varint()?;
        // A header takes at least two bytes (two lengths).
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= r.remaining() / 2)
            .ok_or_else(|| format!("header count {n} with {} bytes left", r.remaining()))?;
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            let klen = r.varint()?;
            let klen = usize::try_from(klen).map_err(|_| format!("header key length {klen}"))?;
            let k = r.take(klen)?;
            let v = r.nullable()?.unwrap_or_default();
            headers.push((String::from_utf8_lossy(&k).into_owned(), v));
        }
        if r.remaining() != 0 {
            return Err(format!("{} bytes left inside a record", r.remaining()));
        }
        self.pos = r.end;
        Ok(RawRecord {
            timestamp_delta,
            offset_delta,
            key,
            value,
            headers,
        })
    }
}

#[cfg(test)]
mod tests;
