//! `imgcache serve`: the data path over HTTP, the management API on a
//! port of its own, and the cache's jobs, in one process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcache::origin::{AsyncHttpOrigin, Origin};
use imgcache::serve::admin::{serve_admin, AdminOptions, AdminService};
use imgcache::serve::jobs::{JobOptions, Jobs};
use imgcache::serve::peers::PeerOptions;
use imgcache::serve::{serve_hyper_until, ImageService, Metrics, ServeOptions, Server};
use imgcache::{CacheOptions, ImageCache, MinFree};

use crate::settings::{parse_duration, parse_size, Settings};
use crate::Failure;

/// How `imgcache serve` writes responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Its own HTTP/1.1 connections, bodies sent with sendfile (zero-copy).
    Sendfile,
    /// hyper (HTTP/1.1 and HTTP/2 without TLS), bodies read in one go up to 1 MiB, 256 KiB chunks past that.
    Hyper,
}

/// What `imgcache serve` was asked for. Each setting also comes from an
/// environment variable, and the addresses from the config file: the data
/// port from `[DEFAULT] bind_host`/`bind_port`, the rest from an
/// `[imgcache]` section (`admin_bind_host`, `admin_bind_port`,
/// `admin_token_file`, `prefetch_token_file`, `min_free`, `hard_limit`,
/// `public`, `origin`).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where to fetch misses from: a directory (one file per id), or a URL
    /// template with {id} such as http://glance:9292/v2/images/{id}/file.
    #[arg(long, env = "IMGCACHE_ORIGIN", value_name = "DIR|URL")]
    origin: Option<String>,
    /// The data port's address (port 0: any free port; the one chosen is
    /// printed). Default 127.0.0.1:9292.
    #[arg(long, env = "IMGCACHE_LISTEN")]
    listen: Option<SocketAddr>,
    /// The management API's address, never the data port's. Default
    /// 127.0.0.1:9293; another host than loopback needs --admin-token-file.
    #[arg(long, env = "IMGCACHE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// A file holding the bearer token the management API requires; it
    /// must be readable by its owner alone (chmod 600).
    #[arg(long, env = "IMGCACHE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// A file holding the X-Auth-Token the prefetcher sends to the origin
    /// (a service token); it must be readable by its owner alone.
    #[arg(long, env = "IMGCACHE_PREFETCH_TOKEN_FILE", value_name = "FILE")]
    prefetch_token_file: Option<PathBuf>,
    /// Serve every image to every client, without asking the origin
    /// whether the client may read it.
    #[arg(long, env = "IMGCACHE_PUBLIC")]
    public: bool,
    /// How long the origin's yes for a token and an image is remembered
    /// (default 0: every request asks).
    #[arg(long, env = "IMGCACHE_AUTHORIZATION_TTL", value_name = "TIME")]
    authorization_ttl: Option<String>,
    /// How responses are written.
    #[arg(long, value_enum, default_value_t = Transport::Sendfile)]
    transport: Transport,
    /// Where image paths start: {prefix}{id}/file.
    #[arg(long, default_value = "/v2/images/")]
    prefix: String,
    /// With --public: pass the client's X-Auth-Token on to the origin with
    /// the fill it starts (always done when not public).
    #[arg(long)]
    forward_auth_token: bool,
    /// Images the prefetcher fetches at once; 0: no prefetcher in this
    /// process (queued images stay queued, for `imgcache prefetch`).
    #[arg(long, env = "IMGCACHE_PREFETCH_WORKERS", default_value_t = 2)]
    prefetch_workers: usize,
    /// How often the pruner looks besides after each fill (0: no pruner).
    #[arg(
        long,
        env = "IMGCACHE_PRUNE_INTERVAL",
        default_value = "60s",
        value_name = "TIME"
    )]
    prune_interval: String,
    /// How often the cleaner runs (0: never).
    #[arg(
        long,
        env = "IMGCACHE_CLEAN_INTERVAL",
        default_value = "10min",
        value_name = "TIME"
    )]
    clean_interval: String,
    /// Free space to keep on the cache's file system (5%, 2GiB): least
    /// recently used images are evicted before a fill; a fill that cannot
    /// fit is served from the origin, uncached.
    #[arg(long, env = "IMGCACHE_MIN_FREE", value_name = "SIZE|N%")]
    min_free: Option<String>,
    /// A limit on the cache's bytes that no fill may pass (fills in
    /// progress counted): one that would is served uncached.
    #[arg(long, env = "IMGCACHE_HARD_LIMIT", value_name = "SIZE")]
    hard_limit: Option<String>,
    /// On SIGTERM or SIGINT: how long responses and fills in flight get to
    /// finish before they are cut.
    #[arg(
        long,
        env = "IMGCACHE_SHUTDOWN_TIMEOUT",
        default_value = "30s",
        value_name = "TIME"
    )]
    shutdown_timeout: String,
    /// Fill misses from the fleet's other nodes first, and serve them
    /// (peer fill): one origin request per image for the whole fleet.
    /// Needs --driver centralized_db, --peer-token-file, and --node-url
    /// set to the URL of this node's data port.
    #[arg(long, env = "IMGCACHE_PEERS")]
    peers: bool,
    /// A file holding the fleet's token (the same on every node), which
    /// peer requests carry; readable by its owner alone (chmod 600).
    #[arg(long, env = "IMGCACHE_PEER_TOKEN_FILE", value_name = "FILE")]
    peer_token_file: Option<PathBuf>,
    /// The most peer transfers this node serves at once (others are told
    /// to ask another node): the image spreads as a tree.
    #[arg(long, env = "IMGCACHE_PEER_FANOUT", default_value_t = imgcache::serve::peers::DEFAULT_FANOUT)]
    peer_fanout: usize,
    /// How long a response may wait for its client to take a byte before
    /// the connection is cut (nginx's send_timeout).
    #[arg(
        long,
        env = "IMGCACHE_SEND_TIMEOUT",
        default_value = "60s",
        value_name = "TIME"
    )]
    send_timeout: String,
    /// How long a request head may take, and a connection sit idle between
    /// requests, on the data port.
    #[arg(
        long,
        env = "IMGCACHE_HEADER_TIMEOUT",
        default_value = "60s",
        value_name = "TIME"
    )]
    header_timeout: String,
    /// Data connections served at once (more wait in the backlog). Default:
    /// half the descriptors left after the management API's and a reserve.
    #[arg(long, env = "IMGCACHE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Management connections served at once (no token is needed to open
    /// one: this bounds what a flood can hold).
    #[arg(
        long,
        env = "IMGCACHE_ADMIN_MAX_CONNECTIONS",
        default_value_t = imgcache::serve::admin::DEFAULT_ADMIN_CONNECTIONS
    )]
    admin_max_connections: usize,
    /// Fills (each a thread and an origin connection) run at once; a miss
    /// past it is answered 503 with Retry-After.
    #[arg(
        long,
        env = "IMGCACHE_MAX_FILLS",
        default_value_t = imgcache::serve::DEFAULT_MAX_FILLS
    )]
    max_fills: usize,
    /// Descriptors of hot cached images kept open, so that a hit costs no
    /// open (never stale: each hit checks the file is still in place); at
    /// most a quarter of the descriptor limit; 0 keeps none.
    #[arg(long, env = "IMGCACHE_OPEN_FILES", default_value_t = 1024)]
    open_files: usize,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Print the effective settings and exit.
    #[arg(long)]
    check_config: bool,
}

