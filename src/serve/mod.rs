//! Serving images over HTTP (feature `serve`): Glance's
//! `GET`/`HEAD /v2/images/{image_id}/file` in front of an [`Origin`].
//!
//! Two transports share one planner (the same statuses, headers, ranges
//! and conditional requests):
//!
//! - [`ImageService`]: a tower `Service` (hyper 1.x), to mount in an axum
//!   `Router` or any hyper server, HTTP/1.1 or HTTP/2. hyper writes bodies
//!   from user space, so this path reads the file on tokio's blocking pool
//!   in one read up to 1 MiB, 256 KiB chunks past that, and hands hyper those bytes: one copy, no runtime
//!   thread blocked on the disk. [`serve_hyper`] runs it on a listener.
//! - [`Server`]: what `imgcache serve` runs — it owns its connections,
//!   speaks plain HTTP/1.1 (keep-alive, pipelining) and writes the headers
//!   itself, then sends the body with `sendfile(2)` straight from the page
//!   cache to the socket, for hits *and* for clients following a fill
//!   (Linux; a read/write loop elsewhere and where the kernel refuses). No
//!   TLS and no HTTP/2 there: put a TLS terminator in front, or mount the
//!   service in your own stack.
//!
//! # What a request gets
//!
//! | case | response |
//! |---|---|
//! | hit | `200`, `Content-Length`, `ETag`, `Accept-Ranges: bytes`, `Content-MD5` (hex, as Glance) when the checksum is an MD5 |
//! | `Range: bytes=a-b` (one range) | `206` with `Content-Range`; outside the image `416` with `Content-Range: bytes */size` |
//! | several ranges | the whole image, `200` (HTTP lets a server ignore `Range`) |
//! | `If-None-Match` matching | `304` |
//! | `If-Range` not matching the `ETag` | the whole image, `200` |
//! | miss | one fill per image, however many clients ask; every client streams the filling file at its own pace; a `Range` starts as soon as its first bytes landed, and its last byte waits for the commit (as every response streamed from a fill does) |
//! | origin `404` | `404` |
//! | origin failure, wrong size or checksum | `502` if before the headers; after them, the body is cut (the connection closed early) |
//! | invalid id | `400`; other paths `404`; other methods `405` |
//!
//! The `ETag` is the image's checksum where known (as Glance stores it),
//! else its CRC-32 and size; a miss whose origin sent no checksum has
//! none. A response that streams from a fill holds back the last byte it
//! carries until the fill has committed, so no response ends cleanly on
//! bytes that are not verified. A `HEAD` on a miss starts the fill, as
//! nginx's `proxy_cache` does.
//!
//! With [`ServeOptions::forward_auth_token`], a client's `X-Auth-Token`
//! goes to the origin with the fill it starts. Clients that join a fill
//! in progress, and clients of a hit, are not checked against the origin
//! here: serve only clients that may read every image, or put the
//! authorization in front.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};

use crate::id::ImageId;
use crate::origin::Origin;
use crate::ImageCache;

#[cfg(feature = "admin")]
pub mod admin;
mod body;
#[cfg(feature = "admin")]
pub mod jobs;
pub(crate) mod limits;
mod metrics;
pub mod peers;
mod plan;
mod server;

pub use body::ImageBody;
pub use limits::{descriptor_budget, raise_descriptor_limit, DESCRIPTOR_RESERVE};
pub use metrics::{Metrics, Outcome};
pub use plan::status_of;
#[cfg_attr(not(any(test, feature = "test-utils")), allow(unused_imports))]
pub(crate) use plan::{range_ask, route, RangeAsk};
#[cfg_attr(not(any(test, feature = "test-utils")), allow(unused_imports))]
pub(crate) use server::parse_head;
pub use server::Server;

/// How images are served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    prefix: String,
    forward_auth_token: bool,
    header_timeout: Duration,
    public: bool,
    authorization_ttl: Duration,
    peers: Option<peers::PeerOptions>,
    send_timeout: Duration,
    max_connections: Option<usize>,
    max_fills: usize,
}

