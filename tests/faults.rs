//! Recovery at open, and bad input and faults: each answered with a typed
//! error that says what and where, and nothing else lost.

mod common;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use ::xattr::FileExt;
use common::{bytes, id, Fixture, Mount};
use imgcache::testing::Store;
use imgcache::{CacheOptions, Error, ImageCache, Verification};

for_each_driver!(
    recovery_of_a_clean_cache_is_clean,
    recovery_adopts_files_without_metadata,
    files_without_metadata_after_the_last_checkpoint_are_not_adopted,
    the_base_directory_holds_only_images,
    a_corrupt_hit_reports_the_corruption_even_if_it_cannot_be_moved_aside,
    a_file_renamed_in_after_the_checkpoint_is_not_adopted,
    an_earlier_watermark_file_is_moved_with_its_session_mark,
    recovery_reports_stalled_but_not_live_writers,
    scrub_detects_a_file_overwritten_in_place,
    scrub_verifies_adopted_files,
    corrupt_metadata_is_quarantined_at_open,
    disk_full_fails_the_write_and_keeps_everything_else,
    permission_denied_names_the_directory,
    clock_jumping_backwards_breaks_nothing,
);

fn recovery_of_a_clean_cache_is_clean(kind: Store) {
    let f = Fixture::new(kind);
    f.put("a", b"1");
    f.cache.queue_image(&id("q")).unwrap();
    let again = f.reopen();
    assert!(again.recovery().is_clean(), "{:?}", again.recovery());
    assert!(again.recovery().stalled.is_empty());
}

fn recovery_adopts_files_without_metadata(kind: Store) {
    let f = Fixture::new(kind);
    f.put("known", b"k");
    // A file that appeared without metadata: for sqlite, a crash between
    // the rename and the row insert; for both, another tool's file.
    fs::write(f.path().join("orphan"), bytes(3, 5000)).unwrap();
    common::written_an_hour_ago(&f.path().join("orphan"));
    let again = f.reopen();
    assert_eq!(again.recovery().adopted, vec![id("orphan")]);
    let info = again.cached_image(&id("orphan")).unwrap().unwrap();
    assert_eq!(info.size, 5000);
    assert_eq!(info.crc32, None, "unverified until scrubbed");
    assert_eq!(again.cache_size().unwrap(), 5001);
    assert_eq!(
        again
            .open_for_read(&id("orphan"))
            .unwrap()
            .unwrap()
            .read_all()
            .unwrap(),
        bytes(3, 5000)
    );
    // Adoption happens once.
    assert!(f.reopen().recovery().adopted.is_empty());
}

fn files_without_metadata_after_the_last_checkpoint_are_not_adopted(kind: Store) {
    let dir = tempfile::tempdir().unwrap();
    let cache = kind.open(CacheOptions::new(dir.path())).unwrap();
    assert!(cache.cache_image_file(&id("known"), &b"k"[..]).unwrap());
    drop(cache);
    // After the last checkpoint (the clean close's), a file without
    // metadata appears, and the session never closes (a crash, a power
    // cut), as the watermark file then says: this may be a torn commit,
    // with nothing to check it by.
    fs::write(dir.path().join("late"), bytes(5, 4000)).unwrap();
    fs::write(dir.path().join(".imgcache/watermark"), b"dirty").unwrap();
    let again = kind.open(CacheOptions::new(dir.path())).unwrap();
    let r = again.recovery();
    assert!(r.unclean_shutdown, "{r:?}");
    assert_eq!(r.torn, vec![id("late")], "{r:?}");
    assert!(r.adopted.is_empty(), "{r:?}");
    assert!(again.open_for_read(&id("late")).unwrap().is_none());
    assert!(dir.path().join("invalid/late").exists());
    let invalid = again.invalid_images().unwrap();
    assert!(
        invalid[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("after the last checkpoint")),
        "{invalid:?}"
    );
    // What the checkpoint covered is kept as it was.
    assert_eq!(
        again
            .open_for_read(&id("known"))
            .unwrap()
            .unwrap()
            .read_all()
            .unwrap(),
        b"k"
    );
    drop(again);
    // After a clean close, a file another tool puts there is adopted.
    fs::write(dir.path().join("foreign"), bytes(6, 3000)).unwrap();
    let third = kind.open(CacheOptions::new(dir.path())).unwrap();
    assert!(!third.recovery().unclean_shutdown);
    assert_eq!(third.recovery().adopted, vec![id("foreign")]);
}

