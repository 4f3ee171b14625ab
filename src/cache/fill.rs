//! One fill and its followers: the state a fill shares with them, and
//! [`FollowReader`], which streams an image from its growing `incomplete/`
//! file while another reader fills it. Who fills and who follows is
//! decided in `flight.rs`.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::{Condvar, Mutex};

use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::id::ImageId;

/// One fill in progress: how far it got and how it ended.
#[derive(Debug)]
pub(crate) struct Fill {
    id: crate::files::AdmittedId,
    /// The incomplete file, shared with the writer; read with `pread`, so
    /// it stays readable after the commit renames it.
    file: File,
    state: Mutex<FillState>,
    changed: Condvar,
    followers: AtomicUsize,
}

/// How a fill failed, as its followers see it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    reason: String,
    kind: FailureKind,
}

/// The failures a follower tells apart.
#[derive(Debug, Clone)]
enum FailureKind {
    /// Anything else: [`Error::FillFailed`].
    Other,
    /// The origin had no such image (at this origin).
    NotFound(String),
    /// Admission refused the fill: [`Error::NoRoom`].
    NoRoom,
    /// The server ran as many fills as it may: [`Error::Busy`].
    Busy,
}

impl Failure {
    /// A failure its followers see as [`Error::FillFailed`] with `reason`.
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Failure {
            reason: reason.into(),
            kind: FailureKind::Other,
        }
    }

    /// The failure to open the origin, as the followers should see it:
    /// [`Error::OriginNotFound`] and [`Error::NoRoom`] as themselves,
    /// anything else as a failed fill.
    pub(crate) fn opening(e: Error) -> Self {
        match e {
            Error::OriginNotFound { origin, .. } => Failure {
                reason: format!("not found at {origin}"),
                kind: FailureKind::NotFound(origin),
            },
            Error::NoRoom { detail, .. } => Failure {
                reason: detail,
                kind: FailureKind::NoRoom,
            },
            Error::Busy { detail, .. } => Failure {
                reason: detail,
                kind: FailureKind::Busy,
            },
            e => Failure::new(format!("cannot open the origin: {e}")),
        }
    }

    fn error(&self, id: &ImageId) -> Error {
        match &self.kind {
            FailureKind::NotFound(origin) => Error::OriginNotFound {
                id: id.clone(),
                origin: origin.clone(),
            },
            FailureKind::NoRoom => Error::NoRoom {
                id: id.clone(),
                detail: self.reason.clone(),
            },
            FailureKind::Busy => Error::Busy {
                id: id.clone(),
                detail: self.reason.clone(),
            },
            FailureKind::Other => Error::FillFailed {
                id: id.clone(),
                reason: self.reason.clone(),
            },
        }
    }
}

/// How a fill ended, as its followers hear it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Committed: `size` bytes, checked, in the cache.
    Committed(u64),
    /// Whole and checked (size, checksum), but not cached (the metadata
    /// store is down): the followers get every byte; a caller that wants
    /// it cached ([`FollowReader::wait_committed`]) gets `reason`.
    Uncached { size: u64, reason: String },
    /// Failed: the followers get the error instead of their end.
    Failed(Failure),
}

#[derive(Debug, Default)]
struct FillState {
    /// Whether the origin answered (and `size` says what it announced).
    started: bool,
    /// The size the origin announced, if it did.
    size: Option<u64>,
    /// The checksum the origin announced, if it did.
    checksum: Option<Checksum>,
    /// Bytes written to the file so far (and readable from it).
    written: u64,
    /// `Ok(size)` once committed; `Err(..)` once failed.
    outcome: Option<Result<u64, Failure>>,
    /// Why a fill whose bytes are whole and checked was not cached (its
    /// metadata could not be recorded): its followers get every byte, a
    /// caller that wants it cached ([`FollowReader::wait_committed`]) an
    /// error.
    uncached: Option<String>,
    /// Async followers waiting for any of the above to change.
    wakers: Vec<Waker>,
}

impl FillState {
    fn wake(&mut self) {
        for w in self.wakers.drain(..) {
            w.wake();
        }
    }
}

