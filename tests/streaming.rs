//! The caching tee's rules and single-flight fills, each against both
//! drivers.

mod common;

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use common::{bytes, id, Fixture, Mount};
use imgcache::checksum::{Algorithm, Checksum, Hasher};
use imgcache::testing::Store;
use imgcache::{CacheOptions, Error, ImageStream};

for_each_driver!(
    tee_commits_at_the_end_when_the_checksum_matches,
    tee_mismatch_is_an_error_at_the_end_and_caches_nothing,
    tee_source_error_reaches_the_caller,
    tee_dropped_early_goes_to_invalid_by_default,
    tee_dropped_early_is_finished_when_configured,
    tee_dropped_early_is_finished_for_followers,
    tee_cache_write_failure_leaves_the_stream_unharmed,
    tee_passes_through_when_cached_or_being_cached,
    fetch_sixteen_threads_one_origin_open,
    fetch_racing_rounds_never_give_up_or_orphan,
    fetch_follower_reads_while_the_filler_writes,
    fetch_follower_gets_an_error_when_the_fill_fails,
    fetch_source_open_failure_leaves_nothing,
    fetch_after_commit_is_a_hit,
    fetch_of_a_corrupt_entry_falls_through_to_the_origin,
);

const SIZE: usize = 3 * 1024 * 1024 + 77;

fn digest(a: Algorithm, data: &[u8]) -> Checksum {
    let mut h = Hasher::new(a);
    h.update(data);
    h.finish()
}

/// A backend stream: the bytes, in `chunk`-sized reads.
#[derive(Debug)]
struct Source {
    data: Arc<Vec<u8>>,
    pos: usize,
    chunk: usize,
    fail_at: Option<usize>,
}

impl Source {
    fn new(data: &Arc<Vec<u8>>) -> Self {
        Source {
            data: data.clone(),
            pos: 0,
            chunk: 64 * 1024,
            fail_at: None,
        }
    }
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.fail_at.is_some_and(|at| self.pos >= at) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "backend hung up",
            ));
        }
        let n = buf.len().min(self.chunk).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 100_000];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(out),
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn tee_commits_at_the_end_when_the_checksum_matches(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(1, SIZE));
    for (n, algorithm) in [
        Algorithm::Md5,
        Algorithm::Sha256,
        Algorithm::Sha512,
        Algorithm::Crc32,
    ]
    .into_iter()
    .enumerate()
    {
        let x = id(&format!("img-{n}"));
        let expected = digest(algorithm, &data);
        let mut tee = f
            .cache
            .caching_reader(&x, Some(expected.clone()), Source::new(&data))
            .unwrap();
        assert!(tee.is_caching());
        let got = read_all(&mut tee).unwrap();
        assert!(got == *data);
        assert_eq!(tee.stats().bytes, SIZE as u64);
        assert!(tee.stats().cached, "{algorithm}");
        assert_eq!(tee.stats().cache_error, None);
        let info = f.cache.cached_image(&x).unwrap().unwrap();
        assert_eq!(info.crc32, Some(crc32fast::hash(&data)));
        let recorded = info.checksum.unwrap();
        match algorithm {
            Algorithm::Md5 => assert_eq!(recorded, expected.hex(), "Glance's plain MD5"),
            _ => assert_eq!(recorded, expected.to_string()),
        }
        assert!(f.get(&x).unwrap() == *data);
    }
    // Without a checksum, the end of the source commits too.
    let mut tee = f
        .cache
        .caching_reader(&id("plain"), None, Source::new(&data))
        .unwrap();
    read_all(&mut tee).unwrap();
    assert!(tee.stats().cached);
}

