use super::*;
use crate::clock::ManualClock;
use crate::{CacheOptions, ImageCache};

fn open(dir: &Path) -> SqliteDriver {
    SqliteDriver::open(&dir.join("cache.db")).unwrap()
}

/// A cache in `dir` over a handle `d` on its store.
fn cache(dir: &Path, d: &SqliteDriver) -> ImageCache {
    let options = CacheOptions::new(dir).clock(Arc::new(ManualClock::at_secs(1000)));
    ImageCache::with_driver(Arc::new(d.clone()), options).unwrap()
}

/// The store keeps no metadata on files: it never asks for them.
struct NoFiles;

impl CachedFiles for NoFiles {
    fn each_cached(
        &self,
        _open: bool,
        _f: &mut dyn FnMut(&ImageId, OnDisk<'_>) -> Result<()>,
    ) -> Result<()> {
        panic!("the sqlite store walked the files")
    }
}

/// `f` on the file at `path`, as the file layer would hand it over.
fn on_disk<T>(path: &Path, f: impl FnOnce(OnDisk<'_>) -> T) -> T {
    let meta = std::fs::metadata(path).unwrap();
    f(OnDisk::new(path, None, &meta))
}

#[test]
fn lru_order_comes_from_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path());
    let plan: Vec<String> = d
        .with_conn(|c| {
            c.prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM cached_images ORDER BY last_accessed, image_id"
            ))?
            .query_map([], |r| r.get::<_, String>(3))?
            .collect()
        })
        .unwrap();
    let plan = plan.join("; ");
    assert!(plan.contains("imgcache_lru"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "{plan}");
}

#[test]
fn wal_mode_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let d = SqliteDriver::open_with(&dir.path().join("cache.db"), SqliteJournal::Wal).unwrap();
    let (mode, cols): (String, Vec<String>) = d
        .with_conn(|c| {
            let mode = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            let cols = c
                .prepare("SELECT name FROM pragma_table_info('cached_images')")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok((mode, cols))
        })
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(
        cols,
        [
            "image_id",
            "last_accessed",
            "last_modified",
            "size",
            "hits",
            "checksum",
            "crc32"
        ]
    );
}

#[test]
fn decodes_glance_defaults_and_refuses_nonsense() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path());
    d.with_conn(|c| {
        c.execute_batch(
            "INSERT INTO cached_images (image_id) VALUES ('defaults');
             INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits)
                 VALUES ('ints', 5, 6, 7, 8);
             INSERT INTO cached_images (image_id, size) VALUES ('neg', -1);
             INSERT INTO cached_images (image_id, hits) VALUES ('text', 'many');
             INSERT INTO cached_images (image_id) VALUES ('../escape');
             INSERT INTO cached_images (image_id, crc32) VALUES ('bigcrc', 5000000000);",
        )
    })
    .unwrap();
    let images = d.list(&NoFiles).unwrap();
    let ids: Vec<&str> = images.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["defaults", "ints"]);
    assert_eq!(images[0].size, 0);
    assert_eq!(images[0].crc32, None);
    assert_eq!(images[1].hits, 8);
    assert_eq!(to_epoch_secs(images[1].last_accessed), 5.0);
    std::fs::write(dir.path().join("neg"), b"").unwrap();
    let bad = on_disk(&dir.path().join("neg"), |on| {
        d.get(&ImageId::new("neg").unwrap(), on)
    })
    .unwrap_err();
    assert!(bad.to_string().contains("size is negative"), "{bad}");
    assert!(bad.to_string().contains("cache.db"), "{bad}");
}

#[test]
fn foreign_schema_is_refused_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cache.db");
    Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE cached_images (id INTEGER, blob BLOB)")
        .unwrap();
    let e = SqliteDriver::open(&db).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("cache.db") && msg.contains("no column"),
        "{msg}"
    );
}