/// Fills the data service runs at once by default.
pub const DEFAULT_MAX_FILLS: usize = 64;

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            prefix: "/v2/images/".into(),
            forward_auth_token: false,
            header_timeout: Duration::from_secs(60),
            public: false,
            authorization_ttl: Duration::ZERO,
            peers: None,
            send_timeout: Duration::from_secs(60),
            max_connections: None,
            max_fills: DEFAULT_MAX_FILLS,
        }
    }
}

impl ServeOptions {
    /// Where image paths start (default Glance's `/v2/images/`): an image
    /// is `{prefix}{id}/file`. A missing leading or trailing `/` is added.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        let mut p = prefix.into();
        if !p.starts_with('/') {
            p.insert(0, '/');
        }
        if !p.ends_with('/') {
            p.push('/');
        }
        self.prefix = p;
        self
    }

    /// Whether a client's `X-Auth-Token` goes to the origin with the fill
    /// it starts (default no).
    pub fn forward_auth_token(mut self, yes: bool) -> Self {
        self.forward_auth_token = yes;
        self
    }

    /// How long [`Server`] waits for a request's head, on a new
    /// connection or between keep-alive requests (default 60 s).
    pub fn header_timeout(mut self, d: Duration) -> Self {
        self.header_timeout = d;
        self
    }

    /// Whether every client may read every image (default no). When not
    /// public, each request is first authorized with the origin
    /// ([`Origin::authorize`]: an HTTP origin gets a `HEAD` carrying the
    /// client's `X-Auth-Token`), and a client the origin refuses gets the
    /// origin's `401`, `403` or `404`, cached image or not; the token is
    /// then always passed on with the fill a client starts. An origin with
    /// no notion of clients (a directory) allows everyone.
    pub fn public(mut self, yes: bool) -> Self {
        self.public = yes;
        self
    }

    /// How long the origin's yes for a token and an image is remembered
    /// (default zero: every request asks). A positive cache only: a no is
    /// never remembered, and a token revoked at the origin is still served
    /// until its entries expire — keep this short.
    pub fn authorization_ttl(mut self, ttl: Duration) -> Self {
        self.authorization_ttl = ttl;
        self
    }

    /// Fills misses from the fleet's peers first, and serves peers (see
    /// [`peers`]); needs a store shared by the fleet (`centralized_db`)
    /// and each node's URL ([`crate::CacheOptions::node_url`]) to be
    /// where its data port answers. Default off.
    pub fn peers(mut self, peers: Option<peers::PeerOptions>) -> Self {
        self.peers = peers;
        self
    }

    /// Peer fill, if on.
    pub fn peer_options(&self) -> Option<&peers::PeerOptions> {
        self.peers.as_ref()
    }

    /// How long a response may wait for its client to take a byte before
    /// it is cut off (default 60 s, as nginx's `send_timeout`): a client
    /// that stops reading holds its connection no longer. Waiting for the
    /// origin is never timed.
    pub fn send_timeout(mut self, d: Duration) -> Self {
        self.send_timeout = d;
        self
    }

    /// The most connections served at once (default unbounded); more wait
    /// in the listen backlog, holding no descriptor. See
    /// [`descriptor_budget`].
    pub fn max_connections(mut self, n: Option<usize>) -> Self {
        self.max_connections = n;
        self
    }

    /// The most fills (each a thread and an origin connection) run at once
    /// (default [`DEFAULT_MAX_FILLS`]; at least one): a miss past it is
    /// answered `503` with `Retry-After`, hits and followers of fills in
    /// progress are served as ever.
    pub fn max_fills(mut self, n: usize) -> Self {
        self.max_fills = n.max(1);
        self
    }

    /// The send timeout.
    pub fn send_timeout_value(&self) -> Duration {
        self.send_timeout
    }

    /// The connection cap.
    pub fn max_connections_value(&self) -> Option<usize> {
        self.max_connections
    }

    /// The fill cap.
    pub fn max_fills_value(&self) -> usize {
        self.max_fills
    }

    /// The listener's bounds these options make.
    pub(crate) fn limits(&self) -> limits::Limits {
        limits::Limits::new(self.header_timeout, self.send_timeout, self.max_connections)
    }

    /// The path prefix.
    pub fn path_prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether every client may read every image.
    pub fn is_public(&self) -> bool {
        self.public
    }

    /// How long an authorization is remembered.
    pub fn authorization_ttl_value(&self) -> Duration {
        self.authorization_ttl
    }
}