fn tee_mismatch_is_an_error_at_the_end_and_caches_nothing(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(2, SIZE));
    for (n, algorithm) in [
        Algorithm::Md5,
        Algorithm::Sha256,
        Algorithm::Sha512,
        Algorithm::Crc32,
    ]
    .into_iter()
    .enumerate()
    {
        let x = id(&format!("bad-{n}"));
        let wrong = digest(algorithm, b"other bytes");
        let mut tee = f
            .cache
            .caching_reader(&x, Some(wrong.clone()), Source::new(&data))
            .unwrap();
        // Every byte arrives; the error comes at the end.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 50_000];
        let err = loop {
            match tee.read(&mut buf) {
                Ok(0) => panic!("{algorithm}: the stream ended without an error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(got == *data);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        match Error::from_io(&err) {
            Some(Error::ChecksumMismatch {
                id: i,
                expected,
                actual,
            }) => {
                assert_eq!((i, expected), (&x, &wrong));
                assert_eq!(actual, &digest(algorithm, &data));
            }
            other => panic!("{algorithm}: {other:?}"),
        }
        assert!(!f.cache.is_cached(&x).unwrap());
        assert!(!f.cache.is_being_cached(&x).unwrap());
        let invalid = f.cache.invalid_images().unwrap();
        let entry = invalid.iter().find(|i| i.id == x).unwrap();
        assert!(entry
            .reason
            .as_deref()
            .unwrap()
            .contains("checksum mismatch"));
        assert!(!tee.stats().cached);
    }
}

fn tee_source_error_reaches_the_caller(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(3, SIZE));
    let x = id("x");
    let mut src = Source::new(&data);
    src.fail_at = Some(1_000_000);
    let mut tee = f.cache.caching_reader(&x, None, src).unwrap();
    let err = read_all(&mut tee).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(!f.cache.is_being_cached(&x).unwrap());
    let invalid = f.cache.invalid_images().unwrap();
    assert!(invalid[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("backend hung up"));
    assert!(invalid[0].size >= 1_000_000 - 64 * 1024);
}

fn tee_dropped_early_goes_to_invalid_by_default(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(4, SIZE));
    let x = id("x");
    let mut tee = f
        .cache
        .caching_reader(&x, None, Source::new(&data))
        .unwrap();
    let mut buf = vec![0u8; 200_000];
    tee.read_exact(&mut buf).unwrap();
    drop(tee);
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(
        !f.cache.is_being_cached(&x).unwrap(),
        "never left in incomplete/"
    );
    let invalid = f.cache.invalid_images().unwrap();
    assert_eq!(
        invalid[0].reason.as_deref(),
        Some("reader dropped before the end of the stream")
    );
}

fn tee_dropped_early_is_finished_when_configured(kind: Store) {
    let f = Fixture::with(kind, |o| o.finish_abandoned_fills(true));
    let data = Arc::new(bytes(5, SIZE));
    let x = id("x");
    let opens = AtomicUsize::new(0);
    let mut stream = f
        .cache
        .fetch(&x, Some(digest(Algorithm::Sha256, &data)), || {
            opens.fetch_add(1, Ordering::SeqCst);
            Ok(Source::new(&data))
        })
        .unwrap();
    let mut buf = vec![0u8; 100_000];
    stream.read_exact(&mut buf).unwrap();
    drop(stream); // the client disconnects
                  // The next request joins the fill still under way (or finds it
                  // cached), and gets every byte without a second backend open.
    let next = f
        .cache
        .fetch(&x, None, || -> io::Result<Source> {
            panic!("opened the backend twice")
        })
        .unwrap();
    assert!(matches!(
        next,
        ImageStream::Following(_) | ImageStream::Cached(_)
    ));
    assert!(read_all(next).unwrap() == *data);
    assert_eq!(opens.load(Ordering::SeqCst), 1);
    // The background fill committed before its followers saw the end.
    assert!(f.cache.is_cached(&x).unwrap());
}

fn tee_dropped_early_is_finished_for_followers(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(6, SIZE));
    let x = id("x");
    let mut first = f.cache.fetch(&x, None, || Ok(Source::new(&data))).unwrap();
    assert!(matches!(first, ImageStream::Filling(_)));
    let follower = f
        .cache
        .fetch(&x, None, || -> io::Result<Source> {
            panic!("a second backend open")
        })
        .unwrap();
    assert!(matches!(follower, ImageStream::Following(_)));
    let mut buf = vec![0u8; 10_000];
    first.read_exact(&mut buf).unwrap();
    drop(first); // the first client goes; the follower must still get it all
    assert!(read_all(follower).unwrap() == *data);
    assert!(f.cache.is_cached(&x).unwrap());
}

