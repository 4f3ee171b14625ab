//! The adapter against the checks pingora-cache's own in-memory store is
//! tested with (hit, miss, ranges, a reader of a write in progress, purge,
//! metadata update), on a real imgcache directory, plus what only a disk
//! store has to show: everything survives a reopen, and a process killed
//! mid-write leaves no torn object and no metadata without its body.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use imgcache::ImageCache;
use imgcache_pingora::DiskCache;
use pingora_cache::storage::HandleHit;
use pingora_cache::trace::Span;
use pingora_cache::{CacheKey, CacheMeta, PurgeOutcome, PurgeTarget, PurgeType, Storage};
use pingora_http::ResponseHeader;

fn meta(fresh: u64) -> CacheMeta {
    let mut h = ResponseHeader::build(200, None).unwrap();
    h.append_header("content-type", "application/octet-stream")
        .unwrap();
    let now = SystemTime::now();
    CacheMeta::new(now + Duration::from_secs(fresh), now, 0, 0, h)
}

/// A store on `dir`, as pingora wants it: `'static`.
fn store(dir: &std::path::Path) -> &'static DiskCache {
    let cache = ImageCache::builder(dir).open().unwrap();
    Box::leak(Box::new(DiskCache::new(Arc::new(cache)).unwrap()))
}

