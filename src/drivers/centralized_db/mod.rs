//! [`CentralizedDbDriver`] (feature `postgres`): the metadata of many nodes'
//! caches in one PostgreSQL database, as Glance's `centralized_db` driver
//! keeps it (Glance 2024.1 and later).
//!
//! The tables are Glance's own, so that imgcache nodes and Glance nodes can
//! share one database:
//!
//! ```sql
//! CREATE TABLE node_reference (
//!     node_reference_id BIGSERIAL PRIMARY KEY,
//!     node_reference_url VARCHAR(255) NOT NULL UNIQUE);
//! CREATE TABLE cached_images (
//!     id BIGSERIAL PRIMARY KEY,
//!     image_id VARCHAR(255) NOT NULL,       -- Glance: VARCHAR(36)
//!     last_accessed TIMESTAMP NOT NULL,     -- naive UTC, as Glance writes it
//!     last_modified TIMESTAMP NOT NULL,
//!     size BIGINT NOT NULL,
//!     hits INTEGER NOT NULL,
//!     checksum VARCHAR(32),
//!     node_reference_id BIGINT NOT NULL REFERENCES node_reference,
//!     UNIQUE (image_id, node_reference_id));
//! ```
//!
//! # Glance's tables are Glance's
//!
//! imgcache runs no DDL on Glance's tables: no column, index or constraint
//! added to them, so no lock that a Glance query would wait behind, and
//! `glance-manage db_sync` keeps running cleanly after imgcache used the
//! database. What it keeps beyond Glance's columns lives in tables of its
//! own, with no foreign key into Glance's (a key takes a lock on the table
//! it points at):
//!
//! - `imgcache_entries (cached_image_id, crc32, checksum)`: an entry's
//!   CRC-32, and a checksum longer than Glance's 32 characters (Glance's
//!   `checksum` gets an MD5 only), keyed by `cached_images.id`. A row Glance
//!   deletes and writes again gets a new id, so what imgcache knew of the
//!   old one never attaches to it; such leftovers are swept at open.
//! - `imgcache_invalid` (why a write failed) and `imgcache_state` (the
//!   queue counter, the durability watermark), keyed by node.
//!
//! Where Glance's tables are missing, [`CentralizedDbDriver::open`] refuses
//! with a message that names what to run: `glance-manage db_sync` where
//! Glance uses the database (its 2024.1 migration creates them, and stops
//! at tables someone else created), or, for a fleet without Glance,
//! [`Tables::Create`] (`--create-tables`), which creates them as Glance's
//! migration would, with room for imgcache's longer ids. On a table Glance
//! created, an id over its 36 bytes is refused with a typed error.
//!
//! Databases an earlier version of imgcache set up keep the columns it
//! added to `cached_images` (`crc32`, `imgcache_checksum`) and its index:
//! their values are copied into `imgcache_entries` once, and nothing is
//! dropped (that would be DDL on Glance's table too).
//!
//! Each node is named by its own URL (Glance's `worker_self_reference_url`);
//! every query is keyed by it, and a node never reads or writes another
//! node's rows — except [`crate::drivers::Fleet::nodes_holding`] and
//! [`crate::drivers::Fleet::all_nodes`], the cross-node views. Image files and the
//! queue stay on each node's disk.
//!
//! # The hot path stays off the network
//!
//! A hit costs no round trip: the store remembers the entries it has read
//! or written, each with the identity (device, inode) of the file it
//! described, and answers a hit from memory while the file is the same one
//! (a new commit is a new inode). Hits and access times are held in memory
//! and written by a background thread, in one statement, every
//! a second or 256 (`drivers/hits.rs`)
//! hits, and on [`crate::drivers::CacheDriver::flush`] and drop. A commit costs one round
//! trip (an upsert).
//!
//! # When the database goes away
//!
//! Hits of images already cached keep being served from the local files:
//! answered from memory, their counts held until the database is back (lost
//! only if the process dies first). A new fill still streams to its client,
//! but its commit fails with [`crate::StoreErrorKind::Unavailable`] and its
//! file is taken back out, so no file is ever left that no row describes.
//! Connections are made anew after the server restarts; a connection
//! attempt waits at most the URL's `connect_timeout` (default 2 s).
//!
//! # Client
//!
//! The blocking [`postgres`] client, with a small pool of connections of
//! its own: the seam is synchronous, a hit never waits on the network, and a
//! blocking client keeps an async runtime out of the library for users who
//! have none.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};

