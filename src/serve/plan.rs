//! What a request for an image gets: one place for the HTTP semantics,
//! whichever transport writes the response (hyper's, or the zero-copy
//! server's).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

use super::Inner;
use crate::checksum::{Algorithm, Checksum};
use crate::error::{Error, Result};
use crate::files::CachedImage;
use crate::id::ImageId;
use crate::origin::{Access, OriginObject, OriginRequest};
use crate::range::ByteRange;
use crate::{Fetched, FollowReader};

/// A response, before a transport writes it.
#[derive(Debug)]
pub(crate) struct Plan {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: PlanBody,
    /// Where the bytes came from, for the `x-imgcache` header, logs and
    /// metrics: `hit`, `miss`, `follow`, `bypass`, `denied`, `error`.
    pub source: &'static str,
    /// Counts the body's bytes as they are sent.
    pub served: Option<prometheus_client::metrics::counter::Counter>,
    /// Held until the body is sent (a peer transfer's slot).
    pub hold: Option<Hold>,
}

/// Something a response holds until its body is sent.
pub(crate) struct Hold(#[allow(dead_code)] Box<dyn Send + Sync>);

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

/// A response's body.
pub(crate) enum PlanBody {
    /// No body (HEAD, 304, and the like); `Content-Length` may still be set.
    Empty,
    /// A short body (an error's message).
    Bytes(Bytes),
    /// Bytes `range` of a cached file.
    Cached(Arc<CachedImage>, ByteRange),
    /// Bytes `start..end` (or to the end) of a filling file.
    Follow(Arc<FollowReader>, u64, Option<u64>),
    /// The origin's bytes, passed through uncached (the metadata store is
    /// down): checked against the announced size and checksum.
    Uncached(Box<OriginObject>),
}

impl std::fmt::Debug for PlanBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanBody::Empty => f.write_str("Empty"),
            PlanBody::Bytes(b) => write!(f, "Bytes({})", b.len()),
            PlanBody::Cached(i, r) => write!(f, "Cached({}, {r})", i.id()),
            PlanBody::Follow(fo, s, e) => write!(f, "Follow({}, {s}, {e:?})", fo.id()),
            PlanBody::Uncached(o) => write!(f, "Uncached({:?})", o.size),
        }
    }
}

/// The request, as the planner needs it.
pub(crate) struct Ask<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// An HTTP/1.0 request: no chunked responses.
    pub http10: bool,
}

/// Whether a `Range` value asks for the last zero bytes (`bytes=-0`).
fn is_zero_suffix(value: &str) -> bool {
    value
        .trim()
        .strip_prefix("bytes=")
        .map(str::trim)
        .and_then(|spec| spec.strip_prefix('-'))
        .is_some_and(|n| {
            let n = n.trim();
            !n.is_empty() && n.bytes().all(|b| b == b'0')
        })
}

/// The image id in `path` (`{prefix}{id}/file`, the id percent-encoded):
/// `None` if the path is not an image's, `Some(Err)` if the id is invalid.
pub fn route(prefix: &str, path: &str) -> Option<Result<ImageId, String>> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let rest = path.strip_prefix(prefix)?;
    let raw = rest.strip_suffix("/file")?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let decoded = match percent_encoding::percent_decode_str(raw).decode_utf8() {
        Ok(d) => d,
        Err(_) => return Some(Err(format!("image id {raw:?} is not UTF-8"))),
    };
    Some(ImageId::new(decoded.as_ref()).map_err(|e| e.to_string()))
}

/// What a `Range` header asks of an image of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range (absent, malformed, several ranges, or not in
    /// bytes): the whole image, `200`.
    Whole,
    /// One satisfiable range: `206`.
    Part(ByteRange),
    /// A well-formed range outside the image: `416`.
    Unsatisfiable,
}

/// Classifies a `Range` header value for an image of `size` bytes.
///
/// Several ranges (`bytes=0-1,5-6`) get the whole image: a multipart
/// response would cost every client a parser for one rare case, and HTTP
/// lets a server ignore `Range`.
pub fn range_ask(value: Option<&str>, size: u64) -> RangeAsk {
    let Some(v) = value else {
        return RangeAsk::Whole;
    };
    // A suffix of zero bytes is well-formed and never satisfiable (RFC
    // 9110 §14.1.2): `416`, not the whole image.
    if is_zero_suffix(v) {
        return RangeAsk::Unsatisfiable;
    }
    match ByteRange::parse_http(v, size) {
        Some(r) => RangeAsk::Part(r),
        // Well-formed (it parses against any size) but not satisfiable here.
        None if ByteRange::parse_http(v, u64::MAX).is_some() => RangeAsk::Unsatisfiable,
        None => RangeAsk::Whole,
    }
}

