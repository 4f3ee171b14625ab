//! The SQLite driver's background merger of its write-ahead log (what
//! SQLite calls a WAL checkpoint; elsewhere in this crate "checkpoint"
//! means the durability watermark only). Used with `SqliteJournal::Wal`.
//!
//! SQLite checkpoints its write-ahead log automatically inside whichever
//! connection commits past a threshold, and a checkpoint `fsync`s. Left to
//! that, every few hundred hits one *reader* would pay a checkpoint; and
//! since SQLite runs the automatic checkpoint only when a statement steps to
//! its end, the hit update (an `UPDATE … RETURNING` read for one row) would
//! never trigger it at all, and the log would grow by a few KiB per read
//! without bound.
//!
//! So the driver's connections never checkpoint (`wal_autocheckpoint = 0`).
//! Instead they count their metadata writes, and every
//! [`CHECKPOINT_EVERY`] writes they wake this thread, which runs a
//! `TRUNCATE` checkpoint on the driver's own connection, holding the lock
//! the hit path takes: it copies the whole log into the database, empties
//! it, and makes the first write of the new log itself (starting a log
//! syncs its header: that sync must not fall to a reader). (A checkpoint on a
//! connection of its own loses the race for the write lock to a steady
//! stream of hits, and the log grows without bound: 180 MB after 65 536
//! reads.) Readers never `fsync`; a hit that arrives during a checkpoint
//! waits for it, once every [`CHECKPOINT_EVERY`] writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::thread;

use parking_lot::{Condvar, Mutex};
use rusqlite::Connection;

use crate::error::{Error, Result};

/// Metadata writes between two checkpoint requests. A hit writes about two
/// pages to the log, so this keeps it near 4 MiB.
pub(crate) const CHECKPOINT_EVERY: u64 = 512;

/// A handle on the checkpoint thread; dropping it stops the thread.
#[derive(Debug)]
pub(crate) struct WalMerger {
    wake: SyncSender<()>,
    writes: AtomicU64,
    done: Arc<Done>,
}

/// Completed checkpoints, with a condition variable to wait on.
#[derive(Debug, Default)]
struct Done {
    count: Mutex<u64>,
    changed: Condvar,
}

/// Copies the whole log into the database and empties it (`TRUNCATE`),
/// then makes the first write of the new log here: starting a log syncs its
/// header, and that sync belongs on this thread, not on a reader's. Returns
/// SQLite's "busy" flag (another process held the checkpoint up).
fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    conn.execute(
        "INSERT INTO imgcache_state (key, value) VALUES ('checkpoints', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1",
        [],
    )?;
    Ok(busy)
}

impl WalMerger {
    /// Starts the thread, which checkpoints through `conn` (the driver's
    /// connection) and stops when the driver is gone.
    pub(crate) fn spawn(db: &Path, conn: Weak<Mutex<Connection>>) -> Result<Self> {
        // One pending request is enough: a request that finds one queued is
        // already served by it.
        let (wake, requests) = sync_channel::<()>(1);
        let done = Arc::new(Done::default());
        let finished = done.clone();
        let path: PathBuf = db.to_path_buf();
        thread::Builder::new()
            .name("imgcache-sqlite-wal".into())
            .spawn(move || {
                while requests.recv().is_ok() {
                    let Some(conn) = conn.upgrade() else {
                        break;
                    };
                    let result = checkpoint(&conn.lock());
                    drop(conn);
                    match result {
                        Ok(busy) if busy != 0 => tracing::debug!(
                            "imgcache: WAL merge of {} was held up by another process",
                            path.display()
                        ),
                        Ok(_) => {
                            *finished.count.lock() += 1;
                            finished.changed.notify_all();
                        }
                        Err(e) => tracing::warn!(
                            "imgcache: WAL merge of {} failed (will retry): {e}",
                            path.display()
                        ),
                    }
                }
            })
            .map_err(|e| Error::io("start checkpoint thread for", db, e))?;
        Ok(WalMerger {
            wake,
            writes: AtomicU64::new(0),
            done,
        })
    }

    /// Counts one metadata write, and asks for a checkpoint every
    /// [`CHECKPOINT_EVERY`]. Never blocks.
    pub(crate) fn wrote(&self) {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(CHECKPOINT_EVERY) {
            match self.wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    tracing::warn!("imgcache: checkpoint thread is gone")
                }
            }
        }
    }

    /// How many checkpoints the thread has completed.
    pub(crate) fn completed(&self) -> u64 {
        *self.done.count.lock()
    }

    /// Waits until at least `n` checkpoints have completed, or `timeout`
    /// passed; returns the count.
    #[cfg(test)]
    pub(crate) fn wait_completed(&self, n: u64, timeout: std::time::Duration) -> u64 {
        let mut count = self.done.count.lock();
        let deadline = std::time::Instant::now() + timeout;
        while *count < n {
            if self
                .done
                .changed
                .wait_until(&mut count, deadline)
                .timed_out()
            {
                break;
            }
        }
        *count
    }
}
