//! [`SqliteDriver`]: metadata in a SQLite database, as Glance's `sqlite`
//! driver keeps it.
//!
//! The table is Glance's own:
//!
//! ```sql
//! CREATE TABLE cached_images (
//!     image_id TEXT PRIMARY KEY,
//!     last_accessed REAL DEFAULT 0.0,
//!     last_modified REAL DEFAULT 0.0,
//!     size INTEGER DEFAULT 0,
//!     hits INTEGER DEFAULT 0,
//!     checksum TEXT
//! );
//! ```
//!
//! `imgcache` adds a nullable `crc32 INTEGER` column (Glance's queries name
//! their columns, so they keep working), an index on
//! `(last_accessed, image_id)` for the pruner, and two tables of its own:
//! `imgcache_invalid` (why a write failed) and `imgcache_state` (the queue
//! counter). A database Glance wrote is upgraded in place on open and stays
//! readable by Glance.
//!
//! # Journal
//!
//! By default the database keeps Glance's own journal mode, `DELETE`: its
//! rollback journal (`cache.db-journal`) exists only while a write is under
//! way. WAL mode would leave `cache.db-wal` and `cache.db-shm` beside the
//! database for as long as any connection is open — Glance's own included,
//! since the mode is recorded in the file — and Glance's drivers take every
//! regular file in the base directory but the database for an image: its
//! cache size counts them, its pruner evicts for them, and its
//! `delete_all_cached_images` deletes them under a live connection.
//! [`SqliteJournal::Wal`] is for caches Glance never touches: readers never
//! wait for a writer, and a power cut never damages the database.
//!
//! Both modes run `synchronous = NORMAL`, as Glance's own connections do:
//! a power cut never damages the database. In `DELETE` mode that costs
//! each write transaction two `fsync`s (its journal, then the database). So
//! with group durability a commit's row is not written by the committing
//! thread: it is held in memory ([`CacheDriver::insert_batched`]) and
//! written with the other rows and the hits in one transaction, by the
//! background writer within a second (at once past 1 024 rows) and
//! before every checkpoint's sync. This process sees a held entry at once;
//! another serves its file at once (as a file without an entry), and lists
//! it once it is written; the hits it serves meanwhile are written once the
//! row is there (tried again for 10 s). A held row is written only while
//! its file is still the one committed. With `Immediate`, a commit writes
//! its row itself. In WAL mode the log is synced only at its checkpoints,
//! which a background thread runs. A busy
//! timeout lets many threads and processes share one directory.
//!
//! Hits are batched: a read costs one `SELECT`; its hit and access time are
//! held in memory and written with others in one transaction every second,
//! or once 256 images have hits held (`drivers/hits.rs`) by a background thread (so a read
//! never waits for a transaction or a sync), before anything in this
//! process reports or changes metadata, on [`crate::drivers::CacheDriver::flush`],
//! and when the driver is dropped. Another process sees them after that; a
//! process killed outright loses the hits it held.
//!
//! Durability: a row is durable when its transaction commits (`DELETE`) or
//! at the next log checkpoint or durability watermark (WAL). A power loss
//! can drop the rows of the latest commits and the latest hit counts, never
//! half an image: what the watermark does not cover is checked at the next
//! open.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension};

mod held;
mod rows;
mod schema;

use held::{HeldRows, ROW_DELAY, WAIT_FOR_ROW};
use rows::{decode_row, delete_each, write_row, RawRow};
pub(crate) use schema::sqlite_error;
use schema::{classify, open_db, open_db_read_only};

pub use crate::options::SqliteJournal;

mod wal;
use super::hits::{Batch, Held, Hits, HIT_DELAY};
use super::{CacheDriver, Extensions, InvalidReasons, Watermarks};
use crate::clock::{from_epoch_secs, to_epoch_secs};
use crate::entry::{CachedFiles, CachedImageInfo, Invalidation, OnDisk, Scanned, Watermark};
use crate::error::{Error, Result};
use crate::id::ImageId;
use wal::WalMerger;

/// How long a statement waits for another process's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The columns every query of ours selects, in [`decode_row`]'s order.
const COLUMNS: &str = "image_id, size, hits, last_accessed, last_modified, checksum, crc32";

/// [`COLUMNS`] on a database of Glance's that imgcache never upgraded
/// (opened read-only): no CRC-32.
const GLANCE_COLUMNS: &str = "image_id, size, hits, last_accessed, last_modified, checksum, NULL";

