//! criterion benches, both drivers: fills, concurrent writers, the hit path,
//! zero-copy sends, and management at scale.
//!
//! ```text
//! cargo bench --bench cache                       # full sizes (1 GiB, 100 000 entries)
//! cargo bench --bench cache -- --quick            # small sizes, a few seconds each (CI)
//! ```
//!
//! For ratios against the disk and the kernel, see `benches/compare.rs`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use imgcache::{CacheOptions, DriverKind, ImageCache, ImageId};

const DRIVERS: [DriverKind; 2] = [DriverKind::Sqlite, DriverKind::Xattr];
const SMALL: usize = 64 * 1024;

fn quick() -> bool {
    std::env::args().any(|a| a == "--quick") || std::env::var_os("IMGCACHE_BENCH_QUICK").is_some()
}

fn large() -> u64 {
    if quick() {
        64 << 20
    } else {
        1 << 30
    }
}

fn entries() -> usize {
    if quick() {
        5_000
    } else {
        100_000
    }
}

fn open(dir: &Path, kind: DriverKind) -> ImageCache {
    CacheOptions::new(dir)
        .driver(kind)
        .max_size(u64::MAX)
        .open()
        .expect("open")
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh_id(prefix: &str) -> ImageId {
    ImageId::new(format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))).expect("id")
}

fn fill(c: &mut Criterion) {
    let data = vec![3u8; SMALL];
    let chunk = vec![0u8; 1 << 20];
    let mut g = c.benchmark_group("fill");
    for kind in DRIVERS {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = open(dir.path(), kind);
        g.throughput(Throughput::Bytes(SMALL as u64));
        g.bench_function(BenchmarkId::new("64KiB", kind), |b| {
            b.iter(|| {
                assert!(cache
                    .cache_image_file(&fresh_id("s"), &data[..])
                    .expect("fill"))
            })
        });
        g.throughput(Throughput::Bytes(large()));
        g.sample_size(10);
        g.bench_function(
            BenchmarkId::new(format!("{}MiB", large() >> 20), kind),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let x = fresh_id("l");
                        let t = Instant::now();
                        let mut w = cache.open_for_write(&x).expect("writer");
                        for _ in 0..(large() >> 20) {
                            w.write_all(&chunk).expect("write");
                        }
                        w.commit().expect("commit");
                        total += t.elapsed();
                        cache.delete_cached_image(&x).expect("delete");
                    }
                    total
                })
            },
        );
        g.sample_size(100);
    }
    g.finish();
}

fn concurrent_writers(c: &mut Criterion) {
    let data = vec![5u8; SMALL];
    let per_thread = 4;
    let mut g = c.benchmark_group("concurrent_writers");
    for kind in DRIVERS {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = open(dir.path(), kind);
        for threads in [1usize, 2, 4, 8, 16] {
            g.throughput(Throughput::Elements((threads * per_thread) as u64));
            g.bench_function(BenchmarkId::new(format!("{kind}/distinct"), threads), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        std::thread::scope(|s| {
                            for _ in 0..threads {
                                let (cache, data) = (&cache, &data);
                                s.spawn(move || {
                                    for _ in 0..per_thread {
                                        cache
                                            .cache_image_file(&fresh_id("w"), &data[..])
                                            .expect("fill");
                                    }
                                });
                            }
                        });
                    }
                    t.elapsed()
                })
            });
        }
        // 16 threads racing for one cold image: one fills, fifteen follow.
        let image = vec![9u8; 4 << 20];
        g.throughput(Throughput::Bytes(image.len() as u64 * 16));
        g.bench_function(
            BenchmarkId::new(format!("{kind}/race-same-image"), 16),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let x = fresh_id("race");
                        let barrier = Barrier::new(16);
                        let t = Instant::now();
                        std::thread::scope(|s| {
                            for _ in 0..16 {
                                let (cache, image, barrier, x) = (&cache, &image, &barrier, &x);
                                s.spawn(move || {
                                    barrier.wait();
                                    let mut stream = cache
                                        .fetch(x, None, || Ok(std::io::Cursor::new(image.clone())))
                                        .expect("fetch");
                                    let mut buf = vec![0u8; 1 << 16];
                                    while stream.read(&mut buf).expect("read") > 0 {}
                                });
                            }
                        });
                        total += t.elapsed();
                        cache.delete_cached_image(&x).expect("delete");
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

fn hit_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit_path");
    g.throughput(Throughput::Elements(1));
    for kind in DRIVERS {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(open(dir.path(), kind));
        let x = ImageId::new("hot").expect("id");
        cache
            .cache_image_file(&x, &vec![1u8; SMALL][..])
            .expect("fill");
        let mut buf = vec![0u8; SMALL];
        g.bench_function(BenchmarkId::new(kind.as_str(), "1 thread"), |b| {
            b.iter(|| {
                let mut img = cache.open_for_read(&x).expect("open").expect("cached");
                img.read_exact(&mut buf).expect("read");
            })
        });
        g.bench_function(BenchmarkId::new(kind.as_str(), "8 threads"), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..8 {
                        let (cache, x) = (&cache, &x);
                        s.spawn(move || {
                            let mut buf = vec![0u8; SMALL];
                            for _ in 0..iters.div_ceil(8) {
                                let mut img =
                                    cache.open_for_read(x).expect("open").expect("cached");
                                img.read_exact(&mut buf).expect("read");
                            }
                        });
                    }
                });
                t.elapsed()
            })
        });
    }
    g.finish();
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match r.read(&mut buf).expect("drain") {
                0 => return n,
                k => n += k as u64,
            }
        }
    })
}

