//! Decoding of stored metadata values (xattr values, queue markers): never
//! panics, and what decodes round-trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = imgcache::testing::stored_values(data) {
        panic!("{e}");
    }
});
