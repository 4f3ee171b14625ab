//! The behaviour suite: every case runs against every driver.

mod common;

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use common::{bytes, id, Fixture};
use imgcache::testing::Store;
use imgcache::{Error, IdError, ImageId};

for_each_driver!(
    empty_cache_reports_nothing,
    commit_makes_exact_bytes_readable,
    commit_records_size_crc_and_times,
    reads_count_hits_and_set_last_accessed,
    cached_images_are_ordered_by_id,
    cache_size_sums_cached_images,
    image_size_of_cached_and_missing,
    seek_and_partial_reads,
    empty_image_is_cached,
    second_writer_is_refused_while_first_writes,
    writing_a_cached_image_is_refused,
    drop_without_commit_moves_to_invalid,
    abort_records_the_reason,
    failed_commit_path_when_file_appears_meanwhile,
    queue_image_rules,
    queue_keeps_order_within_one_second,
    commit_takes_image_off_the_queue,
    delete_queued_and_all_queued,
    delete_cached_image_once,
    delete_all_cached_images_counts,
    prune_deletes_least_recently_accessed_first,
    prune_to_zero_empties_the_cache,
    prune_under_limit_does_nothing,
    prune_uses_configured_max_size,
    clean_removes_invalid_and_stalled_only,
    clean_spares_a_live_writer_however_old,
    clean_with_clock_behind_file_times_keeps_files,
    cache_image_file_caches_once,
    cache_image_file_source_error_goes_to_invalid,
    state_moves_queued_incomplete_cached,
    state_moves_queued_incomplete_invalid,
    reopen_keeps_everything,
    another_handle_sees_commits_at_once,
    concurrent_readers_lose_no_hits,
    concurrent_writers_of_distinct_images,
    racing_writers_of_one_image_one_wins,
    invalid_ids_never_reach_the_file_system,
    custom_db_name_is_reserved,
    truncated_file_is_refused_not_served,
    foreign_files_in_cache_dir_are_ignored,
    unicode_and_long_ids_work,
    writer_error_surfaces_and_keeps_nothing_cached,
);

fn empty_cache_reports_nothing(kind: Store) {
    let f = Fixture::new(kind);
    let c = &f.cache;
    let x = id("x");
    assert_eq!(c.cache_size().unwrap(), 0);
    assert!(c.cached_images().unwrap().is_empty());
    assert!(c.queued_images().unwrap().is_empty());
    assert!(c.invalid_images().unwrap().is_empty());
    assert!(c.least_recently_accessed().unwrap().is_empty());
    assert!(!c.is_cached(&x).unwrap());
    assert!(!c.is_being_cached(&x).unwrap());
    assert!(!c.is_queued(&x).unwrap());
    assert!(c.is_cacheable(&x).unwrap());
    assert_eq!(c.hit_count(&x).unwrap(), 0);
    assert_eq!(c.image_size(&x).unwrap(), None);
    assert!(c.cached_image(&x).unwrap().is_none());
    assert!(c.open_for_read(&x).unwrap().is_none());
    assert!(!c.delete_cached_image(&x).unwrap());
    assert!(!c.delete_queued_image(&x).unwrap());
    assert_eq!(c.delete_all_cached_images().unwrap(), 0);
    assert_eq!(c.delete_all_queued_images().unwrap(), 0);
    assert_eq!(c.prune_to(0).unwrap().files(), 0);
    assert_eq!(c.clean(None).unwrap().files(), 0);
    assert_eq!(c.driver().name(), kind.name());
    // The same store by name, as `ImageCache::open` picks it from options.
    let opened = kind
        .configure(imgcache::CacheOptions::new(f.path()))
        .open()
        .unwrap();
    assert_eq!(opened.driver_kind().map(|k| k.as_str()), Some(kind.name()));
}

fn commit_makes_exact_bytes_readable(kind: Store) {
    let f = Fixture::new(kind);
    let data = bytes(1, 3 * 1024 * 1024 + 17);
    let x = id("x");
    let mut w = f.cache.open_for_write(&x).unwrap();
    // Odd chunk sizes, smaller and larger than the writer's buffer.
    for chunk in data.chunks(100_003) {
        w.write_all(chunk).unwrap();
    }
    assert_eq!(w.written(), data.len() as u64);
    assert!(f.cache.is_being_cached(&x).unwrap());
    assert!(!f.cache.is_cached(&x).unwrap());
    w.commit().unwrap();
    assert!(f.cache.is_cached(&x).unwrap());
    assert!(!f.cache.is_being_cached(&x).unwrap());
    assert_eq!(f.get(&x).unwrap(), data);
    assert!(f.path().join("x").is_file());
    assert!(!f.path().join("incomplete/x").exists());
}

