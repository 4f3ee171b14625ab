//! [`CacheOptions`]: Glance's cache settings, with Glance's names and
//! defaults.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::id::DEFAULT_SQLITE_DB;

/// Glance's default `image_cache_max_size`: 10 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;

/// Glance's default `image_cache_stall_time`: one day.
pub const DEFAULT_STALL_TIME: Duration = Duration::from_secs(86_400);

/// Where a cache keeps its metadata (Glance's `image_cache_driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DriverKind {
    /// A SQLite database in the cache directory ([`crate::SqliteDriver`]).
    #[default]
    Sqlite,
    /// Extended attributes on the cached files ([`crate::XattrDriver`]).
    Xattr,
}

impl DriverKind {
    /// The name Glance's configuration uses: `sqlite` or `xattr`.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Sqlite => "sqlite",
            DriverKind::Xattr => "xattr",
        }
    }
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DriverKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sqlite" => Ok(DriverKind::Sqlite),
            "xattr" => Ok(DriverKind::Xattr),
            other => Err(Error::Config(format!(
                "unknown image_cache_driver {other:?} (expected \"sqlite\" or \"xattr\")"
            ))),
        }
    }
}

/// The settings of a cache, named after Glance's configuration keys.
///
/// ```
/// use imgcache::{CacheOptions, DriverKind};
/// use std::time::Duration;
/// let dir = tempfile::tempdir()?;
/// let cache = CacheOptions::new(dir.path())
///     .max_size(512 << 20)
///     .stall_time(Duration::from_secs(3600))
///     .driver(DriverKind::Sqlite)
///     .open()?;
/// assert_eq!(cache.options().image_cache_max_size(), 512 << 20);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct CacheOptions {
    dir: PathBuf,
    max_size: u64,
    stall_time: Duration,
    driver: DriverKind,
    sqlite_db: PathBuf,
    fallback_to_sqlite: bool,
    finish_abandoned_fills: bool,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for CacheOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheOptions")
            .field("image_cache_dir", &self.dir)
            .field("image_cache_max_size", &self.max_size)
            .field("image_cache_stall_time", &self.stall_time)
            .field("image_cache_driver", &self.driver)
            .field("image_cache_sqlite_db", &self.sqlite_db)
            .field("fallback_to_sqlite", &self.fallback_to_sqlite)
            .field("finish_abandoned_fills", &self.finish_abandoned_fills)
            .field("clock", &self.clock)
            .finish()
    }
}

impl CacheOptions {
    /// Options for a cache in `image_cache_dir`, with Glance's defaults:
    /// 10 GiB max size, a stall time of 86 400 s, the sqlite driver with
    /// `cache.db`, the system clock.
    pub fn new(image_cache_dir: impl Into<PathBuf>) -> Self {
        CacheOptions {
            dir: image_cache_dir.into(),
            max_size: DEFAULT_MAX_SIZE,
            stall_time: DEFAULT_STALL_TIME,
            driver: DriverKind::Sqlite,
            sqlite_db: PathBuf::from(DEFAULT_SQLITE_DB),
            fallback_to_sqlite: false,
            finish_abandoned_fills: false,
            clock: Arc::new(SystemClock),
        }
    }

    /// Sets `image_cache_max_size`, in bytes: the pruner's target.
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes;
        self
    }

    /// Sets `image_cache_stall_time`: how old an incomplete file must be
    /// before `clean` deletes it.
    pub fn stall_time(mut self, d: Duration) -> Self {
        self.stall_time = d;
        self
    }

    /// Sets `image_cache_driver`.
    pub fn driver(mut self, kind: DriverKind) -> Self {
        self.driver = kind;
        self
    }

    /// Sets `image_cache_sqlite_db`: the database file, relative to the cache
    /// directory unless absolute.
    pub fn sqlite_db(mut self, path: impl Into<PathBuf>) -> Self {
        self.sqlite_db = path.into();
        self
    }

    /// When the `xattr` driver is asked for but the file system has no user
    /// extended attributes, open the `sqlite` driver instead (and log a
    /// warning) rather than failing. Off by default.
    pub fn fallback_to_sqlite(mut self, yes: bool) -> Self {
        self.fallback_to_sqlite = yes;
        self
    }

    /// When a caller stops reading a caching stream before its end, finish
    /// the fill in the background anyway (a client that disconnects does
    /// not waste the download for the next one). Off by default, as in
    /// Glance: the partial file goes to `invalid/`. Fills that other
    /// readers follow are always finished.
    pub fn finish_abandoned_fills(mut self, yes: bool) -> Self {
        self.finish_abandoned_fills = yes;
        self
    }

    /// Whether abandoned fills are finished in the background.
    pub fn finishes_abandoned_fills(&self) -> bool {
        self.finish_abandoned_fills
    }

    /// Sets the clock the cache reads time from.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Opens (creating if needed) the cache these options describe.
    pub fn open(self) -> Result<crate::ImageCache> {
        crate::ImageCache::open(self)
    }

    /// `image_cache_dir`.
    pub fn image_cache_dir(&self) -> &Path {
        &self.dir
    }

    /// `image_cache_max_size`, in bytes.
    pub fn image_cache_max_size(&self) -> u64 {
        self.max_size
    }

    /// `image_cache_stall_time`.
    pub fn image_cache_stall_time(&self) -> Duration {
        self.stall_time
    }

    /// `image_cache_driver`.
    pub fn image_cache_driver(&self) -> DriverKind {
        self.driver
    }

    /// `image_cache_sqlite_db`, as given (relative to the cache directory
    /// unless absolute).
    pub fn image_cache_sqlite_db(&self) -> &Path {
        &self.sqlite_db
    }

    /// The database file's full path.
    pub fn sqlite_db_path(&self) -> PathBuf {
        self.dir.join(&self.sqlite_db)
    }

    /// Whether an `xattr` cache falls back to `sqlite` where it must.
    pub fn falls_back_to_sqlite(&self) -> bool {
        self.fallback_to_sqlite
    }

    /// The clock.
    pub fn clock_ref(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glance_defaults() {
        let o = CacheOptions::new("/var/lib/glance/image-cache");
        assert_eq!(o.image_cache_max_size(), 10 * 1024 * 1024 * 1024);
        assert_eq!(o.image_cache_stall_time(), Duration::from_secs(86_400));
        assert_eq!(o.image_cache_driver(), DriverKind::Sqlite);
        assert_eq!(o.image_cache_sqlite_db(), Path::new("cache.db"));
        assert_eq!(
            o.sqlite_db_path(),
            Path::new("/var/lib/glance/image-cache/cache.db")
        );
        assert!(!o.falls_back_to_sqlite());
    }

    #[test]
    fn absolute_db_path_is_kept() {
        let o = CacheOptions::new("/cache").sqlite_db("/meta/x.db");
        assert_eq!(o.sqlite_db_path(), Path::new("/meta/x.db"));
    }

    #[test]
    fn driver_names() {
        assert_eq!("sqlite".parse::<DriverKind>().unwrap(), DriverKind::Sqlite);
        assert_eq!(" XATTR ".parse::<DriverKind>().unwrap(), DriverKind::Xattr);
        let e = "redis".parse::<DriverKind>().unwrap_err().to_string();
        assert!(e.contains("redis"), "{e}");
        assert_eq!(DriverKind::Xattr.to_string(), "xattr");
    }
}
