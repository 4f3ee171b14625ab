//! Power cuts, simulated without a kernel: a child process commits with
//! group durability (the default), checkpoints once, commits more, and is
//! killed with SIGKILL before the next checkpoint. The parent then does to
//! the entries committed after the watermark what a power cut may do —
//! truncates their files, zeroes ranges, drops their tails (a hole where
//! the blocks were never written), undoes their renames, and rolls the
//! store back towards the watermark (SQLite rows and xattrs lost) — and
//! reopens the cache. It checks:
//!
//! - every entry committed before the watermark is there, with its bytes;
//! - no entry is ever served with bytes other than those committed: each
//!   later one is there and intact, or gone (in `invalid/`, `incomplete/`
//!   or nowhere), never an error on read;
//! - a later entry that was left whole keeps its row is kept (verified,
//!   not thrown away).
//!
//! The same directory lives through every cut. `IMGCACHE_POWER_CUTS` sets
//! the cuts per store (default 20).

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::process::Stdio;
use std::time::Duration;

use common::{bytes, child_command, child_store, id, Rng};
use imgcache::testing::Store;
use imgcache::{CacheOptions, Durability, ImageId};

/// Entries committed before the child's checkpoint, and after it.
const BEFORE: u64 = 4;
const AFTER: u64 = 12;

/// The one content of an image name.
fn content(name: &str) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    // 0 to ~200 KB; some empty.
    let len = if seed % 11 == 0 {
        0
    } else {
        (seed % 200_000) as usize
    };
    bytes(seed, len)
}

/// The child's part: `cut N` commits `BEFORE` images, checkpoints, commits
/// `AFTER` more, says so and waits to be killed.
#[test]
fn child() {
    let Ok(cmd) = std::env::var("IMGCACHE_CHILD") else {
        return;
    };
    let trial: u64 = cmd
        .strip_prefix("cut ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unknown child command {cmd:?}"));
    let dir = std::env::var("IMGCACHE_DIR").expect("IMGCACHE_DIR");
    // No checkpoint but the one asked for: the interval outlives the child.
    let cache = child_store()
        .open(CacheOptions::new(dir).durability(Durability::Group {
            interval: Duration::from_secs(3600),
            bytes: u64::MAX,
        }))
        .expect("open cache in child");
    let commit = |name: &str| {
        let mut w = cache.open_for_write(&id(name)).unwrap();
        w.write_all(&content(name)).unwrap();
        w.commit().unwrap();
    };
    for i in 0..BEFORE {
        commit(&format!("t{trial}-before-{i}"));
    }
    cache
        .checkpoint()
        .unwrap()
        .expect("a store with a watermark");
    for i in 0..AFTER {
        commit(&format!("t{trial}-after-{i}"));
    }
    // The store's held entries written (as its writer thread does within
    // a second), not checkpointed: the cut then takes what it takes
    // of them (rows rolled back below) — entries held at the cut are lost
    // as rolled-back ones are.
    cache.flush().unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    drop(out);
    loop {
        std::thread::park();
    }
}

/// What the simulated cut did to one entry committed after the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Harm {
    None,
    Truncated,
    Zeroed,
    TailDropped,
    RenameLost,
}

/// Drops the metadata of `name` as a store rolled back past its commit.
fn lose_metadata(kind: Store, dir: &std::path::Path, name: &str) -> bool {
    match kind.name() {
        "sqlite" => {
            let db = rusqlite::Connection::open(dir.join("cache.db")).unwrap();
            db.execute("DELETE FROM cached_images WHERE image_id = ?1", [name])
                .unwrap();
            true
        }
        "xattr" => {
            let path = dir.join(name);
            for attr in xattr::list(&path).unwrap() {
                xattr::remove(&path, &attr).unwrap();
            }
            true
        }
        // PostgreSQL's commits are durable: a node's power cut loses no row.
        _ => false,
    }
}

fn harm(rng: &mut Rng, path: &std::path::Path, len: u64) -> Harm {
    // Half the entries are left whole.
    let pick = rng.below(10).saturating_sub(5);
    if len == 0 && pick != 4 {
        return Harm::None;
    }
    let file = || OpenOptions::new().write(true).open(path).unwrap();
    match pick {
        0 => Harm::None,
        1 => {
            file().set_len(rng.below(len)).unwrap();
            Harm::Truncated
        }
        2 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(65_536));
            let mut f = file();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![0u8; n as usize]).unwrap();
            // Zeroes over zeroes change nothing: that one is left whole.
            Harm::Zeroed
        }
        3 => {
            let f = file();
            f.set_len(rng.below(len)).unwrap();
            f.set_len(len).unwrap();
            Harm::TailDropped
        }
        _ => Harm::RenameLost,
    }
}