fn commit_records_size_crc_and_times(kind: Store) {
    let f = Fixture::new(kind);
    let data = bytes(2, 70_000);
    let x = id("x");
    let mut w = f.cache.open_for_write(&x).unwrap();
    w.set_checksum("0123456789abcdef0123456789abcdef");
    w.write_all(&data).unwrap();
    let committed = w.commit().unwrap();
    let now = f.clock.now_rounded();
    assert_eq!(committed.size, 70_000);
    assert_eq!(committed.crc32, Some(crc32fast::hash(&data)));
    assert_eq!(committed.hits, 0);
    let info = f.cache.cached_image(&x).unwrap().unwrap();
    assert_eq!(info, committed);
    assert_eq!(info.last_modified, now);
    assert_eq!(info.last_accessed, now);
    assert_eq!(
        info.checksum.as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );
}

fn reads_count_hits_and_set_last_accessed(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", b"hello");
    let modified = f.cache.cached_image(&x).unwrap().unwrap().last_modified;
    for n in 1..=5u64 {
        f.tick(10);
        let img = f.cache.open_for_read(&x).unwrap().unwrap();
        assert_eq!(img.info().hits, n, "the open's own hit is in its info");
        assert_eq!(img.info().last_accessed, f.clock.now_rounded());
        assert_eq!(f.cache.hit_count(&x).unwrap(), n);
    }
    let info = f.cache.cached_image(&x).unwrap().unwrap();
    assert_eq!(info.hits, 5);
    assert_eq!(
        info.last_modified, modified,
        "reads do not touch last_modified"
    );
    // Metadata queries are not hits.
    f.cache.cached_images().unwrap();
    f.cache.image_size(&x).unwrap();
    assert_eq!(f.cache.hit_count(&x).unwrap(), 5);
}

fn cached_images_are_ordered_by_id(kind: Store) {
    let f = Fixture::new(kind);
    for name in ["m", "b", "z", "a", "99", "1"] {
        f.put(name, name.as_bytes());
    }
    let ids: Vec<String> = f
        .cache
        .cached_images()
        .unwrap()
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, ["1", "99", "a", "b", "m", "z"]);
}

fn cache_size_sums_cached_images(kind: Store) {
    let f = Fixture::new(kind);
    f.put("a", &bytes(1, 1000));
    f.put("b", &bytes(2, 2500));
    // Neither incomplete nor invalid bytes count.
    let mut w = f.cache.open_for_write(&id("c")).unwrap();
    w.write_all(&bytes(3, 4000)).unwrap();
    w.flush().unwrap();
    let mut v = f.cache.open_for_write(&id("d")).unwrap();
    v.write_all(b"junk").unwrap();
    v.abort("test").unwrap();
    assert_eq!(f.cache.cache_size().unwrap(), 3500);
    w.commit().unwrap();
    assert_eq!(f.cache.cache_size().unwrap(), 7500);
}

fn image_size_of_cached_and_missing(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(9, 12345));
    assert_eq!(f.cache.image_size(&x).unwrap(), Some(12345));
    assert_eq!(f.cache.image_size(&id("y")).unwrap(), None);
}

fn seek_and_partial_reads(kind: Store) {
    let f = Fixture::new(kind);
    let data = bytes(4, 100_000);
    let x = f.put("x", &data);
    let mut img = f.cache.open_for_read(&x).unwrap().unwrap();
    assert_eq!(img.len(), 100_000);
    img.seek(SeekFrom::Start(99_990)).unwrap();
    let mut tail = Vec::new();
    img.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, &data[99_990..]);
    img.seek(SeekFrom::Start(10)).unwrap();
    let mut mid = [0u8; 20];
    img.read_exact(&mut mid).unwrap();
    assert_eq!(mid, data[10..30]);
}

fn empty_image_is_cached(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("empty", b"");
    assert!(f.cache.is_cached(&x).unwrap());
    let img = f.cache.open_for_read(&x).unwrap().unwrap();
    assert!(img.is_empty());
    assert_eq!(img.info().crc32, Some(0));
    assert_eq!(f.cache.cache_size().unwrap(), 0);
}