use super::hits::{Batch, Hits};
use crate::clock::round_trip;
use crate::entry::{CachedImageInfo, OnDisk};
use crate::error::{Error, Result};
use crate::id::ImageId;

mod hits;
mod pool;
mod schema;
mod store;

use hits::flusher;
pub use pool::redact;
use pool::{describe, Pool, Session};
use schema::{
    copy_legacy_columns, GLANCE_TABLES, IMAGE_ID_LENGTH, NODE_ID, OWN_TABLES, SCHEMA_PRESENT,
    SWEEP_ENTRIES,
};

/// How long a connection attempt waits when the URL does not say.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a statement (or the network under it) may take before it fails.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections kept open at most: as many as threads that use the store at
/// once, so that none is opened (and its statements prepared) again.
const POOL_IDLE: usize = 32;

/// The key of the advisory lock under which schemas are created.
const SCHEMA_LOCK: i64 = 0x696d_6763_6163_6865; // "imgcache"

/// What [`CentralizedDbDriver::open_with`] does where Glance's tables
/// (`node_reference`, `cached_images`) are missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tables {
    /// Refuse, naming what to run (the default): where Glance uses the
    /// database, `glance-manage db_sync` must create them, and it stops at
    /// tables someone else created.
    #[default]
    Require,
    /// Create them as Glance's 2024.1 migration does (with room for ids of
    /// up to 255 bytes): for a fleet without Glance. Glance's `db_sync`
    /// cannot run on the database afterwards.
    Create,
}

/// The metadata store Glance calls `centralized_db`, on PostgreSQL.
#[derive(Clone)]
pub struct CentralizedDbDriver {
    inner: Arc<Handle>,
}

/// The store's handle: dropping the last one stops the flusher and writes
/// the hits held.
struct Handle(Arc<Inner>);

impl std::ops::Deref for Handle {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.hits.lock().stop = true;
        self.0.wake.notify_all();
        // On a thread of its own, waited for: the sync client runs an async
        // runtime inside, which cannot start on a thread that is already
        // driving one (an async server dropping its last handle there).
        let inner = self.0.clone();
        let last = std::thread::Builder::new()
            .name("imgcache-pg-close".into())
            .spawn(move || {
                match inner.flush_hits() {
                    // Every batch landed: this store's batch number is
                    // needed no more.
                    Ok(()) => {
                        let (node, key) = (inner.node_id, &inner.batches.0);
                        let _ = inner.pool.with(|c| {
                            c.exec(
                                "DELETE FROM imgcache_state WHERE node_reference_id = $1 AND key = $2",
                                &[&node, key],
                            )
                        });
                    }
                    Err(e) => {
                        tracing::warn!("imgcache: {}: hits not written: {e}", inner.pool.location)
                    }
                }
                drop(std::mem::take(&mut *inner.pool.idle.lock()));
            });
        match last.map(std::thread::JoinHandle::join) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("imgcache: {}: closing panicked", self.0.pool.location),
            Err(e) => tracing::error!("imgcache: {}: cannot close: {e}", self.0.pool.location),
        }
    }
}

/// What the handle and the flusher share.
struct Inner {
    pool: Pool,
    node_url: String,
    node_id: i64,
    /// The longest `image_id` the table takes (Glance's: 36).
    max_id: usize,
    /// Entries as last read or written, with the identity of their file.
    memo: Mutex<HashMap<ImageId, Memo>>,
    hits: Mutex<Pending>,
    /// Held while hits are being written; holds the batch whose write
    /// failed, with its number (it may have been applied all the same).
    flushing: Mutex<Option<(i64, HitBatch)>>,
    /// This store's name for its hit batches (`imgcache_state` key), and
    /// the number of its last batch: the database applies each number once,
    /// so a batch sent again after a lost reply is not counted twice.
    batches: (String, std::sync::atomic::AtomicI64),
    /// Wakes the flusher (a full batch, a stop).
    wake: Condvar,
    /// The session that holds this node's fill claims (advisory locks),
    /// and how many times it was opened: a claim taken on an earlier
    /// session died with it.
    claims: Mutex<(Option<postgres::Client>, u64)>,
}

