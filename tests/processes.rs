//! Several processes on one cache directory, as API server workers share it.
//!
//! The test binary re-runs itself as the child: `child` below does the
//! child's part when `IMGCACHE_CHILD` is set, and nothing otherwise.

mod common;

use std::io::{BufReader, Read, Write};
use std::process::Stdio;

use common::{bytes, id, Fixture};
use imgcache::testing::Store;
use imgcache::Error;

/// The child's part. Commands (from `IMGCACHE_CHILD`):
/// - `read N`: open the image `x` N times, reading it whole each time;
/// - `write`: race to write `contested`, print `won` or `lost`;
/// - `hold`: open a writer for `slow`, print `ready`, wait for stdin to
///   close, then commit;
/// - `commit-and-stay`: commit `x`, print `committed`, wait for stdin to
///   close, then exit (closing the cache);
/// - `commit-many N`: commit `m0`..`mN`, print `committed`, wait to be
///   killed.
#[test]
fn child() {
    let Some((cmd, cache)) = common::child_cache() else {
        return;
    };
    let mut words = cmd.split_whitespace();
    match words.next() {
        Some("read") => {
            let n: usize = words.next().unwrap().parse().unwrap();
            let want = bytes(1, 10_000);
            for _ in 0..n {
                let mut img = cache.open_for_read(&id("x")).unwrap().unwrap();
                assert_eq!(img.read_all().unwrap(), want);
            }
        }
        Some("write") => {
            let me: u64 = std::process::id().into();
            match cache.open_for_write(&id("contested")) {
                Ok(mut w) => {
                    w.write_all(&bytes(me, 200_000)).unwrap();
                    match w.commit() {
                        Ok(_) => println!("won {me}"),
                        Err(Error::AlreadyCached { .. }) => println!("lost"),
                        Err(e) => panic!("{e}"),
                    }
                }
                Err(Error::AlreadyBeingCached { .. } | Error::AlreadyCached { .. }) => {
                    println!("lost")
                }
                Err(e) => panic!("{e}"),
            }
        }
        Some("hold") => {
            let mut w = cache.open_for_write(&id("slow")).unwrap();
            w.write_all(b"written by a live process").unwrap();
            println!("ready");
            std::io::stdout().flush().unwrap();
            let mut rest = Vec::new();
            std::io::stdin().read_to_end(&mut rest).unwrap();
            w.commit().unwrap();
        }
        Some("commit-and-stay") => {
            assert!(cache
                .cache_image_file(&id("x"), &bytes(1, 10_000)[..])
                .unwrap());
            println!("committed");
            std::io::stdout().flush().unwrap();
            let mut rest = Vec::new();
            std::io::stdin().read_to_end(&mut rest).unwrap();
        }
        Some("commit-many") => {
            let n: u64 = words.next().unwrap().parse().unwrap();
            for i in 0..n {
                let x = id(&format!("m{i}"));
                assert!(cache.cache_image_file(&x, &bytes(i, 20_000)[..]).unwrap());
            }
            println!("committed");
            std::io::stdout().flush().unwrap();
            loop {
                std::thread::park();
            }
        }
        Some("hold-read") => {
            // Open, read a little, wait for the parent, read the rest.
            let mut img = cache.open_for_read(&id("x")).unwrap().unwrap();
            let mut head = vec![0u8; 1000];
            img.read_exact(&mut head).unwrap();
            println!("open");
            std::io::stdout().flush().unwrap();
            let mut rest = Vec::new();
            std::io::stdin().read_to_end(&mut rest).unwrap();
            let mut tail = Vec::new();
            img.read_to_end(&mut tail).unwrap();
            head.extend(tail);
            assert_eq!(head, bytes(1, 3_000_000));
            println!("intact");
        }
        other => panic!("unknown child command {other:?}"),
    }
}

fn spawn(f: &Fixture, cmd: &str) -> std::process::Child {
    common::child_command(f.kind, f.path(), cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "child failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn hits_from_many_processes_are_exact() {
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        f.put("x", &bytes(1, 10_000));
        // Its entry written before the readers come (a commit with group
        // durability holds it: hits served meanwhile are written once it
        // is, by processes that live that long).
        f.cache.flush().unwrap();
        let children: Vec<_> = (0..4).map(|_| spawn(&f, "read 100")).collect();
        for c in children {
            output(c);
        }
        assert_eq!(f.cache.hit_count(&id("x")).unwrap(), 400, "{kind}");
    }
}