/// The metadata driver Glance calls `sqlite`.
#[derive(Clone)]
pub struct SqliteDriver {
    inner: Arc<Inner>,
}

struct Inner {
    db_path: PathBuf,
    /// What the queries of entries select ([`COLUMNS`], or
    /// [`GLANCE_COLUMNS`] on a database opened read-only without them).
    columns: &'static str,
    /// Whether imgcache's own tables are there (not on a Glance database
    /// opened read-only).
    own_tables: bool,
    /// WAL mode: the log is checkpointed in the background.
    wal: bool,
    /// Wakes the writer of batched hits (a full batch): reads never write
    /// (or sync) metadata themselves.
    hit_writer: std::sync::mpsc::SyncSender<()>,
    conn: Arc<Mutex<Connection>>,
    wal_merger: WalMerger,
    /// Hits counted in memory and not yet written (see `hits.rs`): a read
    /// costs a `SELECT`; the batch is written in one transaction.
    hits: Mutex<Hits<()>>,
    /// Entries of commits made with group durability, not yet written
    /// ([`CacheDriver::insert_batched`]): written with the hits, in one
    /// transaction, at the latest by the next checkpoint's flush.
    rows: Mutex<HeldRows>,
    /// Hits of images whose row was not there when they were written (an
    /// entry another process holds, not written yet), since when: tried
    /// again with every batch for [`WAIT_FOR_ROW`], then dropped.
    waiting: Mutex<Batch<Instant>>,
    /// One batch written at a time, from the moment it is taken: a flush
    /// that finds the batch empty because the writer thread took it waits
    /// until that batch is written (a process that exits after dropping
    /// its cache loses no hit).
    flushing: Mutex<()>,
}

impl fmt::Debug for SqliteDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDriver")
            .field("db", &self.inner.db_path)
            .finish()
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDriver")
            .field("db", &self.db_path)
            .finish()
    }
}

impl SqliteDriver {
    /// Opens (creating it and its folder if needed, upgrading a database
    /// Glance wrote) the database at `db_path`, in Glance's journal mode
    /// ([`SqliteJournal::Delete`]).
    pub fn open(db_path: &Path) -> Result<Self> {
        Self::open_with(db_path, SqliteJournal::Delete)
    }

    /// [`SqliteDriver::open`] with the journal mode `journal`. A database
    /// another process holds open in another mode keeps that one (with a
    /// warning) until the last of them closes it.
    pub fn open_with(db_path: &Path, journal: SqliteJournal) -> Result<Self> {
        if let Some(dir) = db_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        let conn = Arc::new(Mutex::new(open_db(db_path, journal).map_err(classify)?));
        let wal = journal == SqliteJournal::Wal;
        let wal_merger = WalMerger::spawn(db_path, Arc::downgrade(&conn))?;
        let (hit_writer, wakes) = std::sync::mpsc::sync_channel(1);
        let inner = Arc::new(Inner {
            db_path: db_path.to_path_buf(),
            columns: COLUMNS,
            own_tables: true,
            wal,
            hit_writer,
            conn,
            wal_merger,
            hits: Mutex::default(),
            rows: Mutex::default(),
            waiting: Mutex::default(),
            flushing: Mutex::default(),
        });
        spawn_hit_writer(&inner, wakes)?;
        Ok(SqliteDriver { inner })
    }

    /// Opens the database at `db_path` for reading only, for a user who
    /// may read the cache but not write it (a monitoring account): nothing
    /// is created, upgraded or set, a database Glance wrote is read as it
    /// is (no CRC-32s), and anything that writes fails with a typed error
    /// ([`crate::StoreErrorKind::Unavailable`]). Where the database is in
    /// WAL mode, no process has it open (no `-shm` file) and its folder
    /// cannot be written, it is read as an immutable file.
    pub fn open_read_only(db_path: &Path) -> Result<Self> {
        let (conn, columns, own_tables) = open_db_read_only(db_path).map_err(classify)?;
        let conn = Arc::new(Mutex::new(conn));
        let wal_merger = WalMerger::spawn(db_path, Arc::downgrade(&conn))?;
        // Read-only: hits are never written (no writer thread to wake).
        let (hit_writer, _) = std::sync::mpsc::sync_channel(1);
        Ok(SqliteDriver {
            inner: Arc::new(Inner {
                db_path: db_path.to_path_buf(),
                columns,
                own_tables,
                wal: false,
                hit_writer,
                conn,
                wal_merger,
                hits: Mutex::default(),
                rows: Mutex::default(),
                waiting: Mutex::default(),
                flushing: Mutex::default(),
            }),
        })
    }

