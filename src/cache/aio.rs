//! The async face of the cache (feature `tokio`).
//!
//! Nothing here blocks a runtime thread on the disk or the metadata store:
//! hits are opened, and fills looked up, on tokio's blocking pool (a hit on
//! a descriptor the cache kept open, on a store that counts hits in
//! memory, costs an `fstat` and is answered where it is asked); a fill
//! runs on a thread of its own ([`ImageCache::fetch_detached`]); followers
//! wait for bytes with wakers ([`FollowReader::ready`]); and bytes go to a
//! socket with `sendfile` driven by the socket's readiness, never by a
//! blocking `poll`.
//!
//! One exception is the kernel's own: `sendfile` of a page that is not in
//! the page cache reads it from the disk inside the call, as nginx's
//! `sendfile on` does; so does the `pread` of the fallback, where the
//! kernel refuses `sendfile` (other systems, some file systems). For images
//! that are mostly cold, serve through the
//! `crate::serve::ImageService` body instead, which reads on the blocking
//! pool.

use std::io;
use std::sync::Arc;

use crate::cache::{Fetched, ImageCache};
use crate::error::{Error, Result};
use crate::files::CachedImage;
use crate::id::ImageId;
use crate::origin::OriginObject;

/// Runs blocking `f` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    cache: &ImageCache,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::io(
            "run a blocking task in",
            cache.options().image_cache_dir(),
            io::Error::other(e.to_string()),
        )
    })?
}

impl ImageCache {
    /// [`ImageCache::open_for_read`] on tokio's blocking pool.
    pub async fn open_for_read_async(
        self: &Arc<Self>,
        id: &ImageId,
    ) -> Result<Option<CachedImage>> {
        if let Some(image) = self.open_kept_here(id) {
            return Ok(Some(image));
        }
        let cache = self.clone();
        let id = id.clone();
        blocking(self, move || cache.open_for_read(&id)).await
    }

    /// A hit on a descriptor kept open, answered on the calling thread: an
    /// `fstat` of an open file (an `lstat` of its path while its change
    /// time is recent) and a count in memory. Only for stores whose hits
    /// are written by a thread of their own (SQLite, PostgreSQL), not from
    /// the reading thread ([`crate::drivers::Extensions::hits_written_inline`]:
    /// the xattr store's). Anything else (a store error included) goes to
    /// the blocking pool, which answers as ever. A sweep of the kept
    /// descriptors, when due, runs there too.
    fn open_kept_here(self: &Arc<Self>, id: &ImageId) -> Option<CachedImage> {
        if self.store.extensions().hits_written_inline() {
            return None;
        }
        let key = self.layout.admit(id).ok()?;
        let image = self.open_kept(key.id(), false).ok().flatten();
        if self.layout.open_files().sweep_due() {
            let cache = self.clone();
            drop(tokio::task::spawn_blocking(move || {
                cache.layout.open_files().sweep()
            }));
        }
        image
    }

    /// [`ImageCache::fetch_detached`] on tokio's blocking pool: a hit, or a
    /// follower of the one fill of `id` (started now with `open` if none
    /// runs), or — with the metadata store down — the origin's object to
    /// pass through. Waiting for another process's writer happens there
    /// too, never on a runtime thread.
    pub async fn fetch_async<F>(self: &Arc<Self>, id: &ImageId, open: F) -> Result<Fetched>
    where
        F: FnOnce() -> Result<OriginObject> + Send + 'static,
    {
        // A fill in progress here is joined at once, off the pool: the
        // many clients of a cold image do not queue for its threads.
        if let Some(follower) = self.follow(id)? {
            return Ok(Fetched::Following(follower));
        }
        // So is a hit on a descriptor kept open.
        if let Some(image) = self.open_kept_here(id) {
            return Ok(Fetched::Cached(image));
        }
        let cache = self.clone();
        let id = id.clone();
        blocking(self, move || cache.fetch_detached(&id, open)).await
    }
}
