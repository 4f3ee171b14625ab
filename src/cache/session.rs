//! The session mark: whether the last processes on a cache closed
//! cleanly.
//!
//! The watermark file (`.imgcache/watermark`) holds `dirty` while any
//! process has the cache open, and `clean` once the last of them closed
//! after its last checkpoint. Every open process holds a shared `flock` on
//! it; the first to open gets it exclusively and is the only one that can
//! tell whether the last session ended uncleanly (a crash or a power cut),
//! and so whether the recovery walk must check what the watermark does not
//! cover.
//!
//! The first opener marks the file `recovering` while it walks, and
//! `dirty` once its walk is done: a process that gets its shared lock and
//! finds `recovering` knows the first died during the walk, and makes it
//! itself, as the first. The marks carry the machine's boot id (`dirty
//! <boot id>`, Linux). An unclean session whose mark carries this boot's
//! id ended by process crashes only: the machine did not go down since, so
//! the page cache kept every byte written (the kernel writes it back on its
//! own), and a file renamed into place is whole — unless a write-back error
//! nobody has seen is pending, which a sync on a fresh descriptor reports
//! before the walk trusts anything. A walk cut short after a power cut
//! leaves `recovering` without an id: the next is made in full. A process of another boot
//! (another machine on a shared file system) that joins, and a process
//! whose sync of the file system failed (the kernel may have dropped bytes
//! it could not write back), rewrite the mark without an id; a mark
//! without one is trusted for nothing.

use std::path::PathBuf;

use parking_lot::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::files::Layout;

/// What the watermark file says of the last session of processes on the
/// cache: `clean` once the last of them closed cleanly, `dirty` while any
/// is open (and after one that never closed).
const CLEAN: &[u8] = b"clean";
const DIRTY: &[u8] = b"dirty";
/// Written by the first opener before its recovery walk, `dirty` after it:
/// a process that finds it under a shared lock knows the walk was cut short.
const RECOVERING: &[u8] = b"recovering";

/// The id of the running kernel's boot (Linux); `None` elsewhere, or
/// where it cannot be read: then no unclean session is taken for a
/// process crash.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| id.to_owned())
}

/// This process's place in the session of processes on one cache.
#[derive(Debug)]
pub(crate) struct Session {
    layout: Layout,
    marker: PathBuf,
    /// The watermark file, open for this cache's lifetime with a shared
    /// lock: while any process holds it, no power cut has happened since
    /// that process opened.
    file: Mutex<Option<std::fs::File>>,
    /// Other processes had the cache open when this one joined.
    others: std::sync::atomic::AtomicBool,
    /// The last session ended uncleanly, in this boot of the machine.
    crashed_in_this_boot: std::sync::atomic::AtomicBool,
    /// What the first opener writes once its recovery walk is done (the
    /// mark with this boot's id); `None` for the others.
    after_recovery: Mutex<Option<Vec<u8>>>,
}

