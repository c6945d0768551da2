//! The `group_metadata` fuzz target's body (ConsumerProtocol subscription and assignment bytes
//! from other group members) on seeded random and mutated valid inputs: a stable smoke test of
//! what `cargo fuzz run group_metadata` (fuzz/) explores with coverage guidance.

use std::time::{Duration, Instant};

use kafka_io::assignor::{
    decode_assignment, decode_subscription, encode_assignment, encode_subscription,
};

/// xorshift64: deterministic, so a failure names its case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few byte-level mutations of `seed`, as libFuzzer's default mutators make them.
fn mutate(rng: &mut Rng, seed: &[u8], tokens: &[&[u8]]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(d.len() + 1);
        match rng.below(6) {
            0 if i < d.len() => d[i] = rng.next() as u8,
            1 if i < d.len() => {
                d.remove(i);
            }
            2 => d.insert(i, rng.next() as u8),
            3 => {
                // Overwrite with an interesting integer (a count or a length).
                let t = tokens[rng.below(tokens.len())];
                let end = (i + t.len()).min(d.len());
                d.splice(i..end, t.iter().copied());
            }
            4 if !d.is_empty() => {
                let a = rng.below(d.len());
                let b = (a + rng.below(32)).min(d.len());
                let part = d[a..b].to_vec();
                d.splice(i..i, part);
            }
            _ => d.truncate(i),
        }
    }
    d
}

/// A version 1 subscription as Java 2.4-3.3 and librdkafka 1.6-2.1 write it: topics, user
/// data, owned partitions.
fn subscription_v1(topics: &[&str], owned: &[(&str, &[i32])]) -> Vec<u8> {
    let mut b = 1i16.to_be_bytes().to_vec();
    b.extend((topics.len() as i32).to_be_bytes());
    for t in topics {
        b.extend((t.len() as i16).to_be_bytes());
        b.extend(t.as_bytes());
    }
    b.extend((-1i32).to_be_bytes()); // no user data
    b.extend((owned.len() as i32).to_be_bytes());
    for (t, ps) in owned {
        b.extend((t.len() as i16).to_be_bytes());
        b.extend(t.as_bytes());
        b.extend((ps.len() as i32).to_be_bytes());
        for p in *ps {
            b.extend(p.to_be_bytes());
        }
    }
    b
}

#[test]
fn group_metadata_decoding_never_panics() {
    let start = Instant::now();
    let topics = vec!["in".to_string(), "other-topic".to_string()];
    let tps = vec![
        ("in".to_string(), 0),
        ("in".to_string(), 7),
        ("other-topic".to_string(), 2),
    ];
    // Valid seeds decode (so mutations start from real inputs).
    assert_eq!(
        decode_subscription(encode_subscription(&topics)).unwrap(),
        topics
    );
    assert_eq!(decode_assignment(encode_assignment(&tps)).unwrap().len(), 3);
    let v1 = subscription_v1(&["in"], &[("in", &[0, 1])]);
    assert_eq!(decode_subscription(v1.clone().into()).unwrap(), ["in"]);

    // Counts and lengths that claim far more than the bytes hold.
    let claims: Vec<Vec<u8>> = vec![
        [&0i16.to_be_bytes()[..], &i32::MAX.to_be_bytes()].concat(),
        [
            &0i16.to_be_bytes()[..],
            &1i32.to_be_bytes(),
            &i16::MAX.to_be_bytes(),
        ]
        .concat(),
        [&0i16.to_be_bytes()[..], &(-5i32).to_be_bytes()].concat(),
        [
            &3i16.to_be_bytes()[..],
            &1i32.to_be_bytes(),
            &2i16.to_be_bytes(),
            b"in",
            &i32::MAX.to_be_bytes(),
        ]
        .concat(),
        [
            &i16::MAX.to_be_bytes()[..],
            &1i32.to_be_bytes(),
            &1i16.to_be_bytes(),
            b"x",
            &(-1i32).to_be_bytes(),
            &i32::MAX.to_be_bytes(),
        ]
        .concat(),
        [&(-1i16).to_be_bytes()[..], &i32::MAX.to_be_bytes()].concat(),
    ];
    for c in &claims {
        let t = Instant::now();
        kafka_io::fuzz_group_metadata(c);
        assert!(t.elapsed() < Duration::from_secs(1), "{c:?}");
    }

    let tokens: &[&[u8]] = &[
        &[0x7f, 0xff, 0xff, 0xff],
        &[0xff, 0xff, 0xff, 0xff],
        &[0x80, 0x00, 0x00, 0x00],
        &[0x7f, 0xff],
        &[0xff, 0xff],
        &[0x00, 0x00, 0x00, 0x00],
        &[0x00, 0x03],
        &[0x00, 0x00, 0x27, 0x11],
    ];
    let seeds: Vec<Vec<u8>> = vec![
        encode_subscription(&topics).to_vec(),
        encode_assignment(&tps).to_vec(),
        v1,
        subscription_v1(&["a", "b", "c"], &[("a", &[0]), ("c", &[1, 2, 3])]),
    ];
    let mut rng = Rng(0x0dd_ba11_5eed);
    let mut accepted = 0;
    for i in 0..20_000 {
        let input = if i % 4 == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            mutate(&mut rng, &seeds[i % seeds.len()], tokens)
        };
        kafka_io::fuzz_group_metadata(&input);
        if decode_subscription(input.clone().into()).is_ok()
            || decode_assignment(input.clone().into()).is_ok_and(|a| !a.is_empty())
        {
            accepted += 1;
        }
    }
    assert!(accepted > 100, "only {accepted} inputs decoded");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