#[test]
fn racing_writer_processes_one_wins_whole() {
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        let children: Vec<_> = (0..6).map(|_| spawn(&f, "write")).collect();
        let outs: Vec<String> = children.into_iter().map(output).collect();
        let winners: Vec<u64> = outs
            .iter()
            .filter_map(|o| o.lines().find_map(|l| l.strip_prefix("won ")))
            .map(|p| p.trim().parse().unwrap())
            .collect();
        assert!(!winners.is_empty(), "{kind}: {outs:?}");
        let got = f.get(&id("contested")).unwrap();
        assert!(
            winners.iter().any(|&w| got == bytes(w, 200_000)),
            "{kind}: cached bytes are one winner's, whole"
        );
        assert!(!f.cache.is_being_cached(&id("contested")).unwrap());
    }
}

#[test]
fn clean_in_one_process_spares_a_writer_alive_in_another() {
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        let mut child = spawn(&f, "hold");
        // Wait for the child to hold its writer (the test harness prints a
        // header of its own first).
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        common::wait_for_line(&mut reader, "ready");
        // Ten days later, by this process's clock, with a zero stall time.
        f.tick(10 * 86_400);
        let report = f.cache.clean(Some(std::time::Duration::ZERO)).unwrap();
        assert!(report.stalled.is_empty(), "{kind}: {report:?}");
        assert_eq!(report.live_writers, vec![id("slow")]);
        drop(child.stdin.take());
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{kind}: child failed");
        assert_eq!(f.get(&id("slow")).unwrap(), b"written by a live process");
    }
}

#[test]
fn prune_in_one_process_while_another_reads() {
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        f.put("x", &bytes(1, 3_000_000));
        let mut child = spawn(&f, "hold-read");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        common::wait_for_line(&mut reader, "open");
        let report = f.cache.prune_to(0).unwrap();
        assert_eq!(report.removed, vec![id("x")], "{kind}");
        assert!(!f.path().join("x").exists());
        drop(child.stdin.take());
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "{kind}: reader failed: {rest}"
        );
        assert!(rest.contains("intact"), "{kind}: {rest}");
    }
}

/// Single flight across processes: a fetch that finds another process
/// filling the image waits for it (its lock), then serves the cached copy
/// without opening the backend; if that process dies instead, the fetch
/// takes the fill over and opens the backend once.
#[test]
fn fetch_waits_for_a_writer_in_another_process_or_takes_over() {
    for &kind in Store::all() {
        for kill in [false, true] {
            let f = Fixture::new(kind);
            let mut child = spawn(&f, "hold");
            let mut reader = BufReader::new(child.stdout.take().unwrap());
            common::wait_for_line(&mut reader, "ready");
            let opens = std::sync::atomic::AtomicUsize::new(0);
            let got = std::thread::scope(|s| {
                let fetching = s.spawn(|| {
                    let stream = f
                        .cache
                        .fetch(&id("slow"), None, || {
                            opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            Ok(&b"from the backend"[..])
                        })
                        .unwrap();
                    let mut out = Vec::new();
                    let mut stream = stream;
                    stream.read_to_end(&mut out).unwrap();
                    out
                });
                // Wait until the fetch is blocked on the writer's lock: the
                // kernel lists a blocked request as "-> FLOCK" in /proc/locks.
                let start = std::time::Instant::now();
                while !std::fs::read_to_string("/proc/locks")
                    .unwrap()
                    .lines()
                    .any(|l| l.contains("-> FLOCK"))
                {
                    assert!(
                        start.elapsed().as_secs() < 60,
                        "{kind}: the fetch never blocked"
                    );
                    std::thread::yield_now();
                }
                if kill {
                    child.kill().unwrap();
                    child.wait().unwrap();
                } else {
                    drop(child.stdin.take()); // let it commit
                    let mut rest = String::new();
                    reader.read_to_string(&mut rest).unwrap();
                    assert!(child.wait().unwrap().success());
                }
                fetching.join().unwrap()
            });
            let opens = opens.load(std::sync::atomic::Ordering::SeqCst);
            if kill {
                assert_eq!(got, b"from the backend", "{kind}: took over");
                assert_eq!(opens, 1, "{kind}");
            } else {
                assert_eq!(got, b"written by a live process", "{kind}: waited");
                assert_eq!(opens, 0, "{kind}");
            }
        }
    }
}

