//! [`TeeReader`]: hands every byte of a backend stream to the caller and
//! writes it into the cache as it passes.

use std::fmt;
use std::io::{self, Read};

use super::fill::{Failure, Outcome};
use super::flight::FillPermit;
use super::writer::CacheWriter;
use crate::checksum::{Checksum, Hasher};
use crate::error::Error;
use crate::id::ImageId;

/// What a [`TeeReader`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TeeStats {
    /// Bytes passed to the caller.
    pub bytes: u64,
    /// Whether the image was committed to the cache.
    pub cached: bool,
    /// Why caching failed, if it did (disk full, I/O error). The caller's
    /// stream is unaffected by these.
    pub cache_error: Option<String>,
    /// Whether the stream passed through without caching because the image
    /// was already cached or being cached elsewhere.
    pub passed_through: bool,
}

/// The cache side of a tee.
struct Filling {
    writer: CacheWriter,
    permit: FillPermit,
}

impl Filling {
    /// Ends the fill as failed: the bytes go to `invalid/` with `reason`,
    /// followers get the reason.
    fn fail(self, reason: &str) {
        if let Err(e) = self.writer.abort(reason) {
            tracing::error!("imgcache: cannot invalidate a failed fill: {e}");
        }
        self.permit.release(Outcome::Failed(Failure::new(reason)));
    }
}

/// Reads a backend stream, caching it on the way; see
/// [`crate::ImageCache::caching_reader`].
///
/// - The source reaches its end and the checksum (if given) matches: the
///   image is committed. The end of the stream is reported only after that.
/// - The checksum does not match: the last read returns
///   [`Error::ChecksumMismatch`] (inside an [`io::Error`] of kind
///   `InvalidData`; [`Error::from_io`] gets it out); nothing is cached, what
///   was written goes to `invalid/`.
/// - The source fails: its error reaches the caller; what was written goes
///   to `invalid/`.
/// - Writing to the cache fails: the caller keeps receiving the source's
///   bytes unharmed; the entry goes to `invalid/`, and the failure is in
///   [`TeeStats::cache_error`] and the log.
/// - The caller drops the reader before the end: by default what was
///   written goes to `invalid/`. If other readers are following this fill,
///   or the cache was opened with
///   [`crate::CacheOptions::finish_abandoned_fills`], a background thread
///   reads the source to its end and commits, as if the caller had stayed.
pub struct TeeReader<R: Read + Send + 'static> {
    id: ImageId,
    /// `None` only once `Drop` has handed it to a background fill.
    source: Option<R>,
    filling: Option<Filling>,
    check: Option<(Checksum, Hasher)>,
    stats: TeeStats,
    finish_abandoned: bool,
    ended: bool,
    /// Set on the reader that finishes an abandoned fill: it never hands
    /// the fill on again.
    background: bool,
}