/// Hits of a batch, per image: how many, and the time of the latest.
type HitBatch = Batch<()>;

#[derive(Debug, Clone)]
struct Memo {
    file: [i64; 7],
    info: CachedImageInfo,
}

/// The hits held, and whether the flusher is to stop.
#[derive(Debug, Default)]
struct Pending {
    hits: Hits<()>,
    stop: bool,
}

impl fmt::Debug for CentralizedDbDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CentralizedDbDriver")
            .field("database", &self.inner.pool.location)
            .field("node", &self.inner.node_url)
            .finish()
    }
}

/// The columns every query of entries selects, in [`decode`]'s order.
const COLUMNS: &str = "c.image_id, c.size, c.hits, c.last_accessed, c.last_modified, \
     COALESCE(e.checksum, c.checksum), e.crc32";

/// Glance's rows with what imgcache keeps of them: `FROM` this, then
/// `WHERE` on `c`.
const ENTRIES: &str = "cached_images c LEFT JOIN imgcache_entries e ON e.cached_image_id = c.id";

/// Decodes one row of [`COLUMNS`]; errors say which field is wrong.
fn decode(row: &postgres::Row) -> std::result::Result<CachedImageInfo, (String, String)> {
    let raw: String = row
        .try_get(0)
        .map_err(|e| ("?".to_string(), e.to_string()))?;
    let id = ImageId::new(&raw).map_err(|e| (raw.clone(), e.to_string()))?;
    let fail = |what: &str, e: String| (raw.clone(), format!("row {raw}: {what}: {e}"));
    let size: i64 = row.try_get(1).map_err(|e| fail("size", e.to_string()))?;
    let hits: i32 = row.try_get(2).map_err(|e| fail("hits", e.to_string()))?;
    let last_accessed: SystemTime = row
        .try_get(3)
        .map_err(|e| fail("last_accessed", e.to_string()))?;
    let last_modified: SystemTime = row
        .try_get(4)
        .map_err(|e| fail("last_modified", e.to_string()))?;
    let checksum: Option<String> = row
        .try_get(5)
        .map_err(|e| fail("checksum", e.to_string()))?;
    let crc32: Option<i64> = row.try_get(6).map_err(|e| fail("crc32", e.to_string()))?;
    Ok(CachedImageInfo {
        id,
        size: u64::try_from(size).map_err(|_| fail("size", format!("negative ({size})")))?,
        hits: u64::try_from(hits).map_err(|_| fail("hits", format!("negative ({hits})")))?,
        last_accessed: round_trip(last_accessed),
        last_modified: round_trip(last_modified),
        checksum,
        crc32: crc32
            .map(|c| u32::try_from(c).map_err(|_| fail("crc32", format!("{c} is out of range"))))
            .transpose()?,
    })
}

/// Glance's column holds 32 characters: an MD5. Longer checksums go to
/// imgcache's own column ([`long_checksum`]).
fn glance_checksum(c: &Option<String>) -> Option<&str> {
    c.as_deref().filter(|c| c.len() <= 32)
}

/// A checksum too long for Glance's column.
fn long_checksum(c: &Option<String>) -> Option<&str> {
    c.as_deref().filter(|c| c.len() > 32)
}

fn identity(on: OnDisk<'_>) -> [i64; 7] {
    on.identity()
}

impl CentralizedDbDriver {
    /// Connects to the database at `url` (`postgres://user:password@host/db`)
    /// as node `node_url` (Glance's `worker_self_reference_url`), creating
    /// imgcache's own tables if they are missing and the node's row if it
    /// has none. Glance's tables must be there ([`Tables::Require`]).
    pub fn open(url: &str, node_url: &str) -> Result<Self> {
        Self::open_with(url, node_url, Tables::Require)
    }

    /// [`CentralizedDbDriver::open`], with what to do where Glance's
    /// tables are missing.
    pub fn open_with(url: &str, node_url: &str, tables: Tables) -> Result<Self> {
        Self::connect(url, node_url, tables, false)
    }

