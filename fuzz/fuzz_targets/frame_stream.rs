//! cargo-fuzz target `frame_stream`: see `kvcoord_fuzz::frame_stream` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcoord_fuzz::frame_stream(data));