    /// Moves database `db` and its side files (`-wal`, `-shm`, `-journal`,
    /// those that exist) into `dir`, each named `{prefix}{its name}`: a
    /// broken database kept for a post-mortem. Nothing may have it open.
    pub fn move_aside(db: &Path, dir: &Path, prefix: &str) -> Result<()> {
        let name = db
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for suffix in crate::id::SQLITE_SIDE_SUFFIXES {
            let from = db.with_file_name(format!("{name}{suffix}"));
            let to = dir.join(format!("{prefix}{name}{suffix}"));
            match std::fs::rename(&from, &to) {
                Ok(()) => tracing::warn!("imgcache: moved {} to {}", from.display(), to.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("rename", &from, e)),
            }
        }
        Ok(())
    }

    /// With [`SqliteJournal::Wal`]: merges the write-ahead log into the
    /// database file now (what SQLite calls a `PASSIVE` WAL checkpoint: it
    /// does not wait for other connections; this crate keeps the word
    /// "checkpoint" for the durability watermark). The driver does this by
    /// itself in the background; call it before copying the database file,
    /// for instance.
    pub fn merge_wal(&self) -> Result<()> {
        self.with_conn(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())))
    }

    /// How many merges of the write-ahead log into the database this
    /// driver's background thread has completed.
    pub fn wal_merges(&self) -> u64 {
        self.inner.wal_merger.completed()
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    /// Every decodable row, ordered by id (for a migration).
    pub(crate) fn entries(&self) -> Result<Vec<CachedImageInfo>> {
        self.rows("image_id")
    }

    /// Deletes the rows of `ids` (once a migration has moved them).
    pub(crate) fn delete(&self, ids: &[ImageId]) -> Result<usize> {
        self.inner.flush_pending()?;
        self.delete_rows(ids)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.inner.with_conn(f)
    }
}

impl Inner {
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock();
        f(&mut conn).map_err(|e| sqlite_error(&self.db_path, e))
    }

    /// Writes the entries and hits held in memory, in one transaction:
    /// the entries first (each only while its file is the one committed),
    /// then the hits (counted after their entry was held).
    fn flush_pending(&self) -> Result<()> {
        let _one = self.flushing.lock();
        let pending = {
            let mut hits = self.hits.lock();
            if hits.is_empty() {
                None
            } else {
                Some(hits.take())
            }
        };
        let waiting = std::mem::take(&mut *self.waiting.lock());
        if pending.is_none() && waiting.is_empty() && self.rows.lock().is_empty() {
            return Ok(());
        }
        let mut rows = HeldRows::default();
        let mut still_waiting = Batch::new();
        let written = self.with_write(|c| {
            // Taken under the connection's lock: a lookup that misses the
            // held entry waits for this transaction and finds its row.
            rows = self.rows.lock().take();
            // IMMEDIATE where entries are written: each file's check and its
            // row's write are not interleaved with another process's removal
            // (which unlinks the file, then deletes the row in a write
            // transaction). Hits alone take the write lock only if a row
            // changes.
            let tx = c.transaction_with_behavior(if rows.is_empty() {
                rusqlite::TransactionBehavior::Deferred
            } else {
                rusqlite::TransactionBehavior::Immediate
            })?;
            for held in rows.by_id.values() {
                if held.still_in_place() {
                    write_row(&tx, "INSERT OR REPLACE", &held.entry)?;
                }
            }
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE cached_images SET hits = hits + ?2, last_accessed = ?3
                     WHERE image_id = ?1",
                )?;
                let now = Instant::now();
                let fresh = pending
                    .iter()
                    .flatten()
                    .map(|(id, h)| (id, h.hits, h.last, now));
                let again = waiting.iter().map(|(id, h)| (id, h.hits, h.last, h.of));
                for (id, hits, last, since) in fresh.chain(again) {
                    let n = stmt.execute(params![id.as_str(), hits as i64, to_epoch_secs(last)])?;
                    // No row (yet): another process holds the entry of the
                    // file these hits were served from.
                    if n == 0 && since.elapsed() < WAIT_FOR_ROW {
                        let w = still_waiting.entry(id.clone()).or_insert(Held {
                            hits: 0,
                            last,
                            of: since,
                        });
                        w.hits += hits;
                        w.last = w.last.max(last);
                        w.of = w.of.min(since);
                    }
                }
            }
            tx.commit()
        });
        if written.is_ok() {
            *self.waiting.lock() = still_waiting;
        }
        // A transaction that failed applied nothing: the entries and hits
        // are held again, for the next try (a database busy for longer
        // than the timeout, a full disk); an entry held meanwhile for the
        // same id is the later one.
        if written.is_err() {
            self.rows.lock().restore(rows);
            if let Some(pending) = pending {
                self.hits.lock().restore(pending);
            }
            *self.waiting.lock() = waiting;
        }
        written
    }

    /// Like `with_conn`, for statements that write: counts the write for the
    /// log's merger.
    fn with_write<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let out = self.with_conn(f);
        if self.wal {
            self.wal_merger.wrote();
        }
        out
    }
}

