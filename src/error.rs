//! Errors: one enum, each variant saying what went wrong and where.

use std::io;
use std::path::{Path, PathBuf};

use crate::id::{IdError, ImageId};

/// Every error `imgcache` returns.
///
/// Each variant carries the image id or the path involved, so that a message
/// never arrives without saying *which* image or file it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The string is not acceptable as an image id.
    #[error("invalid image id {input:?}: {reason}")]
    InvalidId {
        /// The refused input (lossily converted to UTF-8 where it was not).
        input: String,
        /// Why it was refused.
        reason: IdError,
    },

    /// Another writer is filling this image right now (`incomplete/<id>`
    /// exists).
    #[error("image {id} is already being cached")]
    AlreadyBeingCached {
        /// The image.
        id: ImageId,
    },

    /// The image is already cached; cached images are immutable, so delete it
    /// first to replace it.
    #[error("image {id} is already cached")]
    AlreadyCached {
        /// The image.
        id: ImageId,
    },

    /// An I/O operation on a cache file or folder failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`"create"`, `"rename"`, `"fsync"`, …).
        op: &'static str,
        /// The file or folder it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The metadata store failed (a database error, the database
    /// unreachable or busy).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The file system of the cache directory does not support user extended
    /// attributes, which the `xattr` driver needs.
    #[error(
        "the file system holding {dir} does not support user extended attributes ({source}); \
         mount it with user_xattr (ext3/ext4: add `user_xattr` to its fstab options), \
         move the cache to a file system that has them, or use the sqlite driver"
    )]
    XattrUnsupported {
        /// The cache directory.
        dir: PathBuf,
        /// The error the probe got.
        #[source]
        source: io::Error,
    },

    /// A cached file does not hold what was committed (truncated, extended
    /// or overwritten behind the cache's back). The entry has been moved to
    /// `invalid/` with this reason; the next request for it is a miss.
    #[error("image {id} is corrupt ({path}): {detail}")]
    Corrupt {
        /// The image.
        id: ImageId,
        /// The file as it was found.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// The metadata database is not a usable cache database (garbage bytes,
    /// another program's schema). [`crate::ImageCache::rebuild`] moves it
    /// aside and recreates the metadata from the cached files.
    #[error(
        "{path} is not a usable image cache database: {detail}; \
         rebuild it from the cached files with ImageCache::rebuild (it is moved aside, not deleted)"
    )]
    BadDatabase {
        /// The database file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// A checksum string is malformed.
    #[error("invalid checksum {input:?}: {detail}")]
    InvalidChecksum {
        /// The refused input.
        input: String,
        /// What was wrong.
        detail: String,
    },

    /// The bytes of an image did not hash to what the backend said they
    /// would. Nothing was cached; what was written went to `invalid/`.
    #[error("image {id}: checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The image.
        id: ImageId,
        /// What the backend declared.
        expected: crate::checksum::Checksum,
        /// What the bytes hash to.
        actual: crate::checksum::Checksum,
    },

    /// The backend stream of an image failed (opening or reading it).
    #[error("image {id}: source failed: {source}")]
    Source {
        /// The image.
        id: ImageId,
        /// The error opening it gave.
        #[source]
        source: io::Error,
    },

    /// The origin has no such image (HTTP 404, no such file).
    #[error("image {id} not found at {origin}")]
    OriginNotFound {
        /// The image.
        id: ImageId,
        /// The origin (a directory, a URL).
        origin: String,
    },

    /// The origin refused or failed (an HTTP error status, a timeout, a
    /// malformed checksum beside the file).
    #[error("image {id} from {origin}: {detail}")]
    Origin {
        /// The image.
        id: ImageId,
        /// The origin (a directory, a URL).
        origin: String,
        /// What went wrong.
        detail: String,
    },

    /// The fill this reader was following failed; the image is not cached.
    #[error("image {id}: the fill being followed failed: {reason}")]
    FillFailed {
        /// The image.
        id: ImageId,
        /// Why the fill failed.
        reason: String,
    },

    /// Admission refused to cache the image: it would not fit under the
    /// hard limit, or would leave the file system with less free space
    /// than asked for, even with the least recently used images evicted.
    /// Serve it from the origin, uncached.
    #[error("image {id}: no room in the cache: {detail}")]
    NoRoom {
        /// The image.
        id: ImageId,
        /// Which limit, and by how much.
        detail: String,
    },

    /// The server runs as many fills as it may: ask again shortly.
    #[error("image {id}: busy: {detail}")]
    Busy {
        /// The image.
        id: ImageId,
        /// Which limit.
        detail: String,
    },

    /// A byte range outside the image.
    #[error("image {id}: range {start}..{end} is not within its {size} bytes")]
    RangeNotSatisfiable {
        /// The image.
        id: ImageId,
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// The image's size.
        size: u64,
    },

    /// Stored metadata could not be decoded.
    #[error("corrupt metadata in {path}: {detail}")]
    CorruptMetadata {
        /// The file (or database) holding it.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// The options given cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether this is a fault of the cache itself — a corrupt entry or
    /// database, the metadata store unreachable, the cache's own files
    /// unreadable or unwritable (a full disk), no room to cache — rather
    /// than of the request (a bad id), of the origin (not found, refused,
    /// wrong bytes) or of the configuration. An embedding server that gets
    /// one should serve the client from the origin instead (DESIGN,
    /// invariant 6): the cache is transparent.
    pub fn is_cache_fault(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::Store(_)
            | Error::Corrupt { .. }
            | Error::CorruptMetadata { .. }
            | Error::BadDatabase { .. }
            | Error::XattrUnsupported { .. }
            | Error::NoRoom { .. }
            | Error::AlreadyBeingCached { .. }
            | Error::AlreadyCached { .. } => true,
            Error::InvalidId { .. }
            | Error::InvalidChecksum { .. }
            | Error::ChecksumMismatch { .. }
            | Error::Source { .. }
            | Error::OriginNotFound { .. }
            | Error::Origin { .. }
            | Error::FillFailed { .. }
            | Error::Busy { .. }
            | Error::RangeNotSatisfiable { .. }
            | Error::Config(_) => false,
        }
    }

    /// Wraps an [`io::Error`] with the operation and path.
    pub(crate) fn io(op: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// Wraps this error in an [`io::Error`] (for `Read` implementations),
    /// from which [`Error::from_io`] gets it back.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            Error::ChecksumMismatch { .. } | Error::Corrupt { .. } => io::ErrorKind::InvalidData,
            Error::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// Takes back the [`Error`] that [`Error::into_io`] wrapped, or wraps a
    /// plain I/O error of image `id`'s source as [`Error::Source`].
    pub fn from_io_of(id: &ImageId, e: io::Error) -> Error {
        if Error::from_io(&e).is_some() {
            if let Some(inner) = e.into_inner() {
                if let Ok(err) = inner.downcast::<Error>() {
                    return *err;
                }
            }
            return Error::Source {
                id: id.clone(),
                source: io::Error::other("lost error"),
            };
        }
        Error::Source {
            id: id.clone(),
            source: e,
        }
    }

    /// The [`Error`] inside an [`io::Error`] returned by one of this
    /// crate's readers, if there is one.
    pub fn from_io(e: &io::Error) -> Option<&Error> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
    }

    /// The underlying I/O error kind, if this error came from the file system.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } | Error::XattrUnsupported { source, .. } => {
                Some(source.kind())
            }
            _ => None,
        }
    }
}

