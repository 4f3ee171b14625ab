//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use imgcache::clock::ManualClock;
use imgcache::testing::Store;
use imgcache::{CacheOptions, ImageCache, ImageId};

/// A cache in a fresh temporary directory, on one store of the conformance
/// kit, with a manual clock that starts at the real time (so that file
/// mtimes and the clock agree).
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub cache: ImageCache,
    pub kind: Store,
}

impl Fixture {
    pub fn new(kind: Store) -> Self {
        Self::with(kind, |o| o)
    }

    pub fn with(kind: Store, f: impl FnOnce(CacheOptions) -> CacheOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(SystemTime::now());
        let options = f(CacheOptions::new(dir.path()).clock(Arc::new(clock.clone())));
        let cache = kind.open(options).expect("open cache");
        Fixture {
            dir,
            clock,
            cache,
            kind,
        }
    }

    /// Opens another handle on the same directory (as another server
    /// process would), once this one's held metadata is written: entries
    /// of commits and hits, which stores batch (another process sees them
    /// within a second; `another_handle_sees_commits_at_once` tests the
    /// moment before).
    pub fn reopen(&self) -> ImageCache {
        self.cache.flush().expect("flush before reopening");
        self.kind
            .open(CacheOptions::new(self.dir.path()).clock(Arc::new(self.clock.clone())))
            .expect("reopen cache")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Caches `id` with `data` and returns the id.
    pub fn put(&self, id: &str, data: &[u8]) -> ImageId {
        let id = ImageId::new(id).expect("valid id");
        assert!(self.cache.cache_image_file(&id, data).expect("cache"));
        id
    }

    /// Reads `id` through the cache (a hit).
    pub fn get(&self, id: &ImageId) -> Option<Vec<u8>> {
        self.cache
            .open_for_read(id)
            .expect("open_for_read")
            .map(|mut img| img.read_all().expect("read"))
    }

    pub fn tick(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

/// In a test binary re-run as a child process: the command from
/// `IMGCACHE_CHILD` and the cache named by `IMGCACHE_DIR` on the store
/// named by `IMGCACHE_DRIVER`; `None` in an ordinary test run.
pub fn child_cache() -> Option<(String, ImageCache)> {
    let cmd = std::env::var("IMGCACHE_CHILD").ok()?;
    let dir = std::env::var("IMGCACHE_DIR").expect("IMGCACHE_DIR");
    let cache = child_store()
        .open(CacheOptions::new(dir).durability(child_durability()))
        .expect("open cache in child");
    Some((cmd, cache))
}

/// The durability named by `IMGCACHE_DURABILITY` (`immediate`, or the
/// default), in a child process.
pub fn child_durability() -> imgcache::Durability {
    match std::env::var("IMGCACHE_DURABILITY").as_deref() {
        Ok("immediate") => imgcache::Durability::Immediate,
        Ok("group") | Err(_) => imgcache::Durability::default(),
        Ok(other) => panic!("IMGCACHE_DURABILITY={other:?}: immediate or group"),
    }
}

/// The store named by `IMGCACHE_DRIVER`, in a child process.
pub fn child_store() -> Store {
    let name = std::env::var("IMGCACHE_DRIVER").expect("IMGCACHE_DRIVER");
    Store::by_name(&name).unwrap_or_else(|| panic!("no store named {name:?}"))
}

pub fn id(s: &str) -> ImageId {
    ImageId::new(s).expect("valid id")
}

/// Deterministic pseudo-random bytes (the generator the model uses).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    imgcache::testing::content(seed, len)
}

/// Reads lines from a child's output until one equals `want`; fails if the
/// child ends first.
pub fn wait_for_line(reader: &mut impl std::io::BufRead, want: &str) {
    let mut line = String::new();
    while line.trim() != want {
        line.clear();
        let n = reader.read_line(&mut line).expect("read child output");
        assert!(n > 0, "the child exited before printing {want:?}");
    }
}

/// Runs each case against every store of the conformance kit, one test
/// module per store; a failure names the store. A new store joins every
/// suite by one line here (and one in `Store::all`). A store that cannot be
/// had here (no PostgreSQL server) skips with a message, unless
/// `IMGCACHE_REQUIRE_POSTGRES` is set.
#[macro_export]
macro_rules! for_each_driver {
    ($($name:ident),* $(,)?) => {
        $crate::store_suite!(sqlite, Some(imgcache::testing::Store::SQLITE); $($name),*);
        $crate::store_suite!(xattr, Some(imgcache::testing::Store::XATTR); $($name),*);
        $crate::store_suite!(centralized_db, imgcache::testing::Store::centralized_db(); $($name),*);
    };
}

/// One store's module of a suite.
#[macro_export]
macro_rules! store_suite {
    ($module:ident, $store:expr; $($name:ident),*) => {
        mod $module {
            $(#[test] fn $name() {
                if let Some(store) = $store {
                    super::$name(store)
                }
            })*
        }
    };
}

/// A file system mounted on a temporary directory for one test, unmounted
/// on drop. Mounting needs root: elsewhere `mount` returns `None` after
/// saying so, unless `IMGCACHE_REQUIRE_MOUNTS` is set (as `.ci/run` does
/// when root), where it fails the test.
pub struct Mount {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl Mount {
    /// `mount -t <fstype> -o <options> <fstype> <tempdir>`.
    pub fn new(fstype: &str, options: &str) -> Option<Mount> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().to_path_buf();
        let mut cmd = std::process::Command::new("mount");
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        let ok = cmd
            .arg(fstype)
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(Mount { _dir: dir, path });
        }
        assert!(
            std::env::var_os("IMGCACHE_REQUIRE_MOUNTS").is_none(),
            "IMGCACHE_REQUIRE_MOUNTS is set but {fstype} cannot be mounted"
        );
        eprintln!("skipped: cannot mount {fstype} here (needs root)");
        None
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// A small deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// This test binary, to be run as a child that opens the cache in `dir`
/// on `kind` and runs `cmd` (its `child` test reads `IMGCACHE_CHILD`).
pub fn child_command(kind: Store, dir: &Path, cmd: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().expect("test binary"));
    c.args([
        "--exact",
        "child",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ])
    .env("IMGCACHE_CHILD", cmd)
    .env("IMGCACHE_DIR", dir)
    .env("IMGCACHE_DRIVER", kind.name())
    .envs(kind.child_env());
    c
}

/// Sets `path`'s modification time an hour back: a file another tool put
/// there a while ago (a file written lately while other processes have
/// the cache open is left to its committer, whose entry may be held).
pub fn written_an_hour_ago(path: &Path) {
    let ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(ago))
        .expect("set the modification time");
}

/// Makes the unclean session left in cache `dir` look as a power cut
/// leaves it: its mark names another boot of the machine (a session ended
/// by process crashes in this boot trusts the page cache to have kept what
/// they wrote; one the machine went down in trusts nothing the watermark
/// does not cover).
pub fn as_if_the_machine_went_down(dir: &Path) {
    let mark = dir.join(".imgcache/watermark");
    let was = std::fs::read(&mark).expect("read the session mark");
    assert!(was.starts_with(b"dirty"), "not an unclean session: {was:?}");
    std::fs::write(&mark, b"dirty 00000000-0000-0000-0000-000000000000")
        .expect("write the session mark");
}
