//! `imgcache`: everything Glance's cache tools do (`glance-cache-manage`,
//! `-pruner`, `-cleaner`, `-prefetcher`), on an imgcache or Glance cache
//! directory.

mod output;
mod serve;
mod settings;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imgcache::{
    DirOrigin, Error, HttpOrigin, ImageCache, ImageId, ImageStream, Origin, PrefetchEvent,
    PrefetchOutcome, Verification,
};
use serde::Serialize;

use output::{human_size, iso, json, table};
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
        Command::ListCached { all_nodes: true } => {
            let Some(images) = cache.cached_images_all_nodes()? else {
                return Err(Failure::input(format!(
                    "--all-nodes needs the centralized_db driver (this cache's is {})",
                    cache.driver().name()
                )));
            };
            if as_json {
                json(&images);
            } else if images.is_empty() {
                println!("No cached images on any node.");
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|n| {
                        vec![
                            n.node.clone(),
                            n.image.id.to_string(),
                            human_size(n.image.size),
                            n.image.hits.to_string(),
                            iso(n.image.last_accessed),
                        ]
                    })
                    .collect();
                table(
                    &["NODE", "ID", "SIZE", "HITS", "LAST ACCESSED"],
                    &rows,
                    &[2, 3],
                );
                let nodes: std::collections::BTreeSet<&str> =
                    images.iter().map(|n| n.node.as_str()).collect();
                println!("{} images on {} nodes", images.len(), nodes.len());
            }
        }
        Command::Nodes { id: s } => {
            let i = id(&s)?;
            let Some(nodes) = cache.cached_nodes(&i)? else {
                return Err(Failure::input(format!(
                    "which nodes hold an image is known to the centralized_db driver only (this cache's is {})",
                    cache.driver().name()
                )));
            };
            if as_json {
                json(&serde_json::json!({"image_id": i.as_str(), "nodes": nodes}));
            } else if nodes.is_empty() {
                return Err(Failure {
                    code: code::NOT_FOUND,
                    message: format!("no node holds {i}"),
                });
            } else {
                for n in &nodes {
                    println!("{n}");
                }
            }
        }
        Command::Migrate { .. } => {
            let db = cache.options().sqlite_db_path();
            let Some(r) = cache.migration().cloned() else {
                return Err(Failure::input(format!(
                    "migrating needs the centralized_db driver (this cache's is {})",
                    cache.driver().name()
                )));
            };
            report(
                as_json,
                &r,
                &format!(
                    "migrated {} of {} rows from {} to node {}",
                    r.migrated,
                    r.rows,
                    db.display(),
                    cache.node()
                ),
            );
        }
        Command::ListCached { all_nodes: false } => {
            let images = cache.cached_images()?;
            if as_json {
                json(&images);
            } else if images.is_empty() {
                println!("No cached images.");
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.id.to_string(),
                            human_size(i.size),
                            i.hits.to_string(),
                            iso(i.last_accessed),
                            iso(i.last_modified),
                        ]
                    })
                    .collect();
                table(
                    &["ID", "SIZE", "HITS", "LAST ACCESSED", "LAST MODIFIED"],
                    &rows,
                    &[1, 2],
                );
                let total: u64 = images.iter().map(|i| i.size).sum();
                println!("{} images, {}", images.len(), human_size(total));
            }
        }
        Command::ListQueued => {
            let queued = cache.queued_images()?;
            if as_json {
                json(&queued.iter().map(|i| i.as_str()).collect::<Vec<_>>());
            } else if queued.is_empty() {
                println!("No queued images.");
            } else {
                for i in &queued {
                    println!("{i}");
                }
            }
        }
        Command::QueueImage { ids } => {
            let ids: Vec<ImageId> = ids.iter().map(|s| id(s)).collect::<Result<_, _>>()?;
            #[derive(Serialize)]
            struct Queued<'a> {
                id: &'a str,
                queued: bool,
            }
            let mut out = Vec::new();
            for i in &ids {
                let queued = cache.queue_image(i)?;
                if !as_json {
                    if queued {
                        println!("queued {i}");
                    } else {
                        println!("{i} is already cached, being cached, or queued");
                    }
                }
                out.push(Queued {
                    id: i.as_str(),
                    queued,
                });
            }
            if as_json {
                json(&out);
            }
        }
        Command::DeleteCachedImage { id: s } => {
            let i = id(&s)?;
            if !cache.delete_cached_image(&i)? {
                return Err(Failure {
                    code: code::NOT_FOUND,
                    message: format!("image {i} is not cached"),
                });
            }
            report(
                as_json,
                &serde_json::json!({"deleted": i.as_str()}),
                &format!("deleted {i}"),
            );
        }
        Command::DeleteAllCachedImages => {
            let n = cache.delete_all_cached_images()?;
            report(
                as_json,
                &serde_json::json!({"deleted": n}),
                &format!("deleted {n} cached images"),
            );
        }
        Command::DeleteQueuedImage { id: s } => {
            let i = id(&s)?;
            if !cache.delete_queued_image(&i)? {
                return Err(Failure {
                    code: code::NOT_FOUND,
                    message: format!("image {i} is not queued"),
                });
            }
            report(
                as_json,
                &serde_json::json!({"dequeued": i.as_str()}),
                &format!("removed {i} from the queue"),
            );
        }
        Command::DeleteAllQueuedImages => {
            let n = cache.delete_all_queued_images()?;
            report(
                as_json,
                &serde_json::json!({"dequeued": n}),
                &format!("removed {n} queued images"),
            );
        }
        Command::Prune => {
            let r = cache.prune()?;
            #[derive(Serialize)]
            struct Pruned<'a> {
                #[serde(flatten)]
                report: &'a imgcache::PruneReport,
                max_size: u64,
            }
            report(
                as_json,
                &Pruned {
                    report: &r,
                    max_size: cache.options().image_cache_max_size(),
                },
                &format!(
                    "pruned {} images ({}); {} remain of a {} limit",
                    r.files(),
                    human_size(r.bytes),
                    human_size(r.remaining),
                    human_size(cache.options().image_cache_max_size())
                ),
            );
        }
        Command::Clean => {
            let r = cache.clean(None)?;
            #[derive(Serialize)]
            struct Cleaned<'a> {
                #[serde(flatten)]
                report: &'a imgcache::CleanReport,
                bytes: u64,
            }
            report(
                as_json,
                &Cleaned {
                    report: &r,
                    bytes: r.bytes(),
                },
                &format!(
                    "removed {} invalid and {} stalled files ({}); kept {} files being written",
                    r.invalid.len(),
                    r.stalled.len(),
                    human_size(r.bytes()),
                    r.live_writers.len()
                ),
            );
        }
        Command::Prefetch {
            origin: spec,
            parallel,
        } => return prefetch(&cache, &spec, parallel, as_json),
        Command::Fetch {
            id: s,
            origin: spec,
            output,
        } => return fetch(&cache, &id(&s)?, &spec, output, as_json),
        Command::Verify { ids } => return verify(&cache, &ids, as_json),
        Command::Scrub => {
            let r = cache.scrub()?;
            report(
                as_json,
                &r,
                &format!(
                    "{} intact, {} newly verified, {} corrupt (moved to invalid/); {} read",
                    r.intact,
                    r.newly_verified.len(),
                    r.corrupt.len(),
                    human_size(r.bytes)
                ),
            );
            for (i, why) in &r.corrupt {
                eprintln!("corrupt: {i}: {why}");
            }
        }
        Command::Stats => {
            let images = cache.cached_images()?;
            let bytes: u64 = images.iter().map(|i| i.size).sum();
            let hits: u64 = images.iter().map(|i| i.hits).sum();
            let queued = cache.queued_images()?.len();
            let invalid = cache.invalid_images()?;
            let max = cache.options().image_cache_max_size();
            let driver = cache.driver().name();
            if as_json {
                json(&serde_json::json!({
                    "dir": cache.layout().base(),
                    "driver": driver,
                    "entries": images.len(),
                    "bytes": bytes,
                    "max_size": max,
                    "hits": hits,
                    "queued": queued,
                    "invalid": invalid.len(),
                    "invalid_bytes": invalid.iter().map(|i| i.size).sum::<u64>(),
                }));
            } else {
                let used = if max == 0 {
                    0.0
                } else {
                    bytes as f64 * 100.0 / max as f64
                };
                println!("directory  {}", cache.layout().base().display());
                println!("driver     {driver}");
                println!("entries    {}", images.len());
                println!(
                    "size       {} of {} ({used:.1}%)",
                    human_size(bytes),
                    human_size(max)
                );
                println!("hits       {hits}");
                println!("queued     {queued}");
                println!(
                    "invalid    {} ({})",
                    invalid.len(),
                    human_size(invalid.iter().map(|i| i.size).sum())
                );
            }
        }
    }
    Ok(0)
}

