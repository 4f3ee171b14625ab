//! The open-file cache: descriptors of hot images kept open serve hits
//! without an `open`, and never the old bytes once the file was deleted,
//! pruned, quarantined or replaced — by this cache, by another handle, or
//! by another process. Every case runs against every driver.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use common::{bytes, child_command, id, Fixture};
use imgcache::clock::Clock;
use imgcache::testing::Store;
use imgcache::{CacheOptions, Error, ImageCache, ImageId};

for_each_driver!(
    hot_hits_read_independently_and_count,
    hits_on_kept_descriptors_reach_counts_the_pruner_and_other_handles,
    a_hit_after_a_delete_serves_no_old_bytes,
    a_hit_after_another_handles_delete_and_recommit_serves_the_new_bytes,
    a_hit_after_a_prune_serves_no_old_bytes,
    a_hit_after_another_handles_prune_serves_no_old_bytes,
    a_hit_after_a_quarantine_serves_no_old_bytes,
    a_file_moved_aside_behind_the_cache_is_not_served,
    a_file_truncated_after_a_hit_is_refused,
    a_recommit_by_another_process_is_served_at_the_next_hit,
    kept_descriptors_stay_within_the_limit,
    no_descriptor_is_kept_when_turned_off,
    async_hits_on_kept_descriptors_answer_on_the_runtime,
);

/// Reads `id` whole through `cache`; `None` if it is not cached.
fn read(cache: &ImageCache, id: &ImageId) -> Option<Vec<u8>> {
    cache
        .open_for_read(id)
        .expect("open_for_read")
        .map(|mut img| img.read_all().expect("read"))
}

/// Caches `x` with `data` through `cache`.
fn put(cache: &ImageCache, x: &ImageId, data: &[u8]) {
    assert!(cache.cache_image_file(x, data).expect("cache"));
}

fn hot_hits_read_independently_and_count(kind: Store) {
    let f = Fixture::new(kind);
    let data = bytes(1, 100_000);
    let x = f.put("x", &data);
    // The first hit opens and keeps the descriptor; the next ones share it.
    let mut a = f.cache.open_for_read(&x).unwrap().unwrap();
    let mut b = f.cache.open_for_read(&x).unwrap().unwrap();
    let mut c = f.cache.open_for_read(&x).unwrap().unwrap();
    assert_eq!(
        (a.info().hits, b.info().hits, c.info().hits),
        (1, 2, 3),
        "each hit counted, in order"
    );
    // Each handle's position is its own.
    let mut buf = vec![0u8; 1000];
    a.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data[..1000]);
    b.seek(SeekFrom::Start(50_000)).unwrap();
    b.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data[50_000..51_000]);
    a.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data[1000..2000]);
    assert_eq!(c.seek(SeekFrom::End(-10)).unwrap(), 99_990);
    let mut tail = Vec::new();
    c.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, data[99_990..]);
    assert!(c.seek(SeekFrom::Current(-200_000)).is_err());
    // A whole read ignores the position; the file handed out starts at 0.
    assert_eq!(b.read_all().unwrap(), data);
    let mut whole = Vec::new();
    a.into_file().unwrap().read_to_end(&mut whole).unwrap();
    assert_eq!(whole, data);
    drop((b, c));
    f.cache.flush().unwrap();
    assert_eq!(f.cache.hit_count(&x).unwrap(), 3);
}

/// Hits on a kept descriptor are counted on it, not in the store, and
/// handed over in batches: whatever reads counts or access times back
/// sees them at once (no flush), the pruner orders by them, and another
/// handle sees them after a flush.
fn hits_on_kept_descriptors_reach_counts_the_pruner_and_other_handles(kind: Store) {
    let f = Fixture::new(kind);
    let a = f.put("a", &bytes(1, 4096));
    let b = f.put("b", &bytes(2, 4096));
    // `a` first read (and kept) before `b`, then read again after it:
    // only the kept entry knows that `a` is the more recent.
    f.tick(10);
    assert!(read(&f.cache, &a).is_some());
    f.tick(10);
    assert!(read(&f.cache, &b).is_some());
    f.tick(10);
    let later = f.clock.now();
    for _ in 0..4 {
        assert!(read(&f.cache, &a).is_some());
    }
    assert_eq!(f.cache.hit_count(&a).unwrap(), 5, "{kind}: no flush needed");
    let info = f.cache.cached_image(&a).unwrap().unwrap();
    // The latest hit's time, as the stores keep it (to the microsecond).
    let off = match info.last_accessed.duration_since(later) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        off.as_nanos() <= 500,
        "{kind}: {:?} for a hit at {later:?}",
        info.last_accessed
    );
    let order: Vec<ImageId> = f
        .cache
        .least_recently_accessed()
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(order, [b.clone(), a.clone()], "{kind}: LRU sees kept hits");
    let listed = f.cache.cached_images().unwrap();
    assert_eq!(listed.iter().find(|e| e.id == a).unwrap().hits, 5);
    // The pruner keeps the image read last.
    let r = f.cache.prune_to(4096).unwrap();
    assert_eq!(r.removed, [b], "{kind}");
    // More hits, then another handle, after a flush.
    assert!(read(&f.cache, &a).is_some());
    f.cache.flush().unwrap();
    let other = f.reopen();
    assert_eq!(other.hit_count(&a).unwrap(), 6, "{kind}: another handle");
}

