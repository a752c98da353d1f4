//! cargo-fuzz target `layout`: see `kvcoord_fuzz::layout` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcoord_fuzz::layout(data));
