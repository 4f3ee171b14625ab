//! [`XattrDriver`]: metadata in extended attributes on the cached files, as
//! Glance's `xattr` driver keeps it. Linux (and other Unixes with user
//! xattrs) only.
//!
//! | attribute | written by | value |
//! |---|---|---|
//! | `user.hits` | Glance, imgcache | hit count, decimal |
//! | `user.error` | Glance, imgcache | why a write failed (on `invalid/` files) |
//! | `user.imgcache.accessed` | imgcache | last access, seconds since the epoch |
//! | `user.imgcache.modified` | imgcache | commit time, seconds since the epoch |
//! | `user.imgcache.size` | imgcache | committed size, decimal |
//! | `user.imgcache.crc32` | imgcache | CRC-32 of the bytes, 8 hex digits |
//! | `user.imgcache.checksum` | imgcache | the checksum the writer declared |
//! | `user.imgcache.queue_seq` | imgcache | on `queue/`: the queue counter |
//!
//! Glance takes the last access time from the file's atime, which
//! `relatime` and `noatime` mounts make wrong; imgcache keeps its own, and
//! falls back to atime only for files Glance wrote. Glance loses hits when
//! readers race (read, add one, write back); imgcache increments under an
//! exclusive `flock` of the file, so concurrent readers in any number of
//! threads and processes each count.
//!
//! Durability: the attributes are written on the incomplete file before it
//! is synced and renamed, so a cached file is published together with its
//! metadata. Hit counts and access times are not synced.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use xattr::FileExt;

use crate::clock::{from_epoch_secs, round_trip, to_epoch_secs, Clock};
use crate::driver::{CacheDriver, CachedImageInfo, InvalidImageInfo, LruEntry, RecoveryReport};
use crate::error::{Error, IoContext, Result};
use crate::id::ImageId;
use crate::layout::{remove_if_exists, CleanReport, Layout};
use crate::queue;
use crate::reader::CachedImage;
use crate::writer::{CacheWriter, CommitHooks, CommitInfo, InvalidateInfo};

/// Glance's hit counter.
pub const HITS: &str = "user.hits";
/// Glance's failure reason.
pub const ERROR: &str = "user.error";
/// Last access time.
pub const ACCESSED: &str = "user.imgcache.accessed";
/// Commit time.
pub const MODIFIED: &str = "user.imgcache.modified";
/// Committed size.
pub const SIZE: &str = "user.imgcache.size";
/// CRC-32 of the bytes.
pub const CRC32: &str = "user.imgcache.crc32";
/// Declared checksum.
pub const CHECKSUM: &str = "user.imgcache.checksum";
/// Time of invalidation.
pub const INVALIDATED: &str = "user.imgcache.invalidated";
/// Queue counter, on the `queue/` folder.
pub const QUEUE_SEQ: &str = "user.imgcache.queue_seq";

/// Encodings of the attribute values. Decoders never panic; they say what
/// was wrong.
pub mod encoding {
    use super::*;

    /// A decimal count (`user.hits`, `user.imgcache.size`). Glance writes
    /// Python's `str(int)`; surrounding whitespace is tolerated.
    pub fn decode_u64(v: &[u8]) -> std::result::Result<u64, String> {
        let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
        s.trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a whole number"))
    }

    /// Encodes a count.
    pub fn encode_u64(n: u64) -> Vec<u8> {
        n.to_string().into_bytes()
    }

    /// Seconds since the epoch, as Rust prints an `f64` (shortest form that
    /// reads back to the same value).
    pub fn encode_time(t: SystemTime) -> Vec<u8> {
        to_epoch_secs(t).to_string().into_bytes()
    }

    /// Decodes [`encode_time`] (or any decimal number of seconds).
    pub fn decode_time(v: &[u8]) -> std::result::Result<SystemTime, String> {
        let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
        let secs: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number of seconds"))?;
        from_epoch_secs(secs).ok_or_else(|| format!("{s:?} is not a time"))
    }

    /// A CRC-32 as 8 lowercase hex digits.
    pub fn encode_crc(crc: u32) -> Vec<u8> {
        format!("{crc:08x}").into_bytes()
    }

