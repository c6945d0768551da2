//! The `deployment` fuzz target's body (SeldonDeployment YAML, as `-f` reads it) on seeded
//! random and mutated valid inputs: a stable smoke test of what `cargo fuzz run deployment`
//! (fuzz/) explores with coverage guidance. It must return, never panic, and stay fast.

use std::time::{Duration, Instant};

use runner::config::parse_seldon_deployment;

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
                let t = tokens[rng.below(tokens.len())];
                d.splice(i..i, t.iter().copied());
            }
            4 if !d.is_empty() => {
                // Copy a slice of the input elsewhere (repeats structure).
                let a = rng.below(d.len());
                let b = (a + rng.below(64)).min(d.len());
                let part = d[a..b].to_vec();
                d.splice(i..i, part);
            }
            _ => d.truncate(i),
        }
    }
    d
}

const CIFAR: &str = include_str!("../../../deploy/seldondeployment-cifar10.yaml");

const GRAPH: &str = r#"apiVersion: machinelearning.seldon.io/v1
kind: SeldonDeployment
metadata: {name: g, namespace: ns}
spec:
  protocol: seldon
  transport: grpc
  serverType: kafka
  predictors:
  - name: a
    svcOrchSpec: {env: [{name: KAFKA_BROKER, value: "b:9092"}, {name: X, value: 1}]}
    graph:
      name: router
      type: ROUTER
      endpoint: {service_host: r, service_port: 9000, type: GRPC}
      children:
      - {name: m1, type: MODEL, endpoint: {service_port: 9001}, children: []}
      - name: c
        type: COMBINER
        endpoint: {service_port: 9002}
        children:
        - {name: t, type: TRANSFORMER, endpoint: {service_port: 9003}, children: [{name: m2, type: MODEL, endpoint: {service_port: 9004}}]}
        - {name: o, type: OUTPUT_TRANSFORMER, endpoint: {service_port: 9005}}
  - name: b
    graph: {name: m, type: MODEL, endpoint: {service_port: 1}}
"#;

/// Anchors and aliases that expand exponentially ("billion laughs"), and deep nesting (8 KiB:
/// the YAML parser takes time quadratic in flow nesting depth, 0.5 s for 64 KiB of `{a: `
/// in a release build; a deployment file is the operator's own, not network input).
fn bombs() -> Vec<String> {
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (i, c) in ('b'..='j').enumerate() {
        let prev = (b'a' + i as u8) as char;
        laughs.push_str(&format!(
            "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    laughs.push_str("kind: SeldonDeployment\nspec: *j\n");
    let deep_graph = {
        let mut g = String::from("{name: m, type: MODEL, endpoint: {service_port: 1}}");
        for i in 0..200 {
            g = format!(
                "{{name: t{i}, type: TRANSFORMER, endpoint: {{service_port: 1}}, children: [{g}]}}"
            );
        }
        format!(
            "kind: SeldonDeployment\nspec:\n  serverType: kafka\n  predictors:\n  - graph: {g}\n"
        )
    };
    vec![
        laughs,
        "[".repeat(8_000),
        "{a: ".repeat(2_000),
        "- ".repeat(4_000),
        deep_graph,
    ]
}

#[test]
fn deployment_parsing_never_panics() {
    let start = Instant::now();
    for b in bombs() {
        let t = Instant::now();
        runner::fuzz_deployment(b.as_bytes());
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{}... took {:?}",
            &b[..40.min(b.len())],
            t.elapsed()
        );
    }
    // The seeds are valid (so mutations start from real inputs).
    assert!(parse_seldon_deployment(CIFAR, None).unwrap().is_some());
    let g = parse_seldon_deployment(GRAPH, None).unwrap().unwrap();
    assert_eq!(g.children.len(), 2);
    assert!(parse_seldon_deployment(GRAPH, Some("b")).unwrap().is_some());

    let tokens: &[&[u8]] = &[
        b"children: [",
        b"&x ",
        b"*x",
        b"<<: *x\n",
        b"{",
        b"[",
        b"\n  - ",
        b"service_port: 99999",
        b"type: COMBINER",
        b"!!binary ",
        b"\"\\u0000\"",
        b"---\n",
    ];
    let seeds = [CIFAR.as_bytes(), GRAPH.as_bytes()];
    let mut rng = Rng(0x5eed_cafe_f00d);
    let mut parsed = 0;
    for i in 0..3000 {
        let input = if i % 4 == 0 {
            (0..rng.below(300)).map(|_| rng.next() as u8).collect()
        } else {
            mutate(&mut rng, seeds[i % 2], tokens)
        };
        runner::fuzz_deployment(&input);
        if let Ok(text) = std::str::from_utf8(&input)
            && parse_seldon_deployment(text, None).is_ok_and(|g| g.is_some())
        {
            parsed += 1;
        }
        let mut named = b"#predictor b\n".to_vec();
        named.extend_from_slice(&input);
        runner::fuzz_deployment(&named);
    }
    // Mutations keep many inputs valid, so the checks after parsing run too.
    assert!(parsed > 100, "only {parsed} mutated inputs parsed");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}
