//! Serving images over HTTP (feature `serve`): Glance's
//! `GET`/`HEAD /v2/images/{image_id}/file` in front of an [`Origin`].
//!
//! Two transports share one planner (the same statuses, headers, ranges
//! and conditional requests):
//!
//! - [`ImageService`]: a tower `Service` (hyper 1.x), to mount in an axum
//!   `Router` or any hyper server, HTTP/1.1 or HTTP/2. hyper writes bodies
//!   from user space, so this path reads the file on tokio's blocking pool
//!   in 256 KiB chunks and hands hyper those bytes: one copy, no runtime
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

use crate::origin::Origin;
use crate::ImageCache;

mod body;
mod plan;
mod server;

pub use body::ImageBody;
pub use plan::{range_ask, route, status_of, RangeAsk};
pub use server::{parse_head, HeadError, RequestHead, Server};

/// How images are served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    prefix: String,
    forward_auth_token: bool,
    header_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            prefix: "/v2/images/".into(),
            forward_auth_token: false,
            header_timeout: Duration::from_secs(60),
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

    /// The path prefix.
    pub fn path_prefix(&self) -> &str {
        &self.prefix
    }
}

/// The data service: Glance's image-file path served from the cache, filled
/// from `origin` on a miss. A tower `Service` for any request body type;
/// clone it freely (it is an `Arc` inside).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use imgcache::{DirOrigin, ImageCache};
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
struct Inner {
    cache: Arc<ImageCache>,
    origin: Arc<dyn Origin>,
    options: ServeOptions,
}

impl ImageService {
    /// Serves `cache`, filling it from `origin`.
    pub fn new(cache: Arc<ImageCache>, origin: Arc<dyn Origin>, options: ServeOptions) -> Self {
        ImageService {
            inner: Arc::new(Inner {
                cache,
                origin,
                options,
            }),
        }
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
        let plan = plan::plan(
            &self.inner.cache,
            &self.inner.origin,
            &self.inner.options,
            plan::Ask {
                method: &parts.method,
                path: parts.uri.path(),
                headers: &parts.headers,
                http10: parts.version <= http::Version::HTTP_10,
            },
        )
        .await;
        tracing::debug!(
            method = %parts.method,
            path = parts.uri.path(),
            status = plan.status.as_u16(),
            source = plan.source,
            "request"
        );
        let len = plan
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut response = Response::new(ImageBody::new(plan.body, len));
        *response.status_mut() = plan.status;
        *response.headers_mut() = plan.headers;
        response
            .headers_mut()
            .insert("x-imgcache", http::HeaderValue::from_static(plan.source));
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

/// Runs `service` on `listener` with hyper (HTTP/1.1 and HTTP/2 without
/// TLS), a task per connection, until the listener fails.
pub async fn serve_hyper(
    listener: tokio::net::TcpListener,
    service: ImageService,
) -> std::io::Result<()> {
    loop {
        let Some((stream, peer)) = accept(&listener).await? else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service.respond(req).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder.serve_connection(io, svc).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
