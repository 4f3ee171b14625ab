//! [`CacheWriter`]: fills `incomplete/<id>` and publishes it atomically.
//!
//! The writer is where the file layer and the metadata store meet for one
//! image: it makes the file moves ([`Layout`]) and tells the store at each
//! step ([`CacheDriver`]); neither calls the other.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::durability::Durable;
use crate::clock::{round_trip, Clock};
use crate::drivers::CacheDriver;
use crate::drivers::StoreExt;
use crate::entry::{CachedImageInfo, Invalidation, OnDisk};
use crate::error::{Error, IoContext, Result};
use crate::files::layout::remove_if_exists;
use crate::files::{queue, Layout};
use crate::id::ImageId;

/// Size of the writer's buffer.
const BUFFER: usize = 256 * 1024;
/// A write this large skips the buffer (see [`CacheWriter`]'s `write`).
const DIRECT: usize = 64 * 1024;

/// Writes one image into `incomplete/<id>`.
///
/// [`commit`](CacheWriter::commit) makes it cached; [`abort`](CacheWriter::abort)
/// or dropping the writer without committing moves what was written to
/// `invalid/<id>`, with the reason recorded. While the writer lives it holds
/// a lock on its file, which tells `clean` that the file is not stalled.
///
/// Bytes are checksummed (CRC-32) as they are written; nothing is read back.
pub struct CacheWriter {
    /// The id, as the layout admitted it at create.
    id: crate::files::AdmittedId,
    /// `incomplete/<id>`.
    path: PathBuf,
    layout: Layout,
    out: Option<BufWriter<File>>,
    crc: crc32fast::Hasher,
    len: u64,
    checksum: Option<String>,
    store: Arc<dyn CacheDriver>,
    clock: Arc<dyn Clock>,
    durable: Arc<Durable>,
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
    /// exclusively. Users call [`crate::ImageCache::open_for_write`].
    pub(crate) fn create(
        layout: &Layout,
        id: crate::files::Admitted<'_>,
        store: Arc<dyn CacheDriver>,
        clock: Arc<dyn Clock>,
        durable: Arc<Durable>,
    ) -> Result<Self> {
        let cached = layout.cached(id);
        if cached.exists() {
            return Err(Error::AlreadyCached {
                id: id.id().clone(),
            });
        }
        let file = layout.create_incomplete(id)?;
        let path = layout.incomplete(id);
        // A writer that committed this id just before our create renamed its
        // file away first (which is what freed the name): look again, so
        // that we do not fill a second copy only to learn it at commit.
        if cached.exists() {
            remove_own(&path, file)?;
            return Err(Error::AlreadyCached {
                id: id.id().clone(),
            });
        }
        Ok(CacheWriter {
            id: id.to_owned(),
            path,
            layout: layout.clone(),
            out: Some(BufWriter::with_capacity(BUFFER, file)),
            crc: crc32fast::Hasher::new(),
            len: 0,
            checksum: None,
            store,
            clock,
            durable,
        })
    }

    /// The image being written.
    pub fn id(&self) -> &ImageId {
        self.id.id()
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// Another handle on the file being written, for readers that follow
    /// the fill with `pread`: opened afresh, not `dup`ed, so that it does
    /// not share the writer's lock — a follower that outlives the writer
    /// (a failed fill it is still reading) must not keep the file looking
    /// written-to, or a waiter on the lock ([`crate::files`]'s
    /// `wait_for_writer`) would wait for the follower instead.
    pub(crate) fn reopen_file(&self) -> Result<File> {
        use std::os::unix::fs::MetadataExt;
        let Some(out) = self.out.as_ref() else {
            return Err(Error::io(
                "open",
                &self.path,
                io::Error::other("writer already finished"),
            ));
        };
        let file = File::open(&self.path).ctx("open", &self.path)?;
        let (ours, theirs) = (
            out.get_ref().metadata().ctx("stat", &self.path)?,
            file.metadata().ctx("stat", &self.path)?,
        );
        if (ours.dev(), ours.ino()) != (theirs.dev(), theirs.ino()) {
            return Err(Error::io(
                "open",
                &self.path,
                io::Error::other("the incomplete file was replaced under its writer"),
            ));
        }
        Ok(file)
    }

    /// The id as the layout admitted it at create.
    fn key(&self) -> crate::files::Admitted<'_> {
        self.id.key()
    }

    /// Records the checksum the caller expects (Glance's `checksum`, e.g. an
    /// MD5 hex digest) with the entry. It is stored, not verified here.
    pub fn set_checksum(&mut self, checksum: impl Into<String>) {
        self.checksum = Some(checksum.into());
    }

