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
