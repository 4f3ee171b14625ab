//! [`CacheWriter`]: fills `incomplete/<id>` and publishes it atomically.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::clock::{round_trip, Clock};
use crate::driver::CachedImageInfo;
use crate::error::{Error, IoContext, Result};
use crate::id::ImageId;
use crate::layout::{remove_if_exists, Layout};
use crate::queue;

/// Size of the writer's buffer. Writes at least this large go straight to
/// the file.
const BUFFER: usize = 256 * 1024;

/// What a writer is committing.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CommitInfo {
    /// The image.
    pub id: ImageId,
    /// Bytes written.
    pub size: u64,
    /// CRC-32 (IEEE) of those bytes.
    pub crc32: u32,
    /// The checksum the caller declared, if any.
    pub checksum: Option<String>,
    /// When the commit happened (from the cache's clock).
    pub at: SystemTime,
}

/// Why and when a write was invalidated.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct InvalidateInfo {
    /// The image.
    pub id: ImageId,
    /// Bytes written before it failed.
    pub size: u64,
    /// Why.
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

/// A driver's part in a writer's life: recording metadata around the file
/// moves that [`CacheWriter`] makes.
///
/// The order of a commit is: `before_publish` (the file is complete but not
/// yet synced) → `fsync` of the file → rename to the base directory →
/// `fsync` of the directory → `after_publish`. A driver that keeps metadata
/// on the file itself (xattr) writes it in `before_publish`, so that it is
/// synced and published with the bytes; one that keeps it elsewhere (SQLite)
/// writes it in `after_publish`.
pub trait CommitHooks: Send + Sync + fmt::Debug {
    /// Before the file is synced and published.
    fn before_publish(&self, _file: &File, _path: &Path, _info: &CommitInfo) -> Result<()> {
        Ok(())
    }

    /// After the file is published and its directory synced. If this fails,
    /// the published file is removed again and the commit fails.
    fn after_publish(&self, info: &CommitInfo) -> Result<()>;

    /// Before the file is moved to `invalid/`.
    fn before_invalidate(&self, _file: &File, _path: &Path, _info: &InvalidateInfo) -> Result<()> {
        Ok(())
    }

    /// After the file was moved to `invalid/`.
    fn after_invalidate(&self, _info: &InvalidateInfo) -> Result<()> {
        Ok(())
    }
}

/// Writes one image into `incomplete/<id>`.
///
/// [`commit`](CacheWriter::commit) makes it cached; [`abort`](CacheWriter::abort)
/// or dropping the writer without committing moves what was written to
/// `invalid/<id>`, with the reason recorded. While the writer lives it holds
/// a lock on its file, which tells `clean` that the file is not stalled.
///
/// Bytes are checksummed (CRC-32) as they are written; nothing is read back.
pub struct CacheWriter {
    id: ImageId,
    layout: Layout,
    out: Option<BufWriter<File>>,
    crc: crc32fast::Hasher,
    len: u64,
    checksum: Option<String>,
    hooks: Arc<dyn CommitHooks>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for CacheWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheWriter")
            .field("id", &self.id)
            .field("written", &self.len)
            .field("open", &self.out.is_some())
            .finish()
    }
}

impl CacheWriter {
    /// Starts a writer for `id`: creates and locks `incomplete/<id>`
    /// exclusively. For driver implementations; users call
    /// [`crate::CacheDriver::open_for_write`].
    pub fn create(
        layout: &Layout,
        id: &ImageId,
        hooks: Arc<dyn CommitHooks>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        layout.check_id(id)?;
        let file = layout.create_incomplete(id)?;
        // A writer that committed this id just before our create renamed its
        // file away first (which is what freed the name): look again, so
        // that we do not fill a second copy only to learn it at commit.
        let cached = layout.cached(id);
        if cached.exists() {
            drop(file);
            remove_if_exists(&layout.incomplete(id))?;
            return Err(Error::AlreadyCached { id: id.clone() });
        }
        Ok(CacheWriter {
            id: id.clone(),
            layout: layout.clone(),
            out: Some(BufWriter::with_capacity(BUFFER, file)),
            crc: crc32fast::Hasher::new(),
            len: 0,
            checksum: None,
            hooks,
            clock,
        })
    }