/// The origin's recent yeses, by token (hashed) and image.
#[derive(Debug)]
pub(crate) struct Grants {
    ttl: Duration,
    map: parking_lot::Mutex<std::collections::HashMap<([u8; 32], ImageId), std::time::Instant>>,
}

/// The most grants remembered; past it, the oldest half is forgotten.
const MAX_GRANTS: usize = 65_536;

impl Grants {
    fn new(ttl: Duration) -> Self {
        Grants {
            ttl,
            map: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether yeses are remembered at all (a TTL above zero).
    pub(crate) fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The key of `token` and `id` (the token itself is not kept).
    pub(crate) fn key(&self, token: Option<&str>, id: &ImageId) -> ([u8; 32], ImageId) {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(token.unwrap_or("").as_bytes());
        (digest.into(), id.clone())
    }

    /// Whether `key` was granted within the TTL.
    pub(crate) fn holds(&self, key: &([u8; 32], ImageId)) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let map = self.map.lock();
        map.get(key).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Remembers a yes for `key`.
    pub(crate) fn grant(&self, key: ([u8; 32], ImageId)) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.map.lock();
        if map.len() >= MAX_GRANTS {
            let ttl = self.ttl;
            map.retain(|_, at| at.elapsed() < ttl);
            if map.len() >= MAX_GRANTS {
                map.clear();
            }
        }
        map.insert(key, std::time::Instant::now());
    }
}

/// The data service: Glance's image-file path served from the cache, filled
/// from `origin` on a miss. A tower `Service` for any request body type;
/// clone it freely (it is an `Arc` inside).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use imgcache::ImageCache;
/// use imgcache::origin::DirOrigin;
/// use imgcache::serve::{serve_hyper, ImageService, ServeOptions};
///
/// let cache = Arc::new(ImageCache::builder("/var/lib/imgcache").open()?);
/// let service = ImageService::new(cache, Arc::new(DirOrigin::new("/srv/images")), ServeOptions::default());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9292").await?;
/// serve_hyper(listener, service).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ImageService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cache: Arc<ImageCache>,
    /// Where fills come from: the origin, or the fleet's peers first.
    pub(crate) origin: Arc<dyn Origin>,
    /// The origin itself: for pass-throughs, which never take part in the
    /// fleet's fills.
    pub(crate) raw_origin: Arc<dyn Origin>,
    /// Cached files checked whole (their CRC-32) before they were first
    /// sent to a peer, by the identity of the file checked.
    pub(crate) verified: parking_lot::Mutex<std::collections::HashMap<ImageId, [u64; 4]>>,
    /// Whether `origin` counts its own origin requests (peers first).
    pub(crate) counts_fills: bool,
    /// Peer transfers this node may still serve at once.
    pub(crate) peer_slots: Arc<tokio::sync::Semaphore>,
    /// Fills this service may still start (each holds one while it runs).
    pub(crate) fill_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) options: ServeOptions,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) grants: Grants,
    requests: std::sync::atomic::AtomicU64,
    /// This process's id, read once (`getpid` is a system call).
    pid: u32,
}

impl Inner {
    /// Counts a planned response, and gives it the counter of its bytes.
    pub(crate) fn account(&self, plan: &mut plan::Plan) {
        let outcome = match plan.source {
            "hit" => Outcome::Hit,
            "miss" => Outcome::Miss,
            "follow" => Outcome::Follow,
            "bypass" => Outcome::Bypass,
            "denied" => Outcome::Denied,
            "peer" => Outcome::Peer,
            _ => Outcome::Error,
        };
        self.metrics.request(outcome);
        plan.served = match outcome {
            Outcome::Hit => Some(self.metrics.served_counter("cache")),
            Outcome::Miss | Outcome::Follow | Outcome::Bypass => {
                Some(self.metrics.served_counter("origin"))
            }
            Outcome::Peer => Some(self.metrics.served_counter("peer")),
            _ => None,
        };
    }