fn second_writer_is_refused_while_first_writes(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    let mut first = f.cache.open_for_write(&x).unwrap();
    first.write_all(b"first").unwrap();
    assert!(!f.cache.is_cacheable(&x).unwrap());
    match f.cache.open_for_write(&x) {
        Err(Error::AlreadyBeingCached { id }) => assert_eq!(id, x),
        other => panic!("expected AlreadyBeingCached, got {other:?}"),
    }
    // Also from another handle on the directory.
    let other = f.reopen();
    assert!(matches!(
        other.open_for_write(&x),
        Err(Error::AlreadyBeingCached { .. })
    ));
    // The refused writer did not touch the first one's file.
    first.commit().unwrap();
    assert_eq!(f.get(&x).unwrap(), b"first");
}

fn writing_a_cached_image_is_refused(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", b"one");
    match f.cache.open_for_write(&x) {
        Err(e @ Error::AlreadyCached { .. }) => assert!(e.to_string().contains("x")),
        other => panic!("expected AlreadyCached, got {other:?}"),
    }
    assert_eq!(f.get(&x).unwrap(), b"one");
}

fn drop_without_commit_moves_to_invalid(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    {
        let mut w = f.cache.open_for_write(&x).unwrap();
        w.write_all(b"partial").unwrap();
    }
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(!f.cache.is_being_cached(&x).unwrap());
    assert!(f.cache.open_for_read(&x).unwrap().is_none());
    assert_eq!(fs::read(f.path().join("invalid/x")).unwrap(), b"partial");
    let invalid = f.cache.invalid_images().unwrap();
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].id, x);
    assert_eq!(invalid[0].size, 7);
    assert_eq!(
        invalid[0].reason.as_deref(),
        Some("writer dropped before commit")
    );
    assert_eq!(invalid[0].invalidated_at, Some(f.clock.now_rounded()));
    // The id can be written again.
    f.put("x", b"whole");
    assert_eq!(f.get(&x).unwrap(), b"whole");
}

fn abort_records_the_reason(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    let mut w = f.cache.open_for_write(&x).unwrap();
    w.write_all(b"abc").unwrap();
    w.abort("checksum mismatch: expected 00, got ff").unwrap();
    let invalid = f.cache.invalid_images().unwrap();
    assert_eq!(
        invalid[0].reason.as_deref(),
        Some("checksum mismatch: expected 00, got ff")
    );
    // A second failure of the same id replaces the first.
    let mut w = f.cache.open_for_write(&x).unwrap();
    w.write_all(b"abcdef").unwrap();
    w.abort("second").unwrap();
    let invalid = f.cache.invalid_images().unwrap();
    assert_eq!(invalid.len(), 1);
    assert_eq!(invalid[0].size, 6);
    assert_eq!(invalid[0].reason.as_deref(), Some("second"));
}

fn failed_commit_path_when_file_appears_meanwhile(kind: Store) {
    // Another tool (or a racing process) puts <id> in place while we write:
    // the commit must not replace it, and must leave no incomplete file.
    let f = Fixture::new(kind);
    let x = id("x");
    let mut w = f.cache.open_for_write(&x).unwrap();
    w.write_all(b"ours").unwrap();
    fs::write(f.path().join("x"), b"theirs").unwrap();
    assert!(matches!(w.commit(), Err(Error::AlreadyCached { .. })));
    assert_eq!(fs::read(f.path().join("x")).unwrap(), b"theirs");
    assert!(!f.cache.is_being_cached(&x).unwrap());
}

fn queue_image_rules(kind: Store) {
    let f = Fixture::new(kind);
    let q = id("q");
    assert!(f.cache.queue_image(&q).unwrap());
    assert!(f.cache.is_queued(&q).unwrap());
    assert!(!f.cache.queue_image(&q).unwrap(), "already queued");
    let cached = f.put("cached", b"1");
    assert!(!f.cache.queue_image(&cached).unwrap(), "already cached");
    assert!(!f.cache.is_queued(&cached).unwrap());
    let busy = id("busy");
    let w = f.cache.open_for_write(&busy).unwrap();
    assert!(!f.cache.queue_image(&busy).unwrap(), "being cached");
    drop(w);
    assert_eq!(f.cache.queued_images().unwrap(), vec![q]);
    // Queued images are neither cached nor being cached.
    assert!(f.cache.is_cacheable(&id("q")).unwrap());
}

