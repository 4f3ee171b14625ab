//! [`ImageCache`]: the facade users hold — the one local file layer and a
//! metadata store, joined, and the policies on top (prune, clean,
//! quarantine, recovery, single-flight fills, the tee, prefetch).
//!
//! Every public method that takes an id admits it first
//! ([`Layout::admit`]); nothing below can build a path from an id that was
//! not admitted, and the store receives only admitted ids.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::checksum::Checksum;
use crate::clock::{round_trip, to_epoch_secs};
use crate::drivers::{CacheDriver, SqliteDriver, XattrDriver};
use crate::entry::{
    CachedImageInfo, InvalidImageInfo, Invalidation, LruEntry, NodeImage, OnDisk, Watermark,
};
use crate::error::{Error, Result};
use crate::files::{self, queue, Admitted, CachedImage, CleanReport, Layout};
use crate::id::ImageId;
use crate::options::{CacheOptions, DriverKind, Durability};
use crate::origin::{Origin, OriginObject};

#[cfg(feature = "tokio")]
mod aio;
pub(crate) mod durability;
pub(crate) mod fill;
pub(crate) mod prefetch;
mod recover;
pub(crate) mod tee;
pub(crate) mod writer;

use fill::{FailureKind, Fill, FillProgress, Fills, FollowReader};
pub use recover::RecoveryReport;
use tee::TeeReader;
use writer::CacheWriter;

/// What [`ImageCache::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PruneReport {
    /// The images deleted, least recently accessed first.
    pub removed: Vec<ImageId>,
    /// Bytes freed.
    pub bytes: u64,
    /// Total cached bytes after the prune.
    pub remaining: u64,
}

impl PruneReport {
    /// How many images were deleted.
    pub fn files(&self) -> usize {
        self.removed.len()
    }
}

/// What [`ImageCache::migrate_from_sqlite`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MigrationReport {
    /// Rows the SQLite database held.
    pub rows: usize,
    /// Rows now in the store and deleted from the SQLite database.
    pub migrated: usize,
}

/// What [`ImageCache::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum Verification {
    /// Size and CRC-32 match what was committed.
    Intact,
    /// The entry has no recorded CRC (adopted, or written by Glance); this
    /// is the CRC of its bytes now.
    Unverified {
        /// CRC-32 of the file as read.
        crc32: u32,
    },
    /// The file is not what was committed.
    Corrupt {
        /// What differs.
        detail: String,
    },
}

/// What [`ImageCache::scrub`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ScrubReport {
    /// Entries whose size and CRC matched.
    pub intact: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Entries that had no CRC and now have one recorded.
    pub newly_verified: Vec<ImageId>,
    /// Entries that did not match, moved to `invalid/`, with the reason
    /// (serialized as `{"id": …, "reason": …}`).
    #[cfg_attr(feature = "serde", serde(serialize_with = "serde_corrupt"))]
    pub corrupt: Vec<(ImageId, String)>,
}

#[cfg(feature = "serde")]
fn serde_corrupt<S: serde::Serializer>(v: &[(ImageId, String)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    #[derive(serde::Serialize)]
    struct Corrupt<'a> {
        id: &'a ImageId,
        reason: &'a str,
    }
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for (id, reason) in v {
        seq.serialize_element(&Corrupt { id, reason })?;
    }
    seq.end()
}

/// A local image cache: the local file layer ([`Layout`]) and a metadata
/// store ([`CacheDriver`]), joined, with the operator's jobs (prune, clean,
/// scrub, prefetch) as policy on top.
///
/// `ImageCache` is `Send + Sync`; share it between threads with an `Arc`.
/// Several processes may open the same directory at once.
#[derive(Debug)]
pub struct ImageCache {
    layout: Layout,
    store: Arc<dyn CacheDriver>,
    options: CacheOptions,
    kind: Option<DriverKind>,
    recovery: RecoveryReport,
    migration: Option<MigrationReport>,
    fills: Arc<Fills>,
    /// One admission decision at a time ([`ImageCache::make_room`]).
    admission: parking_lot::Mutex<()>,
    /// Group durability: the checkpointer's state, and its thread (last,
    /// so that it stops, after a last checkpoint, when the cache goes).
    durable: Arc<durability::Durable>,
    checkpointer: Option<durability::CheckpointThread>,
}

/// [`ImageCache::migrate_from_sqlite`], on a store alone.
fn migrate_into(store: &dyn CacheDriver, db: &std::path::Path) -> Result<MigrationReport> {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    // In the private folder beside the database: a regular file in a
    // cache's base directory would be an image to Glance.
    let private = crate::files::layout::private_dir_of(parent);
    std::fs::create_dir_all(&private).map_err(|e| Error::io("create directory", &private, e))?;
    let lock_path = private.join(format!("migrate-{name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("create", &lock_path, e))?;
    lock.lock().map_err(|e| Error::io("lock", &lock_path, e))?;
    // Earlier versions kept the lock beside the database.
    let _ = std::fs::remove_file(parent.join(format!(".imgcache-migrate-{name}")));
    let local = SqliteDriver::open(db)?;
    let rows = local.entries()?;
    let present = store.import(&rows)?;
    local.delete(&present)?;
    drop(lock);
    Ok(MigrationReport {
        rows: rows.len(),
        migrated: present.len(),
    })
}

/// An image's bytes from wherever they are now; see [`ImageCache::fetch`].
#[derive(Debug)]
pub enum ImageStream<R: Read + Send + 'static> {
    /// A hit: the cached file.
    Cached(CachedImage),
    /// A miss this caller fills: the backend's bytes, cached on the way.
    Filling(Box<TeeReader<R>>),
    /// A miss another reader of this process is filling: its bytes as they
    /// land.
    Following(FollowReader),
}

impl<R: Read + Send + 'static> Read for ImageStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ImageStream::Cached(r) => r.read(buf),
            ImageStream::Filling(r) => r.read(buf),
            ImageStream::Following(r) => r.read(buf),
        }
    }
}

/// An image as [`ImageCache::fetch_detached`] found it.
#[derive(Debug)]
pub enum Fetched {
    /// A hit: the cached file.
    Cached(CachedImage),
    /// A fill in progress (maybe started by this call): its bytes as they
    /// land.
    Following(FollowReader),
    /// The metadata store cannot be reached: the origin's bytes, to pass
    /// through uncached. Its reader checks them as a fill would: the
    /// announced size and checksum are verified, and a mismatch is the
    /// error of its last read (as [`ImageCache::caching_reader`]'s).
    Uncached(OriginObject),
}

/// Where [`ImageCache::find`] found an image.
// One value, returned once: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Found {
    Hit(CachedImage),
    Follow(Arc<Fill>),
    Fill(CacheWriter, Arc<Fill>),
    /// The store is down, or cannot record this id: the origin answers,
    /// uncached.
    StoreDown(Error),
}

/// The read size of a fill's own thread.
const FILL_BUFFER: usize = 256 * 1024;

/// Ends a fill whose thread ends without ending it (a panic).
struct FillGuard {
    fill: Arc<Fill>,
    fills: Arc<Fills>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.fill.is_finished() {
            self.fills.remove(&self.fill);
            self.fill
                .finish(Err("the fill's thread ended before the fill".into()));
        }
    }
}