/// A hit on a file whose size is not what was committed is a
/// [`Error::Corrupt`] — a fault of the cache, which an embedding server
/// answers from the origin — even when the file cannot be moved to
/// `invalid/` (here `invalid` is a file, not a folder): the failure to
/// quarantine goes to the log, never in place of the corruption.
fn a_corrupt_hit_reports_the_corruption_even_if_it_cannot_be_moved_aside(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(3, 10_000));
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.path().join("x"))
        .unwrap();
    file.set_len(5_000).unwrap();
    fs::remove_dir_all(f.path().join("invalid")).unwrap();
    fs::write(f.path().join("invalid"), b"not a folder").unwrap();
    let err = f.cache.open_for_read(&x).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(err.is_cache_fault(), "{err:?}");
    // Still in place, and still refused.
    assert!(f.path().join("x").exists());
    assert!(matches!(
        f.cache.open_for_read(&x),
        Err(Error::Corrupt { .. })
    ));
    assert!(!Error::OriginNotFound {
        id: x.clone(),
        origin: "here".into()
    }
    .is_cache_fault());
}

/// Glance's drivers take every regular file in the base directory (but
/// their database) for an image: its size counts, its listing reads its
/// attributes, `delete_all` deletes and counts it. So nothing of the
/// cache's own is one, whatever it did (commits, checkpoints, a clean
/// close, a reopen).
fn the_base_directory_holds_only_images(kind: Store) {
    let dir = tempfile::tempdir().unwrap();
    let cache = kind.open(CacheOptions::new(dir.path())).unwrap();
    for n in 0..3 {
        assert!(cache
            .cache_image_file(&id(&format!("img-{n}")), &bytes(n, 1000 + n as usize)[..])
            .unwrap());
    }
    cache.checkpoint().unwrap();
    assert!(cache.open_for_read(&id("img-1")).unwrap().is_some());
    let regular = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // Glance's own database (and SQLite's files beside it while
            // a connection is open).
            .filter(|n| !n.starts_with("cache.db"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(regular(dir.path()), ["img-0", "img-1", "img-2"]);
    drop(cache);
    assert_eq!(regular(dir.path()), ["img-0", "img-1", "img-2"]);
    let again = kind.open(CacheOptions::new(dir.path())).unwrap();
    assert!(again.recovery().is_clean(), "{:?}", again.recovery());
    drop(again);
    assert_eq!(regular(dir.path()), ["img-0", "img-1", "img-2"]);
}

/// A directory an earlier version opened holds `.imgcache-watermark` in
/// the base directory: it is moved into `.imgcache/`, and what it says of
/// the last session (here: it never closed) is kept.
fn an_earlier_watermark_file_is_moved_with_its_session_mark(kind: Store) {
    let dir = tempfile::tempdir().unwrap();
    let cache = kind.open(CacheOptions::new(dir.path())).unwrap();
    assert!(cache.cache_image_file(&id("known"), &b"k"[..]).unwrap());
    drop(cache);
    fs::remove_file(dir.path().join(".imgcache/watermark")).unwrap();
    fs::write(dir.path().join(".imgcache-watermark"), b"dirty").unwrap();
    let again = kind.open(CacheOptions::new(dir.path())).unwrap();
    assert!(again.recovery().unclean_shutdown, "{:?}", again.recovery());
    assert!(!dir.path().join(".imgcache-watermark").exists());
    assert!(dir.path().join(".imgcache/watermark").is_file());
    assert_eq!(again.cached_images().unwrap().len(), 1);
}

fn recovery_reports_stalled_but_not_live_writers(kind: Store) {
    let f = Fixture::new(kind);
    let mut live = f.cache.open_for_write(&id("live")).unwrap();
    live.write_all(b"...").unwrap();
    fs::write(f.path().join("incomplete/dead"), b"left by a crash").unwrap();
    let again = f.reopen();
    assert_eq!(again.recovery().stalled, vec![id("dead")]);
    live.commit().unwrap();
}

fn scrub_detects_a_file_overwritten_in_place(kind: Store) {
    let f = Fixture::new(kind);
    let x = f.put("x", &bytes(1, 100_000));
    f.put("y", &bytes(2, 100_000));
    assert_eq!(f.cache.verify(&x).unwrap(), Some(Verification::Intact));
    // Same size, other bytes: only the CRC can tell.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(f.path().join("x"))
        .unwrap();
    file.write_all(b"overwritten behind the cache's back")
        .unwrap();
    drop(file);
    match f.cache.verify(&x).unwrap() {
        Some(Verification::Corrupt { detail }) => assert!(detail.contains("CRC-32"), "{detail}"),
        other => panic!("expected corrupt, got {other:?}"),
    }
    let report = f.cache.scrub().unwrap();
    assert_eq!(report.intact, 1);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].0, x);
    assert!(!f.cache.is_cached(&x).unwrap());
    let invalid = f.cache.invalid_images().unwrap();
    assert!(invalid[0].reason.as_deref().unwrap().contains("CRC-32"));
    assert_eq!(f.get(&id("y")).unwrap(), bytes(2, 100_000));
    assert_eq!(f.cache.verify(&x).unwrap(), None);
}