/// What a follower at `pos` may do now; see [`Fill::poll_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    /// Bytes `pos..pos + n` may be read and passed on.
    Bytes(u64),
    /// The follower reached the end it asked for, and the fill committed:
    /// its response may end cleanly.
    End,
    /// Nothing yet: wait for a change.
    Wait,
}

impl Fill {
    pub(crate) fn new(id: crate::files::AdmittedId, file: File) -> Self {
        Fill {
            id,
            file,
            state: Mutex::new(FillState::default()),
            changed: Condvar::new(),
            followers: AtomicUsize::new(0),
        }
    }

    fn update(&self, f: impl FnOnce(&mut FillState)) {
        let mut state = self.state.lock();
        f(&mut state);
        state.wake();
        drop(state);
        self.changed.notify_all();
    }

    /// Publishes that the origin answered, with the size it announced.
    pub(crate) fn start(&self, size: Option<u64>, checksum: Option<Checksum>) {
        self.update(|s| {
            s.started = true;
            s.size = size;
            s.checksum = checksum;
        });
    }

    /// Records the size the origin announced before the fill starts, so
    /// that admission counts it at once ([`Fills::reserved`]).
    pub(crate) fn reserve(&self, size: Option<u64>) {
        let mut state = self.state.lock();
        if !state.started {
            state.size = size;
        }
    }

    /// Publishes that `written` bytes are in the file.
    pub(crate) fn progress(&self, written: u64) {
        self.update(|s| s.written = written);
    }

    /// Publishes the end of the fill. The first end stands: a late
    /// failure (a permit dropped after [`crate::ImageCache::invalidate_fills`]
    /// ended its fill) never overrides what the followers may have seen.
    pub(crate) fn end(&self, outcome: Outcome) {
        self.update(|s| {
            if s.outcome.is_none() {
                s.outcome = Some(match outcome {
                    Outcome::Committed(size) => Ok(size),
                    Outcome::Uncached { size, reason } => {
                        s.uncached = Some(reason);
                        Ok(size)
                    }
                    Outcome::Failed(failure) => Err(failure),
                });
            }
        });
    }

    /// The image.
    pub(crate) fn id(&self) -> &ImageId {
        self.id.id()
    }

    /// The id, as the layout admitted it.
    pub(crate) fn key(&self) -> crate::files::Admitted<'_> {
        self.id.key()
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// What [`crate::ImageCache::fills_in_progress`] shows of it.
    pub(crate) fn progress_now(&self) -> FillProgress {
        let s = self.state.lock();
        FillProgress {
            image_id: self.id.id().clone(),
            size: s.size,
            bytes_written: s.written,
            followers: self.followers(),
        }
    }

