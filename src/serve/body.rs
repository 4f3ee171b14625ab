//! Bodies as chunks of bytes, for transports that write from user space
//! (hyper), and the body type of [`super::ImageService`].

use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use prometheus_client::metrics::counter::Counter;

use super::plan::PlanBody;

/// A body chunk read on the blocking pool: large enough that a read costs
/// little per byte, small enough that many clients stay within memory.
pub(crate) const CHUNK: usize = 256 * 1024;

/// A cached body (or range) of up to this size is read in one go: one
/// trip to the blocking pool per response, not one per chunk (what small
/// hits cost most on this transport). Larger ones go in [`CHUNK`]s.
const WHOLE: u64 = 1024 * 1024;

/// The body of a response from [`super::ImageService`]: bytes read from
/// the cached (or filling) file on tokio's blocking pool, a chunk at a
/// time. An error while streaming ends the body with that error, which
/// hyper turns into an aborted response (the connection closed before the
/// announced length, or without the last chunk): never a clean short body.
pub struct ImageBody(UnsyncBoxBody<Bytes, io::Error>);

impl std::fmt::Debug for ImageBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageBody")
            .field("size_hint", &self.0.size_hint())
            .finish()
    }
}

impl ImageBody {
    pub(crate) fn new(
        body: PlanBody,
        len: Option<u64>,
        served: Option<Counter>,
        hold: Option<super::plan::Hold>,
    ) -> Self {
        match body {
            PlanBody::Empty => ImageBody(Empty::new().map_err(|e| match e {}).boxed_unsync()),
            PlanBody::Bytes(b) => ImageBody(Full::new(b).map_err(|e| match e {}).boxed_unsync()),
            other => {
                let mut chunks = Chunks::new(other);
                chunks.served = served;
                chunks.hold = hold;
                let stream = futures_util::stream::unfold(chunks, |mut c| async move {
                    c.next().await.map(|r| (r.map(Frame::data), c))
                });
                let body = StreamBody::new(Box::pin(stream));
                ImageBody(match len {
                    Some(n) => Sized {
                        inner: body,
                        len: n,
                    }
                    .boxed_unsync(),
                    None => body.boxed_unsync(),
                })
            }
        }
    }
}

impl Body for ImageBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// A stream body that says its exact length (so that hyper sends
/// `Content-Length`, not chunks).
struct Sized<B> {
    inner: B,
    len: u64,
}

impl<B: Body + Unpin> Body for Sized<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// Reads a body's bytes a chunk at a time, off the runtime's threads.
pub(crate) struct Chunks {
    body: Option<PlanBody>,
    pos: u64,
    /// For a pass-through: the chunk held back until the next read proves
    /// it is not the last (the reader verifies the end).
    held: Option<Bytes>,
    /// Counts the bytes handed out.
    pub(crate) served: Option<Counter>,
    /// Held until the body is done (a peer transfer's slot).
    pub(crate) hold: Option<super::plan::Hold>,
}

impl Chunks {
    pub(crate) fn new(body: PlanBody) -> Self {
        let pos = match &body {
            PlanBody::Cached(_, r) => r.start,
            PlanBody::Follow(_, start, _) => *start,
            _ => 0,
        };
        Chunks {
            body: Some(body),
            pos,
            held: None,
            served: None,
            hold: None,
        }
    }

    /// The next chunk; `None` at a clean end.
    pub(crate) async fn next(&mut self) -> Option<io::Result<Bytes>> {
        let r = self.step().await;
        match (&r, &self.served) {
            (Some(Ok(b)), Some(c)) => {
                c.inc_by(b.len() as u64);
            }
            (Some(Err(_)) | None, _) => self.body = None,
            _ => {}
        }
        r
    }

    async fn step(&mut self) -> Option<io::Result<Bytes>> {
        match self.body.as_mut()? {
            PlanBody::Empty => None,
            PlanBody::Bytes(b) => {
                let b = std::mem::take(b);
                self.body = Some(PlanBody::Empty);
                Some(Ok(b))
            }
            PlanBody::Cached(image, range) => {
                if self.pos >= range.end {
                    return None;
                }
                let left = range.end - self.pos;
                let want = if self.pos == range.start && left <= WHOLE {
                    left as usize
                } else {
                    left.min(CHUNK as u64) as usize
                };
                let pos = self.pos;
                // What the page cache holds is read here; only a read that
                // would wait for the disk goes to the blocking pool.
                let mut buf = BytesMut::zeroed(want);
                let r = match image.read_resident_at(&mut buf, pos) {
                    Some(r) => r.map(|n| {
                        buf.truncate(n);
                        buf.freeze()
                    }),
                    None => {
                        drop(buf);
                        let image = image.clone();
                        read_on_pool(move |buf| image.file().read_at(buf, pos), want).await
                    }
                };
                Some(self.advance(r))
            }
            PlanBody::Follow(follower, _, end) => {
                let end = *end;
                let n = match follower.ready(self.pos, end).await {
                    Ok(Some(n)) => n,
                    Ok(None) => return None,
                    Err(e) => return Some(Err(e.into_io())),
                };
                let want = n.min(CHUNK as u64) as usize;
                let follower = follower.clone();
                let pos = self.pos;
                let r = read_on_pool(move |buf| follower.read_at(buf, pos), want).await;
                Some(self.advance(r))
            }
            PlanBody::Uncached(_) => self.pass_through().await,
        }
    }

    fn advance(&mut self, r: io::Result<Bytes>) -> io::Result<Bytes> {
        let b = r?;
        if b.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ended at byte {}", self.pos),
            ));
        }
        self.pos += b.len() as u64;
        Ok(b)
    }

    /// Passes the origin's bytes on, one chunk behind, so that the last
    /// one goes only once the reader has verified the end (its size and
    /// checksum, checked by [`crate::ImageCache::fetch_detached`]'s reader).
    async fn pass_through(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            let Some(PlanBody::Uncached(mut object)) = self.body.take() else {
                return self.held.take().map(Ok);
            };
            let (object, read) = match tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(CHUNK);
                let r = object.reader.read(&mut buf).map(|n| {
                    buf.truncate(n);
                    buf.freeze()
                });
                (object, r)
            })
            .await
            {
                Ok(pair) => pair,
                Err(e) => return Some(Err(io::Error::other(e.to_string()))),
            };
            let chunk = match read {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.body = Some(PlanBody::Uncached(object));
                    continue;
                }
                Err(e) => return Some(Err(e)),
            };
            if chunk.is_empty() {
                // A clean end: verified, so the held chunk may go.
                return self.held.take().map(Ok);
            }
            self.body = Some(PlanBody::Uncached(object));
            if let Some(previous) = self.held.replace(chunk) {
                return Some(Ok(previous));
            }
        }
    }
}

/// Reads up to `want` bytes with `read` on tokio's blocking pool.
async fn read_on_pool(
    read: impl FnOnce(&mut [u8]) -> io::Result<usize> + Send + 'static,
    want: usize,
) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(want);
        let n = read(&mut buf)?;
        buf.truncate(n);
        Ok(buf.freeze())
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?
}