impl Session {
    pub(crate) fn new(layout: Layout) -> Self {
        Session {
            marker: layout.watermark_file(),
            layout,
            file: Mutex::new(None),
            others: std::sync::atomic::AtomicBool::new(false),
            crashed_in_this_boot: std::sync::atomic::AtomicBool::new(false),
            after_recovery: Mutex::new(None),
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
    pub(crate) fn start(&self) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering::Relaxed;
        self.move_legacy_marker()?;
        let boot = boot_id();
        let with_boot = |state: &[u8]| match &boot {
            Some(id) => [state, b" ", id.as_bytes()].concat(),
            None => state.to_vec(),
        };
        let (ours, recovering_ours) = (with_boot(DIRTY), with_boot(RECOVERING));
        loop {
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
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io("lock", &self.marker, e))
                }
            };
            let mut buf = [0u8; 128];
            let n = file.read_at(&mut buf, 0).ctx("read", &self.marker)?;
            let was = &buf[..n];
            if !first && was.starts_with(RECOVERING) {
                // The first opener died during its walk (a finished walk
                // leaves `dirty`): this process makes it, as the first.
                drop(file);
                std::thread::yield_now();
                continue;
            }
            // Empty: no session ever ran here (or one from before the
            // session mark): nothing to tell.
            let unclean = first && n > 0 && was != CLEAN;
            self.others.store(!first, Relaxed);
            if first {
                // This boot's own mark (a session, or a walk, that processes
                // left in it), and no write-back error that nobody has seen
                // since (a sync on a fresh descriptor reports one): the page
                // cache kept what they wrote.
                let this_boot = unclean
                    && boot.is_some()
                    && (was == ours.as_slice() || was == recovering_ours.as_slice())
                    && self.nothing_lost_in_write_back();
                self.crashed_in_this_boot.store(this_boot, Relaxed);
                // `recovering` until the walk is done ([`Session::joined`]):
                // with this boot's id where the walk may trust it.
                let mark = if this_boot || !unclean {
                    &recovering_ours
                } else {
                    RECOVERING
                };
                write_mark(&file, &self.marker, mark)?;
                *self.after_recovery.lock() = Some(ours);
            } else if was != DIRTY && was != ours.as_slice() {
                // A process of another boot takes the id away (a joiner of
                // this boot finds the mark as it would write it).
                write_mark(&file, &self.marker, DIRTY)?;
            }
            *self.file.lock() = Some(file);
            return Ok(unclean);
        }
    }

    /// Whether a sync of the cache's file system, on a descriptor opened
    /// now, succeeds: the kernel reports there a write-back error that no
    /// descriptor has seen yet (one a crashed process never synced).
    fn nothing_lost_in_write_back(&self) -> bool {
        let base = self.layout.base();
        match std::fs::File::open(base).and_then(|dir| super::durability::sync_file_system(&dir)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "imgcache: {}: sync failed ({e}): nothing written since the last \
                     checkpoint is trusted",
                    base.display()
                );
                false
            }
        }
    }

    /// Takes this boot's id away from the mark: this process's sync of the
    /// file system failed, so the page cache may have dropped bytes it
    /// could not write back, and a crash now must not be taken for one
    /// that kept them.
    pub(crate) fn distrust(&self) {
        if let Some(file) = self.file.lock().as_ref() {
            if let Err(e) = write_mark(file, &self.marker, DIRTY) {
                tracing::error!("imgcache: {e}");
            }
        }
    }

    /// Whether the last session ended uncleanly by process crashes only:
    /// in this boot of the machine, so the page cache kept what they wrote
    /// (`false` before [`Session::start`], and wherever it cannot be told).
    pub(crate) fn crashed_in_this_boot(&self) -> bool {
        self.crashed_in_this_boot
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether other processes had the cache open when this one joined
    /// (`false` before [`Session::start`]).
    pub(crate) fn others_were_open(&self) -> bool {
        self.others.load(std::sync::atomic::Ordering::Relaxed)
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
    pub(crate) fn joined(&self) -> Result<()> {
        if let Some(file) = self.file.lock().as_ref() {
            if let Some(mark) = self.after_recovery.lock().take() {
                write_mark(file, &self.marker, &mark)?;
            }
            file.lock_shared().ctx("lock", &self.marker)?;
        }
        Ok(())
    }

    /// Leaves the session after the last checkpoint: the last process out
    /// marks it `clean`.
    pub(crate) fn end(&self) {
        use std::os::unix::fs::FileExt;
        let Some(file) = self.file.lock().take() else {
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
}

/// Writes `mark` in place, durably: growing before it shrinks, never an
/// empty file.
fn write_mark(file: &std::fs::File, path: &std::path::Path, mark: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(mark, 0).ctx("write", path)?;
    file.set_len(mark.len() as u64).ctx("truncate", path)?;
    file.sync_all().ctx("fsync", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(dir: &std::path::Path) -> Session {
        let layout = Layout::new(dir, None);
        layout.create().unwrap();
        Session::new(layout)
    }

    fn mark(s: &Session) -> Vec<u8> {
        std::fs::read(&s.marker).unwrap()
    }

    /// The walk is marked `recovering`, with this boot's id only where it
    /// may trust it; a walk cut short after a power cut is made again in
    /// full; one cut short in this boot keeps the trust; a process waiting
    /// for its shared lock when the first dies mid-walk makes the walk; a
    /// failed sync takes the id away.
    #[test]
    fn the_boot_id_is_trusted_only_once_a_walk_is_done() {
        let Some(boot) = boot_id() else {
            if cfg!(target_os = "linux") {
                panic!("no boot id on Linux");
            }
            return;
        };
        let ours = format!("dirty {boot}").into_bytes();
        let recovering_ours = format!("recovering {boot}").into_bytes();
        let dir = tempfile::tempdir().unwrap();
        // A power cut: the mark names another boot.
        let s = session(dir.path());
        std::fs::create_dir_all(s.marker.parent().unwrap()).unwrap();
        std::fs::write(&s.marker, b"dirty 00000000-0000-0000-0000-000000000000").unwrap();
        assert!(s.start().unwrap());
        assert!(!s.crashed_in_this_boot());
        assert_eq!(mark(&s), RECOVERING, "no id while an untrusting walk runs");
        // The walk is cut short (the process dies before `joined`), while
        // another process waits for its shared lock: that one walks, as the
        // first, trusting nothing.
        let waiting = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let s = session(&dir);
                let unclean = s.start().unwrap();
                (unclean, s.crashed_in_this_boot(), s.others_were_open(), s)
            })
        };
        drop(s);
        let (unclean, trusted, others, s) = waiting.join().unwrap();
        assert!(
            unclean && !trusted && !others,
            "a cut-short walk is made again in full"
        );
        s.joined().unwrap();
        assert_eq!(mark(&s), ours);
        // This process crashes: the next open knows the machine stayed up,
        // and keeps knowing it if its own walk is cut short.
        drop(s);
        let s = session(dir.path());
        assert!(s.start().unwrap());
        assert!(s.crashed_in_this_boot());
        assert_eq!(mark(&s), recovering_ours);
        drop(s);
        let s = session(dir.path());
        assert!(s.start().unwrap());
        assert!(s.crashed_in_this_boot());
        s.joined().unwrap();
        // A sync fails: the id goes.
        s.distrust();
        assert_eq!(mark(&s), DIRTY);
        drop(s);
        let s = session(dir.path());
        assert!(s.start().unwrap());
        assert!(!s.crashed_in_this_boot());
        s.joined().unwrap();
        s.end();
        assert_eq!(mark(&s), CLEAN);
    }
}