fn queue_keeps_order_within_one_second(kind: Store) {
    let f = Fixture::new(kind);
    // The clock stands still: every image is queued "at the same time".
    let names = ["z", "a", "m", "b", "y", "c", "99", "1", "x", "k"];
    for n in names {
        assert!(f.cache.queue_image(&id(n)).unwrap());
    }
    let got: Vec<String> = f
        .cache
        .queued_images()
        .unwrap()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, names);
    // The order survives reopening and is shared with other handles.
    let other = f.reopen();
    assert!(other.queue_image(&id("last")).unwrap());
    let got: Vec<String> = f
        .cache
        .queued_images()
        .unwrap()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got.last().map(String::as_str), Some("last"));
    assert_eq!(&got[..names.len()], names);
}

fn commit_takes_image_off_the_queue(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    f.cache.queue_image(&x).unwrap();
    f.cache.queue_image(&id("y")).unwrap();
    f.put("x", b"data");
    assert!(!f.cache.is_queued(&x).unwrap());
    assert_eq!(f.cache.queued_images().unwrap(), vec![id("y")]);
    // A failed write leaves it queued, for the next prefetch run.
    let y = id("y");
    let w = f.cache.open_for_write(&y).unwrap();
    w.abort("backend error").unwrap();
    assert!(f.cache.is_queued(&y).unwrap());
}

fn delete_queued_and_all_queued(kind: Store) {
    let f = Fixture::new(kind);
    for n in ["a", "b", "c"] {
        f.cache.queue_image(&id(n)).unwrap();
    }
    assert!(f.cache.delete_queued_image(&id("b")).unwrap());
    assert!(!f.cache.delete_queued_image(&id("b")).unwrap());
    assert_eq!(f.cache.queued_images().unwrap(), vec![id("a"), id("c")]);
    assert_eq!(f.cache.delete_all_queued_images().unwrap(), 2);
    assert!(f.cache.queued_images().unwrap().is_empty());
    // Queueing again after a delete works, and goes to the back.
    f.cache.queue_image(&id("c")).unwrap();
    f.cache.queue_image(&id("a")).unwrap();
    assert_eq!(f.cache.queued_images().unwrap(), vec![id("c"), id("a")]);
}

fn delete_cached_image_once(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(1, 500));
    f.put("y", &bytes(2, 300));
    assert!(f.cache.delete_cached_image(&x).unwrap());
    assert!(!f.cache.delete_cached_image(&x).unwrap());
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(!f.path().join("x").exists());
    assert_eq!(f.cache.cache_size().unwrap(), 300);
    assert_eq!(f.cache.hit_count(&x).unwrap(), 0);
    // Re-cacheable after deletion, with fresh counters.
    f.put("x", b"new");
    assert_eq!(f.cache.hit_count(&x).unwrap(), 0);
}

fn delete_all_cached_images_counts(kind: Store) {
    let f = Fixture::new(kind);
    for n in ["a", "b", "c", "d"] {
        f.put(n, n.as_bytes());
    }
    f.cache.queue_image(&id("q")).unwrap();
    assert_eq!(f.cache.delete_all_cached_images().unwrap(), 4);
    assert_eq!(f.cache.cache_size().unwrap(), 0);
    assert!(f.cache.cached_images().unwrap().is_empty());
    assert_eq!(
        f.cache.queued_images().unwrap(),
        vec![id("q")],
        "queue untouched"
    );
    assert_eq!(f.cache.delete_all_cached_images().unwrap(), 0);
}

fn prune_deletes_least_recently_accessed_first(kind: Store) {
    let f = Fixture::new(kind);
    // Cached in order a, b, c, d (100 bytes each), then read so that the
    // access order becomes c, a, d, b.
    for n in ["a", "b", "c", "d"] {
        f.tick(1);
        f.put(n, &[0u8; 100]);
    }
    for n in ["c", "a", "d", "b"] {
        f.tick(1);
        f.get(&id(n)).unwrap();
    }
    let lru: Vec<String> = f
        .cache
        .least_recently_accessed()
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(lru, ["c", "a", "d", "b"]);
    let report = f.cache.prune_to(250).unwrap();
    assert_eq!(report.removed, vec![id("c"), id("a")]);
    assert_eq!(report.bytes, 200);
    assert_eq!(report.remaining, 200);
    assert_eq!(f.cache.cache_size().unwrap(), 200);
    assert!(f.cache.is_cached(&id("d")).unwrap());
    assert!(f.cache.is_cached(&id("b")).unwrap());
}

