//! The row types every layer shares: what is known of a cached image, of a
//! failed write, and of an entry's file when the file layer hands it to a
//! store. They use nothing above the ground floor (`id`, `error`, `clock`).

use std::fs::{File, Metadata};
use std::path::Path;
use std::time::SystemTime;

use crate::error::Result;
use crate::id::ImageId;

/// What the cache knows of one cached image.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CachedImageInfo {
    /// The image.
    pub id: ImageId,
    /// Its size in bytes.
    pub size: u64,
    /// How many times it was opened for reading since it was cached.
    pub hits: u64,
    /// When it was last opened for reading (or cached, if never read).
    /// Serialized as RFC 3339 (UTC), as are all times.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::clock::serde_time"))]
    pub last_accessed: SystemTime,
    /// When it was cached.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::clock::serde_time"))]
    pub last_modified: SystemTime,
    /// The checksum the writer declared (Glance's `checksum` column), if any.
    pub checksum: Option<String>,
    /// The CRC-32 of its bytes, computed while they were written; `None` for
    /// entries written by another tool (Glance), which are unverified.
    /// Serialized as 8 hex digits.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::clock::serde_crc"))]
    pub crc32: Option<u32>,
}

impl CachedImageInfo {
    /// A fresh entry: `size` bytes committed at `at`, never read.
    pub fn new(id: ImageId, size: u64, at: SystemTime) -> Self {
        CachedImageInfo {
            id,
            size,
            hits: 0,
            last_accessed: at,
            last_modified: at,
            checksum: None,
            crc32: None,
        }
    }

    /// With the CRC-32 of its bytes.
    pub fn with_crc32(mut self, crc32: Option<u32>) -> Self {
        self.crc32 = crc32;
        self
    }

    /// With the checksum the writer declared.
    pub fn with_checksum(mut self, checksum: Option<String>) -> Self {
        self.checksum = checksum;
        self
    }
}

/// One entry of the least-recently-accessed order.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LruEntry {
    /// The image.
    pub id: ImageId,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last accessed.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::clock::serde_time"))]
    pub last_accessed: SystemTime,
}

impl From<CachedImageInfo> for LruEntry {
    fn from(i: CachedImageInfo) -> Self {
        LruEntry {
            id: i.id,
            size: i.size,
            last_accessed: i.last_accessed,
        }
    }
}

/// A file in `invalid/`: a write that failed or was abandoned, kept for
/// debugging until the next `clean`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct InvalidImageInfo {
    /// The image.
    pub id: ImageId,
    /// How many bytes had been written.
    pub size: u64,
    /// Why it was invalidated, if recorded.
    pub reason: Option<String>,
    /// When it was invalidated, if recorded.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "crate::clock::serde_opt_time")
    )]
    pub invalidated_at: Option<SystemTime>,
}

/// Why and when an entry was invalidated: a write that failed or was
/// abandoned, or a cached file found corrupt.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Invalidation {
    /// The image.
    pub id: ImageId,
    /// Bytes written (or on disk).
    pub size: u64,
    /// Why.
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

impl Invalidation {
    /// `id` (`size` bytes) invalidated at `at` for `reason`.
    pub fn new(id: ImageId, size: u64, reason: impl Into<String>, at: SystemTime) -> Self {
        Invalidation {
            id,
            size,
            reason: reason.into(),
            at,
        }
    }
}

/// One entry a store holds, as [`crate::drivers::CacheDriver::scan`] reports it for
/// recovery.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Scanned {
    /// A well-formed entry.
    Entry(CachedImageInfo),
    /// An entry whose metadata cannot be decoded.
    Corrupt {
        /// The image.
        id: ImageId,
        /// What is wrong with it.
        detail: String,
    },
}

/// An entry's file, as the file layer hands it to a store.
///
/// Stores that keep metadata apart from the files (SQLite, a shared
/// database) ignore it. A store that keeps metadata *on* the file (the
/// xattr store) reads and writes it through [`OnDisk::file`] where the file
/// layer has opened the file, and through [`OnDisk::path`] where a walk only
/// looked at the directory. The path is the file's as the file layer found
/// it: a store never builds one.
#[derive(Debug, Clone, Copy)]
pub struct OnDisk<'a> {
    path: &'a Path,
    file: Option<&'a File>,
    meta: &'a Metadata,
    known: Option<&'a CachedImageInfo>,
}

impl<'a> OnDisk<'a> {
    /// The file at `path`, open as `file` if the file layer opened it, with
    /// its metadata as of the open or the walk.
    pub fn new(path: &'a Path, file: Option<&'a File>, meta: &'a Metadata) -> Self {
        OnDisk {
            path,
            file,
            meta,
            known: None,
        }
    }

