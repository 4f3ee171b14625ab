//! Settings: flags, then environment variables (clap reads both), then a
//! Glance config file (its `[DEFAULT]` section, and `[database] connection`
//! when it is a PostgreSQL URL), then Glance's defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use imgcache::{CacheOptions, DriverKind};

use crate::Failure;

/// Where the cache is and how it is run; each setting also comes from an
/// environment variable, or from `--config`.
#[derive(Debug, Args)]
pub struct Settings {
    /// A Glance config file (glance-api.conf) to read image_cache_dir,
    /// image_cache_max_size, image_cache_stall_time, image_cache_driver and
    /// image_cache_sqlite_db from, in its [DEFAULT] section.
    #[arg(long, env = "IMGCACHE_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The cache directory (image_cache_dir).
    #[arg(long, env = "IMGCACHE_DIR", global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// The pruner's limit (image_cache_max_size): bytes, or with a unit
    /// (10GiB, 500MB). Default 10GiB.
    #[arg(long, env = "IMGCACHE_MAX_SIZE", global = true, value_name = "SIZE")]
    pub max_size: Option<String>,

    /// How old an incomplete file must be for `clean` to remove it
    /// (image_cache_stall_time): seconds, or 2h, 1day. Default 86400.
    #[arg(long, env = "IMGCACHE_STALL_TIME", global = true, value_name = "TIME")]
    pub stall_time: Option<String>,

    /// The metadata driver (image_cache_driver): sqlite, xattr, or
    /// centralized_db (alias postgres: one PostgreSQL database for many
    /// nodes; needs --database-url and --node-url).
    #[arg(long, env = "IMGCACHE_DRIVER", global = true, value_name = "NAME")]
    pub driver: Option<String>,

    /// The PostgreSQL database of the centralized_db driver
    /// (postgres://user:password@host:port/dbname; glance-api.conf's
    /// [database] connection). Its value is never printed.
    #[arg(
        long,
        env = "IMGCACHE_DATABASE_URL",
        hide_env_values = true,
        global = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

    /// This node's URL, naming its rows in the shared database
    /// (worker_self_reference_url); required by centralized_db.
    #[arg(long, env = "IMGCACHE_NODE_URL", global = true, value_name = "URL")]
    pub node_url: Option<String>,

    /// With centralized_db: move this node's rows from its local SQLite
    /// cache.db into the database when opening, as Glance does at start.
    #[arg(long, global = true)]
    pub migrate_sqlite: bool,

    /// Open the cache for reading only (list-cached, list-queued, stats,
    /// verify, nodes): nothing is recovered, quarantined or recorded. Taken
    /// by itself by those commands when this user cannot write the
    /// directory or its database.
    #[arg(long, global = true)]
    pub read_only: bool,

    /// With centralized_db, on a database without Glance's cache tables:
    /// create them (a fleet without Glance). Without it imgcache refuses,
    /// because Glance's `glance-manage db_sync` stops at tables someone
    /// else created: where Glance uses the database, run db_sync first.
    #[arg(long, env = "IMGCACHE_CREATE_TABLES", global = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub create_tables: bool,

    /// The SQLite database, relative to the cache directory
    /// (image_cache_sqlite_db). Default cache.db.
    #[arg(long, env = "IMGCACHE_SQLITE_DB", global = true, value_name = "FILE")]
    pub sqlite_db: Option<PathBuf>,

    /// The SQLite database's journal: delete (default: Glance's own, which
    /// leaves no file beside the database when idle) or wal (faster under
    /// concurrent use, for a cache Glance never touches: Glance takes
    /// cache.db-wal and cache.db-shm for images).
    #[arg(
        long,
        env = "IMGCACHE_SQLITE_JOURNAL",
        global = true,
        value_name = "MODE"
    )]
    pub sqlite_journal: Option<JournalArg>,

    /// How commits are made durable: group (default: no fsync per commit;
    /// a checkpoint syncs the file system at most 1 s later, and entries
    /// it did not cover are checked before they are served after a crash)
    /// or immediate (each commit fsynced when it returns).
    #[arg(long, env = "IMGCACHE_DURABILITY", global = true, value_name = "MODE")]
    pub durability: Option<DurabilityArg>,
}

/// `--durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// `Durability::Group` with its defaults.
    Group,
    /// `Durability::Immediate`.
    Immediate,
}

/// `--sqlite-journal`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum JournalArg {
    /// `SqliteJournal::Delete`, Glance's own.
    Delete,
    /// `SqliteJournal::Wal`.
    Wal,
}

/// The `[DEFAULT]` values of a Glance config file that matter here.
#[derive(Debug, Default)]
pub struct GlanceConf {
    /// Every value, by (section, key), sections in lower case.
    all: std::collections::HashMap<(String, String), String>,
    dir: Option<String>,
    max_size: Option<String>,
    stall_time: Option<String>,
    driver: Option<String>,
    sqlite_db: Option<String>,
    node_url: Option<String>,
    /// `[database] connection`, when it is a PostgreSQL URL.
    database_url: Option<String>,
    /// The dialect of `[database] connection` when it is another
    /// database's (`mysql`, `sqlite`): named in the error, which says that
    /// only PostgreSQL is supported.
    other_database: Option<String>,
}