fn scrub_verifies_adopted_files(kind: Store) {
    let f = Fixture::new(kind);
    fs::write(f.path().join("foreign"), bytes(4, 3000)).unwrap();
    common::written_an_hour_ago(&f.path().join("foreign"));
    let again = f.reopen();
    let foreign = id("foreign");
    assert_eq!(
        again.verify(&foreign).unwrap(),
        Some(Verification::Unverified {
            crc32: crc32fast::hash(&bytes(4, 3000))
        })
    );
    let report = again.scrub().unwrap();
    assert_eq!(report.newly_verified, vec![foreign.clone()]);
    assert_eq!(again.verify(&foreign).unwrap(), Some(Verification::Intact));
    assert_eq!(again.scrub().unwrap().intact, 1);
}

fn corrupt_metadata_is_quarantined_at_open(kind: Store) {
    let f = Fixture::new(kind);
    f.put("good", b"good");
    f.put("bad", b"bad");
    // Their entries written (a commit with group durability holds its row).
    f.cache.flush().unwrap();
    match kind.name() {
        "sqlite" => {
            let db = rusqlite::Connection::open(f.path().join("cache.db")).unwrap();
            db.execute(
                "UPDATE cached_images SET size = -5 WHERE image_id = 'bad'",
                [],
            )
            .unwrap();
            // A row whose id is no safe file name never reaches the disk.
            db.execute(
                "INSERT INTO cached_images (image_id, size) VALUES ('../../etc/passwd', 'x')",
                [],
            )
            .unwrap();
        }
        "centralized_db" => {
            let cluster = imgcache::testing::postgres::cluster().unwrap();
            let node = imgcache::testing::postgres::node_for(f.path());
            let mut db = postgres::Client::connect(cluster.url(), postgres::NoTls).unwrap();
            let n = db
                .execute(
                    "UPDATE cached_images SET size = -5 WHERE image_id = 'bad' AND node_reference_id =
                     (SELECT node_reference_id FROM node_reference WHERE node_reference_url = $1)",
                    &[&node],
                )
                .unwrap();
            assert_eq!(n, 1);
            // A row whose id is no safe file name never reaches the disk.
            db.execute(
                "INSERT INTO cached_images
                 (image_id, size, hits, last_accessed, last_modified, node_reference_id)
                 SELECT '../../etc/passwd', 1, 0, now(), now(), node_reference_id
                 FROM node_reference WHERE node_reference_url = $1",
                &[&node],
            )
            .unwrap();
        }
        _ => {
            let file = fs::File::open(f.path().join("bad")).unwrap();
            file.set_xattr("user.imgcache.entry", b"1700000000.5 3 not-hex! -")
                .unwrap();
        }
    }
    let again = f.reopen();
    assert_eq!(again.recovery().quarantined, vec![id("bad")]);
    assert!(!again.is_cached(&id("bad")).unwrap());
    assert!(f.path().join("invalid/bad").exists());
    let reason = again.invalid_images().unwrap()[0].reason.clone().unwrap();
    assert!(reason.starts_with("corrupt metadata"), "{reason}");
    assert_eq!(f.get(&id("good")).unwrap(), b"good");
    assert_eq!(again.cached_images().unwrap().len(), 1);
}