    /// The same file, with the entry this store gave for it at an earlier
    /// hit: the file layer kept the file open since and vouches that it is
    /// still the cached file (same inode, still linked at the same place,
    /// unchanged).
    pub fn with_known(mut self, entry: &'a CachedImageInfo) -> Self {
        self.known = Some(entry);
        self
    }

    /// The entry the store gave for this very file at an earlier hit, if
    /// the file layer vouches for it ([`OnDisk::with_known`]): a store may
    /// count a hit against it without reading its own.
    pub fn known(&self) -> Option<&'a CachedImageInfo> {
        self.known
    }

    /// Where the file is (for stores that work on paths, and for messages).
    pub fn path(&self) -> &'a Path {
        self.path
    }

    /// The open file, if the file layer opened it.
    pub fn file(&self) -> Option<&'a File> {
        self.file
    }

    /// Its metadata as of the open or the walk.
    pub fn metadata(&self) -> &'a Metadata {
        self.meta
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.meta.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.meta.len() == 0
    }

    /// Its modification time (the epoch where the system gives none).
    pub fn modified(&self) -> SystemTime {
        self.meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Its access time (the epoch where the system gives none).
    pub fn accessed(&self) -> SystemTime {
        self.meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Which file it is, as far as the file system tells: device, inode,
    /// size, and modification and change times to the nanosecond. A commit
    /// publishes a new file, so a store may remember what it knows of an
    /// entry for as long as the identity is the same (an inode number alone
    /// is reused at once by ext4 and XFS).
    pub fn identity(&self) -> [i64; 7] {
        use std::os::unix::fs::MetadataExt;
        let m = self.meta;
        [
            m.dev() as i64,
            m.ino() as i64,
            m.size() as i64,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ]
    }
}

/// One cached image of one node, in a store shared by many nodes.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct NodeImage {
    /// The node's URL (Glance's `worker_self_reference_url`).
    pub node: String,
    /// The image as that node cached it.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub image: CachedImageInfo,
}

/// The cached files, as the file layer shows them to a store that keeps its
/// metadata on them.
pub trait CachedFiles {
    /// Calls `f` for every cached file (ids that are the cache's own names
    /// are never among them). With `open`, each file is opened first
    /// ([`OnDisk::file`] is `Some`); otherwise only its directory entry is
    /// looked at. Files that vanish during the walk are passed over.
    fn each_cached(
        &self,
        open: bool,
        f: &mut dyn FnMut(&ImageId, OnDisk<'_>) -> Result<()>,
    ) -> Result<()>;
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;

    #[test]
    fn rows_serialize_as_the_cli_prints_them() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_250_000);
        let info = CachedImageInfo::new(ImageId::new("img").unwrap(), 42, at)
            .with_crc32(Some(0xbeef))
            .with_checksum(Some("abc".into()));
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "img",
                "size": 42,
                "hits": 0,
                "last_accessed": "2023-11-14T22:13:20.250000Z",
                "last_modified": "2023-11-14T22:13:20.250000Z",
                "checksum": "abc",
                "crc32": "0000beef",
            })
        );
        let id: ImageId = serde_json::from_str("\"img\"").unwrap();
        assert_eq!(id.as_str(), "img");
        // Deserializing validates, as ImageId::new does.
        assert!(serde_json::from_str::<ImageId>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<ImageId>("\"cache.db\"").is_err());
    }
}

/// How far a cache directory is known to be durable: what a checkpoint
/// (`syncfs` of the cache's file system, then this record, itself durable)
/// vouches for. See the crate docs' *Durability* section.
///
/// Entries committed at or after [`committed_before`](Self::committed_before)
/// are not trusted after an unclean shutdown: the next open reads them
/// whole and checks their CRC-32 before anything is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// Every entry whose commit time (`last_modified`, the cache's clock,
    /// taken after its last data write) is strictly earlier was on disk
    /// before this watermark was recorded.
    pub committed_before: SystemTime,
    /// The file system's own clock at the same moment (the change time of
    /// the cache's watermark file, touched before the sync): a cached file
    /// without metadata whose change time (its rename into place) is
    /// strictly earlier was on disk too, and may be adopted; a later one
    /// is moved to `invalid/`.
    pub changed_before: SystemTime,
}

impl Watermark {
    /// The pair as whole microseconds since the epoch (before the epoch is
    /// 0), as the stores keep it.
    pub(crate) fn to_micros(self) -> (i64, i64) {
        (micros(self.committed_before), micros(self.changed_before))
    }

    /// The inverse of [`Watermark::to_micros`].
    pub(crate) fn from_micros(committed: i64, changed: i64) -> Self {
        let at = |m: i64| {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(m).unwrap_or(0))
        };
        Watermark {
            committed_before: at(committed),
            changed_before: at(changed),
        }
    }
}

/// Whole microseconds since the epoch, rounded down (before it: 0).
pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
