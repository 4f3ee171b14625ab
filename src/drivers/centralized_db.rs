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
//! node's rows — except [`CacheDriver::nodes_holding`] and
//! [`CacheDriver::all_nodes`], the cross-node views. Image files and the
//! queue stay on each node's disk.
//!
//! # The hot path stays off the network
//!
//! A hit costs no round trip: the store remembers the entries it has read
//! or written, each with the identity (device, inode) of the file it
//! described, and answers a hit from memory while the file is the same one
//! (a new commit is a new inode). Hits and access times are held in memory
//! and written by a background thread, in one statement, every
//! [`HIT_DELAY`] or [`HIT_BATCH`]
//! hits, and on [`CacheDriver::flush`] and drop. A commit costs one round
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
use postgres::error::SqlState;
use postgres::{Client, NoTls};

use super::sqlite::{HIT_BATCH, HIT_DELAY};
use super::CacheDriver;
use crate::clock::round_trip;
use crate::entry::{
    CachedFiles, CachedImageInfo, Invalidation, LruEntry, NodeImage, OnDisk, Scanned, Watermark,
};
use crate::error::{Error, Result, StoreError, StoreErrorKind};
use crate::id::ImageId;

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
                        log::warn!("imgcache: {}: hits not written: {e}", inner.pool.location)
                    }
                }
                drop(std::mem::take(&mut *inner.pool.idle.lock()));
            });
        match last.map(std::thread::JoinHandle::join) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => log::error!("imgcache: {}: closing panicked", self.0.pool.location),
            Err(e) => log::error!("imgcache: {}: cannot close: {e}", self.0.pool.location),
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
}

/// Hits of a batch, per image: how many, and the time of the latest.
type HitBatch = HashMap<ImageId, (u64, SystemTime)>;

#[derive(Debug, Clone)]
struct Memo {
    file: [i64; 7],
    info: CachedImageInfo,
}

#[derive(Debug, Default)]
struct Pending {
    /// Per image: hits not yet written, and the time of the latest.
    by_id: HashMap<ImageId, (u64, SystemTime)>,
    count: u64,
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

/// `url` without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match postgres::Config::from_str(url) {
        Ok(c) => describe(&c),
        Err(_) => "<an unparsable database URL>".into(),
    }
}

fn describe(c: &postgres::Config) -> String {
    let host = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let port = c
        .get_ports()
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // The one form every message uses ([`crate::redact_url`]'s): the
    // password, if any, as `***`.
    format!(
        "postgres://{}{}@{}{}{}/{}",
        c.get_user().unwrap_or(""),
        if c.get_password().is_some() {
            ":***"
        } else {
            ""
        },
        host,
        if port.is_empty() { "" } else { ":" },
        port,
        c.get_dbname().unwrap_or("")
    )
}

/// A few connections, made on demand and dropped when broken.
struct Pool {
    config: postgres::Config,
    location: String,
    idle: Mutex<Vec<Session>>,
    /// Statements sent (each one round trip), prepares included.
    trips: Arc<std::sync::atomic::AtomicU64>,
}

/// A connection and the statements prepared on it: a statement is parsed
/// once per connection, so that each later use is one round trip.
struct Session {
    client: Client,
    prepared: HashMap<String, postgres::Statement>,
    trips: Arc<std::sync::atomic::AtomicU64>,
}

