//! Operation sequences against the real cache and the in-memory model; the
//! first byte picks the driver.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(e) = imgcache::testing::ops(dir.path(), data) {
        panic!("{e}");
    }
});