    /// A new request id, as OpenStack's services send them.
    pub(crate) fn request_id(&self) -> String {
        let n = self
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("req-{:08x}-{n:08x}", self.pid)
    }
}

impl ImageService {
    /// Serves `cache`, filling it from `origin`, with counters of its own.
    pub fn new(cache: Arc<ImageCache>, origin: Arc<dyn Origin>, options: ServeOptions) -> Self {
        Self::with_metrics(cache, origin, options, Arc::new(Metrics::new()))
    }

    /// Serves `cache`, filling it from `origin`, counting into `metrics`
    /// (shared with a management API and the jobs).
    pub fn with_metrics(
        cache: Arc<ImageCache>,
        origin: Arc<dyn Origin>,
        options: ServeOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        let grants = Grants::new(options.authorization_ttl);
        let fanout = options
            .peers
            .as_ref()
            .map_or(0, peers::PeerOptions::fanout_value);
        let peer_origin = options.peers.as_ref().and_then(|p| {
            peers::PeerOrigin::new(
                origin.clone(),
                cache.clone(),
                p,
                &options.prefix,
                metrics.clone(),
            )
        });
        let counts_fills = peer_origin.is_some();
        let raw_origin = origin.clone();
        let origin: Arc<dyn Origin> = match peer_origin {
            Some(p) => Arc::new(p),
            None => origin,
        };
        ImageService {
            inner: Arc::new(Inner {
                cache,
                origin,
                raw_origin,
                verified: parking_lot::Mutex::default(),
                counts_fills,
                peer_slots: Arc::new(tokio::sync::Semaphore::new(fanout)),
                fill_slots: Arc::new(tokio::sync::Semaphore::new(options.max_fills)),
                options,
                metrics,
                grants,
                requests: std::sync::atomic::AtomicU64::new(0),
                pid: std::process::id(),
            }),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Where fills come from: the origin, or, with peer fill on, the
    /// fleet first (an [`Origin`] in front of the one given).
    pub fn origin(&self) -> &Arc<dyn Origin> {
        &self.inner.origin
    }

    /// Whether [`ImageService::origin`] counts its own origin requests in
    /// the metrics (peer fill on): a prefetcher filling through it should
    /// not count them again.
    pub fn origin_counts_requests(&self) -> bool {
        self.inner.counts_fills
    }

    /// The cache served.
    pub fn cache(&self) -> &Arc<ImageCache> {
        &self.inner.cache
    }

    /// The options.
    pub fn options(&self) -> &ServeOptions {
        &self.inner.options
    }

    /// Answers one request.
    pub async fn respond<B>(&self, request: Request<B>) -> Response<ImageBody> {
        let (parts, _body) = request.into_parts();
        let request_id = self.inner.request_id();
        let mut plan = plan::plan(
            &self.inner,
            plan::Ask {
                method: &parts.method,
                path: parts.uri.path(),
                headers: &parts.headers,
                http10: parts.version <= http::Version::HTTP_10,
            },
        )
        .await;
        self.inner.account(&mut plan);
        tracing::info!(
            request_id = %request_id,
            method = %parts.method,
            path = parts.uri.path(),
            status = plan.status.as_u16(),
            result = plan.source,
            "request"
        );
        let len = plan
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut response = Response::new(ImageBody::new(plan.body, len, plan.served, plan.hold));
        *response.status_mut() = plan.status;
        *response.headers_mut() = plan.headers;
        response
            .headers_mut()
            .insert("x-imgcache", http::HeaderValue::from_static(plan.source));
        if let Ok(v) = http::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-openstack-request-id", v);
        }
        response
    }
}

impl<B: Send + 'static> tower_service::Service<Request<B>> for ImageService {
    type Response = Response<ImageBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ImageBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.respond(request).await) })
    }
}