/// The entity tag of an image: its checksum where known (as Glance stores
/// it: MD5 in hex, others as `algorithm:hex`), else its CRC-32 and size.
pub(crate) fn etag(checksum: Option<&str>, crc: Option<(u32, u64)>) -> Option<HeaderValue> {
    let tag = match (checksum, crc) {
        (Some(c), _) => format!("\"{c}\""),
        (None, Some((crc, size))) => format!("\"crc32-{crc:08x}-{size}\""),
        (None, None) => return None,
    };
    HeaderValue::from_str(&tag).ok()
}

/// Whether an `If-None-Match` value matches `tag` (weak comparison).
pub(crate) fn none_match(value: &str, tag: &str) -> bool {
    let tag = tag.trim_start_matches("W/");
    value
        .split(',')
        .map(str::trim)
        .any(|v| v == "*" || v.trim_start_matches("W/") == tag)
}

/// Plans the response to `ask`.
pub(crate) async fn plan(inner: &Inner, ask: Ask<'_>) -> Plan {
    let options = &inner.options;
    let id = match route(&options.prefix, ask.path) {
        None => return error(StatusCode::NOT_FOUND, "no such resource".into()),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
        Some(Ok(id)) => id,
    };
    // RFC 9112 §3.2: a request with more than one Host is refused.
    if ask.headers.get_all(header::HOST).iter().nth(1).is_some() {
        return error(StatusCode::BAD_REQUEST, "several Host headers".into());
    }
    let head = match *ask.method {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut p = error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD".into());
            p.headers
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return p;
        }
    };
    if let Some(given) = ask.headers.get(super::peers::PEER_TOKEN_HEADER) {
        return peer(inner, ask, id, head, given.as_bytes()).await;
    }
    let mut request = OriginRequest::default();
    if options.forward_auth_token || !options.public {
        request.auth_token = ask
            .headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
    if !options.public {
        match authorize(inner, &id, &request).await {
            Ok(Access::Allowed) => {}
            Ok(Access::Denied(status)) => {
                // Only a refusal: an origin's odd answer is a 403.
                let status = match status {
                    401 | 403 | 404 => {
                        StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN)
                    }
                    _ => StatusCode::FORBIDDEN,
                };
                let mut p = error(
                    status,
                    format!("the origin refuses image {id} to this client ({status})"),
                );
                p.source = "denied";
                return p;
            }
            Err(e) => return failed(&e),
        }
    }
    let open_origin = inner.origin.clone();
    let open_cache = inner.cache.clone();
    let open_metrics = inner.metrics.clone();
    let counts_fills = inner.counts_fills;
    let open_request = request.clone();
    let open_id = id.clone();
    let fill_slots = inner.fill_slots.clone();
    let max_fills = inner.options.max_fills_value();
    let fetched = inner
        .cache
        .fetch_async(&id, move || {
            // A slot, taken only when a fill really starts (never by a hit
            // or a follower's lookup) and held until its origin is done:
            // past the cap the fill ends at once, its clients told to come
            // back (`503`), with no origin connection opened.
            let Ok(slot) = fill_slots.try_acquire_owned() else {
                return Err(Error::Busy {
                    id: open_id.clone(),
                    detail: format!(
                        "{max_fills} fills are running, as many as this server runs at once"
                    ),
                });
            };
            if !counts_fills {
                open_metrics.origin_request("fill");
            }
            let object = open_origin.open_for(&open_id, &open_request)?;
            // Admission, before a byte is written: room made under the
            // limits, or the fill refused (its clients pass it through).
            let evicted = open_cache.make_room(&open_id, object.size)?;
            open_metrics.evicted(&evicted);
            Ok(OriginObject {
                reader: Box::new(Holding {
                    inner: object.reader,
                    slot: Some(slot),
                }),
                size: object.size,
                checksum: object.checksum,
            })
        })
        .await;
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => return failed(&e),
    };
    match fetched {
        Fetched::Cached(image) => hit_plan(ask, head, image, "hit"),
        Fetched::Following(follower) => {
            let source = if follower.started_fill() {
                "miss"
            } else {
                "follow"
            };
            let size = match follower.started().await {
                Ok(size) => size,
                // No room to cache it: this client gets the origin's bytes.
                Err(Error::NoRoom { detail, .. }) => {
                    tracing::info!(image = %id, %detail, "no room: passing it through");
                    // The origin itself: a pass-through takes no part in
                    // the fleet's fills (no claim, no announcement).
                    let origin = inner.raw_origin.clone();
                    let metrics = inner.metrics.clone();
                    let cache = inner.cache.clone();
                    let bypass_id = id.clone();
                    let opened = tokio::task::spawn_blocking(move || {
                        metrics.origin_request("bypass");
                        origin
                            .open_for(&bypass_id, &request)
                            .map(|o| cache.pass_through(&bypass_id, o))
                    })
                    .await;
                    return match opened {
                        Ok(Ok(object)) => pass_through(ask, head, object),
                        Ok(Err(e)) => failed(&e),
                        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    };
                }
                Err(e) => return failed(&e),
            };
            if source == "follow" {
                inner.metrics.coalesced();
            }
            follow_plan_sized(ask, head, follower, size, source).await
        }
        Fetched::Uncached(object) => pass_through(ask, head, object),
    }
}

