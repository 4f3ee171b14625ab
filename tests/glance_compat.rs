//! Opening cache directories as Glance's own drivers write them, and leaving
//! them readable by Glance.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{id, Fixture};
use imgcache::{CacheOptions, DriverKind};
use rusqlite::Connection;
use xattr::FileExt;

/// Glance's schema, exactly as its sqlite driver creates it.
const GLANCE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS cached_images (
    image_id TEXT PRIMARY KEY,
    last_accessed REAL DEFAULT 0.0,
    last_modified REAL DEFAULT 0.0,
    size INTEGER DEFAULT 0,
    hits INTEGER DEFAULT 0,
    checksum TEXT
);";

/// A cache directory as Glance's sqlite driver leaves it: two images with
/// rows, the state folders, and an empty queue marker.
fn glance_sqlite_dir(dir: &Path) {
    for sub in ["queue", "incomplete", "invalid"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let db = Connection::open(dir.join("cache.db")).unwrap();
    db.execute_batch(GLANCE_SCHEMA).unwrap();
    for (image, body, accessed, hits) in [
        ("aaaa-1111", &b"first image"[..], 1_700_000_100.5, 3),
        ("bbbb-2222", &b"second"[..], 1_700_000_050.25, 7),
    ] {
        fs::write(dir.join(image), body).unwrap();
        // Glance's commit, then its hit update, verbatim.
        db.execute(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, hits, size)
             VALUES (?, ?, ?, 0, ?)",
            rusqlite::params![image, 1_700_000_000.0, 1_700_000_000.0, body.len() as i64],
        )
        .unwrap();
        db.execute(
            "UPDATE cached_images SET hits = ?, last_accessed = ? WHERE image_id = ?",
            rusqlite::params![hits, accessed, image],
        )
        .unwrap();
    }
    fs::File::create(dir.join("queue/cccc-3333")).unwrap();
}

#[test]
fn sqlite_opens_a_glance_database_and_keeps_it_glance_readable() {
    let dir = tempfile::tempdir().unwrap();
    glance_sqlite_dir(dir.path());
    let cache = CacheOptions::new(dir.path()).open().unwrap();

    let images = cache.cached_images().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].id.as_str(), "aaaa-1111");
    assert_eq!(images[0].hits, 3);
    assert_eq!(images[0].size, 11);
    assert_eq!(images[0].crc32, None, "Glance's entries are unverified");
    assert_eq!(
        images[0].last_accessed,
        UNIX_EPOCH + Duration::from_secs_f64(1_700_000_100.5)
    );
    assert_eq!(cache.cache_size().unwrap(), 17);
    assert_eq!(cache.queued_images().unwrap(), vec![id("cccc-3333")]);
    // LRU follows Glance's last_accessed.
    let lru: Vec<String> = cache
        .least_recently_accessed()
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(lru, ["bbbb-2222", "aaaa-1111"]);
    // Reading counts a hit in Glance's column.
    let mut img = cache.open_for_read(&id("aaaa-1111")).unwrap().unwrap();
    assert_eq!(img.read_all().unwrap(), b"first image");
    assert!(cache
        .cache_image_file(&id("cccc-3333"), &b"third"[..])
        .unwrap());
    drop(cache);

    // Glance's own queries still work and see our writes.
    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    let rows: Vec<(String, i64, f64, f64, i64)> = db
        .prepare(
            "SELECT image_id, hits, last_accessed, last_modified, size
             FROM cached_images ORDER BY image_id",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("aaaa-1111", 4));
    assert_eq!(
        (rows[2].0.as_str(), rows[2].1, rows[2].4),
        ("cccc-3333", 0, 5)
    );
    let lru: String = db
        .query_row(
            "SELECT image_id FROM cached_images ORDER BY last_accessed LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(lru, "bbbb-2222");
    let hits: i64 = db
        .query_row(
            "SELECT hits FROM cached_images WHERE image_id = ?",
            ["aaaa-1111"],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hits, 4);
    // Glance's insert (which names only its columns) still works.
    db.execute(
        "INSERT INTO cached_images (image_id, last_accessed, last_modified, hits, size)
         VALUES (?, ?, ?, 0, ?)",
        rusqlite::params!["dddd-4444", 1.0, 1.0, 0],
    )
    .unwrap();
    db.execute(
        "DELETE FROM cached_images WHERE image_id = ?",
        ["dddd-4444"],
    )
    .unwrap();
    // The queue marker of the cached image is gone, as Glance expects.
    assert!(!dir.path().join("queue/cccc-3333").exists());
}

#[test]
fn sqlite_upgrade_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    glance_sqlite_dir(dir.path());
    for _ in 0..3 {
        let cache = CacheOptions::new(dir.path()).open().unwrap();
        assert_eq!(cache.cached_images().unwrap().len(), 2);
    }
}

