//! cargo-fuzz target `request_roundtrip`: see `kvcoord_fuzz::request_roundtrip` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcoord_fuzz::request_roundtrip(data));
