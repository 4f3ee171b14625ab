//! [`XattrDriver`]: metadata in extended attributes on the cached files, as
//! Glance's `xattr` driver keeps it. Linux (and other Unixes with user
//! xattrs) only.
//!
//! | attribute | written by | value |
//! |---|---|---|
//! | `user.hits` | Glance, imgcache | hit count, decimal |
//! | `user.error` | Glance, imgcache | why a write failed (on `invalid/` files) |
//! | `user.imgcache.accessed` | imgcache | last access, seconds since the epoch |
//! | `user.imgcache.entry` | imgcache | commit time, committed size, CRC-32 and whether a checksum is recorded, in one value: `<seconds> <size> <crc or -> <c or ->` |
//! | `user.imgcache.checksum` | imgcache | the checksum the writer declared |
//! | `user.imgcache.modified`, `.size`, `.crc32` | imgcache before 0.2 | what `user.imgcache.entry` holds now, one value each; still read |
//! | `user.imgcache.queue_seq` | imgcache | on `queue/`: the queue counter |
//! | `user.imgcache.watermark` | imgcache | on the base directory: the durability watermark, two decimal microsecond counts |
//!
//! Glance takes the last access time from the file's atime, which
//! `relatime` and `noatime` mounts make wrong; imgcache keeps its own, and
//! falls back to atime only for files Glance wrote. Glance loses hits when
//! readers race (read, add one, write back); imgcache increments under an
//! exclusive `flock` of the file, so concurrent readers in any number of
//! threads and processes each count.
//!
//! What a commit records lies in one attribute (`user.imgcache.entry`), so
//! that it is written, and read, in one call, and set atomically: an entry
//! has its time, size and CRC together or none of them. Few and small
//! attributes also fit in the inode on ext4, where a separate attribute
//! block per file would cost every read and every unlink.
//!
//! The store keeps no metadata of its own: every call works on the file the
//! file layer hands it ([`OnDisk`]), by its open descriptor where the file
//! layer opened it and by its path where a walk only listed it. It never
//! builds a path, and it never moves or removes a file: `remove` has
//! nothing to forget once the file is gone. It holds in memory only the
//! hits not yet written and what it read of files that did not change.
//!
//! Durability: the attributes are written on the incomplete file before it
//! is renamed (`prepare`), so a cached file is published together with its
//! metadata. Hit counts and access times are not synced.
//!
//! The file system must take user xattrs: [`crate::ImageCache::open`]
//! checks that before it opens this store, and fails with
//! [`crate::Error::XattrUnsupported`] otherwise.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use xattr::FileExt;

use super::hits::Hits;
use super::{CacheDriver, Extensions, InvalidReasons, Watermarks};
use crate::entry::{CachedFiles, CachedImageInfo, Invalidation, OnDisk, Scanned, Watermark};
use crate::error::{Error, IoContext, Result};
use crate::id::ImageId;

pub(crate) mod encoding;

use encoding::*;

/// The metadata store Glance calls `xattr`: metadata in extended attributes
/// of the cached files themselves.
///
/// Hits are batched as the SQLite store batches them: a read counts its
/// hit in memory, and the counts are added to each file's `user.hits`
/// (under the file's lock, so that no process's hits are lost) every
/// second, or once 256 images have hits held (`drivers/hits.rs`: a hot
/// file is written once a second, however many its hits), before anything reports or
/// walks metadata, on [`CacheDriver::flush`] and when the store is dropped.
/// A process killed outright loses the hits it held. What a read needs of
/// an entry (its size, CRC, times) is remembered for as long as the file
/// is the same ([`OnDisk::identity`]: a change of its attributes changes
/// its change time), so a hit on a hot image reads no attribute at all.
#[derive(Debug, Clone)]
pub struct XattrDriver {
    state: Arc<State>,
}

/// Entries remembered at most; past it, the memory starts afresh.
const REMEMBERED: usize = 65_536;

#[derive(Debug, Default)]
struct State {
    inner: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// Per image: the hits not yet written, with the file they belong to.
    pending: Hits<HitsOf>,
    /// Per image: the file's identity and its entry as last read.
    known: HashMap<ImageId, ([i64; 7], CachedImageInfo)>,
}