/// A cache directory as Glance's xattr driver leaves it: files carrying
/// only `user.hits`, with atime as the last access.
#[test]
fn xattr_opens_glance_files_and_keeps_them_glance_readable() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["queue", "incomplete", "invalid"] {
        fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let atime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for (image, hits) in [("old", "5"), ("new", "0")] {
        let path = dir.path().join(image);
        fs::write(&path, image.repeat(10)).unwrap();
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_xattr("user.hits", hits.as_bytes()).unwrap();
        let t = if image == "old" {
            atime
        } else {
            atime + Duration::from_secs(100)
        };
        f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
            .unwrap();
    }
    // Glance's rollback leaves user.error on the invalid file.
    let bad = dir.path().join("invalid/broken");
    fs::write(&bad, b"half").unwrap();
    xattr::set(&bad, "user.error", b"IOError: connection reset").unwrap();

    let f = Fixture::with(imgcache::testing::Store::XATTR, |o| {
        CacheOptions::new(dir.path())
            .driver(DriverKind::Xattr)
            .clock(o.clock_ref().clone())
    });
    let cache = &f.cache;
    let images = cache.cached_images().unwrap();
    let summary: Vec<(&str, u64, u64, Option<u32>)> = images
        .iter()
        .map(|i| (i.id.as_str(), i.hits, i.size, i.crc32))
        .collect();
    assert_eq!(summary, [("new", 0, 30, None), ("old", 5, 30, None)]);
    assert_eq!(images[1].last_accessed, atime, "atime is the fallback");
    let lru: Vec<String> = cache
        .least_recently_accessed()
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(lru, ["old", "new"]);
    let invalid = cache.invalid_images().unwrap();
    assert_eq!(
        invalid[0].reason.as_deref(),
        Some("IOError: connection reset")
    );

    // A read increments Glance's counter, as a decimal Glance can parse,
    // and records our own access time, which now outranks the atime.
    cache.open_for_read(&id("old")).unwrap().unwrap();
    // Hits are written in batches (as the SQLite store's): a Glance
    // process sees them once they are flushed.
    cache.flush().unwrap();
    let raw = xattr::get(dir.path().join("old"), "user.hits")
        .unwrap()
        .unwrap();
    assert_eq!(raw, b"6");
    let lru = cache.least_recently_accessed().unwrap();
    assert_eq!(lru[0].id.as_str(), "new");

    // Images we commit carry user.hits = 0 too, for Glance.
    f.put("ours", b"data");
    let raw = xattr::get(dir.path().join("ours"), "user.hits")
        .unwrap()
        .unwrap();
    assert_eq!(raw, b"0");
    assert!(SystemTime::now() > atime);
}