/// A fill's source, holding the fill's slot until its end (or its drop).
struct Holding<R> {
    inner: R,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<R: std::io::Read> std::io::Read for Holding<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf);
        // The origin is done with: the slot goes before the commit, so
        // that a client who saw the fill end finds it free.
        let ended = match &r {
            Ok(0) => !buf.is_empty(),
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::Interrupted,
        };
        if ended {
            self.slot = None;
        }
        r
    }
}

/// A hit's response: the cached file, or a range of it.
fn hit_plan(ask: Ask<'_>, head: bool, image: CachedImage, source: &'static str) -> Plan {
    let info = image.info();
    let tag = etag(info.checksum.as_deref(), info.crc32.map(|c| (c, info.size)));
    let md5 = info
        .checksum
        .as_deref()
        .filter(|c| Checksum::md5(c).is_ok());
    let size = image.len();
    respond(
        ask,
        head,
        Some(size),
        tag,
        md5.map(str::to_owned),
        source,
        |r| PlanBody::Cached(Arc::new(image), r.unwrap_or(ByteRange::full(size))),
    )
}

/// A follower's response, once its fill's source answered.
async fn follow_plan(
    ask: Ask<'_>,
    head: bool,
    follower: FollowReader,
    source: &'static str,
) -> Plan {
    match follower.started().await {
        Ok(size) => follow_plan_sized(ask, head, follower, size, source).await,
        Err(e) => failed(&e),
    }
}

/// A follower's response, its fill's source having announced `size`.
async fn follow_plan_sized(
    ask: Ask<'_>,
    head: bool,
    follower: FollowReader,
    mut size: Option<u64>,
    source: &'static str,
) -> Plan {
    // HTTP/1.0 has no chunks: a body of unknown size would end by
    // closing the connection, which a failure looks like too. Such
    // a client waits for the commit, and gets the size.
    if size.is_none() && ask.http10 {
        match follower.committed().await {
            Ok(n) => size = Some(n),
            Err(e) => return failed(&e),
        }
    }
    // An empty body has no last byte to hold back: answer once the
    // fill has committed, so that a failure is still a status.
    if size == Some(0) {
        if let Err(e) = follower.ready(0, Some(0)).await {
            return failed(&e);
        }
    }
    let checksum = follower.checksum();
    let tag = checksum
        .as_ref()
        .and_then(|c| etag(Some(&c.stored_form()), None));
    let md5 = checksum
        .as_ref()
        .filter(|c| c.algorithm() == Algorithm::Md5)
        .map(|c| c.hex().to_owned());
    let follower = Arc::new(follower);
    respond(ask, head, size, tag, md5, source, |r| match r {
        Some(r) => PlanBody::Follow(follower, r.start, Some(r.end)),
        None => PlanBody::Follow(follower, 0, size),
    })
}