fn a_hit_after_a_delete_serves_no_old_bytes(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(2, 5000));
    assert!(read(&f.cache, &x).is_some());
    assert!(f.cache.delete_cached_image(&x).unwrap());
    assert_eq!(read(&f.cache, &x), None);
    put(&f.cache, &x, &bytes(3, 6000));
    assert_eq!(read(&f.cache, &x), Some(bytes(3, 6000)));
}

fn a_hit_after_another_handles_delete_and_recommit_serves_the_new_bytes(kind: Store) {
    let f = Fixture::new(kind);
    let other = f.reopen();
    let x = f.put("x", &bytes(4, 5000));
    assert_eq!(read(&f.cache, &x), Some(bytes(4, 5000)));
    // Another handle (a descriptor table of its own, as another process
    // has) deletes it: this one no longer serves it...
    assert!(other.delete_cached_image(&x).unwrap());
    assert_eq!(read(&f.cache, &x), None);
    // ...and once it is cached again, serves the new bytes only.
    put(&other, &x, &bytes(5, 5000));
    assert_eq!(read(&f.cache, &x), Some(bytes(5, 5000)));
    // The same with no miss in between: deleted and recommitted at once.
    assert!(other.delete_cached_image(&x).unwrap());
    put(&other, &x, &bytes(6, 5000));
    assert_eq!(read(&f.cache, &x), Some(bytes(6, 5000)));
}

fn a_hit_after_a_prune_serves_no_old_bytes(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(7, 5000));
    assert!(read(&f.cache, &x).is_some());
    assert_eq!(f.cache.prune_to(0).unwrap().removed, vec![x.clone()]);
    assert_eq!(read(&f.cache, &x), None);
}

fn a_hit_after_another_handles_prune_serves_no_old_bytes(kind: Store) {
    let f = Fixture::new(kind);
    let other = f.reopen();
    let x = f.put("x", &bytes(8, 5000));
    // Its entry written, for the other handle's prune to see it (a commit
    // with group durability holds it for up to a second).
    f.cache.flush().unwrap();
    assert!(read(&f.cache, &x).is_some());
    assert_eq!(other.prune_to(0).unwrap().removed, vec![x.clone()]);
    assert_eq!(read(&f.cache, &x), None);
    put(&other, &x, &bytes(9, 5000));
    assert_eq!(read(&f.cache, &x), Some(bytes(9, 5000)));
}

fn a_hit_after_a_quarantine_serves_no_old_bytes(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(10, 5000));
    assert!(read(&f.cache, &x).is_some());
    // A byte flipped on disk, its size and modification time kept (so
    // that only the quarantine tells): a verify quarantines it.
    let path = f.path().join("x");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let mut on_disk = fs::read(&path).unwrap();
    on_disk[100] ^= 0xff;
    fs::write(&path, &on_disk).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(matches!(
        f.cache.verify_or_quarantine(&x).unwrap(),
        Some(imgcache::Verification::Corrupt { .. })
    ));
    assert!(!path.exists(), "moved to invalid/");
    assert_eq!(read(&f.cache, &x), None);
}

fn a_file_moved_aside_behind_the_cache_is_not_served(kind: Store) {
    // What a quarantine by another process (or Glance's own invalidation)
    // does on disk: the file renamed away, its links and bytes unchanged.
    // Kept right after its commit (its change time still recent) and moved
    // at once, and again once its change time is old.
    let f = Fixture::new(kind);
    for round in 0..20 {
        let x = id(&format!("x{round}"));
        put(&f.cache, &x, &bytes(round, 4096));
        assert!(read(&f.cache, &x).is_some());
        fs::rename(
            f.path().join(x.as_str()),
            f.path().join("invalid").join(x.as_str()),
        )
        .unwrap();
        assert!(
            f.cache.open_for_read(&x).map_or(true, |i| i.is_none()),
            "round {round}: a file moved away was served"
        );
    }
}

