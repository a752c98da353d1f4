//! cargo-fuzz target `request_body`: see `kvcoord_fuzz::request_body` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcoord_fuzz::request_body(data));
