#![no_main]
//! A SeldonDeployment YAML as `kafka-infer run -f` reads it: a configuration or an error, never
//! a panic.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    runner::fuzz_deployment(data);
});
