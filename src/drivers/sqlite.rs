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
//! each write transaction two `fsync`s (its journal, then the database): a
//! commit pays them on the committing thread, so with group durability the
//! SQLite store's commits are not free of syncs as the other stores' are
//! (`benches/compare.rs` measures it against WAL). In WAL mode the log is
//! synced only at its checkpoints, which a background thread runs. A busy
//! timeout lets many threads and processes share one directory.
//!
//! Hits are batched: a read costs one `SELECT`; its hit and access time are
//! held in memory and written with others in one transaction every
//! 256 hits or a second (`drivers/hits.rs`) by a background thread (so a read
//! never waits for a transaction or a sync), before anything in this
//! process reports or changes metadata, on [`crate::CacheDriver::flush`],
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
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::checkpoint::Checkpointer;
use super::hits::{Hits, HIT_DELAY};
use super::CacheDriver;
use crate::clock::{from_epoch_secs, to_epoch_secs};
use crate::entry::{
    CachedFiles, CachedImageInfo, Invalidation, LruEntry, OnDisk, Scanned, Watermark,
};
use crate::error::{Error, Result, StoreError};
use crate::id::ImageId;

/// How long a statement waits for another process's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The columns every query of ours selects, in [`decode_row`]'s order.
const COLUMNS: &str = "image_id, size, hits, last_accessed, last_modified, checksum, crc32";

/// [`COLUMNS`] on a database of Glance's that imgcache never upgraded
/// (opened read-only): no CRC-32.
const GLANCE_COLUMNS: &str = "image_id, size, hits, last_accessed, last_modified, checksum, NULL";

/// How the SQLite store journals its writes; see the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqliteJournal {
    /// Glance's own mode (the default): a rollback journal that exists only
    /// while a write is under way, so Glance's drivers, which take every
    /// regular file beside the database for an image, see only images.
    #[default]
    Delete,
    /// SQLite's write-ahead log, for caches Glance never touches: readers
    /// never wait for a writer, and a power cut never damages the database;
    /// but `cache.db-wal` and `cache.db-shm` sit in the base directory while
    /// the database is open, where Glance would count and delete them.
    Wal,
}

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
    checkpointer: Checkpointer,
    /// Hits counted in memory and not yet written (see `hits.rs`): a read
    /// costs a `SELECT`; the batch is written in one transaction.
    hits: Mutex<Hits<()>>,
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
        let checkpointer = Checkpointer::spawn(db_path, Arc::downgrade(&conn))?;
        let (hit_writer, wakes) = std::sync::mpsc::sync_channel(1);
        let inner = Arc::new(Inner {
            db_path: db_path.to_path_buf(),
            columns: COLUMNS,
            own_tables: true,
            wal,
            hit_writer,
            conn,
            checkpointer,
            hits: Mutex::default(),
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
        let checkpointer = Checkpointer::spawn(db_path, Arc::downgrade(&conn))?;
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
                checkpointer,
                hits: Mutex::default(),
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
                Ok(()) => log::warn!("imgcache: moved {} to {}", from.display(), to.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("rename", &from, e)),
            }
        }
        Ok(())
    }

    /// Checkpoints the write-ahead log into the database file now (a
    /// `PASSIVE` checkpoint: it does not wait for other connections). The
    /// driver does this by itself in the background; call it before copying
    /// the database file, for instance.
    pub fn checkpoint(&self) -> Result<()> {
        self.with_conn(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())))
    }

    /// How many background checkpoints of the write-ahead log this driver
    /// has completed.
    pub fn background_checkpoints(&self) -> u64 {
        self.inner.checkpointer.completed()
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
        self.inner.flush_hits()?;
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

    /// Writes the hits held in memory, in one transaction.
    fn flush_hits(&self) -> Result<()> {
        let pending = {
            let mut hits = self.hits.lock();
            if hits.is_empty() {
                return Ok(());
            }
            hits.take()
        };
        let written = self.with_write(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE cached_images SET hits = hits + ?2, last_accessed = ?3
                     WHERE image_id = ?1",
                )?;
                for (id, held) in &pending {
                    stmt.execute(params![
                        id.as_str(),
                        held.hits as i64,
                        to_epoch_secs(held.last)
                    ])?;
                }
            }
            tx.commit()
        });
        // A transaction that failed applied nothing: the hits are held
        // again, for the next try (a database busy for longer than the
        // timeout, a full disk).
        if written.is_err() {
            self.hits.lock().restore(pending);
        }
        written
    }

    /// Like `with_conn`, for statements that write: counts the write for the
    /// checkpointer.
    fn with_write<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let out = self.with_conn(f);
        if self.wal {
            self.checkpointer.wrote();
        }
        out
    }
}

