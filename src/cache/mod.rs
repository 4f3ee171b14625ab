//! [`ImageCache`]: the facade users hold — the one local file layer and a
//! metadata store, joined, and the policies on top.
//!
//! Every public method that takes an id admits it first
//! ([`Layout::admit`]); nothing below can build a path from an id that was
//! not admitted, and the store receives only admitted ids.
//!
//! Each concern in a file named for it:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | opening (and the recovery walk's place in it), the read path, the queue and the operator's listings and deletions |
//! | `fetch.rs` | the miss path: a miss becomes one fill per image that every reader follows, on the caller's or a fill thread; the fills' life as a server sees it |
//! | `flight.rs` | single flight: the registry of fills, where a reader takes a fill (and a permit that must end it) or follows one |
//! | `fill.rs` | the state one fill shares with its followers ([`FollowReader`]), and how a fill ends |
//! | `tee.rs`, `writer.rs` | the caching tee; a fill's writer and its commit |
//! | `evict.rs` | the pruner, admission ([`ImageCache::make_room`]) and the cleaner |
//! | `verify.rs` | verify, scrub and quarantine |
//! | `recover.rs` | the recovery walk at open |
//! | `durability.rs` | group durability: the checkpoint (what it syncs, in which order) and its thread |
//! | `session.rs` | the session mark: whether the last processes on the cache closed cleanly |
//! | `migrate.rs` | Glance's migration of a local `cache.db`; rebuilding a broken one |
//! | `prefetch.rs` | the prefetcher of the queue |
//! | `aio.rs` | the async face (feature `tokio`) |

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use crate::clock::round_trip;
use crate::drivers::StoreExt;
use crate::drivers::{CacheDriver, SqliteDriver, XattrDriver};
use crate::entry::{CachedImageInfo, InvalidImageInfo, LruEntry, NodeImage, OnDisk, Watermark};
use crate::error::{Error, Result};
use crate::files::{queue, Admitted, CachedImage, Layout};
use crate::id::ImageId;
use crate::options::{CacheOptions, DriverKind, Durability};

#[cfg(feature = "tokio")]
mod aio;
pub(crate) mod durability;
mod evict;
mod fetch;
pub(crate) mod fill;
mod flight;
mod migrate;
pub(crate) mod prefetch;
mod recover;
mod session;
pub(crate) mod tee;
mod verify;
pub(crate) mod writer;

pub use evict::PruneReport;
pub use fetch::{Fetched, ImageStream};
use flight::Fills;
use migrate::migrate_into;
pub use migrate::MigrationReport;
pub use recover::RecoveryReport;
pub use verify::{ScrubReport, Verification};
use writer::CacheWriter;

/// The store, as the open-file cache hands it the hits counted on kept
/// descriptors.
#[derive(Debug)]
struct StoreHits(Arc<dyn CacheDriver>);

impl crate::files::open_files::HitSink for StoreHits {
    fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, file: OnDisk<'_>) {
        if let Err(e) = self.0.add_hits(id, n, at, file) {
            tracing::warn!("imgcache: {n} hits of {id} not counted: {e}");
        }
    }
}

/// A local image cache: the local file layer (`files/`) and a metadata
/// store ([`CacheDriver`]), joined, with the operator's jobs (prune, clean,
/// scrub, prefetch) as policy on top.
///
/// `ImageCache` is `Send + Sync`; share it between threads with an `Arc`.
/// Several processes may open the same directory at once.
#[derive(Debug)]
pub struct ImageCache {
    /// Hands hits counted on kept descriptors to the store every half
    /// second (first: stopped, with a last hand-over, before the rest).
    _hit_pusher: Option<crate::files::open_files::Pusher>,
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
                    tracing::warn!(
                        "imgcache: {e}; falling back to the sqlite driver as configured"
                    );
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

