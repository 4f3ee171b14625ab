//! [`Server`]: an HTTP/1.1 server that owns its connections, so that it
//! can write the response head itself and `sendfile` the body.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{TcpListener, TcpStream};

use super::body::Chunks;
use super::limits::write_within;
use super::plan::{self, Plan, PlanBody};
use super::ImageService;
use crate::files::zero_copy::send_file_async_within;

/// The largest request head accepted (`431` beyond).
const MAX_HEAD: usize = 16 * 1024;
/// The most header lines accepted.
const MAX_HEADERS: usize = 64;

/// A request head, parsed.
#[derive(Debug)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The request target as sent.
    pub target: String,
    /// HTTP/1.1 (`true`) or HTTP/1.0.
    pub http11: bool,
    /// The headers.
    pub headers: HeaderMap,
    /// The head's length in bytes, up to and including the blank line.
    pub len: usize,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not yet a whole head: read more.
    #[error("incomplete request head")]
    Partial,
    /// Longer than the server accepts.
    #[error("request head over {MAX_HEAD} bytes")]
    TooLarge,
    /// Not HTTP/1.x.
    #[error("malformed request head: {0}")]
    Malformed(String),
}

/// Parses the request head at the start of `buf` (httparse; header names
/// and values checked as `http` does). Never panics, whatever `buf` holds.
pub fn parse_head(buf: &[u8]) -> Result<RequestHead, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|e| HeadError::Malformed(e.to_string()))?;
    let target = req.path.unwrap_or("").to_owned();
    let http11 = req.version == Some(1);
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|e| HeadError::Malformed(format!("header {:?}: {e}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|e| HeadError::Malformed(format!("header {name}: {e}")))?;
        headers.append(name, value);
    }
    Ok(RequestHead {
        method,
        target,
        http11,
        headers,
        len,
    })
}

/// Why a request is refused before it is planned (`400`), if it is: a
/// body (the data path takes none), several or unreadable
/// `Content-Length`s (RFC 9112 §6.3), no `Host` on HTTP/1.1 (§3.2).
fn refuse(head: &RequestHead) -> Option<&'static str> {
    if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Some("a request body is not accepted here");
    }
    let lengths: Vec<_> = head
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .collect();
    match lengths.as_slice() {
        [] => {}
        [one] if one.as_bytes() == b"0" => {}
        [_] => return Some("a request body is not accepted here"),
        _ => return Some("several Content-Length headers"),
    }
    if head.http11 && !head.headers.contains_key(http::header::HOST) {
        return Some("an HTTP/1.1 request needs a Host header");
    }
    None
}

/// The path of a request target: absolute-form (`http://host/path`, as
/// proxies send) reduced to its path (RFC 9112 §3.2.2).
fn origin_form(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if target
            .get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
        {
            let after = &target[scheme.len()..];
            return after.find('/').map_or("/", |i| &after[i..]);
        }
    }
    target
}

/// Whether the connection stays open after this request.
fn keep_alive(head: &RequestHead) -> bool {
    let tokens = head
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if head.http11 {
        !tokens.iter().any(|t| t == "close")
    } else {
        tokens.iter().any(|t| t == "keep-alive")
    }
}

/// The zero-copy HTTP/1.1 server of `imgcache serve`: the planner of
/// [`ImageService`], with bodies sent by `sendfile` from the cached or
/// filling file (see the [module docs](super)).
///
/// Requests with a body (`Content-Length` above 0, `Transfer-Encoding`)
/// are refused with `400` and the connection closed: the data path has no
/// use for one. Idle connections close after
/// [`super::ServeOptions::header_timeout`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    service: ImageService,
}

impl Server {
    /// A server for `service` on `listener`.
    pub fn new(listener: TcpListener, service: ImageService) -> Self {
        Server { listener, service }
    }

    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr, service: ImageService) -> io::Result<Self> {
        Ok(Server::new(TcpListener::bind(addr).await?, service))
    }

    /// Where it listens.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the listener fails; a task per connection.
    pub async fn run(self) -> io::Result<()> {
        self.run_until(std::future::pending(), Duration::ZERO)
            .await
            .map(drop)
    }

    /// Serves until `shutdown` resolves, then stops accepting: idle
    /// connections close, each response in flight finishes (its connection
    /// closing after it) within `grace`, and what is left is cut (dropped
    /// with the runtime). `Ok(true)` if every response finished.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        grace: Duration,
    ) -> io::Result<bool> {
        let limits = self.service.options().limits();
        let service = Arc::new(self.service);
        let tracker = tokio_util::task::TaskTracker::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                s = limits.slot() => s,
                () = &mut shutdown => break,
            };
            let accepted = tokio::select! {
                a = super::accept(&self.listener) => a?,
                () = &mut shutdown => break,
            };
            let Some((stream, peer)) = accepted else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                if let Err(e) = connection(&service, stream, &stop).await {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                drop(slot);
            });
        }
        drop(self.listener);
        stop.cancel();
        tracker.close();
        Ok(tokio::time::timeout(grace, tracker.wait()).await.is_ok())
    }
}

