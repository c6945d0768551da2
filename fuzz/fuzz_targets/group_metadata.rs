#![no_main]
//! Subscription and assignment bytes as other group members send them: decoding must return,
//! never panic or allocate what the bytes merely claim; what decodes survives our encoding.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kafka_io::fuzz_group_metadata(data);
});
