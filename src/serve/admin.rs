//! Glance's cache management API on a listener of its own (feature
//! `admin`), never on the data port: `/v2/cache` (Image API 2.14 and
//! 2.18), the legacy `/cached_images` and `/queued_images` paths, and
//! `/metrics` (Prometheus) and `/healthz`.
//!
//! | request | response |
//! |---|---|
//! | `GET /v2/cache` | `200` `{"cached_images": [{"image_id", "hits", "last_accessed", "last_modified", "size"}], "queued_images": [ids], "caching_images": [{"image_id", "size", "bytes_written", "followers"}]}` (times as Unix seconds, as Glance's) |
//! | `PUT /v2/cache/{id}` | `202`: queued, and fetched at once by the prefetch workers (Glance's immediate caching) |
//! | `DELETE /v2/cache/{id}` | `204`; `404` if neither cached nor queued |
//! | `DELETE /v2/cache` | `204`; header `x-image-cache-clear-target`: `cache`, `queue`, or absent/empty for both; anything else `400` |
//! | `POST /v2/cache/prune` | `200` `{"total_files_pruned", "total_bytes_pruned"}` |
//! | `POST /v2/cache/clean` | `200` `{"total_files_cleaned", "total_bytes_cleaned", "invalid_files_cleaned", "stalled_files_cleaned"}` |
//! | `GET /v2/cache/nodes/{id}` | `200` the URLs of the nodes holding it (centralized_db); `404` if none does; `409` with another driver |
//! | `GET /cached_images`, `DELETE /cached_images[/{id}]`, `GET /queued_images`, `PUT`/`DELETE /queued_images/{id}`, `DELETE /queued_images` | Glance's v1 middleware shapes (`{"cached_images": …}`, `{"num_deleted": n}`); a `PUT` there only queues, for the prefetcher's next pass over the queue; also under `/v1` and with `-` for `_` |
//! | `GET /metrics` | `200`, OpenMetrics text (which Prometheus scrapes) |
//! | `GET /healthz` | `200` `ok` when the metadata store answers, else `503` (no token needed) |
//!
//! Errors are JSON, `{"code": 404, "title": "Not Found", "message": "…"}`:
//! an invalid id `400`, an unknown one `404`, another method `405` with
//! `Allow`, a missing or wrong token `401`.
//!
//! With a token ([`AdminOptions::token`]), every request but `/healthz`
//! must carry it, as `Authorization: Bearer <token>` or `X-Auth-Token`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use super::jobs::Jobs;
use super::Metrics;
use crate::error::Error;
use crate::id::ImageId;
use crate::ImageCache;

/// What a management request asks for, as [`route`] reads its method and
/// path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRoute {
    /// `GET /v2/cache`.
    State,
    /// `PUT /v2/cache/{id}`.
    Queue(ImageId),
    /// `DELETE /v2/cache/{id}`.
    Delete(ImageId),
    /// `DELETE /v2/cache`.
    Clear,
    /// `POST /v2/cache/prune`.
    Prune,
    /// `POST /v2/cache/clean`.
    Clean,
    /// `GET /v2/cache/nodes/{id}`.
    Nodes(ImageId),
    /// `GET /cached_images` (legacy).
    LegacyCached,
    /// `DELETE /cached_images` (legacy).
    LegacyDeleteAllCached,
    /// `DELETE /cached_images/{id}` (legacy).
    LegacyDeleteCached(ImageId),
    /// `GET /queued_images` (legacy).
    LegacyQueued,
    /// `PUT /queued_images/{id}` (legacy).
    LegacyQueue(ImageId),
    /// `DELETE /queued_images/{id}` (legacy).
    LegacyDeleteQueued(ImageId),
    /// `DELETE /queued_images` (legacy).
    LegacyDeleteAllQueued,
    /// `GET /metrics`.
    Metrics,
    /// `GET /healthz`.
    Health,
    /// A known path, another method: `405` with these.
    MethodNotAllowed(&'static str),
    /// A path with an invalid image id: `400`.
    BadId(String),
    /// Anything else: `404`.
    NotFound,
}

