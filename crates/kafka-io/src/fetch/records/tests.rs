//! Crafted record batches: every codec, control batches, aborted transactions (listed by the
//! broker or not), offsets inside a batch, truncation, hostile lengths, and seeded mutations.

use std::io::Write;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;

const BIG: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    None,
    Gzip,
    Snappy,
    SnappyXerial,
    Lz4,
    Zstd,
}

impl Codec {
    fn bits(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy | Codec::SnappyXerial => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }

    fn compress(self, raw: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => raw.to_vec(),
            Codec::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(raw).unwrap();
                e.finish().unwrap()
            }
            Codec::Snappy => snap::raw::Encoder::new().compress_vec(raw).unwrap(),
            Codec::SnappyXerial => {
                // Blocks of 7 bytes, to have several.
                let mut out = XERIAL_MAGIC.to_vec();
                out.extend_from_slice(&1i32.to_be_bytes());
                out.extend_from_slice(&1i32.to_be_bytes());
                for chunk in raw.chunks(7) {
                    let c = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
                    out.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    out.extend_from_slice(&c);
                }
                out
            }
            Codec::Lz4 => {
                let mut e = lz4::EncoderBuilder::new().build(Vec::new()).unwrap();
                e.write_all(raw).unwrap();
                let (out, r) = e.finish();
                r.unwrap();
                out
            }
            Codec::Zstd => zstd::encode_all(raw, 3).unwrap(),
        }
    }
}

const ALL_CODECS: [Codec; 6] = [
    Codec::None,
    Codec::Gzip,
    Codec::Snappy,
    Codec::SnappyXerial,
    Codec::Lz4,
    Codec::Zstd,
];

fn varint(out: &mut Vec<u8>, v: i64) {
    let mut u = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        if u < 0x80 {
            out.push(u as u8);
            return;
        }
        out.push((u as u8 & 0x7f) | 0x80);
        u >>= 7;
    }
}