/// An origin's stream that must end at the size the origin announced: a
/// shorter or longer one is an error, so that the fill fails rather than
/// commit what the origin did not mean.
struct SizeChecked {
    inner: Box<dyn Read + Send>,
    announced: Option<u64>,
    seen: u64,
}

impl Read for SizeChecked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        match self.announced {
            Some(size) if self.seen > size || (n == 0 && !buf.is_empty() && self.seen < size) => {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if self.seen > size {
                        format!("the origin announced {size} bytes and sent more")
                    } else {
                        format!("the origin announced {size} bytes and sent {}", self.seen)
                    },
                ))
            }
            _ => Ok(n),
        }
    }
}

/// An origin's object to pass through uncached, checked as a fill would
/// be: its announced size and checksum verified, a mismatch the error of
/// its last read.
fn checked_object(id: &ImageId, object: OriginObject) -> OriginObject {
    let source = SizeChecked {
        inner: object.reader,
        announced: object.size,
        seen: 0,
    };
    let checked = TeeReader::pass_through(id.clone(), source, object.checksum.clone());
    OriginObject {
        reader: Box::new(checked),
        ..object
    }
}

/// A cached file as [`ImageCache::verify`] read it: open, with its path and
/// metadata.
type Verified = (std::fs::File, std::path::PathBuf, std::fs::Metadata);

/// How many times [`ImageCache::fetch`] goes round when other writers keep
/// winning races, before it gives up.
const FETCH_ROUNDS: usize = 64;

impl ImageCache {
    /// Options for a cache in `dir`, with Glance's defaults; finish with
    /// [`CacheOptions::open`].
    pub fn builder(dir: impl Into<std::path::PathBuf>) -> CacheOptions {
        CacheOptions::new(dir)
    }

    /// Opens (creating if needed) the cache `options` describe.
    ///
    /// With the `xattr` driver on a file system without user extended
    /// attributes this fails with [`Error::XattrUnsupported`], unless
    /// [`CacheOptions::fallback_to_sqlite`] was set: then it logs a warning
    /// and opens the `sqlite` driver ([`ImageCache::driver_kind`] tells which
    /// one is in use).
    pub fn open(options: CacheOptions) -> Result<Self> {
        let layout = Self::layout_for(&options)?;
        let read_only = options.is_read_only();
        let sqlite = || -> Result<Arc<dyn CacheDriver>> {
            let db = options.sqlite_db_path();
            Ok(Arc::new(if read_only {
                SqliteDriver::open_read_only(&db)?
            } else {
                SqliteDriver::open_with(&db, options.sqlite_journal_mode())?
            }))
        };
        let xattr = |dir: &std::path::Path| {
            if read_only {
                XattrDriver::open_read_only(dir)
            } else {
                XattrDriver::open(dir)
            }
        };
        let (store, kind) = match options.image_cache_driver() {
            DriverKind::Sqlite => (sqlite()?, DriverKind::Sqlite),
            DriverKind::Xattr => match xattr(layout.base()) {
                Ok(d) => (Arc::new(d) as Arc<dyn CacheDriver>, DriverKind::Xattr),
                Err(e @ Error::XattrUnsupported { .. }) if options.falls_back_to_sqlite() => {
                    log::warn!("imgcache: {e}; falling back to the sqlite driver as configured");
                    (sqlite()?, DriverKind::Sqlite)
                }
                Err(e) => return Err(e),
            },
            DriverKind::CentralizedDb => {
                (Self::centralized_db(&options)?, DriverKind::CentralizedDb)
            }
        };
        Self::recovered(layout, store, options, Some(kind))
    }

    /// What the migration at open did ([`CacheOptions::migrate_sqlite`]),
    /// if one ran.
    pub fn migration(&self) -> Option<&MigrationReport> {
        self.migration.as_ref()
    }

    /// The `centralized_db` store the options describe.
    #[cfg(feature = "postgres")]
    fn centralized_db(options: &CacheOptions) -> Result<Arc<dyn CacheDriver>> {
        let url = options.database_url_ref().ok_or_else(|| {
            Error::Config(
                "the centralized_db driver needs a database URL \
                 (--database-url, IMGCACHE_DATABASE_URL, or [database] connection)"
                    .into(),
            )
        })?;
        let node = options.node_url_ref().ok_or_else(|| {
            Error::Config(
                "the centralized_db driver needs this node's URL \
                 (worker_self_reference_url, --node-url, IMGCACHE_NODE_URL)"
                    .into(),
            )
        })?;
        if options.is_read_only() {
            return Ok(Arc::new(
                crate::drivers::CentralizedDbDriver::open_read_only(url, node)?,
            ));
        }
        let tables = if options.creates_tables() {
            crate::drivers::centralized_db::Tables::Create
        } else {
            crate::drivers::centralized_db::Tables::Require
        };
        Ok(Arc::new(crate::drivers::CentralizedDbDriver::open_with(
            url, node, tables,
        )?))
    }

    #[cfg(not(feature = "postgres"))]
    fn centralized_db(_options: &CacheOptions) -> Result<Arc<dyn CacheDriver>> {
        Err(Error::Config(
            "the centralized_db driver needs imgcache built with the `postgres` feature".into(),
        ))
    }

    /// Moves this node's rows from a local SQLite database (Glance's
    /// `cache.db`) into the store, as Glance migrates to `centralized_db`
    /// (at start-up: [`CacheOptions::migrate_sqlite`] runs it before the
    /// recovery walk, which would otherwise adopt the files without their
    /// rows' hits):
    /// the rows the store lacks are recorded, every row the store then holds
    /// is deleted from the SQLite file (the file is kept). One way,
    /// idempotent, and safe to run from several processes and nodes at once
    /// (an exclusive lock beside the SQLite file here, the store's own lock
    /// there); a run killed half-way loses nothing: a row leaves SQLite only
    /// once the store has it.
    pub fn migrate_from_sqlite(&self, db: &std::path::Path) -> Result<MigrationReport> {
        migrate_into(&*self.store, db)
    }

    /// This node's identity in its store ([`CacheDriver::node`]).
    pub fn node(&self) -> &str {
        self.store.node()
    }

    /// The nodes whose caches hold `id` (Glance's `GET
    /// /v2/cache/nodes/{image_id}`); `None` with a store of one node.
    pub fn cached_nodes(&self, id: &ImageId) -> Result<Option<Vec<String>>> {
        let key = self.layout.admit(id)?;
        self.store.nodes_holding(key.id())
    }

    /// Every cached image of every node sharing the store, ordered by node
    /// and id; `None` with a store of one node.
    pub fn cached_images_all_nodes(&self) -> Result<Option<Vec<NodeImage>>> {
        self.store.all_nodes()
    }

    /// A cache over a metadata store of your own (or a built-in one opened
    /// by hand). `options` supplies the directory and the policy settings
    /// (max size, stall time); its driver setting is ignored. Runs the
    /// recovery walk, as [`ImageCache::open`] does.
    pub fn with_driver(driver: Arc<dyn CacheDriver>, options: CacheOptions) -> Result<Self> {
        let mut layout = Self::layout_for(&options)?;
        for file in driver.files() {
            layout.reserve(&file);
        }
        Self::recovered(layout, driver, options, None)
    }