fn prune_to_zero_empties_the_cache(kind: Store) {
    let f = Fixture::new(kind);
    for n in ["a", "b", "c"] {
        f.put(n, &[1u8; 10]);
    }
    let report = f.cache.prune_to(0).unwrap();
    assert_eq!(report.files(), 3);
    assert_eq!(report.bytes, 30);
    assert_eq!(f.cache.cache_size().unwrap(), 0);
    assert!(f.cache.cached_images().unwrap().is_empty());
}

fn prune_under_limit_does_nothing(kind: Store) {
    let f = Fixture::new(kind);
    f.put("a", &[1u8; 10]);
    let report = f.cache.prune_to(10).unwrap();
    assert_eq!(report.files(), 0);
    assert_eq!(report.remaining, 10);
    assert!(f.cache.is_cached(&id("a")).unwrap());
}

fn prune_uses_configured_max_size(kind: Store) {
    let f = Fixture::with(kind, |o| o.max_size(15));
    f.put("a", &[1u8; 10]);
    f.tick(1);
    f.put("b", &[1u8; 10]);
    let report = f.cache.prune().unwrap();
    assert_eq!(report.removed, vec![id("a")]);
}

fn clean_removes_invalid_and_stalled_only(kind: Store) {
    let f = Fixture::new(kind);
    let cached = f.put("cached", b"keep");
    // An invalid file, and an incomplete file left by a writer that died
    // (no lock held): written directly, as a crashed process leaves them.
    f.cache
        .open_for_write(&id("bad"))
        .unwrap()
        .abort("x")
        .unwrap();
    fs::write(f.path().join("incomplete/dead"), b"stalled bytes").unwrap();
    // Not yet stalled: only the invalid file goes.
    let report = f.cache.clean(None).unwrap();
    assert_eq!(report.invalid.len(), 1);
    assert_eq!(report.invalid[0].id, Some(id("bad")));
    assert!(report.stalled.is_empty());
    assert!(f.path().join("incomplete/dead").exists());
    assert!(f.cache.invalid_images().unwrap().is_empty());
    // A day and a second later, it is stalled.
    f.tick(86_401);
    let report = f.cache.clean(None).unwrap();
    assert_eq!(report.stalled.len(), 1);
    assert_eq!(report.stalled[0].id, Some(id("dead")));
    assert_eq!(report.bytes(), 13);
    assert!(!f.path().join("incomplete/dead").exists());
    assert!(!f.cache.is_being_cached(&id("dead")).unwrap());
    // An explicit stall time overrides the configured one.
    fs::write(f.path().join("incomplete/dead2"), b"x").unwrap();
    f.tick(61);
    assert_eq!(
        f.cache
            .clean(Some(Duration::from_secs(60)))
            .unwrap()
            .stalled
            .len(),
        1
    );
    // Cached images are never touched by clean.
    assert_eq!(f.get(&cached).unwrap(), b"keep");
}

fn clean_spares_a_live_writer_however_old(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("slow");
    let mut w = f.cache.open_for_write(&x).unwrap();
    w.write_all(b"still coming").unwrap();
    f.tick(10 * 86_400);
    let report = f.cache.clean(None).unwrap();
    assert!(report.stalled.is_empty());
    assert_eq!(report.live_writers, vec![x.clone()]);
    // Also when the cleaner is another handle (another process's cron job).
    let report = f.reopen().clean(Some(Duration::ZERO)).unwrap();
    assert!(report.stalled.is_empty());
    w.write_all(b"!").unwrap();
    w.commit().unwrap();
    assert_eq!(f.get(&x).unwrap(), b"still coming!");
}

fn clean_with_clock_behind_file_times_keeps_files(kind: Store) {
    let f = Fixture::new(kind);
    fs::write(f.path().join("incomplete/dead"), b"x").unwrap();
    // The wall clock jumps a week back: the file looks to be from the future.
    f.clock.rewind(Duration::from_secs(7 * 86_400));
    let report = f.cache.clean(Some(Duration::ZERO)).unwrap();
    assert!(report.stalled.is_empty());
    assert!(f.path().join("incomplete/dead").exists());
}

fn cache_image_file_caches_once(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    let data = bytes(5, 1 << 20);
    assert!(f.cache.cache_image_file(&x, &data[..]).unwrap());
    assert!(!f.cache.cache_image_file(&x, &b"other"[..]).unwrap());
    let w = f.cache.open_for_write(&id("busy")).unwrap();
    assert!(!f
        .cache
        .cache_image_file(&id("busy"), &b"other"[..])
        .unwrap());
    drop(w);
    assert_eq!(f.get(&x).unwrap(), data);
}

