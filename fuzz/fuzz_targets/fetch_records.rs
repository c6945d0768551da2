#![no_main]
//! Record batch bytes from a Fetch response (our read_committed decoder): decoding must return,
//! never panic or allocate what the bytes merely claim; records come back in offset order.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kafka_io::fetch::fuzz_fetch_records(data);
});
