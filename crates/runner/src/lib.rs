//! kafka-infer: serve a Kafka stream with any model server.
//!
//! The runner glues kafka-io (Kafka) and codec (payloads) together: configuration, the
//! inference graph and its model clients, the pipeline, metrics and health. The binary
//! (main.rs) parses the command line and runs [`pipeline::run`].

pub mod config;
pub mod graph;
pub mod logger;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod otel;
pub mod pipeline;
pub mod tool;

/// A SeldonDeployment text as `-f` reads it, for the fuzzer (fuzz/) and its stable smoke test:
/// any bytes must give a configuration or an error, never a panic or a hang.
pub fn fuzz_deployment(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line may name the predictor to pick.
    let predictor = text
        .strip_prefix("#predictor ")
        .and_then(|r| r.lines().next())
        .map(str::trim);
    let _ = config::parse_seldon_deployment(text, predictor);
}