/// Glance's sqlite driver takes an external lock named `image_cache_db_init`
/// in the base directory, which leaves a 0-byte file there. It is Glance's,
/// never an image: not listed, not counted, not pruned, not written into
/// `cache.db` (where Glance would list it too).
#[test]
fn glance_lock_file_is_never_an_image() {
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        let dir = tempfile::tempdir().unwrap();
        glance_sqlite_dir(dir.path());
        let lock = dir.path().join("image_cache_db_init");
        fs::File::create(&lock).unwrap();
        let cache = CacheOptions::new(dir.path()).driver(kind).open().unwrap();
        assert!(
            !cache
                .recovery()
                .adopted
                .iter()
                .any(|i| i.as_str() == "image_cache_db_init"),
            "{kind}: {:?}",
            cache.recovery()
        );
        assert_eq!(cache.cache_size().unwrap(), 17, "{kind}");
        let ids: Vec<String> = cache
            .cached_images()
            .unwrap()
            .into_iter()
            .map(|i| i.id.to_string())
            .collect();
        assert!(!ids.iter().any(|i| i == "image_cache_db_init"), "{ids:?}");
        assert!(cache
            .least_recently_accessed()
            .unwrap()
            .iter()
            .all(|e| e.id.as_str() != "image_cache_db_init"));
        cache.prune_to(0).unwrap();
        cache.delete_all_cached_images().unwrap();
        cache.flush().unwrap();
        drop(cache);
        assert!(lock.is_file(), "{kind}: Glance's lock file was removed");
        let rows: i64 = Connection::open(dir.path().join("cache.db"))
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM cached_images WHERE image_id = 'image_cache_db_init'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0, "{kind}");
        // And nobody can cache an image of that name over it.
        assert!(imgcache::ImageId::new("image_cache_db_init").is_err());
    }
}

/// The child's part of the tests below: opens the cache named by the
/// environment, runs `cmd`, says `done` and waits to be killed.
#[test]
fn child() {
    let Some((cmd, cache)) = common::child_cache() else {
        return;
    };
    match cmd.as_str() {
        // A checkpoint, then hits on Glance's images, written to their
        // attributes (after the watermark).
        "hits" => {
            cache.checkpoint().unwrap();
            for (image, n) in [("hot-1", 3), ("hot-2", 2)] {
                for _ in 0..n {
                    cache.open_for_read(&id(image)).unwrap().unwrap();
                }
            }
            cache.flush().unwrap();
        }
        other => panic!("unknown child command {other:?}"),
    }
    println!("done");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::thread::sleep(Duration::from_secs(3600));
}

/// A process that served hits on a directory Glance's xattr driver wrote
/// (entries without a CRC-32) is killed: writing a hit count is no change
/// of content, so reopening quarantines none of the intact images, hot or
/// not, while one whose bytes changed after the watermark still goes.
#[test]
fn a_crash_after_hits_keeps_glance_written_images() {
    let dir = tempfile::tempdir().unwrap();
    // Without birth times the change time stands in (which hits move):
    // safe, but the hot set is then refetched, and this cannot be shown.
    if fs::metadata(dir.path()).and_then(|m| m.created()).is_err() {
        assert!(
            std::env::var_os("IMGCACHE_REQUIRE_MOUNTS").is_none(),
            "no birth times here"
        );
        eprintln!("skipped: the temp file system keeps no birth times");
        return;
    }
    for sub in ["queue", "incomplete", "invalid"] {
        fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    // As Glance's xattr driver commits: the bytes, then user.hits = 0.
    for image in ["hot-1", "hot-2", "cold", "late"] {
        let path = dir.path().join(image);
        fs::write(&path, image.repeat(100)).unwrap();
        xattr::set(&path, "user.hits", b"0").unwrap();
    }
    let store = imgcache::testing::Store::XATTR;
    let mut child = common::child_command(store, dir.path(), "hits")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    common::wait_for_line(&mut out, "done");
    // The hits are on the files; the process dies before any clean close.
    assert_eq!(
        xattr::get(dir.path().join("hot-1"), "user.hits")
            .unwrap()
            .unwrap(),
        b"3"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // And the machine went down: after the watermark the bytes of one
    // image changed, and it could be torn, with no CRC to tell.
    common::as_if_the_machine_went_down(dir.path());
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("late"))
            .unwrap();
        f.write_all_at(b"XXXX", 10).unwrap();
    }
    let cache = store.open(CacheOptions::new(dir.path())).unwrap();
    let r = cache.recovery();
    assert!(r.unclean_shutdown, "{r:?}");
    assert_eq!(r.torn, vec![id("late")], "{r:?}");
    assert!(r.quarantined.is_empty(), "{r:?}");
    let listed: Vec<(String, u64)> = cache
        .cached_images()
        .unwrap()
        .into_iter()
        .map(|i| (i.id.to_string(), i.hits))
        .collect();
    assert_eq!(
        listed,
        [
            ("cold".to_string(), 0),
            ("hot-1".to_string(), 3),
            ("hot-2".to_string(), 2)
        ]
    );
}
