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
pub(crate) const DEFAULT_MAX_SIZE: u64 = CacheOptions::DEFAULT_MAX_SIZE;

/// Glance's default `image_cache_stall_time`: one day.
pub(crate) const DEFAULT_STALL_TIME: Duration = CacheOptions::DEFAULT_STALL_TIME;

/// How the SQLite store journals its writes (see the SQLite store's docs,
/// `imgcache::drivers::SqliteDriver`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqliteJournal {
    /// Glance's own mode (the default): a rollback journal that exists only
    /// while a write is under way, so Glance's drivers, which take every
    /// regular file beside the database for an image, see only images.
    #[default]
    Delete,
    /// SQLite's write-ahead log, for caches Glance never touches: readers
    /// never wait for a writer, and a power cut never damages the database;
    /// but `cache.db-wal` and `cache.db-shm` sit in the base directory while
    /// the database is open, where Glance would count and delete them.
    Wal,
}

/// Where a cache keeps its metadata (Glance's `image_cache_driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DriverKind {
    /// A SQLite database in the cache directory ([`crate::drivers::SqliteDriver`]).
    #[default]
    Sqlite,
    /// Extended attributes on the cached files ([`crate::drivers::XattrDriver`]).
    Xattr,
    /// Glance's `centralized_db`: metadata of many nodes in one PostgreSQL
    /// database (feature `postgres`); needs
    /// [`CacheOptions::database_url`] and [`CacheOptions::node_url`].
    CentralizedDb,
}

