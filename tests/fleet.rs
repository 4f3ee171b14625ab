//! The fleet: several nodes (directories, processes) on one PostgreSQL
//! database through the `centralized_db` store, against a real server the
//! tests start themselves (`imgcache::testing::postgres`). Skipped with a
//! message where no server can be had, unless `IMGCACHE_REQUIRE_POSTGRES`
//! is set (as `.ci/run` sets it).

mod common;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{bytes, child_cache, id, wait_for_line};
use imgcache::testing::{postgres::cluster, Store};
use imgcache::{CacheOptions, ImageCache};

/// The kit's store, or `None` (skipped) where no server can be had.
fn store() -> Option<Store> {
    Store::centralized_db()
}

fn node_url(dir: &Path) -> String {
    imgcache::testing::postgres::node_for(dir)
}

/// Runs this test binary as a child that opens the cache in `dir` as its
/// own node and runs `cmd` (see `child`).
fn spawn(dir: &Path, cmd: &str) -> std::process::Child {
    let store = store().expect("store");
    common::child_command(store, dir, cmd)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The child side: `cache NAME SEED LEN ...` caches images, `migrate`
/// moves the directory's `cache.db` into the database; each prints `done`.
#[test]
fn child() {
    if std::env::var("IMGCACHE_CHILD").as_deref() == Ok("migrate") {
        // Glance's order: the rows move as the cache opens, before its
        // recovery walk.
        let dir = std::env::var("IMGCACHE_DIR").unwrap();
        let cache = common::child_store()
            .open(CacheOptions::new(dir).migrate_sqlite(true))
            .unwrap();
        let r = cache.migration().cloned().unwrap_or_default();
        println!("migrated {} of {}", r.migrated, r.rows);
        println!("done");
        return;
    }
    let Some((cmd, cache)) = child_cache() else {
        return;
    };
    let words: Vec<&str> = cmd.split_whitespace().collect();
    match words.as_slice() {
        ["cache", rest @ ..] => {
            for triple in rest.chunks(3) {
                let (name, seed, len) = (triple[0], triple[1], triple[2]);
                let data = bytes(seed.parse().unwrap(), len.parse().unwrap());
                assert!(cache.cache_image_file(&id(name), &data[..]).unwrap());
            }
        }
        other => panic!("unknown child command {other:?}"),
    }
    cache.flush().unwrap();
    println!("done");
}

fn wait_done(mut child: std::process::Child) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    wait_for_line(&mut out, "done");
    assert!(child.wait().unwrap().success());
}