/// A store and a cache on it in a fresh directory holding one
/// three-byte image.
/// One image, in a WAL store (whose log the tests below watch).
fn one_image() -> (tempfile::TempDir, SqliteDriver, ImageCache, ImageId) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = SqliteDriver::open_with(&dir.path().join("cache.db"), SqliteJournal::Wal).unwrap();
    let c = cache(dir.path(), &d);
    let x = ImageId::new("x").unwrap();
    let mut w = c.open_for_write(&x).unwrap();
    w.write_all(b"abc").unwrap();
    w.commit().unwrap();
    (dir, d, c, x)
}

/// Every metadata write goes to the log; the background checkpointer
/// keeps it bounded (without it, it grows by a few KiB per write, for
/// ever), and readers' hits, batched, add little to it.
#[test]
fn wal_stays_bounded_under_metadata_writes() {
    let (dir, d, _c, x) = one_image();
    let file = dir.path().join("x");
    let conn = d.inner.conn.lock();
    let autockpt: i64 = conn
        .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
        .unwrap();
    assert_eq!(autockpt, 0, "connections never checkpoint inline");
    drop(conn);
    let wal = dir.path().join("cache.db-wal");
    let mut high = 0;
    let mut expected = 0;
    let mut n = 0u32;
    for _ in 0..32 {
        for _ in 0..super::wal::CHECKPOINT_EVERY {
            n += 1;
            on_disk(&file, |on| d.set_crc32(&x, n, on)).unwrap();
        }
        expected += 1;
        let got = d
            .inner
            .wal_merger
            .wait_completed(expected, Duration::from_secs(60));
        assert!(got >= expected, "checkpoint {expected} never completed");
        high = high.max(std::fs::metadata(&wal).unwrap().len());
    }
    eprintln!("log high-water mark, pausing between batches: {high} bytes");
    assert!(high < 8 << 20, "log reached {high} bytes");
    assert!(d.wal_merges() >= 32);
}

/// The same under steady writes and reads, nobody waiting for the
/// checkpointer; hits are exact once read back.
#[test]
fn wal_stays_bounded_under_steady_load() {
    let (dir, d, c, x) = one_image();
    let file = dir.path().join("x");
    let wal = dir.path().join("cache.db-wal");
    let mut high = 0;
    // 65 536 writes would leave ~520 MB of log without checkpoints.
    for i in 0..65_536u32 {
        on_disk(&file, |on| d.set_crc32(&x, i, on)).unwrap();
        c.open_for_read(&x).unwrap().unwrap();
        if i % 256 == 0 {
            high = high.max(std::fs::metadata(&wal).unwrap().len());
        }
    }
    eprintln!("log high-water mark under steady load: {high} bytes");
    assert!(high < 16 << 20, "log reached {high} bytes");
    assert_eq!(c.hit_count(&x).unwrap(), 65_536);
}

/// Glance's journal mode by default: while the store is open and after
/// writes, nothing but the database is beside it (Glance's drivers take
/// every other regular file for an image); a database an earlier
/// version left in WAL mode is turned back.
#[test]
fn glance_journal_leaves_nothing_beside_the_database() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cache.db");
    drop(SqliteDriver::open_with(&db, SqliteJournal::Wal).unwrap());
    let d = open(dir.path());
    let c = cache(dir.path(), &d);
    for i in 0..20 {
        let x = ImageId::new(format!("img-{i}")).unwrap();
        let mut w = c.open_for_write(&x).unwrap();
        w.write_all(b"abc").unwrap();
        w.commit().unwrap();
        c.open_for_read(&x).unwrap().unwrap();
    }
    c.flush().unwrap();
    let mode: String = d
        .with_conn(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(mode, "delete");
    let beside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cache.db") && n != "cache.db")
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
}

#[test]
fn queue_counter_is_shared_between_handles() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let b = open(dir.path());
    let q = dir.path();
    assert_eq!(on_disk(q, |on| a.next_queue_seq(on)).unwrap(), 1);
    assert_eq!(on_disk(q, |on| b.next_queue_seq(on)).unwrap(), 2);
    assert_eq!(on_disk(q, |on| a.next_queue_seq(on)).unwrap(), 3);
}