/// Everything `imgcache serve` runs with, resolved.
struct Config {
    options: CacheOptions,
    origin: String,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    prefetch_token: Option<String>,
    public: bool,
    authorization_ttl: Duration,
    prune_interval: Option<Duration>,
    clean_interval: Option<Duration>,
    shutdown_timeout: Duration,
    send_timeout: Duration,
    header_timeout: Duration,
    /// Open descriptors this process may hold (its soft limit, raised to
    /// the hard one), and how they are split.
    descriptors: u64,
    max_connections: usize,
    admin_max_connections: usize,
    max_fills: usize,
    peers: Option<PeerOptions>,
    peer_token_file: Option<PathBuf>,
}

fn duration(what: &str, v: &str) -> Result<Duration, Failure> {
    parse_duration(v).map_err(|e| Failure::input(format!("{what}: {e}")))
}

/// A duration that must not be zero (a timeout of zero would cut every
/// connection at once).
fn positive(what: &str, v: &str) -> Result<Duration, Failure> {
    let d = duration(what, v)?;
    if d.is_zero() {
        return Err(Failure::input(format!(
            "{what}: 0 would cut every connection at once"
        )));
    }
    Ok(d)
}

fn every(what: &str, v: &str) -> Result<Option<Duration>, Failure> {
    Ok(Some(duration(what, v)?).filter(|d| !d.is_zero()))
}

