//! Kill tests: a child process works the cache (writes, commits, abandoned
//! writes, reads, deletes, prunes, cleans, queueing) on two threads and is
//! killed with SIGKILL at a random moment; the parent reopens the cache and
//! checks the invariants:
//!
//! - every entry reported cached has exactly the committed bytes, and its
//!   CRC matches;
//! - metadata and files agree;
//! - after `clean`, nothing is left in `incomplete/` or `invalid/`.
//!
//! The same directory lives through every kill, as a server's cache lives
//! through restarts. The child commits with the default durability (group:
//! no `fsync` per commit), or `IMGCACHE_DURABILITY=immediate`.
//! `IMGCACHE_KILLS` sets the kills per store (default 100, as `cargo test`
//! runs it; `.ci/run` then soaks 1000 per store, and 10 000 run on demand).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use common::{bytes, child_cache, child_command, id, Rng};
use imgcache::testing::Store;
use imgcache::{CacheOptions, Error, ImageCache, ImageId, Verification};

const POOL: u64 = 24;

fn name(i: u64) -> String {
    format!("img-{i:02}")
}

/// The one content image `i` ever has: 0 to ~400 KB, so that a kill often
/// lands inside a write.
fn content(i: u64) -> Vec<u8> {
    let len = if i == 0 {
        0
    } else {
        (i * 37_337 + i * i * 911) % 400_000
    };
    bytes(i + 1, len as usize)
}

fn index(id: &ImageId) -> u64 {
    id.as_str()
        .strip_prefix("img-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected id {id}"))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads image `i` and checks its bytes; a mismatch ends the child with
/// exit code 3.
fn read_and_check(cache: &ImageCache, i: u64) {
    match cache.open_for_read(&id(&name(i))) {
        Ok(Some(mut img)) => {
            let got = img.read_all().expect("read");
            if got != content(i) {
                say(&format!(
                    "VIOLATION: {} read {} bytes of other content",
                    name(i),
                    got.len()
                ));
                std::process::exit(3);
            }
        }
        Ok(None) => {}
        // Deleted or pruned by the other thread between lookup and open.
        Err(Error::Io { .. }) => {}
        Err(e) => panic!("read {}: {e}", name(i)),
    }
}

fn work(cache: &ImageCache, rng: &mut Rng, thread: &str) {
    for step in 0u64.. {
        let i = rng.below(POOL);
        let x = id(&name(i));
        match rng.below(20) {
            0..=7 => match cache.open_for_write(&x) {
                Ok(mut w) => {
                    let data = content(i);
                    for chunk in data.chunks(32 * 1024) {
                        w.write_all(chunk).expect("write");
                    }
                    match w.commit() {
                        Ok(_) | Err(Error::AlreadyCached { .. }) => {}
                        Err(e) => panic!("commit {x}: {e}"),
                    }
                }
                Err(Error::AlreadyCached { .. } | Error::AlreadyBeingCached { .. }) => {}
                Err(e) => panic!("open_for_write {x}: {e}"),
            },
            8 => {
                if let Ok(mut w) = cache.open_for_write(&x) {
                    let data = content(i);
                    w.write_all(&data[..data.len() / 2]).expect("write");
                    drop(w);
                }
            }
            9..=14 => read_and_check(cache, i),
            15 => {
                cache.delete_cached_image(&x).expect("delete");
            }
            16 => {
                cache.prune_to(rng.below(3_000_000)).expect("prune");
            }
            17 => {
                cache.clean(Some(Duration::ZERO)).expect("clean");
            }
            _ => {
                cache.queue_image(&x).expect("queue");
            }
        }
        say(&format!("{thread} {step}"));
    }
}

/// The child's part: work the cache on two threads until killed.
#[test]
fn child() {
    let Some((cmd, cache)) = child_cache() else {
        return;
    };
    let seed: u64 = cmd.parse().expect("seed");
    std::thread::scope(|s| {
        let cache = &cache;
        s.spawn(move || work(cache, &mut Rng(seed * 2 + 1), "a"));
        s.spawn(move || {
            let mut rng = Rng(seed * 2 + 2);
            for step in 0u64.. {
                read_and_check(cache, rng.below(POOL));
                say(&format!("b {step}"));
            }
        });
    });
}

/// Reopens the cache after a kill and checks every invariant; returns the
/// number of cached entries checked.
fn check(dir: &std::path::Path, kind: Store, kill: u64) -> usize {
    let cache = kind.open(CacheOptions::new(dir)).unwrap_or_else(|e| {
        panic!("{kind} kill {kill}: reopen failed: {e}");
    });
    let listed = cache.cached_images().unwrap();
    for info in &listed {
        let i = index(&info.id);
        let want = content(i);
        assert_eq!(
            info.size,
            want.len() as u64,
            "{kind} kill {kill}: size of {}",
            info.id
        );
        match cache.verify(&info.id).unwrap() {
            Some(Verification::Intact) => {}
            Some(Verification::Unverified { crc32 }) => {
                // Adopted after a crash between rename and metadata write.
                assert_eq!(
                    crc32,
                    crc32fast::hash(&want),
                    "{kind} kill {kill}: {}",
                    info.id
                );
            }
            other => panic!("{kind} kill {kill}: {} is {other:?}", info.id),
        }
        let got = std::fs::read(dir.join(info.id.as_str())).unwrap();
        assert!(
            got == want,
            "{kind} kill {kill}: {} has other bytes",
            info.id
        );
    }
    // Metadata and files agree.
    let reported: BTreeSet<String> = listed.iter().map(|i| i.id.to_string()).collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("img-"))
        .collect();
    assert_eq!(
        reported, on_disk,
        "{kind} kill {kill}: metadata and files differ"
    );
    // Nobody is alive now: clean leaves nothing behind.
    cache.clean(Some(Duration::ZERO)).unwrap();
    for sub in ["incomplete", "invalid"] {
        let left: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.is_empty(),
            "{kind} kill {kill}: {sub}/ still holds {left:?}"
        );
    }
    listed.len()
}

#[test]
fn sigkill_at_random_moments_never_breaks_the_cache() {
    let kills: u64 = std::env::var("IMGCACHE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    for &kind in Store::all() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let mut rng = Rng(0x5eed ^ kills);
        let mut mid_write = 0;
        let mut entries = 0;
        for kill in 0..kills {
            let mut child = child_command(kind, &cache_dir, &kill.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            // Let the child make progress for a random number of steps,
            // then kill it wherever it is.
            let wanted = 1 + rng.below(80);
            let mut reader = BufReader::new(child.stdout.take().unwrap());
            let mut seen = 0;
            let mut line = String::new();
            while seen < wanted {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                assert!(!line.starts_with("VIOLATION"), "{kind} kill {kill}: {line}");
                if line.starts_with("a ") || line.starts_with("b ") {
                    seen += 1;
                }
            }
            child.kill().unwrap();
            let status = child.wait().unwrap();
            assert!(
                seen == wanted && status.code().is_none(),
                "{kind} kill {kill}: the child ended by itself ({status}) after {seen} steps"
            );
            if std::fs::read_dir(cache_dir.join("incomplete"))
                .unwrap()
                .count()
                > 0
            {
                mid_write += 1;
            }
            entries += check(&cache_dir, kind, kill);
        }
        eprintln!(
            "{kind} ({:?}): {kills} kills survived with 0 violations ({mid_write} left a write in flight; \
             {entries} cached entries checked in all)",
            common::child_durability()
        );
    }
}