/// A SQLite error on the database at `path`, as the crate's own error: the
/// source kept, its kind told ([`crate::StoreErrorKind`]).
pub(crate) fn sqlite_error(path: &Path, e: rusqlite::Error) -> Error {
    use crate::error::StoreErrorKind as Kind;
    let kind = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => Kind::Busy,
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            Kind::Corrupt
        }
        Some(rusqlite::ErrorCode::DiskFull) => Kind::NoSpace,
        Some(
            rusqlite::ErrorCode::CannotOpen
            | rusqlite::ErrorCode::PermissionDenied
            | rusqlite::ErrorCode::ReadOnly,
        ) => Kind::Unavailable,
        _ => Kind::Other,
    };
    Error::Store(StoreError::new(
        kind,
        "sqlite",
        path.display().to_string(),
        e,
    ))
}

/// Turns "this is not a database" errors into [`Error::BadDatabase`].
fn classify(e: Error) -> Error {
    match e {
        Error::Store(store) if store.kind() == crate::error::StoreErrorKind::Corrupt => {
            Error::BadDatabase {
                path: PathBuf::from(store.location()),
                detail: store.detail(),
            }
        }
        other => other,
    }
}

/// Opens a connection with the settings every one of ours has: the busy
/// timeout, and no automatic checkpoints (see the checkpoint module).
fn connect(path: &Path) -> Result<Connection> {
    let err = |e| sqlite_error(path, e);
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(err)?;
    // A log that grew while checkpoints could not keep up is cut back to
    // this size when it is next reset.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(err)?;
    Ok(conn)
}

/// Opens the database read-only and tells what it holds: the columns to
/// select, and whether imgcache's own tables are there.
fn open_db_read_only(path: &Path) -> Result<(Connection, &'static str, bool)> {
    use rusqlite::OpenFlags;
    let err = |e| sqlite_error(path, e);
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let probe = |conn: Connection| -> rusqlite::Result<(Connection, Vec<String>, bool)> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let columns = {
            let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('cached_images')")?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            names
        };
        let own: bool = conn.query_row(
            "SELECT COUNT(*) = 2 FROM sqlite_master
             WHERE type = 'table' AND name IN ('imgcache_invalid', 'imgcache_state')",
            [],
            |r| r.get(0),
        )?;
        Ok((conn, columns, own))
    };
    if !path.is_file() {
        return Err(Error::io(
            "open",
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let opened = Connection::open_with_flags(path, flags).and_then(probe);
    let (conn, columns, own) = match opened {
        Ok(x) => x,
        // A WAL database no process has open, in a folder this user cannot
        // write: SQLite cannot make the `-shm` file it reads through. With
        // no writer (there is no `-shm`), the file alone is the database.
        Err(e)
            if matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
            ) && wal_file_nobody_writes(path) =>
        {
            let uri = format!("file:{}?immutable=1", uri_path(path));
            log::info!(
                "imgcache: {} read as an immutable file (its -shm cannot be made here)",
                path.display()
            );
            Connection::open_with_flags(uri, flags)
                .and_then(probe)
                .map_err(err)?
        }
        Err(e) => return Err(err(e)),
    };
    if columns.is_empty() {
        return Err(Error::BadDatabase {
            path: path.to_path_buf(),
            detail: "it has no table cached_images".into(),
        });
    }
    let select = if columns.iter().any(|c| c == "crc32") {
        COLUMNS
    } else {
        GLANCE_COLUMNS
    };
    Ok((conn, select, own))
}

/// Whether `db` is a WAL database with neither a WAL index (`-shm`: some
/// process has it open, or had until a crash) nor a log or rollback journal
/// beside it: then the file alone is the whole database, and reading it as
/// an immutable file reads what was committed. (A rollback journal left by
/// a crash must be rolled back by a writer first: ignoring it would read a
/// half-written transaction.)
fn wal_file_nobody_writes(db: &Path) -> bool {
    use std::io::Read;
    let beside = |suffix: &str| {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        Path::new(&p).exists()
    };
    if beside("-shm") || beside("-wal") || beside("-journal") {
        return false;
    }
    // Bytes 18 and 19 of the header: the file format's write and read
    // versions, 2 for WAL.
    let mut header = [0u8; 20];
    std::fs::File::open(db)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| header[18] == 2 && header[19] == 2)
}