    /// Decodes [`encode_crc`].
    pub fn decode_crc(v: &[u8]) -> std::result::Result<u32, String> {
        let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
        if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not 8 hex digits"));
        }
        u32::from_str_radix(s, 16).map_err(|_| format!("{s:?} is not 8 hex digits"))
    }
}

use encoding::*;

/// The metadata driver Glance calls `xattr`.
#[derive(Clone)]
pub struct XattrDriver {
    inner: Arc<Inner>,
}

struct Inner {
    layout: Layout,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for XattrDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XattrDriver")
            .field("dir", &self.inner.layout.base())
            .finish()
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XattrDriver")
            .field("dir", &self.layout.base())
            .finish()
    }
}

/// Reads an attribute of an open file; `None` if absent.
fn get(file: &File, path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    file.get_xattr(name).ctx("read xattr", path)
}

fn set(file: &File, path: &Path, name: &str, value: &[u8]) -> Result<()> {
    file.set_xattr(name, value).ctx("write xattr", path)
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

impl XattrDriver {
    /// Opens (creating if needed) the cache in `dir`. Fails with
    /// [`Error::XattrUnsupported`] if the file system has no user extended
    /// attributes.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Self> {
        Self::with_layout(Layout::new(dir, None), clock)
    }

    /// Opens the cache laid out as `layout`: used when a database name is
    /// configured for the directory, so that it is never taken for an image.
    pub fn with_layout(layout: Layout, clock: Arc<dyn Clock>) -> Result<Self> {
        layout.create()?;
        probe(&layout)?;
        Ok(XattrDriver {
            inner: Arc::new(Inner { layout, clock }),
        })
    }

    /// Reads the metadata of a cached file (`path` is `<id>`).
    fn info_of(&self, id: ImageId, file: &File, path: &Path) -> Result<CachedImageInfo> {
        let meta = file.metadata().ctx("stat", path)?;
        let hits = decode(get(file, path, HITS)?, path, HITS, decode_u64)?.unwrap_or(0);
        let atime = meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let last_accessed =
            decode(get(file, path, ACCESSED)?, path, ACCESSED, decode_time)?.unwrap_or(atime);
        let last_modified =
            decode(get(file, path, MODIFIED)?, path, MODIFIED, decode_time)?.unwrap_or(mtime);
        let size = decode(get(file, path, SIZE)?, path, SIZE, decode_u64)?.unwrap_or(meta.len());
        let crc32 = decode(get(file, path, CRC32)?, path, CRC32, decode_crc)?;
        let checksum = get(file, path, CHECKSUM)?.map(|v| String::from_utf8_lossy(&v).into_owned());
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

    /// Opens `<id>` and reads its metadata; `None` if it is not cached.
    fn open_cached(&self, id: &ImageId) -> Result<Option<(File, PathBuf)>> {
        let path = self.inner.layout.cached(id);
        match File::open(&path) {
            Ok(f) => Ok(Some((f, path))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open", &path, e)),
        }
    }

    /// Every cached image's metadata; files that vanish meanwhile are passed
    /// over, files with undecodable metadata are logged and passed over.
    fn all(&self) -> Result<Vec<CachedImageInfo>> {
        let layout = &self.inner.layout;
        let mut out = Vec::new();
        for (id, _) in layout.list(layout.base())? {
            let Some((file, path)) = self.open_cached(&id)? else {
                continue;
            };
            match self.info_of(id, &file, &path) {
                Ok(info) => out.push(info),
                Err(e @ Error::CorruptMetadata { .. }) => {
                    log::warn!("imgcache: skipping {}: {e}", path.display())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The next queue sequence number: a counter in an attribute of
    /// `queue/`, incremented under an exclusive lock of the folder so that
    /// every process on the directory shares it.
    fn next_queue_seq(&self) -> Result<u64> {
        let dir = self.inner.layout.queue_dir();
        let f = File::open(dir).ctx("open", dir)?;
        f.lock().ctx("lock", dir)?;
        let cur = decode(get(&f, dir, QUEUE_SEQ)?, dir, QUEUE_SEQ, decode_u64)?.unwrap_or(0);
        let next = cur.saturating_add(1);
        set(&f, dir, QUEUE_SEQ, &encode_u64(next))?;
        // Closing the file releases the lock.
        Ok(next)
    }
}

/// Checks that `layout`'s file system takes user xattrs, on a scratch file
/// in `incomplete/` (named so that no image id can collide with it).
fn probe(layout: &Layout) -> Result<()> {
    let path = layout
        .incomplete_dir()
        .join(format!(".imgcache-probe-{}", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .ctx("create", &path)?;
    let result = file.set_xattr(HITS, b"0");
    drop(file);
    remove_if_exists(&path)?;
    match result {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOTSUP) | Some(nix::libc::EPERM)
            ) || e.kind() == io::ErrorKind::Unsupported =>
        {
            Err(Error::XattrUnsupported {
                dir: layout.base().to_path_buf(),
                source: e,
            })
        }
        Err(e) => Err(Error::io("write xattr", &path, e)),
    }
}

impl CommitHooks for Inner {
    fn before_publish(&self, file: &File, path: &Path, info: &CommitInfo) -> Result<()> {
        set(file, path, HITS, b"0")?;
        set(file, path, ACCESSED, &encode_time(info.at))?;
        set(file, path, MODIFIED, &encode_time(info.at))?;
        set(file, path, SIZE, &encode_u64(info.size))?;
        set(file, path, CRC32, &encode_crc(info.crc32))?;
        if let Some(c) = &info.checksum {
            set(file, path, CHECKSUM, c.as_bytes())?;
        }
        Ok(())
    }

    fn after_publish(&self, _info: &CommitInfo) -> Result<()> {
        Ok(())
    }

    fn before_invalidate(&self, file: &File, path: &Path, info: &InvalidateInfo) -> Result<()> {
        set(file, path, ERROR, info.reason.as_bytes())?;
        set(file, path, INVALIDATED, &encode_time(info.at))
    }
}

impl CacheDriver for XattrDriver {
    fn name(&self) -> &'static str {
        "xattr"
    }

    fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    fn cache_size(&self) -> Result<u64> {
        let layout = &self.inner.layout;
        Ok(layout
            .list(layout.base())?
            .iter()
            .map(|(_, m)| m.len())
            .sum())
    }

    fn cached_images(&self) -> Result<Vec<CachedImageInfo>> {
        let mut all = self.all()?;
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn cached_image(&self, id: &ImageId) -> Result<Option<CachedImageInfo>> {
        match self.open_cached(id)? {
            Some((file, path)) => self.info_of(id.clone(), &file, &path).map(Some),
            None => Ok(None),
        }
    }

    fn hit_count(&self, id: &ImageId) -> Result<u64> {
        match self.open_cached(id)? {
            Some((file, path)) => {
                Ok(decode(get(&file, &path, HITS)?, &path, HITS, decode_u64)?.unwrap_or(0))
            }
            None => Ok(0),
        }
    }

    fn is_cached(&self, id: &ImageId) -> Result<bool> {
        Ok(self.inner.layout.cached(id).is_file())
    }

    fn delete_cached_image(&self, id: &ImageId) -> Result<bool> {
        remove_if_exists(&self.inner.layout.cached(id))
    }

    fn delete_all_cached_images(&self) -> Result<usize> {
        let layout = &self.inner.layout;
        let mut n = 0;
        for (id, _) in layout.list(layout.base())? {
            if remove_if_exists(&layout.cached(&id))? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn queue_image(&self, id: &ImageId) -> Result<bool> {
        self.inner.layout.check_id(id)?;
        if self.is_cached(id)? || self.is_being_cached(id)? || self.is_queued(id)? {
            return Ok(false);
        }
        let seq = self.next_queue_seq()?;
        queue::add(&self.inner.layout, id, seq)
    }

    fn invalid_images(&self) -> Result<Vec<InvalidImageInfo>> {
        let layout = &self.inner.layout;
        let mut out = Vec::new();
        for (id, meta) in layout.list(layout.invalid_dir())? {
            let path = layout.invalid(&id);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", &path, e)),
            };
            let reason =
                get(&file, &path, ERROR)?.map(|v| String::from_utf8_lossy(&v).into_owned());
            let invalidated_at = get(&file, &path, INVALIDATED)?.and_then(|v| decode_time(&v).ok());
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

    fn clean(&self, stall_time: Duration) -> Result<CleanReport> {
        self.inner.layout.clean(stall_time, self.inner.clock.now())
    }

    fn least_recently_accessed(&self) -> Result<Vec<LruEntry>> {
        // Lean: the size from the directory walk's stat, and one attribute
        // read by path per file (no open, no other attributes).
        let layout = &self.inner.layout;
        let mut all = Vec::new();
        for (id, meta) in layout.list(layout.base())? {
            let path = layout.cached(&id);
            let accessed = match xattr::get(&path, ACCESSED) {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("read xattr", &path, e)),
            };
            let last_accessed = match accessed.as_deref().map(decode_time) {
                Some(Ok(t)) => t,
                // Glance's files, or an undecodable value: the atime.
                _ => meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH),
            };
            all.push(LruEntry {
                id,
                size: meta.len(),
                last_accessed,
            });
        }
        all.sort_by(|a, b| {
            a.last_accessed
                .cmp(&b.last_accessed)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(all)
    }

    fn open_for_write(&self, id: &ImageId) -> Result<CacheWriter> {
        if self.is_cached(id)? {
            return Err(Error::AlreadyCached { id: id.clone() });
        }
        CacheWriter::create(
            &self.inner.layout,
            id,
            self.inner.clone(),
            self.inner.clock.clone(),
        )
    }

    fn open_for_read(&self, id: &ImageId) -> Result<Option<CachedImage>> {
        let Some((file, path)) = self.open_cached(id)? else {
            return Ok(None);
        };
        // Read-modify-write of the counter under an exclusive lock of the
        // file: no hit is lost to a concurrent reader, in any process.
        file.lock().ctx("lock", &path)?;
        let counted = (|| {
            let hits = decode(get(&file, &path, HITS)?, &path, HITS, decode_u64)?.unwrap_or(0);
            set(&file, &path, HITS, &encode_u64(hits.saturating_add(1)))?;
            set(
                &file,
                &path,
                ACCESSED,
                &encode_time(round_trip(self.inner.clock.now())),
            )
        })();
        file.unlock().ctx("unlock", &path)?;
        counted?;
        let info = self.info_of(id.clone(), &file, &path)?;
        CachedImage::new(file, path, info).map(Some)
    }

    fn image_size(&self, id: &ImageId) -> Result<Option<u64>> {
        Ok(self.cached_image(id)?.map(|i| i.size))
    }

    fn recover(&self) -> Result<RecoveryReport> {
        let layout = &self.inner.layout;
        let mut report = RecoveryReport::default();
        // The metadata travels with the file, so nothing can be orphaned
        // the way a database row can; what remains is files whose
        // attributes do not decode, and files no cache has seen yet.
        for (id, _) in layout.list(layout.base())? {
            let Some((file, path)) = self.open_cached(&id)? else {
                continue;
            };
            match self.info_of(id.clone(), &file, &path) {
                Ok(_) => {
                    if get(&file, &path, HITS)?.is_none() && get(&file, &path, CRC32)?.is_none() {
                        // Neither Glance nor imgcache wrote it: adopt it (for
                        // Glance too), unverified until scrubbed.
                        set(&file, &path, HITS, b"0")?;
                        report.adopted.push(id);
                    }
                }
                Err(Error::CorruptMetadata { detail, .. }) => {
                    drop(file);
                    if self.quarantine(&id, &format!("corrupt metadata: {detail}"))? {
                        report.quarantined.push(id);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        report.stalled = layout.stalled()?;
        Ok(report)
    }

    fn quarantine(&self, id: &ImageId, reason: &str) -> Result<bool> {
        let Some((file, path)) = self.open_cached(id)? else {
            return Ok(false);
        };
        set(&file, &path, ERROR, reason.as_bytes())?;
        set(
            &file,
            &path,
            INVALIDATED,
            &encode_time(round_trip(self.inner.clock.now())),
        )?;
        drop(file);
        let moved = self.inner.layout.quarantine(id)?;
        if moved {
            log::error!("imgcache: quarantined {id}: {reason}");
        }
        Ok(moved)
    }

    fn set_crc32(&self, id: &ImageId, crc32: u32) -> Result<()> {
        let Some((file, path)) = self.open_cached(id)? else {
            return Ok(());
        };
        let len = file.metadata().ctx("stat", &path)?.len();
        set(&file, &path, CRC32, &encode_crc(crc32))?;
        set(&file, &path, SIZE, &encode_u64(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