/// An address from a host and a port, as glance-api.conf gives them.
fn address(
    host: Option<&str>,
    port: Option<&str>,
    default: SocketAddr,
) -> Result<SocketAddr, Failure> {
    let ip = match host {
        Some(h) => h
            .parse::<IpAddr>()
            .map_err(|e| Failure::input(format!("bind host {h:?}: {e}")))?,
        None => default.ip(),
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|e| Failure::input(format!("bind port {p:?}: {e}")))?,
        None => default.port(),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Reads the admin token, refusing a file others may read.
fn read_token(path: &PathBuf) -> Result<String, Failure> {
    // Both token files (admin, prefetch) pass the same checks.
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::File::open(path)
        .map_err(|e| Failure::input(format!("token file {}: {e}", path.display())))?;
    // The file opened, not the path again: what is read is what was checked.
    let meta = file
        .metadata()
        .map_err(|e| Failure::input(format!("token file {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Failure::input(format!(
            "token file {} is readable or writable by its group or others (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let mut token = String::new();
    std::io::Read::read_to_string(&mut file, &mut token)
        .map_err(|e| Failure::input(format!("token file {}: {e}", path.display())))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(Failure::input(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

impl ServeArgs {
    fn config(self, options: CacheOptions, settings: &Settings) -> Result<Config, Failure> {
        let conf = settings.conf()?;
        let section = |key: &str| conf.get("imgcache", key).map(str::to_owned);
        let listen = match self.listen {
            Some(a) => a,
            None => address(
                conf.get("default", "bind_host"),
                conf.get("default", "bind_port"),
                "127.0.0.1:9292".parse().expect("an address"),
            )?,
        };
        let admin_listen = match self.admin_listen {
            Some(a) => a,
            None => address(
                section("admin_bind_host").as_deref(),
                section("admin_bind_port").as_deref(),
                "127.0.0.1:9293".parse().expect("an address"),
            )?,
        };
        if admin_listen.port() == listen.port() && listen.port() != 0 {
            return Err(Failure::input(format!(
                "the management API ({admin_listen}) never shares the data port ({listen})"
            )));
        }
        let admin_token_file = self
            .admin_token_file
            .or_else(|| section("admin_token_file").map(PathBuf::from));
        let admin_token = admin_token_file.as_ref().map(read_token).transpose()?;
        let prefetch_token = self
            .prefetch_token_file
            .or_else(|| section("prefetch_token_file").map(PathBuf::from))
            .as_ref()
            .map(read_token)
            .transpose()?;
        if admin_token.is_none() && !admin_listen.ip().is_loopback() {
            return Err(Failure::input(format!(
                "the management API on {admin_listen} (not loopback) needs --admin-token-file"
            )));
        }
        let min_free = match self.min_free.or_else(|| section("min_free")) {
            Some(v) => Some(
                v.parse::<MinFree>()
                    .map_err(|e| Failure::input(format!("min free: {e}")))?,
            ),
            None => None,
        };
        let hard_limit = match self.hard_limit.or_else(|| section("hard_limit")) {
            Some(v) => {
                Some(parse_size(&v).map_err(|e| Failure::input(format!("hard limit: {e}")))?)
            }
            None => None,
        };
        let public = self.public
            || section("public")
                .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1"));
        let peer_token_file = self
            .peer_token_file
            .or_else(|| section("peer_token_file").map(PathBuf::from));
        let peers = if self.peers
            || section("peers")
                .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1"))
        {
            let Some(file) = &peer_token_file else {
                return Err(Failure::input(
                    "--peers needs --peer-token-file (the fleet's shared token)",
                ));
            };
            if options.image_cache_driver() != imgcache::DriverKind::CentralizedDb {
                return Err(Failure::input(
                    "--peers needs a store the fleet shares: --driver centralized_db",
                ));
            }
            if self.peer_fanout == 0 {
                return Err(Failure::input(
                    "--peer-fanout 0 would serve no peer: give 1 or more, or leave --peers off",
                ));
            }
            Some(PeerOptions::new(read_token(file)?).fanout(self.peer_fanout))
        } else {
            None
        };
        if self.max_fills == 0 {
            return Err(Failure::input(
                "--max-fills 0 would fill nothing: give 1 or more",
            ));
        }
        if self.max_connections == Some(0) || self.admin_max_connections == 0 {
            return Err(Failure::input(
                "a connection limit of 0 would serve nothing: give 1 or more",
            ));
        }
        // The soft limit on descriptors raised to the hard one, and split
        // so that a flood on one port never takes the other's.
        let descriptors = imgcache::serve::raise_descriptor_limit()
            .map_err(|e| Failure::input(format!("cannot read the descriptor limit: {e}")))?;
        let open_files = self
            .open_files
            .min(usize::try_from(descriptors / 4).unwrap_or(usize::MAX));
        let (data_max, admin_max) = imgcache::serve::descriptor_budget(
            descriptors,
            self.admin_max_connections,
            self.max_fills,
            open_files,
        );
        let origin = self.origin.or_else(|| section("origin")).ok_or_else(|| {
            Failure::input("no origin: give --origin DIR|URL, or set IMGCACHE_ORIGIN")
        })?;
        Ok(Config {
            options: options
                .hard_limit(hard_limit)
                .min_free(min_free)
                .open_files(open_files),
            origin,
            listen,
            admin_listen,
            admin_token,
            admin_token_file,
            prefetch_token,
            public,
            authorization_ttl: match &self.authorization_ttl {
                Some(v) => duration("authorization ttl", v)?,
                None => Duration::ZERO,
            },
            prune_interval: every("prune interval", &self.prune_interval)?,
            clean_interval: every("clean interval", &self.clean_interval)?,
            shutdown_timeout: duration("shutdown timeout", &self.shutdown_timeout)?,
            send_timeout: positive("send timeout", &self.send_timeout)?,
            header_timeout: positive("header timeout", &self.header_timeout)?,
            descriptors,
            max_connections: self.max_connections.unwrap_or(data_max),
            admin_max_connections: admin_max,
            max_fills: self.max_fills,
            peers,
            peer_token_file,
        })
    }
}

/// Prints the effective settings (secrets never).
fn print_config(c: &Config, args: &Extra) {
    let o = &c.options;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    println!("image_cache_dir = {}", o.image_cache_dir().display());
    println!("image_cache_driver = {}", o.image_cache_driver());
    println!("image_cache_max_size = {}", o.image_cache_max_size());
    println!(
        "image_cache_stall_time = {}",
        o.image_cache_stall_time().as_secs()
    );
    println!(
        "image_cache_sqlite_db = {}",
        o.image_cache_sqlite_db().display()
    );
    println!(
        "worker_self_reference_url = {}",
        opt(o.node_url_ref().map(str::to_owned))
    );
    println!("database_url = {}", opt(o.database_url_redacted()));
    println!(
        "hard_limit = {}",
        opt(o.hard_limit_bytes().map(|b| b.to_string()))
    );
    println!(
        "min_free = {}",
        opt(o.min_free_space().map(|m| m.to_string()))
    );
    println!(
        "durability = {}",
        match o.durability_mode() {
            imgcache::Durability::Immediate => "immediate".to_owned(),
            imgcache::Durability::Group { interval, bytes } => format!(
                "group (checkpoint within {} or {bytes} bytes)",
                humantime::format_duration(interval)
            ),
            _ => "other".to_owned(),
        }
    );
    println!("origin = {}", imgcache::CacheOptions::redact_url(&c.origin));
    println!("listen = {}", c.listen);
    println!("transport = {:?}", args.transport);
    println!("prefix = {}", args.prefix);
    println!("admin_listen = {}", c.admin_listen);
    println!(
        "admin_token = {}",
        match &c.admin_token_file {
            Some(f) => format!("required (from {})", f.display()),
            None => "none (loopback only)".into(),
        }
    );
    println!(
        "prefetch_token = {}",
        if c.prefetch_token.is_some() {
            "set"
        } else {
            "none"
        }
    );
    println!("public = {}", c.public);
    println!("authorization_ttl = {}", c.authorization_ttl.as_secs_f64());
    println!(
        "prefetch_workers = {}",
        match args.prefetch_workers {
            0 => "0 (no prefetcher: queued images wait for `imgcache prefetch`)".to_owned(),
            n => n.to_string(),
        }
    );
    println!(
        "prune_interval = {}",
        opt(c.prune_interval.map(|d| d.as_secs_f64().to_string()))
    );
    println!(
        "clean_interval = {}",
        opt(c.clean_interval.map(|d| d.as_secs_f64().to_string()))
    );
    println!("shutdown_timeout = {}", c.shutdown_timeout.as_secs_f64());
    println!("send_timeout = {}", c.send_timeout.as_secs_f64());
    println!("header_timeout = {}", c.header_timeout.as_secs_f64());
    println!("descriptor_limit = {}", c.descriptors);
    println!("max_connections = {}", c.max_connections);
    println!("admin_max_connections = {}", c.admin_max_connections);
    println!("max_fills = {}", c.max_fills);
    println!("open_files = {}", c.options.open_files_kept());
    match &c.peers {
        Some(p) => {
            println!("peers = on");
            println!(
                "peer_token = required (from {})",
                c.peer_token_file
                    .as_ref()
                    .map_or_else(String::new, |f| f.display().to_string())
            );
            println!("peer_fanout = {}", p.fanout_value());
        }
        None => println!("peers = off"),
    }
}

/// The arguments that stay after the config is resolved.
struct Extra {
    transport: Transport,
    prefix: String,
    forward_auth_token: bool,
    prefetch_workers: usize,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(options: CacheOptions, settings: &Settings, args: ServeArgs) -> Result<u8, Failure> {
    let extra = Extra {
        transport: args.transport,
        prefix: args.prefix.clone(),
        forward_auth_token: args.forward_auth_token,
        prefetch_workers: args.prefetch_workers,
    };
    let workers = args.workers;
    let check = args.check_config;
    let config = args.config(options, settings)?;
    if check {
        print_config(&config, &extra);
        return Ok(0);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("imgcache-serve");
    if let Some(n) = workers {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .build()
        .map_err(|e| Failure::input(format!("cannot start the runtime: {e}")))?;
    let cache = Arc::new(config.options.clone().open()?);
    let (code, abandoned) = match runtime.block_on(serve(cache.clone(), config, extra)) {
        Ok((code, abandoned)) => (Ok(code), abandoned),
        Err(e) => (Err(e), false),
    };
    if abandoned {
        // Fill threads still blocked on the origin (their files moved to
        // invalid/ already) would wake into a runtime shutting down: the
        // hits held are written, a checkpoint is made, and the process ends
        // here.
        if let Err(e) = cache.flush() {
            tracing::warn!(error = %e, "cannot write the hits held");
        }
        // The last checkpoint a clean close would make: the next start then
        // has nothing to check.
        if let Err(e) = cache.checkpoint() {
            tracing::warn!(error = %e, "cannot make the last checkpoint");
        }
        std::process::exit(code.as_ref().map_or(1, |c| i32::from(*c)));
    }
    // Blocking work in flight (a hit's metadata update) gets a moment.
    runtime.shutdown_timeout(Duration::from_secs(5));
    // The last handle on the cache drops here, off the runtime: a store's
    // close may block (PostgreSQL's client), and writes the hits it holds.
    drop(cache);
    code
}

fn origin_of(spec: &str) -> Result<Arc<dyn Origin>, Failure> {
    if crate::is_url(spec) {
        return Ok(Arc::new(AsyncHttpOrigin::new(spec)?));
    }
    Ok(Arc::new(crate::dir_origin(spec)?))
}

/// Serves until a signal; the exit code, and whether fills were left
/// behind (invalidated, their threads still blocked).
async fn serve(
    cache: Arc<ImageCache>,
    config: Config,
    extra: Extra,
) -> Result<(u8, bool), Failure> {
    let origin = origin_of(&config.origin)?;
    let dir = cache.options().image_cache_dir().display().to_string();
    let metrics = Arc::new(Metrics::new());
    let options = ServeOptions::default()
        .prefix(&extra.prefix)
        .forward_auth_token(extra.forward_auth_token)
        .public(config.public)
        .authorization_ttl(config.authorization_ttl)
        .peers(config.peers.clone())
        .send_timeout(config.send_timeout)
        .header_timeout(config.header_timeout)
        .max_connections(Some(config.max_connections))
        .max_fills(config.max_fills);
    let service =
        ImageService::with_metrics(cache.clone(), origin.clone(), options, metrics.clone());
    // The prefetcher fills as the service does: from peers first, when on.
    let origin = service.origin().clone();
    let bind = |addr: SocketAddr| async move {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Failure::input(format!("cannot listen on {addr}: {e}")))?;
        let local = l
            .local_addr()
            .map_err(|e| Failure::input(format!("cannot listen on {addr}: {e}")))?;
        Ok::<_, Failure>((l, local))
    };
    let (listener, addr) = bind(config.listen).await?;
    let (admin_listener, admin_addr) = bind(config.admin_listen).await?;
    let jobs = {
        let (cache, origin, metrics) = (cache.clone(), origin.clone(), metrics.clone());
        let job_options = JobOptions::default()
            .prefetch_workers(extra.prefetch_workers)
            .count_origin_requests(!service.origin_counts_requests())
            .origin_token(config.prefetch_token.clone())
            .prune_interval(config.prune_interval)
            .clean_interval(config.clean_interval);
        tokio::task::spawn_blocking(move || Jobs::start(cache, origin, metrics, job_options))
            .await
            .map_err(|e| Failure::input(format!("cannot start the jobs: {e}")))?
            .map_err(|e| Failure::input(format!("cannot start the jobs: {e}")))?
    };
    let jobs = Arc::new(jobs);
    let admin = AdminService::new(
        cache.clone(),
        metrics.clone(),
        Some(jobs.clone()),
        AdminOptions::default()
            .token(config.admin_token.clone())
            .max_connections(config.admin_max_connections)
            // Management requests are small: a head within 10 s at most.
            .header_timeout(config.header_timeout.min(Duration::from_secs(10))),
    );
    println!(
        "imgcache: serving {dir} on http://{addr}{}{{id}}/file from {} ({:?}); management API on http://{admin_addr}/v2/cache",
        service.options().path_prefix(),
        imgcache::CacheOptions::redact_url(&origin.describe()),
        extra.transport
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let stop = tokio_util_stop();
    let grace = config.shutdown_timeout;
    let data = {
        let stop = stop.clone();
        let shutdown = async move { stop.cancelled().await };
        async move {
            match extra.transport {
                Transport::Sendfile => {
                    Server::new(listener, service)
                        .run_until(shutdown, grace)
                        .await
                }
                Transport::Hyper => serve_hyper_until(listener, service, shutdown, grace).await,
            }
        }
    };
    let admin_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            serve_admin(admin_listener, admin, async move { stop.cancelled().await }).await
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::input(format!("cannot wait for SIGTERM: {e}")))?;
    let signalled = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
                _ = term.recv() => tracing::info!("terminated: stopping"),
            }
            stop.cancel();
        }
    };
    let mut data = std::pin::pin!(data);
    // A signal starts the drain; a listener that fails first ends it all.
    // The grace counts from the stop.
    let (served, started) = tokio::select! {
        r = &mut data => {
            stop.cancel();
            (r, Instant::now())
        }
        () = signalled => {
            let at = Instant::now();
            (data.await, at)
        }
    };
    // A failed listener still gets the fills and jobs ended below.
    let (drained, failure) = match served {
        Ok(drained) => (drained, None),
        Err(e) => (false, Some(Failure::input(format!("listener failed: {e}")))),
    };
    let _ = admin_task.await;
    // Fills in flight: finished within what is left of the grace, or
    // stopped (their files moved to invalid/, cleaned later).
    let left = grace.saturating_sub(started.elapsed());
    let cache2 = cache.clone();
    let jobs2 = jobs.clone();
    let fills_done = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + left;
        let mut seen = cache2.commits().0;
        while !cache2.is_idle() && Instant::now() < deadline {
            seen = cache2.wait_for_commit(seen, Duration::from_millis(50).min(left));
        }
        let idle = cache2.is_idle();
        // No new fill from here (a prefetch, a late request), and the ones
        // left end at their next read.
        jobs2.signal_stop();
        cache2.stop_fills();
        // The stopped fills end at their next read; those blocked on the
        // origin are invalidated under them.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !cache2.is_idle() && Instant::now() < deadline {
            seen = cache2.wait_for_commit(seen, Duration::from_millis(50));
        }
        let moved = cache2.invalidate_fills("the server stopped before the fill ended");
        if moved > 0 {
            tracing::info!(fills = moved, "fills in flight invalidated");
        }
        // The prefetch workers' fills have ended (committed or invalidated).
        jobs2.stop();
        (idle, moved)
    })
    .await
    .unwrap_or((false, 0));
    let (fills_done, abandoned) = (fills_done.0, fills_done.1 > 0);
    tracing::info!(
        responses_finished = drained,
        fills_finished = fills_done,
        "stopped"
    );
    eprintln!(
        "imgcache: stopped ({}; {})",
        if drained {
            "every response finished"
        } else {
            "responses still in flight were cut"
        },
        if fills_done {
            "no fill in flight"
        } else {
            "fills in flight were stopped"
        }
    );
    match failure {
        Some(f) => Err(f),
        None => Ok((0, abandoned)),
    }
}

/// A stop signal shared by the listeners.
fn tokio_util_stop() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}
