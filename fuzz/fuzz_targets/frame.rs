//! cargo-fuzz target `frame`: see `kvcoord_fuzz::frame` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcoord_fuzz::frame(data));