fn varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A record batch (magic 2, uncompressed) as a broker returns it; `control` makes it a
/// transaction marker (key: version 0, type 0 = abort / 1 = commit).
fn batch(base: i64, producer: i64, transactional: bool, control: Option<i16>, n: i32) -> Vec<u8> {
    let mut recs = Vec::new();
    for i in 0..n {
        let mut r = vec![0u8]; // attributes
        varint(&mut r, 0); // timestamp delta
        varint(&mut r, i64::from(i)); // offset delta
        let (key, value): (Vec<u8>, Vec<u8>) = match control {
            Some(kind) => ([0, 0, 0, kind as u8].to_vec(), [0, 0, 0, 0, 0, 0].to_vec()),
            None => (format!("k{i}").into_bytes(), format!("v{i}").into_bytes()),
        };
        varint(&mut r, key.len() as i64);
        r.extend(&key);
        varint(&mut r, value.len() as i64);
        r.extend(&value);
        varint(&mut r, 1); // one header
        varint(&mut r, 1);
        r.push(b'h');
        varint(&mut r, 1);
        r.push(b'x');
        varint(&mut recs, r.len() as i64);
        recs.extend(r);
    }
    let attributes: i16 =
        (if transactional { 0x10 } else { 0 }) | (if control.is_some() { 0x20 } else { 0 });
    let mut after_crc = Vec::new();
    after_crc.extend(attributes.to_be_bytes());
    after_crc.extend((n - 1).to_be_bytes()); // last offset delta
    after_crc.extend(1_700_000_000_000i64.to_be_bytes());
    after_crc.extend(1_700_000_000_000i64.to_be_bytes());
    after_crc.extend(producer.to_be_bytes());
    after_crc.extend(0i16.to_be_bytes()); // producer epoch
    after_crc.extend(0i32.to_be_bytes()); // base sequence
    after_crc.extend(n.to_be_bytes());
    after_crc.extend(recs);
    let mut b = base.to_be_bytes().to_vec();
    b.extend(((4 + 1 + 4 + after_crc.len()) as i32).to_be_bytes());
    b.extend(0i32.to_be_bytes()); // partition leader epoch
    b.push(2); // magic
    b.extend(crc32c::crc32c(&after_crc).to_be_bytes());
    b.extend(after_crc);
    b
}

/// Re-fixes the CRC of every whole batch in `d`, so mutations reach the record parsing.
fn fix_crcs(d: &mut [u8]) {
    let mut at = 0;
    while at + 21 <= d.len() {
        let len = i32::from_be_bytes(d[at + 8..at + 12].try_into().unwrap());
        let Ok(len) = usize::try_from(len) else {
            return;
        };
        let end = at + 12 + len;
        if len < 9 || end > d.len() {
            return;
        }
        let crc = crc32c::crc32c(&d[at + 21..end]);
        d[at + 17..at + 21].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
}

#[test]
fn fetch_record_batch_decoding_never_panics() {
    let start = Instant::now();
    // Fetch offset 0, producer 7 with an aborted transaction from offset 3.
    let head = [0u8, 0, 0, 7, 0, 3, 0, 0];
    let mut log = Vec::new();
    log.extend(batch(0, 7, true, None, 3));
    log.extend(batch(3, 7, true, None, 2));
    log.extend(batch(5, 7, true, Some(0), 1)); // abort marker
    log.extend(batch(6, -1, false, None, 4));
    log.extend(batch(10, 7, true, Some(1), 1)); // commit marker
    let seeds: Vec<Vec<u8>> = vec![
        [head.as_slice(), &log].concat(),
        [head.as_slice(), &batch(0, -1, false, None, 1)].concat(),
    ];
    let tokens: [&[u8]; 5] = [
        &[0xff; 4],
        &[0x7f, 0xff, 0xff, 0xff],
        &[0, 0, 0, 0],
        &[0x80; 5],
        &[2],
    ];
    let mut rng = Rng(0x5eed_f00d);
    // The seeds decode: the aborted transaction (its ABORT marker ahead) is dropped, the plain
    // records after it come through.
    assert_eq!(kafka_io::fetch::fuzz_fetch_records(&seeds[0]), 4);
    assert_eq!(kafka_io::fetch::fuzz_fetch_records(&seeds[1]), 1);
    for case in 0..4000 {
        let seed = &seeds[case % seeds.len()];
        let mut d = mutate(&mut rng, seed, &tokens);
        if case % 2 == 0 && d.len() > 8 {
            fix_crcs(&mut d[8..]);
        }
        let _ = kafka_io::fetch::fuzz_fetch_records(&d);
        if case % 10 == 0 {
            let n = rng.below(300);
            let r: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let _ = kafka_io::fetch::fuzz_fetch_records(&r);
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "smoke pass bounded: {:?}",
        start.elapsed()
    );
}

/// Found by `cargo fuzz run fetch_records`: a record whose offset delta points past its batch's
/// last offset was handed out, and would have come again from the next fetch. Now the batch is
/// corrupt (nothing returned from it).
#[test]
fn a_record_outside_its_batch_is_not_handed_out() {
    let input = include_bytes!("data/fetch_record_outside_its_batch.bin");
    assert_eq!(kafka_io::fetch::fuzz_fetch_records(input), 0);
}