/// A peer's request (it carries the fleet token header): served from what
/// this node has — its cached file, checked whole against its CRC-32
/// first, or its fill in progress — and never a fill of its own; `404`
/// when it has neither, `503` past the fan-out, `403` without the fleet's
/// token.
async fn peer(inner: &Inner, ask: Ask<'_>, id: ImageId, head: bool, given: &[u8]) -> Plan {
    let admitted = inner
        .options
        .peer_options()
        .is_some_and(|p| std::str::from_utf8(given).is_ok_and(|t| p.admits(t)));
    if !admitted {
        inner.metrics.peer_event("refused");
        let mut p = error(
            StatusCode::FORBIDDEN,
            "peer requests need the fleet's token".into(),
        );
        p.source = "denied";
        return p;
    }
    let Ok(slot) = inner.peer_slots.clone().try_acquire_owned() else {
        let mut p = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "serving as many peers as it may; ask another".into(),
        );
        p.headers
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        p.headers.insert(
            super::peers::BUSY_HEADER,
            HeaderValue::from_static("fanout"),
        );
        return p;
    };
    let mut plan = match inner.cache.follow(&id) {
        Ok(Some(follower)) => follow_plan(ask, head, follower, "peer").await,
        Ok(None) => {
            let cache = inner.cache.clone();
            let local = id.clone();
            let known = inner.verified.lock().get(&id).copied();
            let found =
                tokio::task::spawn_blocking(move || checked_for_peer(&cache, &local, known)).await;
            match found {
                Ok(Ok(Some((image, identity)))) => {
                    inner.verified.lock().insert(id.clone(), identity);
                    hit_plan(ask, head, image, "peer")
                }
                Ok(Ok(None)) => error(
                    StatusCode::NOT_FOUND,
                    format!("image {id} is neither cached nor being filled here"),
                ),
                Ok(Err(e)) => failed(&e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        Err(e) => failed(&e),
    };
    if plan.source == "peer" {
        inner.metrics.peer_event("served");
        plan.hold = Some(Hold(Box::new(slot)));
    }
    plan
}

/// The cached file of `id`, for a peer: read whole and checked against the
/// CRC-32 it was committed with, unless the same file (`known`: its
/// device, inode, size and change time) was checked before. A corrupt one
/// is quarantined and `None`: never sent. An entry without a CRC-32
/// (adopted, or written by Glance) is sent as it is; the peer checks it
/// against the recorded checksum.
fn checked_for_peer(
    cache: &crate::ImageCache,
    id: &ImageId,
    known: Option<[u64; 4]>,
) -> Result<Option<(CachedImage, [u64; 4])>> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let Some(image) = cache.open_for_read(id)? else {
        return Ok(None);
    };
    let meta = image
        .file()
        .metadata()
        .map_err(|e| Error::io("stat", image.path(), e))?;
    let identity = [
        meta.dev(),
        meta.ino(),
        meta.len(),
        (meta.ctime() as u64) << 32 | meta.ctime_nsec() as u64,
    ];
    let Some(want) = image.info().crc32 else {
        return Ok(Some((image, identity)));
    };
    if known == Some(identity) {
        return Ok(Some((image, identity)));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < meta.len() {
        let n = image
            .file()
            .read_at(&mut buf, pos)
            .map_err(|e| Error::io("read", image.path(), e))?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        pos += n as u64;
    }
    if crc.finalize() == want && pos == image.len() {
        return Ok(Some((image, identity)));
    }
    drop(image);
    // Checked again, and moved aside with what differs.
    cache.verify_or_quarantine(id)?;
    Ok(None)
}

/// Asks the origin whether the client of `request` may read `id`, unless
/// the positive cache of [`super::ServeOptions::authorization_ttl`] remembers a
/// recent yes for this token and image.
async fn authorize(inner: &Inner, id: &ImageId, request: &OriginRequest) -> Result<Access> {
    // No hashing when there is no positive cache (the default).
    let key = inner
        .grants
        .enabled()
        .then(|| inner.grants.key(request.auth_token.as_deref(), id));
    if key.as_ref().is_some_and(|k| inner.grants.holds(k)) {
        return Ok(Access::Allowed);
    }
    let origin = inner.origin.clone();
    let metrics = inner.metrics.clone();
    let (id2, request) = (id.clone(), request.clone());
    let access = tokio::task::spawn_blocking(move || {
        metrics.origin_request("authorize");
        origin.authorize(&id2, &request)
    })
    .await
    .map_err(|e| Error::Origin {
        id: id.clone(),
        origin: inner.origin.describe(),
        detail: format!("authorizing: {e}"),
    })??;
    if let (Access::Allowed, Some(key)) = (access, key) {
        inner.grants.grant(key);
    }
    Ok(access)
}

/// The origin's bytes passed through whole, uncached (a range of them
/// would need the origin's own range support).
fn pass_through(ask: Ask<'_>, head: bool, object: OriginObject) -> Plan {
    let size = object.size;
    if size.is_none() && ask.http10 {
        return error(
            StatusCode::BAD_GATEWAY,
            "the origin announced no size, which HTTP/1.0 needs".into(),
        );
    }
    let tag = object
        .checksum
        .as_ref()
        .and_then(|c| etag(Some(&c.stored_form()), None));
    let md5 = object
        .checksum
        .as_ref()
        .filter(|c| c.algorithm() == Algorithm::Md5)
        .map(|c| c.hex().to_owned());
    let ask = Ask {
        headers: &HeaderMap::new(),
        ..ask
    };
    respond(ask, head, size, tag, md5, "bypass", |_| {
        PlanBody::Uncached(Box::new(object))
    })
}

/// The response for an image of `size` bytes (unknown: streamed chunked,
/// ranges ignored), with conditional requests and ranges applied; `body`
/// makes the body for the range chosen (`None`: the whole image).
fn respond(
    ask: Ask<'_>,
    head: bool,
    size: Option<u64>,
    tag: Option<HeaderValue>,
    md5: Option<String>,
    source: &'static str,
    body: impl FnOnce(Option<ByteRange>) -> PlanBody,
) -> Plan {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(t) = &tag {
        headers.insert(header::ETAG, t.clone());
    }
    if let Some(m) = md5.and_then(|m| HeaderValue::from_str(&m).ok()) {
        // Glance's header: the MD5 in hex (not RFC 1864's base64).
        headers.insert("content-md5", m);
    }
    let tag_str = tag.as_ref().and_then(|t| t.to_str().ok());
    let text = |name: header::HeaderName| ask.headers.get(name).and_then(|v| v.to_str().ok());
    if let (Some(inm), Some(t)) = (text(header::IF_NONE_MATCH), tag_str) {
        if none_match(inm, t) {
            return Plan {
                status: StatusCode::NOT_MODIFIED,
                headers,
                body: PlanBody::Empty,
                source,
                served: None,
                hold: None,
            };
        }
    }
    let Some(size) = size else {
        // Unknown size: the whole image, chunked.
        return Plan {
            status: StatusCode::OK,
            headers,
            body: if head { PlanBody::Empty } else { body(None) },
            source,
            served: None,
            hold: None,
        };
    };
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // If-Range: the range only if the client's tag is ours (strong match).
    let honour_range = match text(header::IF_RANGE) {
        None => true,
        Some(v) => tag_str.is_some_and(|t| v.trim() == t && !t.starts_with("W/")),
    };
    // Range is defined for GET only (RFC 9110 §14.2).
    let ranged = if honour_range && !head {
        range_ask(text(header::RANGE), size)
    } else {
        RangeAsk::Whole
    };
    let (status, range) = match ranged {
        RangeAsk::Whole => (StatusCode::OK, None),
        RangeAsk::Part(r) => {
            let value = format!("bytes {}-{}/{size}", r.start, r.end - 1);
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&value).expect("ASCII"),
            );
            (StatusCode::PARTIAL_CONTENT, Some(r))
        }
        RangeAsk::Unsatisfiable => {
            let mut p = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("the image has {size} bytes"),
            );
            p.headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ASCII"),
            );
            p.headers
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            p.source = source;
            return p;
        }
    };
    let len = range.map_or(size, |r| r.len());
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Plan {
        status,
        headers,
        body: if head { PlanBody::Empty } else { body(range) },
        source,
        served: None,
        hold: None,
    }
}

