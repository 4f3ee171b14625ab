//! A fuzzed `cache.db`: opening gives a cache or a typed error, and an
//! opened cache answers every query without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(e) = imgcache::testing::sqlite_db(dir.path(), data) {
        panic!("{e}");
    }
});
