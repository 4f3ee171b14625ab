//! Eviction and admission: the pruner (least recently accessed first, to
//! a byte limit), admission of a fill under a hard limit and a minimum of
//! free space ([`ImageCache::make_room`]), and the cleaner of stalled and
//! invalid files. As in pingora-cache, admission and eviction sit together:
//! admission decides what eviction must make room for.

use std::time::Duration;

use super::ImageCache;
use crate::drivers::StoreExt;
use crate::error::{Error, Result};
use crate::files::CleanReport;
use crate::id::ImageId;

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

impl ImageCache {
    /// Deletes least recently accessed images until the cache holds at most
    /// `image_cache_max_size` bytes. See [`ImageCache::prune_to`].
    pub fn prune(&self) -> Result<PruneReport> {
        self.prune_to(self.options.image_cache_max_size())
    }

    /// Deletes least recently accessed images until the cache holds at most
    /// `max_size` bytes (`0` empties it). Under the limit, one sum of the
    /// sizes and nothing else (a prune after every fill costs no listing,
    /// and writes no metadata the store holds); over it, one ordered pass
    /// over the LRU order and one batched delete; never a rescan per
    /// deleted image.
    pub fn prune_to(&self, max_size: u64) -> Result<PruneReport> {
        // Descriptors kept of files removed behind the cache's back hold
        // their blocks: close them with every prune.
        self.layout.open_files().sweep();
        let size = self.cache_size()?;
        if size <= max_size {
            return Ok(PruneReport {
                removed: Vec::new(),
                bytes: 0,
                remaining: size,
            });
        }
        // Least recently used by every hit: those counted on kept
        // descriptors too.
        self.layout.open_files().push_all();
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
            tracing::info!(
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
        self.layout.open_files().sweep();
        let report = self.layout.clean(stall, self.options.clock_ref().now())?;
        let gone: Vec<ImageId> = report.invalid.iter().filter_map(|f| f.id.clone()).collect();
        self.store.forget_invalid(&gone)?;
        if report.files() > 0 {
            tracing::info!(
                "imgcache: cleaned {} invalid and {} stalled files ({} bytes)",
                report.invalid.len(),
                report.stalled.len(),
                report.bytes()
            );
        }
        Ok(report)
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

    /// Admission: makes room for a fill of `id` of `size` bytes (as its
    /// origin announced; `None` if it did not) under
    /// [`CacheOptions::max_size`](crate::CacheOptions::max_size), [`CacheOptions::hard_limit`](crate::CacheOptions::hard_limit) and
    /// [`CacheOptions::min_free`](crate::CacheOptions::min_free), evicting least recently used images.
    /// The fills in progress count at the size they announced.
    ///
    /// `Err(`[`Error::NoRoom`]`)` when it cannot fit under the hard limit
    /// or above the free space kept, even with every image evicted (then
    /// nothing is evicted). Over `max_size` alone it is admitted: that
    /// limit is the pruner's, as in Glance. A fill whose origin announced
    /// no size counts as zero bytes until it commits (the pruner, and the
    /// next admission, see it then). Returns what was evicted.
    pub fn make_room(&self, id: &ImageId, size: Option<u64>) -> Result<PruneReport> {
        // Free space counted after descriptors kept of files removed
        // behind the cache's back are closed.
        self.layout.open_files().sweep();
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
                tracing::warn!(
                    "imgcache: {id}: admission without the store ({e}): sizing the files"
                );
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
        if let Some(fill) = self.fills.get(id) {
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
}
