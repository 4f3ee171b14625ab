//! Hit handlers: a committed object's file, seekable; an object being
//! written, followed as its bytes land.

use std::any::Any;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use imgcache::{CachedImage, FollowReader};
use pingora_cache::storage::HandleHit;
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta, Storage};
use pingora_error::{Error, ErrorType, OrErr, Result};

use crate::object::{Prefix, FIXED};

/// The most read for one `read_body`.
const CHUNK: usize = 1 << 20;

/// Something to read at positions: what is resident without waiting,
/// the rest with a read that may wait.
trait AtFile: Send + Sync + 'static {
    fn resident(&self, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>>;
    fn read(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
}

impl AtFile for CachedImage {
    fn resident(&self, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>> {
        self.read_resident_at(buf, pos)
    }
    fn read(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.file().read_at(buf, pos)
    }
}

impl AtFile for FollowReader {
    fn resident(&self, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>> {
        self.read_resident_at(buf, pos)
    }
    fn read(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.read_at(buf, pos)
    }
}

/// Up to `len` bytes at `pos`: what the page cache holds is read on this
/// thread; a read that would wait for the disk goes to the blocking pool.
async fn read_at<T: AtFile>(src: &Arc<T>, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    if let Some(r) = src.resident(&mut buf, pos) {
        let n = r?;
        buf.truncate(n);
        return Ok(buf.freeze());
    }
    drop(buf);
    let src = src.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        let n = src.read(&mut buf, pos)?;
        buf.truncate(n);
        Ok(buf.freeze())
    })
    .await
    .map_err(io::Error::other)?
}

/// Exactly `len` bytes at `pos` of a committed object.
pub(crate) async fn read_exact_at(
    image: &Arc<CachedImage>,
    pos: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let b = read_at(image, pos + out.len() as u64, len - out.len())
            .await
            .or_err(ErrorType::ReadError, "imgcache: read")?;
        if b.is_empty() {
            return Error::e_explain(ErrorType::ReadError, "imgcache: the object ended early");
        }
        out.extend_from_slice(&b);
    }
    Ok(out)
}

/// A committed object: its body, from the prefix's end.
pub(crate) struct CompleteHit {
    image: Arc<CachedImage>,
    body_start: u64,
    pos: u64,
    end: u64,
    /// The body's first bytes, read with the prefix: served first unless
    /// a seek moved away.
    first: Option<Bytes>,
}

impl CompleteHit {
    pub(crate) fn new(image: Arc<CachedImage>, body_start: u64, first: Bytes) -> Self {
        let end = image.len();
        CompleteHit {
            image,
            body_start,
            pos: body_start,
            end,
            first: (!first.is_empty()).then_some(first),
        }
    }

    fn body_len(&self) -> u64 {
        self.image.len() - self.body_start
    }
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        if let Some(first) = self.first.take() {
            let n = (first.len() as u64).min(self.end - self.pos) as usize;
            self.pos += n as u64;
            return Ok(Some(first.slice(..n)));
        }
        let want = (self.end - self.pos).min(CHUNK as u64) as usize;
        let b = read_at(&self.image, self.pos, want)
            .await
            .or_err(ErrorType::ReadError, "imgcache: read")?;
        if b.is_empty() {
            // Cut behind the cache's back: an error, never a short body.
            return Error::e_explain(ErrorType::ReadError, "imgcache: the object ended early");
        }
        self.pos += b.len() as u64;
        Ok(Some(b))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let len = self.body_len();
        if start as u64 >= len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start out of range {start} >= {len}"),
            );
        }
        self.pos = self.body_start + start as u64;
        self.end = self.body_start + end.map_or(len, |e| (e as u64).min(len));
        self.first = None;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body_len() as usize
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// An object being written: its body as the fill lands it, the last byte
/// only after the commit (a failed write is an error, never a clean end).
pub(crate) struct PartialHit {
    follower: Arc<FollowReader>,
    pos: u64,
}

impl PartialHit {
    /// The metadata (from `prefix`, the prefix its miss handler wrote: no
    /// wait for the file) and a reader of the body of the write `fill`.
    /// `None` if the prefix does not decode.
    pub(crate) fn open(
        fill: Arc<FollowReader>,
        prefix: &[u8],
    ) -> Result<Option<(CacheMeta, PartialHit)>> {
        let Some(p) = Prefix::parse(prefix) else {
            return Ok(None);
        };
        let (meta, _key) = p.decode(&prefix[FIXED..])?;
        Ok(Some((
            meta,
            PartialHit {
                follower: fill,
                pos: p.len(),
            },
        )))
    }
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        let n = match self.follower.ready(self.pos, None).await {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e).or_err(ErrorType::ReadError, "imgcache: the write failed"),
        };
        let want = n.min(CHUNK as u64) as usize;
        let b = read_at(&self.follower, self.pos, want)
            .await
            .or_err(ErrorType::ReadError, "imgcache: read")?;
        if b.is_empty() {
            return Error::e_explain(ErrorType::ReadError, "imgcache: the write ended early");
        }
        self.pos += b.len() as u64;
        Ok(Some(b))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}
