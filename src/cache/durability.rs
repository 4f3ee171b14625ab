//! Group durability: the checkpointer that makes many commits durable at
//! once and records the [`Watermark`] that the recovery walk trusts.
//!
//! A checkpoint is, in this order:
//!
//! 1. note how many commits this process has made so far;
//! 2. `committed_before` = the cache's clock, now;
//! 3. touch the watermark file (`.imgcache/watermark`) and read its change
//!    time back: `changed_before`, on the file system's own clock (the
//!    clock its renames stamp inodes with);
//! 4. `syncfs(2)` of the cache's file system (`sync(2)` where there is
//!    none): every write, rename and metadata row issued before it — by any
//!    process — is on disk when it returns;
//! 5. record the pair in the store, durably.
//!
//! A commit stamps its entry (`last_modified`) after its last data write,
//! so an entry stamped before step 2 had all its bytes written before
//! step 4 began: on disk, whatever became of its rename. An entry stamped
//! at or after it is checked by the next open. A file renamed into place
//! before step 3 has a change time before `changed_before` (a rename
//! stamps the inode it moves): its bytes, written before its rename, are
//! on disk too. (Hits written on a file — the xattr store's — move its
//! change time as well, so an entry without a CRC-32 is judged by its
//! commit stamp and the time its bytes were made or written instead; see
//! [`content_time_of`].) The clocks are assumed not to run backwards across a
//! checkpoint (a clock stepped back by more than the checkpoint interval
//! could make a later commit look covered).

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};

use crate::clock::{round_trip, Clock};
use crate::drivers::CacheDriver;
use crate::drivers::StoreExt;
use crate::entry::{OnDisk, Watermark};
use crate::error::{Error, IoContext, Result};
use crate::files::Layout;
use crate::options::Durability;

/// The checkpointer of one open cache.
#[derive(Debug)]
pub(crate) struct Durable {
    /// The mode in effect: [`Durability::Immediate`] when the store cannot
    /// record a watermark, whatever was asked.
    mode: Durability,
    layout: Layout,
    store: Arc<dyn CacheDriver>,
    clock: Arc<dyn Clock>,
    marker: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    /// One checkpoint at a time.
    running: Mutex<()>,
    /// The watermark file, open for this cache's lifetime with a shared
    /// lock: while any process holds it, no power cut has happened since
    /// that process opened (see [`Durable::session_start`]).
    session: Mutex<Option<std::fs::File>>,
    /// The base directory, open for the cache's lifetime: `syncfs` reports
    /// a writeback error only to descriptors opened before it happened.
    dir: Mutex<Option<std::fs::File>>,
    /// A sync failed: writes before it may be lost, so this process never
    /// records a watermark again (what it commits is checked at the next
    /// open).
    poisoned: std::sync::atomic::AtomicBool,
}

/// What the watermark file says of the last session of processes on the
/// cache: `clean` once the last of them closed cleanly, `dirty` while any
/// is open (and after one that never closed).
const CLEAN: &[u8] = b"clean";
const DIRTY: &[u8] = b"dirty";

#[derive(Debug, Default)]
struct State {
    /// Commits of this process so far, and how many a checkpoint covered.
    commits: u64,
    covered: u64,
    /// Bytes committed since the last checkpoint began.
    bytes: u64,
    checkpoints: u64,
    stop: bool,
}

