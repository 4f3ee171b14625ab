//! The fleet's database goes away: the PostgreSQL server the test started
//! is killed (an immediate shutdown) and started again while readers and
//! writers run. A binary of its own, so that no other test shares the
//! server it restarts. Skipped with a message where no server can be had,
//! unless `IMGCACHE_REQUIRE_POSTGRES` is set.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{bytes, id};
use imgcache::testing::{postgres::cluster, Store};
use imgcache::{CacheOptions, Error, StoreErrorKind};

/// The database killed (immediate shutdown) and restarted while readers and
/// writers run: no read of a cached image fails, no hit is lost (they wait
/// in memory), fills during the outage fail with a typed error and leave no
/// file behind, and the cache reopens clean.
/// The tests of this binary stop the one server they share: one at a time.
static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn database_restart_under_load_fails_no_hit_and_orphans_nothing() {
    let Some(store) = Store::centralized_db() else {
        return;
    };
    let _one = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let server = cluster().unwrap();
    if !server.controlled() {
        eprintln!(
            "skipped: the server given by IMGCACHE_TEST_DATABASE_URL cannot be restarted here"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(store.open(CacheOptions::new(dir.path())).unwrap());
    let hot: Vec<_> = (0..8)
        .map(|i| {
            let x = id(&format!("hot-{i}"));
            assert!(cache.cache_image_file(&x, &bytes(i, 8192)[..]).unwrap());
            // One read now: each reader process knows its file from here on.
            cache.open_for_read(&x).unwrap().unwrap();
            x
        })
        .collect();
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let fills_failed = AtomicU64::new(0);
    let refused = std::sync::Mutex::new(Vec::new());
    let fills_ok = AtomicU64::new(0);
    let started = Barrier::new(5);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (cache, hot, stop, reads, started) = (&cache, &hot, &stop, &reads, &started);
            s.spawn(move || {
                started.wait();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let x = &hot[(n + t) % hot.len()];
                    let mut img = cache
                        .open_for_read(x)
                        .unwrap_or_else(|e| panic!("a hit failed during the outage: {e}"))
                        .expect("cached");
                    let mut buf = Vec::new();
                    img.read_to_end(&mut buf).unwrap();
                    assert_eq!(buf.len(), 8192);
                    reads.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            });
        }
        {
            let (cache, stop, fills_failed, fills_ok, started, refused) =
                (&cache, &stop, &fills_failed, &fills_ok, &started, &refused);
            s.spawn(move || {
                started.wait();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = id(&format!("fill-{k}"));
                    match cache.cache_image_file(&x, &bytes(k, 4096)[..]) {
                        Ok(true) => {
                            fills_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => panic!("fill-{k} was cached already"),
                        Err(Error::Store(e)) => {
                            assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}");
                            fills_failed.fetch_add(1, Ordering::Relaxed);
                            refused.lock().unwrap().push(x.clone());
                        }
                        Err(e) => panic!("unexpected error during the outage: {e}"),
                    }
                    k += 1;
                }
            });
        }
        // Whatever happens below (a panic included), the workers stop.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        // Waits for `done`, failing after a minute rather than hanging.
        let until = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done() {
                assert!(Instant::now() < deadline, "no {what} within a minute");
                std::thread::yield_now();
            }
        };
        started.wait();
        let before = reads.load(Ordering::Relaxed);
        server.crash();
        // A miss while the server is down is served from the origin.
        let mut cold = cache
            .fetch(&id("cold-during-outage"), None, || {
                Ok(std::io::Cursor::new(b"from the origin".to_vec()))
            })
            .expect("a miss is served from the origin while the database is down");
        let mut got = Vec::new();
        cold.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"from the origin");
        drop(cold);
        // Reads go on while the server is down.
        let down = reads.load(Ordering::Relaxed);
        until("reads while down", &|| {
            reads.load(Ordering::Relaxed) >= down + 2000
        });
        server.start();
        let up = reads.load(Ordering::Relaxed);
        let ok = fills_ok.load(Ordering::Relaxed);
        until("reads after the restart", &|| {
            reads.load(Ordering::Relaxed) >= up + 500
        });
        // Fills are recorded again once the server is back.
        until("a fill after the restart", &|| {
            fills_ok.load(Ordering::Relaxed) > ok
        });
        stop.store(true, Ordering::Relaxed);
        eprintln!(
            "reads: {before} before the crash, {} while down, {} in all; fills: {} ok, {} refused (database down)",
            up - down,
            reads.load(Ordering::Relaxed),
            fills_ok.load(Ordering::Relaxed),
            fills_failed.load(Ordering::Relaxed)
        );
    });
    // Every hit counted: flushed once the server is back.
    cache.flush().unwrap();
    let hits: u64 = hot.iter().map(|x| cache.hit_count(x).unwrap()).sum();
    assert_eq!(hits, reads.load(Ordering::Relaxed) + hot.len() as u64);
    // Nothing orphaned: every file has its row, every row its file.
    drop(cache);
    let again = store.open(CacheOptions::new(dir.path())).unwrap();
    // A fill whose insert was in flight when the server died may have been
    // recorded after all, though the client saw the connection go: its
    // file was withdrawn, and its row is dropped now. Nothing else.
    let r = again.recovery();
    let refused = refused.into_inner().unwrap();
    assert!(
        r.dropped.iter().all(|x| refused.contains(x)),
        "{r:?}, refused {refused:?}"
    );
    assert!(
        r.adopted.is_empty() && r.quarantined.is_empty() && r.torn.is_empty(),
        "{r:?}"
    );
    let files = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .count();
    assert_eq!(files, again.cached_images().unwrap().len());
}