/// Every byte a hit handler gives, to the end.
async fn read_all(hit: &mut (dyn HandleHit + Send + Sync)) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = hit.read_body().await.unwrap() {
        out.extend_from_slice(&b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/a", "1");
    assert!(s.lookup(&key, span).await.unwrap().is_none());
    let m = meta(60);
    let mut miss = s.get_miss_handler(&key, &m, span).await.unwrap();
    miss.write_body(b"test1"[..].into(), false).await.unwrap();
    miss.write_body(b"test2"[..].into(), false).await.unwrap();
    miss.finish().await.unwrap();
    let (got, mut hit) = s.lookup(&key, span).await.unwrap().unwrap();
    assert_eq!(got.fresh_until(), m.fresh_until());
    assert_eq!(got.headers()["content-type"], "application/octet-stream");
    assert_eq!(hit.read_body().await.unwrap().unwrap(), "test1test2");
    assert!(hit.read_body().await.unwrap().is_none());
    // A person recognises it in the cache's listing.
    let listed = s.cache().cached_images().unwrap();
    assert!(listed[0].id.as_str().starts_with("example.org_a~"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_range() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/range", "1");
    let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    miss.write_body(b"test1test2"[..].into(), true)
        .await
        .unwrap();
    miss.finish().await.unwrap();
    let (_, mut hit) = s.lookup(&key, span).await.unwrap().unwrap();
    assert!(hit.can_seek());
    assert!(hit.seek(10_000, None).is_err());
    hit.seek(5, None).unwrap();
    assert_eq!(hit.read_body().await.unwrap().unwrap(), "test2");
    assert!(hit.read_body().await.unwrap().is_none());
    hit.seek(4, Some(5)).unwrap();
    assert_eq!(hit.read_body().await.unwrap().unwrap(), "1");
    assert!(hit.read_body().await.unwrap().is_none());
    assert_eq!(hit.get_eviction_weight(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_while_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/stream", "1");
    let m = meta(60);
    let mut miss = s.get_miss_handler(&key, &m, span).await.unwrap();
    // The writer's own reader, and another, before any body is written:
    // the metadata at once, no body yet.
    let (m1, mut first) = s
        .lookup_streaming_write(&key, miss.streaming_write_tag(), span)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m1.fresh_until(), m.fresh_until());
    assert!(!first.should_count_access());
    assert!(
        first.read_body().now_or_never().is_none(),
        "nothing to read yet"
    );
    miss.write_body(b"test1"[..].into(), false).await.unwrap();
    miss.write_body(b"test2"[..].into(), false).await.unwrap();
    // Bytes as they land; the end only with the commit, so a failed
    // write never ends a body cleanly.
    let mut got = first.read_body().await.unwrap().unwrap().to_vec();
    while got.len() < 10 {
        got.extend_from_slice(&first.read_body().await.unwrap().unwrap());
    }
    assert_eq!(got, b"test1test2");
    assert!(
        first.read_body().now_or_never().is_none(),
        "no end before the commit"
    );
    let (_, mut second) = s.lookup(&key, span).await.unwrap().unwrap();
    let early = second.read_body().await.unwrap().unwrap();
    assert!(b"test1test2".starts_with(&early));
    miss.finish().await.unwrap();
    assert!(read_all(&mut *first).await.is_empty());
    let mut all = early.to_vec();
    all.extend_from_slice(&read_all(&mut *second).await);
    assert_eq!(all, b"test1test2");
    // And once committed, a plain hit.
    let (_, mut third) = s.lookup(&key, span).await.unwrap().unwrap();
    assert!(third.can_seek());
    assert_eq!(read_all(&mut *third).await, b"test1test2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_replaces_the_stale_object() {
    // What pingora does when an expired object's upstream answers 200: a
    // miss handler for a key that is cached. The new response replaces it;
    // its writer's reader gets the new bytes, never the old.
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/refresh", "1");
    let mut miss = s.get_miss_handler(&key, &meta(0), span).await.unwrap();
    miss.write_body(b"old body"[..].into(), true).await.unwrap();
    miss.finish().await.unwrap();
    let fresh = meta(600);
    let mut miss = s.get_miss_handler(&key, &fresh, span).await.unwrap();
    let (m, mut own) = s
        .lookup_streaming_write(&key, miss.streaming_write_tag(), span)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.fresh_until(), fresh.fresh_until());
    miss.write_body(b"the new body"[..].into(), true)
        .await
        .unwrap();
    miss.finish().await.unwrap();
    assert_eq!(read_all(&mut *own).await, b"the new body");
    let (m, mut hit) = s.lookup(&key, span).await.unwrap().unwrap();
    assert_eq!(m.fresh_until(), fresh.fresh_until());
    assert_eq!(read_all(&mut *hit).await, b"the new body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_and_reads_no_other_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/two-writers", "1");
    let mut first = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    // pingora passes the second one's response on uncached.
    assert!(s.get_miss_handler(&key, &meta(60), span).await.is_err());
    // A tag that is not the write's finds nothing.
    assert!(s
        .lookup_streaming_write(&key, Some(&[9u8; 8][..]), span)
        .await
        .is_err());
    first.write_body(b"one"[..].into(), true).await.unwrap();
    first.finish().await.unwrap();
    let (_, mut hit) = s.lookup(&key, span).await.unwrap().unwrap();
    assert_eq!(read_all(&mut *hit).await, b"one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_early_fails_its_readers_at_once() {
    // The fill stops (here: the cache is told to stop its fills, as at a
    // shutdown) while its miss handler lives on: its readers, its own
    // writer's included, get an error, never a wait without end.
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/fails", "1");
    let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    let (_, mut own) = s
        .lookup_streaming_write(&key, miss.streaming_write_tag(), span)
        .await
        .unwrap()
        .unwrap();
    s.cache().stop_fills();
    let _ = miss.write_body(b"more"[..].into(), false).await;
    let limit = Duration::from_secs(30);
    let mut failed = false;
    while let Ok(read) = tokio::time::timeout(limit, own.read_body()).await {
        match read {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a failed write ended cleanly"),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the reader waited for a write that had failed");
    let (_, mut later) = tokio::time::timeout(limit, s.lookup(&key, span))
        .await
        .expect("a lookup returns")
        .unwrap()
        .unwrap();
    assert!(tokio::time::timeout(limit, later.read_body())
        .await
        .expect("a read returns")
        .is_err());
    assert!(miss.finish().await.is_err());
    assert!(s.lookup(&key, span).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_write_leaves_the_object_purgeable() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/purged-while-written", "1");
    let compact = key.to_compact();
    let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    assert_eq!(
        s.purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, span)
            .await
            .unwrap(),
        PurgeOutcome::NotFound,
        "nothing committed yet"
    );
    miss.write_body(b"body"[..].into(), true).await.unwrap();
    miss.finish().await.unwrap();
    assert_eq!(
        s.purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, span)
            .await
            .unwrap(),
        PurgeOutcome::Purged(None)
    );
    assert!(s.lookup(&key, span).await.unwrap().is_none());
    // An object another process wrote is purged too.
    {
        let other = store(dir.path());
        let mut miss = other.get_miss_handler(&key, &meta(60), span).await.unwrap();
        miss.write_body(b"theirs"[..].into(), true).await.unwrap();
        miss.finish().await.unwrap();
    }
    assert_eq!(
        s.purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, span)
            .await
            .unwrap(),
        PurgeOutcome::Purged(None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_write_caches_nothing_and_fails_its_readers() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/abandoned", "1");
    let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    let (_, mut reader) = s.lookup(&key, span).await.unwrap().unwrap();
    miss.write_body(b"half of it"[..].into(), false)
        .await
        .unwrap();
    drop(miss);
    let mut failed = false;
    loop {
        match reader.read_body().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "a reader of an abandoned write must see an error, not an end"
    );
    assert!(s.lookup(&key, span).await.unwrap().is_none());
    assert!(s.cache().cached_images().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_partial_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/purge", "1");
    let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    miss.write_body(b"body"[..].into(), true).await.unwrap();
    miss.finish().await.unwrap();
    assert!(s.lookup(&key, span).await.unwrap().is_some());
    let compact = key.to_compact();
    // An exact target with an entry id is not this store's.
    let identified = pingora_cache::CacheEntryKey::identified(
        compact.clone(),
        pingora_cache::CacheEntryId::new(1),
    );
    assert_eq!(
        s.purge(PurgeTarget::Exact(&identified), PurgeType::Eviction, span)
            .await
            .unwrap(),
        PurgeOutcome::NotFound
    );
    assert!(s.lookup(&key, span).await.unwrap().is_some());
    assert_eq!(
        s.purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, span)
            .await
            .unwrap(),
        PurgeOutcome::Purged(None)
    );
    assert!(s.lookup(&key, span).await.unwrap().is_none());
    assert_eq!(
        s.purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, span)
            .await
            .unwrap(),
        PurgeOutcome::NotFound
    );
    // An eviction manager's purge: exact, key only.
    let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
    miss.write_body(b"again"[..].into(), true).await.unwrap();
    miss.finish().await.unwrap();
    let key_only = pingora_cache::CacheEntryKey::key_only(compact.clone());
    assert_eq!(
        s.purge(PurgeTarget::Exact(&key_only), PurgeType::Eviction, span)
            .await
            .unwrap(),
        PurgeOutcome::Purged(None)
    );
    assert!(s.lookup(&key, span).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_meta_survives_a_reopen_and_a_new_body_ignores_it() {
    let dir = tempfile::tempdir().unwrap();
    let span = &Span::inactive().handle();
    let key = CacheKey::new("example.org/meta", "1");
    let fresher = meta(3600);
    {
        let s = store(dir.path());
        assert!(
            !s.update_meta(&key, &meta(1), span).await.unwrap(),
            "nothing to update"
        );
        let mut miss = s.get_miss_handler(&key, &meta(1), span).await.unwrap();
        miss.write_body(b"body"[..].into(), true).await.unwrap();
        miss.finish().await.unwrap();
        assert!(s.update_meta(&key, &fresher, span).await.unwrap());
        let (m, _) = s.lookup(&key, span).await.unwrap().unwrap();
        assert_eq!(m.fresh_until(), fresher.fresh_until());
    }
    // Another process: the object, its update and its purge by hash.
    let s = store(dir.path());
    let (m, mut hit) = s.lookup(&key, span).await.unwrap().unwrap();
    assert_eq!(m.fresh_until(), fresher.fresh_until());
    assert_eq!(read_all(&mut *hit).await, b"body");
    // A new body (after a purge) is not taken over by the old update.
    assert_eq!(
        s.purge(
            PurgeTarget::Active(&key.to_compact()),
            PurgeType::Invalidation,
            span
        )
        .await
        .unwrap(),
        PurgeOutcome::Purged(None)
    );
    let newer = meta(7);
    let mut miss = s.get_miss_handler(&key, &newer, span).await.unwrap();
    miss.write_body(b"new body"[..].into(), true).await.unwrap();
    miss.finish().await.unwrap();
    let (m, mut hit) = s.lookup(&key, span).await.unwrap().unwrap();
    assert_eq!(m.fresh_until(), newer.fresh_until());
    assert_eq!(read_all(&mut *hit).await, b"new body");
}

/// The child's part of the crash test: writes `IMGCACHE_PG_KEYS` objects
/// whole, then one more without end, saying where it is; killed by the
/// parent.
#[test]
fn child() {
    let Ok(dir) = std::env::var("IMGCACHE_PG_DIR") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let s = store(std::path::Path::new(&dir));
        let span = &Span::inactive().handle();
        let body = vec![7u8; 256 * 1024];
        for n in 0..3 {
            let key = CacheKey::new(format!("example.org/whole/{n}"), "1");
            let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
            miss.write_body(body.clone().into(), true).await.unwrap();
            miss.finish().await.unwrap();
        }
        let key = CacheKey::new("example.org/torn", "1");
        let mut miss = s.get_miss_handler(&key, &meta(60), span).await.unwrap();
        miss.write_body(body.clone().into(), false).await.unwrap();
        println!("written");
        // Until killed.
        std::future::pending::<()>().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_write_leaves_no_torn_object() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env("IMGCACHE_PG_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "written" {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child exited early"
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let s = store(dir.path());
    let span = &Span::inactive().handle();
    for n in 0..3 {
        let key = CacheKey::new(format!("example.org/whole/{n}"), "1");
        let (m, mut hit) = s.lookup(&key, span).await.unwrap().expect("a whole object");
        assert_eq!(m.headers()["content-type"], "application/octet-stream");
        assert_eq!(read_all(&mut *hit).await, vec![7u8; 256 * 1024]);
    }
    let torn = CacheKey::new("example.org/torn", "1");
    assert!(s.lookup(&torn, span).await.unwrap().is_none());
    // Every object listed is whole: three, each with its metadata.
    assert_eq!(s.cache().cached_images().unwrap().len(), 3);
}