fn disk_full_fails_the_write_and_keeps_everything_else(kind: Store) {
    let Some(mount) = Mount::new("tmpfs", "size=1m") else {
        return;
    };
    let dir = mount.path.join("cache");
    let cache = kind.open(CacheOptions::new(&dir)).unwrap();
    let keep = id("keep");
    assert!(cache
        .cache_image_file(&keep, &bytes(1, 100_000)[..])
        .unwrap());
    let big = id("big");
    let err = cache
        .cache_image_file(&big, &bytes(2, 4 << 20)[..])
        .unwrap_err();
    assert_eq!(err.io_kind(), Some(io::ErrorKind::StorageFull), "{err}");
    assert!(err.to_string().contains("big"), "{err}");
    assert!(!cache.is_cached(&big).unwrap());
    assert!(!cache.is_being_cached(&big).unwrap());
    // What was cached before is intact, and the space comes back.
    assert_eq!(cache.verify(&keep).unwrap(), Some(Verification::Intact));
    assert!(cache.clean(None).unwrap().bytes() > 0);
    assert!(cache
        .cache_image_file(&id("small"), &bytes(3, 100_000)[..])
        .unwrap());
    drop(cache);
    drop(mount);
}

fn permission_denied_names_the_directory(kind: Store) {
    // Root passes permission checks, so the attempt is made by a child
    // process running as nobody.
    let is_root = nix_uid_is_root();
    let have_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !is_root || !have_setpriv {
        assert!(std::env::var_os("IMGCACHE_REQUIRE_MOUNTS").is_none());
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let outer = tempfile::tempdir().unwrap();
    fs::set_permissions(outer.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = outer.path().join("cache");
    kind.open(CacheOptions::new(&dir)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "open_child",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env("IMGCACHE_CHILD", "open")
        .env("IMGCACHE_DIR", &dir)
        .env("IMGCACHE_DRIVER", kind.name())
        .envs(kind.child_env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("child printed no error: {stdout}"));
    assert!(line.contains("PermissionDenied"), "{line}");
    assert!(line.contains(&dir.display().to_string()), "{line}");
}

/// The child of `permission_denied_names_the_directory`: tries to open the
/// cache and prints the error's kind and message.
#[test]
fn open_child() {
    if std::env::var("IMGCACHE_CHILD").as_deref() != Ok("open") {
        return;
    }
    let dir = std::env::var("IMGCACHE_DIR").unwrap();
    match common::child_store().open(CacheOptions::new(&dir)) {
        Ok(_) => println!("opened"),
        Err(e) => println!("error: {:?} {e}", e.io_kind()),
    }
}

fn nix_uid_is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn clock_jumping_backwards_breaks_nothing(kind: Store) {
    let f = Fixture::new(kind);
    let a = f.put("a", b"a");
    f.cache.queue_image(&id("q1")).unwrap();
    f.clock.rewind(Duration::from_secs(3600));
    let b = f.put("b", b"b");
    f.cache.queue_image(&id("q2")).unwrap();
    assert_eq!(f.get(&a).unwrap(), b"a");
    assert_eq!(f.cache.hit_count(&a).unwrap(), 1);
    // The queue keeps the order things were queued in, whatever the clock.
    assert_eq!(f.cache.queued_images().unwrap(), vec![id("q1"), id("q2")]);
    // LRU follows the recorded times: b and a were touched "an hour ago".
    let lru: Vec<_> = f
        .cache
        .least_recently_accessed()
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(lru, vec![a.clone(), b.clone()]);
    f.cache.prune_to(1).unwrap();
    assert!(f.cache.is_cached(&b).unwrap());
}

#[test]
fn garbage_database_is_refused_by_name_then_rebuilt() {
    let f = Fixture::new(Store::SQLITE);
    let x = f.put("x", &bytes(5, 2000));
    f.get(&x).unwrap();
    let Fixture {
        dir, clock, cache, ..
    } = f;
    drop(cache);
    let path = dir.path();
    let db = path.join("cache.db");
    let _ = fs::remove_file(path.join("cache.db-wal"));
    let _ = fs::remove_file(path.join("cache.db-shm"));
    fs::write(&db, bytes(9, 8192)).unwrap();
    let options = || CacheOptions::new(path).clock(std::sync::Arc::new(clock.clone()));
    match options().open() {
        Err(e @ Error::BadDatabase { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&db.display().to_string()), "{msg}");
            assert!(msg.contains("rebuild"), "{msg}");
        }
        other => panic!("expected BadDatabase, got {other:?}"),
    }
    // The bytes are untouched by the refusal.
    assert_eq!(fs::read(&db).unwrap(), bytes(9, 8192));
    let cache = ImageCache::rebuild(options()).unwrap();
    assert_eq!(cache.recovery().adopted, vec![x.clone()]);
    assert_eq!(
        cache.verify(&x).unwrap(),
        Some(Verification::Unverified {
            crc32: crc32fast::hash(&bytes(5, 2000))
        })
    );
    // Aside in the private folder, not in the base directory (where
    // Glance would take it for an image).
    let aside: Vec<String> = fs::read_dir(path.join(".imgcache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("broken-") && n.ends_with("-cache.db"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read(path.join(".imgcache").join(&aside[0])).unwrap(),
        bytes(9, 8192)
    );
}

#[test]
fn foreign_schema_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cache.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE cached_images (id INTEGER PRIMARY KEY, body BLOB);")
        .unwrap();
    match CacheOptions::new(dir.path()).open() {
        Err(Error::BadDatabase { path, detail }) => {
            assert_eq!(path, db);
            assert!(detail.contains("no column"), "{detail}");
        }
        other => panic!("expected BadDatabase, got {other:?}"),
    }
}

#[test]
fn empty_database_file_is_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("cache.db"), b"").unwrap();
    fs::write(dir.path().join("img"), b"abc").unwrap();
    let cache = CacheOptions::new(dir.path()).open().unwrap();
    assert_eq!(cache.recovery().adopted, vec![id("img")]);
}