impl Durable {
    pub(crate) fn new(
        mode: Durability,
        layout: Layout,
        store: Arc<dyn CacheDriver>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mode = match mode {
            Durability::Group { .. } if !store.records_watermark() => {
                tracing::info!(
                    "imgcache: the {} store records no durability watermark: commits are synced \
                     one by one",
                    store.name()
                );
                Durability::Immediate
            }
            m => m,
        };
        let marker = layout.watermark_file();
        let base_dir = layout.base().to_path_buf();
        Durable {
            mode,
            layout,
            store,
            clock,
            marker,
            state: Mutex::default(),
            wake: Condvar::new(),
            running: Mutex::new(()),
            session: Mutex::new(None),
            dir: Mutex::new(std::fs::File::open(base_dir).ok()),
            poisoned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Joins the session of processes on this cache; returns whether the
    /// last one ended uncleanly (a crash or a power cut before its last
    /// process closed), which only the first process to open can tell.
    ///
    /// The first opener (it gets the watermark file's exclusive lock: no
    /// other process is alive) reads what the last session left, and marks
    /// the file `dirty`, durably, before anything is committed; every
    /// process then holds a shared lock until it closes, and the last to
    /// close marks it `clean` after its last checkpoint. A process that
    /// finds others alive knows no power cut came since they opened (it
    /// would have ended them), and each of them checked what came before.
    pub(crate) fn session_start(&self) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        self.move_legacy_marker()?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.marker)
            .ctx("open", &self.marker)?;
        let first = match file.try_lock() {
            Ok(()) => true,
            // Others are open (or the first is still recovering, holding
            // the exclusive lock): wait for a shared one.
            Err(std::fs::TryLockError::WouldBlock) => {
                file.lock_shared().ctx("lock", &self.marker)?;
                false
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &self.marker, e)),
        };
        let mut buf = [0u8; 8];
        let n = file.read_at(&mut buf, 0).ctx("read", &self.marker)?;
        // Empty: no session ever ran here (or one from before the session
        // mark): nothing to tell.
        let unclean = first && n > 0 && &buf[..n] != CLEAN;
        if &buf[..n] != DIRTY {
            // In place (both marks are five bytes): never an empty file.
            file.write_all_at(DIRTY, 0).ctx("write", &self.marker)?;
            file.set_len(DIRTY.len() as u64)
                .ctx("truncate", &self.marker)?;
            file.sync_all().ctx("fsync", &self.marker)?;
        }
        *self.session.lock() = Some(file);
        Ok(unclean)
    }

    /// Moves the watermark file of earlier versions (a regular file in the
    /// base directory, which Glance's drivers took for an image) into the
    /// private folder, with the session mark it holds.
    fn move_legacy_marker(&self) -> Result<()> {
        let legacy = self.layout.legacy_watermark_file();
        if std::fs::symlink_metadata(&legacy).is_err() {
            return Ok(());
        }
        let moved = if std::fs::symlink_metadata(&self.marker).is_ok() {
            std::fs::remove_file(&legacy)
        } else {
            std::fs::rename(&legacy, &self.marker)
        };
        match moved {
            Ok(()) => {
                tracing::info!(
                    "imgcache: moved {} into {}",
                    legacy.display(),
                    self.layout.private_dir().display()
                );
                Ok(())
            }
            // Another process moved it first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("move", &legacy, e)),
        }
    }

    /// After the recovery walk: the first opener lets the others in (its
    /// exclusive lock becomes a shared one).
    pub(crate) fn session_joined(&self) -> Result<()> {
        if let Some(file) = self.session.lock().as_ref() {
            file.lock_shared().ctx("lock", &self.marker)?;
        }
        Ok(())
    }

    /// Leaves the session after the last checkpoint: the last process out
    /// marks it `clean`.
    fn session_end(&self) {
        use std::os::unix::fs::FileExt;
        let Some(file) = self.session.lock().take() else {
            return;
        };
        if file.try_lock().is_ok() {
            let done = file
                .write_all_at(CLEAN, 0)
                .and_then(|()| file.set_len(CLEAN.len() as u64))
                .and_then(|()| file.sync_all());
            if let Err(e) = done {
                tracing::warn!("imgcache: cannot mark {} clean: {e}", self.marker.display());
            }
        }
    }

    /// The mode in effect.
    pub(crate) fn mode(&self) -> Durability {
        self.mode
    }

    /// Whether each commit must sync its own file and directory.
    pub(crate) fn syncs_each_commit(&self) -> bool {
        // A fill that outlives its cache (its checkpointer stopped, the
        // session perhaps marked clean) syncs its commit itself.
        matches!(self.mode, Durability::Immediate) || self.state.lock().stop
    }

    /// Whether checkpoints (and watermarks) are kept at all.
    pub(crate) fn keeps_watermark(&self) -> bool {
        self.store.records_watermark()
    }

    /// Counts a commit of `bytes`; wakes the checkpointer when enough
    /// bytes are waiting.
    pub(crate) fn committed(&self, bytes: u64) {
        let mut st = self.state.lock();
        st.commits += 1;
        st.bytes = st.bytes.saturating_add(bytes);
        let limit = match self.mode {
            Durability::Group { bytes, .. } => bytes,
            _ => u64::MAX,
        };
        // The first commit left uncovered starts the interval; enough
        // bytes end it.
        if st.commits == st.covered + 1 || st.bytes >= limit {
            self.wake.notify_all();
        }
    }

    /// Checkpoints completed by this cache so far.
    pub(crate) fn checkpoints(&self) -> u64 {
        self.state.lock().checkpoints
    }

    /// The watermark the store holds.
    pub(crate) fn watermark(&self) -> Result<Option<Watermark>> {
        let base = self.layout.base();
        let dir = std::fs::File::open(base).ctx("open", base)?;
        let meta = dir.metadata().ctx("stat", base)?;
        self.store
            .durable_watermark(OnDisk::new(base, Some(&dir), &meta))
    }

    /// Makes everything committed so far durable and records the watermark
    /// (see the module docs for the order and why it holds).
    pub(crate) fn checkpoint(&self) -> Result<Watermark> {
        let _one = self.running.lock();
        let seen = {
            let mut st = self.state.lock();
            st.bytes = 0;
            st.commits
        };
        if self.poisoned.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::io(
                "syncfs",
                self.layout.base(),
                std::io::Error::other("an earlier sync failed: no watermark is recorded again"),
            ));
        }
        let committed_before = round_trip(self.clock.now());
        let changed_before = self.touch_marker()?;
        let base = self.layout.base();
        let mut held = self.dir.lock();
        let dir: &std::fs::File = match &mut *held {
            Some(d) => d,
            slot => slot.insert(std::fs::File::open(base).ctx("open", base)?),
        };
        if let Err(e) = sync_file_system(dir) {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(Error::io("syncfs", base, e));
        }
        let mark = Watermark {
            committed_before,
            changed_before,
        };
        let meta = dir.metadata().ctx("stat", base)?;
        self.store
            .record_watermark(mark, OnDisk::new(base, Some(dir), &meta))?;
        drop(held);
        let mut st = self.state.lock();
        st.covered = st.covered.max(seen);
        st.checkpoints += 1;
        Ok(mark)
    }

    /// Touches the watermark file and returns its change time, as the file
    /// system stamped it: a file renamed with an earlier change time was
    /// renamed before this touch.
    ///
    /// The file system stamps from a coarse clock (a tick of 1–10 ms), so a
    /// rename just before the touch may share its stamp and look later. So
    /// it touches again until the stamp moves on (for at most 50 ms): a
    /// rename made before the first touch then has a stamp strictly before
    /// the one returned, and is trusted.
    fn touch_marker(&self) -> Result<SystemTime> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.marker)
            .ctx("open", &self.marker)?;
        let touch = || -> Result<SystemTime> {
            file.set_modified(SystemTime::now())
                .ctx("touch", &self.marker)?;
            Ok(ctime_of(&file.metadata().ctx("stat", &self.marker)?))
        };
        let first = touch()?;
        let give_up = std::time::Instant::now() + Duration::from_millis(50);
        loop {
            // As the stores keep it: whole microseconds, rounded down.
            let t = Watermark::from_micros(0, crate::entry::micros(touch()?)).changed_before;
            if t > first || std::time::Instant::now() >= give_up {
                return Ok(t);
            }
            thread::yield_now();
        }
    }

    /// The checkpointer's loop: a checkpoint `interval` after the first
    /// commit it does not cover, sooner when enough bytes wait; a last one
    /// at stop if needed.
    fn run(&self) {
        let (interval, limit) = match self.mode {
            Durability::Group { interval, bytes } => (interval, bytes),
            // Commits are durable on their own; the watermark still moves
            // on, so that the next open has little to check.
            _ => (Duration::from_secs(10), u64::MAX),
        };
        loop {
            {
                let mut st = self.state.lock();
                while !st.stop && st.commits == st.covered {
                    self.wake.wait(&mut st);
                }
                if st.stop {
                    break;
                }
                let due = std::time::Instant::now() + interval;
                while !st.stop && st.bytes < limit {
                    if self.wake.wait_until(&mut st, due).timed_out() {
                        break;
                    }
                }
                if st.stop {
                    break;
                }
            }
            if let Err(e) = self.checkpoint() {
                tracing::warn!(
                    "imgcache: checkpoint of {}: {e}",
                    self.layout.base().display()
                );
                // Do not spin on a failing disk.
                let mut st = self.state.lock();
                if !st.stop {
                    self.wake.wait_for(&mut st, interval);
                }
            }
        }
        // A clean close: everything so far is covered, and the last process
        // out marks the session clean.
        match self.checkpoint() {
            Ok(_) => self.session_end(),
            Err(e) => {
                tracing::warn!(
                    "imgcache: last checkpoint of {}: {e}",
                    self.layout.base().display()
                )
            }
        }
    }
}