/// Reads a management request's method and path (the query ignored; the
/// id percent-decoded). Never panics, whatever the input.
pub fn route(method: &Method, path: &str) -> AdminRoute {
    use AdminRoute as R;
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let id = |raw: &str| -> Result<ImageId, String> {
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| format!("image id {raw:?} is not UTF-8"))?;
        ImageId::new(decoded.as_ref()).map_err(|e| e.to_string())
    };
    let with_id = |raw: &str, allowed: &'static str, f: &dyn Fn(ImageId) -> Option<R>| -> R {
        match id(raw) {
            Err(e) => R::BadId(e),
            Ok(id) => f(id).unwrap_or(R::MethodNotAllowed(allowed)),
        }
    };
    let m = method.clone();
    match segments.as_slice() {
        ["healthz"] => match m {
            Method::GET | Method::HEAD => R::Health,
            _ => R::MethodNotAllowed("GET"),
        },
        ["metrics"] => match m {
            Method::GET | Method::HEAD => R::Metrics,
            _ => R::MethodNotAllowed("GET"),
        },
        ["v2", "cache"] => match m {
            Method::GET => R::State,
            Method::DELETE => R::Clear,
            _ => R::MethodNotAllowed("GET, DELETE"),
        },
        ["v2", "cache", "prune"] => match m {
            Method::POST => R::Prune,
            _ => R::MethodNotAllowed("POST"),
        },
        ["v2", "cache", "clean"] => match m {
            Method::POST => R::Clean,
            _ => R::MethodNotAllowed("POST"),
        },
        ["v2", "cache", "nodes", raw] => {
            with_id(raw, "GET", &|id| (m == Method::GET).then_some(R::Nodes(id)))
        }
        ["v2", "cache", raw] => with_id(raw, "DELETE, PUT", &|id| match m {
            Method::PUT => Some(R::Queue(id)),
            Method::DELETE => Some(R::Delete(id)),
            _ => None,
        }),
        rest => {
            let rest = match rest {
                ["v1", tail @ ..] => tail,
                tail => tail,
            };
            match rest {
                [c] if is_legacy(c, "cached") => match m {
                    Method::GET => R::LegacyCached,
                    Method::DELETE => R::LegacyDeleteAllCached,
                    _ => R::MethodNotAllowed("GET, DELETE"),
                },
                [c, raw] if is_legacy(c, "cached") => with_id(raw, "DELETE", &|id| {
                    (m == Method::DELETE).then_some(R::LegacyDeleteCached(id))
                }),
                [q] if is_legacy(q, "queued") => match m {
                    Method::GET => R::LegacyQueued,
                    Method::DELETE => R::LegacyDeleteAllQueued,
                    _ => R::MethodNotAllowed("GET, DELETE"),
                },
                [q, raw] if is_legacy(q, "queued") => with_id(raw, "DELETE, PUT", &|id| match m {
                    Method::PUT => Some(R::LegacyQueue(id)),
                    Method::DELETE => Some(R::LegacyDeleteQueued(id)),
                    _ => None,
                }),
                _ => R::NotFound,
            }
        }
    }
}

/// `cached_images`, `cached-images` (and the same for `queued`).
fn is_legacy(segment: &str, which: &str) -> bool {
    segment
        .strip_prefix(which)
        .is_some_and(|r| r == "_images" || r == "-images")
}

/// The token a request carries: `Authorization: Bearer <t>`, else
/// `X-Auth-Token: <t>`.
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some((scheme, t)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(t.trim());
            }
        }
        return None;
    }
    headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// How the management API runs.
#[derive(Clone)]
pub struct AdminOptions {
    token: Option<String>,
    max_connections: usize,
    header_timeout: std::time::Duration,
    send_timeout: std::time::Duration,
}

/// Management connections served at once by default.
pub const DEFAULT_ADMIN_CONNECTIONS: usize = 64;

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            token: None,
            max_connections: DEFAULT_ADMIN_CONNECTIONS,
            header_timeout: std::time::Duration::from_secs(10),
            send_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .field("send_timeout", &self.send_timeout)
            .finish()
    }
}

