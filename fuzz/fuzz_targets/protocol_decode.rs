#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tenantsync_fuzz_bodies::protocol_decode::run(data));