type Params<'a> = &'a [&'a (dyn postgres::types::ToSql + Sync)];
type PgResult<T> = std::result::Result<T, postgres::Error>;

impl Session {
    fn statement(&mut self, sql: &str) -> PgResult<postgres::Statement> {
        use std::sync::atomic::Ordering::Relaxed;
        self.trips.fetch_add(1, Relaxed);
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        self.trips.fetch_add(1, Relaxed);
        let s = self.client.prepare(sql)?;
        self.prepared.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn exec(&mut self, sql: &str, params: Params<'_>) -> PgResult<u64> {
        let s = self.statement(sql)?;
        self.client.execute(&s, params)
    }

    fn rows(&mut self, sql: &str, params: Params<'_>) -> PgResult<Vec<postgres::Row>> {
        let s = self.statement(sql)?;
        self.client.query(&s, params)
    }

    fn one(&mut self, sql: &str, params: Params<'_>) -> PgResult<postgres::Row> {
        let s = self.statement(sql)?;
        self.client.query_one(&s, params)
    }

    fn opt(&mut self, sql: &str, params: Params<'_>) -> PgResult<Option<postgres::Row>> {
        let s = self.statement(sql)?;
        self.client.query_opt(&s, params)
    }
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A connection out of the pool; back into it on drop unless broken.
struct Conn<'a> {
    pool: &'a Pool,
    session: Option<Session>,
    /// Whether it came from the idle ones (it may have been closed since).
    used: bool,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        self.session
            .as_ref()
            .expect("a pooled connection is present until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("a pooled connection is present until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.session.take() {
            if !c.client.is_closed() {
                let mut idle = self.pool.idle.lock();
                if idle.len() < POOL_IDLE {
                    idle.push(c);
                }
            }
        }
    }
}

impl Pool {
    fn get(&self) -> Result<Conn<'_>> {
        let pooled = self.idle.lock().pop();
        match pooled {
            Some(c) if !c.client.is_closed() => Ok(Conn {
                pool: self,
                session: Some(c),
                used: true,
            }),
            _ => self.fresh(),
        }
    }

    /// A client error as the crate's own, with the database's address
    /// (never its password).
    fn error(&self, e: postgres::Error) -> Error {
        let kind = match e.code() {
            Some(c) if *c == SqlState::DISK_FULL => StoreErrorKind::NoSpace,
            Some(c)
                if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                StoreErrorKind::Busy
            }
            Some(c)
                if *c == SqlState::DATA_CORRUPTED
                    || *c == SqlState::INDEX_CORRUPTED
                    || *c == SqlState::UNDEFINED_COLUMN =>
            {
                StoreErrorKind::Corrupt
            }
            Some(c) if c.code().starts_with("08") || c.code().starts_with("57P") => {
                StoreErrorKind::Unavailable
            }
            Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => StoreErrorKind::Busy,
            Some(c) if *c == SqlState::STRING_DATA_RIGHT_TRUNCATION => StoreErrorKind::Other,
            Some(_) => StoreErrorKind::Other,
            // No SQL state: the connection failed, or a value did not convert.
            None if e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
                || e.to_string().contains("connect") =>
            {
                StoreErrorKind::Unavailable
            }
            None => StoreErrorKind::Other,
        };
        Error::Store(StoreError::new(
            kind,
            "centralized_db",
            self.location.clone(),
            e,
        ))
    }

    /// Runs `f` on a pooled connection, mapping its error.
    fn with<T>(
        &self,
        mut f: impl FnMut(&mut Session) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let mut conn = self.get()?;
        let reused = conn.used;
        match f(&mut conn) {
            Ok(v) => Ok(v),
            // A pooled connection the server closed while it sat idle (a
            // restart): the sync client learns of it only on use. Once more
            // on a fresh one.
            Err(e) if reused && conn.client.is_closed() => {
                log::debug!("imgcache: {}: reconnecting after {e}", self.location);
                drop(conn);
                let mut fresh = self.fresh()?;
                f(&mut fresh).map_err(|e| self.error(e))
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// A new connection, not from the idle ones.
    fn fresh(&self) -> Result<Conn<'_>> {
        Ok(Conn {
            pool: self,
            session: Some(Session {
                client: self.config.connect(NoTls).map_err(|e| self.error(e))?,
                prepared: HashMap::new(),
                trips: self.trips.clone(),
            }),
            used: false,
        })
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
            let (glance, ours): (bool, bool) = {
                let r = c.query_one(SCHEMA_PRESENT, &[])?;
                (r.get(0), r.get(1))
            };
            if !glance && tables == Tables::Require {
                return Ok(Err(()));
            }
            if read_only {
                if !ours {
                    return Ok(Err(()));
                }
                let id: Option<i64> = c
                    .query_opt(
                        "SELECT node_reference_id FROM node_reference WHERE node_reference_url = $1",
                        &[&node_url],
                    )?
                    .map(|r| r.get(0));
                let max: Option<i32> = c
                    .query_one(
                        "SELECT character_maximum_length FROM information_schema.columns
                         WHERE table_name = 'cached_images' AND column_name = 'image_id'
                           AND table_schema = current_schema()",
                        &[],
                    )?
                    .get(0);
                // A node the database does not know has no rows (ids start
                // at 1).
                return Ok(Ok((id.unwrap_or(-1), max)));
            }
            let mut tx = c.transaction()?;
            // DDL only where something is missing, and never on a table of
            // Glance's that exists: creating tables of our own takes no
            // lock that a Glance query waits for.
            if !glance || !ours {
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
            let id: i64 = tx
                .query_one(
                    "SELECT node_reference_id FROM node_reference WHERE node_reference_url = $1",
                    &[&node_url],
                )?
                .get(0);
            let max: Option<i32> = tx
                .query_one(
                    "SELECT character_maximum_length FROM information_schema.columns
                     WHERE table_name = 'cached_images' AND column_name = 'image_id'
                       AND table_schema = current_schema()",
                    &[],
                )?
                .get(0);
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
                    log::warn!("imgcache: {}: skipping {e}", self.inner.pool.location);
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
            log::warn!(
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
        if let Some((n, at)) = self.inner.hits.lock().by_id.get(&info.id) {
            info.hits += n;
            info.last_accessed = *at;
        }
        info
    }
}

/// Whether Glance's tables are there, and whether imgcache's own are.
const SCHEMA_PRESENT: &str = "
SELECT to_regclass('node_reference') IS NOT NULL AND to_regclass('cached_images') IS NOT NULL,
       to_regclass('imgcache_entries') IS NOT NULL
   AND to_regclass('imgcache_invalid') IS NOT NULL
   AND to_regclass('imgcache_state') IS NOT NULL";

/// Glance's tables as its 2024.1 migration creates them (`image_id` with
/// room for imgcache's ids): only with [`Tables::Create`].
const GLANCE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS node_reference (
    node_reference_id BIGSERIAL PRIMARY KEY,
    node_reference_url VARCHAR(255) NOT NULL,
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
);
CREATE TABLE IF NOT EXISTS cached_images (
    id BIGSERIAL PRIMARY KEY,
    image_id VARCHAR(255) NOT NULL,
    last_accessed TIMESTAMP NOT NULL,
    last_modified TIMESTAMP NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
);
";

/// imgcache's own tables: no foreign key into Glance's.
const OWN_TABLES: &str = "
CREATE TABLE IF NOT EXISTS imgcache_entries (
    cached_image_id BIGINT PRIMARY KEY,
    crc32 BIGINT,
    checksum TEXT
);
CREATE TABLE IF NOT EXISTS imgcache_invalid (
    node_reference_id BIGINT NOT NULL,
    image_id VARCHAR(255) NOT NULL,
    reason TEXT,
    invalidated_at TIMESTAMP,
    PRIMARY KEY (node_reference_id, image_id)
);
CREATE TABLE IF NOT EXISTS imgcache_state (
    node_reference_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (node_reference_id, key)
);
";

/// Drops the `imgcache_entries` rows whose `cached_images` row is gone
/// (every statement that writes both does so at once, so a row seen
/// without its partner has lost it for good).
const SWEEP_ENTRIES: &str = "
DELETE FROM imgcache_entries e
WHERE NOT EXISTS (SELECT 1 FROM cached_images c WHERE c.id = e.cached_image_id)";

/// Earlier versions kept the CRC-32 and long checksums in columns they
/// added to `cached_images`: copied into `imgcache_entries` once, when it
/// is created (the columns stay: dropping them would be DDL on Glance's
/// table).
fn copy_legacy_columns(
    tx: &mut postgres::Transaction<'_>,
) -> std::result::Result<(), postgres::Error> {
    let legacy: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM information_schema.columns
             WHERE table_name = 'cached_images' AND table_schema = current_schema()
               AND column_name IN ('crc32', 'imgcache_checksum')",
            &[],
        )?
        .get(0);
    if legacy == 2 {
        tx.batch_execute(
            "INSERT INTO imgcache_entries (cached_image_id, crc32, checksum)
             SELECT id, crc32, imgcache_checksum FROM cached_images
             WHERE crc32 IS NOT NULL OR imgcache_checksum IS NOT NULL
             ON CONFLICT (cached_image_id) DO NOTHING",
        )?;
    }
    Ok(())
}

impl Inner {
    /// Writes the hits held in memory, in one statement. On failure they
    /// stay held (merged with any that arrived meanwhile).
    fn flush_hits(&self) -> Result<()> {
        // One flush at a time: a flush asked for (before a query, on
        // `flush`) waits for the flusher's write in flight, so that it
        // never returns while hits are on their way.
        let mut unsent = self.flushing.lock();
        // A batch whose reply was lost goes again first, as it was (same
        // number): applied once whether or not the first try landed.
        if let Some((seq, batch)) = unsent.take() {
            if let Err(e) = self.send(seq, &batch) {
                *unsent = Some((seq, batch));
                return Err(e);
            }
            self.applied(batch);
        }
        let pending = {
            let mut hits = self.hits.lock();
            if hits.count == 0 {
                return Ok(());
            }
            hits.count = 0;
            std::mem::take(&mut hits.by_id)
        };
        let seq = self
            .batches
            .1
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        match self.send(seq, &pending) {
            Ok(()) => {
                self.applied(pending);
                Ok(())
            }
            Err(e) => {
                *unsent = Some((seq, pending));
                Err(e)
            }
        }
    }

    /// Adds batch `seq` to the rows, in one statement, unless the database
    /// has applied that batch of this store already.
    fn send(&self, seq: i64, batch: &HitBatch) -> Result<()> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut counts = Vec::with_capacity(batch.len());
        let mut times = Vec::with_capacity(batch.len());
        for (id, (n, at)) in batch {
            ids.push(id.as_str());
            counts.push(i64::try_from(*n).unwrap_or(i64::MAX));
            times.push(*at);
        }
        let node = self.node_id;
        let key = &self.batches.0;
        self.pool.with(|c| {
            c.exec(
                "WITH mark AS (
                     INSERT INTO imgcache_state (node_reference_id, key, value) VALUES ($1, $5, $6)
                     ON CONFLICT (node_reference_id, key) DO UPDATE SET value = excluded.value
                     WHERE imgcache_state.value < excluded.value
                     RETURNING 1
                 )
                 UPDATE cached_images AS c
                 SET hits = LEAST(c.hits::bigint + v.n, 2147483647), last_accessed = v.at
                 FROM UNNEST($2::text[], $3::bigint[], $4::timestamp[]) AS v(image_id, n, at)
                 WHERE c.node_reference_id = $1 AND c.image_id = v.image_id
                   AND EXISTS (SELECT 1 FROM mark)",
                &[&node, &ids, &counts, &times, key, &seq],
            )
        })?;
        Ok(())
    }

    /// Records a batch the database holds in the entries remembered.
    fn applied(&self, batch: HitBatch) {
        let mut memo = self.memo.lock();
        for (id, (n, at)) in batch {
            if let Some(m) = memo.get_mut(&id) {
                m.info.hits += n;
                m.info.last_accessed = at;
            }
        }
    }

    /// Writes the hits held before a read of rows; a failure (the database
    /// gone between two statements) leaves them held for the flusher, and
    /// the read goes on.
    fn flush_or_warn(&self) {
        if let Err(e) = self.flush_hits() {
            log::warn!("imgcache: hits held in memory for now: {e}");
        }
    }

    /// Forgets what this process remembers or holds of `ids`.
    fn forget(&self, ids: &[ImageId]) {
        let mut memo = self.memo.lock();
        let mut hits = self.hits.lock();
        for id in ids {
            memo.remove(id);
            if let Some((n, _)) = hits.by_id.remove(id) {
                hits.count = hits.count.saturating_sub(n);
            }
        }
    }
}

/// The background writer of batched hits: every [`HIT_DELAY`], or as soon
/// as a batch fills; ends when the last handle is dropped.
fn flusher(me: &Inner) {
    let mut failing = false;
    loop {
        {
            let mut hits = me.hits.lock();
            if hits.stop {
                return;
            }
            // After a failure, always the full delay: no connect storm
            // against a database that is down.
            if hits.count < HIT_BATCH || failing {
                me.wake.wait_for(&mut hits, HIT_DELAY);
            }
            if hits.stop {
                return;
            }
        }
        match me.flush_hits() {
            Ok(()) => {
                if failing {
                    log::info!("imgcache: {}: hits written again", me.pool.location);
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    log::warn!("imgcache: hits held in memory until the database is back: {e}");
                    failing = true;
                }
            }
        }
    }
}

impl CacheDriver for CentralizedDbDriver {
    fn name(&self) -> &'static str {
        "centralized_db"
    }

    fn node(&self) -> &str {
        &self.inner.node_url
    }

    fn get(&self, id: &ImageId, file: OnDisk<'_>) -> Result<Option<CachedImageInfo>> {
        let Some(info) = self.row(id)? else {
            self.inner.memo.lock().remove(id);
            return Ok(None);
        };
        self.inner.memo.lock().insert(
            id.clone(),
            Memo {
                file: identity(file),
                info: info.clone(),
            },
        );
        Ok(Some(self.with_pending(info)))
    }

    fn hit(
        &self,
        id: &ImageId,
        at: SystemTime,
        file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>> {
        let known = {
            let memo = self.inner.memo.lock();
            memo.get(id)
                .filter(|m| m.file == identity(file))
                .map(|m| m.info.clone())
        };
        // First sight of this file in this process: one round trip.
        let info = match known {
            Some(info) => info,
            None => match self.row(id)? {
                Some(info) => {
                    self.inner.memo.lock().insert(
                        id.clone(),
                        Memo {
                            file: identity(file),
                            info: info.clone(),
                        },
                    );
                    info
                }
                None => return Ok(None),
            },
        };
        let due = {
            let mut hits = self.inner.hits.lock();
            let entry = hits.by_id.entry(id.clone()).or_insert((0, at));
            entry.0 += 1;
            entry.1 = at;
            hits.count += 1;
            hits.count >= HIT_BATCH
        };
        if due {
            self.inner.wake.notify_one();
        }
        Ok(Some(self.with_pending(info)))
    }

    fn insert(&self, entry: &CachedImageInfo) -> Result<()> {
        if entry.id.as_str().len() > self.inner.max_id {
            return Err(Error::InvalidId {
                input: entry.id.to_string(),
                reason: crate::id::IdError::TooLongForStore {
                    max: self.inner.max_id,
                },
            });
        }
        // Hits held for an earlier image of this id belonged to its file,
        // which this one replaces (with hits reset, as every store does).
        self.inner.forget(std::slice::from_ref(&entry.id));
        let node = self.inner.node_id;
        let size = i64::try_from(entry.size).unwrap_or(i64::MAX);
        let hits = i32::try_from(entry.hits).unwrap_or(i32::MAX);
        let crc = entry.crc32.map(i64::from);
        self.with(|c| {
            // Glance's row and imgcache's in one statement (one round
            // trip, one transaction).
            c.exec(
                "WITH c AS (
                   INSERT INTO cached_images
                   (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (image_id, node_reference_id) DO UPDATE SET
                   last_accessed = EXCLUDED.last_accessed, last_modified = EXCLUDED.last_modified,
                   size = EXCLUDED.size, hits = EXCLUDED.hits, checksum = EXCLUDED.checksum
                   RETURNING id)
                 INSERT INTO imgcache_entries (cached_image_id, crc32, checksum)
                 SELECT id, $8, $9 FROM c
                 ON CONFLICT (cached_image_id) DO UPDATE SET
                 crc32 = EXCLUDED.crc32, checksum = EXCLUDED.checksum",
                &[
                    &entry.id.as_str(),
                    &entry.last_accessed,
                    &entry.last_modified,
                    &size,
                    &hits,
                    &glance_checksum(&entry.checksum),
                    &node,
                    &crc,
                    &long_checksum(&entry.checksum),
                ],
            )
        })?;
        Ok(())
    }

    fn remove(&self, ids: &[ImageId]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.inner.forget(ids);
        let node = self.inner.node_id;
        let names: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let n: i64 = self.with(|c| {
            c.one(
                "WITH c AS (
                   DELETE FROM cached_images WHERE node_reference_id = $1 AND image_id = ANY($2)
                   RETURNING id),
                 e AS (DELETE FROM imgcache_entries WHERE cached_image_id IN (SELECT id FROM c))
                 SELECT COUNT(*) FROM c",
                &[&node, &names],
            )
            .map(|r| r.get(0))
        })?;
        Ok(n as usize)
    }

    fn remove_if_missing(&self, ids: &[ImageId], missing: &dyn Fn(&ImageId) -> bool) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let node = self.inner.node_id;
        let names: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        // Most misses have no row at all: one prepared look, no transaction.
        let any: bool = self.with(|c| {
            c.one(
                "SELECT EXISTS (SELECT 1 FROM cached_images
                 WHERE node_reference_id = $1 AND image_id = ANY($2))",
                &[&node, &names],
            )
            .map(|r| r.get(0))
        })?;
        if !any {
            return Ok(());
        }
        // Lock the rows first: a committer's upsert of one of them waits
        // for this transaction. Then check the files: a commit that renamed
        // its file before the check is seen; one after it inserts after us.
        let gone = self.with(|c| {
            let mut tx = c.transaction()?;
            let locked = tx.query(
                "SELECT image_id FROM cached_images
                 WHERE node_reference_id = $1 AND image_id = ANY($2) FOR UPDATE",
                &[&node, &names],
            )?;
            let gone: Vec<ImageId> = locked
                .iter()
                .filter_map(|r| r.try_get::<_, String>(0).ok())
                .filter_map(|s| ImageId::new(s).ok())
                .filter(|id| missing(id))
                .collect();
            let gone_names: Vec<&str> = gone.iter().map(|i| i.as_str()).collect();
            tx.execute(
                "WITH c AS (
                   DELETE FROM cached_images WHERE node_reference_id = $1 AND image_id = ANY($2)
                   RETURNING id)
                 DELETE FROM imgcache_entries WHERE cached_image_id IN (SELECT id FROM c)",
                &[&node, &gone_names],
            )?;
            tx.commit()?;
            Ok(gone)
        })?;
        self.inner.forget(&gone);
        Ok(())
    }

    fn set_crc32(&self, id: &ImageId, crc32: u32, _file: OnDisk<'_>) -> Result<()> {
        self.inner.memo.lock().remove(id);
        let node = self.inner.node_id;
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_entries (cached_image_id, crc32)
                 SELECT id, $3 FROM cached_images WHERE node_reference_id = $1 AND image_id = $2
                 ON CONFLICT (cached_image_id) DO UPDATE SET crc32 = EXCLUDED.crc32",
                &[&node, &id.as_str(), &i64::from(crc32)],
            )
        })?;
        Ok(())
    }

    fn list(&self, _files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>> {
        self.rows("c.image_id")
    }

    fn lru(&self, _files: &dyn CachedFiles) -> Result<Vec<LruEntry>> {
        Ok(self
            .rows("c.last_accessed, c.image_id")?
            .into_iter()
            .map(LruEntry::from)
            .collect())
    }

    fn total_size(&self, _files: &dyn CachedFiles) -> Result<u64> {
        let node = self.inner.node_id;
        let total: i64 = self.with(|c| {
            c.one(
                "SELECT COALESCE(SUM(GREATEST(size, 0)), 0)::BIGINT FROM cached_images
                 WHERE node_reference_id = $1",
                &[&node],
            )
            .map(|r| r.get(0))
        })?;
        Ok(u64::try_from(total).unwrap_or(0))
    }

    fn scan(&self, _files: &dyn CachedFiles) -> Result<Vec<Scanned>> {
        self.inner.flush_or_warn();
        let node = self.inner.node_id;
        let rows = self.with(|c| {
            c.rows(
                &format!("SELECT {COLUMNS}, c.id FROM {ENTRIES} WHERE c.node_reference_id = $1"),
                &[&node],
            )
        })?;
        let mut out = Vec::new();
        let mut unusable: Vec<i64> = Vec::new();
        for row in &rows {
            match decode(row) {
                Ok(info) => out.push(Scanned::Entry(info)),
                Err((raw, detail)) => match ImageId::new(&raw) {
                    Ok(id) => out.push(Scanned::Corrupt { id, detail }),
                    Err(_) => {
                        log::warn!(
                            "imgcache: dropping row {raw:?} of {}: {detail}",
                            self.inner.pool.location
                        );
                        unusable.extend(row.try_get::<_, i64>(7).ok());
                    }
                },
            }
        }
        if !unusable.is_empty() {
            self.with(|c| {
                c.exec(
                    "WITH c AS (
                       DELETE FROM cached_images WHERE node_reference_id = $1 AND id = ANY($2)
                       RETURNING id)
                     DELETE FROM imgcache_entries WHERE cached_image_id IN (SELECT id FROM c)",
                    &[&node, &unusable],
                )
            })?;
        }
        Ok(out)
    }

    fn adopt(&self, orphans: &[(CachedImageInfo, OnDisk<'_>)]) -> Result<Vec<ImageId>> {
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        let node = self.inner.node_id;
        let orphans: Vec<&CachedImageInfo> = orphans
            .iter()
            .map(|(e, _)| e)
            .filter(|e| self.fits(e))
            .collect();
        let ids: Vec<&str> = orphans.iter().map(|e| e.id.as_str()).collect();
        let sizes: Vec<i64> = orphans
            .iter()
            .map(|e| i64::try_from(e.size).unwrap_or(i64::MAX))
            .collect();
        let times: Vec<SystemTime> = orphans.iter().map(|e| e.last_modified).collect();
        // One statement; DO NOTHING: a committer that wrote its row
        // meanwhile knows better (it has the CRC).
        let rows = self.with(|c| {
            c.rows(
                "INSERT INTO cached_images
                 (image_id, last_accessed, last_modified, size, hits, node_reference_id)
                 SELECT v.image_id, v.at, v.at, v.size, 0, $1
                 FROM UNNEST($2::text[], $3::bigint[], $4::timestamp[]) AS v(image_id, size, at)
                 ON CONFLICT (image_id, node_reference_id) DO NOTHING
                 RETURNING image_id",
                &[&node, &ids, &sizes, &times],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|s| ImageId::new(s).ok())
            .collect())
    }

    fn invalidate(&self, why: &Invalidation, _file: OnDisk<'_>) -> Result<()> {
        let node = self.inner.node_id;
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_invalid (node_reference_id, image_id, reason, invalidated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (node_reference_id, image_id) DO UPDATE SET
                 reason = EXCLUDED.reason, invalidated_at = EXCLUDED.invalidated_at",
                &[&node, &why.id.as_str(), &why.reason, &why.at],
            )
        })?;
        Ok(())
    }

    fn invalid_reason(
        &self,
        id: &ImageId,
        _file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)> {
        let node = self.inner.node_id;
        let row = self.with(|c| {
            c.opt(
                "SELECT reason, invalidated_at FROM imgcache_invalid
                 WHERE node_reference_id = $1 AND image_id = $2",
                &[&node, &id.as_str()],
            )
        })?;
        Ok(match row {
            Some(r) => (
                r.try_get(0).ok().flatten(),
                r.try_get::<_, Option<SystemTime>>(1)
                    .ok()
                    .flatten()
                    .map(round_trip),
            ),
            None => (None, None),
        })
    }

    fn forget_invalid(&self, ids: &[ImageId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let node = self.inner.node_id;
        let names: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        self.with(|c| {
            c.exec(
                "DELETE FROM imgcache_invalid WHERE node_reference_id = $1 AND image_id = ANY($2)",
                &[&node, &names],
            )
        })?;
        Ok(())
    }

    fn next_queue_seq(&self, _queue: OnDisk<'_>) -> Result<u64> {
        let node = self.inner.node_id;
        let v: i64 = self.with(|c| {
            c.one(
                "INSERT INTO imgcache_state (node_reference_id, key, value) VALUES ($1, 'queue_seq', 1)
                 ON CONFLICT (node_reference_id, key) DO UPDATE SET value = imgcache_state.value + 1
                 RETURNING value",
                &[&node],
            )
            .map(|r| r.get(0))
        })?;
        u64::try_from(v).map_err(|_| Error::CorruptMetadata {
            path: self.inner.pool.location.clone().into(),
            detail: format!("queue counter is negative ({v})"),
        })
    }

    fn records_watermark(&self) -> bool {
        true
    }

    fn max_id_len(&self) -> usize {
        self.inner.max_id
    }

    fn durable_watermark(&self, _base: OnDisk<'_>) -> Result<Option<Watermark>> {
        let node = self.inner.node_id;
        let rows = self.with(|c| {
            c.rows(
                "SELECT key, value FROM imgcache_state
                 WHERE node_reference_id = $1
                   AND key IN ('watermark_committed', 'watermark_changed')",
                &[&node],
            )
        })?;
        let mut committed = None;
        let mut changed = None;
        for row in rows {
            let key: String = row.get(0);
            let value: i64 = row.get(1);
            match key.as_str() {
                "watermark_committed" => committed = Some(value),
                _ => changed = Some(value),
            }
        }
        Ok(match (committed, changed) {
            (Some(a), Some(b)) => Some(Watermark::from_micros(a, b)),
            _ => None,
        })
    }

    fn record_watermark(&self, mark: Watermark, _base: OnDisk<'_>) -> Result<()> {
        // PostgreSQL's commit is durable: nothing more to sync. Each half
        // only moves forwards: each is a claim of its own.
        let node = self.inner.node_id;
        let (committed, changed) = mark.to_micros();
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_state (node_reference_id, key, value)
                 VALUES ($1, 'watermark_committed', $2), ($1, 'watermark_changed', $3)
                 ON CONFLICT (node_reference_id, key)
                 DO UPDATE SET value = GREATEST(imgcache_state.value, excluded.value)",
                &[&node, &committed, &changed],
            )
        })?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush_hits()
    }

    fn nodes_holding(&self, id: &ImageId) -> Result<Option<Vec<String>>> {
        let rows = self.with(|c| {
            c.rows(
                "SELECT n.node_reference_url FROM cached_images c
                 JOIN node_reference n ON n.node_reference_id = c.node_reference_id
                 WHERE c.image_id = $1 ORDER BY 1",
                &[&id.as_str()],
            )
        })?;
        Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
    }

    fn all_nodes(&self) -> Result<Option<Vec<NodeImage>>> {
        self.inner.flush_or_warn();
        let rows = self.with(|c| {
            c.rows(
                &format!(
                    "SELECT {COLUMNS}, n.node_reference_url FROM {ENTRIES}
                     JOIN node_reference n ON n.node_reference_id = c.node_reference_id
                     ORDER BY n.node_reference_url, c.image_id"
                ),
                &[],
            )
        })?;
        Ok(Some(
            rows.iter()
                .filter_map(|r| {
                    let image = decode(r).ok()?;
                    Some(NodeImage {
                        node: r.get(7),
                        image,
                    })
                })
                .collect(),
        ))
    }

    fn import(&self, entries: &[CachedImageInfo]) -> Result<Vec<ImageId>> {
        // Glance's migration: insert this node's rows that the database
        // lacks, then report every id the database now has for this node
        // (imported now or before), for the caller to delete locally. One
        // transaction, under a per-node lock: several processes of a node
        // migrating at once insert each row once.
        let node = self.inner.node_id;
        let entries: Vec<&CachedImageInfo> = entries.iter().filter(|e| self.fits(e)).collect();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let sizes: Vec<i64> = entries
            .iter()
            .map(|e| i64::try_from(e.size).unwrap_or(i64::MAX))
            .collect();
        let hits: Vec<i32> = entries
            .iter()
            .map(|e| i32::try_from(e.hits).unwrap_or(i32::MAX))
            .collect();
        let accessed: Vec<SystemTime> = entries.iter().map(|e| e.last_accessed).collect();
        let modified: Vec<SystemTime> = entries.iter().map(|e| e.last_modified).collect();
        let checksums: Vec<Option<&str>> = entries
            .iter()
            .map(|e| glance_checksum(&e.checksum))
            .collect();
        let crcs: Vec<Option<i64>> = entries.iter().map(|e| e.crc32.map(i64::from)).collect();
        let long: Vec<Option<&str>> = entries.iter().map(|e| long_checksum(&e.checksum)).collect();
        let present = self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&(SCHEMA_LOCK as i32), &(node as i32)])?;
            tx.execute(
                "WITH v AS (
                   SELECT * FROM UNNEST($2::text[], $3::bigint[], $4::int[], $5::timestamp[],
                                        $6::timestamp[], $7::text[], $8::bigint[], $9::text[])
                     AS v(image_id, size, hits, accessed, modified, checksum, crc32, long)),
                 c AS (
                   INSERT INTO cached_images
                   (image_id, size, hits, last_accessed, last_modified, checksum, node_reference_id)
                   SELECT v.image_id, v.size, v.hits, v.accessed, v.modified, v.checksum, $1 FROM v
                   ON CONFLICT (image_id, node_reference_id) DO NOTHING
                   RETURNING id, image_id)
                 INSERT INTO imgcache_entries (cached_image_id, crc32, checksum)
                 SELECT c.id, v.crc32, v.long FROM c JOIN v ON v.image_id = c.image_id
                 WHERE v.crc32 IS NOT NULL OR v.long IS NOT NULL
                 ON CONFLICT (cached_image_id) DO NOTHING",
                &[&node, &ids, &sizes, &hits, &accessed, &modified, &checksums, &crcs, &long],
            )?;
            let rows = tx.query(
                "SELECT image_id FROM cached_images WHERE node_reference_id = $1 AND image_id = ANY($2)",
                &[&node, &ids],
            )?;
            tx.commit()?;
            Ok(rows)
        })?;
        Ok(present
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|s| ImageId::new(s).ok())
            .collect())
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
        assert_eq!(redact(url), crate::redact_url(url));
        assert_eq!(
            redact("postgres://glance@db:5432/glance"),
            "postgres://glance@db:5432/glance"
        );
    }
}