/// Reads the `[DEFAULT]` section of an oslo.config INI file.
fn read_conf(path: &Path) -> Result<GlanceConf, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::input(format!("cannot read config {}: {e}", path.display())))?;
    let mut conf = GlanceConf::default();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_ascii_lowercase();
            continue;
        }
        let Some((key, value)) = line.split_once(['=', ':']) else {
            continue;
        };
        let value = Some(value.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(v) = &value {
            conf.all
                .insert((section.clone(), key.trim().to_owned()), v.clone());
        }
        match (section.as_str(), key.trim()) {
            ("default", "image_cache_dir") => conf.dir = value,
            ("default", "image_cache_max_size") => conf.max_size = value,
            ("default", "image_cache_stall_time") => conf.stall_time = value,
            ("default", "image_cache_driver") => conf.driver = value,
            ("default", "image_cache_sqlite_db") => conf.sqlite_db = value,
            ("default", "worker_self_reference_url") => conf.node_url = value,
            ("database", "connection") => {
                conf.database_url = value.as_deref().and_then(postgres_url);
                if conf.database_url.is_none() {
                    conf.other_database = value.as_deref().map(|v| {
                        let scheme = v.split_once("://").map_or(v, |(s, _)| s);
                        scheme.split('+').next().unwrap_or(scheme).to_owned()
                    });
                }
            }
            _ => {}
        }
    }
    Ok(conf)
}

/// A SQLAlchemy URL (`postgresql+psycopg2://…`, as Glance's `[database]
/// connection` holds it) as a PostgreSQL URL; `None` for another database.
fn postgres_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let dialect = scheme.split('+').next()?;
    matches!(dialect, "postgresql" | "postgres").then(|| format!("postgres://{rest}"))
}

/// Parses a size: bytes, or a number with a unit (`10GiB`, `500MB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    imgcache::CacheOptions::parse_size(s)
}

/// Parses a duration: seconds, or humantime's forms (2h, 1day, 90min).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

impl GlanceConf {
    /// The value of `key` in `section` (`default` for `[DEFAULT]`).
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.all
            .get(&(section.to_owned(), key.to_owned()))
            .map(String::as_str)
    }
}

impl Settings {
    /// The config file's values (none without `--config`).
    pub fn conf(&self) -> Result<GlanceConf, Failure> {
        match &self.config {
            Some(path) => read_conf(path),
            None => Ok(GlanceConf::default()),
        }
    }

    /// The cache options these settings describe.
    pub fn options(&self) -> Result<CacheOptions, Failure> {
        let conf = self.conf()?;
        let dir = self
            .dir
            .clone()
            .or(conf.dir.map(PathBuf::from))
            .ok_or_else(|| {
                Failure::input(
                    "no cache directory: give --dir, set IMGCACHE_DIR, or --config a glance-api.conf with image_cache_dir",
                )
            })?;
        let mut options = CacheOptions::new(dir);
        if let Some(v) = self.max_size.clone().or(conf.max_size) {
            options = options
                .max_size(parse_size(&v).map_err(|e| Failure::input(format!("max size: {e}")))?);
        }
        if let Some(v) = self.stall_time.clone().or(conf.stall_time) {
            options = options.stall_time(
                parse_duration(&v).map_err(|e| Failure::input(format!("stall time: {e}")))?,
            );
        }
        if let Some(v) = self.driver.clone().or(conf.driver) {
            let kind: DriverKind = v
                .parse()
                .map_err(|e: imgcache::Error| Failure::input(e.to_string()))?;
            options = options.driver(kind);
        }
        if let Some(v) = self.sqlite_db.clone().or(conf.sqlite_db.map(PathBuf::from)) {
            options = options.sqlite_db(v);
        }
        if let Some(v) = self.database_url.clone().or(conf.database_url) {
            options = options.database_url(v);
        } else if let (Some(dialect), DriverKind::CentralizedDb) =
            (&conf.other_database, options.image_cache_driver())
        {
            return Err(Failure::input(format!(
                "the [database] connection of {} is a {dialect} database: imgcache's \
                 centralized_db driver supports PostgreSQL only (give --database-url \
                 postgres://… for the cache's database)",
                self.config
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
        if let Some(v) = self.node_url.clone().or(conf.node_url) {
            options = options.node_url(v);
        }
        if let Some(j) = self.sqlite_journal {
            options = options.sqlite_journal(match j {
                JournalArg::Delete => imgcache::drivers::SqliteJournal::Delete,
                JournalArg::Wal => imgcache::drivers::SqliteJournal::Wal,
            });
        }
        if let Some(d) = self.durability {
            options = options.durability(match d {
                DurabilityArg::Group => imgcache::Durability::group(),
                DurabilityArg::Immediate => imgcache::Durability::Immediate,
            });
        }
        Ok(options
            .migrate_sqlite(self.migrate_sqlite)
            .create_tables(self.create_tables))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("10 gib").unwrap(), 10 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn glance_database_urls() {
        assert_eq!(
            postgres_url("postgresql+psycopg2://glance:pw@db/glance").as_deref(),
            Some("postgres://glance:pw@db/glance")
        );
        assert_eq!(
            postgres_url("postgresql://db/glance").as_deref(),
            Some("postgres://db/glance")
        );
        assert_eq!(postgres_url("mysql+pymysql://glance:pw@db/glance"), None);
        assert_eq!(postgres_url("sqlite:///glance.db"), None);
        assert_eq!(postgres_url("nonsense"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("86400").unwrap(),
            Duration::from_secs(86_400)
        );
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("soon").is_err());
    }
}