impl AdminOptions {
    /// Requires `token` of every request but `/healthz` (default: none
    /// required; keep such a listener on loopback).
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Whether a token is required.
    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// The most management connections served at once (default
    /// [`DEFAULT_ADMIN_CONNECTIONS`]; at least one): more wait in the
    /// backlog, holding no descriptor, so that no number of them (no token
    /// is needed to open one) takes the data port's descriptors.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a request head may take, and a connection sit idle
    /// between requests (default 10 s).
    pub fn header_timeout(mut self, d: std::time::Duration) -> Self {
        self.header_timeout = d;
        self
    }

    /// How long a response may wait for its client to take a byte
    /// (default 30 s).
    pub fn send_timeout(mut self, d: std::time::Duration) -> Self {
        self.send_timeout = d;
        self
    }

    /// The connection cap.
    pub fn max_connections_value(&self) -> usize {
        self.max_connections
    }
}

/// The management API, as a tower `Service` (clone it freely).
#[derive(Debug, Clone)]
pub struct AdminService {
    inner: Arc<AdminInner>,
}

#[derive(Debug)]
struct AdminInner {
    cache: Arc<ImageCache>,
    metrics: Arc<Metrics>,
    jobs: Option<Arc<Jobs>>,
    options: AdminOptions,
}