/// Three nodes, three processes, one database: each lists only its own
/// images, `cached_nodes` says exactly who holds what, and an image deleted
/// on one node stays on the others.
#[test]
fn three_nodes_share_one_database() {
    let Some(store) = store() else { return };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Node i caches "shared" and "own-i"; nodes 0 and 1 also "pair".
    let plans = [
        "cache shared 1 3000 own-0 10 1000 pair 2 2000",
        "cache shared 1 3000 own-1 11 1100 pair 2 2000",
        "cache shared 1 3000 own-2 12 1200",
    ];
    let children: Vec<_> = dirs
        .iter()
        .zip(plans)
        .map(|(d, plan)| spawn(d.path(), plan))
        .collect();
    for c in children {
        wait_done(c);
    }
    let nodes: Vec<ImageCache> = dirs
        .iter()
        .map(|d| store.open(CacheOptions::new(d.path())).unwrap())
        .collect();
    let urls: Vec<String> = dirs.iter().map(|d| node_url(d.path())).collect();
    for (i, n) in nodes.iter().enumerate() {
        assert!(n.recovery().is_clean(), "node {i}: {:?}", n.recovery());
        assert_eq!(n.node(), urls[i]);
        let mut want = vec!["shared".to_string(), format!("own-{i}")];
        if i < 2 {
            want.push("pair".into());
        }
        want.sort();
        let got: Vec<String> = n
            .cached_images()
            .unwrap()
            .into_iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(got, want, "node {i} lists only its own images");
    }
    let mut sorted = urls.clone();
    sorted.sort();
    assert_eq!(nodes[2].cached_nodes(&id("shared")).unwrap(), Some(sorted));
    let mut pair = vec![urls[0].clone(), urls[1].clone()];
    pair.sort();
    assert_eq!(nodes[2].cached_nodes(&id("pair")).unwrap(), Some(pair));
    assert_eq!(
        nodes[0].cached_nodes(&id("own-2")).unwrap(),
        Some(vec![urls[2].clone()])
    );
    // Delete on node 0: gone there, still on 1 and 2.
    assert!(nodes[0].delete_cached_image(&id("shared")).unwrap());
    assert!(!nodes[0].is_cached(&id("shared")).unwrap());
    for n in &nodes[1..] {
        assert!(n.is_cached(&id("shared")).unwrap());
        let mut img = n.open_for_read(&id("shared")).unwrap().unwrap();
        assert_eq!(img.read_all().unwrap(), bytes(1, 3000));
    }
    let holders = nodes[1].cached_nodes(&id("shared")).unwrap().unwrap();
    assert!(
        !holders.contains(&urls[0]) && holders.len() == 2,
        "{holders:?}"
    );
    // Pruning node 2 to nothing leaves the others alone.
    nodes[2].prune_to(0).unwrap();
    assert!(nodes[2].cached_images().unwrap().is_empty());
    assert_eq!(nodes[1].cached_images().unwrap().len(), 3);
    // The view across nodes: every node's rows, hits included.
    for n in &nodes {
        n.flush().unwrap();
    }
    let all = nodes[0].cached_images_all_nodes().unwrap().unwrap();
    let by_node: BTreeMap<&str, Vec<&str>> = all.iter().fold(BTreeMap::new(), |mut m, e| {
        m.entry(e.node.as_str())
            .or_default()
            .push(e.image.id.as_str());
        m
    });
    assert_eq!(by_node.get(urls[0].as_str()), Some(&vec!["own-0", "pair"]));
    assert_eq!(
        by_node.get(urls[1].as_str()),
        Some(&vec!["own-1", "pair", "shared"])
    );
    assert_eq!(by_node.get(urls[2].as_str()), None);
    let shared_hits = all
        .iter()
        .find(|e| e.node == urls[1] && e.image.id.as_str() == "shared")
        .unwrap()
        .image
        .hits;
    assert_eq!(shared_hits, 1);
}

/// A Glance `cache.db` (its schema, its rows, the files beside it).
fn glance_dir(dir: &Path, rows: &[(&str, &[u8], u64)]) {
    for sub in ["queue", "incomplete", "invalid"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let db = rusqlite::Connection::open(dir.join("cache.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0,
         last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0,
         checksum TEXT);",
    )
    .unwrap();
    for (name, body, hits) in rows {
        std::fs::write(dir.join(name), body).unwrap();
        db.execute(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits)
             VALUES (?1, 1700000100.25, 1700000000.5, ?2, ?3)",
            rusqlite::params![name, body.len() as i64, *hits as i64],
        )
        .unwrap();
    }
}

fn sqlite_rows(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("cache.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM cached_images", [], |r| r.get(0))
        .unwrap()
}

/// Glance's migration, three nodes at once and one node twice at once:
/// every row reaches the database exactly once with its hits and times,
/// leaves SQLite, and a second run finds nothing to do.
#[test]
fn concurrent_migrations_of_three_cache_dbs_lose_no_row() {
    let Some(store) = store() else { return };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, d) in dirs.iter().enumerate() {
        let rows: Vec<(String, Vec<u8>, u64)> = (0..40)
            .map(|k| (format!("img-{i}-{k}"), bytes(k, 100 + k as usize), k))
            .collect();
        let rows: Vec<(&str, &[u8], u64)> = rows
            .iter()
            .map(|(n, b, h)| (n.as_str(), b.as_slice(), *h))
            .collect();
        glance_dir(d.path(), &rows);
    }
    // Two processes for node 0, one each for nodes 1 and 2, all at once.
    let children: Vec<_> = [0, 0, 1, 2]
        .iter()
        .map(|&i| spawn(dirs[i].path(), "migrate"))
        .collect();
    for c in children {
        wait_done(c);
    }
    for (i, d) in dirs.iter().enumerate() {
        assert_eq!(sqlite_rows(d.path()), 0, "node {i}: rows left in SQLite");
        assert!(d.path().join("cache.db").is_file(), "the file is kept");
        let cache = store.open(CacheOptions::new(d.path())).unwrap();
        assert!(cache.recovery().is_clean(), "{:?}", cache.recovery());
        let images = cache.cached_images().unwrap();
        assert_eq!(images.len(), 40, "node {i}");
        let seven = images
            .iter()
            .find(|e| e.id.as_str() == format!("img-{i}-7"))
            .unwrap();
        assert_eq!(seven.hits, 7);
        assert_eq!(seven.size, 107);
        assert_eq!(
            seven.last_modified,
            std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_500_000)
        );
        // Idempotent: nothing more to move.
        let again = cache
            .migrate_from_sqlite(&d.path().join("cache.db"))
            .unwrap();
        assert_eq!((again.rows, again.migrated), (0, 0));
        let mut img = cache
            .open_for_read(&id(&format!("img-{i}-3")))
            .unwrap()
            .unwrap();
        assert_eq!(img.read_all().unwrap(), bytes(3, 103));
    }
}

