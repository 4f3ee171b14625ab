//! [`CacheDriver`]: the mechanism behind a cache — where its metadata lives.
//!
//! The contract is Glance's image cache driver, in Rust names. Drivers know
//! nothing of policy (pruning to a size, when to clean): that is
//! [`crate::ImageCache`]'s.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::error::Result;
use crate::id::ImageId;
use crate::layout::{CleanReport, Layout};
use crate::queue;
use crate::reader::CachedImage;
use crate::writer::CacheWriter;

/// What the cache knows of one cached image.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CachedImageInfo {
    /// The image.
    pub id: ImageId,
    /// Its size in bytes.
    pub size: u64,
    /// How many times it was opened for reading since it was cached.
    pub hits: u64,
    /// When it was last opened for reading (or cached, if never read).
    pub last_accessed: SystemTime,
    /// When it was cached.
    pub last_modified: SystemTime,
    /// The checksum the writer declared (Glance's `checksum` column), if any.
    pub checksum: Option<String>,
    /// The CRC-32 of its bytes, computed while they were written; `None` for
    /// entries written by another tool (Glance), which are unverified.
    pub crc32: Option<u32>,
}

/// One entry of the least-recently-accessed order.
#[derive(Debug, Clone, PartialEq)]
pub struct LruEntry {
    /// The image.
    pub id: ImageId,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last accessed.
    pub last_accessed: SystemTime,
}

/// A file in `invalid/`: a write that failed or was abandoned, kept for
/// debugging until the next `clean`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct InvalidImageInfo {
    /// The image.
    pub id: ImageId,
    /// How many bytes had been written.
    pub size: u64,
    /// Why it was invalidated, if recorded.
    pub reason: Option<String>,
    /// When it was invalidated, if recorded.
    pub invalidated_at: Option<SystemTime>,
}

/// What [`CacheDriver::recover`] found when the cache was opened, and what
/// it did about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Metadata of images whose file is gone: dropped.
    pub dropped: Vec<ImageId>,
    /// Files in the base directory without metadata (a crash between rename
    /// and metadata write, or a file another tool put there): adopted with
    /// their real size and no CRC, unverified until scrubbed.
    pub adopted: Vec<ImageId>,
    /// Entries whose metadata could not be decoded: moved to `invalid/`.
    pub quarantined: Vec<ImageId>,
    /// Incomplete files whose writer is gone (no process holds their lock):
    /// stalled, for `clean` to remove.
    pub stalled: Vec<ImageId>,
}

impl RecoveryReport {
    /// Whether recovery found nothing to mend.
    pub fn is_clean(&self) -> bool {
        self.dropped.is_empty() && self.adopted.is_empty() && self.quarantined.is_empty()
    }
}

/// Where a cache keeps its metadata, and how it moves files between states.
///
/// Implemented by [`crate::SqliteDriver`] and [`crate::XattrDriver`]. The
/// trait is object safe; [`crate::ImageCache`] holds a `Box<dyn CacheDriver>`.
///
/// The queue methods have default implementations over the shared `queue/`
/// folder; the rest is the driver's.
pub trait CacheDriver: Send + Sync + fmt::Debug {
    /// The driver's name, as Glance's `image_cache_driver` spells it.
    fn name(&self) -> &'static str;

    /// The paths of the cache directory.
    fn layout(&self) -> &Layout;

    /// Total bytes of cached images.
    fn cache_size(&self) -> Result<u64>;

    /// Every cached image, ordered by id.
    fn cached_images(&self) -> Result<Vec<CachedImageInfo>>;

    /// One cached image's metadata, without counting a hit.
    fn cached_image(&self, id: &ImageId) -> Result<Option<CachedImageInfo>>;

    /// How many times `id` was read since it was cached; 0 if it is not
    /// cached.
    fn hit_count(&self, id: &ImageId) -> Result<u64>;