/// A JSON (or text) response.
type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Option<Value>) -> Reply {
    let mut r = match body {
        Some(v) => {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        None => Response::new(Full::new(Bytes::new())),
    };
    *r.status_mut() = status;
    r
}

/// An error, as JSON.
fn fail(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    reply(
        status,
        Some(json!({
            "code": status.as_u16(),
            "title": status.canonical_reason().unwrap_or(""),
            "message": message.to_string(),
        })),
    )
}

/// The status of a failed cache call.
fn failed(e: &Error) -> Reply {
    let status = match e {
        Error::InvalidId { .. } => StatusCode::BAD_REQUEST,
        Error::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        tracing::warn!(error = %e, "management request failed");
    }
    fail(status, e)
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl AdminService {
    /// The API for `cache`, reporting `metrics`, with `jobs` to hand
    /// queued images to (`None`: `PUT` only queues them).
    pub fn new(
        cache: Arc<ImageCache>,
        metrics: Arc<Metrics>,
        jobs: Option<Arc<Jobs>>,
        options: AdminOptions,
    ) -> Self {
        AdminService {
            inner: Arc::new(AdminInner {
                cache,
                metrics,
                jobs,
                options,
            }),
        }
    }

    /// Answers one request.
    pub async fn respond<B>(&self, request: Request<B>) -> Reply {
        let (parts, _body) = request.into_parts();
        let route = route(&parts.method, parts.uri.path());
        if let (Some(want), false) = (&self.inner.options.token, route == AdminRoute::Health) {
            let ok = presented_token(&parts.headers).is_some_and(|t| super::same_token(t, want));
            if !ok {
                let mut r = fail(StatusCode::UNAUTHORIZED, "a valid token is required");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"imgcache\""),
                );
                return r;
            }
        }
        let this = self.clone();
        let headers = parts.headers;
        let method = parts.method.clone();
        // The cache's calls block: on the blocking pool.
        let answered = tokio::task::spawn_blocking(move || this.answer(route, &headers)).await;
        let r = answered.unwrap_or_else(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e));
        tracing::info!(method = %method, path = parts.uri.path(), status = r.status().as_u16(), "management request");
        r
    }

    fn answer(&self, route: AdminRoute, headers: &HeaderMap) -> Reply {
        use AdminRoute as R;
        let cache = &self.inner.cache;
        let result: Result<Reply, Error> = (|| {
            Ok(match route {
                R::Health => match cache.cache_size() {
                    Ok(_) => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
                    Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e),
                },
                R::Metrics => {
                    self.inner.metrics.observe(cache);
                    let mut r = Response::new(Full::new(Bytes::from(self.inner.metrics.encode())));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        // prometheus-client writes OpenMetrics text.
                        HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                R::State => reply(
                    StatusCode::OK,
                    Some(json!({
                        "cached_images": self.cached()?,
                        "queued_images": cache.queued_images()?,
                        "caching_images": cache.fills_in_progress(),
                    })),
                ),
                R::Queue(id) => {
                    cache.queue_image(&id)?;
                    if let Some(jobs) = &self.inner.jobs {
                        if cache.is_queued(&id)? {
                            jobs.submit(id);
                        }
                    }
                    reply(StatusCode::ACCEPTED, None)
                }
                R::Delete(id) => {
                    let cached = cache.delete_cached_image(&id)?;
                    let queued = cache.delete_queued_image(&id)?;
                    if cached || queued {
                        reply(StatusCode::NO_CONTENT, None)
                    } else {
                        fail(StatusCode::NOT_FOUND, format!("image {id} not found"))
                    }
                }
                R::Clear => {
                    let target = headers
                        .get("x-image-cache-clear-target")
                        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
                    match target.as_deref().unwrap_or("") {
                        "" => {
                            cache.delete_all_cached_images()?;
                            cache.delete_all_queued_images()?;
                        }
                        "cache" => {
                            cache.delete_all_cached_images()?;
                        }
                        "queue" => {
                            cache.delete_all_queued_images()?;
                        }
                        _ => {
                            return Ok(fail(
                                StatusCode::BAD_REQUEST,
                                "If provided 'x-image-cache-clear-target' must be 'cache', 'queue' or empty string.",
                            ))
                        }
                    }
                    reply(StatusCode::NO_CONTENT, None)
                }
                R::Prune => {
                    let report = cache.prune()?;
                    self.inner.metrics.evicted(&report);
                    self.inner.metrics.job_run("prune", true);
                    reply(
                        StatusCode::OK,
                        Some(json!({
                            "total_files_pruned": report.files(),
                            "total_bytes_pruned": report.bytes,
                        })),
                    )
                }
                R::Clean => {
                    let report = cache.clean(None)?;
                    self.inner.metrics.job_run("clean", true);
                    reply(
                        StatusCode::OK,
                        Some(json!({
                            "total_files_cleaned": report.files(),
                            "total_bytes_cleaned": report.bytes(),
                            "invalid_files_cleaned": report.invalid.len(),
                            "stalled_files_cleaned": report.stalled.len(),
                        })),
                    )
                }
                R::Nodes(id) => match cache.cached_nodes(&id)? {
                    None => fail(StatusCode::CONFLICT, "Centralized caching is not enabled"),
                    Some(nodes) if nodes.is_empty() => fail(
                        StatusCode::NOT_FOUND,
                        format!("image {id} is cached on no node"),
                    ),
                    Some(nodes) => reply(StatusCode::OK, Some(json!(nodes))),
                },
                R::LegacyCached => reply(
                    StatusCode::OK,
                    Some(json!({ "cached_images": self.cached()? })),
                ),
                R::LegacyDeleteAllCached => reply(
                    StatusCode::OK,
                    Some(json!({ "num_deleted": cache.delete_all_cached_images()? })),
                ),
                R::LegacyDeleteCached(id) => {
                    if cache.delete_cached_image(&id)? {
                        reply(StatusCode::NO_CONTENT, None)
                    } else {
                        fail(StatusCode::NOT_FOUND, format!("image {id} is not cached"))
                    }
                }
                R::LegacyQueued => reply(
                    StatusCode::OK,
                    Some(json!({ "queued_images": cache.queued_images()? })),
                ),
                // As Glance's v1: queued for the prefetcher's next pass
                // (JobOptions::queue_interval), not fetched at once.
                R::LegacyQueue(id) => {
                    cache.queue_image(&id)?;
                    reply(StatusCode::OK, Some(json!({})))
                }
                R::LegacyDeleteQueued(id) => {
                    if cache.delete_queued_image(&id)? {
                        reply(StatusCode::NO_CONTENT, None)
                    } else {
                        fail(StatusCode::NOT_FOUND, format!("image {id} is not queued"))
                    }
                }
                R::LegacyDeleteAllQueued => reply(
                    StatusCode::OK,
                    Some(json!({ "num_deleted": cache.delete_all_queued_images()? })),
                ),
                R::MethodNotAllowed(allow) => {
                    let mut r = fail(StatusCode::METHOD_NOT_ALLOWED, format!("allowed: {allow}"));
                    r.headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static(allow));
                    r
                }
                R::BadId(e) => fail(StatusCode::BAD_REQUEST, e),
                R::NotFound => fail(StatusCode::NOT_FOUND, "no such resource"),
            })
        })();
        result.unwrap_or_else(|e| failed(&e))
    }

    /// The cached images, as Glance lists them.
    fn cached(&self) -> Result<Vec<Value>, Error> {
        Ok(self
            .inner
            .cache
            .cached_images()?
            .into_iter()
            .map(|i| {
                json!({
                    "image_id": i.id,
                    "hits": i.hits,
                    "last_accessed": epoch(i.last_accessed),
                    "last_modified": epoch(i.last_modified),
                    "size": i.size,
                })
            })
            .collect())
    }
}

