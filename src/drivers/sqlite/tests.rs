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
    // Its row written (a commit with group durability holds it), so that
    // what follows writes the database.
    d.flush().unwrap();
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

/// Entries of group-durability commits are held: this handle sees them at
/// once, another handle on the same database only once they are written
/// (by a flush, which every checkpoint makes); sizes count them unwritten.
#[test]
fn batched_entries_are_held_then_written_together() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (open(dir.path()), open(dir.path()));
    a.inner.rows.lock().hold_until_flushed();
    let ids: Vec<ImageId> = (0..3)
        .map(|i| ImageId::new(format!("img-{i}")).unwrap())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let path = dir.path().join(id.as_str());
        std::fs::write(&path, vec![1u8; 10 * (i + 1)]).unwrap();
        let entry = CachedImageInfo::new(id.clone(), 10 * (i as u64 + 1), SystemTime::now())
            .with_crc32(Some(7));
        on_disk(&path, |f| a.insert_batched(&entry, f)).unwrap();
    }
    let path0 = dir.path().join("img-0");
    // This handle: the entry, its hits, a CRC set on it, its size.
    let seen = on_disk(&path0, |f| a.get(&ids[0], f)).unwrap().unwrap();
    assert_eq!((seen.size, seen.crc32), (10, Some(7)));
    on_disk(&path0, |f| a.hit(&ids[0], SystemTime::now(), f))
        .unwrap()
        .unwrap();
    on_disk(&path0, |f| a.set_crc32(&ids[0], 9, f)).unwrap();
    assert_eq!(a.total_size(&NoFiles).unwrap(), 60);
    // Another handle: nothing yet, and nothing written by a size query.
    assert!(on_disk(&path0, |f| b.get(&ids[0], f)).unwrap().is_none());
    assert_eq!(b.total_size(&NoFiles).unwrap(), 0);
    // A file removed before the write takes its entry with it, whoever
    // removed it; a removal through this handle forgets it at once.
    std::fs::remove_file(dir.path().join("img-1")).unwrap();
    std::fs::remove_file(dir.path().join("img-2")).unwrap();
    assert_eq!(a.remove(&ids[2..], &|_| true).unwrap(), 1);
    a.flush().unwrap();
    let listed = b.list(&NoFiles).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (
            listed[0].id.as_str(),
            listed[0].size,
            listed[0].crc32,
            listed[0].hits
        ),
        ("img-0", 10, Some(9), 1)
    );
}

/// A held entry whose file was replaced by another commit of the same id
/// (another process's) is not written over that commit's entry.
#[test]
fn a_held_entry_of_a_replaced_file_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (open(dir.path()), open(dir.path()));
    a.inner.rows.lock().hold_until_flushed();
    let id = ImageId::new("img").unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, b"old").unwrap();
    let old = CachedImageInfo::new(id.clone(), 3, SystemTime::now()).with_crc32(Some(1));
    on_disk(&path, |f| a.insert_batched(&old, f)).unwrap();
    // Replaced behind a's back: committed anew by b (renamed over it).
    std::fs::write(dir.path().join("new"), b"newer").unwrap();
    std::fs::rename(dir.path().join("new"), &path).unwrap();
    let new = CachedImageInfo::new(id.clone(), 5, SystemTime::now()).with_crc32(Some(2));
    b.insert(&new).unwrap();
    // Asked with the file in place now, a answers with its row, not with
    // the entry it held for the file replaced (whose size would not match).
    let seen = on_disk(&path, |f| a.get(&id, f)).unwrap().unwrap();
    assert_eq!((seen.size, seen.crc32), (5, Some(2)));
    let hit = on_disk(&path, |f| a.hit(&id, SystemTime::now(), f))
        .unwrap()
        .unwrap();
    assert_eq!((hit.size, hit.crc32), (5, Some(2)));
    a.flush().unwrap();
    let got = on_disk(&path, |f| b.get(&id, f)).unwrap().unwrap();
    assert_eq!((got.size, got.crc32, got.hits), (5, Some(2), 1));
}

/// Held entries are written by the writer thread without a flush (a full
/// batch at once, any within a second): other handles see them
/// without waiting for a checkpoint.
#[test]
fn held_entries_are_written_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (open(dir.path()), open(dir.path()));
    let n = held::ROW_BATCH;
    for i in 0..n {
        let id = ImageId::new(format!("img-{i}")).unwrap();
        let path = dir.path().join(id.as_str());
        std::fs::write(&path, b"x").unwrap();
        let entry = CachedImageInfo::new(id, 1, SystemTime::now());
        on_disk(&path, |f| a.insert_batched(&entry, f)).unwrap();
    }
    // Wait on the event: the rows appearing (bounded, never a sleep-and-
    // hope: the writer was woken when the batch filled).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b.total_size(&NoFiles).unwrap() != n as u64 {
        assert!(std::time::Instant::now() < deadline, "batch never written");
        std::thread::yield_now();
    }
}

/// A prune under the limit sums the sizes and stops: it writes none of the
/// entries held (a prune after every fill would write each one alone);
/// over it, held entries are evicted as any other.
#[test]
fn a_prune_under_the_limit_writes_nothing_held() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (d, other) = (open(dir.path()), open(dir.path()));
    d.inner.rows.lock().hold_until_flushed();
    let options = CacheOptions::new(dir.path())
        .clock(Arc::new(ManualClock::at_secs(1000)))
        .max_size(1 << 20)
        .durability(crate::Durability::Group {
            interval: Duration::from_secs(3600),
            bytes: u64::MAX,
        });
    let c = ImageCache::with_driver(Arc::new(d.clone()), options).unwrap();
    let x = ImageId::new("x").unwrap();
    let mut w = c.open_for_write(&x).unwrap();
    w.write_all(b"held").unwrap();
    w.commit().unwrap();
    let report = c.prune().unwrap();
    assert_eq!((report.files(), report.remaining), (0, 4));
    assert_eq!(
        other.total_size(&NoFiles).unwrap(),
        0,
        "the entry was written"
    );
    assert_eq!(c.prune_to(0).unwrap().removed, vec![x]);
    assert_eq!(other.total_size(&NoFiles).unwrap(), 0);
}
