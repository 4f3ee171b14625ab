//! [`ImageCache`]: the facade users hold — a driver plus the policies.

use std::io::{self, Read};
use std::time::Duration;

use crate::driver::{CacheDriver, CachedImageInfo, InvalidImageInfo, LruEntry};
use crate::drivers::{SqliteDriver, XattrDriver};
use crate::error::{Error, Result};
use crate::id::ImageId;
use crate::layout::{CleanReport, Layout};
use crate::options::{CacheOptions, DriverKind};
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
        Ok(ImageCache {
            driver,
            options,
            kind: Some(kind),
        })
    }

    /// A cache over a driver of your own. `options` supplies the policy
    /// settings (max size, stall time); its driver setting is ignored.
    pub fn with_driver(driver: Box<dyn CacheDriver>, options: CacheOptions) -> Self {
        ImageCache {
            driver,
            options,
            kind: None,
        }
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
        self.driver.cached_image(id)
    }

    /// Hits of `id` since it was cached (0 if not cached).
    pub fn hit_count(&self, id: &ImageId) -> Result<u64> {
        self.driver.hit_count(id)
    }

    /// Whether `id` is cached.
    pub fn is_cached(&self, id: &ImageId) -> Result<bool> {
        self.driver.is_cached(id)
    }

    /// Whether `id` is neither cached nor being cached.
    pub fn is_cacheable(&self, id: &ImageId) -> Result<bool> {
        self.driver.is_cacheable(id)
    }

    /// Whether a writer is filling `id` (or died doing so).
    pub fn is_being_cached(&self, id: &ImageId) -> Result<bool> {
        self.driver.is_being_cached(id)
    }

    /// Whether `id` is queued.
    pub fn is_queued(&self, id: &ImageId) -> Result<bool> {
        self.driver.is_queued(id)
    }

    /// Deletes cached image `id`; `false` if it was not cached.
    pub fn delete_cached_image(&self, id: &ImageId) -> Result<bool> {
        self.driver.delete_cached_image(id)
    }

    /// Deletes every cached image; returns how many.
    pub fn delete_all_cached_images(&self) -> Result<usize> {
        self.driver.delete_all_cached_images()
    }

    /// Removes `id` from the queue; `false` if it was not queued.
    pub fn delete_queued_image(&self, id: &ImageId) -> Result<bool> {
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
    pub fn open_for_read(&self, id: &ImageId) -> Result<Option<CachedImage>> {
        self.check(id)?;
        self.driver.open_for_read(id)
    }

    /// The size of cached image `id`; `None` if not cached.
    pub fn image_size(&self, id: &ImageId) -> Result<Option<u64>> {
        self.driver.image_size(id)
    }

    /// Deletes least recently accessed images until the cache holds at most
    /// `image_cache_max_size` bytes. See [`ImageCache::prune_to`].
    pub fn prune(&self) -> Result<PruneReport> {
        self.prune_to(self.options.image_cache_max_size())
    }

    /// Deletes least recently accessed images until the cache holds at most
    /// `max_size` bytes (`0` empties it). One ordered pass over the LRU
    /// order and one batched delete; never a rescan per deleted image.
    pub fn prune_to(&self, max_size: u64) -> Result<PruneReport> {
        let mut total = self.driver.cache_size()?;
        if total <= max_size {
            return Ok(PruneReport {
                remaining: total,
                ..PruneReport::default()
            });
        }
        let mut victims = Vec::new();
        let mut bytes = 0;
        for entry in self.driver.least_recently_accessed()? {
            if total <= max_size {
                break;
            }
            total = total.saturating_sub(entry.size);
            bytes += entry.size;
            victims.push(entry.id);
        }
        self.driver.delete_cached_images(&victims)?;
        log::info!(
            "imgcache: pruned {} images ({bytes} bytes), {total} bytes remain",
            victims.len()
        );
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
            let reason = format!("copy from source failed: {e}");
            writer.abort(&reason)?;
            return Err(Error::io("copy into", path, e));
        }
        match writer.commit() {
            Ok(_) => Ok(true),
            Err(Error::AlreadyCached { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
