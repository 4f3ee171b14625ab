//! The open-file cache: descriptors of hot cached files kept open, so that
//! a hit costs no `open(2)` — nginx's `open_file_cache`, without its
//! window of staleness.
//!
//! nginx trusts a kept descriptor for `open_file_cache_valid` seconds. This
//! cache trusts one only while the file is provably still the cached file
//! at its path, checked at every hit with one `fstat(2)` of the descriptor
//! (no path lookup):
//!
//! - a file unlinked (deleted, pruned, replaced by a rename over it) has
//!   no links left;
//! - a file changed in place (written or truncated behind the cache's
//!   back) has another size or modification time;
//! - a file renamed away (quarantined to `invalid/`) keeps its links, but
//!   a rename sets its change time (`ctime`), as does every change of its
//!   links or attributes. While the change time is the one seen when the
//!   path was last confirmed to name this inode, nothing has moved it.
//!
//! A change time can fail to move only within one tick of the kernel's
//! coarse clock. So the path is confirmed (`lstat(2)` of it: same device
//! and inode) whenever the change time differs from the one recorded, and
//! a change time is trusted alone only once it is older than [`SETTLE`]
//! when the path was confirmed: any later change is stamped with a later
//! time. A file whose change time keeps moving (the xattr store writes its
//! hit counts on the file) costs that `lstat` on a hit: still no `open`.
//!
//! Every change the cache makes itself (delete, prune, quarantine, a
//! commit) forgets the id at once ([`OpenFiles::forget`]); the checks above
//! are for other processes (another `imgcache`, Glance itself). A hit that
//! raced with a forget (opened the file before it moved) is not kept
//! ([`OpenFiles::epoch`]).
//!
//! Bounds: at most `capacity` descriptors; the least recently used goes
//! when a new one comes; a sweep (at most once a [`SWEEP_EVERY`], from a
//! hit or a job) closes those of files gone behind the cache's back, whose
//! blocks a kept descriptor would otherwise hold, and those idle for
//! [`INACTIVE`].

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::entry::CachedImageInfo;
use crate::id::ImageId;

/// How old a change time must be, when the path was confirmed, to be
/// trusted alone: well over one tick of the coarse clock file times are
/// stamped with (at most 10 ms).
pub(crate) const SETTLE: Duration = Duration::from_millis(50);

/// The same, on a file system that stamps whole seconds (a file whose
/// times have no nanoseconds: ext4 with small inodes, ext3, some network
/// file systems).
pub(crate) const SETTLE_COARSE: Duration = Duration::from_secs(2);

/// A descriptor not used for this long is closed at the next sweep.
pub(crate) const INACTIVE: Duration = Duration::from_secs(60);

/// Sweeps run at most this often.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Bit 63 of a recorded change time: trusted alone.
const SETTLED: u64 = 1 << 63;

/// The kept descriptors, by id.
#[derive(Debug)]
pub(crate) struct OpenFiles {
    capacity: usize,
    map: RwLock<HashMap<ImageId, Arc<OpenFile>>>,
    /// Moves at every forget: a hit whose open began before a forget does
    /// not keep what it opened.
    epoch: AtomicU64,
    /// [`coarse_ms`] when made.
    start: u64,
    /// Entries kept so far.
    kept: AtomicU64,
    /// When the next sweep is due (ms since `start`).
    next_sweep: AtomicU64,
    sweeping: Mutex<()>,
    /// Descriptors dropped where they must not be closed (a runtime's
    /// thread), closed by the next keep or sweep.
    graveyard: Mutex<Vec<Arc<OpenFile>>>,
}

/// One kept descriptor, with what was true of its file when kept.
#[derive(Debug)]
pub(crate) struct OpenFile {
    pub(crate) file: Arc<File>,
    pub(crate) path: Arc<Path>,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    /// The change time (ns since the epoch) when the path was last
    /// confirmed; [`SETTLED`] set once it is trusted alone.
    ctime: AtomicU64,
    /// The entry the store returned when the file was kept.
    info: CachedImageInfo,
    /// Hits served from this entry since.
    since: AtomicU64,
    /// Last use, in ms since the cache's `start`.
    used: AtomicU64,
    /// The order it was kept in: of two used in the same ms, the one kept
    /// first goes first.
    seq: u64,
}

impl OpenFile {
    /// Sets `info` (the entry the store returned for this hit) to this
    /// hit's counts: the hits of the entry kept, with those served from it
    /// since (this one included), and `at` as last access.
    pub(crate) fn count_into(&self, info: &mut CachedImageInfo, at: SystemTime) {
        info.hits = self.info.hits + self.since.fetch_add(1, Ordering::Relaxed) + 1;
        info.last_accessed = at;
    }