/// `path` as the path of a SQLite URI: the characters a URI gives a
/// meaning to are escaped.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        match b {
            b'%' | b'?' | b'#' => out.push_str(&format!("%{b:02X}")),
            b if b.is_ascii_graphic() || b == b' ' => out.push(b as char),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Opens the database, sets it up for sharing, and creates or upgrades the
/// schema.
fn open_db(path: &Path, journal: SqliteJournal) -> Result<Connection> {
    let err = |e| sqlite_error(path, e);
    let mut conn = connect(path)?;
    let want = match journal {
        SqliteJournal::Delete => "delete",
        SqliteJournal::Wal => "wal",
    };
    let mode: String = conn
        .query_row(&format!("PRAGMA journal_mode = {want}"), [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case(want) {
        log::warn!(
            "imgcache: {} stays in journal mode {mode} (another process has it open): \
             {want} from when the last of them closes it",
            path.display()
        );
    }
    // NORMAL, as Glance's own connections: in WAL mode the log is synced at
    // its checkpoints only; in DELETE mode each transaction syncs its
    // journal and the database, so a power cut never damages the file (a
    // database Glance shares must stay one Glance can open).
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS cached_images (
             image_id TEXT PRIMARY KEY,
             last_accessed REAL DEFAULT 0.0,
             last_modified REAL DEFAULT 0.0,
             size INTEGER DEFAULT 0,
             hits INTEGER DEFAULT 0,
             checksum TEXT
         );
         CREATE TABLE IF NOT EXISTS imgcache_invalid (
             image_id TEXT PRIMARY KEY,
             reason TEXT,
             invalidated_at REAL
         );
         CREATE TABLE IF NOT EXISTS imgcache_state (
             key TEXT PRIMARY KEY,
             value INTEGER NOT NULL
         );",
    )
    .map_err(err)?;
    let columns: Vec<String> = {
        let mut stmt = tx
            .prepare("SELECT name FROM pragma_table_info('cached_images')")
            .map_err(err)?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(err)?;
        names
    };
    for needed in [
        "image_id",
        "last_accessed",
        "last_modified",
        "size",
        "hits",
        "checksum",
    ] {
        if !columns.iter().any(|c| c == needed) {
            return Err(Error::BadDatabase {
                path: path.to_path_buf(),
                detail: format!("its table cached_images has no column {needed}"),
            });
        }
    }
    if !columns.iter().any(|c| c == "crc32") {
        tx.execute_batch("ALTER TABLE cached_images ADD COLUMN crc32 INTEGER")
            .map_err(err)?;
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS imgcache_lru ON cached_images (last_accessed, image_id)",
    )
    .map_err(err)?;
    tx.commit().map_err(err)?;
    Ok(conn)
}

/// Reads a number SQLite may hold as INTEGER, REAL or NULL (Glance's
/// defaults).
fn real(v: ValueRef<'_>, what: &str) -> std::result::Result<f64, String> {
    match v {
        ValueRef::Null => Ok(0.0),
        ValueRef::Integer(i) => Ok(i as f64),
        ValueRef::Real(f) if f.is_finite() => Ok(f),
        other => Err(format!("{what} is {other:?}, not a number")),
    }
}

fn count(v: ValueRef<'_>, what: &str) -> std::result::Result<u64, String> {
    match v {
        ValueRef::Null => Ok(0),
        ValueRef::Integer(i) => u64::try_from(i).map_err(|_| format!("{what} is negative ({i})")),
        other => Err(format!("{what} is {other:?}, not a whole number")),
    }
}

fn time(v: ValueRef<'_>, what: &str) -> std::result::Result<SystemTime, String> {
    let secs = real(v, what)?;
    from_epoch_secs(secs).ok_or_else(|| format!("{what} {secs} is not a time"))
}

/// Decodes one row of `image_id, size, hits, last_accessed, last_modified,
/// checksum, crc32`. Errors describe the bad field; the
/// caller names the database.
fn decode_row(row: &Row<'_>) -> rusqlite::Result<std::result::Result<CachedImageInfo, String>> {
    let id = match row.get_ref(0)? {
        ValueRef::Text(t) => match std::str::from_utf8(t).ok().map(ImageId::new) {
            Some(Ok(id)) => id,
            _ => {
                return Ok(Err(format!(
                    "image_id {:?} is not a valid id",
                    String::from_utf8_lossy(t)
                )))
            }
        },
        other => return Ok(Err(format!("image_id is {other:?}, not text"))),
    };
    let decoded = (|| {
        let checksum = match row.get_ref(5).map_err(|e| e.to_string())? {
            ValueRef::Null => None,
            ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            other => return Err(format!("checksum is {other:?}, not text")),
        };
        let crc32 = match row.get_ref(6).map_err(|e| e.to_string())? {
            ValueRef::Null => None,
            ValueRef::Integer(i) => {
                Some(u32::try_from(i).map_err(|_| format!("crc32 {i} is out of range"))?)
            }
            other => return Err(format!("crc32 is {other:?}, not an integer")),
        };
        let get = |i| row.get_ref(i).map_err(|e| e.to_string());
        Ok(CachedImageInfo {
            size: count(get(1)?, "size")?,
            hits: count(get(2)?, "hits")?,
            last_accessed: time(get(3)?, "last_accessed")?,
            last_modified: time(get(4)?, "last_modified")?,
            checksum,
            crc32,
            id: id.clone(),
        })
    })();
    Ok(decoded.map_err(|e| format!("row {id}: {e}")))
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
                    log::warn!("imgcache: {}: skipping {e}", self.inner.db_path.display())
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
        self.inner.flush_hits()?;
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

/// Starts the thread that writes batched hits when a read finds the batch
/// due (and at least every second while hits are held); it ends with
/// the store, whose drop writes what is left.
fn spawn_hit_writer(inner: &Arc<Inner>, wakes: std::sync::mpsc::Receiver<()>) -> Result<()> {
    use std::sync::mpsc::RecvTimeoutError;
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("imgcache-sqlite-hits".into())
        .spawn(move || loop {
            let woken = wakes.recv_timeout(HIT_DELAY);
            if let Err(RecvTimeoutError::Disconnected) = woken {
                return;
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let due = {
                let hits = inner.hits.lock();
                !hits.is_empty() && (woken.is_ok() || hits.due())
            };
            if due {
                if let Err(e) = inner.flush_hits() {
                    log::warn!(
                        "imgcache: {}: hits not written yet: {e}",
                        inner.db_path.display()
                    );
                }
            }
        })
        .map_err(|e| Error::io("start the hit writer for", &inner.db_path, e))?;
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.flush_hits() {
            log::warn!(
                "imgcache: {}: hits not written: {e}",
                self.db_path.display()
            );
        }
    }
}

/// Writes `entry`'s row with `verb` (`INSERT OR REPLACE`, `INSERT OR
/// IGNORE`); returns how many rows it wrote.
fn write_row(c: &Connection, verb: &str, entry: &CachedImageInfo) -> rusqlite::Result<usize> {
    c.prepare_cached(&format!(
        "{verb} INTO cached_images
         (image_id, last_accessed, last_modified, size, hits, checksum, crc32)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))?
    .execute(params![
        entry.id.as_str(),
        to_epoch_secs(entry.last_accessed),
        to_epoch_secs(entry.last_modified),
        entry.size as i64,
        entry.hits as i64,
        entry.checksum,
        entry.crc32.map(i64::from)
    ])
}

/// Deletes with `sql` (one `?1` parameter) for each of `keys`, in one
/// transaction; returns how many rows went.
fn delete_each<K: rusqlite::ToSql>(
    c: &mut Connection,
    sql: &str,
    keys: impl IntoIterator<Item = K>,
) -> rusqlite::Result<usize> {
    let tx = c.transaction()?;
    let mut n = 0;
    {
        let mut stmt = tx.prepare_cached(sql)?;
        for key in keys {
            n += stmt.execute([key])?;
        }
    }
    tx.commit()?;
    Ok(n)
}

/// A row as recovery sees it: its rowid, its raw id, and the row decoded
/// (or what is wrong with it).
type RawRow = (i64, String, std::result::Result<CachedImageInfo, String>);

impl SqliteDriver {
    /// Counts one hit of `id` at `at` in memory; returns the hits pending
    /// for it and whether the batch is due to be written.
    fn count_hit(&self, id: &ImageId, at: SystemTime) -> (u64, bool) {
        let mut hits = self.inner.hits.lock();
        let pending = hits.add(id, at, || ());
        (pending, hits.due())
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

    fn get(&self, id: &ImageId, _file: OnDisk<'_>) -> Result<Option<CachedImageInfo>> {
        // The row as written, plus the hits held in memory: no write.
        let Some(mut info) = self.row(id)? else {
            return Ok(None);
        };
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
        _file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>> {
        // One SELECT; the hit is counted in memory and written with others.
        let Some(mut info) = self.row(id)? else {
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

    fn insert(&self, entry: &CachedImageInfo) -> Result<()> {
        // Hits pending for an earlier image of this id go to its row, which
        // this one then replaces.
        self.inner.flush_hits()?;
        self.inner
            .with_write(|c| write_row(c, "INSERT OR REPLACE", entry))?;
        Ok(())
    }

    fn remove(&self, ids: &[ImageId]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.inner.flush_hits()?;
        self.delete_rows(ids)
    }

    fn remove_if_missing(&self, ids: &[ImageId], missing: &dyn Fn(&ImageId) -> bool) -> Result<()> {
        // Most misses have no row at all: a read, no write transaction.
        let mut any = false;
        for id in ids {
            if self.row(id)?.is_some() {
                any = true;
                break;
            }
        }
        if !any {
            return Ok(());
        }
        self.inner.flush_hits()?;
        // The checks and the deletes in one write transaction: a commit
        // renames its file before it writes its row, so a commit racing with
        // this either has its file seen here, or writes its row after this
        // transaction — a fresh row is never taken for a stale one.
        self.inner.with_write(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut stmt =
                    tx.prepare_cached("DELETE FROM cached_images WHERE image_id = ?1")?;
                for id in ids.iter().filter(|id| missing(id)) {
                    stmt.execute([id.as_str()])?;
                }
            }
            tx.commit()
        })
    }

    fn set_crc32(&self, id: &ImageId, crc32: u32, _file: OnDisk<'_>) -> Result<()> {
        self.inner.flush_hits()?;
        self.inner.with_write(|c| {
            c.prepare_cached("UPDATE cached_images SET crc32 = ?2 WHERE image_id = ?1")?
                .execute(params![id.as_str(), crc32 as i64])
        })?;
        Ok(())
    }

    fn list(&self, _files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>> {
        self.rows("image_id")
    }

    fn lru(&self, _files: &dyn CachedFiles) -> Result<Vec<LruEntry>> {
        Ok(self
            .rows("last_accessed, image_id")?
            .into_iter()
            .map(LruEntry::from)
            .collect())
    }

    fn total_size(&self, _files: &dyn CachedFiles) -> Result<u64> {
        self.inner.flush_hits()?;
        let total: i64 = self.with_conn(|c| {
            c.prepare_cached("SELECT COALESCE(SUM(MAX(size, 0)), 0) FROM cached_images")?
                .query_row([], |r| r.get(0))
        })?;
        Ok(u64::try_from(total).unwrap_or(0))
    }

    fn scan(&self, _files: &dyn CachedFiles) -> Result<Vec<Scanned>> {
        self.inner.flush_hits()?;
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
                        log::warn!(
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
        // (it has the CRC). One transaction for them all.
        self.inner.with_write(|c| {
            let tx = c.transaction()?;
            let mut adopted = Vec::new();
            for (entry, _) in orphans {
                if write_row(&tx, "INSERT OR IGNORE", entry)? == 1 {
                    adopted.push(entry.id.clone());
                }
            }
            tx.commit()?;
            Ok(adopted)
        })
    }

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

    fn records_watermark(&self) -> bool {
        true
    }

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

    fn flush(&self) -> Result<()> {
        self.inner.flush_hits()
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.inner.db_path.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::{CacheOptions, ImageCache};

    fn open(dir: &Path) -> SqliteDriver {
        SqliteDriver::open(&dir.join("cache.db")).unwrap()
    }

    /// A cache in `dir` over a handle `d` on its store.
    fn cache(dir: &Path, d: &SqliteDriver) -> ImageCache {
        let options = CacheOptions::new(dir).clock(Arc::new(ManualClock::at_secs(1000)));
        ImageCache::with_driver(Arc::new(d.clone()), options).unwrap()
    }

    /// The store keeps no metadata on files: it never asks for them.
    struct NoFiles;

    impl CachedFiles for NoFiles {
        fn each_cached(
            &self,
            _open: bool,
            _f: &mut dyn FnMut(&ImageId, OnDisk<'_>) -> Result<()>,
        ) -> Result<()> {
            panic!("the sqlite store walked the files")
        }
    }

    /// `f` on the file at `path`, as the file layer would hand it over.
    fn on_disk<T>(path: &Path, f: impl FnOnce(OnDisk<'_>) -> T) -> T {
        let meta = std::fs::metadata(path).unwrap();
        f(OnDisk::new(path, None, &meta))
    }

    #[test]
    fn lru_order_comes_from_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path());
        let plan: Vec<String> = d
            .with_conn(|c| {
                c.prepare(&format!(
                    "EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM cached_images ORDER BY last_accessed, image_id"
                ))?
                .query_map([], |r| r.get::<_, String>(3))?
                .collect()
            })
            .unwrap();
        let plan = plan.join("; ");
        assert!(plan.contains("imgcache_lru"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    #[test]
    fn wal_mode_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let d = SqliteDriver::open_with(&dir.path().join("cache.db"), SqliteJournal::Wal).unwrap();
        let (mode, cols): (String, Vec<String>) = d
            .with_conn(|c| {
                let mode = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                let cols = c
                    .prepare("SELECT name FROM pragma_table_info('cached_images')")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                Ok((mode, cols))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            cols,
            [
                "image_id",
                "last_accessed",
                "last_modified",
                "size",
                "hits",
                "checksum",
                "crc32"
            ]
        );
    }

    #[test]
    fn decodes_glance_defaults_and_refuses_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path());
        d.with_conn(|c| {
            c.execute_batch(
                "INSERT INTO cached_images (image_id) VALUES ('defaults');
                 INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits)
                     VALUES ('ints', 5, 6, 7, 8);
                 INSERT INTO cached_images (image_id, size) VALUES ('neg', -1);
                 INSERT INTO cached_images (image_id, hits) VALUES ('text', 'many');
                 INSERT INTO cached_images (image_id) VALUES ('../escape');
                 INSERT INTO cached_images (image_id, crc32) VALUES ('bigcrc', 5000000000);",
            )
        })
        .unwrap();
        let images = d.list(&NoFiles).unwrap();
        let ids: Vec<&str> = images.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["defaults", "ints"]);
        assert_eq!(images[0].size, 0);
        assert_eq!(images[0].crc32, None);
        assert_eq!(images[1].hits, 8);
        assert_eq!(to_epoch_secs(images[1].last_accessed), 5.0);
        std::fs::write(dir.path().join("neg"), b"").unwrap();
        let bad = on_disk(&dir.path().join("neg"), |on| {
            d.get(&ImageId::new("neg").unwrap(), on)
        })
        .unwrap_err();
        assert!(bad.to_string().contains("size is negative"), "{bad}");
        assert!(bad.to_string().contains("cache.db"), "{bad}");
    }

    #[test]
    fn foreign_schema_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cache.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE cached_images (id INTEGER, blob BLOB)")
            .unwrap();
        let e = SqliteDriver::open(&db).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("cache.db") && msg.contains("no column"),
            "{msg}"
        );
    }

    /// A store and a cache on it in a fresh directory holding one
    /// three-byte image.
    /// One image, in a WAL store (whose log the tests below watch).
    fn one_image() -> (tempfile::TempDir, SqliteDriver, ImageCache, ImageId) {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let d = SqliteDriver::open_with(&dir.path().join("cache.db"), SqliteJournal::Wal).unwrap();
        let c = cache(dir.path(), &d);
        let x = ImageId::new("x").unwrap();
        let mut w = c.open_for_write(&x).unwrap();
        w.write_all(b"abc").unwrap();
        w.commit().unwrap();
        (dir, d, c, x)
    }

    /// Every metadata write goes to the log; the background checkpointer
    /// keeps it bounded (without it, it grows by a few KiB per write, for
    /// ever), and readers' hits, batched, add little to it.
    #[test]
    fn wal_stays_bounded_under_metadata_writes() {
        let (dir, d, _c, x) = one_image();
        let file = dir.path().join("x");
        let conn = d.inner.conn.lock();
        let autockpt: i64 = conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(autockpt, 0, "connections never checkpoint inline");
        drop(conn);
        let wal = dir.path().join("cache.db-wal");
        let mut high = 0;
        let mut expected = 0;
        let mut n = 0u32;
        for _ in 0..32 {
            for _ in 0..super::super::checkpoint::CHECKPOINT_EVERY {
                n += 1;
                on_disk(&file, |on| d.set_crc32(&x, n, on)).unwrap();
            }
            expected += 1;
            let got = d
                .inner
                .checkpointer
                .wait_completed(expected, Duration::from_secs(60));
            assert!(got >= expected, "checkpoint {expected} never completed");
            high = high.max(std::fs::metadata(&wal).unwrap().len());
        }
        eprintln!("log high-water mark, pausing between batches: {high} bytes");
        assert!(high < 8 << 20, "log reached {high} bytes");
        assert!(d.background_checkpoints() >= 32);
    }

    /// The same under steady writes and reads, nobody waiting for the
    /// checkpointer; hits are exact once read back.
    #[test]
    fn wal_stays_bounded_under_steady_load() {
        let (dir, d, c, x) = one_image();
        let file = dir.path().join("x");
        let wal = dir.path().join("cache.db-wal");
        let mut high = 0;
        // 65 536 writes would leave ~520 MB of log without checkpoints.
        for i in 0..65_536u32 {
            on_disk(&file, |on| d.set_crc32(&x, i, on)).unwrap();
            c.open_for_read(&x).unwrap().unwrap();
            if i % 256 == 0 {
                high = high.max(std::fs::metadata(&wal).unwrap().len());
            }
        }
        eprintln!("log high-water mark under steady load: {high} bytes");
        assert!(high < 16 << 20, "log reached {high} bytes");
        assert_eq!(c.hit_count(&x).unwrap(), 65_536);
    }

    /// Glance's journal mode by default: while the store is open and after
    /// writes, nothing but the database is beside it (Glance's drivers take
    /// every other regular file for an image); a database an earlier
    /// version left in WAL mode is turned back.
    #[test]
    fn glance_journal_leaves_nothing_beside_the_database() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cache.db");
        drop(SqliteDriver::open_with(&db, SqliteJournal::Wal).unwrap());
        let d = open(dir.path());
        let c = cache(dir.path(), &d);
        for i in 0..20 {
            let x = ImageId::new(format!("img-{i}")).unwrap();
            let mut w = c.open_for_write(&x).unwrap();
            w.write_all(b"abc").unwrap();
            w.commit().unwrap();
            c.open_for_read(&x).unwrap().unwrap();
        }
        c.flush().unwrap();
        let mode: String = d
            .with_conn(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(mode, "delete");
        let beside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cache.db") && n != "cache.db")
            .collect();
        assert!(beside.is_empty(), "{beside:?}");
    }

    #[test]
    fn queue_counter_is_shared_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path());
        let b = open(dir.path());
        let q = dir.path();
        assert_eq!(on_disk(q, |on| a.next_queue_seq(on)).unwrap(), 1);
        assert_eq!(on_disk(q, |on| b.next_queue_seq(on)).unwrap(), 2);
        assert_eq!(on_disk(q, |on| a.next_queue_seq(on)).unwrap(), 3);
    }
}
