//! [`AsyncHttpOrigin`]: images fetched over HTTP(S) with an async client
//! (reqwest, on tokio).

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use futures_util::TryStreamExt;
use tokio::io::AsyncRead;
use tokio::runtime::Handle;

use super::template::{check_template, content_md5, url_of};
use super::{Origin, OriginObject, OriginRequest};
use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::id::ImageId;

/// Default time to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed between reads (the response head, each body read).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// An image's bytes as an async stream, opened at an origin.
pub struct AsyncOriginObject {
    /// The bytes.
    pub body: Pin<Box<dyn AsyncRead + Send>>,
    /// Their size, if the origin announced it.
    pub size: Option<u64>,
    /// What they should hash to, if the origin says.
    pub checksum: Option<Checksum>,
}

impl fmt::Debug for AsyncOriginObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncOriginObject")
            .field("size", &self.size)
            .field("checksum", &self.checksum)
            .finish_non_exhaustive()
    }
}

/// Fetches image `id` from a URL template in which `{id}` stands for the
/// id (e.g. Glance's `http://glance:9292/v2/images/{id}/file`), with an
/// async client (reqwest on tokio): connection pooling, HTTP/1.1 and 2,
/// timeouts, **no redirects followed** (an origin that redirects is
/// refused: a cache should not be walked elsewhere), no content decoding.
///
/// As [`crate::origin::HttpOrigin`] does: `Content-Length` is the size,
/// `Content-MD5` (hex as Glance sends it, or base64) the expected checksum,
/// 404 [`Error::OriginNotFound`], other statuses and failures
/// [`Error::Origin`]; the client's `X-Auth-Token` is passed on
/// ([`OriginRequest`]).
///
/// [`AsyncHttpOrigin::open_async`] is the async face. As an [`Origin`] it
/// blocks on the runtime it was made on, which is what a fill's own thread
/// does ([`crate::ImageCache::fetch_detached`]); never call that from
/// inside the runtime.
#[derive(Clone)]
pub struct AsyncHttpOrigin {
    template: String,
    client: reqwest::Client,
    handle: Handle,
}

impl fmt::Debug for AsyncHttpOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncHttpOrigin")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl AsyncHttpOrigin {
    /// An origin for `template` with the default timeouts, on the current
    /// tokio runtime (an error outside one).
    pub fn new(template: impl Into<String>) -> Result<Self> {
        Self::with_timeouts(template, CONNECT_TIMEOUT, READ_TIMEOUT)
    }

    /// An origin for `template` with these timeouts, on the current tokio
    /// runtime.
    pub fn with_timeouts(
        template: impl Into<String>,
        connect: Duration,
        read: Duration,
    ) -> Result<Self> {
        let template = check_template(template.into())?;
        let handle = Handle::try_current()
            .map_err(|e| Error::Config(format!("AsyncHttpOrigin needs a tokio runtime: {e}")))?;
        let client = reqwest::Client::builder()
            .connect_timeout(connect)
            .read_timeout(read)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::Config(format!("HTTP client for {template:?}: {e}")))?;
        Ok(AsyncHttpOrigin {
            template,
            client,
            handle,
        })
    }

    /// The URL of image `id`.
    pub fn url(&self, id: &ImageId) -> String {
        url_of(&self.template, id)
    }

    /// Opens image `id` for `request`.
    pub async fn open_async(
        &self,
        id: &ImageId,
        request: &OriginRequest,
    ) -> Result<AsyncOriginObject> {
        self.open_async_from(id, request, 0).await
    }

    /// Opens image `id` for `request` at byte `offset`, with a `Range`
    /// request: the body starts at `offset`; `size` is the whole image's
    /// (from `Content-Range`), and `checksum` is `None` (a part's
    /// `Content-MD5` is not the image's). An origin that ignores the range
    /// (`200`) is read from the start, its first `offset` bytes dropped.
    pub async fn open_async_from(
        &self,
        id: &ImageId,
        request: &OriginRequest,
        offset: u64,
    ) -> Result<AsyncOriginObject> {
        let url = self.url(id);
        let fail = |detail: String| Error::Origin {
            id: id.clone(),
            origin: url.clone(),
            detail,
        };
        let mut get = self.client.get(&url);
        if let Some(token) = &request.auth_token {
            get = get.header("X-Auth-Token", token);
        }
        if offset > 0 {
            get = get.header("Range", format!("bytes={offset}-"));
        }
        let response = get.send().await.map_err(|e| fail(error_chain(&e)))?;
        let status = response.status();
        if status.as_u16() == 404 {
            return Err(Error::OriginNotFound {
                id: id.clone(),
                origin: url,
            });
        }
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let headers = response.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let partial = status.as_u16() == 206;
        let (size, checksum) = if partial {
            let range = header("content-range").unwrap_or("");
            let Some((start, total)) = crate::range::content_range_start(range) else {
                return Err(fail(format!("bad Content-Range {range:?}")));
            };
            // The rest of the image, whole: from `offset` to its last
            // byte, and as many bytes as that.
            let last = range
                .split_once('-')
                .and_then(|(_, r)| r.split_once('/'))
                .and_then(|(l, _)| l.trim().parse::<u64>().ok());
            let length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
            let whole_rest = total
                .is_some_and(|t| last == Some(t - 1) && length.is_none_or(|n| n == t - offset));
            if start != offset || offset == 0 || !whole_rest {
                return Err(fail(format!(
                    "asked for bytes from {offset} to the end, got Content-Range {range:?}"
                )));
            }
            (total, None)
        } else {
            let size = header("content-length").and_then(|v| v.trim().parse().ok());
            let checksum = match header("content-md5") {
                Some(v) => {
                    Some(content_md5(v).ok_or_else(|| fail(format!("bad Content-MD5 {v:?}")))?)
                }
                None => None,
            };
            (size, checksum)
        };
        let stream = response
            .bytes_stream()
            .map_err(|e| std::io::Error::other(error_chain(&e)));
        let mut body: Pin<Box<dyn AsyncRead + Send>> =
            Box::pin(tokio_util::io::StreamReader::new(stream));
        if offset > 0 && !partial {
            // The whole image came: drop what the caller has.
            let skipped = tokio::io::copy(
                &mut tokio::io::AsyncReadExt::take(&mut body, offset),
                &mut tokio::io::sink(),
            )
            .await
            .map_err(|e| fail(format!("skipping to byte {offset}: {e}")))?;
            if skipped < offset {
                return Err(fail(format!(
                    "the image ended at {skipped} bytes, before byte {offset}"
                )));
            }
        }
        Ok(AsyncOriginObject {
            body,
            size,
            checksum,
        })
    }
}