fn a_file_truncated_after_a_hit_is_refused(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(11, 10_000));
    assert!(read(&f.cache, &x).is_some());
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.path().join("x"))
        .unwrap();
    file.set_len(4_000).unwrap();
    match f.cache.open_for_read(&x) {
        Err(Error::Corrupt { id, .. }) => assert_eq!(id, x),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(read(&f.cache, &x), None);
}

fn a_recommit_by_another_process_is_served_at_the_next_hit(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(12, 50_000));
    assert_eq!(read(&f.cache, &x), Some(bytes(12, 50_000)));
    // A real process deletes the image and caches other bytes under its
    // id; this cache holds the old file open all along.
    let status = child_command(kind, f.path(), "recommit x 13")
        .status()
        .expect("run the child");
    assert!(status.success(), "child failed: {status}");
    assert_eq!(read(&f.cache, &x), Some(bytes(13, 50_000)));
}

/// The child's part: `recommit <id> <seed>` deletes `<id>` and caches the
/// bytes of `<seed>` under it.
#[test]
fn child() {
    let Some((cmd, cache)) = common::child_cache() else {
        return;
    };
    let words: Vec<&str> = cmd.split(' ').collect();
    match words[..] {
        ["recommit", name, seed] => {
            let x = id(name);
            assert!(cache.delete_cached_image(&x).unwrap());
            put(&cache, &x, &bytes(seed.parse().unwrap(), 50_000));
        }
        _ => panic!("unknown child command {cmd:?}"),
    }
}

/// Descriptors this process holds on regular files in `dir` (its cached
/// images; not the database).
fn descriptors_in(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.parent() == Some(dir))
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with("cache.db")
        })
        .count()
}

fn kept_descriptors_stay_within_the_limit(kind: Store) {
    let f = Fixture::with(kind, |o: CacheOptions| o.open_files(4));
    let dir = fs::canonicalize(f.path()).unwrap();
    let ids: Vec<ImageId> = (0..20)
        .map(|n| f.put(&format!("img{n}"), &bytes(n, 1000)))
        .collect();
    for round in 0..3 {
        for (n, x) in ids.iter().enumerate() {
            assert_eq!(read(&f.cache, x), Some(bytes(n as u64, 1000)));
            assert!(descriptors_in(&dir) <= 4, "round {round}, image {n}");
        }
    }
    assert!(descriptors_in(&dir) > 0, "hot images are kept open");
    // A prune of everything leaves no descriptor behind.
    f.cache.prune_to(0).unwrap();
    assert_eq!(descriptors_in(&dir), 0);
}

fn no_descriptor_is_kept_when_turned_off(kind: Store) {
    let f = Fixture::with(kind, |o: CacheOptions| o.open_files(0));
    let dir = fs::canonicalize(f.path()).unwrap();
    let x = f.put("x", &bytes(14, 1000));
    for n in 1..=3 {
        let img = f.cache.open_for_read(&x).unwrap().unwrap();
        assert_eq!(img.info().hits, n);
    }
    assert_eq!(descriptors_in(&dir), 0);
}

/// Hits through the async face: the second and later ones are answered on
/// the runtime's thread from the kept descriptor (for stores that count
/// hits in memory; the others on the blocking pool), never by a call that
/// needs a runtime of its own (the PostgreSQL client's), and a delete by
/// another handle is seen there too.
fn async_hits_on_kept_descriptors_answer_on_the_runtime(kind: Store) {
    let f = Fixture::new(kind);
    let data = bytes(15, 70_000);
    let x = f.put("x", &data);
    let cache = std::sync::Arc::new(f.reopen());
    let other = f.reopen();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n in 1..=5u64 {
            let mut img = cache.open_for_read_async(&x).await.unwrap().unwrap();
            assert_eq!(img.info().hits, n);
            assert_eq!(img.read_all().unwrap(), data);
            if n == 2 {
                // A change of the file's change time alone (a chmod): the
                // path is asked, the file is still the cached one, and the
                // store is not asked (its memory of the file no longer
                // matches; a round trip to PostgreSQL here would panic).
                use std::os::unix::fs::PermissionsExt;
                let path = f.path().join("x");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
    });
    // (The PostgreSQL store's client must not be driven from a runtime.)
    assert!(other.delete_cached_image(&x).unwrap());
    rt.block_on(async {
        assert!(cache.open_for_read_async(&x).await.unwrap().is_none());
    });
}
