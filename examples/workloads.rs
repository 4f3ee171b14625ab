//! The workloads of `benches/glance/glance_side.py`, on imgcache's public
//! API, for a same-run comparison with Glance's own drivers
//! (`benches/glance/run.sh`):
//!
//! ```text
//! cargo run --release --example workloads -- DRIVER DIR SCALE [immediate]
//! ```
//!
//! prints one line per workload: `<workload> <rate per second> [note]`.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use imgcache::{CacheOptions, DriverKind, Durability, ImageCache, ImageId};

fn id(s: &str) -> ImageId {
    ImageId::new(s).expect("id")
}

fn fill(c: &ImageCache, name: &str, data: &[u8]) {
    let mut w = c.open_for_write(&id(name)).expect("open for write");
    w.write_all(data).expect("write");
    w.commit().expect("commit");
}

fn read(c: &ImageCache, name: &str, buf: &mut Vec<u8>) {
    buf.clear();
    c.open_for_read(&id(name))
        .expect("open")
        .expect("cached")
        .read_to_end(buf)
        .expect("read");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind: DriverKind = args[1].parse().expect("driver");
    let base = Path::new(&args[2]);
    let scale: usize = args[3].parse().expect("scale");
    let durability = match args.get(4).map(String::as_str) {
        Some("immediate") => Durability::Immediate,
        _ => Durability::default(),
    };
    let open = |sub: &str| {
        CacheOptions::new(base.join(sub))
            .driver(kind)
            .max_size(u64::MAX)
            .durability(durability)
            .open()
            .expect("open cache")
    };
    let small = vec![7u8; 65536];
    let tiny = vec![3u8; 4096];
    let (fills, hits, entries) = (100 * scale, 1000 * scale, 1500 * scale);
    let rate = |n: usize, t: Instant| n as f64 / t.elapsed().as_secs_f64();

    // Fills count until they are durable as the mode promises: with group
    // durability, until the checkpoint after the last one.
    let c = open("fill1");
    let t = Instant::now();
    for i in 0..fills {
        fill(&c, &format!("one-{i}"), &small);
    }
    c.checkpoint().expect("checkpoint");
    println!("fill_1 {}", rate(fills, t));

    let c = open("fill8");
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..8 {
            let (c, small) = (&c, &small);
            s.spawn(move || {
                for i in 0..fills / 8 {
                    fill(c, &format!("eight-{w}-{i}"), small);
                }
            });
        }
    });
    c.checkpoint().expect("checkpoint");
    println!("fill_8 {}", rate(fills / 8 * 8, t));

    let c = open("hits");
    fill(&c, "hot", &small);
    let before = c.hit_count(&id("hot")).expect("hits");
    let mut buf = Vec::new();
    let t = Instant::now();
    for _ in 0..hits {
        read(&c, "hot", &mut buf);
    }
    println!("hit_1 {}", rate(hits, t));
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let c = &c;
            s.spawn(move || {
                let mut buf = Vec::new();
                for _ in 0..hits / 8 {
                    read(c, "hot", &mut buf);
                }
            });
        }
    });
    let r = rate(hits / 8 * 8, t);
    c.flush().expect("flush");
    let counted = c.hit_count(&id("hot")).expect("hits") - before;
    let lost = (hits + hits / 8 * 8) as i64 - counted as i64;
    println!("hit_8 {r} lost={lost}");

    let c = open("maint");
    for i in 0..entries {
        fill(&c, &format!("img-{i:06}"), &tiny);
    }
    for i in 0..entries {
        read(&c, &format!("img-{i:06}"), &mut buf);
    }
    drop(c);
    // A fresh process would list from the disk: so does a fresh cache.
    let c = open("maint");
    let t = Instant::now();
    assert_eq!(c.cached_images().expect("list").len(), entries);
    println!("list {}", rate(entries, t));
    let t = Instant::now();
    let pruned = c
        .prune_to((entries as u64 / 2) * 4096)
        .expect("prune")
        .files();
    println!("prune {}", rate(pruned, t));
    let k = entries / 2;
    let dir = base.join("maint");
    for i in 0..k {
        std::fs::write(dir.join(format!("invalid/bad-{i}")), &tiny).expect("write");
        std::fs::write(dir.join(format!("incomplete/dead-{i}")), &tiny).expect("write");
    }
    let t = Instant::now();
    let cleaned = c.clean(Some(Duration::ZERO)).expect("clean").files();
    println!("clean {}", rate(cleaned, t));
}