/// The operator's commands on a shared database: `--driver centralized_db`
/// with `--database-url` and `--node-url`, `nodes`, `list-cached
/// --all-nodes`, `migrate --from-sqlite`; the node URL is required, and a
/// password never shows.
#[cfg(feature = "cli")]
#[test]
fn cli_on_a_shared_database() {
    let Some(_) = store() else { return };
    let server = cluster().unwrap();
    let url = server.url().replacen("imgcache@", "imgcache:hunter2@", 1);
    let run = |dir: &Path, node: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
        for var in [
            "IMGCACHE_DIR",
            "IMGCACHE_CONFIG",
            "IMGCACHE_DRIVER",
            "IMGCACHE_NODE_URL",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("--dir")
            .arg(dir)
            .args(["--driver", "centralized_db"])
            .env("IMGCACHE_DATABASE_URL", &url)
            // A fleet without Glance: its tables are made by the first node.
            .env("IMGCACHE_CREATE_TABLES", "1");
        if let Some(n) = node {
            cmd.args(["--node-url", n]);
        }
        let out = cmd.args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    glance_dir(a.path(), &[("cirros", b"cirros bytes", 4)]);
    let (na, nb) = ("http://node-a:9292", "http://node-b:9292");
    // No node URL: refused, saying what is missing.
    let (code, _, err) = run(a.path(), None, &["stats"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("worker_self_reference_url"), "{err}");
    // Migrate node a's Glance cache.db.
    let (code, out, err) = run(a.path(), Some(na), &["migrate", "--from-sqlite"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("migrated 1 of 1 rows"), "{out}");
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("cirros"), b"cirros bytes").unwrap();
    let origin = src.path().to_str().unwrap();
    let (code, _, err) = run(
        b.path(),
        Some(nb),
        &["fetch", "cirros", "--origin", origin, "-o", "-"],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run(b.path(), Some(nb), &["nodes", "cirros"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), [na, nb]);
    let (code, out, _) = run(a.path(), Some(na), &["list-cached", "--all-nodes"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(na) && out.contains(nb) && out.contains("cirros"),
        "{out}"
    );
    let (code, out, _) = run(
        a.path(),
        Some(na),
        &["--json", "list-cached", "--all-nodes"],
    );
    assert_eq!(code, Some(0));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Other tests' nodes share the database: find node a's row.
    let a_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == na && r["id"] == "cirros")
        .unwrap_or_else(|| panic!("no row of {na}: {rows}"));
    assert_eq!(a_row["hits"], 4, "the migrated row keeps Glance's hits");
    // The password never shows: not in --help, not in an error.
    let (_, help, _) = run(a.path(), Some(na), &["--help"]);
    assert!(!help.contains("hunter2"), "{help}");
    let (code, _, err) = run(
        a.path(),
        Some(na),
        &[
            "--database-url",
            "postgres://imgcache:hunter2@127.0.0.1:1/x",
            "stats",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(
        !err.contains("hunter2") && err.contains("127.0.0.1"),
        "{err}"
    );
    // A store of one node has no cross-node view.
    let plain = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .arg("--dir")
        .arg(plain.path())
        .args(["nodes", "cirros"])
        .env_remove("IMGCACHE_DRIVER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
