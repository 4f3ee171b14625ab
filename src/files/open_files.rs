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
//! Hits of a kept file are counted on its entry (one atomic add, no
//! store call, no lock), and handed to the store ([`HitSink`]) in
//! batches: every [`PUSH_EVERY`] (by a thread of the cache's, [`Pusher`],
//! and from a hit when one comes later than that), when the entry leaves
//! (evicted, swept, forgotten: a hit still holding it then hands its own
//! over), and whenever the cache reads counts back ([`OpenFiles::push`],
//! [`OpenFiles::push_all`]). None is lost, none is counted twice.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::entry::{CachedImageInfo, OnDisk};
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

/// How often a kept entry's hits are handed to the store from a hit.
pub(crate) const PUSH_EVERY: Duration = Duration::from_millis(500);

/// Where the hits counted on kept entries go: the cache's store.
pub(crate) trait HitSink: Send + Sync + std::fmt::Debug {
    /// Counts `n` hits of `id`, the latest at `at`, on `file` (whose
    /// [`OnDisk::known`] is the entry kept). Must not wait on anything but
    /// in-memory state where the store's hits are written by a thread of
    /// its own (a runtime's thread may be handing them over).
    fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, file: OnDisk<'_>);
}

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
    /// Where hits counted on entries go (none: they are not handed on).
    sink: OnceLock<Arc<dyn HitSink>>,
}

/// One kept descriptor, with what was true of its file when kept.
#[derive(Debug)]
pub(crate) struct OpenFile {
    id: ImageId,
    pub(crate) file: Arc<File>,
    pub(crate) path: Arc<Path>,
    /// Its metadata when kept (what the store is shown with its hits).
    meta: Metadata,
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
    /// How many of those the store has been handed.
    pushed: AtomicU64,
    /// When they were last handed over ([`coarse_ms`]).
    pushed_ms: AtomicU64,
    /// The latest hit's time, in µs since the epoch.
    last_at: AtomicU64,
    /// Out of the map: a hit still holding it hands its own count over.
    retired: AtomicBool,
    /// Last use, in ms since the cache's `start`.
    used: AtomicU64,
    /// The order it was kept in: of two used in the same ms, the one kept
    /// first goes first.
    seq: u64,
}