    /// The entry the store returned when this file was kept.
    pub(crate) fn known(&self) -> &CachedImageInfo {
        &self.info
    }

    /// The file's metadata if it is still the cached file at its path;
    /// `confirm` asks the path whatever the change time says.
    fn check(&self, confirm: bool) -> Option<Metadata> {
        let m = self.file.metadata().ok()?;
        if m.nlink() == 0
            || m.dev() != self.dev
            || m.ino() != self.ino
            || m.size() != self.size
            || (m.mtime(), m.mtime_nsec()) != self.mtime
        {
            return None;
        }
        let c = ctime_ns(&m);
        if !confirm && self.ctime.load(Ordering::Acquire) == c | SETTLED {
            return Some(m);
        }
        // The change time moved, or is too recent to trust: does the path
        // still name this inode? The clock is read first: a change after
        // the lookup is stamped later than that.
        let asked = now_ns();
        let p = std::fs::symlink_metadata(&self.path).ok()?;
        if p.dev() != self.dev || p.ino() != self.ino {
            return None;
        }
        self.ctime.store(stamp(&m, asked), Ordering::Release);
        Some(m)
    }
}

impl OpenFiles {
    /// Keeps at most `capacity` descriptors; 0 keeps none.
    pub(crate) fn new(capacity: usize) -> Self {
        OpenFiles {
            capacity,
            map: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            start: coarse_ms(),
            next_sweep: AtomicU64::new(0),
            sweeping: Mutex::new(()),
            graveyard: Mutex::new(Vec::new()),
        }
    }

    /// How many it keeps now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Read before opening a file to keep; see [`OpenFiles::keep`].
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.start)
    }

    /// The kept descriptor of `id` and its file's metadata now, if it is
    /// still the cached file; a stale one is dropped. On a thread that may
    /// block (`may_block`), a sweep runs when due and dropped descriptors
    /// are closed; elsewhere (a runtime's thread) they wait for that (the
    /// last close of a large deleted file frees its blocks, which takes
    /// time), and [`OpenFiles::sweep_due`] says when to run one.
    pub(crate) fn get(&self, id: &ImageId, may_block: bool) -> Option<(Arc<OpenFile>, Metadata)> {
        if self.capacity == 0 {
            return None;
        }
        // One clock read: a hit reads it, and each read shows.
        let now = self.now_ms();
        if may_block && self.sweep_due_at(now) {
            self.sweep();
        }
        let entry = self.map.read().get(id).cloned()?;
        match entry.check(false) {
            Some(meta) => {
                if entry.used.load(Ordering::Relaxed) != now {
                    entry.used.store(now, Ordering::Relaxed);
                }
                Some((entry, meta))
            }
            None => {
                if let Some(gone) = self.take_if_same(id, &entry) {
                    drop(entry);
                    if may_block {
                        drop(gone);
                    } else {
                        self.graveyard.lock().push(gone);
                    }
                }
                None
            }
        }
    }

    /// Whether a sweep is due.
    #[cfg(feature = "tokio")]
    pub(crate) fn sweep_due(&self) -> bool {
        self.sweep_due_at(self.now_ms())
    }

    fn sweep_due_at(&self, now_ms: u64) -> bool {
        self.capacity > 0 && now_ms >= self.next_sweep.load(Ordering::Relaxed)
    }

    /// Keeps `file` (opened at `path` after `epoch` and `opened_at` were
    /// read, `meta` its metadata, `info` what the store returned for it)
    /// unless something was forgotten since.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn keep(
        &self,
        id: &ImageId,
        epoch: u64,
        opened_at: u64,
        file: &Arc<File>,
        path: &Arc<Path>,
        meta: &Metadata,
        info: &CachedImageInfo,
    ) {
        if self.capacity == 0 || meta.nlink() == 0 || self.epoch() != epoch {
            return;
        }
        let now = self.now_ms();
        // The open confirmed the path: a change time old enough then is
        // trusted alone from now on.
        let entry = Arc::new(OpenFile {
            file: file.clone(),
            path: path.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: AtomicU64::new(stamp(meta, opened_at)),
            info: info.clone(),
            since: AtomicU64::new(0),
            used: AtomicU64::new(now),
            seq: self.kept.fetch_add(1, Ordering::Relaxed),
        });
        let mut map = self.map.write();
        // One kept already (another hit's, just as good) stays.
        if self.epoch() != epoch || map.contains_key(id) {
            return;
        }
        let mut evicted = None;
        if map.len() >= self.capacity {
            let coldest = map
                .iter()
                .min_by_key(|(_, e)| (e.used.load(Ordering::Relaxed), e.seq))
                .map(|(k, _)| k.clone());
            if let Some(k) = coldest {
                evicted = map.remove(&k);
            }
        }
        map.insert(id.clone(), entry);
        drop(map);
        // Closed outside the lock: hits never wait for a last close.
        drop(evicted);
        self.bury();
    }

    /// Closes the descriptors dropped on threads that must not block.
    fn bury(&self) {
        let gone = std::mem::take(&mut *self.graveyard.lock());
        drop(gone);
    }

    /// Closes the descriptor of `id` (its file was just removed, moved or
    /// replaced by the cache).
    pub(crate) fn forget(&self, id: &ImageId) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.write();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let gone = map.remove(id);
        drop(map);
        drop(gone);
    }

    /// Takes `entry` out if it is still the one kept for `id`.
    fn take_if_same(&self, id: &ImageId, entry: &Arc<OpenFile>) -> Option<Arc<OpenFile>> {
        let mut map = self.map.write();
        if map.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(id)
        } else {
            None
        }
    }

    /// Closes the descriptors of files gone behind the cache's back (each
    /// path asked, so that a change above the file — the base directory
    /// renamed or remounted — is seen too), and those idle for
    /// [`INACTIVE`]. One sweep at a time; a sweep that finds another
    /// running returns at once. May block: not on a runtime's thread.
    pub(crate) fn sweep(&self) {
        if self.capacity == 0 {
            return;
        }
        let Some(_one) = self.sweeping.try_lock() else {
            return;
        };
        let now = self.now_ms();
        self.next_sweep
            .store(now + SWEEP_EVERY.as_millis() as u64, Ordering::Relaxed);
        let entries: Vec<(ImageId, Arc<OpenFile>)> = self
            .map
            .read()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let idle = INACTIVE.as_millis() as u64;
        for (id, entry) in entries {
            let stale = now.saturating_sub(entry.used.load(Ordering::Relaxed)) > idle
                || entry.check(true).is_none();
            if stale {
                let gone = self.take_if_same(&id, &entry);
                drop(entry);
                drop(gone);
            }
        }
        self.bury();
    }
}

