//! The `centralized_db` store against the SQLite store, in the same run on
//! the same disk, as ratios (this machine is shared and noisy), on a
//! throwaway PostgreSQL server on loopback (`imgcache::testing::postgres`).
//!
//! ```text
//! cargo bench --bench fleet              # full sizes
//! cargo bench --bench fleet -- --quick   # small sizes, for CI
//! ```
//!
//! - hit path (open + read 64 KiB), 1 thread: PostgreSQL ≥ 0.8 × SQLite;
//! - fills of 64 KiB images by 8 concurrent writers: ≥ 0.8 × SQLite, and the
//!   round trips to the database per commit (one);
//! - `cached_images_all_nodes` of 10 000 images × 3 nodes: under 0.2 s.
//!
//! Every figure is the median of five runs. Skips with a message where no
//! PostgreSQL server can be had.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use imgcache::drivers::CentralizedDbDriver;
use imgcache::testing::{postgres, Store};
use imgcache::{CacheOptions, CachedImageInfo, ImageCache, ImageId};

const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn id(s: &str) -> ImageId {
    ImageId::new(s).expect("id")
}

fn open(store: Store, dir: &Path) -> ImageCache {
    store
        .open(CacheOptions::new(dir).max_size(u64::MAX))
        .expect("open")
}

/// Hits per second, one thread, open + read 64 KiB of a hot image.
fn hits(store: Store, dir: &Path, n: usize) -> f64 {
    let cache = open(store, dir);
    let x = id("hot");
    cache
        .cache_image_file(&x, &vec![7u8; 64 * 1024][..])
        .expect("fill");
    let mut buf = vec![0u8; 64 * 1024];
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..n {
            let mut img = cache.open_for_read(&x).expect("open").expect("hit");
            img.read_exact(&mut buf).expect("read");
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    median(rates)
}

/// Fills per second, 8 writers of `n` 64 KiB images each, into `cache`.
fn fills(cache: ImageCache, n: usize, round: usize) -> f64 {
    let cache = Arc::new(cache);
    let data = vec![3u8; 64 * 1024];
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..8 {
            let (cache, data) = (&cache, &data);
            s.spawn(move || {
                for i in 0..n {
                    let x = id(&format!("fill-{round}-{w}-{i}"));
                    assert!(cache.cache_image_file(&x, &data[..]).expect("fill"));
                }
            });
        }
    });
    (8 * n) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("IMGCACHE_BENCH_QUICK").is_some();
    let (n_hits, n_fills, entries) = if quick {
        (2_000, 10, 10_000)
    } else {
        (20_000, 50, 10_000)
    };
    let Some(pg) = Store::centralized_db() else {
        println!("fleet bench skipped: no PostgreSQL server here");
        return;
    };
    let url = postgres::cluster().expect("cluster").url().to_owned();
    let pg_driver = |dir: &Path| {
        let node = postgres::node_for(dir);
        Arc::new(
            CentralizedDbDriver::open_with(
                &url,
                &node,
                imgcache::drivers::centralized_db::Tables::Create,
            )
            .expect("open the store"),
        )
    };
    let root = tempfile::tempdir().expect("tempdir");
    let mut rows: Vec<[String; 5]> = Vec::new();

    let lite = hits(Store::SQLITE, &root.path().join("hits-sqlite"), n_hits);
    let cent = hits(pg, &root.path().join("hits-pg"), n_hits);
    rows.push([
        "hit path (open + read 64 KiB), 1 thread".into(),
        format!("centralized_db {cent:.0}/s"),
        format!("sqlite {lite:.0}/s"),
        format!("{:.2}", cent / lite),
        verdict(cent / lite >= 0.8, "≥ 0.80"),
    ]);

    let mut lite = Vec::new();
    let mut cent = Vec::new();
    let mut per_commit = Vec::new();
    for round in 0..ROUNDS {
        let dir = root.path().join(format!("fills-sqlite-{round}"));
        lite.push(fills(open(Store::SQLITE, &dir), n_fills, round));
        let dir = root.path().join(format!("fills-pg-{round}"));
        let driver = pg_driver(&dir);
        let cache = ImageCache::with_driver(driver.clone(), CacheOptions::new(&dir)).expect("open");
        // Warm: one connection per writer, its statements prepared.
        fills(cache, 1, 1000 + round);
        let cache = ImageCache::with_driver(driver.clone(), CacheOptions::new(&dir)).expect("open");
        let before = driver.round_trips();
        cent.push(fills(cache, n_fills, round));
        per_commit.push((driver.round_trips() - before) as f64 / (8 * n_fills) as f64);
    }
    let (lite, cent) = (median(lite), median(cent));
    rows.push([
        format!("fills of 64 KiB, 8 writers × {n_fills}"),
        format!("centralized_db {cent:.0}/s"),
        format!("sqlite {lite:.0}/s"),
        format!("{:.2}", cent / lite),
        verdict(cent / lite >= 0.8, "≥ 0.80"),
    ]);
    let trips = median(per_commit);
    rows.push([
        "round trips to the database per commit".into(),
        format!("{trips:.2}"),
        "-".into(),
        "-".into(),
        // One per commit; a connection the pool opens during the run
        // prepares its statement once (one more).
        verdict(trips < 1.05, "1 (+1 per new connection)"),
    ]);

    // 10 000 images on each of 3 nodes, then the cross-node listing.
    let nodes: Vec<ImageCache> = (0..3)
        .map(|n| open(pg, &root.path().join(format!("node-{n}"))))
        .collect();
    let at = SystemTime::now();
    for (n, cache) in nodes.iter().enumerate() {
        let rows: Vec<CachedImageInfo> = (0..entries)
            .map(|i| CachedImageInfo::new(id(&format!("img-{n}-{i:05}")), 4096, at))
            .collect();
        cache
            .driver()
            .extensions()
            .fleet()
            .expect("a store of many nodes")
            .import(&rows)
            .expect("import");
    }
    let mut times = Vec::new();
    let mut listed = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        listed = nodes[0]
            .cached_images_all_nodes()
            .expect("list")
            .expect("shared store")
            .len();
        times.push(t.elapsed().as_secs_f64());
    }
    let t = median(times);
    // The other sections' caches are nodes of the same database too.
    assert!(listed >= 3 * entries, "{listed}");
    rows.push([
        format!("cached_images_all_nodes, {entries} images × 3 nodes ({listed} rows)"),
        format!("{t:.3} s"),
        "-".into(),
        "-".into(),
        verdict(t < 0.2, "< 0.2 s"),
    ]);

    println!(
        "\nimgcache fleet ({} sizes; PostgreSQL on loopback, {}):\n",
        if quick { "quick" } else { "full" },
        std::env::consts::ARCH
    );
    println!("| bench | figure | yardstick (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
    }
}

fn verdict(met: bool, target: &str) -> String {
    format!("{target}: {}", if met { "met" } else { "NOT met" })
}