/// The checkpointer's thread; dropping it stops the thread after a last
/// checkpoint of what is left.
#[derive(Debug)]
pub(crate) struct CheckpointThread {
    durable: Arc<Durable>,
    thread: Option<thread::JoinHandle<()>>,
}

impl CheckpointThread {
    /// Starts the thread; `soon`: with a checkpoint at once.
    pub(crate) fn spawn(durable: Arc<Durable>, soon: bool) -> Result<Self> {
        let runner = durable.clone();
        let thread = thread::Builder::new()
            .name("imgcache-durable".into())
            .spawn(move || {
                if soon {
                    if let Err(e) = runner.checkpoint() {
                        tracing::warn!(
                            "imgcache: checkpoint of {}: {e}",
                            runner.layout.base().display()
                        );
                    }
                }
                runner.run()
            })
            .map_err(|e| Error::io("spawn", durable.layout.base(), e))?;
        Ok(CheckpointThread {
            durable,
            thread: Some(thread),
        })
    }
}

impl Drop for CheckpointThread {
    fn drop(&mut self) {
        self.durable.state.lock().stop = true;
        self.durable.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn change_time(secs: i64, nsecs: i64) -> SystemTime {
    let d = Duration::new(secs.unsigned_abs(), nsecs.clamp(0, 999_999_999) as u32);
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// The change time of a file, as the file system stamped it.
pub(crate) fn ctime_of(meta: &std::fs::Metadata) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    change_time(meta.ctime(), meta.ctime_nsec())
}

/// When a file's *content* last changed, as the file system stamped it:
/// the later of its birth (a new inode: a commit, a copy) and its last
/// data write. Unlike the change time, metadata alone (an attribute, a hit
/// count, an access time, a rename) does not move it, so a file whose
/// hits were recorded after a checkpoint is not taken for one whose bytes
/// may be unsynced. Where the file system keeps no birth time, the change
/// time (which covers both, and more).
///
/// Both stamps come from the clock that stamps change times, the one the
/// watermark's `changed_before` was read from.
pub(crate) fn content_time_of(meta: &std::fs::Metadata) -> SystemTime {
    match (meta.created(), meta.modified()) {
        (Ok(born), Ok(written)) => born.max(written),
        _ => ctime_of(meta),
    }
}

/// Flushes the whole file system holding `dir`: `syncfs(2)` on Linux,
/// `sync(2)` (every file system) elsewhere.
fn sync_file_system(dir: &std::fs::File) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        nix::unistd::syncfs(dir).map_err(std::io::Error::from)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = dir;
        nix::unistd::sync();
        Ok(())
    }
}