impl SqliteDriver {
    /// Decodes rows, logging and passing over those that do not decode.
    fn collect_rows(
        &self,
        rows: Vec<std::result::Result<CachedImageInfo, String>>,
    ) -> Vec<CachedImageInfo> {
        rows.into_iter()
            .filter_map(|r| {
                r.map_err(|e| {
                    tracing::warn!("imgcache: {}: skipping {e}", self.inner.db_path.display())
                })
                .ok()
            })
            .collect()
    }

    /// One row, as written (without the hits held in memory).
    fn row(&self, id: &ImageId) -> Result<Option<CachedImageInfo>> {
        let row = self.with_conn(|c| {
            c.prepare_cached(&format!(
                "SELECT {} FROM cached_images WHERE image_id = ?1",
                self.inner.columns
            ))?
            .query_row([id.as_str()], decode_row)
            .optional()
        })?;
        match row {
            None => Ok(None),
            Some(Ok(info)) => Ok(Some(info)),
            Some(Err(detail)) => Err(Error::CorruptMetadata {
                path: self.inner.db_path.clone(),
                detail,
            }),
        }
    }

    fn delete_rows(&self, ids: &[ImageId]) -> Result<usize> {
        self.inner.with_write(|c| {
            delete_each(
                c,
                "DELETE FROM cached_images WHERE image_id = ?1",
                ids.iter().map(|i| i.as_str()),
            )
        })
    }