    /// Makes the image cached: flushes the file, renames it to `<id>` in
    /// the base directory, records the metadata and takes the id off the
    /// queue. With [`crate::Durability::Immediate`] the file is `fsync`ed
    /// before the rename and the directory after it; with group durability
    /// the next checkpoint makes the commit durable (the entry is stamped
    /// after its last write, so that the watermark tells whether it is
    /// covered).
    ///
    /// On failure the bytes go to `invalid/<id>` and the error is returned.
    /// If a concurrent writer committed the same id first, this one's file
    /// is discarded and [`Error::AlreadyCached`] is returned.
    pub fn commit(mut self) -> Result<CachedImageInfo> {
        let Some(out) = self.out.take() else {
            return Err(Error::Config("writer already finished".into()));
        };
        let path = self.path.clone();
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
        let info =
            CachedImageInfo::new(self.id.id().clone(), self.len, round_trip(self.clock.now()))
                .with_crc32(Some(self.crc.clone().finalize()))
                .with_checksum(self.checksum.take());
        // A store on the file writes its metadata now, so that it is synced
        // and published with the bytes.
        let sync = self.durable.syncs_each_commit();
        let meta = match file.metadata().ctx("stat", &path) {
            Ok(meta) => meta,
            Err(err) => {
                self.invalidate(file, &format!("commit failed: {err}"));
                return Err(err);
            }
        };
        let staged = self
            .store
            .prepare(&info, OnDisk::new(&path, Some(&file), &meta))
            .and_then(|()| {
                if sync {
                    file.sync_all().map_err(|e| Error::io("fsync", &path, e))
                } else {
                    Ok(())
                }
            });
        if let Err(err) = staged {
            self.invalidate(file, &format!("commit failed: {err}"));
            return Err(err);
        }
        let key = self.key();
        if !self.still_at_path(&meta) {
            // Moved away under us (invalidated at a shutdown, or removed):
            // nothing of ours to publish, nor to move.
            return Err(Error::io(
                "publish",
                &path,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "no longer this writer's file (moved to invalid/ or removed before the commit)",
                ),
            ));
        }
        match self.layout.publish(key, sync) {
            Ok(true) => {}
            Ok(false) => {
                // Someone else committed this id between our open and now.
                remove_own(&path, file)?;
                return Err(Error::AlreadyCached {
                    id: self.id.id().clone(),
                });
            }
            Err(err) => {
                self.invalidate(file, &format!("commit failed: {err}"));
                return Err(err);
            }
        }
        // A store elsewhere records the row now: a row never names a file
        // that is not in place. With group durability it may hold the row
        // and write it with others (by the next checkpoint).
        let recorded = if sync {
            self.store.insert(&info)
        } else {
            let published = self.layout.cached(key);
            self.store
                .insert_batched(&info, OnDisk::new(&published, Some(&file), &meta))
        };
        if let Err(err) = recorded {
            // Metadata and files must agree: take the file back out.
            if let Err(e) = self.layout.remove_cached(key) {
                tracing::error!(
                    "imgcache: cannot withdraw {} after failed commit: {e}",
                    self.id
                );
            }
            return Err(err);
        }
        if let Err(e) = queue::remove(&self.layout, key) {
            tracing::warn!("imgcache: {} cached but still queued: {e}", self.id);
        }
        drop(file);
        self.durable.committed(self.len);
        Ok(info)
    }

    /// Withdraws a writer that wrote nothing worth keeping (its source could
    /// not even be opened): the file is removed, not moved to `invalid/`.
    pub(crate) fn discard(mut self) -> Result<()> {
        if let Some(out) = self.out.take() {
            let (file, _) = out.into_parts();
            remove_own(&self.path, file)?;
        }
        Ok(())
    }

    /// Whether `incomplete/<id>` is still this writer's file: not moved
    /// away under it ([`crate::ImageCache::invalidate_fills`]) and replaced
    /// by another writer's. Every rename or removal by path checks it
    /// first, so that a writer never publishes, moves or deletes a file
    /// that is not its own.
    fn still_ours(&self, file: &File) -> bool {
        file.metadata().is_ok_and(|meta| self.still_at_path(&meta))
    }

    /// [`CacheWriter::still_ours`], for the file whose metadata is `meta`.
    fn still_at_path(&self, meta: &std::fs::Metadata) -> bool {
        crate::files::names(&self.path, meta)
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
            tracing::error!("imgcache: cannot invalidate {}: {e}", self.id);
        }
    }

    fn try_invalidate(&mut self, file: File, reason: &str) -> Result<()> {
        let why = Invalidation::new(
            self.id.id().clone(),
            self.len,
            reason,
            round_trip(self.clock.now()),
        );
        // The move first, the reason second: failing to record why (a full
        // disk refusing the metadata write, a crash) loses only the reason.
        let key = self.key();
        if !self.still_ours(&file) {
            // Moved away already (invalidated under us); nothing to move.
            return Ok(());
        }
        self.layout.invalidate(key)?;
        let moved = self.layout.invalid(key);
        let recorded = file.metadata().ctx("stat", &moved).and_then(|meta| {
            self.store
                .invalidate(&why, OnDisk::new(&moved, Some(&file), &meta))
        });
        if let Err(e) = recorded {
            tracing::warn!("imgcache: cannot record why {} failed: {e}", self.id);
        }
        drop(file);
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

/// Removes `path` if it still names `file`, while `file` (and so its
/// lock) is still held, then lets the file go. Once the lock goes, another
/// process may take the name over (a waiter on the lock clears the file as
/// stalled, then a new writer links its own): a removal by path after the
/// unlock could remove that writer's live file.
fn remove_own(path: &Path, file: File) -> Result<()> {
    if file
        .metadata()
        .is_ok_and(|meta| crate::files::names(path, &meta))
    {
        remove_if_exists(path)?;
    }
    drop(file);
    Ok(())
}

impl Write for CacheWriter {
    /// Small writes are gathered in a buffer; a write of 64 KiB
    /// or more goes to the file as it is (after what is buffered), not
    /// copied through the buffer first.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("cache writer already finished"))?;
        let n = if buf.len() >= DIRECT {
            out.flush()?;
            out.get_mut().write(buf)?
        } else {
            out.write(buf)?
        };
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
                tracing::error!("imgcache: cannot invalidate {}: {e}", self.id);
            }
        }
    }
}