    /// This node's identity in its store ([`Fleet::node`](crate::drivers::Fleet::node)).
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
        self.layout.open_files().push_all();
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
        let mut layout = Layout::new(options.image_cache_dir(), Some(&options.sqlite_db_path()));
        layout.keep_open(options.open_files_kept());
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
                tracing::info!(
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
        // Hits counted on kept descriptors go to the store in batches.
        layout
            .open_files()
            .set_sink(Arc::new(StoreHits(store.clone())));
        let hit_pusher =
            crate::files::open_files::Pusher::spawn(layout.open_files_shared(), layout.base());
        let mut cache = ImageCache {
            _hit_pusher: hit_pusher,
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
        let unclean = cache.durable.keeps_watermark() && cache.durable.session().start()?;
        cache.recovery = cache.recover(unclean)?;
        cache.durable.session().joined()?;
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
            tracing::warn!(
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

    /// The cache's directory (`image_cache_dir`), where cached images are.
    pub fn dir(&self) -> &std::path::Path {
        self.layout.base()
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
        self.layout.open_files().push_all();
        self.store.flush()
    }

    /// Total bytes of cached images.
    pub fn cache_size(&self) -> Result<u64> {
        self.store.total_size(&self.layout)
    }

    /// Every cached image (id, size, hits, last accessed, last modified),
    /// ordered by id.
    pub fn cached_images(&self) -> Result<Vec<CachedImageInfo>> {
        self.layout.open_files().push_all();
        self.store.list(&self.layout)
    }

    /// The ids of every image whose file is in place, ordered: what is
    /// served, entries written or not (another process's latest commits,
    /// whose entries it may hold for up to a second, are here before
    /// they are in [`ImageCache::cached_images`]). One directory listing,
    /// no metadata.
    pub fn cached_ids(&self) -> Result<Vec<ImageId>> {
        let mut ids: Vec<ImageId> = self
            .layout
            .list(self.layout.base())?
            .into_iter()
            .map(|(id, _)| id.into_id())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// One cached image's metadata, without counting a hit.
    pub fn cached_image(&self, id: &ImageId) -> Result<Option<CachedImageInfo>> {
        let key = self.layout.admit(id)?;
        self.entry(key)
    }

    /// The entry of an admitted id whose file is in place (read through
    /// the open file, so that a store on the file reads one inode).
    fn entry(&self, key: Admitted<'_>) -> Result<Option<CachedImageInfo>> {
        self.layout.open_files().push(key.id());
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

    /// Whether `id` is cached: its file is in place (with its entry in the
    /// store, or one another process has not written yet: such a file is
    /// served as it is).
    pub fn is_cached(&self, id: &ImageId) -> Result<bool> {
        match self.cached_image(id) {
            Ok(Some(_)) => Ok(true),
            // A file in place without an entry (yet) is served as it is
            // (see [`ImageCache::open_for_read`]; not by a read-only handle).
            Ok(None) if self.options.is_read_only() => Ok(false),
            Ok(None) => Ok(self.layout.cached(self.layout.admit(id)?).exists()),
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
        self.store.remove(ids, &|_| true)?;
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
                .map(|(id, _)| id.into_id()),
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
        for (key, meta) in files {
            let path = self.layout.invalid(key.key());
            let (reason, invalidated_at) = match self
                .store
                .invalid_reason(key.id(), OnDisk::new(&path, None, &meta))
            {
                Ok(r) => r,
                // Removed by a concurrent clean.
                Err(e) if e.io_kind() == Some(io::ErrorKind::NotFound) => continue,
                Err(e) => return Err(e),
            };
            out.push(InvalidImageInfo {
                id: key.into_id(),
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
        self.layout.open_files().push_all();
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
        // The corruption is the error to report: a failure to move the file
        // aside (a full disk, a read-only directory) only goes to the log,
        // and the next read finds it again.
        let quarantined = |reason: &str| {
            if let Err(e) = self.quarantine(key, reason) {
                tracing::error!("imgcache: {key}: cannot quarantine ({reason}): {e}");
            }
        };
        match self.read_hit(key) {
            Err(Error::Corrupt { id, path, detail }) => {
                quarantined(&detail);
                Err(Error::Corrupt { id, path, detail })
            }
            Err(Error::CorruptMetadata { path, detail }) => {
                quarantined(&format!("corrupt metadata: {detail}"));
                Err(Error::CorruptMetadata { path, detail })
            }
            other => other,
        }
    }

    /// A hit on a descriptor the cache kept open ([`CacheOptions::open_files`])
    /// whose file is still in place: one `fstat`, the hit counted in
    /// memory, no open and no lookup in the store. `None` where no such
    /// descriptor is kept: then [`ImageCache::open_for_read`] answers.
    /// `may_block`: whether this thread may wait (for a sweep, or the last
    /// close of a file deleted behind the cache's back).
    pub(crate) fn open_kept(&self, id: &ImageId, may_block: bool) -> Result<Option<CachedImage>> {
        // Counted on the kept entry; the store is handed the counts in
        // batches (see `files::open_files`).
        let Some((hot, info)) = self.layout.open_files().hit(id, may_block, self.now()) else {
            return Ok(None);
        };
        Ok(Some(CachedImage::kept(hot, info)))
    }

    fn read_hit(&self, key: Admitted<'_>) -> Result<Option<CachedImage>> {
        if let Some(image) = self.open_kept(key.id(), true)? {
            return Ok(Some(image));
        }
        let open = self.layout.open_files();
        let epoch = open.epoch();
        let opened_at = crate::files::open_files::now_ns();
        let Some((file, path, meta)) = self.layout.open_cached(key)? else {
            // A store entry whose file is gone is stale: drop it, unless a
            // commit lands meanwhile.
            let path = self.layout.cached(key);
            let missing = std::slice::from_ref(key.id());
            match self.store.remove_if_missing(missing, &|_| !path.exists()) {
                Ok(()) => {}
                // A store that cannot be reached has nothing to drop now;
                // the recovery walk drops what stays stale.
                Err(e @ Error::Store(_)) => tracing::warn!("imgcache: {key}: {e}"),
                Err(e) => return Err(e),
            }
            return Ok(None);
        };
        let on = OnDisk::new(&path, Some(&file), &meta);
        let Some(info) = self.store.hit(key.id(), self.now(), on)? else {
            // A read-only handle runs no recovery walk: what it has not
            // seen recorded may be what the walk would quarantine.
            if self.options.is_read_only() {
                return Ok(None);
            }
            // In place, but not recorded (yet): another process's commit
            // whose entry its store writes with others
            // ([`CacheDriver::insert_batched`]), a commit between its rename
            // and its insert, or a file another tool put there. Every file
            // in place was renamed there whole, and the recovery walk at
            // open checks those a crash may have torn: served as it is (as
            // Glance serves any file in place); not kept open (the entry it
            // will have is not known yet). Its hit is the store's to count
            // (the SQLite store writes it once the row is there).
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            let info = CachedImageInfo::new(key.id().clone(), meta.len(), round_trip(modified));
            return Ok(Some(CachedImage::new(file, path, info)?));
        };
        let image = CachedImage::new(file, path, info)?;
        open.keep(
            key.id(),
            epoch,
            opened_at,
            image.shared_file(),
            image.shared_path(),
            &meta,
            image.info(),
        );
        Ok(Some(image))
    }

    /// The size of cached image `id`; `None` if not cached.
    pub fn image_size(&self, id: &ImageId) -> Result<Option<u64>> {
        Ok(self.cached_image(id)?.map(|i| i.size))
    }
}