fn tee_cache_write_failure_leaves_the_stream_unharmed(kind: Store) {
    let Some(mount) = Mount::new("tmpfs", "size=1m") else {
        return;
    };
    let cache = kind.open(CacheOptions::new(mount.path.join("c"))).unwrap();
    let data = Arc::new(bytes(7, SIZE)); // three times the file system
    let x = id("x");
    let mut tee = cache
        .caching_reader(&x, Some(digest(Algorithm::Md5, &data)), Source::new(&data))
        .unwrap();
    let got = read_all(&mut tee).unwrap();
    assert!(got == *data, "the caller's bytes are whole");
    let error = tee.stats().cache_error.clone().unwrap();
    assert!(error.contains("No space left"), "{error}");
    assert!(!tee.stats().cached);
    assert!(!cache.is_cached(&x).unwrap());
    assert!(!cache.is_being_cached(&x).unwrap());
    assert_eq!(cache.invalid_images().unwrap()[0].id, x);
    drop(cache);
}

fn tee_passes_through_when_cached_or_being_cached(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(8, 100_000));
    let cached = f.put("cached", &data);
    let mut tee = f
        .cache
        .caching_reader(&cached, None, Source::new(&data))
        .unwrap();
    assert!(!tee.is_caching());
    assert!(read_all(&mut tee).unwrap() == *data);
    assert!(tee.stats().passed_through);
    assert_eq!(
        f.cache.hit_count(&cached).unwrap(),
        0,
        "the cached copy was not read"
    );
    // Being cached by a plain writer (as another process would).
    let busy = id("busy");
    let _writer = f.cache.open_for_write(&busy).unwrap();
    let mut tee = f
        .cache
        .caching_reader(&busy, None, Source::new(&data))
        .unwrap();
    assert!(read_all(&mut tee).unwrap() == *data);
    assert!(tee.stats().passed_through);
    // A pass-through still checks the checksum.
    let mut tee = f
        .cache
        .caching_reader(
            &cached,
            Some(digest(Algorithm::Md5, b"no")),
            Source::new(&data),
        )
        .unwrap();
    let err = read_all(&mut tee).unwrap_err();
    assert!(matches!(
        Error::from_io(&err),
        Some(Error::ChecksumMismatch { .. })
    ));
    assert!(
        f.cache.is_cached(&cached).unwrap(),
        "the cached copy is untouched"
    );
}

fn fetch_sixteen_threads_one_origin_open(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(9, SIZE));
    let x = id("cold");
    let opens = AtomicUsize::new(0);
    let barrier = Barrier::new(16);
    let results: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let stream = f
                        .cache
                        .fetch(&x, Some(digest(Algorithm::Sha512, &data)), || {
                            opens.fetch_add(1, Ordering::SeqCst);
                            Ok(Source::new(&data))
                        })
                        .unwrap();
                    read_all(stream).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(opens.load(Ordering::SeqCst), 1, "exactly one backend open");
    for got in &results {
        assert!(*got == *data, "every caller got identical, complete bytes");
    }
    assert!(f.cache.is_cached(&x).unwrap());
}

fn fetch_follower_reads_while_the_filler_writes(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(10, SIZE));
    let x = id("x");
    let mut filler = f.cache.fetch(&x, None, || Ok(Source::new(&data))).unwrap();
    let mut head = vec![0u8; 1_000_000];
    filler.read_exact(&mut head).unwrap();
    let mut follower = f
        .cache
        .fetch(&x, None, || -> io::Result<Source> { unreachable!() })
        .unwrap();
    // The follower gets the first megabyte while the fill is still under way.
    let mut early = vec![0u8; 1_000_000];
    follower.read_exact(&mut early).unwrap();
    assert!(early == data[..1_000_000]);
    assert!(f.cache.is_being_cached(&x).unwrap());
    assert!(!f.cache.is_cached(&x).unwrap());
    let rest = read_all(&mut filler).unwrap();
    assert!(rest == data[1_000_000..]);
    let tail = read_all(follower).unwrap();
    assert!(tail == data[1_000_000..]);
}

