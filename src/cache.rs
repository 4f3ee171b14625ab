//! [`ImageCache`]: the facade users hold — a driver plus the policies.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use crate::checksum::Checksum;
use crate::fill::{Fill, Fills, FollowReader};
use crate::tee::TeeReader;

use crate::clock::to_epoch_secs;
use crate::driver::{CacheDriver, CachedImageInfo, InvalidImageInfo, LruEntry, RecoveryReport};
use crate::drivers::{SqliteDriver, XattrDriver};
use crate::error::{Error, Result};
use crate::id::ImageId;
use crate::layout::{CleanReport, Layout};
use crate::options::{CacheOptions, DriverKind};
use crate::origin::Origin;
use crate::reader::CachedImage;
use crate::writer::CacheWriter;

/// What [`ImageCache::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// What [`ImageCache::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[non_exhaustive]
pub struct ScrubReport {
    /// Entries whose size and CRC matched.
    pub intact: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Entries that had no CRC and now have one recorded.
    pub newly_verified: Vec<ImageId>,
    /// Entries that did not match, moved to `invalid/`, with the reason.
    pub corrupt: Vec<(ImageId, String)>,
}

/// A local image cache: a [`CacheDriver`] for the mechanism, and the
/// operator's jobs (prune, clean) as policy on top.
///
/// `ImageCache` is `Send + Sync`; share it between threads with an `Arc`.
/// Several processes may open the same directory at once.
#[derive(Debug)]
pub struct ImageCache {
    driver: Box<dyn CacheDriver>,
    options: CacheOptions,
    kind: Option<DriverKind>,
    recovery: RecoveryReport,
    fills: Arc<Fills>,
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
        let dir = options.image_cache_dir().to_path_buf();
        let clock = options.clock_ref().clone();
        let sqlite = || -> Result<Box<dyn CacheDriver>> {
            Ok(Box::new(SqliteDriver::open(
                &dir,
                &options.sqlite_db_path(),
                clock.clone(),
            )?))
        };
        let (driver, kind) = match options.image_cache_driver() {
            DriverKind::Sqlite => (sqlite()?, DriverKind::Sqlite),
            DriverKind::Xattr => match XattrDriver::with_layout(
                Layout::new(&dir, Some(&options.sqlite_db_path())),
                clock.clone(),
            ) {
                Ok(d) => (Box::new(d) as Box<dyn CacheDriver>, DriverKind::Xattr),
                Err(e @ Error::XattrUnsupported { .. }) if options.falls_back_to_sqlite() => {
                    log::warn!("imgcache: {e}; falling back to the sqlite driver as configured");
                    (sqlite()?, DriverKind::Sqlite)
                }
                Err(e) => return Err(e),
            },
        };
        Self::recovered(driver, options, Some(kind))
    }

    /// A cache over a driver of your own. `options` supplies the policy
    /// settings (max size, stall time); its driver setting is ignored. Runs
    /// the driver's recovery, as [`ImageCache::open`] does.
    pub fn with_driver(driver: Box<dyn CacheDriver>, options: CacheOptions) -> Result<Self> {
        Self::recovered(driver, options, None)
    }

    fn recovered(
        driver: Box<dyn CacheDriver>,
        options: CacheOptions,
        kind: Option<DriverKind>,
    ) -> Result<Self> {
        let recovery = driver.recover()?;
        if !recovery.is_clean() {
            log::warn!(
                "imgcache: recovered {}: dropped {} entries without files, adopted {} files \
                 without metadata, quarantined {} corrupt entries",
                driver.layout().base().display(),
                recovery.dropped.len(),
                recovery.adopted.len(),
                recovery.quarantined.len()
            );
        }
        Ok(ImageCache {
            driver,
            options,
            kind,
            recovery,
            fills: Arc::default(),
        })
    }

    /// Opens the cache after moving a broken SQLite database (see
    /// [`Error::BadDatabase`]) aside to `.imgcache-broken-<unix time>-<name>`
    /// beside it (a name no image can take): the
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
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let from = db.with_file_name(format!("{name}{suffix}"));
                    let to = db.with_file_name(format!(".imgcache-broken-{stamp}-{name}{suffix}"));
                    match fs::rename(&from, &to) {
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

    /// The driver.
    pub fn driver(&self) -> &dyn CacheDriver {
        &*self.driver
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
        self.driver.layout()
    }

    fn check(&self, id: &ImageId) -> Result<()> {
        self.driver.layout().check_id(id)
    }

    /// Writes metadata held in memory (the SQLite driver's batched hit
    /// counts) now, so that other processes see it. Dropping the cache does
    /// it too.
    pub fn flush(&self) -> Result<()> {
        self.driver.flush()
    }

    /// Total bytes of cached images.
    pub fn cache_size(&self) -> Result<u64> {
        self.driver.cache_size()
    }

    /// Every cached image (id, size, hits, last accessed, last modified),
    /// ordered by id.
    pub fn cached_images(&self) -> Result<Vec<CachedImageInfo>> {
        self.driver.cached_images()
    }

    /// One cached image's metadata, without counting a hit.
    pub fn cached_image(&self, id: &ImageId) -> Result<Option<CachedImageInfo>> {
        self.check(id)?;
        self.driver.cached_image(id)
    }

    /// Hits of `id` since it was cached (0 if not cached).
    pub fn hit_count(&self, id: &ImageId) -> Result<u64> {
        self.check(id)?;
        self.driver.hit_count(id)
    }

    /// Whether `id` is cached.
    pub fn is_cached(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.is_cached(id)
    }

    /// Whether `id` is neither cached nor being cached.
    pub fn is_cacheable(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.is_cacheable(id)
    }

    /// Whether a writer is filling `id` (or died doing so).
    pub fn is_being_cached(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.is_being_cached(id)
    }

    /// Whether `id` is queued.
    pub fn is_queued(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.is_queued(id)
    }

    /// Deletes cached image `id`; `false` if it was not cached.
    pub fn delete_cached_image(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.delete_cached_image(id)
    }

    /// Deletes every cached image; returns how many.
    pub fn delete_all_cached_images(&self) -> Result<usize> {
        self.driver.delete_all_cached_images()
    }

    /// Removes `id` from the queue; `false` if it was not queued.
    pub fn delete_queued_image(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.delete_queued_image(id)
    }

    /// Empties the queue; returns how many were removed.
    pub fn delete_all_queued_images(&self) -> Result<usize> {
        self.driver.delete_all_queued_images()
    }

    /// Queues `id` for prefetching; `false` if it is already cached, being
    /// cached or queued.
    pub fn queue_image(&self, id: &ImageId) -> Result<bool> {
        self.check(id)?;
        self.driver.queue_image(id)
    }

    /// The queued images, oldest first.
    pub fn queued_images(&self) -> Result<Vec<ImageId>> {
        self.driver.queued_images()
    }

    /// The failed writes kept in `invalid/`, with their reasons.
    pub fn invalid_images(&self) -> Result<Vec<InvalidImageInfo>> {
        self.driver.invalid_images()
    }

    /// Cached images, least recently accessed first.
    pub fn least_recently_accessed(&self) -> Result<Vec<LruEntry>> {
        self.driver.least_recently_accessed()
    }

    /// Starts writing `id`; see [`CacheDriver::open_for_write`].
    pub fn open_for_write(&self, id: &ImageId) -> Result<CacheWriter> {
        self.check(id)?;
        self.driver.open_for_write(id)
    }

    /// Opens cached image `id`, counting a hit; `None` if it is not cached.
    ///
    /// A file whose size is not what was committed, or whose metadata
    /// cannot be decoded, is never served: it is moved to `invalid/` and
    /// [`Error::Corrupt`] (or [`Error::CorruptMetadata`]) is returned; the
    /// next request is a miss.
    pub fn open_for_read(&self, id: &ImageId) -> Result<Option<CachedImage>> {
        self.check(id)?;
        match self.driver.open_for_read(id) {
            Err(Error::Corrupt { id, path, detail }) => {
                self.driver.quarantine(&id, &detail)?;
                Err(Error::Corrupt { id, path, detail })
            }
            Err(Error::CorruptMetadata { path, detail }) => {
                self.driver
                    .quarantine(id, &format!("corrupt metadata: {detail}"))?;
                Err(Error::CorruptMetadata { path, detail })
            }
            other => other,
        }
    }

    /// Reads cached image `id` whole and checks its size and CRC-32 against
    /// what was committed, without counting a hit; `None` if it is not
    /// cached. Reads through a 1 MiB buffer; costs one full read of the file.
    pub fn verify(&self, id: &ImageId) -> Result<Option<Verification>> {
        self.check(id)?;
        let Some(info) = self.driver.cached_image(id)? else {
            return Ok(None);
        };
        let path = self.layout().cached(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        if len != info.size {
            return Ok(Some(Verification::Corrupt {
                detail: format!("{len} bytes on disk, {} were committed", info.size),
            }));
        }
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
        Ok(Some(match info.crc32 {
            Some(c) if c == crc => Verification::Intact,
            Some(c) => Verification::Corrupt {
                detail: format!("CRC-32 is {crc:08x}, {c:08x} was committed"),
            },
            None => Verification::Unverified { crc32: crc },
        }))
    }

    /// Verifies every cached image: corrupt ones are moved to `invalid/`
    /// with the reason, unverified ones get their CRC recorded. Reads every
    /// cached byte once.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        for info in self.driver.cached_images()? {
            match self.verify(&info.id)? {
                None => {}
                Some(Verification::Intact) => {
                    report.intact += 1;
                    report.bytes += info.size;
                }
                Some(Verification::Unverified { crc32 }) => {
                    self.driver.set_crc32(&info.id, crc32)?;
                    report.bytes += info.size;
                    report.newly_verified.push(info.id);
                }
                Some(Verification::Corrupt { detail }) => {
                    self.driver.quarantine(&info.id, &detail)?;
                    report.corrupt.push((info.id, detail));
                }
            }
        }
        Ok(report)
    }

    /// The size of cached image `id`; `None` if not cached.
    pub fn image_size(&self, id: &ImageId) -> Result<Option<u64>> {
        self.check(id)?;
        self.driver.image_size(id)
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
        let lru = self.driver.least_recently_accessed()?;
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
            self.driver.delete_cached_images(&victims)?;
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
        let report = self.driver.clean(stall)?;
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
        self.check(id)?;
        let started = self.fills.with(|map| {
            if map.contains_key(id) {
                return Ok(None);
            }
            match self.start_fill(id, map) {
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
        id: &ImageId,
        map: &mut std::collections::HashMap<ImageId, Arc<Fill>>,
    ) -> Result<(CacheWriter, Arc<Fill>)> {
        let writer = self.driver.open_for_write(id)?;
        let fill = Arc::new(Fill::new(id.clone(), writer.try_clone_file()?));
        map.insert(id.clone(), fill.clone());
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
    /// A failure to open the backend is [`Error::Source`], and leaves
    /// nothing behind.
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
        self.check(id)?;
        // One value, living for one loop round: its size does not matter.
        #[allow(clippy::large_enum_variant)]
        enum Step {
            Follow(Arc<Fill>),
            Fill(CacheWriter, Arc<Fill>),
            Again,
            Foreign,
        }
        let mut open = Some(open);
        for _ in 0..FETCH_ROUNDS {
            match self.open_for_read(id) {
                Ok(Some(image)) => return Ok(ImageStream::Cached(image)),
                Ok(None) => {}
                // A fault of the cache is never the client's: the entry is
                // quarantined by now, and the origin answers instead.
                Err(e @ (Error::Corrupt { .. } | Error::CorruptMetadata { .. })) => {
                    log::warn!("imgcache: {id}: {e}; fetching it from the origin again");
                }
                Err(e) => return Err(e),
            }
            let step = self.fills.with(|map| {
                if let Some(fill) = map.get(id) {
                    return Ok(Step::Follow(fill.clone()));
                }
                match self.start_fill(id, map) {
                    Ok((writer, fill)) => Ok(Step::Fill(writer, fill)),
                    Err(Error::AlreadyCached { .. }) => Ok(Step::Again),
                    Err(Error::AlreadyBeingCached { .. }) => Ok(Step::Foreign),
                    Err(e) => Err(e),
                }
            })?;
            match step {
                Step::Follow(fill) => return Ok(ImageStream::Following(FollowReader::new(fill))),
                Step::Fill(writer, fill) => {
                    let Some(open) = open.take() else {
                        break;
                    };
                    return match open() {
                        Ok((source, expected)) => Ok(ImageStream::Filling(Box::new(
                            self.tee(writer, fill, source, expected),
                        ))),
                        Err(e) => {
                            let reason = format!("cannot open the source: {e}");
                            // Nothing was written: nothing to keep in invalid/.
                            if let Err(discard) = writer.discard() {
                                log::error!("imgcache: {id}: {discard}");
                            }
                            fill.finish(Err(reason));
                            self.fills.remove(&fill);
                            Err(e)
                        }
                    };
                }
                Step::Again => {}
                Step::Foreign => self.wait_for_foreign_writer(id)?,
            }
        }
        Err(Error::FillFailed {
            id: id.clone(),
            reason: format!("other writers kept winning, {FETCH_ROUNDS} times"),
        })
    }

    /// Blocks until the writer holding `incomplete/<id>` (in any process)
    /// is done. If it died instead, removes its stalled file so that the
    /// caller can take the fill over.
    fn wait_for_foreign_writer(&self, id: &ImageId) -> Result<()> {
        let path = self.layout().incomplete(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        // A living writer holds an exclusive lock until it commits or
        // aborts; the kernel drops it if the writer dies.
        file.lock_shared()
            .map_err(|e| Error::io("lock", &path, e))?;
        let same = |f: &File| -> bool {
            match (f.metadata(), fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            }
        };
        if !same(&file) {
            return Ok(()); // committed or aborted: moved away
        }
        // Still in place with nobody holding it: its writer died.
        file.unlock().map_err(|e| Error::io("unlock", &path, e))?;
        if file.try_lock().is_ok() && same(&file) {
            log::warn!("imgcache: {id}: taking over a fill whose writer died");
            crate::layout::remove_if_exists(&path)?;
        }
        Ok(())
    }

    /// Caches `id` from `source`: `Ok(true)` if it was cached now, `Ok(false)`
    /// if it already was, or another writer is filling it. A read error from
    /// `source` moves what was written to `invalid/` and is returned as
    /// [`Error::Io`].
    pub fn cache_image_file(&self, id: &ImageId, mut source: impl Read) -> Result<bool> {
        self.check(id)?;
        let mut writer = match self.driver.open_for_write(id) {
            Ok(w) => w,
            Err(Error::AlreadyCached { .. } | Error::AlreadyBeingCached { .. }) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = io::copy(&mut source, &mut writer) {
            let path = self.layout().incomplete(id);
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