impl<R: Read + Send + 'static> fmt::Debug for TeeReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeReader")
            .field("id", &self.id)
            .field("filling", &self.filling.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<R: Read + Send + 'static> TeeReader<R> {
    /// Records why this stream is not cached (it passes the origin's
    /// bytes through), for [`TeeStats::cache_error`].
    pub(crate) fn uncached_because(mut self, reason: String) -> Self {
        self.stats.cache_error = Some(reason);
        self
    }

    pub(crate) fn filling(
        mut writer: CacheWriter,
        permit: FillPermit,
        source: R,
        expected: Option<Checksum>,
        finish_abandoned: bool,
    ) -> Self {
        if let Some(c) = &expected {
            writer.set_checksum(c.stored_form());
        }
        TeeReader {
            id: writer.id().clone(),
            source: Some(source),
            filling: Some(Filling { writer, permit }),
            check: expected.map(|c| {
                let h = c.hasher();
                (c, h)
            }),
            stats: TeeStats::default(),
            finish_abandoned,
            ended: false,
            background: false,
        }
    }

    /// Marks a tee that runs on a fill's own thread: dropped early, it
    /// fails the fill rather than hand it to yet another thread.
    pub(crate) fn on_own_thread(mut self) -> Self {
        self.background = true;
        self
    }

    pub(crate) fn pass_through(id: ImageId, source: R, expected: Option<Checksum>) -> Self {
        TeeReader {
            id,
            source: Some(source),
            filling: None,
            check: expected.map(|c| {
                let h = c.hasher();
                (c, h)
            }),
            stats: TeeStats {
                passed_through: true,
                ..TeeStats::default()
            },
            finish_abandoned: false,
            ended: false,
            background: false,
        }
    }

    /// The image.
    pub fn id(&self) -> &ImageId {
        &self.id
    }

    /// What happened so far (complete once a read returned 0).
    pub fn stats(&self) -> &TeeStats {
        &self.stats
    }

    /// Whether this reader is caching (rather than passing through).
    pub fn is_caching(&self) -> bool {
        self.filling.is_some()
    }

    /// Writes a chunk to the cache; on failure, stops caching (the caller's
    /// stream goes on).
    fn cache(&mut self, data: &[u8]) {
        let Some(filling) = self.filling.as_mut() else {
            return;
        };
        // Straight to the file: followers read what the file holds.
        match filling.writer.write_through(data) {
            Ok(()) => filling.permit.fill().progress(filling.writer.written()),
            Err(e) => {
                let reason = format!("cache write failed: {e}");
                tracing::warn!(
                    "imgcache: {}: {reason}; passing the stream through",
                    self.id
                );
                self.stats.cache_error = Some(reason.clone());
                if let Some(filling) = self.filling.take() {
                    filling.fail(&reason);
                }
            }
        }
    }

    /// At the end of the source: check the checksum, commit.
    fn end(&mut self) -> io::Result<usize> {
        self.ended = true;
        if let Some((expected, hasher)) = self.check.take() {
            let actual = hasher.finish();
            if actual != expected {
                let err = Error::ChecksumMismatch {
                    id: self.id.clone(),
                    expected,
                    actual,
                };
                if let Some(filling) = self.filling.take() {
                    filling.fail(&err.to_string());
                }
                return Err(err.into_io());
            }
        }
        if let Some(Filling { writer, permit }) = self.filling.take() {
            let outcome = match writer.commit() {
                Ok(info) => {
                    self.stats.cached = true;
                    Outcome::Committed(info.size)
                }
                // Only the metadata could not be recorded: the bytes are
                // whole and checked (size, checksum), so the followers get
                // them all; nothing is cached. A store outage never fails
                // a request the origin answered.
                Err(e @ Error::Store(_)) => {
                    let reason = format!("commit failed: {e}");
                    tracing::warn!("imgcache: {}: {reason}; served uncached", self.id);
                    self.stats.cache_error = Some(reason.clone());
                    Outcome::Uncached {
                        size: self.stats.bytes,
                        reason,
                    }
                }
                Err(e) => {
                    let reason = format!("commit failed: {e}");
                    tracing::warn!("imgcache: {}: {reason}", self.id);
                    self.stats.cache_error = Some(reason.clone());
                    Outcome::Failed(Failure::new(reason))
                }
            };
            permit.release(outcome);
        }
        Ok(0)
    }
}

impl<R: Read + Send + 'static> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended {
            return Ok(0);
        }
        let Some(source) = self.source.as_mut() else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        match source.read(buf) {
            Ok(0) => self.end(),
            Ok(n) => {
                if let Some((_, hasher)) = self.check.as_mut() {
                    hasher.update(&buf[..n]);
                }
                self.stats.bytes += n as u64;
                self.cache(&buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.ended = true;
                if let Some(filling) = self.filling.take() {
                    filling.fail(&format!("source failed: {e}"));
                }
                Err(e)
            }
        }
    }
}

impl<R: Read + Send + 'static> Drop for TeeReader<R> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Some(filling) = self.filling.take() else {
            return;
        };
        if self.background || (filling.permit.fill().followers() == 0 && !self.finish_abandoned) {
            filling.fail("reader dropped before the end of the stream");
            return;
        }
        // Others want this image: finish the fill without the caller, on a
        // thread of its own that reads the source to its end.
        let id = self.id.clone();
        let mut rest = TeeReader {
            id: id.clone(),
            source: self.source.take(),
            filling: Some(filling),
            check: self.check.take(),
            stats: std::mem::take(&mut self.stats),
            finish_abandoned: false,
            ended: false,
            background: true,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("imgcache-fill-{id}"))
            .spawn(move || match io::copy(&mut rest, &mut io::sink()) {
                Ok(n) => {
                    tracing::info!("imgcache: {id}: finished an abandoned fill ({n} more bytes)")
                }
                Err(e) => tracing::warn!("imgcache: {id}: abandoned fill failed: {e}"),
            });
        if let Err(e) = spawned {
            tracing::error!(
                "imgcache: {}: cannot finish an abandoned fill: {e}",
                self.id
            );
        }
    }
}