    /// The image being written.
    pub fn id(&self) -> &ImageId {
        &self.id
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// Another handle on the file being written (for readers that follow
    /// the fill with `pread`).
    pub(crate) fn try_clone_file(&self) -> Result<File> {
        let path = self.layout.incomplete(&self.id);
        match self.out.as_ref() {
            Some(out) => out.get_ref().try_clone().ctx("dup", &path),
            None => Err(Error::io(
                "dup",
                &path,
                io::Error::other("writer already finished"),
            )),
        }
    }

    /// Records the checksum the caller expects (Glance's `checksum`, e.g. an
    /// MD5 hex digest) with the entry. It is stored, not verified here.
    pub fn set_checksum(&mut self, checksum: impl Into<String>) {
        self.checksum = Some(checksum.into());
    }

    /// Makes the image cached: flushes and `fsync`s the file, renames it to
    /// `<id>` in the base directory, `fsync`s the directory, records the
    /// metadata and takes the id off the queue.
    ///
    /// On failure the bytes go to `invalid/<id>` and the error is returned.
    /// If a concurrent writer committed the same id first, this one's file
    /// is discarded and [`Error::AlreadyCached`] is returned.
    pub fn commit(mut self) -> Result<CachedImageInfo> {
        let Some(out) = self.out.take() else {
            return Err(Error::Config("writer already finished".into()));
        };
        let path = self.layout.incomplete(&self.id);
        let file = match out.into_inner() {
            Ok(f) => f,
            Err(e) => {
                let (err, out) = e.into_parts();
                let (file, _) = out.into_parts();
                let err = Error::io("write", &path, err);
                self.invalidate(file, &format!("commit failed: {err}"));
                return Err(err);
            }
        };
        let info = CommitInfo {
            id: self.id.clone(),
            size: self.len,
            crc32: self.crc.clone().finalize(),
            checksum: self.checksum.take(),
            at: round_trip(self.clock.now()),
        };
        let staged = self
            .hooks
            .before_publish(&file, &path, &info)
            .and_then(|()| file.sync_all().map_err(|e| Error::io("fsync", &path, e)));
        if let Err(err) = staged {
            self.invalidate(file, &format!("commit failed: {err}"));
            return Err(err);
        }
        match self.layout.publish(&self.id) {
            Ok(true) => {}
            Ok(false) => {
                // Someone else committed this id between our open and now.
                drop(file);
                remove_if_exists(&path)?;
                return Err(Error::AlreadyCached {
                    id: self.id.clone(),
                });
            }
            Err(err) => {
                self.invalidate(file, &format!("commit failed: {err}"));
                return Err(err);
            }
        }
        if let Err(err) = self.hooks.after_publish(&info) {
            // Metadata and files must agree: take the file back out.
            if let Err(e) = remove_if_exists(&self.layout.cached(&self.id)) {
                log::error!(
                    "imgcache: cannot withdraw {} after failed commit: {e}",
                    self.id
                );
            }
            return Err(err);
        }
        if let Err(e) = queue::remove(&self.layout, &self.id) {
            log::warn!("imgcache: {} cached but still queued: {e}", self.id);
        }
        drop(file);
        Ok(CachedImageInfo {
            id: info.id,
            size: info.size,
            hits: 0,
            last_accessed: info.at,
            last_modified: info.at,
            checksum: info.checksum,
            crc32: Some(info.crc32),
        })
    }

    /// Withdraws a writer that wrote nothing worth keeping (its source could
    /// not even be opened): the file is removed, not moved to `invalid/`.
    pub(crate) fn discard(mut self) -> Result<()> {
        if let Some(out) = self.out.take() {
            let (file, _) = out.into_parts();
            drop(file);
            remove_if_exists(&self.layout.incomplete(&self.id))?;
        }
        Ok(())
    }

    /// Abandons the write: what was written moves to `invalid/<id>` with
    /// `reason` recorded.
    pub fn abort(mut self, reason: &str) -> Result<()> {
        match self.out.take() {
            Some(out) => self.finish_invalid(out, reason),
            None => Ok(()),
        }
    }

    fn finish_invalid(&mut self, mut out: BufWriter<File>, reason: &str) -> Result<()> {
        // Keep what was written, for debugging; a failing flush loses only that.
        let _ = out.flush();
        let (file, _) = out.into_parts();
        self.try_invalidate(file, reason)
    }

    /// Moves the file to `invalid/`, logging instead of failing.
    fn invalidate(&mut self, file: File, reason: &str) {
        if let Err(e) = self.try_invalidate(file, reason) {
            log::error!("imgcache: cannot invalidate {}: {e}", self.id);
        }
    }

    fn try_invalidate(&mut self, file: File, reason: &str) -> Result<()> {
        let info = InvalidateInfo {
            id: self.id.clone(),
            size: self.len,
            reason: reason.to_owned(),
            at: round_trip(self.clock.now()),
        };
        let path = self.layout.incomplete(&self.id);
        if let Err(e) = self.hooks.before_invalidate(&file, &path, &info) {
            log::warn!("imgcache: cannot record why {} failed: {e}", self.id);
        }
        self.layout.invalidate(&self.id)?;
        drop(file);
        // The file is out of the way; failing to record why (a full disk
        // refusing the metadata write) loses only the reason.
        if let Err(e) = self.hooks.after_invalidate(&info) {
            log::warn!("imgcache: cannot record why {} failed: {e}", self.id);
        }
        Ok(())
    }
}

impl CacheWriter {
    /// Writes `data` straight to the file (after anything buffered), so
    /// that it is readable from the file at once: the tee's path, where a
    /// trip through the buffer would be a copy and a flush per chunk.
    pub(crate) fn write_through(&mut self, data: &[u8]) -> io::Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("cache writer already finished"))?;
        out.flush()?;
        out.get_mut().write_all(data)?;
        self.crc.update(data);
        self.len += data.len() as u64;
        Ok(())
    }
}

impl Write for CacheWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("cache writer already finished"))?;
        let n = out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if let Some(out) = self.out.take() {
            let reason = if std::thread::panicking() {
                "writer dropped during a panic"
            } else {
                "writer dropped before commit"
            };
            if let Err(e) = self.finish_invalid(out, reason) {
                log::error!("imgcache: cannot invalidate {}: {e}", self.id);
            }
        }
    }
}