#[test]
fn sqlite_row_without_file_is_dropped() {
    let f = Fixture::new(Store::SQLITE);
    let x = f.put("x", b"gone soon");
    f.put("y", b"stays");
    // The rows written (a commit with group durability holds its row; one
    // whose file is gone by then is never written).
    f.cache.flush().unwrap();
    fs::remove_file(f.path().join("x")).unwrap();
    let again = f.reopen();
    assert_eq!(again.recovery().dropped, vec![x.clone()]);
    assert!(!again.is_cached(&x).unwrap());
    assert_eq!(again.cache_size().unwrap(), 5);
}

/// A SQLite store opened by hand on a database name the options do not
/// give: the cache still never takes the database (or its side files) for
/// images, so recovery does not adopt them and a prune to zero keeps them.
#[test]
fn a_store_opened_by_hand_keeps_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.db");
    let store = std::sync::Arc::new(imgcache::drivers::SqliteDriver::open(&db).unwrap());
    let cache = ImageCache::with_driver(store, CacheOptions::new(dir.path())).unwrap();
    cache.cache_image_file(&id("img"), &b"bytes"[..]).unwrap();
    drop(cache);
    let store = std::sync::Arc::new(imgcache::drivers::SqliteDriver::open(&db).unwrap());
    let cache = ImageCache::with_driver(store, CacheOptions::new(dir.path())).unwrap();
    assert!(cache.recovery().is_clean(), "{:?}", cache.recovery());
    let ids: Vec<String> = cache
        .cached_images()
        .unwrap()
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, ["img"]);
    assert!(matches!(
        cache.delete_cached_image(&id("meta.db")),
        Err(Error::InvalidId { .. })
    ));
    cache.prune_to(0).unwrap();
    cache.delete_all_cached_images().unwrap();
    assert!(db.is_file(), "the store's database was deleted");
    assert_eq!(cache.cache_size().unwrap(), 0);
}