/// `imgcache serve`'s data path with the database stopped: a hit is served,
/// and so is a miss (admission sizes the files instead of asking the
/// store, and a fill whose row cannot be written still gives its clients
/// every byte, verified), uncached. A prefetcher is told it was not
/// cached, so the image stays queued. Once the server is back, misses are
/// cached again.
#[test]
fn a_store_outage_fails_no_request_the_origin_answers() {
    use imgcache::origin::DirOrigin;
    use imgcache::serve::{ImageService, ServeOptions, Server};
    use imgcache::Fetched;
    let Some(store) = Store::centralized_db() else {
        return;
    };
    let server = cluster().unwrap();
    if !server.controlled() {
        eprintln!("skipped: the server given by IMGCACHE_TEST_DATABASE_URL cannot be stopped here");
        return;
    }
    let _one = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let origin_dir = tempfile::tempdir().unwrap();
    let images: Vec<(String, Vec<u8>)> = ["hot", "cold-1", "cold-2", "cold-3"]
        .iter()
        .enumerate()
        .map(|(i, name)| (name.to_string(), bytes(40 + i as u64, 300_000 + i * 1000)))
        .collect();
    for (name, data) in &images {
        std::fs::write(origin_dir.path().join(name), data).unwrap();
    }
    let body = |name: &str| images.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let cache = Arc::new(store.open(CacheOptions::new(dir.path())).unwrap());
    let origin = Arc::new(DirOrigin::new(origin_dir.path()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = rt.block_on(async {
        let service = ImageService::new(
            cache.clone(),
            origin.clone(),
            ServeOptions::default().public(true),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Server::new(listener, service).run());
        format!("http://{addr}/v2/images")
    });
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |name: &str| {
        let (client, url) = (client.clone(), format!("{base}/{name}/file"));
        rt.block_on(async move {
            let r = client.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap_or_default().to_vec())
        })
    };
    assert_eq!(get("hot"), (200, body("hot")));
    assert!(cache.cached_image(&id("hot")).unwrap().is_some());

    server.stop();
    // A hit, and a miss: both served, byte-exact.
    assert_eq!(get("hot"), (200, body("hot")));
    let (status, got) = get("cold-1");
    assert_eq!(
        status,
        200,
        "a miss during the outage: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(got == body("cold-1"), "the miss's bytes differ");
    // Admission goes by the files while the store is down.
    assert!(cache
        .make_room(&id("cold-9"), Some(1000))
        .unwrap()
        .removed
        .is_empty());
    // A caller that wants it cached (a prefetcher) hears it was not.
    let open_origin = origin.clone();
    let fetched = cache
        .fetch_detached(&id("cold-2"), move || {
            use imgcache::origin::Origin;
            open_origin.open(&id("cold-2"))
        })
        .unwrap();
    match fetched {
        Fetched::Following(follower) => {
            let err = follower.wait_committed().unwrap_err();
            assert!(err.to_string().contains("not cached"), "{err}");
        }
        other => panic!("cold-2 not filled while the database is down: {other:?}"),
    }
    // Nothing was left in place that no row describes.
    for name in ["cold-1", "cold-2"] {
        assert!(!dir.path().join(name).exists(), "{name} left in place");
    }

    server.start();
    assert_eq!(get("cold-3"), (200, body("cold-3")));
    let deadline = Instant::now() + Duration::from_secs(60);
    while cache.cached_image(&id("cold-3")).ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "cold-3 not cached after the restart"
        );
        std::thread::yield_now();
    }
    drop(rt);
}
