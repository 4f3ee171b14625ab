//! `ImageId` parsing: never panics; whatever it accepts is one plain file name.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = imgcache::testing::id(data) {
        panic!("{e}");
    }
});