/// Prints `value` as JSON, or `line` for people.
fn report(as_json: bool, value: &impl Serialize, line: &str) {
    if as_json {
        json(value);
    } else {
        println!("{line}");
    }
}

fn prefetch(cache: &ImageCache, spec: &str, parallel: usize, as_json: bool) -> Result<u8, Failure> {
    let origin = origin(spec)?;
    let bars = (!as_json && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
    let active: bars::Bars = Default::default();
    let on_event = |event: PrefetchEvent<'_>| {
        let Some(multi) = &bars else { return };
        match event {
            PrefetchEvent::Started { id, size } => {
                let bar = multi.add(match size {
                    Some(n) => indicatif::ProgressBar::new(n),
                    None => indicatif::ProgressBar::new_spinner(),
                });
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:<40} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(id.to_string());
                active.insert(id, bar);
            }
            PrefetchEvent::Progress { id, bytes } => active.with(id, |b| b.set_position(bytes)),
            PrefetchEvent::Finished { id, .. } => active.with(id, |b| b.finish()),
            _ => {}
        }
    };
    let report = cache.prefetch_with(&*origin, parallel, &on_event)?;
    #[derive(Serialize)]
    struct Row<'a> {
        id: &'a str,
        outcome: &'static str,
        bytes: u64,
        error: Option<String>,
    }
    let rows: Vec<Row> = report
        .results
        .iter()
        .map(|r| match &r.outcome {
            Ok(PrefetchOutcome::Cached { bytes }) => Row {
                id: r.id.as_str(),
                outcome: "cached",
                bytes: *bytes,
                error: None,
            },
            Ok(PrefetchOutcome::AlreadyCached) => Row {
                id: r.id.as_str(),
                outcome: "already cached",
                bytes: 0,
                error: None,
            },
            Ok(PrefetchOutcome::BeingCached) => Row {
                id: r.id.as_str(),
                outcome: "being cached elsewhere",
                bytes: 0,
                error: None,
            },
            Ok(_) => Row {
                id: r.id.as_str(),
                outcome: "done",
                bytes: 0,
                error: None,
            },
            Err(e) => Row {
                id: r.id.as_str(),
                outcome: "failed",
                bytes: 0,
                error: Some(e.to_string()),
            },
        })
        .collect();
    if as_json {
        json(&rows);
    } else if rows.is_empty() {
        println!("Nothing queued.");
    } else {
        for r in &rows {
            match &r.error {
                None if r.outcome == "cached" => {
                    println!("{:<9} {} ({})", r.outcome, r.id, human_size(r.bytes))
                }
                None => println!("{:<9} {}", r.outcome, r.id),
                Some(e) => println!("FAILED    {}: {e}", r.id),
            }
        }
    }
    let failed = report.failures().count();
    if failed > 0 {
        let ids: Vec<&str> = report.failures().map(|(i, _)| i.as_str()).collect();
        eprintln!(
            "imgcache: prefetch failed for {failed} of {} images (still queued): {}",
            report.results.len(),
            ids.join(", ")
        );
        return Ok(code::PREFETCH_FAILED);
    }
    Ok(0)
}

