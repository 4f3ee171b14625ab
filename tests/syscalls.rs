//! What the kernel sees: system calls recorded with `strace` around real
//! cache operations. Needs `strace`: without it these tests say so and pass
//! without checking; `.ci/run` installs it and requires them to run
//! (`IMGCACHE_REQUIRE_STRACE=1`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{bytes, id, Fixture, DRIVERS};

/// The child's part, when `IMGCACHE_CHILD` is set: `read N` opens and reads
/// image `x` N times.
#[test]
fn child() {
    let Some((cmd, cache)) = common::child_cache() else {
        return;
    };
    let mut words = cmd.split_whitespace();
    match (words.next(), words.next()) {
        (Some("read"), Some(n)) => {
            let n: usize = n.parse().unwrap();
            for _ in 0..n {
                let mut img = cache.open_for_read(&id("x")).unwrap().unwrap();
                assert_eq!(img.read_all().unwrap().len(), 4096);
            }
            if let Some(file) = std::env::var_os("IMGCACHE_TID_FILE") {
                // "/proc/thread-self" links to "<pid>/task/<tid>".
                let link = std::fs::read_link("/proc/thread-self").unwrap();
                let tid = link.file_name().unwrap().to_string_lossy().into_owned();
                std::fs::write(file, tid).unwrap();
            }
        }
        other => panic!("unknown child command {other:?}"),
    }
}

fn have_strace() -> bool {
    let ok = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("IMGCACHE_REQUIRE_STRACE").is_none(),
            "IMGCACHE_REQUIRE_STRACE is set but strace is missing"
        );
        eprintln!("skipped: strace is not installed");
    }
    ok
}

/// Runs the child under strace, tracing `calls`; returns the trace lines.
fn trace(f: &Fixture, cmd: &str, env: &[(&str, &Path)], calls: &str, out: &Path) -> Vec<String> {
    let status = Command::new("strace")
        .envs(env.iter().copied())
        .args(["-f", "-qq", "-e", &format!("trace={calls}"), "-o"])
        .arg(out)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--test-threads=1", "--quiet"])
        .env("IMGCACHE_CHILD", cmd)
        .env("IMGCACHE_DIR", f.path())
        .env("IMGCACHE_DRIVER", f.kind.as_str())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "traced child failed");
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A read costs a metadata update, never an fsync: thousands of hits, far
/// past SQLite's checkpoint threshold, make no `fsync`/`fdatasync` on the
/// reading thread (the SQLite driver's background checkpointer, a thread of
/// its own, may sync).
#[test]
fn reads_never_fsync_on_the_reading_thread() {
    if !have_strace() {
        return;
    }
    for kind in DRIVERS {
        let f = Fixture::new(kind);
        f.put("x", &bytes(1, 4096));
        let out = tempfile::NamedTempFile::new().unwrap();
        let tid_file = tempfile::NamedTempFile::new().unwrap();
        let lines = trace(
            &f,
            "read 3000",
            &[("IMGCACHE_TID_FILE", tid_file.path())],
            "fsync,fdatasync,sync_file_range,syncfs,sync,msync",
            out.path(),
        );
        let reader = std::fs::read_to_string(tid_file.path()).unwrap();
        let reader = reader.trim();
        assert!(
            !reader.is_empty(),
            "{kind}: the child did not report its thread"
        );
        let on_reader: Vec<&String> = lines
            .iter()
            .filter(|l| l.split_whitespace().next() == Some(reader))
            .collect();
        let elsewhere = lines.len() - on_reader.len();
        eprintln!("{kind}: 3000 reads; sync calls on the reading thread: {}, on other threads: {elsewhere}", on_reader.len());
        assert!(
            on_reader.is_empty(),
            "{kind}: the reading thread synced: {on_reader:#?}"
        );
        assert_eq!(f.cache.hit_count(&id("x")).unwrap(), 3000, "{kind}");
    }
}