fn fetch_follower_gets_an_error_when_the_fill_fails(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(11, SIZE));
    let x = id("x");
    let mut filler = f
        .cache
        .fetch(&x, None, || {
            let mut s = Source::new(&data);
            s.fail_at = Some(2_000_000);
            Ok(s)
        })
        .unwrap();
    let follower = f
        .cache
        .fetch(&x, None, || -> io::Result<Source> { unreachable!() })
        .unwrap();
    assert!(read_all(&mut filler).is_err());
    let err = read_all(follower).unwrap_err();
    match Error::from_io(&err) {
        Some(Error::FillFailed { id: i, reason }) => {
            assert_eq!(i, &x);
            assert!(reason.contains("backend hung up"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The next request starts a fresh fill.
    let again = f.cache.fetch(&x, None, || Ok(Source::new(&data))).unwrap();
    assert!(matches!(again, ImageStream::Filling(_)));
    assert!(read_all(again).unwrap() == *data);
    assert!(f.cache.is_cached(&x).unwrap());
}

fn fetch_source_open_failure_leaves_nothing(kind: Store) {
    let f = Fixture::new(kind);
    let x = id("x");
    let err = f
        .cache
        .fetch(&x, None, || -> io::Result<Source> {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                "404 from the backend",
            ))
        })
        .unwrap_err();
    match &err {
        Error::Source { id: i, source } => {
            assert_eq!(i, &x);
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(!f.cache.is_being_cached(&x).unwrap());
    assert!(!f.cache.is_cached(&x).unwrap());
    assert!(
        f.cache.invalid_images().unwrap().is_empty(),
        "nothing written, nothing kept"
    );
}

fn fetch_after_commit_is_a_hit(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(12, 10_000));
    let x = id("x");
    read_all(f.cache.fetch(&x, None, || Ok(Source::new(&data))).unwrap()).unwrap();
    let again = f
        .cache
        .fetch(&x, None, || -> io::Result<Source> { unreachable!() })
        .unwrap();
    assert!(matches!(again, ImageStream::Cached(_)));
    assert!(read_all(again).unwrap() == *data);
    assert_eq!(f.cache.hit_count(&x).unwrap(), 1);
}

/// Many rounds of 16 callers racing for a small cold image: a caller that
/// looks just before the commit's rename and acts just after it must not
/// drop the fresh row (once, that orphaned the image and made `fetch` give
/// up after 64 rounds).
fn fetch_racing_rounds_never_give_up_or_orphan(kind: Store) {
    let f = Fixture::new(kind);
    let data = Arc::new(bytes(13, 64 * 1024));
    for round in 0..60 {
        let x = id(&format!("r{round}"));
        let opens = AtomicUsize::new(0);
        let barrier = Barrier::new(16);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    barrier.wait();
                    let stream = f
                        .cache
                        .fetch(&x, None, || {
                            opens.fetch_add(1, Ordering::SeqCst);
                            Ok(Source::new(&data))
                        })
                        .unwrap();
                    assert!(read_all(stream).unwrap() == *data);
                });
            }
        });
        assert_eq!(opens.load(Ordering::SeqCst), 1, "round {round}");
        assert!(
            f.cache.is_cached(&x).unwrap(),
            "round {round}: not orphaned"
        );
    }
}

/// A cache fault is never the client's: a cached file truncated or extended
/// behind the cache's back is quarantined, and the same request is served
/// from the origin, byte-exact, and cached again.
fn fetch_of_a_corrupt_entry_falls_through_to_the_origin(kind: Store) {
    for damage in [4_000u64, 20_000] {
        let f = Fixture::new(kind);
        let data = Arc::new(bytes(31, 10_000));
        let x = f.put("x", &data);
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.path().join("x"))
            .unwrap()
            .set_len(damage)
            .unwrap();
        let opens = AtomicUsize::new(0);
        let stream = f
            .cache
            .fetch(&x, None, || {
                opens.fetch_add(1, Ordering::SeqCst);
                Ok(Source::new(&data))
            })
            .expect("the request is served despite the corrupt entry");
        assert!(matches!(stream, ImageStream::Filling(_)), "{stream:?}");
        assert_eq!(read_all(stream).unwrap(), *data);
        assert_eq!(opens.load(Ordering::SeqCst), 1);
        // Quarantined with the reason, then cached again from the origin.
        let invalid = f.cache.invalid_images().unwrap();
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert!(invalid[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("bytes on disk"));
        assert_eq!(f.get(&x).unwrap(), *data);
    }
}