/// One connection: requests one after another (pipelined ones too).
async fn connection(
    service: &ImageService,
    mut stream: TcpStream,
    stop: &tokio_util::sync::CancellationToken,
) -> io::Result<()> {
    let timeout = service.options().header_timeout;
    let send = service.options().send_timeout_value();
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // One deadline for the whole head, however it trickles in.
        let deadline = tokio::time::Instant::now() + timeout;
        let head = loop {
            match parse_head(&buf) {
                Ok(head) => break head,
                Err(HeadError::Partial) => {}
                Err(e) => {
                    let status = if e == HeadError::TooLarge {
                        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                    } else {
                        http::StatusCode::BAD_REQUEST
                    };
                    let plan = plan::error(status, e.to_string());
                    return write_plan(&mut stream, plan, false, true, true, send).await;
                }
            }
            // Between requests, a stop closes the connection.
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
                () = stop.cancelled(), if buf.is_empty() => return Ok(()),
            };
            match read {
                Ok(Ok(0)) | Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        };
        let _ = buf.split_to(head.len);
        if let Some(refusal) = refuse(&head) {
            let plan = plan::error(http::StatusCode::BAD_REQUEST, refusal.into());
            return write_plan(&mut stream, plan, false, true, head.http11, send).await;
        }
        // Once stopping, this response is the connection's last.
        let keep = keep_alive(&head) && !stop.is_cancelled();
        let path = origin_form(&head.target).to_owned();
        let request_id = service.inner.request_id();
        let mut plan = plan::plan(
            &service.inner,
            plan::Ask {
                method: &head.method,
                path: &path,
                headers: &head.headers,
                http10: !head.http11,
            },
        )
        .await;
        service.inner.account(&mut plan);
        // The path only: a query string may carry a token.
        tracing::info!(
            request_id = %request_id,
            method = %head.method,
            path = %path.split(['?', '#']).next().unwrap_or(""),
            status = plan.status.as_u16(),
            result = plan.source,
            "request"
        );
        plan.headers.insert(
            "x-openstack-request-id",
            http::HeaderValue::from_str(&request_id).expect("ASCII"),
        );
        write_plan(
            &mut stream,
            plan,
            head.method == Method::HEAD,
            !keep,
            head.http11,
            send,
        )
        .await?;
        if !keep {
            return Ok(());
        }
    }
}