impl OpenFile {
    /// Counts a hit at `at` (`now_ms` by [`coarse_ms`]), handing the
    /// count to `sink` when due, and returns this hit's entry: the one
    /// kept, with the hits served from it since (this one included) and
    /// `at` as last access.
    fn count(&self, at: SystemTime, now_ms: u64, sink: Option<&dyn HitSink>) -> CachedImageInfo {
        // The time first: a push that sees this hit's count sees its time
        // (the count's SeqCst add publishes it).
        let us = micros(at);
        if self.last_at.load(Ordering::Relaxed) < us {
            self.last_at.fetch_max(us, Ordering::Relaxed);
        }
        // SeqCst with `retire`: either its push sees this hit, or this hit
        // sees it retired and pushes itself.
        let n = self.since.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(sink) = sink {
            if self.retired.load(Ordering::SeqCst) {
                self.push(sink);
            } else {
                let last = self.pushed_ms.load(Ordering::Relaxed);
                if now_ms.saturating_sub(last) >= PUSH_EVERY.as_millis() as u64
                    && self
                        .pushed_ms
                        .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    self.push(sink);
                }
            }
        }
        let mut info = self.info.clone();
        info.hits += n;
        info.last_accessed = at;
        info
    }

    /// Hands the hits counted and not handed yet to `sink`. Concurrent
    /// pushes hand disjoint counts: each takes what lies between the count
    /// pushed before it and the count it read.
    fn push(&self, sink: &dyn HitSink) {
        let total = self.since.load(Ordering::SeqCst);
        let before = self.pushed.fetch_max(total, Ordering::SeqCst);
        if total > before {
            let at = SystemTime::UNIX_EPOCH
                + Duration::from_micros(self.last_at.load(Ordering::Relaxed));
            let on = OnDisk::new(&self.path, Some(&self.file), &self.meta).with_known(&self.info);
            sink.add_hits(&self.id, total - before, at, on);
        }
    }

    /// Marks it out of the map, and hands its count over.
    fn retire(&self, sink: Option<&dyn HitSink>) {
        self.retired.store(true, Ordering::SeqCst);
        if let Some(sink) = sink {
            self.push(sink);
        }
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
            sink: OnceLock::new(),
        }
    }

    /// Sets where hits counted on kept entries go (once; later calls are
    /// ignored).
    pub(crate) fn set_sink(&self, sink: Arc<dyn HitSink>) {
        let _ = self.sink.set(sink);
    }

    fn sink(&self) -> Option<&dyn HitSink> {
        self.sink.get().map(|s| &**s)
    }

    /// Hands the hits counted on `id`'s entry, if kept, to the store (before
    /// its count is read back).
    pub(crate) fn push(&self, id: &ImageId) {
        let Some(sink) = self.sink() else { return };
        let entry = self.map.read().get(id).cloned();
        if let Some(entry) = entry {
            entry.push(sink);
        }
    }

    /// Hands every kept entry's hits to the store (before counts or access
    /// times are read back: listings, pruning, a flush).
    pub(crate) fn push_all(&self) {
        let Some(sink) = self.sink() else { return };
        let entries: Vec<Arc<OpenFile>> = self.map.read().values().cloned().collect();
        for entry in entries {
            entry.push(sink);
        }
    }

    /// Takes an entry out of the map: retired, its count handed over.
    fn retired(&self, gone: Option<Arc<OpenFile>>) -> Option<Arc<OpenFile>> {
        if let Some(g) = &gone {
            g.retire(self.sink());
        }
        gone
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
    pub(crate) fn hit(
        &self,
        id: &ImageId,
        may_block: bool,
        at: SystemTime,
    ) -> Option<(Arc<OpenFile>, CachedImageInfo)> {
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
            Some(_) => {
                if entry.used.load(Ordering::Relaxed) != now {
                    entry.used.store(now, Ordering::Relaxed);
                }
                let info = entry.count(at, now, self.sink());
                Some((entry, info))
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
            id: id.clone(),
            file: file.clone(),
            path: path.clone(),
            meta: meta.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: AtomicU64::new(stamp(meta, opened_at)),
            info: info.clone(),
            since: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            pushed_ms: AtomicU64::new(now),
            last_at: AtomicU64::new(micros(info.last_accessed)),
            retired: AtomicBool::new(false),
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
        // Closed, and its hits handed over, outside the lock: hits never
        // wait for a last close or a store.
        drop(self.retired(evicted));
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
        // Its hits are the store's to keep or drop with the entry.
        drop(self.retired(gone));
    }

    /// Takes `entry` out if it is still the one kept for `id`.
    fn take_if_same(&self, id: &ImageId, entry: &Arc<OpenFile>) -> Option<Arc<OpenFile>> {
        let mut map = self.map.write();
        let gone = if map.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(id)
        } else {
            None
        };
        drop(map);
        self.retired(gone)
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

/// The thread that hands the hits counted on kept entries to the store
/// every [`PUSH_EVERY`], so that they reach its batch within about that
/// however the hits stop (the SQLite and PostgreSQL stores then write the
/// batch from threads of their own within a second and a half; the xattr
/// store writes it from the next hit that finds it due, a flush, or its
/// drop, as it does its own hits). Stopped, after a last hand-over, when
/// dropped.
#[derive(Debug)]
pub(crate) struct Pusher {
    stop: Arc<(Mutex<bool>, parking_lot::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pusher {
    /// Starts one for `open`, the descriptors of the cache in `base`;
    /// `None` where it keeps none. A thread that cannot be started is
    /// logged: hits are then handed over from later hits, read-backs,
    /// flushes and the drop only.
    pub(crate) fn spawn(open: &Arc<OpenFiles>, base: &Path) -> Option<Pusher> {
        if open.capacity == 0 {
            return None;
        }
        let stop = Arc::new((Mutex::new(false), parking_lot::Condvar::new()));
        let weak = Arc::downgrade(open);
        let told = stop.clone();
        let thread = std::thread::Builder::new()
            .name("imgcache-hits".into())
            .spawn(move || loop {
                let stopping = {
                    let mut stopped = told.0.lock();
                    if !*stopped {
                        told.1.wait_for(&mut stopped, PUSH_EVERY);
                    }
                    *stopped
                };
                let Some(open) = weak.upgrade() else { return };
                open.push_all();
                if stopping {
                    return;
                }
            })
            .map_err(|e| {
                tracing::warn!(
                    "imgcache: {}: no thread to hand hits over: {e}",
                    base.display()
                );
            })
            .ok()?;
        Some(Pusher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OpenFiles {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.get() {
            for entry in self.map.get_mut().values() {
                entry.retire(Some(&**sink));
            }
        }
    }
}

/// `t` in µs since the epoch (0 before it).
fn micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
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

/// The wall clock in ns since the epoch: file times are stamped by it.
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
        fn get_now(&self, id: &ImageId) -> Option<(Arc<OpenFile>, CachedImageInfo)> {
            self.hit(id, true, SystemTime::now())
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
        let (hot, info) = open.get_now(&id("a")).expect("kept");
        assert_eq!((info.size, info.hits), (3, 1));
        drop(hot);
        let (hot, info) = open.get_now(&id("a")).expect("kept");
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

    /// A sink that adds up what it is handed.
    #[derive(Debug, Default)]
    struct Tally(
        Mutex<HashMap<ImageId, (u64, SystemTime)>>,
        parking_lot::Condvar,
    );

    impl HitSink for Tally {
        fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, file: OnDisk<'_>) {
            assert_eq!(file.known().map(|k| &k.id), Some(id));
            let mut t = self.0.lock();
            let e = t.entry(id.clone()).or_insert((0, SystemTime::UNIX_EPOCH));
            e.0 += n;
            e.1 = e.1.max(at);
            self.1.notify_all();
        }
    }

    #[test]
    fn the_pusher_hands_hits_over_when_they_stop() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"bytes").unwrap();
        let tally = Arc::new(Tally::default());
        let open = Arc::new(OpenFiles::new(8));
        open.set_sink(tally.clone());
        let pusher = Pusher::spawn(&open, dir.path()).expect("a pusher");
        open_and_keep(&open, "a", &dir.path().join("a"));
        for _ in 0..3 {
            open.hit(&id("a"), true, SystemTime::now()).expect("kept");
        }
        // No hit, push or forget after these: the pusher's tick brings them.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut t = tally.0.lock();
        while t.get(&id("a")).map_or(0, |e| e.0) < 3 {
            assert!(
                !tally.1.wait_until(&mut t, deadline).timed_out(),
                "not handed over within 10 s"
            );
        }
        drop(t);
        // A last hand-over when it stops.
        open.hit(&id("a"), true, SystemTime::now()).expect("kept");
        drop(pusher);
        assert_eq!(tally.of("a"), 4);
        assert!(Pusher::spawn(&Arc::new(OpenFiles::new(0)), dir.path()).is_none());
    }

    impl Tally {
        fn of(&self, name: &str) -> u64 {
            self.0.lock().get(&id(name)).map_or(0, |e| e.0)
        }
    }

    #[test]
    fn hits_counted_on_an_entry_reach_the_sink_once() {
        let dir = tempfile::tempdir().unwrap();
        let tally = Arc::new(Tally::default());
        let open = OpenFiles::new(1);
        open.set_sink(tally.clone());
        for name in ["a", "b"] {
            std::fs::write(dir.path().join(name), b"bytes").unwrap();
        }
        open_and_keep(&open, "a", &dir.path().join("a"));
        // Later than the entry kept (whose access time is now).
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        for _ in 0..3 {
            open.hit(&id("a"), true, at).expect("kept");
        }
        // Not handed over yet (less than PUSH_EVERY since it was kept).
        assert_eq!(tally.of("a"), 0);
        open.push(&id("a"));
        assert_eq!(tally.of("a"), 3);
        assert_eq!(tally.0.lock()[&id("a")].1, at, "the latest hit's time");
        open.push_all();
        assert_eq!(tally.of("a"), 3, "nothing twice");
        // A hit still holding the entry when it is evicted hands its own.
        let (held, _) = open.hit(&id("a"), true, at).expect("kept");
        open_and_keep(&open, "b", &dir.path().join("b"));
        assert!(open.get_now(&id("a")).is_none(), "evicted");
        assert_eq!(tally.of("a"), 4, "handed over when it left");
        held.count(at, 0, open.sink());
        assert_eq!(tally.of("a"), 5, "a late hit on a retired entry");
        // Forgotten, and at the end.
        open.hit(&id("b"), true, at).expect("kept");
        open.forget(&id("b"));
        assert_eq!(tally.of("b"), 1);
        open_and_keep(&open, "b", &dir.path().join("b"));
        open.hit(&id("b"), true, at).expect("kept");
        drop(open);
        assert_eq!(tally.of("b"), 2, "handed over when the cache goes");
    }

    #[test]
    fn concurrent_hits_and_pushes_lose_and_double_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"bytes").unwrap();
        let tally = Arc::new(Tally::default());
        let open = Arc::new(OpenFiles::new(8));
        open.set_sink(tally.clone());
        open_and_keep(&open, "a", &dir.path().join("a"));
        let served = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..2_000 {
                        if open.hit(&id("a"), true, SystemTime::now()).is_some() {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            sc.spawn(|| {
                for i in 0..200 {
                    open.push_all();
                    if i % 50 == 0 {
                        open.forget(&id("a"));
                        open_and_keep(&open, "a", &dir.path().join("a"));
                    }
                }
            });
        });
        drop(open);
        assert_eq!(tally.of("a"), served.load(Ordering::Relaxed));
    }
}