impl<B: Send + 'static> tower_service::Service<Request<B>> for AdminService {
    type Response = Reply;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.respond(request).await) })
    }
}

/// Runs `service` on `listener` (HTTP/1.1 with hyper) until `shutdown`
/// resolves; requests in flight then finish.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    service: AdminService,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let o = &service.inner.options;
    let limits =
        super::limits::Limits::new(o.header_timeout, o.send_timeout, Some(o.max_connections))
            .http1_only();
    let svc = hyper::service::service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.respond(req).await) }
    });
    super::run_hyper(
        listener,
        svc,
        shutdown,
        std::time::Duration::from_secs(10),
        limits,
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let id = |s: &str| ImageId::new(s).unwrap();
        assert_eq!(route(&Method::GET, "/v2/cache"), AdminRoute::State);
        assert_eq!(route(&Method::GET, "/v2/cache/"), AdminRoute::State);
        assert_eq!(
            route(&Method::PUT, "/v2/cache/abc"),
            AdminRoute::Queue(id("abc"))
        );
        assert_eq!(
            route(&Method::DELETE, "/v2/cache/a%20b"),
            AdminRoute::Delete(id("a b"))
        );
        assert_eq!(route(&Method::POST, "/v2/cache/prune"), AdminRoute::Prune);
        assert_eq!(
            route(&Method::GET, "/v2/cache/prune"),
            AdminRoute::MethodNotAllowed("POST")
        );
        assert_eq!(
            route(&Method::GET, "/v2/cache/nodes/x"),
            AdminRoute::Nodes(id("x"))
        );
        assert!(matches!(
            route(&Method::PUT, "/v2/cache/a%2Fb"),
            AdminRoute::BadId(_)
        ));
        assert!(matches!(
            route(&Method::PUT, "/v2/cache/%ff"),
            AdminRoute::BadId(_)
        ));
        assert_eq!(
            route(&Method::GET, "/cached_images"),
            AdminRoute::LegacyCached
        );
        assert_eq!(
            route(&Method::GET, "/v1/cached-images"),
            AdminRoute::LegacyCached
        );
        assert_eq!(
            route(&Method::PUT, "/queued-images/x"),
            AdminRoute::LegacyQueue(id("x"))
        );
        assert_eq!(
            route(&Method::GET, "/v2/images/x/file"),
            AdminRoute::NotFound
        );
        assert_eq!(route(&Method::GET, ""), AdminRoute::NotFound);
        assert_eq!(route(&Method::GET, "/metrics"), AdminRoute::Metrics);
    }

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h), None);
        h.insert("x-auth-token", HeaderValue::from_static("abc"));
        assert_eq!(presented_token(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  xyz "),
        );
        assert_eq!(presented_token(&h), Some("xyz"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(presented_token(&h), None);
        assert!(crate::serve::same_token("abc", "abc"));
        assert!(!crate::serve::same_token("abc", "abd"));
        assert!(!crate::serve::same_token("abc", "abcd"));
        assert!(!crate::serve::same_token("", "a"));
    }
}