/// A file's change time in ns since the epoch (0 before it), in 63 bits.
fn ctime_ns(m: &Metadata) -> u64 {
    let ns = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
    u64::try_from(ns.max(0)).unwrap_or(u64::MAX) & !SETTLED
}

/// The change time of `m` to record, for a path confirmed to name the
/// file at `confirmed` (ns since the epoch, read before the lookup):
/// [`SETTLED`] if it was old enough then that any later change must move
/// it.
fn stamp(m: &Metadata, confirmed: u64) -> u64 {
    let c = ctime_ns(m);
    let coarse = m.ctime_nsec() == 0 && m.mtime_nsec() == 0;
    let settle = if coarse { SETTLE_COARSE } else { SETTLE };
    if confirmed.saturating_sub(c) >= settle.as_nanos() as u64 {
        c | SETTLED
    } else {
        c
    }
}

/// The wall clock in ns since the epoch: file times are stamped by it.
/// Milliseconds on a monotonic clock, for idleness and sweeps. On Linux
/// the coarse clock: a read costs a few nanoseconds where the precise one
/// costs tens (a hit reads it), and its tick (at most 10 ms) is far below
/// the spans it measures (a second, a minute).
fn coarse_ms() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::time::{clock_gettime, ClockId};
        clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000)
        })
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        use std::time::Instant;
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn id(s: &str) -> ImageId {
        ImageId::new(s).unwrap()
    }

    fn info(name: &str, size: u64) -> CachedImageInfo {
        CachedImageInfo::new(id(name), size, SystemTime::now())
    }

    impl OpenFiles {
        fn get_now(&self, id: &ImageId) -> Option<(Arc<OpenFile>, Metadata)> {
            self.get(id, true)
        }
    }

    /// Opens `path` as a hit would, and keeps it.
    fn open_and_keep(open: &OpenFiles, name: &str, path: &Path) -> Arc<File> {
        let epoch = open.epoch();
        let at = now_ns();
        let file = Arc::new(File::open(path).unwrap());
        let meta = file.metadata().unwrap();
        open.keep(
            &id(name),
            epoch,
            at,
            &file,
            &Arc::from(path),
            &meta,
            &info(name, meta.len()),
        );
        file
    }

    /// Lets the files' change times age past [`SETTLE`] (a change time
    /// cannot be set: the clock is what is waited on).
    fn settle() {
        std::thread::sleep(SETTLE + Duration::from_millis(20));
    }

    #[test]
    fn a_kept_file_is_served_until_it_is_removed_behind_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"one").unwrap();
        let open = OpenFiles::new(8);
        open_and_keep(&open, "a", &path);
        let (hot, meta) = open.get_now(&id("a")).expect("kept");
        assert_eq!(meta.len(), 3);
        let mut info = hot.known().clone();
        hot.count_into(&mut info, SystemTime::now());
        assert_eq!(info.hits, 1);
        hot.count_into(&mut info, SystemTime::now());
        assert_eq!(info.hits, 2);
        drop(hot);
        std::fs::remove_file(&path).unwrap();
        assert!(open.get_now(&id("a")).is_none(), "unlinked: no links left");
        assert_eq!(open.len(), 0, "and its descriptor is closed");
    }

    #[test]
    fn a_file_replaced_by_a_rename_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"old").unwrap();
        let open = OpenFiles::new(8);
        open_and_keep(&open, "a", &path);
        std::fs::write(dir.path().join("new"), b"new").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert!(open.get_now(&id("a")).is_none());
    }

    #[test]
    fn a_file_renamed_away_is_not_served_even_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"bytes").unwrap();
        settle();
        let open = OpenFiles::new(8);
        open_and_keep(&open, "a", &path);
        assert!(open.get_now(&id("a")).is_some());
        // Moved aside (a quarantine by another process): its links stay.
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        assert!(open.get_now(&id("a")).is_none());
    }

    #[test]
    fn a_file_renamed_away_within_the_clock_tick_is_not_served() {
        // Kept right after it was written (its change time not settled),
        // then moved at once: the change time may not move, the path is
        // asked.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        for round in 0..50 {
            std::fs::write(&path, b"bytes").unwrap();
            let open = OpenFiles::new(8);
            open_and_keep(&open, "a", &path);
            assert!(open.get_now(&id("a")).is_some());
            std::fs::rename(&path, dir.path().join("aside")).unwrap();
            assert!(open.get_now(&id("a")).is_none(), "round {round}");
        }
    }

    #[test]
    fn a_file_changed_in_place_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"bytes").unwrap();
        let open = OpenFiles::new(8);
        open_and_keep(&open, "a", &path);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2)
            .unwrap();
        assert!(open.get_now(&id("a")).is_none());
    }

    #[test]
    fn a_file_moved_between_the_open_and_the_keep_is_never_trusted_alone() {
        // The clock read before the open decides: a rename just after the
        // open stamps a change time later than that, so however late the
        // keep comes, the path is asked at every hit.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"bytes").unwrap();
        settle();
        let open = OpenFiles::new(8);
        let epoch = open.epoch();
        let at = now_ns();
        let file = Arc::new(File::open(&path).unwrap());
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        let meta = file.metadata().unwrap();
        settle();
        open.keep(
            &id("a"),
            epoch,
            at,
            &file,
            &Arc::from(path.as_path()),
            &meta,
            &info("a", 5),
        );
        assert!(open.get_now(&id("a")).is_none());
    }

    #[test]
    fn a_forget_during_an_open_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"bytes").unwrap();
        let open = OpenFiles::new(8);
        let epoch = open.epoch();
        let file = Arc::new(File::open(&path).unwrap());
        let meta = file.metadata().unwrap();
        open.forget(&id("a"));
        open.keep(
            &id("a"),
            epoch,
            now_ns(),
            &file,
            &Arc::from(path.as_path()),
            &meta,
            &info("a", 5),
        );
        assert_eq!(open.len(), 0);
    }

    #[test]
    fn capacity_bounds_the_descriptors_and_the_coldest_goes() {
        let dir = tempfile::tempdir().unwrap();
        let open = OpenFiles::new(3);
        for n in ["a", "b", "c", "d", "e"] {
            let path = dir.path().join(n);
            std::fs::write(&path, n).unwrap();
            open_and_keep(&open, n, &path);
            assert!(open.len() <= 3);
        }
        assert_eq!(open.len(), 3);
        assert!(open.get_now(&id("e")).is_some(), "the newest stays");
        assert!(open.get_now(&id("a")).is_none(), "the oldest went");
        let off = OpenFiles::new(0);
        open_and_keep(&off, "a", &dir.path().join("a"));
        assert_eq!(off.len(), 0, "0 keeps none");
    }

    #[test]
    fn a_sweep_closes_what_was_removed_behind_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let open = OpenFiles::new(8);
        for n in ["a", "b"] {
            let path = dir.path().join(n);
            std::fs::write(&path, n).unwrap();
            open_and_keep(&open, n, &path);
        }
        std::fs::remove_file(dir.path().join("a")).unwrap();
        open.sweep();
        assert_eq!(open.len(), 1);
        assert!(open.get_now(&id("b")).is_some());
    }
}