impl DriverKind {
    /// The name Glance's configuration uses: `sqlite` or `xattr`.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Sqlite => "sqlite",
            DriverKind::Xattr => "xattr",
            DriverKind::CentralizedDb => "centralized_db",
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
            "centralized_db" | "postgres" | "postgresql" => Ok(DriverKind::CentralizedDb),
            other => Err(Error::Config(format!(
                "unknown image_cache_driver {other:?} (expected \"sqlite\", \"xattr\" or \"centralized_db\")"
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
    database_url: Option<String>,
    node_url: Option<String>,
    migrate_sqlite: bool,
    create_tables: bool,
    read_only: bool,
    sqlite_journal: SqliteJournal,
    hard_limit: Option<u64>,
    min_free: Option<MinFree>,
    durability: Durability,
    open_files: usize,
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
            .field("database_url", &self.database_url_redacted())
            .field("worker_self_reference_url", &self.node_url)
            .field("migrate_sqlite", &self.migrate_sqlite)
            .field("create_tables", &self.create_tables)
            .field("read_only", &self.read_only)
            .field("sqlite_journal", &self.sqlite_journal)
            .field("hard_limit", &self.hard_limit)
            .field("min_free", &self.min_free)
            .field("durability", &self.durability)
            .field("open_files", &self.open_files)
            .field("clock", &self.clock)
            .finish()
    }
}

impl CacheOptions {
    /// Glance's default `image_cache_max_size`: 10 GiB.
    pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;
    /// Glance's default `image_cache_stall_time`: a day.
    pub const DEFAULT_STALL_TIME: Duration = Duration::from_secs(86_400);
    /// Glance's default `image_cache_sqlite_db`.
    pub const DEFAULT_SQLITE_DB: &'static str = "cache.db";
    /// Descriptors of hot cached files kept open by default
    /// ([`CacheOptions::open_files`]).
    pub const DEFAULT_OPEN_FILES: usize = 256;

    /// Parses a size as the configuration takes it: bytes, or a number with
    /// a unit (`10GiB`, `500MB`, `1.5KiB`; case and spaces do not matter).
    pub fn parse_size(s: &str) -> Result<u64, String> {
        parse_size(s)
    }

    /// `url` with any password replaced by `***` (`scheme://user:***@host…`,
    /// or libpq's `password=***`): the one form every message uses.
    pub fn redact_url(url: &str) -> String {
        redact_url(url)
    }

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
            database_url: None,
            node_url: None,
            migrate_sqlite: false,
            create_tables: false,
            read_only: false,
            sqlite_journal: SqliteJournal::Delete,
            hard_limit: None,
            min_free: None,
            durability: Durability::default(),
            open_files: Self::DEFAULT_OPEN_FILES,
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

    /// The PostgreSQL database of the `centralized_db` driver
    /// (`postgres://user:password@host:port/dbname`; Glance's `[database]
    /// connection`). It never appears in logs, errors or `Debug` output
    /// with its password.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// This node's URL, naming its rows in a shared database (Glance's
    /// `worker_self_reference_url`); required by `centralized_db`.
    pub fn node_url(mut self, url: impl Into<String>) -> Self {
        self.node_url = Some(url.into());
        self
    }

    /// With `centralized_db`: at open, move this node's rows from the
    /// local SQLite database (`image_cache_sqlite_db`) into the shared one,
    /// as Glance does at start-up ([`crate::ImageCache::migrate_from_sqlite`]).
    pub fn migrate_sqlite(mut self, yes: bool) -> Self {
        self.migrate_sqlite = yes;
        self
    }

    /// With `centralized_db`, where the database has no Glance cache tables
    /// (`node_reference`, `cached_images`): create them, as Glance's
    /// migration would, for a fleet without Glance. Off by default: the
    /// open is refused with a message naming `glance-manage db_sync`,
    /// because Glance's own migration stops at tables someone else created.
    pub fn create_tables(mut self, yes: bool) -> Self {
        self.create_tables = yes;
        self
    }

    /// The SQLite store's journal mode: Glance's `DELETE` (the default),
    /// or WAL for a cache Glance never touches (see
    /// [`SqliteJournal`]).
    pub fn sqlite_journal(mut self, journal: SqliteJournal) -> Self {
        self.sqlite_journal = journal;
        self
    }

    /// The SQLite store's journal mode ([`CacheOptions::sqlite_journal`]).
    pub fn sqlite_journal_mode(&self) -> SqliteJournal {
        self.sqlite_journal
    }

    /// Opens the cache for inspection by a user who may read it but not
    /// write it (a monitoring account): nothing is created, recovered,
    /// quarantined or recorded (no session mark, no checkpoint, no hit
    /// counts; a SQLite database is opened read-only, as Glance wrote it).
    /// Listing, sizes, the queue, the invalid files and `verify` work;
    /// anything that writes fails with a typed error.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Whether the cache is opened for reading only ([`CacheOptions::read_only`]).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a missing Glance schema is created ([`CacheOptions::create_tables`]).
    pub fn creates_tables(&self) -> bool {
        self.create_tables
    }

    /// The database URL, if set (with its password: do not print it; see
    /// [`CacheOptions::database_url_redacted`]).
    pub fn database_url_ref(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// The database URL without its password, for messages.
    pub fn database_url_redacted(&self) -> Option<String> {
        self.database_url.as_deref().map(redact_url)
    }

    /// This node's URL, if set.
    pub fn node_url_ref(&self) -> Option<&str> {
        self.node_url.as_deref()
    }

    /// Whether to migrate the local SQLite rows at open.
    pub fn migrates_sqlite(&self) -> bool {
        self.migrate_sqlite
    }

    /// Sets a hard limit on the cache's bytes, fills in progress counted at
    /// the size their origins announced: a fill that would go past it, even
    /// with every other image evicted, is refused ([`crate::Error::NoRoom`])
    /// and served uncached. Default none: `image_cache_max_size` alone,
    /// which the pruner enforces after the fact, as Glance does.
    pub fn hard_limit(mut self, bytes: Option<u64>) -> Self {
        self.hard_limit = bytes;
        self
    }

    /// The hard limit, if any.
    pub fn hard_limit_bytes(&self) -> Option<u64> {
        self.hard_limit
    }

    /// Sets the free space to keep on the cache's file system (nginx's
    /// `min_free`): before a fill starts, least recently used images are
    /// evicted until the fill fits above it; a fill that cannot is refused
    /// ([`crate::Error::NoRoom`]) and served uncached. Default none.
    pub fn min_free(mut self, min_free: Option<MinFree>) -> Self {
        self.min_free = min_free;
        self
    }

    /// The free space kept, if any.
    pub fn min_free_space(&self) -> Option<MinFree> {
        self.min_free
    }

    /// Sets how commits are made durable (default [`Durability::group`]:
    /// see the crate docs' *Durability* section).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How commits are made durable.
    pub fn durability_mode(&self) -> Durability {
        self.durability
    }

    /// Keeps up to `n` descriptors of hot cached files open (default
    /// [`CacheOptions::DEFAULT_OPEN_FILES`]; 0 keeps none), so that a hit
    /// costs no `open(2)` — nginx's `open_file_cache`, without its window
    /// of staleness: a kept descriptor serves only while one `fstat(2)`
    /// per hit shows its file still linked, the same size and modification
    /// time, and its change time (which every rename and change of links
    /// sets) unchanged since the path was last confirmed to name it — the
    /// path itself is asked (`lstat`) while that time is too recent to
    /// trust. So a file deleted, pruned, quarantined or replaced, by this
    /// process or another (Glance included), is opened afresh; the cache's
    /// own changes forget the id at once. A change above the file (the base
    /// directory renamed or remounted) is seen within a second, when the
    /// sweep asks every path. Not for network file systems, whose `fstat`
    /// answers from an attribute cache: set 0 there. The least recently
    /// used goes when a new one comes; descriptors of files removed by
    /// other processes, and those idle for a minute, are closed within a
    /// second of the next hit, and at every prune, clean and admission.
    /// These descriptors count against the process's limit.
    pub fn open_files(mut self, n: usize) -> Self {
        self.open_files = n;
        self
    }

    /// How many descriptors of hot cached files may be kept open.
    pub fn open_files_kept(&self) -> usize {
        self.open_files
    }
}

/// How a commit is made durable. Either way, no entry is ever served with
/// bytes other than those committed, after a crash of the process or of
/// the machine; the modes differ in what a power cut may lose (entries
/// that are then fetched again) and in what a commit costs. See the crate
/// docs' *Durability* section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Each commit is durable when it returns: the file is `fsync`ed
    /// before its rename, the directory after it.
    Immediate,
    /// Commits do not sync one by one. A background checkpoint makes
    /// everything committed so far durable at once (one `syncfs(2)` of
    /// the cache's file system; `sync(2)` where there is none) at most
    /// `interval` after a commit, or as soon as `bytes` have been
    /// committed since the last one, and records that watermark in the
    /// store. After an unclean shutdown, entries committed after the last
    /// watermark are read whole and checked against their CRC-32 when the
    /// cache is next opened, before anything is served; a torn one is
    /// moved to `invalid/`.
    Group {
        /// Longest time between a commit and the checkpoint that covers it.
        interval: std::time::Duration,
        /// Committed bytes that bring the checkpoint forward.
        bytes: u64,
    },
}

impl Durability {
    /// Group durability with the defaults: a checkpoint at most 1 s after a
    /// commit, or after 256 MiB committed.
    pub const fn group() -> Self {
        Durability::Group {
            interval: std::time::Duration::from_secs(1),
            bytes: 256 << 20,
        }
    }
}

impl Default for Durability {
    /// [`Durability::group`].
    fn default() -> Self {
        Durability::group()
    }
}

/// Free space to keep on a file system: a share of its size, or bytes.
/// Parses from `5%` or a size (`2GiB`, `500MB`, `1048576`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// Per cent of the file system's size (0 to 100).
    Percent(f64),
    /// Bytes.
    Bytes(u64),
}

impl MinFree {
    /// The bytes to keep free on a file system of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => ((total as f64) * p / 100.0).ceil() as u64,
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl std::str::FromStr for MinFree {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| crate::Error::Config(format!("{s:?} is not a percentage")))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(crate::Error::Config(format!(
                    "{s:?}: a percentage is between 0 and 100"
                )));
            }
            return Ok(MinFree::Percent(v));
        }
        parse_size(t)
            .map(MinFree::Bytes)
            .map_err(crate::Error::Config)
    }
}

