//! `imgcache`: everything Glance's cache tools do (`glance-cache-manage`,
//! `-pruner`, `-cleaner`, `-prefetcher`), on an imgcache or Glance cache
//! directory.

mod fetch;
mod inspect;
mod manage;
mod output;
mod serve;
mod settings;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imgcache::origin::{DirOrigin, HttpOrigin, Origin};
use imgcache::{Error, ImageId};
use serde::Serialize;

use output::json;
use settings::Settings;

/// Exit codes.
mod code {
    /// Something failed (I/O, database, origin).
    pub const FAILED: u8 = 1;
    /// Bad input: an id, an option value, an unreadable config file.
    pub const BAD_INPUT: u8 = 2;
    /// Not found: the origin has no such image; the image is not cached.
    pub const NOT_FOUND: u8 = 3;
    /// A prefetch finished, but some images failed (they stay queued).
    pub const PREFETCH_FAILED: u8 = 4;
    /// `verify` found corrupt images.
    pub const CORRUPT: u8 = 5;
}

/// Manage a local image cache: list, queue, prefetch, prune, clean, verify.
///
/// Works on imgcache's directories and on Glance's own (sqlite or xattr
/// driver), and on a PostgreSQL database shared by many nodes
/// (centralized_db). Settings come from flags, IMGCACHE_* environment variables, or
/// a glance-api.conf (--config), in that order.
///
/// Exit codes: 0 success; 1 failure; 2 bad input (id, option, config);
/// 3 not found; 4 prefetch with failures; 5 corrupt images found.
#[derive(Debug, Parser)]
#[command(name = "imgcache", version)]
struct Cli {
    #[command(flatten)]
    settings: Settings,

    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,