/// A reader that yields `ok` bytes and then fails.
struct Failing {
    ok: usize,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "backend hung up",
            ));
        }
        let n = buf.len().min(self.ok);
        buf[..n].fill(b'z');
        self.ok -= n;
        Ok(n)
    }
}

fn cache_image_file_source_error_goes_to_invalid(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    f.cache.queue_image(&x).unwrap();
    let err = f
        .cache
        .cache_image_file(&x, Failing { ok: 100_000 })
        .unwrap_err();
    assert_eq!(err.io_kind(), Some(io::ErrorKind::ConnectionReset));
    assert!(err.to_string().contains("incomplete/x"), "{err}");
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(!f.cache.is_being_cached(&x).unwrap());
    assert!(f.cache.is_queued(&x).unwrap(), "stays queued for a retry");
    let invalid = f.cache.invalid_images().unwrap();
    assert_eq!(invalid[0].size, 100_000);
    assert!(invalid[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("backend hung up"));
}

fn state_moves_queued_incomplete_cached(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    let states = |c: &imgcache::ImageCache| {
        (
            c.is_queued(&x).unwrap(),
            c.is_being_cached(&x).unwrap(),
            c.is_cached(&x).unwrap(),
        )
    };
    assert_eq!(states(&f.cache), (false, false, false));
    f.cache.queue_image(&x).unwrap();
    assert_eq!(states(&f.cache), (true, false, false));
    let mut w = f.cache.open_for_write(&x).unwrap();
    assert_eq!(states(&f.cache), (true, true, false));
    w.write_all(b"x").unwrap();
    w.commit().unwrap();
    assert_eq!(states(&f.cache), (false, false, true));
}

fn state_moves_queued_incomplete_invalid(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    f.cache.queue_image(&x).unwrap();
    let w = f.cache.open_for_write(&x).unwrap();
    drop(w);
    assert!(f.cache.is_queued(&x).unwrap());
    assert!(!f.cache.is_being_cached(&x).unwrap());
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(f.path().join("invalid/x").exists());
    f.cache.clean(None).unwrap();
    assert!(!f.path().join("invalid/x").exists());
}

fn reopen_keeps_everything(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(6, 5000));
    f.get(&x).unwrap();
    f.get(&x).unwrap();
    f.cache.queue_image(&id("q1")).unwrap();
    f.cache.queue_image(&id("q2")).unwrap();
    let before = f.cache.cached_images().unwrap();
    drop(f.cache.open_for_write(&id("bad")).unwrap());
    let again = f.reopen();
    assert_eq!(again.cached_images().unwrap(), before);
    assert_eq!(again.hit_count(&x).unwrap(), 2);
    assert_eq!(again.queued_images().unwrap(), vec![id("q1"), id("q2")]);
    assert_eq!(again.invalid_images().unwrap().len(), 1);
}

fn another_handle_sees_commits_at_once(kind: Store) {
    let f = Fixture::new(kind);
    let other = f.reopen();
    let x = f.put("x", b"shared");
    // Served by the other handle at once, whether the committer's entry is
    // written yet or not (with group durability the SQLite store holds it
    // for up to a second, or until a checkpoint: the file in place is
    // served as it is meanwhile, and a miss never fills it again).
    assert!(other.is_cached(&x).unwrap());
    let mut img = other.open_for_read(&x).unwrap().unwrap();
    assert_eq!(img.read_all().unwrap(), b"shared");
    let mut img = other
        .fetch(&x, None, || -> std::io::Result<&[u8]> {
            panic!("a cached image went to the origin")
        })
        .unwrap();
    let mut got = Vec::new();
    img.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"shared");
    // Once the entry is written, the other handle lists it and counts its
    // hits (batched: seen once flushed).
    f.cache.flush().unwrap();
    assert_eq!(other.cached_images().unwrap().len(), 1);
    let before = f.cache.hit_count(&x).unwrap();
    other.open_for_read(&x).unwrap().unwrap();
    other.flush().unwrap();
    assert_eq!(f.cache.hit_count(&x).unwrap(), before + 1);
    assert!(other.delete_cached_image(&x).unwrap());
    assert!(!f.cache.is_cached(&x).unwrap());
}