/// Parses a size: bytes, or a number with a unit (K/KB/M/MB/G/GB/T/TB in
/// powers of 1000, KiB/MiB/GiB/TiB in powers of 1024; case-insensitive).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let factor: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size (try 10GiB or 500MB)")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 10GiB or 500MB)"))?;
    let bytes = n * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// `url` with any password replaced by `***` (`scheme://user:***@host…`).
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // libpq's `key=value` form: hide what follows `password=`.
        return url
            .split(' ')
            .map(|w| match w.split_once('=') {
                Some((k, _)) if k.trim().eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => w.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (auth, host) = match rest.rfind('@') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{host}"),
        None => url.to_owned(),
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
    fn the_default_database_name_is_the_one_ids_may_not_take() {
        assert_eq!(CacheOptions::DEFAULT_SQLITE_DB, DEFAULT_SQLITE_DB);
    }

    #[test]
    fn absolute_db_path_is_kept() {
        let o = CacheOptions::new("/cache").sqlite_db("/meta/x.db");
        assert_eq!(o.sqlite_db_path(), Path::new("/meta/x.db"));
    }

    #[test]
    fn database_passwords_never_show() {
        let o = CacheOptions::new("/c").database_url("postgres://glance:s3cret@db:5432/glance");
        assert_eq!(
            o.database_url_redacted().as_deref(),
            Some("postgres://glance:***@db:5432/glance")
        );
        assert!(!format!("{o:?}").contains("s3cret"));
        assert_eq!(redact_url("postgres://db/glance"), "postgres://db/glance");
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(
            redact_url("postgres://u:p:q@a@db/x"),
            "postgres://u:***@db/x"
        );
    }

    #[test]
    fn min_free_values() {
        assert_eq!("5%".parse::<MinFree>().unwrap(), MinFree::Percent(5.0));
        assert_eq!("2KiB".parse::<MinFree>().unwrap(), MinFree::Bytes(2048));
        assert!("101%".parse::<MinFree>().is_err());
        assert!("-1%".parse::<MinFree>().is_err());
        assert!("lots".parse::<MinFree>().is_err());
        assert_eq!(MinFree::Percent(5.0).bytes_of(1000), 50);
        assert_eq!(MinFree::Bytes(7).bytes_of(1000), 7);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("").is_err());
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
