//! cargo-fuzz target `config`: see `kvcoord_fuzz::config` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcoord_fuzz::config(data));
