#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = imgcache::testing::admin_request(data) {
        panic!("{e}");
    }
});