/// Progress bars by image, shared between the prefetch workers.
mod bars {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use imgcache::ImageId;

    #[derive(Default)]
    pub struct Bars(Mutex<HashMap<ImageId, indicatif::ProgressBar>>);

    impl Bars {
        pub fn insert(&self, id: &ImageId, bar: indicatif::ProgressBar) {
            if let Ok(mut m) = self.0.lock() {
                m.insert(id.clone(), bar);
            }
        }

        pub fn with(&self, id: &ImageId, f: impl FnOnce(&indicatif::ProgressBar)) {
            if let Ok(m) = self.0.lock() {
                if let Some(b) = m.get(id) {
                    f(b);
                }
            }
        }
    }
}

fn fetch(
    cache: &ImageCache,
    id: &ImageId,
    spec: &str,
    output: Option<PathBuf>,
    as_json: bool,
) -> Result<u8, Failure> {
    let origin = origin(spec)?;
    // `-o -` is standard output, as for curl, tar and wget.
    let output = output.filter(|p| p.as_os_str() != "-");
    let stdout = std::io::stdout();
    if output.is_none() && stdout.is_terminal() {
        return Err(Failure::input(
            "refusing to write an image to a terminal: give -o FILE or redirect stdout",
        ));
    }
    let stream = cache.fetch_from(id, &*origin)?;
    let how = match &stream {
        ImageStream::Cached(_) => "hit",
        ImageStream::Filling(_) => "miss",
        ImageStream::Following(_) => "joined a fill",
    };
    // Why a miss was not cached, if it was not (the stream is unaffected).
    let not_cached = |stream: &ImageStream<Box<dyn std::io::Read + Send>>| match stream {
        ImageStream::Filling(tee) => tee.stats().cache_error.clone(),
        _ => None,
    };
    let (bytes, note) = match (stream, &output) {
        (ImageStream::Cached(image), Some(path)) => {
            let file = std::fs::File::create(path)
                .map_err(|e| Failure::input(format!("cannot create {}: {e}", path.display())))?;
            (image.send_to(&file, None)?, None)
        }
        (ImageStream::Cached(image), None) => {
            (image.send_to(std::io::stdout().lock(), None)?, None)
        }
        (mut stream, Some(path)) => {
            let mut file = std::fs::File::create(path)
                .map_err(|e| Failure::input(format!("cannot create {}: {e}", path.display())))?;
            let n = copy(
                id,
                &mut stream,
                &mut file,
                std::io::stderr().is_terminal() && !as_json,
            )?;
            (n, not_cached(&stream))
        }
        (mut stream, None) => {
            let mut out = std::io::stdout().lock();
            let n = copy(id, &mut stream, &mut out, false)?;
            out.flush().map_err(|e| Failure {
                code: code::FAILED,
                message: format!("stdout: {e}"),
            })?;
            (n, not_cached(&stream))
        }
    };
    let summary = serde_json::json!({"id": id.as_str(), "result": how, "bytes": bytes,
        "cached": cache.is_cached(id)?, "not_cached": note});
    if as_json && output.is_some() {
        json(&summary);
    } else if let Some(why) = &note {
        eprintln!(
            "{id}: {how}, {} ({} bytes), not cached: {why}",
            human_size(bytes),
            bytes
        );
    } else {
        eprintln!("{id}: {how}, {} ({} bytes)", human_size(bytes), bytes);
    }
    Ok(0)
}

