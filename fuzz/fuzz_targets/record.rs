#![no_main]
//! A record value under every proto-name the pool knows (the first byte picks it): detection,
//! then transcoding to each protocol's JSON and back must return, never panic or over-allocate.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    codec::fuzz_record(data);
});