fn concurrent_readers_lose_no_hits(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(7, 4096));
    const THREADS: usize = 8;
    const READS: usize = 50;
    let handles: Vec<_> = (0..THREADS).map(|_| Arc::new(f.reopen())).collect();
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for (t, h) in handles.iter().enumerate() {
            let barrier = barrier.clone();
            let x = x.clone();
            let shared = &f.cache;
            s.spawn(move || {
                barrier.wait();
                for i in 0..READS {
                    // Half the threads share one handle, half have their own.
                    let c = if t % 2 == 0 { shared } else { &**h };
                    let mut img = c.open_for_read(&x).unwrap().unwrap();
                    let mut buf = [0u8; 64];
                    img.read_exact(&mut buf).unwrap();
                    assert!(img.info().hits >= 1, "read {i}");
                }
            });
        }
    });
    // Hits may be batched per handle: the other handles write theirs when
    // closed.
    drop(handles);
    assert_eq!(f.cache.hit_count(&x).unwrap(), (THREADS * READS) as u64);
}

fn concurrent_writers_of_distinct_images(kind: Store) {
    let f = Fixture::new(kind);
    const THREADS: usize = 8;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let c = &f.cache;
            s.spawn(move || {
                for i in 0..10 {
                    let name = format!("img-{t}-{i}");
                    let mut w = c.open_for_write(&id(&name)).unwrap();
                    for chunk in bytes((t * 100 + i) as u64, 50_000).chunks(7000) {
                        w.write_all(chunk).unwrap();
                    }
                    w.commit().unwrap();
                }
            });
        }
    });
    let images = f.cache.cached_images().unwrap();
    assert_eq!(images.len(), THREADS * 10);
    for t in 0..THREADS {
        for i in 0..10 {
            let name = format!("img-{t}-{i}");
            assert_eq!(
                f.get(&id(&name)).unwrap(),
                bytes((t * 100 + i) as u64, 50_000)
            );
        }
    }
}

