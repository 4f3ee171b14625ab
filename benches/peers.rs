//! Peer fill on loopback: N `imgcache serve` nodes on one PostgreSQL
//! server, one origin behind a thin link (a rate shared by all its
//! connections, well below the disk's). Each case asks every node for a
//! cold image at once and times until every node's client has the whole
//! body — which each node sends only after its own commit, so: until every
//! node holds the image.
//!
//! ```text
//! cargo bench --bench peers              # 4 nodes, 256 MiB, 64 MiB/s link
//! cargo bench --bench peers -- --quick   # 4 nodes, 32 MiB, for CI
//! ```
//!
//! Sizes from `IMGCACHE_PEER_BENCH_MIB`, `IMGCACHE_PEER_BENCH_NODES` and
//! `IMGCACHE_PEER_BENCH_RATE_MIB` (MiB/s). The baseline, in the same run:
//! one node filling alone. Goals: with peers, the origin sends one image's
//! bytes, and every node holds it within 1.2 × the one node's time.
//! Skips with a message where no PostgreSQL server can be had.

#[path = "../tests/fleet_kit/mod.rs"]
mod fleet_kit;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use fleet_kit::{data, database, runtime, token_file, unique, Node, Origin};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mib = env_or("IMGCACHE_PEER_BENCH_MIB", if quick { 32 } else { 256 });
    let n = env_or("IMGCACHE_PEER_BENCH_NODES", 4) as usize;
    let rate = env_or("IMGCACHE_PEER_BENCH_RATE_MIB", 64) << 20;
    let Some(db) = database() else {
        println!("peers bench skipped: no PostgreSQL server");
        return;
    };
    let image = data((mib << 20) as usize, 7);
    let ids: Vec<String> = ["alone", "without", "with"]
        .iter()
        .map(|c| unique(&format!("bench-{c}")))
        .collect();
    runtime().block_on(async {
        let origin = Origin::start(
            ids.iter()
                .map(|i| (i.clone(), image.clone()))
                .collect::<HashMap<_, _>>(),
            rate,
        )
        .await;
        let secrets = tempfile::tempdir().unwrap();
        let token = token_file(secrets.path(), "fleet", "bench-fleet-token");
        let client = reqwest::Client::new();
        // Each case: (time until all hold it, origin bytes sent for it).
        let run = |nodes: Vec<Node>, id: String| {
            let client = client.clone();
            let image = &image;
            let origin = &origin;
            async move {
                let before = origin.bytes.load(Ordering::SeqCst);
                let started = Instant::now();
                let asks: Vec<_> = nodes
                    .iter()
                    .map(|node| {
                        let (client, url) = (client.clone(), node.image(&id));
                        tokio::spawn(async move {
                            let r = client.get(&url).send().await.unwrap();
                            assert_eq!(r.status(), 200);
                            r.bytes().await.unwrap()
                        })
                    })
                    .collect();
                for a in asks {
                    assert!(a.await.unwrap()[..] == image[..], "a body differs");
                }
                let took = started.elapsed().as_secs_f64();
                let sent = origin.bytes.load(Ordering::SeqCst) - before;
                drop(nodes);
                (took, sent)
            }
        };
        let one = vec![Node::start_with(&db, &origin, None, 4).await];
        let (alone, alone_bytes) = run(one, ids[0].clone()).await;
        let mut without = Vec::new();
        for _ in 0..n {
            without.push(Node::start_with(&db, &origin, None, 4).await);
        }
        let (t_without, b_without) = run(without, ids[1].clone()).await;
        let mut with = Vec::new();
        for _ in 0..n {
            with.push(Node::start(&db, &origin, &token, 4).await);
        }
        let (t_with, b_with) = run(with, ids[2].clone()).await;
        let size = image.len() as f64;
        println!(
            "peer fill: {n} nodes, a {mib} MiB image, origin link {} MiB/s (same run)",
            rate >> 20
        );
        println!("| case | time to all nodes | × one node alone | origin bytes (images) |");
        println!("|---|---|---|---|");
        for (case, t, b) in [
            ("one node alone (baseline)", alone, alone_bytes),
            ("without peers", t_without, b_without),
            ("with peers", t_with, b_with),
        ] {
            println!(
                "| {case} | {t:.2} s | {:.2} | {:.2} |",
                t / alone,
                b as f64 / size
            );
        }
        println!(
            "goals: origin bytes with peers = 1 image ({}), time ≤ 1.2 × one node ({})",
            if b_with as f64 == size {
                "met"
            } else {
                "MISSED"
            },
            if t_with <= 1.2 * alone {
                "met"
            } else {
                "MISSED"
            },
        );
    });
}
