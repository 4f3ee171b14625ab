//! The xattr driver on a real file system without user extended attributes
//! (a `ramfs` mount). Mounting needs root: elsewhere these tests say so and
//! pass without checking anything; `.ci/run` runs as root and requires
//! them to have run (`IMGCACHE_REQUIRE_MOUNTS=1`).

mod common;

use common::Mount;
use imgcache::{CacheOptions, DriverKind, Error, ImageId};

#[test]
fn xattr_driver_refuses_with_a_helpful_error() {
    let Some(fs) = Mount::new("ramfs", "") else {
        return;
    };
    let dir = fs.path.join("cache");
    let err = CacheOptions::new(&dir)
        .driver(DriverKind::Xattr)
        .open()
        .unwrap_err();
    match &err {
        Error::XattrUnsupported { dir: d, source } => {
            assert_eq!(d, &dir);
            assert_eq!(source.raw_os_error(), Some(95), "ENOTSUP");
        }
        other => panic!("expected XattrUnsupported, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(
        msg.contains("user_xattr") && msg.contains("sqlite"),
        "{msg}"
    );
    // The probe left nothing behind.
    assert_eq!(
        std::fs::read_dir(dir.join("incomplete")).unwrap().count(),
        0
    );
}

#[test]
fn fallback_to_sqlite_only_when_asked() {
    let Some(fs) = Mount::new("ramfs", "") else {
        return;
    };
    let dir = fs.path.join("cache");
    let cache = CacheOptions::new(&dir)
        .driver(DriverKind::Xattr)
        .fallback_to_sqlite(true)
        .open()
        .unwrap();
    assert_eq!(cache.driver_kind(), Some(DriverKind::Sqlite));
    let x = ImageId::new("x").unwrap();
    assert!(cache.cache_image_file(&x, &b"on ramfs"[..]).unwrap());
    assert_eq!(
        cache
            .open_for_read(&x)
            .unwrap()
            .unwrap()
            .read_all()
            .unwrap(),
        b"on ramfs"
    );
    assert!(dir.join("cache.db").is_file());
}