fn racing_writers_of_one_image_one_wins(kind: Store) {
    let f = Fixture::new(kind);
    const THREADS: usize = 8;
    // Many rounds, so that the moments that matter (a writer opening just
    // as another renames) come up.
    for round in 0..25 {
        let barrier = Barrier::new(THREADS);
        let x = id(&format!("contested-{round}"));
        let outcomes: Vec<Result<bool, String>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (barrier, x, cache) = (&barrier, &x, &f.cache);
                    s.spawn(move || {
                        barrier.wait();
                        match cache.open_for_write(x) {
                            Ok(mut w) => {
                                w.write_all(&bytes(t as u64, 10_000)).unwrap();
                                w.commit().map(|_| true).map_err(|e| e.to_string())
                            }
                            Err(Error::AlreadyBeingCached { .. } | Error::AlreadyCached { .. }) => {
                                Ok(false)
                            }
                            Err(e) => Err(e.to_string()),
                        }
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        // A writer that got a file always commits it: nobody learns at
        // commit time that the work was wasted.
        assert!(
            outcomes.iter().all(|o| o.is_ok()),
            "round {round}: {outcomes:?}"
        );
        let winners = outcomes.iter().filter(|o| matches!(o, Ok(true))).count();
        assert_eq!(winners, 1, "round {round}: {outcomes:?}");
        let got = f.get(&x).unwrap();
        assert!(
            (0..THREADS).any(|t| got == bytes(t as u64, 10_000)),
            "cached bytes are one writer's, whole"
        );
        assert!(!f.cache.is_being_cached(&x).unwrap());
    }
}

fn invalid_ids_never_reach_the_file_system(kind: Store) {
    let f = Fixture::new(kind);
    for bad in [
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        "nul\0",
        "cr\r",
        "queue",
        "invalid",
        "incomplete",
        "cache.db",
        "cache.db-wal",
        ".imgcache-x",
    ] {
        match ImageId::new(bad) {
            Err(Error::InvalidId { input, .. }) => assert_eq!(input, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(matches!(
        ImageId::new("x".repeat(256)),
        Err(Error::InvalidId {
            reason: IdError::TooLong,
            ..
        })
    ));
    assert!(!f.path().parent().unwrap().join("escape").exists());
}

fn custom_db_name_is_reserved(kind: Store) {
    let f = Fixture::with(kind, |o| o.sqlite_db("meta.sqlite"));
    let check = |r: Result<(), Error>| match r {
        Err(Error::InvalidId {
            reason: IdError::Reserved,
            ..
        }) => {}
        other => panic!("expected a reserved-name error, got {other:?}"),
    };
    // Every entry point that takes an id refuses the configured database's
    // name and its side files, as it refuses `cache.db`.
    for name in [
        "meta.sqlite",
        "meta.sqlite-wal",
        "meta.sqlite-shm",
        "meta.sqlite-journal",
    ] {
        let meta = id(name);
        check(f.cache.open_for_write(&meta).map(drop));
        check(f.cache.queue_image(&meta).map(drop));
        check(f.cache.open_for_read(&meta).map(drop));
        check(f.cache.delete_cached_image(&meta).map(drop));
        check(f.cache.delete_queued_image(&meta).map(drop));
        check(f.cache.is_cached(&meta).map(drop));
        check(f.cache.is_cacheable(&meta).map(drop));
        check(f.cache.is_being_cached(&meta).map(drop));
        check(f.cache.is_queued(&meta).map(drop));
        check(f.cache.cached_image(&meta).map(drop));
        check(f.cache.hit_count(&meta).map(drop));
        check(f.cache.image_size(&meta).map(drop));
        check(f.cache.verify(&meta).map(drop));
        check(f.cache.cache_image_file(&meta, &b"x"[..]).map(drop));
        check(f.cache.caching_reader(&meta, None, &b"x"[..]).map(drop));
        check(f.cache.fetch(&meta, None, || Ok(&b"x"[..])).map(drop));
    }
    // Whole-cache operations pass the database over.
    f.cache.delete_all_cached_images().unwrap();
    f.cache.prune_to(0).unwrap();
    f.cache.clean(Some(Duration::ZERO)).unwrap();
    if kind == Store::SQLITE {
        assert!(f.path().join("meta.sqlite").is_file());
        assert!(!f.path().join("cache.db").exists());
    }
}

fn truncated_file_is_refused_not_served(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(8, 10_000));
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.path().join("x"))
        .unwrap();
    file.set_len(4_000).unwrap();
    match f.cache.open_for_read(&x) {
        Err(Error::Corrupt { id, path, detail }) => {
            assert_eq!(id, x);
            assert!(
                detail.contains("4000") && detail.contains("10000"),
                "{detail}"
            );
            assert!(path.ends_with("x"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Moved aside with the reason: the next request is a clean miss.
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(f.cache.open_for_read(&x).unwrap().is_none());
    let invalid = f.cache.invalid_images().unwrap();
    assert_eq!(invalid[0].id, x);
    assert!(invalid[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("4000 bytes on disk"));
}

fn foreign_files_in_cache_dir_are_ignored(kind: Store) {
    let f = Fixture::new(kind);
    f.put("real", b"1");
    fs::write(f.path().join(".imgcache-tmp"), b"x").unwrap();
    fs::create_dir(f.path().join("some-dir")).unwrap();
    let ids: Vec<String> = f
        .cache
        .cached_images()
        .unwrap()
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, ["real"]);
}

fn unicode_and_long_ids_work(kind: Store) {
    let f = Fixture::new(kind);
    let long = "é".repeat(127); // 254 bytes
    for name in ["名前-イメージ", long.as_str(), "with space", ".hidden", "1"] {
        let x = f.put(name, name.as_bytes());
        assert_eq!(f.get(&x).unwrap(), name.as_bytes());
    }
    assert_eq!(f.cache.cached_images().unwrap().len(), 5);
}

/// A writer whose underlying cache file vanished mid-way: the commit fails
/// with an error naming the file, and nothing is reported cached.
fn writer_error_surfaces_and_keeps_nothing_cached(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    let mut w = f.cache.open_for_write(&x).unwrap();
    w.write_all(b"abc").unwrap();
    fs::remove_file(f.path().join("incomplete/x")).unwrap();
    let err = w.commit().unwrap_err();
    assert!(err.to_string().contains("incomplete/x"), "{err}");
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(f.cache.open_for_read(&x).unwrap().is_none());
}

trait RoundedNow {
    fn now_rounded(&self) -> SystemTime;
}

impl RoundedNow for imgcache::clock::ManualClock {
    /// The clock's time as the cache stores it: to the nearest
    /// microsecond, which every store keeps exactly.
    fn now_rounded(&self) -> SystemTime {
        use imgcache::clock::Clock;
        let nanos = self
            .now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let micros = (nanos + 500) / 1000;
        SystemTime::UNIX_EPOCH + Duration::from_micros(micros as u64)
    }
}