/// A short text response.
pub(crate) fn error(status: StatusCode, message: String) -> Plan {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let body = Bytes::from(format!("{message}\n"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Plan {
        status,
        headers,
        body: PlanBody::Bytes(body),
        source: "error",
        served: None,
        hold: None,
    }
}

/// The response to a failed lookup or fill: what the client should see.
pub(crate) fn failed(e: &Error) -> Plan {
    let status = status_of(e);
    if let Error::Busy { .. } = e {
        let mut p = error(status, e.to_string());
        p.headers
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return p;
    }
    if status.is_server_error() {
        tracing::warn!(error = %e, status = status.as_u16(), "request failed");
    }
    error(status, e.to_string())
}

/// The status for an error: the client's fault (`400`), the origin's
/// (`404`, `502`), the store's (`503`), or ours (`500`).
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::InvalidId { .. } => StatusCode::BAD_REQUEST,
        Error::OriginNotFound { .. } => StatusCode::NOT_FOUND,
        Error::NoRoom { .. } => StatusCode::INSUFFICIENT_STORAGE,
        Error::Origin { .. }
        | Error::Source { .. }
        | Error::FillFailed { .. }
        | Error::ChecksumMismatch { .. }
        | Error::InvalidChecksum { .. } => StatusCode::BAD_GATEWAY,
        Error::Store(_) | Error::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