impl AsyncHttpOrigin {
    /// Asks the origin whether the client making `request` may read image
    /// `id`: a `HEAD` of its URL with the client's `X-Auth-Token`. `2xx`
    /// allows; `401`, `403` and `404` deny with that status; anything
    /// else (and no answer) is an error, which a server answers with `502`.
    pub async fn authorize_async(
        &self,
        id: &ImageId,
        request: &OriginRequest,
    ) -> Result<super::Access> {
        let url = self.url(id);
        let mut head = self.client.head(&url);
        if let Some(token) = &request.auth_token {
            head = head.header("X-Auth-Token", token);
        }
        let response = head.send().await.map_err(|e| Error::Origin {
            id: id.clone(),
            origin: url.clone(),
            detail: format!("authorizing: {}", error_chain(&e)),
        })?;
        super::access_of(response.status().as_u16(), id, &url)
    }
}

/// An error with its causes, as one line (reqwest's top-level message
/// alone says little: "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl Origin for AsyncHttpOrigin {
    fn open(&self, id: &ImageId) -> Result<OriginObject> {
        self.open_for(id, &OriginRequest::default())
    }

    fn open_for(&self, id: &ImageId, request: &OriginRequest) -> Result<OriginObject> {
        let object = self.handle.block_on(self.open_async(id, request))?;
        Ok(OriginObject {
            reader: Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
                object.body,
                self.handle.clone(),
            )),
            size: object.size,
            checksum: object.checksum,
        })
    }

    fn open_from(
        &self,
        id: &ImageId,
        request: &OriginRequest,
        offset: u64,
    ) -> Result<Option<OriginObject>> {
        let object = self
            .handle
            .block_on(self.open_async_from(id, request, offset))?;
        Ok(Some(OriginObject {
            reader: Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
                object.body,
                self.handle.clone(),
            )),
            size: object.size,
            checksum: object.checksum,
        }))
    }

    fn authorize(&self, id: &ImageId, request: &OriginRequest) -> Result<super::Access> {
        self.handle.block_on(self.authorize_async(id, request))
    }

    fn describe(&self) -> String {
        self.template.clone()
    }
}