/// Compares without leaking, by its time, where two tokens first differ.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Accepts a connection; `None` after an error that concerns one
/// connection or a passing shortage (descriptors, memory), after a pause
/// for the latter; `Err` only for errors of the listener itself.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
) -> std::io::Result<Option<(tokio::net::TcpStream, std::net::SocketAddr)>> {
    use std::io::ErrorKind;
    match listener.accept().await {
        Ok(pair) => Ok(Some(pair)),
        Err(e) => match e.kind() {
            ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock => Ok(None),
            // EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for descriptors to close.
            _ if e.raw_os_error().is_some_and(|n| {
                use nix::errno::Errno;
                [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
                    .contains(&Errno::from_raw(n))
            }) =>
            {
                tracing::warn!(error = %e, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

/// Waits until the connection has sent enough to tell its protocol: one
/// byte that cannot begin HTTP/2's preface, or the whole preface (24
/// bytes); `false` if it closed first.
async fn preface(stream: &tokio::net::TcpStream, http1_only: bool) -> bool {
    const H2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if http1_only || n >= H2.len() || buf[..n] != H2[..n] {
            return true;
        }
        // A part of the preface: wait a moment for the rest (the socket
        // stays readable while these bytes are unread, so readiness cannot
        // tell new bytes from these).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `service` on `listener` with hyper (HTTP/1.1 and HTTP/2 without
/// TLS), a task per connection, until the listener fails.
pub async fn serve_hyper(
    listener: tokio::net::TcpListener,
    service: ImageService,
) -> std::io::Result<()> {
    serve_hyper_until(listener, service, std::future::pending(), Duration::ZERO)
        .await
        .map(drop)
}

/// [`serve_hyper`] until `shutdown` resolves: then no connection is
/// accepted, idle ones close, and responses in flight get up to `grace` to
/// finish. `Ok(true)` if they all did.
pub async fn serve_hyper_until(
    listener: tokio::net::TcpListener,
    service: ImageService,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<bool> {
    let limits = service.options().limits();
    let svc = hyper::service::service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.respond(req).await) }
    });
    run_hyper(listener, svc, shutdown, grace, limits).await
}

/// Serves `svc` with hyper until `shutdown`, then drains for `grace`,
/// within `limits` (connection slots, head and send timeouts).
pub(crate) async fn run_hyper<S, B>(
    listener: tokio::net::TcpListener,
    svc: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: limits::Limits,
) -> std::io::Result<bool>
where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // A head must arrive whole within the header timeout, which hyper
    // also runs while a keep-alive connection waits for its next request.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = limits.slot() => s,
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a?,
            () = &mut shutdown => break,
        };
        let Some((stream, peer)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let svc = svc.clone();
        let header_timeout = limits.header_timeout;
        let send_timeout = limits.send_timeout;
        let http1_only = limits.http1_only;
        let graceful_ref = graceful.watcher();
        tokio::spawn(async move {
            // The bytes that tell HTTP/1 from HTTP/2 (hyper reads them
            // with no timer of its own) within the header timeout too: a
            // connection that never speaks, or stops inside the preface,
            // is closed, as one whose head never ends is.
            if !tokio::time::timeout(header_timeout, preface(&stream, http1_only))
                .await
                .unwrap_or(false)
            {
                tracing::debug!(%peer, "no request within the header timeout");
                drop(graceful_ref);
                return;
            }
            let watcher = graceful_ref;
            let io = hyper_util::rt::TokioIo::new(limits::SendTimeout::new(stream, send_timeout));
            let served = if http1_only {
                watcher
                    .watch(
                        builder
                            .clone()
                            .http1_only()
                            .serve_connection(io, svc)
                            .into_owned(),
                    )
                    .await
            } else {
                watcher
                    .watch(builder.serve_connection(io, svc).into_owned())
                    .await
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    Ok(tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok())
}