impl Held {
    /// Counts `n` hits of `id` at `at` on `file` (device and inode, at
    /// `path`); returns the hits held for it now. The batch is written
    /// first where the hits held for `id` belong to a file since replaced,
    /// and after where it is due. A failed write is logged: these hits are
    /// counted, and the read that brought them served, whatever becomes of
    /// the others.
    fn count(
        &mut self,
        id: &ImageId,
        n: u64,
        at: SystemTime,
        path: &Path,
        file: (i64, i64),
    ) -> u64 {
        if self.pending.get(id).is_some_and(|p| p.of.file != file) {
            self.write_logged();
        }
        let pending = self.pending.add_n(id, n, at, || HitsOf {
            path: path.to_path_buf(),
            file,
        });
        if self.pending.due_at(at) {
            self.write_logged();
        }
        pending
    }

    fn write_logged(&mut self) {
        if let Err(e) = flush_pending(self) {
            tracing::warn!("imgcache: xattr hits not written: {e}");
        }
    }
}

/// The file a batch of hits belongs to.
#[derive(Debug)]
struct HitsOf {
    path: PathBuf,
    /// Device and inode: the hits belong to this file, not to one that
    /// replaced it.
    file: (i64, i64),
}

impl Drop for State {
    fn drop(&mut self) {
        if let Err(e) = flush_pending(&mut self.inner.lock()) {
            tracing::warn!("imgcache: xattr hits not written: {e}");
        }
    }
}