/// Copies a fill or follow to `out`, with a progress bar if asked.
fn copy(
    id: &ImageId,
    stream: &mut ImageStream<Box<dyn std::io::Read + Send>>,
    out: &mut dyn Write,
    progress: bool,
) -> Result<u64, Failure> {
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(id.to_string());
        b
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match std::io::Read::read(stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from_io_of(id, e).into()),
        };
        out.write_all(&buf[..n]).map_err(|e| Failure {
            code: code::FAILED,
            message: format!("writing {id}: {e}"),
        })?;
        total += n as u64;
        if let Some(b) = &bar {
            b.set_position(total);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(total)
}

fn verify(cache: &ImageCache, ids: &[String], as_json: bool) -> Result<u8, Failure> {
    let ids: Vec<ImageId> = if ids.is_empty() {
        cache.cached_images()?.into_iter().map(|i| i.id).collect()
    } else {
        ids.iter().map(|s| id(s)).collect::<Result<_, _>>()?
    };
    let mut corrupt = 0;
    let mut rows = Vec::new();
    for i in &ids {
        let (state, detail) = match cache.verify(i)? {
            None => ("not cached", String::new()),
            Some(Verification::Intact) => ("intact", String::new()),
            Some(Verification::Unverified { crc32 }) => {
                ("unverified", format!("crc32 {crc32:08x}, none recorded"))
            }
            Some(Verification::Corrupt { detail }) => {
                corrupt += 1;
                ("CORRUPT", detail)
            }
            Some(_) => ("unknown", String::new()),
        };
        rows.push((i.to_string(), state, detail));
    }
    if as_json {
        json(
            &rows
                .iter()
                .map(|(i, s, d)| serde_json::json!({"id": i, "state": s, "detail": d}))
                .collect::<Vec<_>>(),
        );
    } else {
        for (i, s, d) in &rows {
            if d.is_empty() {
                println!("{s:<10} {i}");
            } else {
                println!("{s:<10} {i}: {d}");
            }
        }
    }
    if corrupt > 0 {
        eprintln!("imgcache: {corrupt} corrupt images (run `imgcache scrub` to move them aside)");
        return Ok(code::CORRUPT);
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Error,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    if matches!(cli.command, Command::Serve(_)) {
        // The server logs with tracing (the library's `log` records too).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(match cli.verbose {
                0 => "warn",
                1 => "info",
                _ => "debug",
            })
        });
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    } else {
        env_logger::Builder::new()
            .filter_level(level)
            .format_timestamp(None)
            .init();
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("imgcache: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