/// A commit by a live process whose entry it has not written yet (group
/// durability: the SQLite store holds it for up to a second) is
/// served by the others at once, never fetched again; a process opening
/// meanwhile does not adopt it; the hits served meanwhile count once the
/// committer writes its entry (with its CRC-32).
#[test]
fn another_process_commit_is_served_before_its_entry_is_written() {
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        let mut child = spawn(&f, "commit-and-stay");
        // The harness prints lines of its own first.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        common::wait_for_line(&mut out, "committed");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let x = id("x");
        let held = !f.cache.cached_images().unwrap().iter().any(|e| e.id == x);
        // Stopped (SIGSTOP) as soon as its commit is reported: the SQLite
        // store still holds the entry (its writer thread waits half a
        // second before it writes one), and writes nothing meanwhile.
        assert!(
            held || kind.name() != "sqlite",
            "{kind}: the entry was not held"
        );
        // Listed with the files in place, entry written or not.
        assert_eq!(f.cache.cached_ids().unwrap(), vec![x.clone()], "{kind}");
        // A process opening now leaves the file to its committer.
        let other = f.reopen();
        assert!(
            other.recovery().adopted.is_empty(),
            "{kind}: {:?}",
            other.recovery()
        );
        assert!(f.cache.is_cached(&x).unwrap(), "{kind}");
        let mut img = f
            .cache
            .fetch(&x, None, || -> std::io::Result<&[u8]> {
                panic!("{kind}: a cached image went to the origin")
            })
            .unwrap();
        let mut got = Vec::new();
        img.read_to_end(&mut got).unwrap();
        assert_eq!(got, bytes(1, 10_000), "{kind}");
        for _ in 0..3 {
            let mut img = f.cache.open_for_read(&x).unwrap().unwrap();
            assert_eq!(img.read_all().unwrap(), bytes(1, 10_000), "{kind}");
        }
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "{kind}");
        f.cache.flush().unwrap();
        let entry = f.cache.cached_image(&x).unwrap().expect("recorded");
        assert_eq!(entry.hits, 4, "{kind} (held: {held})");
        assert!(entry.crc32.is_some(), "{kind}: adopted, not recorded");
    }
}

/// A process killed right after its commits returned (with group
/// durability, their entries perhaps still held, not written) loses none
/// of them: the machine stayed up, so the next open adopts what has no
/// entry (the session's mark names this boot) and serves every byte.
#[test]
fn a_killed_process_loses_no_commit() {
    const N: u64 = 64;
    for &kind in Store::all() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = common::child_command(kind, dir.path(), &format!("commit-many {N}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The harness prints lines of its own first.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        common::wait_for_line(&mut out, "committed");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let cache = kind.open(imgcache::CacheOptions::new(dir.path())).unwrap();
        let r = cache.recovery();
        assert!(r.unclean_shutdown, "{kind}: {r:?}");
        assert!(
            r.torn.is_empty() && r.quarantined.is_empty(),
            "{kind}: {r:?}"
        );
        eprintln!(
            "{kind}: {} of {N} entries adopted (held when killed)",
            r.adopted.len()
        );
        assert!(
            !r.adopted.is_empty() || kind.name() != "sqlite",
            "{kind}: nothing was held when the child was killed"
        );
        for i in 0..N {
            let x = id(&format!("m{i}"));
            let mut img = cache
                .open_for_read(&x)
                .unwrap()
                .unwrap_or_else(|| panic!("{kind}: {x} lost"));
            assert_eq!(img.read_all().unwrap(), bytes(i, 20_000), "{kind}: {x}");
        }
    }
}

/// Files whose entries a killed process held stay served but unrecorded in
/// a cache that stays open; `adopt_unrecorded` (the serve cleaner's) records
/// those written 10 s ago or more, so that they count and can be evicted,
/// and leaves newer ones to their committer.
#[test]
fn files_a_killed_process_held_are_adopted_later() {
    const N: u64 = 16;
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        let mut child = spawn(&f, &format!("commit-many {N}"));
        // The harness prints lines of its own first.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        common::wait_for_line(&mut out, "committed");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let listed = |c: &imgcache::ImageCache| c.cached_images().unwrap().len() as u64;
        let unrecorded = N - listed(&f.cache);
        eprintln!("{kind}: {unrecorded} of {N} commits without an entry after the kill");
        assert!(
            unrecorded > 0 || kind.name() != "sqlite",
            "{kind}: nothing was held when the child was killed"
        );
        // Written lately: left alone.
        assert!(f.cache.adopt_unrecorded().unwrap().is_empty(), "{kind}");
        for i in 0..N {
            common::written_an_hour_ago(&f.path().join(format!("m{i}")));
        }
        let adopted = f.cache.adopt_unrecorded().unwrap();
        assert_eq!(adopted.len() as u64, unrecorded, "{kind}: {adopted:?}");
        assert_eq!(listed(&f.cache), N, "{kind}");
        assert_eq!(f.cache.cache_size().unwrap(), N * 20_000, "{kind}");
        assert!(f.cache.adopt_unrecorded().unwrap().is_empty(), "{kind}");
        for i in 0..N {
            let mut img = f
                .cache
                .open_for_read(&id(&format!("m{i}")))
                .unwrap()
                .unwrap();
            assert_eq!(img.read_all().unwrap(), bytes(i, 20_000), "{kind}");
        }
    }
}