/// The child of the test below: opens the cache on the store named by the
/// environment, writes a file beside the cache's images, checkpoints, then
/// renames the file into place (after the watermark) and waits to be
/// killed.
#[test]
fn child() {
    let Ok(cmd) = std::env::var("IMGCACHE_CHILD") else {
        return;
    };
    if cmd != "staged" {
        return;
    }
    let dir = std::env::var("IMGCACHE_DIR").unwrap();
    let cache = common::child_store().open(CacheOptions::new(&dir)).unwrap();
    let staged = std::path::Path::new(&dir).join("incomplete/staged-by-hand");
    fs::write(&staged, bytes(11, 50_000)).unwrap();
    cache.checkpoint().unwrap();
    fs::rename(&staged, std::path::Path::new(&dir).join("late")).unwrap();
    println!("done");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::thread::sleep(Duration::from_secs(3600));
}

/// A file whose bytes were written before a checkpoint but renamed into
/// place after it, with no metadata, is not trusted after a power cut: a
/// write stamps the modification time when it starts, so its last bytes
/// may have landed after the sync. Its change time (the rename) says it
/// came after. After a crash of the process alone (the machine stayed up:
/// the page cache kept its bytes) it is whole, and adopted.
fn a_file_renamed_in_after_the_checkpoint_is_not_adopted(kind: Store) {
    for machine_went_down in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let again = renamed_in_after_the_checkpoint(kind, dir.path(), machine_went_down);
        let r = again.recovery();
        assert!(r.unclean_shutdown, "{r:?}");
        if machine_went_down {
            assert_eq!(r.torn, vec![id("late")], "{r:?}");
            assert!(again.open_for_read(&id("late")).unwrap().is_none());
        } else {
            assert!(r.torn.is_empty(), "{r:?}");
            assert_eq!(r.adopted, vec![id("late")], "{r:?}");
            let mut img = again.open_for_read(&id("late")).unwrap().unwrap();
            assert_eq!(img.read_all().unwrap(), bytes(11, 50_000));
        }
    }
}

/// The child's `staged` run in `dir`, killed; the cache reopened (after
/// the session mark is made to look like a power cut's, if asked).
fn renamed_in_after_the_checkpoint(
    kind: Store,
    dir: &std::path::Path,
    machine_went_down: bool,
) -> ImageCache {
    use std::io::BufRead;
    drop(kind.open(CacheOptions::new(dir)).unwrap());
    let mut child = common::child_command(kind, dir, "staged")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "done" {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child ended early"
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    if machine_went_down {
        common::as_if_the_machine_went_down(dir);
    }
    kind.open(CacheOptions::new(dir)).unwrap()
}
