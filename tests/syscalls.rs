//! What the kernel sees: system calls recorded with `strace` around real
//! cache operations. Needs `strace`: without it these tests say so and pass
//! without checking; `.ci/run` installs it and requires them to run
//! (`IMGCACHE_REQUIRE_STRACE=1`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{bytes, id, Fixture};
use imgcache::testing::Store;

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
            // On a thread that only reads: opening and closing the cache
            // (which writes what is left of the hits) are not reads.
            std::thread::scope(|s| {
                s.spawn(|| {
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
                });
            });
        }
        (Some("commit"), None) => {
            use std::io::Write;
            let mut w = cache.open_for_write(&id("x")).unwrap();
            for chunk in bytes(7, 1 << 20).chunks(300_000) {
                w.write_all(chunk).unwrap();
            }
            w.commit().unwrap();
        }
        other => panic!("unknown child command {other:?}"),
    }
}

/// The index of the first of `lines` from `from` on for which `what` holds.
fn find_from(lines: &[String], from: usize, what: &dyn Fn(&str) -> bool) -> Option<usize> {
    lines
        .iter()
        .skip(from)
        .position(|l| what(l))
        .map(|i| i + from)
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
fn trace(
    f: &Fixture,
    cmd: &str,
    env: &[(&str, &std::ffi::OsStr)],
    calls: &str,
    out: &Path,
) -> Vec<String> {
    let status = Command::new("strace")
        .envs(env.iter().copied())
        .args(["-f", "-qq", "-y", "-e", &format!("trace={calls}"), "-o"])
        .arg(out)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--test-threads=1", "--quiet"])
        .env("IMGCACHE_CHILD", cmd)
        .env("IMGCACHE_DIR", f.path())
        .env("IMGCACHE_DRIVER", f.kind.name())
        .envs(f.kind.child_env())
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
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        f.put("x", &bytes(1, 4096));
        // The entry written before the child reads: a row this process
        // still held would leave the child's hits waiting for it (and
        // lost if the child exits first).
        f.cache.flush().unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let tid_file = tempfile::NamedTempFile::new().unwrap();
        let lines = trace(
            &f,
            "read 3000",
            &[("IMGCACHE_TID_FILE", tid_file.path().as_os_str())],
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

/// Where the writer's file took its name `incomplete` in `lines`, and how
/// strace names its descriptor. The file is made without a name
/// (O_TMPFILE) and locked, then linked as `incomplete`, never replacing:
/// nobody sees it unlocked. (Where O_TMPFILE is refused, it is created and
/// locked under a private name, then renamed into place, never replacing.)
/// strace names an unnamed file's descriptor `<…/incomplete/#<inode>>`,
/// followed by `(deleted)`, even once it is linked; a named one by its path.
/// The trace must include `openat`, `flock`, `linkat` and the renames.
fn placed(lines: &[String], incomplete: &str, kind: &str) -> (usize, String) {
    let opened = find_from(lines, 0, &|l| {
        (l.contains("linkat(") || l.contains("rename"))
            && l.contains(&format!("\"{incomplete}\""))
            && l.trim_end().ends_with("= 0")
    })
    .unwrap_or_else(|| panic!("{kind}: {incomplete} never placed: {lines:#?}"));
    let placed = &lines[opened];
    if !placed.contains("linkat(") {
        assert!(placed.contains(".imgcache-new-"), "{kind}: {placed}");
        assert!(placed.contains("RENAME_NOREPLACE"), "{kind}: {placed}");
        return (opened, format!("<{incomplete}>"));
    }
    assert!(placed.contains("/fd/"), "{kind}: {placed}");
    let made = lines[..opened]
        .iter()
        .rposition(|l| l.contains(" openat(") && l.contains("O_TMPFILE"))
        .unwrap_or_else(|| panic!("{kind}: no unnamed file before {placed}"));
    // strace may split the call around another thread's: its return value
    // is then on the same thread's `<... openat resumed>` line.
    let pid = lines[made].split_whitespace().next().unwrap_or_default();
    let done = if lines[made].contains("<unfinished") {
        lines[made..opened]
            .iter()
            .find(|l| l.split_whitespace().next() == Some(pid) && l.contains("openat resumed>"))
            .unwrap_or_else(|| panic!("{kind}: {} never resumed", lines[made]))
    } else {
        &lines[made]
    };
    let returned = done.rsplit(" = ").next().unwrap_or_default();
    let tag = match (returned.find('<'), returned.find('>')) {
        (Some(a), Some(b)) if a < b => returned[a..=b].to_string(),
        _ => panic!("{kind}: no path for the descriptor: {}", lines[made]),
    };
    assert!(
        lines[made..opened]
            .iter()
            .any(|l| l.contains(" flock(") && l.contains(&tag) && l.contains("LOCK_EX")),
        "{kind}: linked before it was locked: {:#?}",
        &lines[made..=opened]
    );
    (opened, tag)
}

/// The durability order of one commit with `Durability::Immediate`, as the
/// kernel sees it: the data is written and `fsync`ed, then renamed into
/// place (never replacing), then the directory is `fsync`ed, and only then
/// is metadata written (SQLite's log). The xattr driver's attributes are
/// set before the data `fsync`, so they are durable with the bytes.
#[test]
fn commit_syncs_data_then_renames_then_syncs_dir_then_records() {
    if !have_strace() {
        return;
    }
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        let out = tempfile::NamedTempFile::new().unwrap();
        let lines = trace(
            &f,
            "commit",
            &[("IMGCACHE_DURABILITY", "immediate".as_ref())],
            "openat,flock,write,pwrite64,sendto,sendmsg,fsetxattr,fsync,fdatasync,rename,renameat,renameat2,linkat",
            out.path(),
        );
        let base = f.path().display().to_string();
        let incomplete = format!("{base}/incomplete/x");
        let find = |from: usize, what: &dyn Fn(&str) -> bool| find_from(&lines, from, what);
        let (opened, file_tag) = placed(&lines, &incomplete, kind.name());
        let fsync_file = find(opened, &|l| l.contains(" fsync(") && l.contains(&file_tag))
            .unwrap_or_else(|| panic!("{kind}: the data was never fsynced"));
        let last_write = lines
            .iter()
            .rposition(|l| l.contains(" write(") && l.contains(&file_tag))
            .unwrap_or_else(|| panic!("{kind}: no data write"));
        let rename = find(fsync_file, &|l| {
            l.contains("rename") && l.contains(&format!("\"{incomplete}\""))
        })
        .unwrap_or_else(|| panic!("{kind}: no rename after the data fsync"));
        let fsync_dir = find(rename, &|l| {
            l.contains(" fsync(") && l.contains(&format!("<{base}>)"))
        })
        .unwrap_or_else(|| panic!("{kind}: the directory was not fsynced after the rename"));
        assert!(
            last_write < fsync_file,
            "{kind}: data written after its fsync"
        );
        assert!(
            lines[rename].contains("RENAME_NOREPLACE"),
            "{kind}: {}",
            lines[rename]
        );
        // No rename of the file between its placement and its data sync.
        assert!(
            find(opened + 1, &|l| l.contains("rename")
                && l.contains(&format!("\"{incomplete}\"")))
                == Some(rename),
            "{kind}: renamed before its data was synced"
        );
        match kind.name() {
            "sqlite" => {
                // Glance's journal mode: the rollback journal, then the
                // database.
                let wal = |l: &str| {
                    l.contains(" pwrite64(")
                        && (l.contains("cache.db-journal>") || l.contains("cache.db>"))
                };
                assert!(
                    !lines[opened..fsync_dir].iter().any(|l| wal(l)),
                    "{kind}: metadata written before the directory sync"
                );
                assert!(
                    find(fsync_dir, &wal).is_some(),
                    "{kind}: no metadata after the sync"
                );
            }
            "centralized_db" => {
                // The row goes over the socket to the database, once the
                // directory is synced.
                let sent = |l: &str| {
                    (l.contains(" sendto(") || l.contains(" write(") || l.contains(" sendmsg("))
                        && l.contains("socket:[")
                };
                assert!(
                    !lines[opened..fsync_dir].iter().any(|l| sent(l)),
                    "{kind}: metadata sent before the directory sync"
                );
                assert!(
                    find(fsync_dir, &sent).is_some(),
                    "{kind}: no metadata after the sync: {lines:#?}"
                );
            }
            _ => {
                let crc = find(opened, &|l| {
                    l.contains(" fsetxattr(") && l.contains("user.imgcache.entry")
                })
                .unwrap_or_else(|| panic!("{kind}: no CRC attribute"));
                assert!(
                    crc < fsync_file,
                    "{kind}: attributes set after the data fsync"
                );
            }
        }
        eprintln!("{kind}: write@{last_write} < fsync(file)@{fsync_file} < rename@{rename} < fsync(dir)@{fsync_dir}");
        assert_eq!(f.get(&id("x")).unwrap(), bytes(7, 1 << 20));
    }
}

/// The same commit with group durability (the default): no `fsync` of the
/// file or the directory on the committing path; the checkpoint (here the
/// last one, as the cache closes) makes it durable with one `syncfs` after
/// the rename, and only then records the watermark, itself durably.
#[test]
fn group_commit_syncs_once_per_checkpoint_then_records_the_watermark() {
    if !have_strace() {
        return;
    }
    for &kind in Store::all() {
        let f = Fixture::new(kind);
        let out = tempfile::NamedTempFile::new().unwrap();
        let lines = trace(
            &f,
            "commit",
            &[("IMGCACHE_DURABILITY", "group".as_ref())],
            "openat,flock,linkat,fsync,fdatasync,syncfs,sync,rename,renameat,renameat2,fsetxattr,pwrite64,sendto,sendmsg,write",
            out.path(),
        );
        let base = f.path().display().to_string();
        let incomplete = format!("{base}/incomplete/x");
        let find = |from: usize, what: &dyn Fn(&str) -> bool| find_from(&lines, from, what);
        let (_, file_tag) = placed(&lines, &incomplete, kind.name());
        let rename = find(0, &|l| {
            l.contains("rename")
                && l.contains(&format!("\"{incomplete}\""))
                && l.contains(&format!("\"{base}/x\""))
        })
        .unwrap_or_else(|| panic!("{kind}: never published: {lines:#?}"));
        let synced_one = lines.iter().filter(|l| {
            (l.contains(" fsync(") || l.contains(" fdatasync("))
                && (l.contains(&file_tag)
                    || l.contains(&format!("<{incomplete}>"))
                    || l.contains(&format!("<{base}/x>")))
        });
        assert_eq!(synced_one.count(), 0, "{kind}: the commit synced its file");
        let syncfs = find(rename, &|l| l.contains(" syncfs("))
            .unwrap_or_else(|| panic!("{kind}: no syncfs after the rename: {lines:#?}"));
        let recorded = match kind.name() {
            // Its transaction synced on its own: the journal, then the
            // database.
            "sqlite" => find(syncfs, &|l| {
                (l.contains(" fsync(") || l.contains(" fdatasync("))
                    && l.contains("cache.db-journal>")
            })
            .and_then(|journal| {
                find(journal, &|l| {
                    (l.contains(" fsync(") || l.contains(" fdatasync(")) && l.contains("cache.db>")
                })
            }),
            "centralized_db" => find(syncfs, &|l| {
                (l.contains(" sendto(") || l.contains(" write(") || l.contains(" sendmsg("))
                    && l.contains("socket:[")
            }),
            _ => find(syncfs, &|l| {
                l.contains(" fsetxattr(") && l.contains("user.imgcache.watermark")
            })
            .and_then(|set| {
                find(set, &|l| {
                    l.contains(" fsync(") && l.contains(&format!("<{base}>)"))
                })
            }),
        }
        .unwrap_or_else(|| panic!("{kind}: no durable watermark after the syncfs: {lines:#?}"));
        eprintln!("{kind}: rename@{rename} < syncfs@{syncfs} < watermark recorded@{recorded}, no fsync of the image");
        assert_eq!(f.get(&id("x")).unwrap(), bytes(7, 1 << 20));
    }
}

/// Hits on the xattr store are batched: 3000 reads of one image make a few
/// attribute calls and locks in all (one read of the entry, then one
/// locked add a second, and one at the end), not several per read; and
/// every hit is counted.
#[test]
fn xattr_hits_are_batched() {
    if !have_strace() {
        return;
    }
    let f = Fixture::new(Store::XATTR);
    f.put("x", &bytes(1, 4096));
    let out = tempfile::NamedTempFile::new().unwrap();
    let lines = trace(
        &f,
        "read 3000",
        &[],
        "fgetxattr,fsetxattr,getxattr,setxattr,lgetxattr,lsetxattr,flock",
        out.path(),
    );
    let on_x = |l: &&String| l.contains(&format!("{}/x", f.path().display()));
    let calls = lines.iter().filter(on_x).count();
    let sets = lines
        .iter()
        .filter(on_x)
        .filter(|l| l.contains("setxattr("))
        .count();
    eprintln!("xattr: 3000 reads made {calls} attribute calls and locks on the file, {sets} of them writes");
    // A locked add (two writes) a second, and one when the child closes.
    assert!(sets <= 2 * 4, "{sets} attribute writes: {lines:#?}");
    assert!(calls <= 200, "{calls} calls");
    assert_eq!(f.cache.hit_count(&id("x")).unwrap(), 3000);
}