    /// The directory's layout, created if missing. The configured database
    /// name is reserved whatever the store, so that switching stores never
    /// turns the database into an image.
    fn layout_for(options: &CacheOptions) -> Result<Layout> {
        let layout = Layout::new(options.image_cache_dir(), Some(&options.sqlite_db_path()));
        if options.is_read_only() {
            let base = layout.base();
            if !base.is_dir() {
                return Err(Error::io(
                    "open",
                    base,
                    io::Error::from(io::ErrorKind::NotFound),
                ));
            }
        } else {
            layout.create()?;
        }
        Ok(layout)
    }

    fn recovered(
        layout: Layout,
        store: Arc<dyn CacheDriver>,
        options: CacheOptions,
        kind: Option<DriverKind>,
    ) -> Result<Self> {
        // Glance's order: the migration first, before anything else (the
        // recovery walk would adopt the files without their rows' hits).
        let mut migration = None;
        if options.migrates_sqlite() && !options.is_read_only() {
            let db = options.sqlite_db_path();
            if db.exists() {
                let report = migrate_into(&*store, &db)?;
                log::info!(
                    "imgcache: migrated {} of {} rows of {} to node {}",
                    report.migrated,
                    report.rows,
                    db.display(),
                    store.node()
                );
                migration = Some(report);
            }
        }
        let durable = Arc::new(durability::Durable::new(
            options.durability_mode(),
            layout.clone(),
            store.clone(),
            options.clock_ref().clone(),
        ));
        let mut cache = ImageCache {
            layout,
            store,
            options,
            kind,
            recovery: RecoveryReport::default(),
            migration,
            fills: Arc::default(),
            admission: parking_lot::Mutex::new(()),
            durable,
            checkpointer: None,
        };
        if cache.options.is_read_only() {
            // Inspection only: what recovery would mend stays as it is (the
            // next process that may write mends it), and nothing is
            // checkpointed.
            return Ok(cache);
        }
        let unclean = cache.durable.keeps_watermark() && cache.durable.session_start()?;
        cache.recovery = cache.recover(unclean)?;
        cache.durable.session_joined()?;
        if cache.durable.keeps_watermark() {
            // Before this process commits anything, the store holds a
            // watermark, so that "none" means no group commit was ever made
            // here (once in the life of a cache directory).
            let r = &cache.recovery;
            if r.watermark.is_none() {
                cache.durable.checkpoint()?;
            }
            // What the walk checked is covered by the checkpointer's first
            // pass, off the opening thread, so that the next open need not
            // read it again.
            let soon = !r.verified.is_empty() || !r.torn.is_empty();
            cache.checkpointer = Some(durability::CheckpointThread::spawn(
                cache.durable.clone(),
                soon,
            )?);
        }
        if !cache.recovery.is_clean() {
            log::warn!(
                "imgcache: recovered {}: dropped {} entries without files, adopted {} files \
                 without metadata, quarantined {} corrupt entries",
                cache.layout.base().display(),
                cache.recovery.dropped.len(),
                cache.recovery.adopted.len(),
                cache.recovery.quarantined.len()
            );
        }
        Ok(cache)
    }