    /// Log more (-v warnings and info, -vv debug), to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List cached images: id, size, hits, last accessed, last modified.
    ListCached {
        /// Every node's images (centralized_db): node, id, size, hits, last
        /// access.
        #[arg(long)]
        all_nodes: bool,
    },
    /// The nodes whose caches hold an image (centralized_db).
    Nodes {
        /// Image id.
        id: String,
    },
    /// Move this node's rows from a local SQLite cache.db into the
    /// centralized_db database, as Glance does (idempotent; the file is
    /// kept).
    Migrate {
        /// Migrate from a SQLite database (the only source there is).
        #[arg(long, required = true)]
        from_sqlite: bool,
        /// The SQLite database (default: the cache's image_cache_sqlite_db).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// List queued images, oldest first.
    ListQueued,
    /// Queue images for the prefetcher.
    QueueImage {
        /// Image ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete one cached image.
    DeleteCachedImage {
        /// Image id.
        id: String,
    },
    /// Delete every cached image.
    DeleteAllCachedImages,
    /// Remove one image from the queue.
    DeleteQueuedImage {
        /// Image id.
        id: String,
    },
    /// Empty the queue.
    DeleteAllQueuedImages,
    /// Delete least recently accessed images until the cache fits its max size.
    Prune,
    /// Delete invalid files, and incomplete files older than the stall time
    /// whose writer is gone.
    Clean,
    /// Fetch every queued image from an origin.
    Prefetch {
        /// Where to fetch from: a directory (one file per id, optional
        /// <id>.md5/.sha256/.sha512 beside it), or a URL template with {id}.
        #[arg(long, env = "IMGCACHE_ORIGIN", value_name = "DIR|URL")]
        origin: String,
        /// How many images to fetch at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    /// Read one image through the cache: a hit is served from it, a miss
    /// fetched from the origin and cached on the way.
    Fetch {
        /// Image id.
        id: String,
        /// Where to fetch a miss from (as for prefetch).
        #[arg(long, env = "IMGCACHE_ORIGIN", value_name = "DIR|URL")]
        origin: String,
        /// Write the image here (default, or `-`: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check cached images' size and CRC-32 (all, or those named).
    Verify {
        /// Image ids (default: all).
        ids: Vec<String>,
    },
    /// Verify every image; move corrupt ones to invalid/, record the CRC of
    /// unverified ones.
    Scrub,
    /// Entries, bytes, max size, hits, queued and invalid counts.
    Stats,
    /// Serve images over HTTP: GET/HEAD {prefix}{id}/file from the cache,
    /// one fill per miss from the origin, zero-copy bodies. Logs go to
    /// stderr (RUST_LOG or -v sets the level).
    Serve(Box<serve::ServeArgs>),
}

/// A failure to report: a one-line message and an exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Bad input (exit 2).
    pub fn input(message: impl Into<String>) -> Self {
        Failure {
            code: code::BAD_INPUT,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidId { .. } | Error::InvalidChecksum { .. } | Error::Config(_) => {
                code::BAD_INPUT
            }
            Error::OriginNotFound { .. } => code::NOT_FOUND,
            _ => code::FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn id(s: &str) -> Result<ImageId, Failure> {
    Ok(ImageId::new(s)?)
}

fn origin(spec: &str) -> Result<Box<dyn Origin>, Failure> {
    if is_url(spec) {
        return Ok(Box::new(HttpOrigin::new(spec)?));
    }
    Ok(Box::new(dir_origin(spec)?))
}

/// Whether an origin spec is a URL template (else a directory).
fn is_url(spec: &str) -> bool {
    spec.starts_with("http://") || spec.starts_with("https://")
}

/// Whether this user may write the cache directory and its SQLite
/// database (where they exist): if not, the commands that only read open
/// it read-only.
fn writable(options: &imgcache::CacheOptions) -> bool {
    use nix::unistd::{access, AccessFlags};
    let dir = options.image_cache_dir();
    if dir.is_dir() && access(dir, AccessFlags::W_OK).is_err() {
        return false;
    }
    let db = options.sqlite_db_path();
    let uses_db = options.image_cache_driver() == imgcache::DriverKind::Sqlite;
    !(uses_db && db.is_file() && access(&db, AccessFlags::W_OK).is_err())
}

/// The directory origin a spec names (`DIR` or `dir:DIR`).
fn dir_origin(spec: &str) -> Result<DirOrigin, Failure> {
    let dir = PathBuf::from(spec.strip_prefix("dir:").unwrap_or(spec));
    if !dir.is_dir() {
        return Err(Failure::input(format!(
            "origin {spec:?} is neither a directory nor an http(s) URL template"
        )));
    }
    Ok(DirOrigin::new(dir))
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let mut options = cli.settings.options()?;
    if let Command::Serve(args) = cli.command {
        return serve::run(options, &cli.settings, *args);
    }
    if let Command::Migrate { file, .. } = &cli.command {
        // Glance's order: the rows move before the cache is opened (whose
        // recovery walk would adopt the files without their hits).
        if let Some(f) = file {
            options = options.sqlite_db(std::path::absolute(f).unwrap_or_else(|_| f.clone()));
        }
        let db = options.sqlite_db_path();
        if !db.is_file() {
            return Err(Failure {
                code: code::NOT_FOUND,
                message: format!("no SQLite database at {}", db.display()),
            });
        }
        options = options.migrate_sqlite(true);
    }
    let inspects = matches!(
        cli.command,
        Command::ListCached { .. }
            | Command::ListQueued
            | Command::Stats
            | Command::Verify { .. }
            | Command::Nodes { .. }
    );
    if inspects && (cli.settings.read_only || !writable(&options)) {
        if !cli.settings.read_only {
            eprintln!(
                "imgcache: {} is read-only to this user: inspecting only (nothing recovered, \
                 quarantined or recorded{})",
                options.image_cache_dir().display(),
                if matches!(cli.command, Command::Verify { .. }) {
                    "; corrupt images are reported, not moved aside"
                } else {
                    ""
                }
            );
        }
        options = options.read_only(true);
    } else if cli.settings.read_only {
        return Err(Failure::input(
            "--read-only: only list-cached, list-queued, stats, verify and nodes read without writing",
        ));
    }
    let cache = options.open()?;
    let as_json = cli.json;
    match cli.command {
        Command::Serve(_) => unreachable!("served above"),
        Command::ListCached { all_nodes: true } => inspect::list_cached_all_nodes(&cache, as_json),
        Command::Nodes { id: s } => inspect::nodes(&cache, &s, as_json),
        Command::Migrate { .. } => manage::migrate(&cache, as_json),
        Command::ListCached { all_nodes: false } => inspect::list_cached(&cache, as_json),
        Command::ListQueued => inspect::list_queued(&cache, as_json),
        Command::QueueImage { ids } => manage::queue_image(&cache, &ids, as_json),
        Command::DeleteCachedImage { id: s } => manage::delete_cached_image(&cache, &s, as_json),
        Command::DeleteAllCachedImages => manage::delete_all_cached_images(&cache, as_json),
        Command::DeleteQueuedImage { id: s } => manage::delete_queued_image(&cache, &s, as_json),
        Command::DeleteAllQueuedImages => manage::delete_all_queued_images(&cache, as_json),
        Command::Prune => manage::prune(&cache, as_json),
        Command::Clean => manage::clean(&cache, as_json),
        Command::Prefetch {
            origin: spec,
            parallel,
        } => fetch::prefetch(&cache, &spec, parallel, as_json),
        Command::Fetch {
            id: s,
            origin: spec,
            output,
        } => fetch::fetch(&cache, &id(&s)?, &spec, output, as_json),
        Command::Verify { ids } => inspect::verify(&cache, &ids, as_json),
        Command::Scrub => manage::scrub(&cache, as_json),
        Command::Stats => inspect::stats(&cache, as_json),
    }
}

/// Prints `value` as JSON, or `line` for people.
fn report(as_json: bool, value: &impl Serialize, line: &str) {
    if as_json {
        json(value);
    } else {
        println!("{line}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One logging facade, the library's and the server's: `RUST_LOG`, or
    // the verbosity asked (the server warns by default, the commands only
    // say what failed).
    let serving = matches!(cli.command, Command::Serve(_));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(match (cli.verbose, serving) {
            (0, true) => "warn",
            (0, false) => "error",
            (1, _) => "info",
            _ => "debug",
        })
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if serving {
        logs.init();
    } else {
        logs.without_time().with_target(false).init();
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("imgcache: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
