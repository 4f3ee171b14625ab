//! `imgcache serve`: the data path over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use imgcache::serve::{serve_hyper, ImageService, ServeOptions, Server};
use imgcache::{AsyncHttpOrigin, DirOrigin, ImageCache, Origin};

use crate::Failure;

/// How `imgcache serve` writes responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Its own HTTP/1.1 connections, bodies sent with sendfile (zero-copy).
    Sendfile,
    /// hyper (HTTP/1.1 and HTTP/2 without TLS), bodies read in 256 KiB chunks.
    Hyper,
}

/// What `imgcache serve` was asked for.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where to fetch misses from: a directory (one file per id), or a URL
    /// template with {id} such as http://glance:9292/v2/images/{id}/file.
    #[arg(long, env = "IMGCACHE_ORIGIN", value_name = "DIR|URL")]
    origin: String,
    /// Address to listen on (port 0: any free port; the one chosen is printed).
    #[arg(long, env = "IMGCACHE_LISTEN", default_value = "127.0.0.1:9292")]
    listen: SocketAddr,
    /// How responses are written.
    #[arg(long, value_enum, default_value_t = Transport::Sendfile)]
    transport: Transport,
    /// Where image paths start: {prefix}{id}/file.
    #[arg(long, default_value = "/v2/images/")]
    prefix: String,
    /// Pass the client's X-Auth-Token on to the origin with the fill it starts.
    #[arg(long)]
    forward_auth_token: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(cache: ImageCache, args: ServeArgs) -> Result<u8, Failure> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("imgcache-serve");
    if let Some(n) = args.workers {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .build()
        .map_err(|e| Failure::input(format!("cannot start the runtime: {e}")))?;
    // The last handle on the cache drops here, off the runtime: a store's
    // close may block (PostgreSQL's client).
    let cache = Arc::new(cache);
    let code = runtime.block_on(serve(cache.clone(), args));
    // Blocking work in flight (a hit's metadata update) gets a moment.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    drop(cache);
    code
}

async fn serve(cache: Arc<ImageCache>, args: ServeArgs) -> Result<u8, Failure> {
    let origin: Arc<dyn Origin> =
        if args.origin.starts_with("http://") || args.origin.starts_with("https://") {
            Arc::new(AsyncHttpOrigin::new(&args.origin)?)
        } else {
            let dir = PathBuf::from(args.origin.strip_prefix("dir:").unwrap_or(&args.origin));
            if !dir.is_dir() {
                return Err(Failure::input(format!(
                    "origin {:?} is neither a directory nor an http(s) URL template",
                    args.origin
                )));
            }
            Arc::new(DirOrigin::new(dir))
        };
    let dir = cache.options().image_cache_dir().display().to_string();
    let options = ServeOptions::default()
        .prefix(&args.prefix)
        .forward_auth_token(args.forward_auth_token);
    let service = ImageService::new(cache, origin.clone(), options);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure::input(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::input(format!("cannot listen on {}: {e}", args.listen)))?;
    println!(
        "imgcache: serving {dir} on http://{addr}{}{{id}}/file from {} ({:?})",
        service.options().path_prefix(),
        origin.describe(),
        args.transport
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let served = async {
        match args.transport {
            Transport::Sendfile => Server::new(listener, service).run().await,
            Transport::Hyper => serve_hyper(listener, service).await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::input(format!("cannot wait for SIGTERM: {e}")))?;
    // On SIGINT or SIGTERM: stop, and let the cache's last handle go (the
    // hits held in memory are written). Responses in flight are cut.
    tokio::select! {
        r = served => r.map(|()| 0).map_err(|e| Failure::input(format!("listener failed: {e}"))),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: stopping");
            Ok(0)
        }
        _ = term.recv() => {
            tracing::info!("terminated: stopping");
            Ok(0)
        }
    }
}