/// Attaches an operation and a path to an [`io::Result`].
pub(crate) trait IoContext<T> {
    /// Maps the error to [`Error::Io`] with `op` and `path`.
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

/// What kind of failure a metadata store reported, for callers that decide
/// what to do about it (retry a busy database, report a full disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Another process holds a lock longer than the store waits.
    Busy,
    /// The store cannot be reached or opened (a database down, a file that
    /// cannot be opened or written).
    Unavailable,
    /// The store's files are not a database, or a damaged one.
    Corrupt,
    /// The disk under the store is full.
    NoSpace,
    /// Anything else.
    Other,
}

/// A metadata store's failure: which store, where, what kind, and the
/// underlying error as its source (the store's client library's own type,
/// which never appears in this crate's signatures).
#[derive(Debug, thiserror::Error)]
#[error("{store} database {location}: {}", chain(source.as_ref()))]
pub struct StoreError {
    kind: StoreErrorKind,
    store: &'static str,
    location: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// A failure of `store` (its name, e.g. `"sqlite"`) at `location` (a
    /// file, or a database address without its password).
    pub fn new(
        kind: StoreErrorKind,
        store: &'static str,
        location: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            kind,
            store,
            location: location.into(),
            source: source.into(),
        }
    }

    /// What kind of failure it was.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The store's name.
    pub fn store(&self) -> &'static str {
        self.store
    }

    /// Where the store is (a file path, a database address).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The underlying error's message.
    pub fn detail(&self) -> String {
        self.source.to_string()
    }
}

/// An error and its causes, `outer: inner: innermost` (a client library's
/// "error connecting to server" says little without its OS cause).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