fn zero_copy(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = open(dir.path(), DriverKind::Sqlite);
    let x = ImageId::new("big").expect("id");
    let mut w = cache.open_for_write(&x).expect("writer");
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..(large() >> 20) {
        w.write_all(&chunk).expect("write");
    }
    w.commit().expect("commit");
    let path = dir.path().join("big");
    let mut g = c.benchmark_group("zero_copy");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(large()));
    for target in ["socket", "pipe"] {
        for how in ["send_to", "read+write"] {
            g.bench_function(BenchmarkId::new(how, target), |b| {
                b.iter(|| {
                    let (tx, rx): (Box<dyn std::os::fd::AsFd>, Box<dyn Read + Send>) =
                        if target == "pipe" {
                            let (r, w) = nix::unistd::pipe().expect("pipe");
                            (Box::new(File::from(w)), Box::new(File::from(r)))
                        } else {
                            let (a, b) = UnixStream::pair().expect("pair");
                            (Box::new(a), Box::new(b))
                        };
                    let reader = drain(rx);
                    if how == "send_to" {
                        let img = cache.open_for_read(&x).expect("open").expect("cached");
                        img.send_to(tx.as_fd(), None).expect("send");
                    } else {
                        let mut f = File::open(&path).expect("open");
                        let mut out = File::from(tx.as_fd().try_clone_to_owned().expect("dup"));
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = f.read(&mut buf).expect("read");
                            if n == 0 {
                                break;
                            }
                            out.write_all(&buf[..n]).expect("write");
                        }
                    }
                    drop(tx);
                    assert_eq!(reader.join().expect("drain"), large());
                })
            });
        }
    }
    g.finish();
}

/// A cache of `n` adopted 10-byte images.
fn populated(kind: DriverKind, n: usize) -> (tempfile::TempDir, ImageCache) {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path(), kind));
    for i in 0..n {
        std::fs::write(dir.path().join(format!("img-{i:06}")), b"0123456789").expect("write");
    }
    let cache = open(dir.path(), kind);
    (dir, cache)
}

fn management(c: &mut Criterion) {
    let n = entries();
    let mut g = c.benchmark_group("management");
    g.sample_size(10);
    for kind in DRIVERS {
        let (dir, cache) = populated(kind, n);
        g.bench_function(BenchmarkId::new(format!("{kind}/cached_images"), n), |b| {
            b.iter(|| assert_eq!(cache.cached_images().expect("list").len(), n))
        });
        g.bench_function(BenchmarkId::new(format!("{kind}/reopen"), n), |b| {
            b.iter(|| assert!(open(dir.path(), kind).recovery().is_clean()))
        });
        drop(cache);
        drop(dir);
        g.bench_function(BenchmarkId::new(format!("{kind}/prune-to-half"), n), |b| {
            b.iter_batched(
                || populated(kind, n),
                |(dir, cache)| {
                    assert_eq!(cache.prune_to(n as u64 * 5).expect("prune").files(), n / 2);
                    (dir, cache)
                },
                BatchSize::PerIteration,
            )
        });
        let k = n / 10;
        g.bench_function(
            BenchmarkId::new(format!("{kind}/clean-invalid+stalled"), 2 * k),
            |b| {
                b.iter_batched(
                    || {
                        let dir = tempfile::tempdir().expect("tempdir");
                        let cache = open(dir.path(), kind);
                        for i in 0..k {
                            std::fs::write(dir.path().join(format!("invalid/bad-{i}")), b"x")
                                .expect("write");
                            std::fs::write(dir.path().join(format!("incomplete/dead-{i}")), b"x")
                                .expect("write");
                        }
                        (dir, cache)
                    },
                    |(dir, cache)| {
                        assert_eq!(
                            cache.clean(Some(Duration::ZERO)).expect("clean").files(),
                            2 * k
                        );
                        (dir, cache)
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    fill,
    concurrent_writers,
    hit_path,
    zero_copy,
    management
);
criterion_main!(benches);
