#![no_main]
//! Any bytes, any header, any protocol: decode and transcode must return, never panic.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    codec::fuzz_decode(data);
});