    /// Connects for inspection only ([`crate::CacheOptions::read_only`]):
    /// nothing is created or written at open (no table, no node row, no
    /// sweep), and a node the database does not know has no rows. Glance's
    /// tables and imgcache's must be there.
    pub fn open_read_only(url: &str, node_url: &str) -> Result<Self> {
        Self::connect(url, node_url, Tables::Require, true)
    }

    fn connect(url: &str, node_url: &str, tables: Tables, read_only: bool) -> Result<Self> {
        if node_url.is_empty() || node_url.len() > 255 {
            return Err(Error::Config(
                "the centralized_db driver needs the node's URL (worker_self_reference_url, \
                 --node-url), at most 255 bytes"
                    .into(),
            ));
        }
        let mut config = postgres::Config::from_str(url)
            .map_err(|e| Error::Config(format!("database URL {}: {e}", redact(url))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A half-open connection (a server that vanished without a reset)
        // fails within seconds, not after the kernel's quarter of an hour;
        // a statement stuck behind a lock fails too.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(STATEMENT_TIMEOUT);
        if config.get_options().is_none() {
            config.options(&format!(
                "-c statement_timeout={} -c lock_timeout={}",
                STATEMENT_TIMEOUT.as_millis(),
                STATEMENT_TIMEOUT.as_millis()
            ));
        }
        config.application_name("imgcache");
        let pool = Pool {
            location: describe(&config),
            config,
            idle: Mutex::new(Vec::new()),
            trips: Arc::default(),
        };
        let node_id = pool.with(|c| {
            let (glance, ours, fills): (bool, bool, bool) = {
                let r = c.query_one(SCHEMA_PRESENT, &[])?;
                (r.get(0), r.get(1), r.get(2))
            };
            if !glance && tables == Tables::Require {
                return Ok(Err(()));
            }
            if read_only {
                if !ours {
                    return Ok(Err(()));
                }
                let id: Option<i64> = c.query_opt(NODE_ID, &[&node_url])?.map(|r| r.get(0));
                let max: Option<i32> = c.query_one(IMAGE_ID_LENGTH, &[])?.get(0);
                // A node the database does not know has no rows (ids start
                // at 1).
                return Ok(Ok((id.unwrap_or(-1), max)));
            }
            let mut tx = c.transaction()?;
            // DDL only where something is missing, and never on a table of
            // Glance's that exists: creating tables of our own takes no
            // lock that a Glance query waits for.
            if !glance || !ours || !fills {
                tx.batch_execute("SET LOCAL lock_timeout = '10s'")?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
                if !glance {
                    tx.batch_execute(GLANCE_TABLES)?;
                }
                let fresh: bool = tx
                    .query_one("SELECT to_regclass('imgcache_entries') IS NULL", &[])?
                    .get(0);
                tx.batch_execute(OWN_TABLES)?;
                if fresh {
                    copy_legacy_columns(&mut tx)?;
                }
            }
            tx.execute(
                "INSERT INTO node_reference (node_reference_url) VALUES ($1)
                 ON CONFLICT (node_reference_url) DO NOTHING",
                &[&node_url],
            )?;
            let id: i64 = tx.query_one(NODE_ID, &[&node_url])?.get(0);
            let max: Option<i32> = tx.query_one(IMAGE_ID_LENGTH, &[])?.get(0);
            // What imgcache knew of rows deleted since (by Glance, or by a
            // process that died between its two statements).
            tx.execute(SWEEP_ENTRIES, &[])?;
            tx.commit()?;
            Ok(Ok((id, max)))
        })?;
        let Ok(node_id) = node_id else {
            if read_only {
                return Err(Error::Config(format!(
                    "{} has no imgcache tables yet (opened read-only: nothing is created)",
                    pool.location
                )));
            }
            return Err(Error::Config(format!(
                "{} has no Glance cache tables (node_reference, cached_images). Where Glance uses \
                 this database, run `glance-manage db_sync` first (Glance 2024.1 and later create \
                 them); for a fleet without Glance, start imgcache with --create-tables \
                 (IMGCACHE_CREATE_TABLES=1, CacheOptions::create_tables), which creates them as \
                 Glance would",
                pool.location
            )));
        };
        let (node_id, max_id) = node_id;
        let max_id = max_id
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(usize::MAX);
        let inner = Arc::new(Inner {
            pool,
            node_url: node_url.to_owned(),
            node_id,
            max_id,
            memo: Mutex::default(),
            hits: Mutex::default(),
            flushing: Mutex::new(None),
            batches: (
                format!(
                    "hits:{}:{}",
                    std::process::id(),
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                ),
                std::sync::atomic::AtomicI64::new(0),
            ),
            wake: Condvar::new(),
            claims: Mutex::new((None, 0)),
        });
        let shared = inner.clone();
        thread::Builder::new()
            .name("imgcache-db-hits".into())
            .spawn(move || flusher(&shared))
            .map_err(|e| Error::io("spawn the hit flusher of", "centralized_db", e))?;
        Ok(CentralizedDbDriver {
            inner: Arc::new(Handle(inner)),
        })
    }

    /// The database's address, without its password.
    pub fn location(&self) -> &str {
        &self.inner.pool.location
    }

    /// How many statements this store has sent to the database (each one
    /// round trip; the first use of a statement on a connection costs one
    /// more, to prepare it; transactions of the rare paths are not counted).
    pub fn round_trips(&self) -> u64 {
        self.inner
            .pool
            .trips
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn with<T>(
        &self,
        f: impl FnMut(&mut Session) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        self.inner.pool.with(f)
    }

    /// This node's rows, decoded (undecodable ones logged and passed over),
    /// in `order`.
    fn rows(&self, order: &str) -> Result<Vec<CachedImageInfo>> {
        self.inner.flush_or_warn();
        let node = self.inner.node_id;
        let rows = self.with(|c| {
            c.rows(
                &format!(
                    "SELECT {COLUMNS} FROM {ENTRIES} WHERE c.node_reference_id = $1 ORDER BY {order}"
                ),
                &[&node],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| match decode(r) {
                Ok(i) => Some(i),
                Err((_, e)) => {
                    tracing::warn!("imgcache: {}: skipping {e}", self.inner.pool.location);
                    None
                }
            })
            .collect())
    }

    /// One row of this node, as written.
    fn row(&self, id: &ImageId) -> Result<Option<CachedImageInfo>> {
        let node = self.inner.node_id;
        let row = self.with(|c| {
            c.opt(
                &format!(
                    "SELECT {COLUMNS} FROM {ENTRIES} WHERE c.node_reference_id = $1 AND c.image_id = $2"
                ),
                &[&node, &id.as_str()],
            )
        })?;
        match row.as_ref().map(decode) {
            None => Ok(None),
            Some(Ok(info)) => Ok(Some(info)),
            Some(Err((_, detail))) => Err(Error::CorruptMetadata {
                path: self.inner.pool.location.clone().into(),
                detail,
            }),
        }
    }

    /// Whether `entry`'s id fits the table's `image_id` column; one that
    /// does not is left out (with a warning) of a batch.
    fn fits(&self, entry: &CachedImageInfo) -> bool {
        let fits = entry.id.as_str().len() <= self.inner.max_id;
        if !fits {
            tracing::warn!(
                "imgcache: {}: image id {} is longer than the {} bytes of cached_images.image_id; left out",
                self.inner.pool.location,
                entry.id,
                self.inner.max_id
            );
        }
        fits
    }

    /// Adds the hits this process holds for `info` to it.
    fn with_pending(&self, mut info: CachedImageInfo) -> CachedImageInfo {
        if let Some(held) = self.inner.hits.lock().hits.get(&info.id) {
            info.hits += held.hits;
            info.last_accessed = held.last;
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    /// One form in every message, the same as [`crate::redact_url`]'s.
    #[test]
    fn addresses_show_no_password_in_one_form() {
        let url = "postgres://glance:s3cret@db:5432/glance";
        assert_eq!(redact(url), "postgres://glance:***@db:5432/glance");
        assert_eq!(redact(url), crate::options::redact_url(url));
        assert_eq!(
            redact("postgres://glance@db:5432/glance"),
            "postgres://glance@db:5432/glance"
        );
    }
}