/// Writes a planned response: the head, then the body (sent by `sendfile`
/// where it is a file's). An error after the head leaves the response cut
/// short; the caller drops the connection.
async fn write_plan(
    stream: &mut TcpStream,
    plan: Plan,
    head_only: bool,
    close: bool,
    http11: bool,
    limit: Duration,
) -> io::Result<()> {
    let chunked = !plan.headers.contains_key(http::header::CONTENT_LENGTH)
        && !head_only
        && plan.status != http::StatusCode::NOT_MODIFIED
        && !matches!(plan.body, PlanBody::Empty);
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(plan.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(plan.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &plan.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-imgcache: ");
    out.extend_from_slice(plan.source.as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    http_date(&mut out);
    if chunked {
        out.extend_from_slice(b"\r\ntransfer-encoding: chunked");
    }
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    } else if !http11 {
        out.extend_from_slice(b"\r\nconnection: keep-alive");
    }
    out.extend_from_slice(b"\r\n\r\n");
    let body = if head_only {
        PlanBody::Empty
    } else {
        plan.body
    };
    let count = |n: u64| {
        if let Some(c) = &plan.served {
            c.inc_by(n);
        }
    };
    match body {
        PlanBody::Empty => write_within(stream, &out, limit).await,
        PlanBody::Bytes(b) => {
            out.extend_from_slice(&b);
            write_within(stream, &out, limit).await
        }
        PlanBody::Cached(_, range) if range.is_empty() => write_within(stream, &out, limit).await,
        PlanBody::Cached(image, range)
            if range.end - range.start <= INLINE_BODY
                && inline(&mut out, image.file(), range.start, range.end) =>
        {
            // A small body the page cache holds goes with its head in one
            // write: cheaper than a `sendfile` of a few pages.
            write_within(stream, &out, limit).await?;
            count(range.end - range.start);
            Ok(())
        }
        PlanBody::Cached(image, range) => {
            // The body follows at once: the head may wait for it (MSG_MORE).
            send_head(stream, &out, limit).await?;
            let sent =
                send_file_async_within(image.file(), stream, range.start, range.end, Some(limit))
                    .await?;
            count(sent);
            Ok(())
        }
        PlanBody::Follow(follower, start, end) => {
            // The body may wait for the origin: the head goes out now.
            write_within(stream, &out, limit).await?;
            let mut pos = start;
            loop {
                let n = match follower.ready(pos, end).await {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => return Err(e.into_io()),
                };
                if chunked {
                    write_within(stream, format!("{n:x}\r\n").as_bytes(), limit).await?;
                }
                send_file_async_within(follower.file(), stream, pos, pos + n, Some(limit)).await?;
                count(n);
                if chunked {
                    write_within(stream, b"\r\n", limit).await?;
                }
                pos += n;
            }
            if chunked {
                write_within(stream, b"0\r\n\r\n", limit).await?;
            }
            Ok(())
        }
        body @ PlanBody::Uncached(_) => {
            write_within(stream, &out, limit).await?;
            let mut chunks = Chunks::new(body);
            chunks.served = plan.served.clone();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                if chunked {
                    write_within(stream, format!("{:x}\r\n", chunk.len()).as_bytes(), limit)
                        .await?;
                    write_within(stream, &chunk, limit).await?;
                    write_within(stream, b"\r\n", limit).await?;
                } else {
                    write_within(stream, &chunk, limit).await?;
                }
            }
            if chunked {
                write_within(stream, b"0\r\n\r\n", limit).await?;
            }
            Ok(())
        }
    }
}

/// Appends the `date` header's value for now, formatted once a second on
/// each thread (the header has whole seconds).
fn http_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static NOW: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

/// Bodies up to this size are copied behind their head and sent with it
/// in one write, when the page cache holds them.
const INLINE_BODY: u64 = 16 * 1024;

/// Appends bytes `start..end` of `file` to `out` if the page cache holds
/// them all now (read without waiting for the disk); `false`, with `out`
/// as it was, otherwise (the caller sends them with `sendfile`, which
/// reports a short file or an error).
fn inline(out: &mut Vec<u8>, file: &std::fs::File, start: u64, end: u64) -> bool {
    let at = out.len();
    let Ok(len) = usize::try_from(end - start) else {
        return false;
    };
    out.resize(at + len, 0);
    let mut got = 0;
    while got < len {
        match crate::files::zero_copy::read_resident(file, &mut out[at + got..], start + got as u64)
        {
            Some(Ok(n)) if n > 0 => got += n,
            _ => {
                out.truncate(at);
                return false;
            }
        }
    }
    true
}

/// Writes a response head that a body follows, with `MSG_MORE` where the
/// kernel has it, so that the head and the first body bytes share packets.
async fn send_head(stream: &TcpStream, mut head: &[u8], limit: Duration) -> io::Result<()> {
    while !head.is_empty() {
        tokio::time::timeout(limit, stream.writable())
            .await
            .map_err(|_| super::limits::timed_out(limit))??;
        match stream.try_io(Interest::WRITABLE, || more(stream, head)) {
            Ok(n) => head = &head[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn more(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    send(
        stream.as_fd().as_raw_fd(),
        buf,
        MsgFlags::from_bits_retain(nix::libc::MSG_MORE),
    )
    .map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn more(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    nix::unistd::write(stream.as_fd(), buf).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_or_are_refused() {
        let h =
            parse_head(b"GET /v2/images/a/file HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\nGET")
                .unwrap();
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.target, "/v2/images/a/file");
        assert!(h.http11 && keep_alive(&h));
        assert_eq!(h.headers["range"], "bytes=0-1");
        assert_eq!(h.len, 61);
        assert_eq!(
            parse_head(
                b"GET / HTTP/1.1
Host"
            )
            .unwrap_err(),
            HeadError::Partial
        );
        assert!(matches!(
            parse_head(b"\x00\x01 nonsense\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(big.as_bytes()).unwrap_err(), HeadError::TooLarge);
        let h10 = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!keep_alive(&h10));
        let close = parse_head(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap();
        assert!(!keep_alive(&close));
        assert_eq!(
            refuse(&close),
            Some("an HTTP/1.1 request needs a Host header")
        );
        let two = parse_head(
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        assert_eq!(refuse(&two), Some("several Content-Length headers"));
        assert_eq!(refuse(&h), None);
        assert_eq!(
            origin_form("http://cache:9292/v2/images/a/file"),
            "/v2/images/a/file"
        );
        assert_eq!(origin_form("HTTPS://cache"), "/");
        assert_eq!(origin_form("/v2/images/a/file"), "/v2/images/a/file");
    }
}