    /// Every decodable row, in `order` (logging and passing over the rest).
    fn rows(&self, order: &str) -> Result<Vec<CachedImageInfo>> {
        self.inner.flush_pending()?;
        let rows = self.with_conn(|c| {
            c.prepare_cached(&format!(
                "SELECT {} FROM cached_images ORDER BY {order}",
                self.inner.columns
            ))?
            .query_map([], decode_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(self.collect_rows(rows))
    }
}

/// Starts the thread that writes batched hits and held entries when a
/// read or a commit finds the batch due (and at least every second while
/// hits are held, every half second while entries are); it ends with the
/// store, whose drop writes what is left.
fn spawn_hit_writer(inner: &Arc<Inner>, wakes: std::sync::mpsc::Receiver<()>) -> Result<()> {
    use std::sync::mpsc::RecvTimeoutError;
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("imgcache-sqlite-hits".into())
        .spawn(move || loop {
            let woken = wakes.recv_timeout(HIT_DELAY.min(ROW_DELAY));
            if let Err(RecvTimeoutError::Disconnected) = woken {
                return;
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let due = {
                let hits = inner.hits.lock();
                let rows = inner.rows.lock();
                let waiting = !inner.waiting.lock().is_empty();
                (!hits.is_empty() || !rows.is_empty() || waiting)
                    && (woken.is_ok() || hits.due() || rows.due() || waiting)
            };
            if due {
                if let Err(e) = inner.flush_pending() {
                    tracing::warn!(
                        "imgcache: {}: hits and entries not written yet: {e}",
                        inner.db_path.display()
                    );
                }
            }
        })
        .map_err(|e| Error::io("start the hit writer for", &inner.db_path, e))?;
    Ok(())
}

impl Drop for SqliteDriver {
    fn drop(&mut self) {
        // The hit writer thread may hold the last reference for a moment
        // (and be cut off by the process's exit): write what is held now,
        // after any batch in flight.
        if let Err(e) = self.inner.flush_pending() {
            tracing::warn!(
                "imgcache: {}: hits not written: {e}",
                self.inner.db_path.display()
            );
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.flush_pending() {
            tracing::warn!(
                "imgcache: {}: hits not written: {e}",
                self.db_path.display()
            );
        }
    }
}

impl SqliteDriver {
    /// Counts one hit of `id` at `at` in memory; returns the hits pending
    /// for it and whether the batch is full (to be written at once; the
    /// writer thread, which wakes every `ROW_DELAY`, writes the others
    /// once the first is a [`HIT_DELAY`] old: within 1.5 s).
    fn count_hit(&self, id: &ImageId, at: SystemTime) -> (u64, bool) {
        let mut hits = self.inner.hits.lock();
        let pending = hits.add(id, at, || ());
        // The writer thread keeps the time (it wakes at least every
        // ROW_DELAY): a hit reads no clock for it.
        (pending, hits.full())
    }

    /// Every row, decoded or not, with its raw id (for recovery).
    fn all_rows(&self) -> Result<Vec<RawRow>> {
        self.with_conn(|c| {
            c.prepare(&format!(
                "SELECT {}, rowid FROM cached_images",
                self.inner.columns
            ))?
            .query_map([], |r| {
                let raw = match r.get_ref(0)? {
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    other => format!("{other:?}"),
                };
                Ok((r.get::<_, i64>(7)?, raw, decode_row(r)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
    }
}

impl CacheDriver for SqliteDriver {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn get(&self, id: &ImageId, file: OnDisk<'_>) -> Result<Option<CachedImageInfo>> {
        // The row as written (or the entry held), plus the hits held in
        // memory: no write.
        let held = self.inner.rows.lock().get(id, file).cloned();
        let Some(mut info) = held.map_or_else(|| self.row(id), |h| Ok(Some(h)))? else {
            return Ok(None);
        };
        if let Some(w) = self.inner.waiting.lock().get(id) {
            info.hits += w.hits;
        }
        if let Some(held) = self.inner.hits.lock().get(id) {
            info.hits += held.hits;
            // As the column will hold it.
            if let Some(t) = from_epoch_secs(to_epoch_secs(held.last)) {
                info.last_accessed = t;
            }
        }
        Ok(Some(info))
    }

    fn hit(
        &self,
        id: &ImageId,
        at: SystemTime,
        file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>> {
        // One SELECT, none for a file the file layer vouches for; the hit
        // is counted in memory and written with others.
        let row = match file.known() {
            Some(known) => Some(known.clone()),
            None => {
                let held = self.inner.rows.lock().get(id, file).cloned();
                match held {
                    Some(entry) => Some(entry),
                    None => self.row(id)?,
                }
            }
        };
        let Some(mut info) = row else {
            // A file in place without a row: likely another process's
            // commit whose entry it holds. The cache serves it; the hit
            // is counted, and written once that row is there.
            let (_, due) = self.count_hit(id, at);
            if due {
                let _ = self.inner.hit_writer.try_send(());
            }
            return Ok(None);
        };
        let (pending, due) = self.count_hit(id, at);
        info.hits += pending;
        info.last_accessed = at;
        if due {
            // The writer thread writes the batch: a read never waits for a
            // transaction (or its sync). A wake already pending serves.
            let _ = self.inner.hit_writer.try_send(());
        }
        Ok(Some(info))
    }

    fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, _file: OnDisk<'_>) -> Result<()> {
        let full = {
            let mut hits = self.inner.hits.lock();
            hits.add_n(id, n, at, || ());
            hits.full()
        };
        if full {
            let _ = self.inner.hit_writer.try_send(());
        }
        Ok(())
    }

    fn insert(&self, entry: &CachedImageInfo) -> Result<()> {
        // An entry held for an earlier image of this id is replaced; hits
        // pending for it go to its row, which this one then replaces.
        self.inner.rows.lock().forget(&entry.id);
        self.inner.flush_pending()?;
        self.inner
            .with_write(|c| write_row(c, "INSERT OR REPLACE", entry))?;
        Ok(())
    }

    fn insert_batched(&self, entry: &CachedImageInfo, file: OnDisk<'_>) -> Result<()> {
        if !self.inner.own_tables {
            return self.insert(entry);
        }
        // Held, to be written with others. Hits held for an earlier image
        // of this id belonged to it: the new entry starts at none.
        self.inner
            .hits
            .lock()
            .forget(std::slice::from_ref(&entry.id));
        self.inner.waiting.lock().remove(&entry.id);
        let due = self.inner.rows.lock().hold(entry, file);
        if due {
            let _ = self.inner.hit_writer.try_send(());
        }
        Ok(())
    }

    fn remove(&self, ids: &[ImageId], still_gone: &dyn Fn(&ImageId) -> bool) -> Result<usize> {
        // Entries held here whose file is gone are dropped before they are
        // written.
        let mut forgot = std::collections::HashSet::new();
        {
            let mut rows = self.inner.rows.lock();
            for id in ids.iter().filter(|id| still_gone(id)) {
                if rows.forget(id) {
                    forgot.insert(id);
                }
            }
        }
        // Most misses have no row at all: a read, no write transaction
        // (whether a row is there, not what it says: it may not decode).
        let mut any = false;
        for id in ids {
            let there = self.with_conn(|c| {
                c.prepare_cached("SELECT 1 FROM cached_images WHERE image_id = ?1")?
                    .exists([id.as_str()])
            })?;
            if there {
                any = true;
                break;
            }
        }
        if !any {
            return Ok(forgot.len());
        }
        self.inner.flush_pending()?;
        // The checks and the deletes in one write transaction: a commit
        // renames its file before it writes its row, so a commit racing with
        // this either has its file seen here, or writes its row after this
        // transaction — a fresh row is never taken for a stale one.
        self.inner.with_write(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut n = 0;
            {
                let mut stmt =
                    tx.prepare_cached("DELETE FROM cached_images WHERE image_id = ?1")?;
                for id in ids.iter().filter(|id| still_gone(id)) {
                    // An id whose held entry went counts once.
                    if stmt.execute([id.as_str()])? > 0 && !forgot.contains(id) {
                        n += 1;
                    }
                }
            }
            tx.commit()?;
            Ok(n + forgot.len())
        })
    }

    fn set_crc32(&self, id: &ImageId, crc32: u32, _file: OnDisk<'_>) -> Result<()> {
        if let Some(held) = self.inner.rows.lock().get_mut(id) {
            held.crc32 = Some(crc32);
            return Ok(());
        }
        self.inner.flush_pending()?;
        self.inner.with_write(|c| {
            c.prepare_cached("UPDATE cached_images SET crc32 = ?2 WHERE image_id = ?1")?
                .execute(params![id.as_str(), crc32 as i64])
        })?;
        Ok(())
    }

    fn list(&self, _files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>> {
        self.rows("image_id")
    }

    fn total_size(&self, _files: &dyn CachedFiles) -> Result<u64> {
        // The rows plus the entries held (admission asks before every
        // fill: it must not write them, nor the hits, which sizes do not
        // need). Held under the connection's lock, as a flush takes them:
        // none is counted twice or missed.
        let total: (i64, u64) = self.with_conn(|c| {
            let rows: i64 = c
                .prepare_cached("SELECT COALESCE(SUM(MAX(size, 0)), 0) FROM cached_images")?
                .query_row([], |r| r.get(0))?;
            Ok((rows, self.inner.rows.lock().size()))
        })?;
        Ok(u64::try_from(total.0).unwrap_or(0).saturating_add(total.1))
    }

    fn scan(&self, _files: &dyn CachedFiles) -> Result<Vec<Scanned>> {
        self.inner.flush_pending()?;
        let mut out = Vec::new();
        let mut unusable = Vec::new();
        for (rowid, raw, decoded) in self.all_rows()? {
            match decoded {
                Ok(info) => out.push(Scanned::Entry(info)),
                Err(detail) => match ImageId::new(&raw) {
                    Ok(id) => out.push(Scanned::Corrupt { id, detail }),
                    // An id that is no safe file name never reaches the
                    // file system: only its row goes.
                    Err(_) => {
                        tracing::warn!(
                            "imgcache: dropping row {raw:?} of {}: {detail}",
                            self.inner.db_path.display()
                        );
                        unusable.push(rowid);
                    }
                },
            }
        }
        if !unusable.is_empty() {
            self.inner.with_write(|c| {
                delete_each(c, "DELETE FROM cached_images WHERE rowid = ?1", unusable)
            })?;
        }
        Ok(out)
    }

    fn adopt(&self, orphans: &[(CachedImageInfo, OnDisk<'_>)]) -> Result<Vec<ImageId>> {
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        // OR IGNORE: a committer that writes its row meanwhile knows better
        // (it has the CRC). One transaction for them all; IMMEDIATE, so
        // that a file seen in place here is not removed (file, then row, in
        // its own write transaction) before its row is written.
        self.inner.with_write(|c| {
            use std::os::unix::fs::MetadataExt;
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut adopted = Vec::new();
            for (entry, file) in orphans {
                let listed = file.metadata();
                let in_place = std::fs::symlink_metadata(file.path())
                    .is_ok_and(|m| (m.dev(), m.ino()) == (listed.dev(), listed.ino()));
                if in_place && write_row(&tx, "INSERT OR IGNORE", entry)? == 1 {
                    adopted.push(entry.id.clone());
                }
            }
            tx.commit()?;
            Ok(adopted)
        })
    }

    fn next_queue_seq(&self, _queue: OnDisk<'_>) -> Result<u64> {
        let v: i64 = self.inner.with_write(|c| {
            c.prepare_cached(
                "INSERT INTO imgcache_state (key, value) VALUES ('queue_seq', 1)
                 ON CONFLICT (key) DO UPDATE SET value = value + 1
                 RETURNING value",
            )?
            .query_row([], |r| r.get(0))
        })?;
        u64::try_from(v).map_err(|_| Error::CorruptMetadata {
            path: self.inner.db_path.clone(),
            detail: format!("queue counter is negative ({v})"),
        })
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush_pending()
    }

    fn extensions(&self) -> Extensions<'_> {
        Extensions::default()
            .with_invalid_reasons(self)
            .with_watermarks(self)
            .with_files(std::slice::from_ref(&self.inner.db_path))
    }
}

impl InvalidReasons for SqliteDriver {
    fn invalidate(&self, why: &Invalidation, _file: OnDisk<'_>) -> Result<()> {
        self.inner.with_write(|c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO imgcache_invalid (image_id, reason, invalidated_at)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![why.id.as_str(), why.reason, to_epoch_secs(why.at)])
        })?;
        Ok(())
    }

    fn invalid_reason(
        &self,
        id: &ImageId,
        _file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)> {
        if !self.inner.own_tables {
            return Ok((None, None));
        }
        let row = self.with_conn(|c| {
            c.prepare_cached(
                "SELECT reason, invalidated_at FROM imgcache_invalid WHERE image_id = ?1",
            )?
            .query_row([id.as_str()], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<f64>>(1)?))
            })
            .optional()
        })?;
        let (reason, at) = row.unwrap_or((None, None));
        Ok((reason, at.and_then(from_epoch_secs)))
    }

    fn forget_invalid(&self, ids: &[ImageId]) -> Result<()> {
        if !ids.is_empty() {
            self.inner.with_write(|c| {
                delete_each(
                    c,
                    "DELETE FROM imgcache_invalid WHERE image_id = ?1",
                    ids.iter().map(|i| i.as_str()),
                )
            })?;
        }
        Ok(())
    }
}

impl Watermarks for SqliteDriver {
    fn durable_watermark(&self, _base: OnDisk<'_>) -> Result<Option<Watermark>> {
        let get = |c: &Connection, key: &str| -> rusqlite::Result<Option<i64>> {
            c.prepare_cached("SELECT value FROM imgcache_state WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()
        };
        let (committed, changed) = self
            .inner
            .with_conn(|c| Ok((get(c, "watermark_committed")?, get(c, "watermark_changed")?)))?;
        Ok(match (committed, changed) {
            (Some(a), Some(b)) => Some(Watermark::from_micros(a, b)),
            _ => None,
        })
    }

    fn record_watermark(&self, mark: Watermark, _base: OnDisk<'_>) -> Result<()> {
        let (committed, changed) = mark.to_micros();
        self.inner.with_write(|c| {
            // This one transaction is synced when it commits (the WAL is
            // `fsync`ed): the watermark must be on disk when it returns.
            c.pragma_update(None, "synchronous", "FULL")?;
            let done = (|| {
                // Each half only moves forwards: each is a claim of its own.
                let tx = c.transaction()?;
                {
                    let mut put = tx.prepare_cached(
                        "INSERT INTO imgcache_state (key, value) VALUES (?1, ?2)
                         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    )?;
                    put.execute(params!["watermark_committed", committed])?;
                    put.execute(params!["watermark_changed", changed])?;
                }
                tx.commit()
            })();
            c.pragma_update(None, "synchronous", "NORMAL")?;
            done
        })
    }
}

#[cfg(test)]
mod tests;