    /// Opens the cache after moving a broken SQLite database (see
    /// [`Error::BadDatabase`]) aside to `.imgcache/broken-<unix time>-<name>`
    /// beside it (the cache's private folder): the
    /// metadata is recreated from the cached files, which are adopted
    /// unverified ([`ImageCache::scrub`] verifies them). Hit counts and
    /// access times are lost. Stop other processes using the directory
    /// first. With the xattr driver, where metadata lives on the files, this
    /// is [`ImageCache::open`].
    pub fn rebuild(options: CacheOptions) -> Result<Self> {
        if options.image_cache_driver() == DriverKind::Sqlite || options.falls_back_to_sqlite() {
            let db = options.sqlite_db_path();
            if db.exists() {
                let stamp = to_epoch_secs(options.clock_ref().now()).max(0.0) as u64;
                let name = db
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Into the private folder beside it: in a cache's base
                // directory, a regular file would be an image to Glance.
                let private = crate::files::layout::private_dir_of(
                    db.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(std::path::Path::new(".")),
                );
                std::fs::create_dir_all(&private)
                    .map_err(|e| Error::io("create directory", &private, e))?;
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let from = db.with_file_name(format!("{name}{suffix}"));
                    let to = private.join(format!("broken-{stamp}-{name}{suffix}"));
                    match std::fs::rename(&from, &to) {
                        Ok(()) => {
                            log::warn!("imgcache: moved {} to {}", from.display(), to.display())
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io("rename", &from, e)),
                    }
                }
            }
        }
        Self::open(options)
    }

    /// What recovery found and mended when the cache was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The metadata store.
    pub fn driver(&self) -> &dyn CacheDriver {
        &*self.store
    }

    /// Which built-in driver is in use (after any fallback); `None` for a
    /// driver given to [`ImageCache::with_driver`].
    pub fn driver_kind(&self) -> Option<DriverKind> {
        self.kind
    }

    /// The options the cache was opened with.
    pub fn options(&self) -> &CacheOptions {
        &self.options
    }

    /// The paths of the cache directory.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The cache's clock, now, as stored (rounded to what a store keeps).
    fn now(&self) -> SystemTime {
        round_trip(self.options.clock_ref().now())
    }

    /// How this cache's commits are made durable: as configured
    /// ([`CacheOptions::durability`]), or [`Durability::Immediate`] over a
    /// store that records no watermark.
    pub fn durability(&self) -> Durability {
        self.durable.mode()
    }

    /// Makes everything committed so far (by any process on this file
    /// system) durable now, and records the new [`Watermark`]; `None` over
    /// a store that records none. The background checkpointer does this on
    /// its own ([`Durability::Group`]); call it before a planned power-off,
    /// or to bound what the next open after a crash must check.
    pub fn checkpoint(&self) -> Result<Option<Watermark>> {
        if !self.durable.keeps_watermark() {
            return Ok(None);
        }
        self.durable.checkpoint().map(Some)
    }

    /// The last durability [`Watermark`] recorded in the store; `None` if
    /// it records none.
    pub fn durable_watermark(&self) -> Result<Option<Watermark>> {
        if !self.durable.keeps_watermark() {
            return Ok(None);
        }
        self.durable.watermark()
    }

    /// Checkpoints this cache has completed since it was opened.
    pub fn checkpoints(&self) -> u64 {
        self.durable.checkpoints()
    }

    /// Writes metadata held in memory (the SQLite driver's batched hit
    /// counts) now, so that other processes see it. Dropping the cache does
    /// it too.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// Total bytes of cached images.
    pub fn cache_size(&self) -> Result<u64> {
        self.store.total_size(&self.layout)
    }

    /// Every cached image (id, size, hits, last accessed, last modified),
    /// ordered by id.
    pub fn cached_images(&self) -> Result<Vec<CachedImageInfo>> {
        self.store.list(&self.layout)
    }

    /// One cached image's metadata, without counting a hit.
    pub fn cached_image(&self, id: &ImageId) -> Result<Option<CachedImageInfo>> {
        let key = self.layout.admit(id)?;
        self.entry(key)
    }

    /// The entry of an admitted id whose file is in place (read through
    /// the open file, so that a store on the file reads one inode).
    fn entry(&self, key: Admitted<'_>) -> Result<Option<CachedImageInfo>> {
        match self.layout.open_cached(key)? {
            Some((file, path, meta)) => self
                .store
                .get(key.id(), OnDisk::new(&path, Some(&file), &meta)),
            None => Ok(None),
        }
    }

    /// Hits of `id` since it was cached (0 if not cached).
    pub fn hit_count(&self, id: &ImageId) -> Result<u64> {
        Ok(self.cached_image(id)?.map_or(0, |i| i.hits))
    }

    /// Whether `id` is cached: its file is in place and the store has its
    /// entry.
    pub fn is_cached(&self, id: &ImageId) -> Result<bool> {
        match self.cached_image(id) {
            Ok(entry) => Ok(entry.is_some()),
            // Not servable: the next read quarantines it.
            Err(Error::CorruptMetadata { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `id` is neither cached nor being cached.
    pub fn is_cacheable(&self, id: &ImageId) -> Result<bool> {
        Ok(!self.is_cached(id)? && !self.is_being_cached(id)?)
    }

    /// Whether a writer is filling `id` (or died doing so).
    pub fn is_being_cached(&self, id: &ImageId) -> Result<bool> {
        let key = self.layout.admit(id)?;
        Ok(self.layout.incomplete(key).is_file())
    }

    /// Whether `id` is queued.
    pub fn is_queued(&self, id: &ImageId) -> Result<bool> {
        let key = self.layout.admit(id)?;
        Ok(queue::contains(&self.layout, key))
    }

    /// Deletes cached image `id`; `false` if it was not cached.
    pub fn delete_cached_image(&self, id: &ImageId) -> Result<bool> {
        let key = self.layout.admit(id)?;
        Ok(self.delete_cached_images(std::slice::from_ref(key.id()))? > 0)
    }

    /// Deletes cached images `ids`, files first, then the store's entries in
    /// one batch (a crash in between leaves entries without files, which a
    /// reader treats as not cached and the recovery walk drops). Returns how
    /// many files were removed. An id the layout does not admit (a store row
    /// named like one of the cache's own files) loses its entry only.
    fn delete_cached_images(&self, ids: &[ImageId]) -> Result<usize> {
        let mut removed = 0;
        for id in ids {
            if let Ok(key) = self.layout.admit(id) {
                if self.layout.remove_cached(key)? {
                    removed += 1;
                }
            }
        }
        self.store.remove(ids)?;
        Ok(removed)
    }

    /// Deletes every cached image, those the store knows and files it does
    /// not (as Glance's `delete_all` walks the directory); returns how many.
    pub fn delete_all_cached_images(&self) -> Result<usize> {
        let mut ids: Vec<ImageId> = self
            .store
            .lru(&self.layout)?
            .into_iter()
            .map(|e| e.id)
            .collect();
        ids.extend(
            self.layout
                .list(self.layout.base())?
                .into_iter()
                .map(|(id, _)| id),
        );
        ids.sort();
        ids.dedup();
        self.delete_cached_images(&ids)
    }

    /// Removes `id` from the queue; `false` if it was not queued.
    pub fn delete_queued_image(&self, id: &ImageId) -> Result<bool> {
        let key = self.layout.admit(id)?;
        queue::remove(&self.layout, key)
    }

    /// Empties the queue; returns how many were removed.
    pub fn delete_all_queued_images(&self) -> Result<usize> {
        queue::clear(&self.layout)
    }

    /// Queues `id` for prefetching; `false` if it is already cached, being
    /// cached or queued.
    pub fn queue_image(&self, id: &ImageId) -> Result<bool> {
        let key = self.layout.admit(id)?;
        if self.entry(key)?.is_some()
            || self.layout.incomplete(key).is_file()
            || queue::contains(&self.layout, key)
        {
            return Ok(false);
        }
        let (dir, meta) = self.layout.open_queue_dir()?;
        let seq =
            self.store
                .next_queue_seq(OnDisk::new(self.layout.queue_dir(), Some(&dir), &meta))?;
        queue::add(&self.layout, key, seq)
    }

    /// The queued images, oldest first.
    pub fn queued_images(&self) -> Result<Vec<ImageId>> {
        queue::list(&self.layout)
    }

    /// The failed writes kept in `invalid/`, with their reasons.
    pub fn invalid_images(&self) -> Result<Vec<InvalidImageInfo>> {
        let files = self.layout.list(self.layout.invalid_dir())?;
        let mut out = Vec::with_capacity(files.len());
        for (id, meta) in files {
            let path = self.layout.invalid(Admitted::again(&id));
            let (reason, invalidated_at) = match self
                .store
                .invalid_reason(&id, OnDisk::new(&path, None, &meta))
            {
                Ok(r) => r,
                // Removed by a concurrent clean.
                Err(e) if e.io_kind() == Some(io::ErrorKind::NotFound) => continue,
                Err(e) => return Err(e),
            };
            out.push(InvalidImageInfo {
                id,
                size: meta.len(),
                reason,
                invalidated_at,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Cached images, least recently accessed first.
    pub fn least_recently_accessed(&self) -> Result<Vec<LruEntry>> {
        self.store.lru(&self.layout)
    }

    /// Starts writing `id`: creates `incomplete/<id>` exclusively, locked
    /// for the writer's life.
    ///
    /// Errors: [`Error::AlreadyBeingCached`] if another writer holds it,
    /// [`Error::AlreadyCached`] if it is cached.
    pub fn open_for_write(&self, id: &ImageId) -> Result<CacheWriter> {
        let key = self.layout.admit(id)?;
        self.writer(key)
    }

    fn writer(&self, key: Admitted<'_>) -> Result<CacheWriter> {
        CacheWriter::create(
            &self.layout,
            key,
            self.store.clone(),
            self.options.clock_ref().clone(),
            self.durable.clone(),
        )
    }

    /// Opens cached image `id`, counting a hit; `None` if it is not cached.
    ///
    /// A file whose size is not what was committed, or whose metadata
    /// cannot be decoded, is never served: it is moved to `invalid/` and
    /// [`Error::Corrupt`] (or [`Error::CorruptMetadata`]) is returned; the
    /// next request is a miss. [`ImageCache::fetch`] goes to the origin
    /// instead.
    pub fn open_for_read(&self, id: &ImageId) -> Result<Option<CachedImage>> {
        let key = self.layout.admit(id)?;
        match self.read_hit(key) {
            Err(Error::Corrupt { id, path, detail }) => {
                self.quarantine(key, &detail)?;
                Err(Error::Corrupt { id, path, detail })
            }
            Err(Error::CorruptMetadata { path, detail }) => {
                self.quarantine(key, &format!("corrupt metadata: {detail}"))?;
                Err(Error::CorruptMetadata { path, detail })
            }
            other => other,
        }
    }

    fn read_hit(&self, key: Admitted<'_>) -> Result<Option<CachedImage>> {
        let Some((file, path, meta)) = self.layout.open_cached(key)? else {
            // A store entry whose file is gone is stale: drop it, unless a
            // commit lands meanwhile.
            let path = self.layout.cached(key);
            let missing = std::slice::from_ref(key.id());
            match self.store.remove_if_missing(missing, &|_| !path.exists()) {
                Ok(()) => {}
                // A store that cannot be reached has nothing to drop now;
                // the recovery walk drops what stays stale.
                Err(e @ Error::Store(_)) => log::warn!("imgcache: {key}: {e}"),
                Err(e) => return Err(e),
            }
            return Ok(None);
        };
        let on = OnDisk::new(&path, Some(&file), &meta);
        let Some(info) = self.store.hit(key.id(), self.now(), on)? else {
            return Ok(None);
        };
        CachedImage::new(file, path, info).map(Some)
    }

    /// Moves cached image `id` to `invalid/` with `reason` recorded, and
    /// drops its entry; `false` if its file was not there (its entry goes
    /// all the same).
    pub(crate) fn quarantine(&self, key: Admitted<'_>, reason: &str) -> Result<bool> {
        if self.options.is_read_only() {
            log::warn!(
                "imgcache: {}: {reason} (left in place: opened read-only)",
                key.id()
            );
            return Ok(false);
        }
        let ids = std::slice::from_ref(key.id());
        let Some((file, _, meta)) = self.layout.open_cached(key)? else {
            self.store.remove(ids)?;
            return Ok(false);
        };
        // Files first: the move, then the reason (on the moved file), then
        // the entry. A crash between leaves an entry without a file, which
        // the recovery walk drops.
        let moved = self.layout.quarantine(key)?;
        if moved {
            // Durable at once, whatever the mode: a torn file that came
            // back after a power cut would be served.
            self.layout.sync_base()?;
            let why = Invalidation::new(key.id().clone(), meta.len(), reason, self.now());
            let path = self.layout.invalid(key);
            if let Err(e) = self
                .store
                .invalidate(&why, OnDisk::new(&path, Some(&file), &meta))
            {
                log::warn!("imgcache: cannot record why {key} was quarantined: {e}");
            }
            log::error!("imgcache: quarantined {key}: {reason}");
        }
        drop(file);
        self.store.remove(ids)?;
        Ok(moved)
    }

    /// Reads cached image `id` whole and checks its size and CRC-32 against
    /// what was committed, without counting a hit; `None` if it is not
    /// cached. Reads through a 1 MiB buffer; costs one full read of the file.
    pub fn verify(&self, id: &ImageId) -> Result<Option<Verification>> {
        let key = self.layout.admit(id)?;
        Ok(self.verify_key(key)?.map(|(v, _)| v))
    }

    /// [`ImageCache::verify`], keeping the file it read (so that a scrub
    /// records the CRC on the inode it checked).
    fn verify_key(&self, key: Admitted<'_>) -> Result<Option<(Verification, Verified)>> {
        let Some((mut file, path, meta)) = self.layout.open_cached(key)? else {
            return Ok(None);
        };
        let Some(info) = self
            .store
            .get(key.id(), OnDisk::new(&path, Some(&file), &meta))?
        else {
            return Ok(None);
        };
        let len = meta.len();
        let verdict = if len != info.size {
            Verification::Corrupt {
                detail: format!("{len} bytes on disk, {} were committed", info.size),
            }
        } else {
            let mut crc = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read", &path, e)),
                };
                crc.update(&buf[..n]);
            }
            let crc = crc.finalize();
            match info.crc32 {
                Some(c) if c == crc => Verification::Intact,
                Some(c) => Verification::Corrupt {
                    detail: format!("CRC-32 is {crc:08x}, {c:08x} was committed"),
                },
                None => Verification::Unverified { crc32: crc },
            }
        };
        Ok(Some((verdict, (file, path, meta))))
    }

    /// Verifies every cached image: corrupt ones are moved to `invalid/`
    /// with the reason, unverified ones get their CRC recorded. Reads every
    /// cached byte once.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        for info in self.cached_images()? {
            let Ok(key) = self.layout.admit(&info.id) else {
                continue;
            };
            match self.verify_key(key)? {
                None => {}
                Some((Verification::Intact, _)) => {
                    report.intact += 1;
                    report.bytes += info.size;
                }
                Some((Verification::Unverified { crc32 }, (file, path, meta))) => {
                    let on = OnDisk::new(&path, Some(&file), &meta);
                    self.store.set_crc32(&info.id, crc32, on)?;
                    report.bytes += info.size;
                    report.newly_verified.push(info.id);
                }
                Some((Verification::Corrupt { detail }, _)) => {
                    self.quarantine(key, &detail)?;
                    report.corrupt.push((info.id, detail));
                }
            }
        }
        Ok(report)
    }

    /// The size of cached image `id`; `None` if not cached.
    pub fn image_size(&self, id: &ImageId) -> Result<Option<u64>> {
        Ok(self.cached_image(id)?.map(|i| i.size))
    }

    /// Deletes least recently accessed images until the cache holds at most
    /// `image_cache_max_size` bytes. See [`ImageCache::prune_to`].
    pub fn prune(&self) -> Result<PruneReport> {
        self.prune_to(self.options.image_cache_max_size())
    }

    /// Deletes least recently accessed images until the cache holds at most
    /// `max_size` bytes (`0` empties it). One ordered pass over the LRU
    /// order (which also gives the total) and one batched delete; never a
    /// rescan per deleted image.
    pub fn prune_to(&self, max_size: u64) -> Result<PruneReport> {
        let lru = self.store.lru(&self.layout)?;
        let mut total: u64 = lru.iter().map(|e| e.size).sum();
        let mut victims = Vec::new();
        let mut bytes = 0;
        for entry in lru {
            if total <= max_size {
                break;
            }
            total = total.saturating_sub(entry.size);
            bytes += entry.size;
            victims.push(entry.id);
        }
        if !victims.is_empty() {
            self.delete_cached_images(&victims)?;
            log::info!(
                "imgcache: pruned {} images ({bytes} bytes), {total} bytes remain",
                victims.len()
            );
        }
        Ok(PruneReport {
            removed: victims,
            bytes,
            remaining: total,
        })
    }

    /// Deletes every file in `invalid/`, and every `incomplete/` file older
    /// than `stall_time` (default: `image_cache_stall_time`) whose writer is
    /// gone. A file whose writer is alive is kept, however old.
    pub fn clean(&self, stall_time: Option<Duration>) -> Result<CleanReport> {
        let stall = stall_time.unwrap_or(self.options.image_cache_stall_time());
        let report = self.layout.clean(stall, self.options.clock_ref().now())?;
        let gone: Vec<ImageId> = report.invalid.iter().filter_map(|f| f.id.clone()).collect();
        self.store.forget_invalid(&gone)?;
        if report.files() > 0 {
            log::info!(
                "imgcache: cleaned {} invalid and {} stalled files ({} bytes)",
                report.invalid.len(),
                report.stalled.len(),
                report.bytes()
            );
        }
        Ok(report)
    }

    /// Wraps a backend stream so that its bytes are cached as the caller
    /// reads them: the *caching tee*. See [`TeeReader`] for what happens at
    /// the end of the stream, on a checksum mismatch, a source error, a
    /// cache write error, or an early drop.
    ///
    /// If `id` is already cached, or being cached (by this process or
    /// another), the source passes through untouched (its checksum still
    /// checked); [`ImageCache::fetch`] joins a fill instead.
    pub fn caching_reader<R: Read + Send + 'static>(
        &self,
        id: &ImageId,
        expected: Option<Checksum>,
        source: R,
    ) -> Result<TeeReader<R>> {
        let key = self.layout.admit(id)?;
        let started = self.fills.with(|map| {
            if map.contains_key(id) {
                return Ok(None);
            }
            match self.start_fill(key, map) {
                Ok(pair) => Ok(Some(pair)),
                Err(Error::AlreadyCached { .. } | Error::AlreadyBeingCached { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        Ok(match started {
            Some((writer, fill)) => self.tee(writer, fill, source, expected),
            None => TeeReader::pass_through(id.clone(), source, expected),
        })
    }

    /// The tee of a fill this caller has started.
    fn tee<R: Read + Send + 'static>(
        &self,
        writer: CacheWriter,
        fill: Arc<Fill>,
        source: R,
        expected: Option<Checksum>,
    ) -> TeeReader<R> {
        TeeReader::filling(
            writer,
            fill,
            self.fills.clone(),
            source,
            expected,
            self.options.finishes_abandoned_fills(),
        )
    }

    /// Opens a writer for `id` and registers its fill so that others can
    /// follow it. The registry is locked by the caller.
    fn start_fill(
        &self,
        key: Admitted<'_>,
        map: &mut std::collections::HashMap<ImageId, Arc<Fill>>,
    ) -> Result<(CacheWriter, Arc<Fill>)> {
        if self.fills.is_stopping() {
            return Err(Error::FillFailed {
                id: key.id().clone(),
                reason: "the cache is shutting down".into(),
            });
        }
        let writer = self.writer(key)?;
        let fill = Arc::new(Fill::new(key.id().clone(), writer.reopen_file()?));
        map.insert(key.id().clone(), fill.clone());
        Ok((writer, fill))
    }

    /// Reads `id` from wherever it is, fetching it from the backend at most
    /// once however many callers ask at the same moment (*single flight*):
    ///
    /// - cached: the cached file ([`ImageStream::Cached`], a hit);
    /// - being filled by another reader of this process: its bytes as they
    ///   land in the cache ([`ImageStream::Following`]);
    /// - being filled by another process: waits for that writer to finish
    ///   (its lock on the incomplete file), then reads the cached file — or,
    ///   if the writer died, takes the fill over;
    /// - not cached: calls `open` for the backend stream and caches it on
    ///   the way ([`ImageStream::Filling`]); `expected` is checked at the
    ///   end.
    ///
    /// A cached file found corrupt is quarantined and the image fetched
    /// again: a fault of the cache is never the caller's. A failure to open
    /// the backend is [`Error::Source`], and leaves nothing behind.
    pub fn fetch<R, F>(
        &self,
        id: &ImageId,
        expected: Option<Checksum>,
        open: F,
    ) -> Result<ImageStream<R>>
    where
        R: Read + Send + 'static,
        F: FnOnce() -> io::Result<R>,
    {
        self.fetch_inner(id, move || {
            open().map(|r| (r, expected)).map_err(|e| Error::Source {
                id: id.clone(),
                source: e,
            })
        })
    }

    /// [`ImageCache::fetch`] from an [`Origin`], which supplies the expected
    /// checksum if it knows one. An image the origin does not have is
    /// [`Error::OriginNotFound`].
    pub fn fetch_from(
        &self,
        id: &ImageId,
        origin: &dyn Origin,
    ) -> Result<ImageStream<Box<dyn Read + Send>>> {
        self.fetch_inner(id, || origin.open(id).map(|o| (o.reader, o.checksum)))
    }

    fn fetch_inner<R, F>(&self, id: &ImageId, open: F) -> Result<ImageStream<R>>
    where
        R: Read + Send + 'static,
        F: FnOnce() -> Result<(R, Option<Checksum>)>,
    {
        let key = self.layout.admit(id)?;
        Ok(match self.find(key)? {
            Found::Hit(image) => ImageStream::Cached(image),
            Found::Follow(fill) => ImageStream::Following(FollowReader::new(fill)),
            Found::StoreDown(e) => {
                log::warn!("imgcache: {id}: {e}; serving it from the origin, uncached");
                let (source, expected) = open()?;
                ImageStream::Filling(Box::new(
                    TeeReader::pass_through(id.clone(), source, expected)
                        .uncached_because(e.to_string()),
                ))
            }
            Found::Fill(writer, fill) => match open() {
                Ok((source, expected)) => {
                    fill.start(None, expected.clone());
                    ImageStream::Filling(Box::new(self.tee(writer, fill, source, expected)))
                }
                Err(e) => {
                    let reason = format!("cannot open the source: {e}");
                    // Nothing was written: nothing to keep in invalid/.
                    if let Err(discard) = writer.discard() {
                        log::error!("imgcache: {id}: {discard}");
                    }
                    fill.finish(Err(reason));
                    self.fills.remove(&fill);
                    return Err(e);
                }
            },
        })
    }

    /// Where `id` is now: cached, being filled here (to follow), or not —
    /// then a new fill registered for the caller to drive. Goes round while
    /// other writers win races, waits for another process's writer, and
    /// quarantines a corrupt cached file on the way.
    fn find(&self, key: Admitted<'_>) -> Result<Found> {
        let id = key.id();
        if let Err(e) = self.storable(id) {
            return Ok(Found::StoreDown(e));
        }
        for _ in 0..FETCH_ROUNDS {
            match self.open_for_read(id) {
                Ok(Some(image)) => return Ok(Found::Hit(image)),
                Ok(None) => {}
                // A fault of the cache is never the client's: the entry is
                // quarantined by now, and the origin answers instead.
                Err(e @ (Error::Corrupt { .. } | Error::CorruptMetadata { .. })) => {
                    log::warn!("imgcache: {id}: {e}; fetching it from the origin again");
                }
                // The metadata store is down: the origin answers, and nothing
                // is cached (a commit could not be recorded).
                Err(e @ Error::Store(_)) => return Ok(Found::StoreDown(e)),
                Err(e) => return Err(e),
            }
            // `Ok(None)`: go round; `Err(None)`: another process writes it.
            let step = self.fills.with(|map| {
                if let Some(fill) = map.get(id) {
                    return Ok(Some(Found::Follow(fill.clone())));
                }
                match self.start_fill(key, map) {
                    Ok((writer, fill)) => Ok(Some(Found::Fill(writer, fill))),
                    Err(Error::AlreadyCached { .. }) => Ok(None),
                    Err(Error::AlreadyBeingCached { .. }) => Err(None),
                    Err(e) => Err(Some(e)),
                }
            });
            match step {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                // Waits with the registry unlocked.
                Err(None) => files::wait_for_writer(&self.layout, key)?,
                Err(Some(e)) => return Err(e),
            }
        }
        Err(Error::FillFailed {
            id: id.clone(),
            reason: format!("other writers kept winning, {FETCH_ROUNDS} times"),
        })
    }

    /// A follower of the fill of `id` in progress in this process, if one
    /// runs: no disk or store access and no waiting (`None` also when the
    /// registry is busy), so an async caller may ask on a runtime thread
    /// before it goes to [`ImageCache::fetch_detached`].
    pub fn follow(&self, id: &ImageId) -> Result<Option<FollowReader>> {
        self.layout.admit(id)?;
        // Never waits: a busy registry (a fill being registered) is a "no".
        Ok(self.fills.try_get(id).flatten().map(FollowReader::new))
    }

    /// Reads `id` from wherever it is, as [`ImageCache::fetch`] does, but
    /// with a fill that belongs to no caller: on a miss, `open` runs on a
    /// thread of its own, which reads the origin into the cache at the
    /// origin's pace, and every caller — this one included — gets a
    /// [`FollowReader`] of the filling file, to read at its own pace.
    ///
    /// This is what a server wants: a slow client never slows the fill or
    /// the others, a client that leaves does not stop it, and a failed fill
    /// (the origin's error, a wrong size or checksum, a full disk) reaches
    /// every follower as an error, never as a clean end. The size the
    /// origin announces is checked, as is its checksum.
    ///
    /// - cached: [`Fetched::Cached`] (a hit counted);
    /// - being filled, by this call or an earlier one: [`Fetched::Following`];
    /// - the metadata store cannot be reached: [`Fetched::Uncached`], the
    ///   origin's object opened by `open` on this thread, to pass through
    ///   (nothing is cached).
    ///
    /// Errors from `open` reach the followers ([`FollowReader::started`]):
    /// [`Error::OriginNotFound`] as itself, others as
    /// [`Error::FillFailed`].
    pub fn fetch_detached<F>(&self, id: &ImageId, open: F) -> Result<Fetched>
    where
        F: FnOnce() -> Result<OriginObject> + Send + 'static,
    {
        let key = self.layout.admit(id)?;
        let (writer, fill) = match self.find(key)? {
            Found::Hit(image) => return Ok(Fetched::Cached(image)),
            Found::Follow(fill) => return Ok(Fetched::Following(FollowReader::new(fill))),
            Found::StoreDown(e) => {
                log::warn!("imgcache: {id}: {e}; serving it from the origin, uncached");
                return Ok(Fetched::Uncached(checked_object(id, open()?)));
            }
            Found::Fill(writer, fill) => (writer, fill),
        };
        let follower = FollowReader::new(fill.clone()).leading();
        let fills = self.fills.clone();
        let thread_fill = fill.clone();
        let id2 = id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("imgcache-fill-{id}"))
            .spawn(move || {
                let fill = thread_fill;
                // However this thread ends (a panic in `open` included),
                // the fill ends: its followers never wait for ever.
                let _guard = FillGuard {
                    fill: fill.clone(),
                    fills: fills.clone(),
                };
                let object = match open() {
                    Ok(object) => object,
                    Err(e) => {
                        if let Err(discard) = writer.discard() {
                            log::error!("imgcache: {id2}: {discard}");
                        }
                        match e {
                            Error::OriginNotFound { origin, .. } => fill.fail_as(
                                format!("not found at {origin}"),
                                FailureKind::NotFound(origin),
                            ),
                            Error::NoRoom { detail, .. } => {
                                fill.fail_as(detail, FailureKind::NoRoom)
                            }
                            e => fill.finish(Err(format!("cannot open the origin: {e}"))),
                        }
                        fills.remove(&fill);
                        return;
                    }
                };
                fill.start(object.size, object.checksum.clone());
                let source = SizeChecked {
                    inner: object.reader,
                    announced: object.size,
                    seen: 0,
                };
                let mut tee =
                    TeeReader::filling(writer, fill, fills.clone(), source, object.checksum, false)
                        .on_own_thread();
                // Large reads (each one wakes the followers), and no more of
                // them once caching failed: the next request fills afresh.
                let mut buf = vec![0u8; FILL_BUFFER];
                let drained = loop {
                    if fills.is_stopping() {
                        // Shutting down: the tee's drop moves what was
                        // written aside, and the followers see a failure.
                        break Err(io::Error::other("the cache is shutting down"));
                    }
                    match tee.read(&mut buf) {
                        Ok(0) => break Ok(tee.stats().bytes),
                        Ok(_) if !tee.is_caching() => break Ok(tee.stats().bytes),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                match drained {
                    Ok(n) if tee.stats().cached => log::info!("imgcache: {id2}: filled, {n} bytes"),
                    Ok(_) => log::warn!(
                        "imgcache: {id2}: fill not cached: {}",
                        tee.stats().cache_error.as_deref().unwrap_or("?")
                    ),
                    Err(e) => log::warn!("imgcache: {id2}: fill failed: {e}"),
                }
            });
        if let Err(e) = spawned {
            // The closure (and the writer in it) is gone: end the fill.
            fill.finish(Err(format!("cannot start a fill thread: {e}")));
            self.fills.remove(&fill);
            return Err(Error::FillFailed {
                id: id.clone(),
                reason: format!("cannot start a fill thread: {e}"),
            });
        }
        Ok(Fetched::Following(follower))
    }

    /// The fills in progress in this process, by id: what each origin
    /// announced and how far each got.
    pub fn fills_in_progress(&self) -> Vec<FillProgress> {
        self.fills.progress()
    }

    /// Commits this process's fills made so far, and their bytes (fills
    /// through [`ImageCache::fetch`], [`ImageCache::fetch_detached`] and
    /// the caching tee).
    pub fn commits(&self) -> (u64, u64) {
        self.fills.commits()
    }

    /// Waits until this process commits a fill after the `seen`-th
    /// commit, at most `timeout` (or until [`ImageCache::stop_fills`]);
    /// returns the count of commits. A pruner waits here.
    pub fn wait_for_commit(&self, seen: u64, timeout: Duration) -> u64 {
        self.fills.wait_commit(seen, timeout)
    }

    /// [`ImageCache::wait_for_commit`] that does not wait once `stop` is
    /// set (the flag is read under the lock [`ImageCache::wake_commit_waiters`]
    /// takes: set it, then wake, and no waiter misses it). A job that
    /// waits for commits and must stop promptly waits here.
    pub fn wait_for_commit_unless(
        &self,
        seen: u64,
        timeout: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> u64 {
        self.fills.wait_commit_unless(seen, timeout, stop)
    }

    /// Wakes the callers of [`ImageCache::wait_for_commit`] early (a job
    /// that is stopping).
    pub fn wake_commit_waiters(&self) {
        self.fills.wake();
    }

    /// Asks every fill of [`ImageCache::fetch_detached`] in progress, and
    /// every later one, to stop at its next read: what each wrote goes to
    /// `invalid/` and its followers get an error. For a process that is
    /// shutting down and will not wait for its fills.
    pub fn stop_fills(&self) {
        self.fills.stop();
    }

    /// Moves the file of every fill still in progress to `invalid/` with
    /// `reason`, and ends those fills with an error: for a process that
    /// stopped its fills ([`ImageCache::stop_fills`]) and will exit before
    /// the ones blocked on a slow origin notice, so that it leaves nothing
    /// in `incomplete/`. Returns how many it moved. A fill thread that
    /// wakes afterwards fails to commit (its file is gone) and caches
    /// nothing.
    pub fn invalidate_fills(&self, reason: &str) -> usize {
        let fills: Vec<Arc<Fill>> = self.fills.with(|map| map.values().cloned().collect());
        let mut moved = 0;
        for fill in fills {
            let id = fill.id().clone();
            let key = Admitted::again(&id);
            match self.layout.invalidate(key) {
                Ok(()) => {
                    moved += 1;
                    let path = self.layout.invalid(key);
                    let file = fill.file();
                    if let Ok(meta) = file.metadata() {
                        let why = Invalidation::new(
                            id.clone(),
                            meta.len(),
                            reason,
                            round_trip(self.options.clock_ref().now()),
                        );
                        if let Err(e) = self
                            .store
                            .invalidate(&why, OnDisk::new(&path, Some(file), &meta))
                        {
                            log::warn!("imgcache: cannot record why {id} failed: {e}");
                        }
                    }
                }
                Err(e) => log::warn!("imgcache: cannot invalidate the fill of {id}: {e}"),
            }
            self.fills.remove(&fill);
            fill.finish(Err(reason.to_owned()));
        }
        moved
    }

    /// Whether this process has no fill in progress.
    pub fn is_idle(&self) -> bool {
        self.fills.is_empty()
    }

    /// The cache's file system: bytes free for unprivileged users, and its
    /// size (`statvfs`).
    // statvfs's counts are u64 on Linux, narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    pub fn file_system_space(&self) -> Result<(u64, u64)> {
        let dir = self.layout.base();
        let fs =
            nix::sys::statvfs::statvfs(dir).map_err(|e| Error::io("statvfs", dir, e.into()))?;
        let block = fs.fragment_size() as u64;
        Ok((
            (fs.blocks_available() as u64).saturating_mul(block),
            (fs.blocks() as u64).saturating_mul(block),
        ))
    }

    /// An origin's object to pass through uncached, checked as a fill
    /// would be: its announced size and checksum verified, a mismatch the
    /// error of its last read. For a server that cannot cache an image
    /// ([`Error::NoRoom`]) yet must never pass on a wrong byte cleanly.
    pub fn pass_through(&self, id: &ImageId, object: OriginObject) -> OriginObject {
        checked_object(id, object)
    }

    /// Admission: makes room for a fill of `id` of `size` bytes (as its
    /// origin announced; `None` if it did not) under
    /// [`CacheOptions::max_size`], [`CacheOptions::hard_limit`] and
    /// [`CacheOptions::min_free`], evicting least recently used images.
    /// The fills in progress count at the size they announced.
    ///
    /// `Err(`[`Error::NoRoom`]`)` when it cannot fit under the hard limit
    /// or above the free space kept, even with every image evicted (then
    /// nothing is evicted). Over `max_size` alone it is admitted: that
    /// limit is the pruner's, as in Glance. A fill whose origin announced
    /// no size counts as zero bytes until it commits (the pruner, and the
    /// next admission, see it then). Returns what was evicted.
    pub fn make_room(&self, id: &ImageId, size: Option<u64>) -> Result<PruneReport> {
        let hard = self.options.hard_limit_bytes();
        let min_free = self.options.min_free_space();
        let _one = self.admission.lock();
        let need = size.unwrap_or(0);
        let reserved = self.fills.reserved(id);
        // The metadata store down never fails a fill the origin answers:
        // the cache's size is then the files' own, and `max_size` (the
        // pruner's limit) waits for the store to come back.
        let mut store_down = false;
        let cache = match self.cache_size() {
            Ok(n) => n,
            Err(e @ Error::Store(_)) => {
                log::warn!("imgcache: {id}: admission without the store ({e}): sizing the files");
                store_down = true;
                self.files_size()?
            }
            Err(e) => return Err(e),
        };
        let wanted = need.saturating_add(reserved);
        // The committed bytes the fill leaves room for: under `max_size`
        // (the pruner's limit, as Glance's), and under the hard limits
        // (refused past them).
        let mut target = self.options.image_cache_max_size().saturating_sub(wanted);
        let mut hard_target = u64::MAX;
        if let Some(hard) = hard {
            if wanted > hard {
                return Err(Error::NoRoom {
                    id: id.clone(),
                    detail: format!(
                        "{need} bytes, with {reserved} more being filled, exceed the hard limit of {hard}"
                    ),
                });
            }
            hard_target = hard_target.min(hard - wanted);
        }
        if let Some(min_free) = min_free {
            let (free, total) = self.file_system_space()?;
            let keep = min_free.bytes_of(total);
            let shortfall = keep.saturating_add(wanted).saturating_sub(free);
            if shortfall > cache {
                return Err(Error::NoRoom {
                    id: id.clone(),
                    detail: format!(
                        "{need} bytes, with {reserved} more being filled, would leave less than {keep} bytes free ({free} free, {cache} in the cache)"
                    ),
                });
            }
            hard_target = hard_target.min(cache - shortfall);
        }
        target = target.min(hard_target);
        // Counted at once, before the lock goes: the next admission sees it.
        if let Some(fill) = self.fills.with(|map| map.get(id).cloned()) {
            fill.reserve(size);
        }
        let kept = PruneReport {
            removed: Vec::new(),
            bytes: 0,
            remaining: cache,
        };
        if cache <= target {
            return Ok(kept);
        }
        if store_down {
            // Nothing can be evicted without the store (the LRU order is
            // in it). Over `max_size` alone the fill goes on (the pruner
            // catches up once the store is back); past a hard limit or the
            // free space kept it is refused, and passed through.
            if cache <= hard_target {
                return Ok(kept);
            }
            return Err(Error::NoRoom {
                id: id.clone(),
                detail: "the metadata store is down: nothing can be evicted to make room".into(),
            });
        }
        self.prune_to(target)
    }

    /// Whether the store can record `id` (Glance's `centralized_db` table
    /// holds ids of 36 bytes): [`IdError::TooLongForStore`] if not. Such an
    /// image is served from the origin and never cached; a prefetch takes
    /// it off the queue.
    ///
    /// [`IdError::TooLongForStore`]: crate::IdError::TooLongForStore
    pub fn storable(&self, id: &ImageId) -> Result<()> {
        let max = self.store.max_id_len();
        if id.as_str().len() > max {
            return Err(Error::InvalidId {
                input: id.to_string(),
                reason: crate::id::IdError::TooLongForStore { max },
            });
        }
        Ok(())
    }

    /// The bytes of the cached files, summed from the file system (what
    /// admission goes by while the store is down).
    fn files_size(&self) -> Result<u64> {
        Ok(self
            .layout
            .list(self.layout.base())?
            .iter()
            .map(|(_, meta)| meta.len())
            .sum())
    }

    /// Caches `id` from `source`: `Ok(true)` if it was cached now, `Ok(false)`
    /// if it already was, or another writer is filling it. A read error from
    /// `source` moves what was written to `invalid/` and is returned as
    /// [`Error::Io`].
    pub fn cache_image_file(&self, id: &ImageId, mut source: impl Read) -> Result<bool> {
        let key = self.layout.admit(id)?;
        let mut writer = match self.writer(key) {
            Ok(w) => w,
            Err(Error::AlreadyCached { .. } | Error::AlreadyBeingCached { .. }) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = io::copy(&mut source, &mut writer) {
            let path = self.layout.incomplete(key);
            let reason = format!("copy failed: {e}");
            // The copy's error is the one to report; a failure to move the
            // file aside (on a full disk, say) only goes to the log.
            if let Err(abort) = writer.abort(&reason) {
                log::error!("imgcache: cannot invalidate {id}: {abort}");
            }
            return Err(Error::io("copy into", path, e));
        }
        match writer.commit() {
            Ok(_) => Ok(true),
            Err(Error::AlreadyCached { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
