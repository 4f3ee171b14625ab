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
//! 4. the store writes the entries it holds in memory (see
//!    [`CacheDriver::insert_batched`]); then `syncfs(2)` of the cache's file
//!    system (`sync(2)` where there is none): every write, rename and
//!    metadata row issued before it — by any process — is on disk when it
//!    returns (rows another process still holds are not issued yet: their
//!    files are covered, and a file that a crash leaves without its row is
//!    judged as a file without metadata);
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

use super::session::Session;

/// The checkpointer of one open cache.
///
/// Two locks, each with one job: `schedule` counts the commits and wakes
/// the thread; `sync` lets one checkpoint run at a time and owns what a
/// checkpoint needs across runs (the directory it syncs). Whether a sync
/// ever failed is a flag commits read too. The session mark is
/// [`Session`]'s.
#[derive(Debug)]
pub(crate) struct Durable {
    /// The mode in effect: [`Durability::Immediate`] when the store cannot
    /// record a watermark, whatever was asked.
    mode: Durability,
    layout: Layout,
    store: Arc<dyn CacheDriver>,
    clock: Arc<dyn Clock>,
    marker: PathBuf,
    schedule: Mutex<State>,
    wake: Condvar,
    sync: Mutex<Syncer>,
    session: Session,
    /// A sync of the file system failed: writes before it may be lost, so
    /// this process never records a watermark again (what it commits is
    /// checked at the next open), and each commit syncs its own file (and
    /// fails where the disk does).
    failed_sync: std::sync::atomic::AtomicBool,
}

/// What a checkpoint keeps from one run to the next.
#[derive(Debug)]
struct Syncer {
    /// The base directory, open for the cache's lifetime: `syncfs` reports
    /// a writeback error only to descriptors opened before it happened.
    dir: Option<std::fs::File>,
}

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
        Durable {
            mode,
            marker: layout.watermark_file(),
            session: Session::new(layout.clone()),
            failed_sync: std::sync::atomic::AtomicBool::new(false),
            sync: Mutex::new(Syncer {
                dir: std::fs::File::open(layout.base()).ok(),
            }),
            layout,
            store,
            clock,
            schedule: Mutex::default(),
            wake: Condvar::new(),
        }
    }

    /// This process's place in the session of processes on the cache.
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// The mode in effect.
    pub(crate) fn mode(&self) -> Durability {
        self.mode
    }

    /// Whether each commit must sync its own file and directory.
    pub(crate) fn syncs_each_commit(&self) -> bool {
        // A fill that outlives its cache (its checkpointer stopped, the
        // session perhaps marked clean) syncs its commit itself.
        matches!(self.mode, Durability::Immediate)
            || self.failed_sync.load(std::sync::atomic::Ordering::Relaxed)
            || self.schedule.lock().stop
    }

    /// Whether checkpoints (and watermarks) are kept at all.
    pub(crate) fn keeps_watermark(&self) -> bool {
        self.store.records_watermark()
    }

    /// Counts a commit of `bytes`; wakes the checkpointer when enough
    /// bytes are waiting.
    pub(crate) fn committed(&self, bytes: u64) {
        let mut st = self.schedule.lock();
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
        self.schedule.lock().checkpoints
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
        let mut sync = self.sync.lock();
        let seen = {
            let mut st = self.schedule.lock();
            st.bytes = 0;
            st.commits
        };
        let base = self.layout.base();
        if self.failed_sync.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::io(
                "syncfs",
                base,
                std::io::Error::other("an earlier sync failed: no watermark is recorded again"),
            ));
        }
        let committed_before = round_trip(self.clock.now());
        let changed_before = self.touch_marker()?;
        // Entries the store holds in memory (a batch of commits' rows) are
        // written before the sync, which then covers them. One it cannot
        // write now stays held: were a power cut to take it, its file
        // (renamed in before the touch above) would be adopted, unverified
        // but whole.
        if let Err(e) = self.store.flush() {
            tracing::warn!(
                "imgcache: checkpoint of {}: {e}",
                self.layout.base().display()
            );
        }
        let dir: &std::fs::File = match &mut sync.dir {
            Some(d) => d,
            slot => slot.insert(std::fs::File::open(base).ctx("open", base)?),
        };
        if let Err(e) = sync_file_system(dir) {
            self.failed_sync
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // Bytes the kernel could not write back may be gone from the
            // page cache too: a crash from now on is trusted for nothing.
            self.session.distrust();
            return Err(Error::io("syncfs", base, e));
        }
        let mark = Watermark {
            committed_before,
            changed_before,
        };
        let meta = dir.metadata().ctx("stat", base)?;
        self.store
            .record_watermark(mark, OnDisk::new(base, Some(dir), &meta))?;
        drop(sync);
        let mut st = self.schedule.lock();
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
                run(&runner)
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
        self.durable.schedule.lock().stop = true;
        self.durable.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The checkpointer's loop: a checkpoint `interval` after the first
/// commit it does not cover, sooner when enough bytes wait; a last one
/// at stop if needed.
fn run(durable: &Durable) {
    let (interval, limit) = match durable.mode {
        Durability::Group { interval, bytes } => (interval, bytes),
        // Commits are durable on their own; the watermark still moves
        // on, so that the next open has little to check.
        _ => (Duration::from_secs(10), u64::MAX),
    };
    loop {
        {
            let mut st = durable.schedule.lock();
            while !st.stop && st.commits == st.covered {
                durable.wake.wait(&mut st);
            }
            if st.stop {
                break;
            }
            let due = std::time::Instant::now() + interval;
            while !st.stop && st.bytes < limit {
                if durable.wake.wait_until(&mut st, due).timed_out() {
                    break;
                }
            }
            if st.stop {
                break;
            }
        }
        if let Err(e) = durable.checkpoint() {
            tracing::warn!(
                "imgcache: checkpoint of {}: {e}",
                durable.layout.base().display()
            );
            // Do not spin on a failing disk.
            let mut st = durable.schedule.lock();
            if !st.stop {
                durable.wake.wait_for(&mut st, interval);
            }
        }
    }
    // A clean close: everything so far is covered, and the last process
    // out marks the session clean.
    match durable.checkpoint() {
        Ok(_) => durable.session.end(),
        Err(e) => {
            tracing::warn!(
                "imgcache: last checkpoint of {}: {e}",
                durable.layout.base().display()
            )
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
pub(crate) fn sync_file_system(dir: &std::fs::File) -> std::io::Result<()> {
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