/// Adds the held hits to their files' `user.hits`, each under its file's
/// lock. Files gone or replaced meanwhile take their hits with them.
fn flush_pending(held: &mut Held) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut first_error = None;
    for (_, h) in held.pending.take() {
        let file = match File::open(&h.of.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_error.get_or_insert(Error::io("open", &h.of.path, e));
                continue;
            }
        };
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                first_error.get_or_insert(Error::io("stat", &h.of.path, e));
                continue;
            }
        };
        if (meta.dev() as i64, meta.ino() as i64) != h.of.file {
            continue;
        }
        let on = OnDisk::new(&h.of.path, Some(&file), &meta);
        let written = locked(on, || {
            let hits = decode(get(on, HITS)?, &h.of.path, HITS, decode_u64)?.unwrap_or(0);
            set(on, HITS, &encode_u64(hits.saturating_add(h.hits)))?;
            // The time of the latest hit, as the cache's clock gave it
            // (as an unbatched hit would have written it).
            set(on, ACCESSED, &encode_time(h.last))
        });
        match written {
            Ok(()) => {}
            Err(e) if vanished(&e) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Reads an attribute; `None` if absent. By descriptor where the file is
/// open, else by path.
fn get(on: OnDisk<'_>, name: &str) -> Result<Option<Vec<u8>>> {
    match on.file() {
        Some(f) => f.get_xattr(name),
        None => xattr::get(on.path(), name),
    }
    .ctx("read xattr", on.path())
}

fn set(on: OnDisk<'_>, name: &str, value: &[u8]) -> Result<()> {
    match on.file() {
        Some(f) => f.set_xattr(name, value),
        None => xattr::set(on.path(), name, value),
    }
    .ctx("write xattr", on.path())
}

/// Decodes an optional attribute, naming the file and attribute on error.
fn decode<T>(
    raw: Option<Vec<u8>>,
    path: &Path,
    name: &str,
    f: impl FnOnce(&[u8]) -> std::result::Result<T, String>,
) -> Result<Option<T>> {
    raw.map(|v| {
        f(&v).map_err(|detail| Error::CorruptMetadata {
            path: path.to_path_buf(),
            detail: format!("{name}: {detail}"),
        })
    })
    .transpose()
}

/// Runs `f` holding an exclusive `flock` of the open file: read-modify-write
/// of an attribute loses nothing to a concurrent writer in any process.
fn locked<T>(on: OnDisk<'_>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let path = on.path();
    let owned;
    let file: &File = match on.file() {
        Some(f) => f,
        None => {
            owned = File::open(path).ctx("open", path)?;
            &owned
        }
    };
    file.lock().ctx("lock", path)?;
    let out = f();
    file.unlock().ctx("unlock", path)?;
    out
}

impl XattrDriver {
    /// The xattr store for a cache in `dir` (which must exist). It keeps
    /// nothing but the attributes of the files the cache hands it; opening
    /// checks that `dir`'s file system takes user xattrs, and fails with
    /// [`Error::XattrUnsupported`] where it does not.
    pub fn open(dir: &Path) -> Result<Self> {
        probe(dir)?;
        Ok(XattrDriver {
            state: Arc::default(),
        })
    }

    /// The xattr store for reading a cache in `dir` that this user may not
    /// write (a monitoring account): no scratch file is made to probe the
    /// file system; one without user xattrs shows as entries without
    /// attributes. Hits read through it are not recorded.
    pub fn open_read_only(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                "open",
                dir,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Ok(XattrDriver {
            state: Arc::default(),
        })
    }

    /// Every cached file's metadata, through `keep` (which says what to do
    /// with each decoded entry); files that vanish meanwhile are passed
    /// over.
    fn walk<T>(
        &self,
        files: &dyn CachedFiles,
        mut keep: impl FnMut(&ImageId, OnDisk<'_>, Result<CachedImageInfo>) -> Result<Option<T>>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        files.each_cached(true, &mut |id, on| {
            match self.info_of(id.clone(), on) {
                Err(e) if vanished(&e) => {}
                decoded => out.extend(keep(id, on, decoded)?),
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// `f` on every cached file, by path (no open), spread over the cores
    /// for a large cache: attribute reads by path are most of a walk's
    /// cost. Results in no particular order.
    fn over_files<T: Send>(
        &self,
        files: &dyn CachedFiles,
        f: impl Fn(&ImageId, OnDisk<'_>) -> Result<Option<T>> + Sync,
    ) -> Result<Vec<T>> {
        let mut listed = Vec::new();
        files.each_cached(false, &mut |id, on| {
            listed.push((id.clone(), on.path().to_path_buf(), on.metadata().clone()));
            Ok(())
        })?;
        let run = |part: &[(ImageId, PathBuf, std::fs::Metadata)]| -> Result<Vec<T>> {
            let mut out = Vec::with_capacity(part.len());
            for (id, path, meta) in part {
                out.extend(f(id, OnDisk::new(path, None, meta))?);
            }
            Ok(out)
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        if threads < 2 || listed.len() < 2048 {
            return run(&listed);
        }
        let chunk = listed.len().div_ceil(threads);
        let parts: Vec<Result<Vec<T>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = listed
                .chunks(chunk)
                .map(|part| sc.spawn(|| run(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut all = Vec::with_capacity(listed.len());
        for part in parts {
            all.extend(part?);
        }
        Ok(all)
    }

    /// The entry of `id`, as last read while its file is the same one.
    fn known(&self, id: &ImageId, on: OnDisk<'_>) -> Result<CachedImageInfo> {
        let identity = on.identity();
        if let Some((seen, info)) = self.state.inner.lock().known.get(id) {
            if *seen == identity {
                return Ok(info.clone());
            }
        }
        let info = self.info_of(id.clone(), on)?;
        let mut held = self.state.inner.lock();
        if held.known.len() >= REMEMBERED {
            held.known.clear();
        }
        held.known.insert(id.clone(), (identity, info.clone()));
        Ok(info)
    }

    /// Writes the held hits now.
    fn flush_hits(&self) -> Result<()> {
        flush_pending(&mut self.state.inner.lock())
    }

    /// Reads the metadata of a cached file.
    fn info_of(&self, id: ImageId, on: OnDisk<'_>) -> Result<CachedImageInfo> {
        let path = on.path();
        let hits = decode(get(on, HITS)?, path, HITS, decode_u64)?.unwrap_or(0);
        let last_accessed =
            decode(get(on, ACCESSED)?, path, ACCESSED, decode_time)?.unwrap_or(on.accessed());
        let checksum = |on| -> Result<Option<String>> {
            Ok(get(on, CHECKSUM)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
        };
        let (last_modified, size, crc32, checksum) =
            match decode(get(on, ENTRY)?, path, ENTRY, decode_entry)? {
                Some(p) => (
                    p.modified,
                    p.size,
                    p.crc32,
                    if p.has_checksum { checksum(on)? } else { None },
                ),
                // Written before the packed entry, by Glance, or adopted.
                None => (
                    decode(get(on, MODIFIED)?, path, MODIFIED, decode_time)?
                        .unwrap_or(on.modified()),
                    decode(get(on, SIZE)?, path, SIZE, decode_u64)?.unwrap_or(on.len()),
                    decode(get(on, CRC32)?, path, CRC32, decode_crc)?,
                    checksum(on)?,
                ),
            };
        Ok(CachedImageInfo {
            id,
            size,
            hits,
            last_accessed,
            last_modified,
            checksum,
            crc32,
        })
    }
}

/// Whether an attribute read failed because the file went away.
fn vanished(e: &Error) -> bool {
    e.io_kind() == Some(io::ErrorKind::NotFound)
}

impl CacheDriver for XattrDriver {
    fn name(&self) -> &'static str {
        "xattr"
    }

    fn get(&self, id: &ImageId, file: OnDisk<'_>) -> Result<Option<CachedImageInfo>> {
        let mut info = match self.known(id, file) {
            Ok(info) => info,
            Err(e) if vanished(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let held = self.state.inner.lock();
        if let Some(p) = held.pending.get(id) {
            info.hits += p.hits;
            info.last_accessed = p.last;
        }
        Ok(Some(info))
    }

    fn hit(
        &self,
        id: &ImageId,
        at: SystemTime,
        file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>> {
        // The entry as remembered (no attribute read while the file is the
        // same); the hit counted in memory, written with others: one lock,
        // no attribute call, on a hot image.
        let identity = file.identity();
        let (dev, ino) = (identity[0], identity[1]);
        let mut held = self.state.inner.lock();
        let mut info = match held.known.get(id) {
            Some((seen, info)) if *seen == identity => info.clone(),
            _ => {
                drop(held);
                let info = self.known(id, file)?;
                held = self.state.inner.lock();
                info
            }
        };
        let pending = held.count(id, 1, at, file.path(), (dev, ino));
        info.hits += pending;
        info.last_accessed = at;
        Ok(Some(info))
    }

    fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, file: OnDisk<'_>) -> Result<()> {
        let identity = file.identity();
        let (dev, ino) = (identity[0], identity[1]);
        self.state
            .inner
            .lock()
            .count(id, n, at, file.path(), (dev, ino));
        Ok(())
    }

    fn prepare(&self, entry: &CachedImageInfo, file: OnDisk<'_>) -> Result<()> {
        // The entry (commit time, size, CRC: one value) before the hit
        // count that marks a known file: a journaling file system persists
        // metadata changes in order, so a file that lost some of its
        // attributes to a power cut either still looks unknown, or has its
        // whole entry.
        if let Some(c) = &entry.checksum {
            set(file, CHECKSUM, c.as_bytes())?;
        }
        set(
            file,
            ENTRY,
            &encode_entry(&Packed {
                modified: entry.last_modified,
                size: entry.size,
                crc32: entry.crc32,
                has_checksum: entry.checksum.is_some(),
            }),
        )?;
        set(file, ACCESSED, &encode_time(entry.last_accessed))?;
        set(file, HITS, &encode_u64(entry.hits))
    }

    fn insert(&self, _entry: &CachedImageInfo) -> Result<()> {
        // Written on the file by `prepare`, published with it.
        Ok(())
    }

    fn remove(&self, _ids: &[ImageId], _still_gone: &dyn Fn(&ImageId) -> bool) -> Result<usize> {
        // The metadata went with the file.
        Ok(0)
    }

    fn set_crc32(&self, id: &ImageId, crc32: u32, file: OnDisk<'_>) -> Result<()> {
        let info = self.info_of(id.clone(), file)?;
        set(
            file,
            ENTRY,
            &encode_entry(&Packed {
                modified: info.last_modified,
                size: file.len(),
                crc32: Some(crc32),
                has_checksum: info.checksum.is_some(),
            }),
        )
    }

    fn list(&self, files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>> {
        // By path, without opening the files; an entry whose file is the
        // same as when it was last read is not read again.
        self.flush_hits()?;
        let mut out = self.over_files(files, |id, on| match self.known(id, on) {
            Ok(info) => Ok(Some(info)),
            Err(e) if vanished(&e) => Ok(None),
            Err(e @ Error::CorruptMetadata { .. }) => {
                tracing::warn!("imgcache: skipping {}: {e}", on.path().display());
                Ok(None)
            }
            Err(e) => Err(e),
        })?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn total_size(&self, files: &dyn CachedFiles) -> Result<u64> {
        let mut total = 0;
        files.each_cached(false, &mut |_, on| {
            total += on.len();
            Ok(())
        })?;
        Ok(total)
    }

    fn scan(&self, files: &dyn CachedFiles) -> Result<Vec<Scanned>> {
        // The metadata travels with the file, so nothing can be orphaned the
        // way a database row can; what remains is files whose attributes do
        // not decode, and files no cache has seen yet (neither Glance nor
        // imgcache wrote them): those are left out, for the walk to adopt.
        self.flush_hits()?;
        self.walk(files, |id, on, decoded| match decoded {
            Ok(info) => {
                let known = get(on, HITS)?.is_some()
                    || get(on, ENTRY)?.is_some()
                    || get(on, CRC32)?.is_some();
                Ok(known.then_some(Scanned::Entry(info)))
            }
            Err(Error::CorruptMetadata { detail, .. }) => Ok(Some(Scanned::Corrupt {
                id: id.clone(),
                detail,
            })),
            Err(e) => Err(e),
        })
    }

    fn adopt(&self, orphans: &[(CachedImageInfo, OnDisk<'_>)]) -> Result<Vec<ImageId>> {
        // Glance's own marker of a known file; the rest stays as the file
        // says (size, times), unverified until scrubbed.
        // By a descriptor of its own, under the lock hits are counted
        // under: a file that another process adopted, or counted a hit on,
        // since it was listed keeps its count. The lock is tried, not
        // waited for: whoever holds it (a hit's count, a commit, another
        // adoption) leaves a count, so there is nothing to adopt.
        use std::os::unix::fs::MetadataExt;
        let mut adopted = Vec::new();
        for (entry, on) in orphans {
            let path = on.path();
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", path, e)),
            };
            let listed = on.metadata();
            let now = file.metadata().ctx("stat", path)?;
            if (now.dev(), now.ino()) != (listed.dev(), listed.ino()) {
                continue; // replaced since the listing: not the file listed
            }
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
            }
            let own = OnDisk::new(path, Some(&file), &now);
            let marked = match get(own, HITS) {
                Ok(Some(_)) => Ok(false),
                Ok(None) => set(own, HITS, b"0").map(|()| true),
                Err(e) => Err(e),
            };
            file.unlock().ctx("unlock", path)?;
            match marked {
                Ok(true) => adopted.push(entry.id.clone()),
                Ok(false) => {}
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(adopted)
    }

    fn flush(&self) -> Result<()> {
        self.flush_hits()
    }

    fn next_queue_seq(&self, queue: OnDisk<'_>) -> Result<u64> {
        // A counter in an attribute of `queue/`, incremented under an
        // exclusive lock of the folder, so that every process shares it.
        let path = queue.path();
        locked(queue, || {
            let cur = decode(get(queue, QUEUE_SEQ)?, path, QUEUE_SEQ, decode_u64)?.unwrap_or(0);
            let next = cur.saturating_add(1);
            set(queue, QUEUE_SEQ, &encode_u64(next))?;
            Ok(next)
        })
    }

    fn extensions(&self) -> Extensions<'_> {
        Extensions::default()
            .with_invalid_reasons(self)
            .with_watermarks(self)
            .with_hits_written_inline()
    }
}

impl InvalidReasons for XattrDriver {
    fn invalidate(&self, why: &Invalidation, file: OnDisk<'_>) -> Result<()> {
        set(file, ERROR, why.reason.as_bytes())?;
        set(file, INVALIDATED, &encode_time(why.at))
    }

    fn invalid_reason(
        &self,
        _id: &ImageId,
        file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)> {
        let reason = get(file, ERROR)?.map(|v| String::from_utf8_lossy(&v).into_owned());
        let at = get(file, INVALIDATED)?.and_then(|v| decode_time(&v).ok());
        Ok((reason, at))
    }

    fn forget_invalid(&self, _ids: &[ImageId]) -> Result<()> {
        // The reasons are on the files, gone with them.
        Ok(())
    }
}

impl Watermarks for XattrDriver {
    fn durable_watermark(&self, base: OnDisk<'_>) -> Result<Option<Watermark>> {
        decode(
            get(base, WATERMARK)?,
            base.path(),
            WATERMARK,
            decode_watermark,
        )
    }

    fn record_watermark(&self, mark: Watermark, base: OnDisk<'_>) -> Result<()> {
        let path = base.path();
        locked(base, || {
            let cur = decode(get(base, WATERMARK)?, path, WATERMARK, decode_watermark)?;
            // Each half only moves forwards: each is a claim of its own.
            let (mut a, mut b) = mark.to_micros();
            if let Some(c) = cur {
                let (ca, cb) = c.to_micros();
                a = a.max(ca);
                b = b.max(cb);
            }
            set(base, WATERMARK, format!("{a} {b}").as_bytes())
        })?;
        // The attribute is the directory's inode: its `fsync` makes it
        // durable.
        match base.file() {
            Some(f) => f.sync_all(),
            None => File::open(path).and_then(|f| f.sync_all()),
        }
        .ctx("fsync directory", path)
    }
}

/// Checks that the file system holding `dir` takes user xattrs: one set
/// on `dir` itself and removed (no scratch file: a store makes no file in
/// the cache's directory, and one left by a crash would be an image to
/// Glance).
fn probe(dir: &Path) -> Result<()> {
    const PROBE: &str = "user.imgcache.probe";
    // Several processes may probe at once: another's removal first is
    // no failure (ENODATA).
    let result = xattr::set(dir, PROBE, b"0").and_then(|()| match xattr::remove(dir, PROBE) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODATA) => Ok(()),
        other => other,
    });
    match result {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOTSUP) | Some(nix::libc::EPERM)
            ) || e.kind() == io::ErrorKind::Unsupported =>
        {
            Err(Error::XattrUnsupported {
                dir: dir.to_path_buf(),
                source: e,
            })
        }
        Err(e) => Err(Error::io("write xattr", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::from_epoch_secs;
    use std::time::Duration;

    /// `adopt` marks a file without a count as known, and leaves alone a
    /// file that got one since it was listed (another process's adoption,
    /// or its hits).
    #[test]
    fn adopt_keeps_a_count_written_since_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = XattrDriver::open(dir.path()).unwrap();
        let (fresh, counted) = (dir.path().join("fresh"), dir.path().join("counted"));
        let busy = dir.path().join("busy");
        std::fs::write(&fresh, b"f").unwrap();
        std::fs::write(&counted, b"c").unwrap();
        std::fs::write(&busy, b"b").unwrap();
        xattr::set(&counted, HITS, b"5").unwrap();
        let (ff, fc) = (File::open(&fresh).unwrap(), File::open(&counted).unwrap());
        let (mf, mc) = (ff.metadata().unwrap(), fc.metadata().unwrap());
        // Held by someone counting a hit on it (or committing it).
        let holder = File::open(&busy).unwrap();
        holder.lock().unwrap();
        let mb = holder.metadata().unwrap();
        let entry = |name: &str| {
            CachedImageInfo::new(ImageId::new(name).unwrap(), 1, SystemTime::UNIX_EPOCH)
        };
        let adopted = store
            .adopt(&[
                (entry("fresh"), OnDisk::new(&fresh, Some(&ff), &mf)),
                (entry("counted"), OnDisk::new(&counted, Some(&fc), &mc)),
                (entry("busy"), OnDisk::new(&busy, None, &mb)),
            ])
            .unwrap();
        assert_eq!(
            xattr::get(&busy, HITS).unwrap(),
            None,
            "adopted under a lock"
        );
        assert_eq!(adopted, [ImageId::new("fresh").unwrap()]);
        assert_eq!(
            xattr::get(&fresh, HITS).unwrap().as_deref(),
            Some(&b"0"[..])
        );
        assert_eq!(
            xattr::get(&counted, HITS).unwrap().as_deref(),
            Some(&b"5"[..])
        );
    }

    #[test]
    fn counts_decode_glance_values() {
        assert_eq!(decode_u64(b"0"), Ok(0));
        assert_eq!(decode_u64(b"42"), Ok(42));
        assert_eq!(decode_u64(b" 7\n"), Ok(7));
        assert_eq!(decode_u64(&encode_u64(u64::MAX)), Ok(u64::MAX));
        for bad in [
            &b""[..],
            b"-1",
            b"1.5",
            b"x",
            b"\xff",
            b"18446744073709551616",
        ] {
            assert!(decode_u64(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_round_trip_exactly() {
        for secs in [0.0, 1.25, 1_732_170_000.123_456, 86_400.0] {
            let t = from_epoch_secs(secs).unwrap();
            assert_eq!(decode_time(&encode_time(t)), Ok(t));
        }
        assert_eq!(
            decode_time(b"1700000000").unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        for bad in [&b""[..], b"NaN", b"inf", b"1e400", b"soon", b"\xff"] {
            assert!(decode_time(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crc_is_eight_hex_digits() {
        assert_eq!(encode_crc(0), b"00000000");
        assert_eq!(encode_crc(0xdead_beef), b"deadbeef");
        assert_eq!(decode_crc(b"deadbeef"), Ok(0xdead_beef));
        for bad in [&b""[..], b"dead", b"deadbeefa", b"xxxxxxxx", b"+eadbeef"] {
            assert!(decode_crc(bad).is_err(), "{bad:?}");
        }
    }
}