    /// Whether `id` is cached (complete and servable).
    fn is_cached(&self, id: &ImageId) -> Result<bool>;

    /// Whether `id` could be cached now: neither cached nor being cached.
    fn is_cacheable(&self, id: &ImageId) -> Result<bool> {
        Ok(!self.is_cached(id)? && !self.is_being_cached(id)?)
    }

    /// Whether a writer is filling `id` (or died doing so).
    fn is_being_cached(&self, id: &ImageId) -> Result<bool> {
        Ok(self.layout().incomplete(id).is_file())
    }

    /// Whether `id` is queued for prefetching.
    fn is_queued(&self, id: &ImageId) -> Result<bool> {
        Ok(queue::contains(self.layout(), id))
    }

    /// Deletes cached image `id`; `false` if it was not cached.
    fn delete_cached_image(&self, id: &ImageId) -> Result<bool>;

    /// Deletes several cached images; returns how many were deleted. Drivers
    /// override it to batch their metadata updates.
    fn delete_cached_images(&self, ids: &[ImageId]) -> Result<usize> {
        let mut n = 0;
        for id in ids {
            if self.delete_cached_image(id)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes every cached image; returns how many.
    fn delete_all_cached_images(&self) -> Result<usize>;

    /// Removes `id` from the queue; `false` if it was not queued.
    fn delete_queued_image(&self, id: &ImageId) -> Result<bool> {
        queue::remove(self.layout(), id)
    }

    /// Empties the queue; returns how many were removed.
    fn delete_all_queued_images(&self) -> Result<usize> {
        queue::clear(self.layout())
    }

    /// Queues `id` for prefetching. `false` if it is already cached, being
    /// cached, or queued.
    fn queue_image(&self, id: &ImageId) -> Result<bool>;

    /// The queued images, in the order they were queued.
    fn queued_images(&self) -> Result<Vec<ImageId>> {
        queue::list(self.layout())
    }

    /// The files in `invalid/`, with the reasons recorded for them.
    fn invalid_images(&self) -> Result<Vec<InvalidImageInfo>>;

    /// Deletes every file in `invalid/` and every file in `incomplete/`
    /// older than `stall_time` whose writer is gone.
    fn clean(&self, stall_time: Duration) -> Result<CleanReport>;

    /// Every cached image, least recently accessed first (ties broken by
    /// id).
    fn least_recently_accessed(&self) -> Result<Vec<LruEntry>>;

    /// Starts writing `id`: creates `incomplete/<id>` exclusively.
    ///
    /// Errors: [`crate::Error::AlreadyBeingCached`] if another writer holds
    /// it, [`crate::Error::AlreadyCached`] if it is cached.
    fn open_for_write(&self, id: &ImageId) -> Result<CacheWriter>;

    /// Opens cached image `id` for reading, counting a hit and setting its
    /// last access time; `None` if it is not cached.
    fn open_for_read(&self, id: &ImageId) -> Result<Option<CachedImage>>;

    /// The size of cached image `id`; `None` if it is not cached.
    fn image_size(&self, id: &ImageId) -> Result<Option<u64>>;

    /// Reconciles metadata with the files: drops metadata whose file is
    /// gone, adopts files without metadata (unverified), quarantines entries
    /// whose metadata cannot be decoded, and reports stalled incomplete
    /// files. [`crate::ImageCache`] runs it at open.
    fn recover(&self) -> Result<RecoveryReport>;

    /// Moves cached image `id` to `invalid/` with `reason` recorded and
    /// drops its metadata; `false` if it was not cached.
    fn quarantine(&self, id: &ImageId, reason: &str) -> Result<bool>;

    /// Writes metadata the driver holds in memory (batched hit counts) now.
    /// Drivers that hold none do nothing.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Records the CRC-32 of an entry that had none (adopted, or written by
    /// Glance), once a scrub has read it whole.
    fn set_crc32(&self, id: &ImageId, crc32: u32) -> Result<()>;
}