    fn poll_committed(&self, cx: &mut Context<'_>) -> Poll<Result<u64>> {
        let mut state = self.state.lock();
        match &state.outcome {
            Some(Ok(size)) => Poll::Ready(Ok(*size)),
            Some(Err(failure)) => Poll::Ready(Err(failure.error(self.id.id()))),
            None => {
                if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// How many readers follow this fill now.
    pub(crate) fn followers(&self) -> usize {
        self.followers.load(Ordering::SeqCst)
    }

    /// What a follower at `pos` that wants bytes up to `end` (or to the end
    /// of the image) may do now.
    ///
    /// The rule that makes a follower safe to stream to a client: bytes are
    /// passed on as soon as they have landed, **except the last one asked
    /// for**, which waits for the commit (the size and checksum verified).
    /// So a response never ends cleanly on bytes that might turn out wrong;
    /// if the fill fails, the follower gets the error instead of its end.
    fn ready(&self, state: &FillState, pos: u64, end: Option<u64>) -> Result<Ready> {
        match &state.outcome {
            Some(Err(failure)) => return Err(failure.error(self.id.id())),
            Some(Ok(size)) => {
                let end = end.unwrap_or(*size);
                if end.max(pos) > state.written || end.max(pos) > *size {
                    return Err(Error::FillFailed {
                        id: self.id.id().clone(),
                        reason: format!(
                            "committed {size} bytes, fewer than the {} asked for",
                            end.max(pos)
                        ),
                    });
                }
                return Ok(if pos >= end {
                    Ready::End
                } else {
                    Ready::Bytes(end - pos)
                });
            }
            None => {}
        }
        // Still filling: hold back the last byte wanted.
        let last = match end.or(state.size) {
            Some(e) => e.saturating_sub(1),
            None => u64::MAX,
        };
        let upto = state.written.min(last);
        Ok(if upto > pos {
            Ready::Bytes(upto - pos)
        } else {
            Ready::Wait
        })
    }

    /// Blocks until a follower at `pos` can do something.
    fn wait_ready(&self, pos: u64, end: Option<u64>) -> Result<Ready> {
        let mut state = self.state.lock();
        loop {
            match self.ready(&state, pos, end)? {
                Ready::Wait => self.changed.wait(&mut state),
                other => return Ok(other),
            }
        }
    }

    /// [`Fill::wait_ready`] as a future.
    fn poll_ready(&self, cx: &mut Context<'_>, pos: u64, end: Option<u64>) -> Poll<Result<Ready>> {
        let mut state = self.state.lock();
        match self.ready(&state, pos, end) {
            Ok(Ready::Wait) => {
                if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
            other => Poll::Ready(other),
        }
    }

    /// Blocks until the origin answered or the fill ended; the announced
    /// size.
    fn wait_committed(&self) -> Result<u64> {
        let mut state = self.state.lock();
        loop {
            match (&state.outcome, &state.uncached) {
                (Some(Ok(_)), Some(why)) => {
                    return Err(Error::FillFailed {
                        id: self.id.id().clone(),
                        reason: format!("served, but not cached: {why}"),
                    })
                }
                (Some(Ok(size)), None) => return Ok(*size),
                (Some(Err(failure)), _) => return Err(failure.error(self.id.id())),
                (None, _) => self.changed.wait(&mut state),
            }
        }
    }

    fn wait_started(&self) -> Result<Option<u64>> {
        let mut state = self.state.lock();
        loop {
            if let Some(Err(failure)) = &state.outcome {
                return Err(failure.error(self.id.id()));
            }
            if state.started || state.outcome.is_some() {
                return Ok(state.size);
            }
            self.changed.wait(&mut state);
        }
    }

    fn poll_started(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u64>>> {
        let mut state = self.state.lock();
        if let Some(Err(failure)) = &state.outcome {
            return Poll::Ready(Err(failure.error(self.id.id())));
        }
        if state.started || state.outcome.is_some() {
            return Poll::Ready(Ok(state.size));
        }
        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A fill in progress, as [`crate::ImageCache::fills_in_progress`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FillProgress {
    /// The image.
    pub image_id: ImageId,
    /// The size the origin announced, once it answered.
    pub size: Option<u64>,
    /// Bytes in the cache so far.
    pub bytes_written: u64,
    /// Readers following it now.
    pub followers: usize,
}

/// Streams an image that is being filled, from the growing `incomplete/`
/// file: bytes arrive as soon as the fill has written them, and the end of
/// the stream comes only once the fill has committed (its size and checksum
/// verified). If the fill fails, the next read returns
/// [`Error::FillFailed`] (inside an [`io::Error`]); never a hang, never a
/// partial image presented as complete.
///
/// Besides `Read`, a follower offers what a server needs to stream the fill
/// to a client at the client's own pace: [`FollowReader::started`] (the
/// origin answered, and the size it announced), [`FollowReader::ready`]
/// (how many bytes from a position may be passed on now), and
/// [`FollowReader::read_at`]. The last byte a caller asks for is held back
/// until the fill commits, so a response built this way never ends cleanly
/// on bytes that could still turn out wrong. The async forms need no
/// particular runtime.
#[derive(Debug)]
pub struct FollowReader {
    fill: Arc<Fill>,
    pos: u64,
    leader: bool,
}

impl FollowReader {
    pub(crate) fn new(fill: Arc<Fill>) -> Self {
        fill.followers.fetch_add(1, Ordering::SeqCst);
        FollowReader {
            fill,
            pos: 0,
            leader: false,
        }
    }

    /// Blocks until the fill has committed (its size) or failed. For a
    /// caller that wants the image cached, not its bytes (a prefetcher): a
    /// fill whose bytes were served whole but could not be recorded (the
    /// metadata store down) is an [`Error::FillFailed`] here.
    pub fn wait_committed(&self) -> Result<u64> {
        self.fill.wait_committed()
    }

    /// This follower, as the one whose call started the fill.
    pub(crate) fn leading(mut self) -> Self {
        self.leader = true;
        self
    }

    /// Whether the call that returned this follower started the fill (a
    /// miss), rather than joining one in progress (a coalesced request).
    pub fn started_fill(&self) -> bool {
        self.leader
    }

    /// The image followed.
    pub fn id(&self) -> &ImageId {
        self.fill.id.id()
    }

    /// Bytes read so far through `Read`.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Waits until the origin answered; the size it announced, if it did.
    /// An origin without the image is [`Error::OriginNotFound`], any other
    /// failure before the first byte [`Error::FillFailed`].
    pub async fn started(&self) -> Result<Option<u64>> {
        std::future::poll_fn(|cx| self.fill.poll_started(cx)).await
    }

    /// The checksum the origin announced (and the fill checks), once
    /// [`FollowReader::started`] returned.
    pub fn checksum(&self) -> Option<Checksum> {
        self.fill.state.lock().checksum.clone()
    }

    /// Waits until the fill has committed; its size. For a response that
    /// cannot be cut short visibly (HTTP/1.0 with no announced size), which
    /// must know the size before it starts.
    pub async fn committed(&self) -> Result<u64> {
        std::future::poll_fn(|cx| self.fill.poll_committed(cx)).await
    }

    /// [`FollowReader::started`], blocking.
    pub fn wait_started(&self) -> Result<Option<u64>> {
        self.fill.wait_started()
    }

    /// Waits until bytes from `pos` (up to `end`, or the end of the image)
    /// may be passed on: `Some(n)` for `n` bytes at `pos`, `None` once the
    /// end was reached *and* the fill committed. The last byte before `end`
    /// is held back until the commit; a failed fill is an error, and so is
    /// an `end` past what the fill committed.
    pub async fn ready(&self, pos: u64, end: Option<u64>) -> Result<Option<u64>> {
        let r = std::future::poll_fn(|cx| self.fill.poll_ready(cx, pos, end)).await?;
        Ok(match r {
            Ready::Bytes(n) => Some(n),
            _ => None,
        })
    }

    /// [`FollowReader::ready`], blocking.
    pub fn wait_ready(&self, pos: u64, end: Option<u64>) -> Result<Option<u64>> {
        Ok(match self.fill.wait_ready(pos, end)? {
            Ready::Bytes(n) => Some(n),
            _ => None,
        })
    }

    /// [`crate::CachedImage::read_resident_at`] of the filling file: what
    /// the page cache holds at `pos`, without waiting. Read only what
    /// [`FollowReader::ready`] allowed.
    #[cfg(feature = "tokio")]
    pub fn read_resident_at(&self, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>> {
        crate::files::zero_copy::read_resident(self.file(), buf, pos)
    }

    /// Reads bytes of the filling file at `pos` (`pread`; it does not move
    /// the `Read` position). Read only what [`FollowReader::ready`] allowed.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.fill.file.read_at(buf, pos)
    }

    /// The filling file, to send ranges of with
    /// `send_file_async` (feature `tokio`; what [`FollowReader::ready`]
    /// allowed).
    pub fn file(&self) -> &File {
        &self.fill.file
    }
}

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = match self.fill.wait_ready(self.pos, None) {
            Ok(Ready::Bytes(n)) => n,
            Ok(_) => return Ok(0),
            Err(e) => return Err(e.into_io()),
        };
        let n = usize::try_from(available)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let got = self.fill.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: the file being filled is shorter than published",
                    self.fill.id
                ),
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl Drop for FollowReader {
    fn drop(&mut self) {
        self.fill.followers.fetch_sub(1, Ordering::SeqCst);
    }
}