#[test]
fn a_power_cut_after_the_watermark_never_serves_a_wrong_byte() {
    let cuts: u64 = std::env::var("IMGCACHE_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for &kind in Store::all() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let mut rng = Rng(0x9e37_79b9 ^ cuts);
        // Every image that must be there, whole, from now on.
        let mut survivors: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let (mut kept, mut torn, mut lost, mut harmed) = (0, 0, 0, 0);
        for trial in 0..cuts {
            let mut child = child_command(kind, &cache_dir, &format!("cut {trial}"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            // The harness prints lines of its own first.
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            loop {
                line.clear();
                let n = out.read_line(&mut line).unwrap();
                assert!(n > 0, "{kind} cut {trial}: the child failed");
                if line.trim() == "ready" {
                    break;
                }
            }
            child.kill().unwrap();
            child.wait().unwrap();
            common::as_if_the_machine_went_down(&cache_dir);

            // The cut: whatever a power cut may do after the watermark.
            let mut fate: Vec<(String, Harm, bool)> = Vec::new();
            // The store rolls back a suffix of the later commits.
            let rolled_from = rng.below(AFTER + 1);
            for i in 0..AFTER {
                let name = format!("t{trial}-after-{i}");
                let path = cache_dir.join(&name);
                let len = std::fs::metadata(&path).unwrap().len();
                let h = harm(&mut rng, &path, len);
                let mut meta_lost = false;
                if h == Harm::RenameLost {
                    std::fs::rename(&path, cache_dir.join("incomplete").join(&name)).unwrap();
                } else if i >= rolled_from || rng.below(6) == 0 {
                    meta_lost = lose_metadata(kind, &cache_dir, &name);
                }
                if h != Harm::None || meta_lost {
                    harmed += 1;
                }
                fate.push((name, h, meta_lost));
            }
            for i in 0..BEFORE {
                let name = format!("t{trial}-before-{i}");
                let bytes = content(&name);
                survivors.insert(name, bytes);
            }

            let cache = kind
                .open(CacheOptions::new(&cache_dir))
                .unwrap_or_else(|e| panic!("{kind} cut {trial}: reopen failed: {e}"));
            let report = cache.recovery().clone();
            for (name, bytes) in &survivors {
                let got = cache
                    .open_for_read(&id(name))
                    .unwrap_or_else(|e| panic!("{kind} cut {trial}: {name}: {e}"))
                    .unwrap_or_else(|| {
                        panic!("{kind} cut {trial}: {name} before the watermark is gone")
                    })
                    .read_all()
                    .unwrap();
                assert!(got == *bytes, "{kind} cut {trial}: {name} has other bytes");
            }
            for (name, h, meta_lost) in fate {
                let x: ImageId = id(&name);
                let served = cache.open_for_read(&x).unwrap_or_else(|e| {
                    panic!("{kind} cut {trial}: {name} ({h:?}): read failed: {e}")
                });
                let Some(mut img) = served else {
                    lost += 1;
                    if report.torn.contains(&x) {
                        torn += 1;
                    }
                    // Gone: only what was harmed may be.
                    assert!(
                        h != Harm::None || meta_lost,
                        "{kind} cut {trial}: {name} was left whole but is gone: {report:?}"
                    );
                    continue;
                };
                let got = img.read_all().unwrap();
                assert!(
                    got == content(&name),
                    "{kind} cut {trial}: {name} ({h:?}, metadata lost: {meta_lost}) served {} wrong bytes",
                    got.len()
                );
                kept += 1;
                survivors.insert(name, got);
            }
            // What the cut left in incomplete/ is stalled, for clean.
            cache.clean(Some(Duration::ZERO)).unwrap();
            drop(cache);
        }
        eprintln!(
            "{kind}: {cuts} power cuts, {} later entries ({harmed} harmed): {kept} kept intact, \
             {lost} gone ({torn} of them moved to invalid/ as torn), 0 wrong bytes served; \
             {} entries before the watermarks all intact",
            cuts * AFTER,
            cuts * BEFORE
        );
    }
}
