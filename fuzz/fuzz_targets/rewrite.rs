#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tenantsync_fuzz_bodies::rewrite::run(data));