fn nullable(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => varint(out, -1),
        Some(b) => {
            varint(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

/// One record's bytes (length prefix included).
struct Rec<'a> {
    offset_delta: i32,
    ts_delta: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

fn rec(offset_delta: i32, value: &str) -> Rec<'_> {
    Rec {
        offset_delta,
        ts_delta: i64::from(offset_delta) * 10,
        key: Some(value.as_bytes()),
        value: Some(value.as_bytes()),
        headers: vec![("n", Some(value.as_bytes()))],
    }
}

fn encode_record(r: &Rec) -> Vec<u8> {
    let mut body = vec![0u8];
    varint(&mut body, r.ts_delta);
    varint(&mut body, i64::from(r.offset_delta));
    nullable(&mut body, r.key);
    nullable(&mut body, r.value);
    varint(&mut body, r.headers.len() as i64);
    for (k, v) in &r.headers {
        nullable(&mut body, Some(k.as_bytes()));
        nullable(&mut body, *v);
    }
    let mut out = Vec::new();
    varint(&mut out, body.len() as i64);
    out.extend_from_slice(&body);
    out
}

const BASE_TS: i64 = 1_700_000_000_000;

/// A v2 batch of already encoded records bytes (compressed by `codec`).
fn batch_raw(
    base: i64,
    last_delta: i32,
    attrs: i16,
    pid: i64,
    count: i32,
    records: &[u8],
    codec: Codec,
) -> Vec<u8> {
    let body = codec.compress(records);
    let mut after_crc = Vec::new();
    after_crc.extend_from_slice(&(attrs | codec.bits()).to_be_bytes());
    after_crc.extend_from_slice(&last_delta.to_be_bytes());
    after_crc.extend_from_slice(&BASE_TS.to_be_bytes());
    after_crc.extend_from_slice(&(BASE_TS + 999).to_be_bytes());
    after_crc.extend_from_slice(&pid.to_be_bytes());
    after_crc.extend_from_slice(&0i16.to_be_bytes()); // producer epoch
    after_crc.extend_from_slice(&0i32.to_be_bytes()); // base sequence
    after_crc.extend_from_slice(&count.to_be_bytes());
    after_crc.extend_from_slice(&body);
    let mut out = Vec::new();
    out.extend_from_slice(&base.to_be_bytes());
    out.extend_from_slice(&((4 + 1 + 4 + after_crc.len()) as i32).to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes()); // leader epoch
    out.push(2);
    out.extend_from_slice(&crc32c::crc32c(&after_crc).to_be_bytes());
    out.extend_from_slice(&after_crc);
    out
}

fn batch(base: i64, attrs: i16, pid: i64, recs: &[Rec], codec: Codec) -> Vec<u8> {
    let raw: Vec<u8> = recs.iter().flat_map(encode_record).collect();
    let last = recs.iter().map(|r| r.offset_delta).max().unwrap_or(0);
    batch_raw(base, last, attrs, pid, recs.len() as i32, &raw, codec)
}

/// Records `names` at base.. base+n-1, from producer `pid` (-1: none).
fn data(base: i64, pid: i64, transactional: bool, names: &[&str], codec: Codec) -> Vec<u8> {
    let recs: Vec<Rec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| rec(i as i32, n))
        .collect();
    let attrs = if transactional { ATTR_TRANSACTIONAL } else { 0 };
    batch(base, attrs, pid, &recs, codec)
}

/// A transaction marker (control record key: version 0, type 0 abort / 1 commit).
fn marker(base: i64, pid: i64, commit: bool) -> Vec<u8> {
    let key = [0u8, 0, 0, commit as u8];
    let value = [0u8, 0, 0, 0, 0, 0];
    let r = Rec {
        offset_delta: 0,
        ts_delta: 0,
        key: Some(&key),
        value: Some(&value),
        headers: vec![],
    };
    batch(
        base,
        ATTR_TRANSACTIONAL | ATTR_CONTROL,
        pid,
        &[r],
        Codec::None,
    )
}

fn cat(parts: &[Vec<u8>]) -> Bytes {
    Bytes::from(parts.concat())
}

fn values(d: &Decoded) -> Vec<String> {
    d.records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect()
}

fn offsets(d: &Decoded) -> Vec<i64> {
    d.records.iter().map(|r| r.offset).collect()
}

fn txn(pid: i64, first: i64) -> AbortedTxn {
    AbortedTxn {
        producer_id: pid,
        first_offset: first,
    }
}

#[test]
fn uncompressed_records_with_everything() {
    let recs = vec![
        Rec {
            offset_delta: 0,
            ts_delta: 0,
            key: None,
            value: Some(b"v0"),
            headers: vec![],
        },
        Rec {
            offset_delta: 1,
            ts_delta: 5,
            key: Some(b"k1"),
            value: None,
            headers: vec![("a", Some(b"1")), ("a", Some(b"2")), ("null", None)],
        },
        Rec {
            offset_delta: 2,
            ts_delta: -3,
            key: Some(b""),
            value: Some(b""),
            headers: vec![("\u{e9}t\u{e9}", Some(b"x"))],
        },
    ];
    let d = decode(&cat(&[batch(40, 0, -1, &recs, Codec::None)]), 40, &[], BIG).unwrap();
    assert_eq!(d.next_offset, 43);
    assert_eq!(
        d.records,
        vec![
            FetchedRecord {
                offset: 40,
                key: None,
                value: Some(Bytes::from_static(b"v0")),
                headers: vec![],
                timestamp_ms: BASE_TS,
            },
            FetchedRecord {
                offset: 41,
                key: Some(Bytes::from_static(b"k1")),
                value: None,
                headers: vec![
                    ("a".into(), Bytes::from_static(b"1")),
                    ("a".into(), Bytes::from_static(b"2")),
                    ("null".into(), Bytes::new()),
                ],
                timestamp_ms: BASE_TS + 5,
            },
            FetchedRecord {
                offset: 42,
                key: Some(Bytes::new()),
                value: Some(Bytes::new()),
                headers: vec![("\u{e9}t\u{e9}".into(), Bytes::from_static(b"x"))],
                timestamp_ms: BASE_TS - 3,
            },
        ]
    );
}

#[test]
fn log_append_time_gives_every_record_the_max_timestamp() {
    let b = batch(
        0,
        ATTR_LOG_APPEND_TIME,
        -1,
        &[rec(0, "a"), rec(1, "b")],
        Codec::None,
    );
    let d = decode(&cat(&[b]), 0, &[], BIG).unwrap();
    assert!(d.records.iter().all(|r| r.timestamp_ms == BASE_TS + 999));
}

#[test]
fn every_codec_decodes_the_same_records() {
    let names: Vec<String> = (0..50)
        .map(|i| format!("value-{i}-{}", "x".repeat(i)))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let plain = decode(
        &cat(&[data(100, -1, false, &names, Codec::None)]),
        100,
        &[],
        BIG,
    )
    .unwrap();
    assert_eq!(plain.records.len(), 50);
    for codec in ALL_CODECS {
        let bytes = cat(&[
            data(100, -1, false, &names, codec),
            data(150, -1, false, &["after"], codec),
        ]);
        let d = decode(&bytes, 100, &[], BIG).unwrap_or_else(|e| panic!("{codec:?}: {e}"));
        assert_eq!(d.records[..50], plain.records[..], "{codec:?}");
        assert_eq!(values(&d)[50], "after", "{codec:?}");
        assert_eq!(d.next_offset, 151, "{codec:?}");
    }
}

#[test]
fn a_fetch_whose_only_data_is_a_marker_moves_past_it() {
    let d = decode(&cat(&[marker(5, 1, true)]), 5, &[], BIG).unwrap();
    assert!(d.records.is_empty());
    assert_eq!(d.next_offset, 6);
    // Several markers in a row.
    let d = decode(
        &cat(&[marker(5, 1, true), marker(6, 2, false), marker(7, 1, true)]),
        5,
        &[],
        BIG,
    )
    .unwrap();
    assert!(d.records.is_empty());
    assert_eq!(d.next_offset, 8);
}

/// txn 1 (a) committed, txn 2 (b) aborted, txn 3 (c) committed, one plain record (d): the
/// layout librdkafka writes.
fn three_transactions(codec: Codec) -> Vec<Vec<u8>> {
    vec![
        data(0, 1, true, &["a1", "a2", "a3", "a4", "a5"], codec),
        marker(5, 1, true),
        data(6, 1, true, &["b1", "b2", "b3", "b4", "b5"], codec),
        marker(11, 1, false),
        data(12, 1, true, &["c1", "c2", "c3", "c4", "c5"], codec),
        marker(17, 1, true),
        data(18, -1, false, &["d1"], codec),
    ]
}

const COMMITTED: [&str; 11] = [
    "a1", "a2", "a3", "a4", "a5", "c1", "c2", "c3", "c4", "c5", "d1",
];

#[test]
fn aborted_transaction_between_committed_ones() {
    for codec in ALL_CODECS {
        let bytes = cat(&three_transactions(codec));
        // As Kafka answers: the aborted transaction listed.
        let d = decode(&bytes, 0, &[txn(1, 6)], BIG).unwrap();
        assert_eq!(values(&d), COMMITTED, "{codec:?}");
        assert_eq!(offsets(&d), [0, 1, 2, 3, 4, 12, 13, 14, 15, 16, 18]);
        assert_eq!(d.next_offset, 19);
        // As tansu answers: no list; the ABORT marker in the response tells.
        let d = decode(&bytes, 0, &[], BIG).unwrap();
        assert_eq!(values(&d), COMMITTED, "{codec:?} without the list");
    }
}

#[test]
fn fetching_batch_by_batch_gives_the_same_records() {
    // Each call sees one batch, as with a small max_bytes. Kafka lists an aborted transaction
    // in responses that overlap it (first offset 6 up to its marker at 11), so only the list
    // tells about b1..b5 when their marker is in a later response.
    let parts = three_transactions(Codec::None);
    let mut offset = 0;
    let mut got = Vec::new();
    for p in &parts {
        let list = if (6..=11).contains(&offset) {
            vec![txn(1, 6)]
        } else {
            vec![]
        };
        let d = decode(&Bytes::from(p.clone()), offset, &list, BIG).unwrap();
        assert!(d.next_offset > offset, "progress at {offset}");
        got.extend(values(&d));
        offset = d.next_offset;
    }
    assert_eq!(got, COMMITTED);
    assert_eq!(offset, 19);
}

#[test]
fn aborted_list_entries_apply_from_their_first_offset_only() {
    // pid 1's committed txn before its aborted one is kept; a list entry for offsets past the
    // response changes nothing; an entry for another producer changes nothing.
    let bytes = cat(&three_transactions(Codec::None)[..3]); // a, commit, b (no marker yet)
    let d = decode(&bytes, 0, &[txn(1, 6)], BIG).unwrap();
    assert_eq!(values(&d), ["a1", "a2", "a3", "a4", "a5"]);
    assert_eq!(d.next_offset, 11);
    let d = decode(&bytes, 0, &[txn(1, 100), txn(9, 0)], BIG).unwrap();
    assert_eq!(values(&d).len(), 10, "b kept: not listed, no marker seen");
}

#[test]
fn interleaved_producers() {
    // pid 7 aborts, pid 8 commits, their batches interleaved.
    let bytes = cat(&[
        data(0, 7, true, &["x1"], Codec::None),
        data(1, 8, true, &["y1"], Codec::None),
        data(2, 7, true, &["x2"], Codec::Gzip),
        marker(3, 7, false),
        data(4, 8, true, &["y2"], Codec::Zstd),
        data(5, 7, true, &["x3"], Codec::None), // pid 7's next transaction: committed
        marker(6, 8, true),
        marker(7, 7, true),
        data(8, 9, false, &["z"], Codec::None), // idempotent, not transactional
    ]);
    for list in [vec![txn(7, 0)], vec![]] {
        let d = decode(&bytes, 0, &list, BIG).unwrap();
        assert_eq!(values(&d), ["y1", "y2", "x3", "z"], "list {list:?}");
        assert_eq!(d.next_offset, 9);
    }
}

#[test]
fn a_batch_starting_before_the_offset() {
    let bytes = cat(&[
        data(
            10,
            -1,
            false,
            &["r10", "r11", "r12", "r13", "r14"],
            Codec::Lz4,
        ),
        data(15, -1, false, &["r15"], Codec::None),
    ]);
    let d = decode(&bytes, 12, &[], BIG).unwrap();
    assert_eq!(offsets(&d), [12, 13, 14, 15]);
    assert_eq!(d.next_offset, 16);
    // A batch wholly before the offset is skipped; next_offset never goes below the offset.
    let d = decode(
        &cat(&[data(0, -1, false, &["r0"], Codec::None)]),
        5,
        &[],
        BIG,
    )
    .unwrap();
    assert!(d.records.is_empty());
    assert_eq!(d.next_offset, 5);
}

#[test]
fn a_truncated_last_batch_is_ignored() {
    let first = data(0, -1, false, &["a", "b"], Codec::None);
    let second = data(2, -1, false, &["c", "d"], Codec::Snappy);
    for cut in [1, 8, 11, 12, 17, 30, second.len() - 1] {
        let bytes = cat(&[first.clone(), second[..cut].to_vec()]);
        let d = decode(&bytes, 0, &[], BIG).unwrap();
        assert_eq!(values(&d), ["a", "b"], "cut at {cut}");
        assert_eq!(d.next_offset, 2, "cut at {cut}");
    }
}

#[test]
fn only_a_truncated_batch_is_an_error_naming_the_size() {
    let b = data(7, -1, false, &["a", "b"], Codec::None);
    let e = decode(&Bytes::from(b[..30].to_vec()), 7, &[], BIG).unwrap_err();
    assert!(
        e.contains("offset 7")
            && e.contains(&format!("needs {} bytes", b.len()))
            && e.contains("max_bytes"),
        "{e}"
    );
    let e = decode(&Bytes::from(b[..5].to_vec()), 7, &[], BIG).unwrap_err();
    assert!(e.contains("no complete record batch"), "{e}");
}

#[test]
fn empty_records_give_the_fetch_offset() {
    let d = decode(&Bytes::new(), 33, &[], BIG).unwrap();
    assert_eq!(
        d,
        Decoded {
            cut: false,
            records: vec![],
            next_offset: 33
        }
    );
}

#[test]
fn old_message_formats_are_rejected_clearly() {
    // A magic v1 message: offset, size, crc, magic 1, attributes, timestamp, key, value.
    let mut m = Vec::new();
    m.extend_from_slice(&0i64.to_be_bytes());
    m.extend_from_slice(&26i32.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m.push(1);
    m.push(0);
    m.extend_from_slice(&0i64.to_be_bytes());
    m.extend_from_slice(&(-1i32).to_be_bytes());
    m.extend_from_slice(&4i32.to_be_bytes());
    m.extend_from_slice(b"abcd");
    let e = decode(&Bytes::from(m), 0, &[], BIG).unwrap_err();
    assert!(e.contains("message format v1"), "{e}");
}

#[test]
fn a_bad_batch_after_good_ones_stops_the_walk_there() {
    let good = data(0, -1, false, &["a", "b"], Codec::None);
    let mut bad = data(2, -1, false, &["c"], Codec::None);
    let n = bad.len();
    bad[n - 1] ^= 0xff; // CRC no longer matches
    let bytes = cat(&[good, bad.clone()]);
    let d = decode(&bytes, 0, &[], BIG).unwrap();
    assert_eq!(values(&d), ["a", "b"]);
    assert_eq!(d.next_offset, 2);
    // The next call starts at the bad batch: the error names it.
    let e = decode(&Bytes::from(bad), 2, &[], BIG).unwrap_err();
    assert!(e.contains("offset 2") && e.contains("CRC"), "{e}");
}

#[test]
fn decompression_is_bounded_per_call() {
    let big = "z".repeat(1000);
    let bytes = cat(&[
        data(0, -1, false, &[&big], Codec::Gzip),
        data(1, -1, false, &[&big], Codec::Zstd),
    ]);
    // Each record holds the string three times (key, value, header): ~3 kB decompressed.
    // Room for one: the second waits for the next call.
    let d = decode(&bytes, 0, &[], 4000).unwrap();
    assert_eq!(offsets(&d), [0]);
    assert_eq!(d.next_offset, 1);
    // Room for none: the first batch cannot be read.
    let e = decode(&bytes, 0, &[], 2500).unwrap_err();
    assert!(e.contains("decompresses to more than"), "{e}");
    // Snappy checks the announced size before allocating.
    let e = decode(
        &cat(&[data(0, -1, false, &[&big], Codec::Snappy)]),
        0,
        &[],
        500,
    )
    .unwrap_err();
    assert!(e.contains("decompresses to more than"), "{e}");
}

/// A batch around hand-made records bytes (count announced separately).
fn raw_batch(count: i32, records: &[u8], codec: Codec) -> Bytes {
    Bytes::from(batch_raw(0, 0, 0, -1, count, records, codec))
}

#[test]
fn hostile_lengths_are_errors() {
    let mut cases: Vec<(&str, Bytes)> = Vec::new();
    let good = encode_record(&rec(0, "v"));
    // A huge record count with one record's bytes.
    cases.push(("count", raw_batch(i32::MAX, &good, Codec::None)));
    cases.push(("negative count", raw_batch(-5, &good, Codec::None)));
    // A record length past the end.
    let mut r = Vec::new();
    varint(&mut r, 1 << 30);
    r.extend_from_slice(&good[1..]);
    cases.push(("record length", raw_batch(1, &r, Codec::None)));
    let mut r = Vec::new();
    varint(&mut r, -7);
    cases.push(("negative record length", raw_batch(1, &r, Codec::None)));
    // Key, value, header count and header key lengths past the record.
    for field in 0..4 {
        let mut body = vec![0u8];
        varint(&mut body, 0);
        varint(&mut body, 0);
        let huge = i64::from(i32::MAX);
        match field {
            0 => varint(&mut body, huge),
            1 => {
                varint(&mut body, -1);
                varint(&mut body, huge);
            }
            2 => {
                varint(&mut body, -1);
                varint(&mut body, -1);
                varint(&mut body, huge);
            }
            _ => {
                varint(&mut body, -1);
                varint(&mut body, -1);
                varint(&mut body, 1);
                varint(&mut body, huge);
            }
        }
        body.extend_from_slice(b"xy");
        let mut r = Vec::new();
        varint(&mut r, body.len() as i64);
        r.extend_from_slice(&body);
        cases.push(("field length", raw_batch(1, &r, Codec::None)));
    }
    // Overlong varints.
    let r = [0x85u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    cases.push(("overlong varint", raw_batch(1, &r, Codec::None)));
    // A record with bytes left over inside it.
    let mut body = encode_record(&rec(0, "v"))[1..].to_vec();
    body.push(0);
    let mut r = Vec::new();
    varint(&mut r, body.len() as i64);
    r.extend_from_slice(&body);
    cases.push(("record slack", raw_batch(1, &r, Codec::None)));
    // Bytes left after the announced records.
    let mut r = good.clone();
    r.push(0);
    cases.push(("batch slack", raw_batch(1, &r, Codec::None)));
    // Batch lengths: negative, shorter than a header, past i32 sense.
    let mut b = batch_raw(0, 0, 0, -1, 1, &good, Codec::None);
    b[8..12].copy_from_slice(&(-1i32).to_be_bytes());
    cases.push(("negative batch length", Bytes::from(b)));
    let mut b = batch_raw(0, 0, 0, -1, 1, &good, Codec::None);
    b[8..12].copy_from_slice(&10i32.to_be_bytes());
    cases.push(("short batch length", Bytes::from(b)));
    let mut b = batch_raw(0, 0, 0, -1, 1, &good, Codec::None);
    b[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
    cases.push(("huge batch length", Bytes::from(b)));
    // A negative last offset delta.
    cases.push((
        "last offset delta",
        Bytes::from(batch_raw(0, -1, 0, -1, 1, &good, Codec::None)),
    ));
    // Offsets that overflow.
    cases.push((
        "offset overflow",
        Bytes::from(batch_raw(
            i64::MAX,
            0,
            0,
            -1,
            1,
            &encode_record(&rec(5, "v")),
            Codec::None,
        )),
    ));
    // Snappy that claims 4 GiB; a xerial block longer than the data; garbage for every codec.
    let mut s = Vec::new();
    s.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    s.extend_from_slice(b"abc");
    let mut xerial = XERIAL_MAGIC.to_vec();
    xerial.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff, 1, 2]);
    for (codec, body) in [
        (2i16, s.clone()),
        (2, xerial),
        (2, XERIAL_MAGIC.to_vec()),
        (1, b"not gzip".to_vec()),
        (3, b"not lz4 at all".to_vec()),
        (4, b"not zstd at all".to_vec()),
        (5, good.clone()),
        (7, good.clone()),
    ] {
        // Built by hand: the body is what the batch holds, "compressed" or not.
        let b = batch_raw(0, 0, codec, -1, 1, &body, Codec::None);
        cases.push(("codec", Bytes::from(b)));
    }
    // A control batch whose key is too short.
    let r = Rec {
        offset_delta: 0,
        ts_delta: 0,
        key: Some(b"\0"),
        value: None,
        headers: vec![],
    };
    cases.push((
        "control key",
        Bytes::from(batch(
            0,
            ATTR_CONTROL | ATTR_TRANSACTIONAL,
            1,
            &[r],
            Codec::None,
        )),
    ));

    for (what, bytes) in cases {
        if let Ok(d) = decode(&bytes, 0, &[], BIG) {
            panic!("{what}: accepted {d:?}");
        }
    }
}

#[test]
fn a_huge_batch_length_is_a_truncated_batch() {
    let mut b = batch_raw(0, 0, 0, -1, 1, &encode_record(&rec(0, "v")), Codec::None);
    b[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
    let e = decode(&Bytes::from(b), 0, &[], BIG).unwrap_err();
    assert!(e.contains("raise max_bytes"), "{e}");
}

/// Seeded mutations of valid responses, with the CRC fixed afterwards so the record decoding
/// is reached: never a panic, offsets increase from the fetch offset, next_offset never falls
/// behind it.
#[test]
fn mutated_batches_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x6b61666b61);
    let mut seeds: Vec<Vec<u8>> = ALL_CODECS
        .iter()
        .map(|c| three_transactions(*c).concat())
        .collect();
    seeds.push(cat(&[marker(0, 3, false), marker(1, 3, true)]).to_vec());
    for round in 0..3000 {
        let mut bytes = seeds[round % seeds.len()].clone();
        let n = rng.gen_range(1..6);
        for _ in 0..n {
            let at = rng.gen_range(0..bytes.len());
            match rng.gen_range(0..4) {
                0 => bytes[at] = rng.r#gen(),
                1 => bytes[at] ^= 1 << rng.gen_range(0..8),
                2 => bytes[at] = [0x00, 0x7f, 0x80, 0xff][rng.gen_range(0..4)],
                _ => bytes.truncate(at.max(1)),
            }
        }
        // Fix every CRC that still has a header to sit in.
        let mut pos = 0;
        while pos + BATCH_HEADER <= bytes.len() {
            let len = i32::from_be_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            let Some(total) = usize::try_from(len).ok().map(|l| l + LOG_OVERHEAD) else {
                break;
            };
            if total < BATCH_HEADER || pos + total > bytes.len() {
                break;
            }
            let crc = crc32c::crc32c(&bytes[pos + CRC_START..pos + total]);
            bytes[pos + 17..pos + 21].copy_from_slice(&crc.to_be_bytes());
            pos += total;
        }
        let fetch_offset = rng.gen_range(0..20);
        let aborted = [txn(1, rng.gen_range(0..20))];
        if let Ok(d) = decode(&Bytes::from(bytes), fetch_offset, &aborted, 1 << 20) {
            assert!(d.next_offset >= fetch_offset);
            let mut prev = fetch_offset - 1;
            for r in &d.records {
                assert!(r.offset > prev, "round {round}: offsets increase");
                prev = r.offset;
            }
        }
    }
}
