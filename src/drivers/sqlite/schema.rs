//! Opening the database: the connection's settings, the journal mode,
//! the schema (Glance's table, upgraded in place; imgcache's own), the
//! read-only open, and SQLite's errors as the crate's.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::{SqliteJournal, BUSY_TIMEOUT, COLUMNS, GLANCE_COLUMNS};
use crate::error::{Error, Result, StoreError};

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
pub(super) fn classify(e: Error) -> Error {
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
pub(super) fn open_db_read_only(path: &Path) -> Result<(Connection, &'static str, bool)> {
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
            tracing::info!(
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
pub(super) fn open_db(path: &Path, journal: SqliteJournal) -> Result<Connection> {
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
        tracing::warn!(
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
