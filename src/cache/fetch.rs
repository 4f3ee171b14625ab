//! Single flight: how a read that misses becomes one fill per image, which
//! every other reader of the image follows ([`ImageCache::fetch`],
//! [`ImageCache::fetch_detached`], the caching tee), and the life of those
//! fills as a server sees it (progress, commits, shutdown). The state one
//! fill shares with its followers is in `fill.rs`.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use super::fill::{Failure, Fill, FillProgress, FollowReader, Outcome};
use super::flight::{FillPermit, Fills, Flight};
use super::tee::TeeReader;
use super::writer::CacheWriter;
use super::ImageCache;
use crate::checksum::Checksum;
use crate::clock::round_trip;
use crate::drivers::StoreExt;
use crate::entry::{Invalidation, OnDisk};
use crate::error::{Error, Result};
use crate::files::{self, Admitted, CachedImage};
use crate::id::ImageId;
use crate::origin::{Origin, OriginObject};

/// An image's bytes from wherever they are now; see [`ImageCache::fetch`].
#[derive(Debug)]
pub enum ImageStream<R: Read + Send + 'static> {
    /// A hit: the cached file.
    Cached(CachedImage),
    /// A miss this caller fills: the backend's bytes, cached on the way.
    Filling(Box<TeeReader<R>>),
    /// A miss another reader of this process is filling: its bytes as they
    /// land.
    Following(FollowReader),
}

impl<R: Read + Send + 'static> Read for ImageStream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ImageStream::Cached(r) => r.read(buf),
            ImageStream::Filling(r) => r.read(buf),
            ImageStream::Following(r) => r.read(buf),
        }
    }
}

/// An image as [`ImageCache::fetch_detached`] found it.
#[derive(Debug)]
pub enum Fetched {
    /// A hit: the cached file.
    Cached(CachedImage),
    /// A fill in progress (maybe started by this call): its bytes as they
    /// land.
    Following(FollowReader),
    /// The metadata store cannot be reached: the origin's bytes, to pass
    /// through uncached. Its reader checks them as a fill would: the
    /// announced size and checksum are verified, and a mismatch is the
    /// error of its last read (as [`ImageCache::caching_reader`]'s).
    Uncached(OriginObject),
}

/// Where [`ImageCache::find`] found an image.
// One value, returned once: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Found {
    Hit(CachedImage),
    Follow(Arc<Fill>),
    Fill(CacheWriter, FillPermit),
    /// The store is down, or cannot record this id: the origin answers,
    /// uncached.
    StoreDown(Error),
}

/// The read size of a fill's own thread.
const FILL_BUFFER: usize = 256 * 1024;

/// An origin's stream that must end at the size the origin announced: a
/// shorter or longer one is an error, so that the fill fails rather than
/// commit what the origin did not mean.
struct SizeChecked {
    inner: Box<dyn Read + Send>,
    announced: Option<u64>,
    seen: u64,
}

impl Read for SizeChecked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        match self.announced {
            Some(size) if self.seen > size || (n == 0 && !buf.is_empty() && self.seen < size) => {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if self.seen > size {
                        format!("the origin announced {size} bytes and sent more")
                    } else {
                        format!("the origin announced {size} bytes and sent {}", self.seen)
                    },
                ))
            }
            _ => Ok(n),
        }
    }
}

/// An origin's object to pass through uncached, checked as a fill would
/// be: its announced size and checksum verified, a mismatch the error of
/// its last read.
fn checked_object(id: &ImageId, object: OriginObject) -> OriginObject {
    let source = SizeChecked {
        inner: object.reader,
        announced: object.size,
        seen: 0,
    };
    let checked = TeeReader::pass_through(id.clone(), source, object.checksum.clone());
    OriginObject {
        reader: Box::new(checked),
        ..object
    }
}

/// How many times [`ImageCache::fetch`] goes round when other writers keep
/// winning races, before it gives up.
const FETCH_ROUNDS: usize = 64;

impl ImageCache {
    /// Wraps a backend stream so that its bytes are cached as the caller
    /// reads them: the *caching tee*. See [`TeeReader`] for what happens at
    /// the end of the stream, on a checksum mismatch, a source error, a
    /// cache write error, or an early drop.
    ///
    /// If `id` is already cached, or being cached (by this process or
    /// another), the source passes through untouched (its checksum still
    /// checked); [`ImageCache::fetch`] joins a fill instead.
    pub fn caching_reader<R: Read + Send + 'static>(
        &self,
        id: &ImageId,
        expected: Option<Checksum>,
        source: R,
    ) -> Result<TeeReader<R>> {
        let key = self.layout.admit(id)?;
        Ok(match self.fills.take(key, || self.start_fill(key)) {
            Ok(Flight::Lead(writer, permit)) => self.tee(writer, permit, source, expected),
            Ok(Flight::Follow(_))
            | Err(Error::AlreadyCached { .. } | Error::AlreadyBeingCached { .. }) => {
                TeeReader::pass_through(id.clone(), source, expected)
            }
            Err(e) => return Err(e),
        })
    }

    /// The tee of a fill this caller has started.
    fn tee<R: Read + Send + 'static>(
        &self,
        writer: CacheWriter,
        permit: FillPermit,
        source: R,
        expected: Option<Checksum>,
    ) -> TeeReader<R> {
        TeeReader::filling(
            writer,
            permit,
            source,
            expected,
            self.options.finishes_abandoned_fills(),
        )
    }

    /// Opens a writer for `key`, and the file its followers will read;
    /// for [`Fills::take`](super::flight::Fills::take).
    fn start_fill(&self, key: Admitted<'_>) -> Result<(CacheWriter, std::fs::File)> {
        if self.fills.is_stopping() {
            return Err(Error::FillFailed {
                id: key.id().clone(),
                reason: "the cache is shutting down".into(),
            });
        }
        let writer = self.writer(key)?;
        let file = writer.reopen_file()?;
        Ok((writer, file))
    }

    /// Reads `id` from wherever it is, fetching it from the backend at most
    /// once however many callers ask at the same moment (*single flight*):
    ///
    /// - cached: the cached file ([`ImageStream::Cached`], a hit);
    /// - being filled by another reader of this process: its bytes as they
    ///   land in the cache ([`ImageStream::Following`]);
    /// - being filled by another process: waits for that writer to finish
    ///   (its lock on the incomplete file), then reads the cached file — or,
    ///   if the writer died, takes the fill over;
    /// - not cached: calls `open` for the backend stream and caches it on
    ///   the way ([`ImageStream::Filling`]); `expected` is checked at the
    ///   end.
    ///
    /// A cached file found corrupt is quarantined and the image fetched
    /// again: a fault of the cache is never the caller's. A failure to open
    /// the backend is [`Error::Source`], and leaves nothing behind.
    pub fn fetch<R, F>(
        &self,
        id: &ImageId,
        expected: Option<Checksum>,
        open: F,
    ) -> Result<ImageStream<R>>
    where
        R: Read + Send + 'static,
        F: FnOnce() -> io::Result<R>,
    {
        self.fetch_inner(id, move || {
            open().map(|r| (r, expected)).map_err(|e| Error::Source {
                id: id.clone(),
                source: e,
            })
        })
    }

    /// [`ImageCache::fetch`] from an [`Origin`], which supplies the expected
    /// checksum if it knows one. An image the origin does not have is
    /// [`Error::OriginNotFound`].
    pub fn fetch_from(
        &self,
        id: &ImageId,
        origin: &dyn Origin,
    ) -> Result<ImageStream<Box<dyn Read + Send>>> {
        self.fetch_inner(id, || origin.open(id).map(|o| (o.reader, o.checksum)))
    }

    fn fetch_inner<R, F>(&self, id: &ImageId, open: F) -> Result<ImageStream<R>>
    where
        R: Read + Send + 'static,
        F: FnOnce() -> Result<(R, Option<Checksum>)>,
    {
        let key = self.layout.admit(id)?;
        Ok(match self.find(key)? {
            Found::Hit(image) => ImageStream::Cached(image),
            Found::Follow(fill) => ImageStream::Following(FollowReader::new(fill)),
            Found::StoreDown(e) => {
                tracing::warn!("imgcache: {id}: {e}; serving it from the origin, uncached");
                let (source, expected) = open()?;
                ImageStream::Filling(Box::new(
                    TeeReader::pass_through(id.clone(), source, expected)
                        .uncached_because(e.to_string()),
                ))
            }
            Found::Fill(writer, permit) => match open() {
                Ok((source, expected)) => {
                    permit.fill().start(None, expected.clone());
                    ImageStream::Filling(Box::new(self.tee(writer, permit, source, expected)))
                }
                Err(e) => {
                    // Nothing was written: nothing to keep in invalid/.
                    if let Err(discard) = writer.discard() {
                        tracing::error!("imgcache: {id}: {discard}");
                    }
                    permit.release(Outcome::Failed(Failure::new(format!(
                        "cannot open the source: {e}"
                    ))));
                    return Err(e);
                }
            },
        })
    }

    /// Where `id` is now: cached, being filled here (to follow), or not —
    /// then a new fill registered for the caller to drive. Goes round while
    /// other writers win races, waits for another process's writer, and
    /// quarantines a corrupt cached file on the way.
    fn find(&self, key: Admitted<'_>) -> Result<Found> {
        let id = key.id();
        if let Err(e) = self.storable(id) {
            return Ok(Found::StoreDown(e));
        }
        for _ in 0..FETCH_ROUNDS {
            match self.open_for_read(id) {
                Ok(Some(image)) => return Ok(Found::Hit(image)),
                Ok(None) => {}
                // A fault of the cache is never the client's: the entry is
                // quarantined by now, and the origin answers instead.
                Err(e @ (Error::Corrupt { .. } | Error::CorruptMetadata { .. })) => {
                    tracing::warn!("imgcache: {id}: {e}; fetching it from the origin again");
                }
                // The metadata store is down: the origin answers, and nothing
                // is cached (a commit could not be recorded).
                Err(e @ Error::Store(_)) => return Ok(Found::StoreDown(e)),
                Err(e) => return Err(e),
            }
            match self.fills.take(key, || self.start_fill(key)) {
                Ok(Flight::Lead(writer, permit)) => return Ok(Found::Fill(writer, permit)),
                Ok(Flight::Follow(fill)) => return Ok(Found::Follow(fill)),
                // Committed since the look above: go round for the hit.
                Err(Error::AlreadyCached { .. }) => {}
                // Another process writes it: wait for its writer (the
                // registry is unlocked by now), then go round.
                Err(Error::AlreadyBeingCached { .. }) => files::wait_for_writer(&self.layout, key)?,
                Err(e) => return Err(e),
            }
        }
        Err(Error::FillFailed {
            id: id.clone(),
            reason: format!("other writers kept winning, {FETCH_ROUNDS} times"),
        })
    }

    /// A follower of the fill of `id` in progress in this process, if one
    /// runs: no disk or store access and no waiting (`None` also when the
    /// registry is busy), so an async caller may ask on a runtime thread
    /// before it goes to [`ImageCache::fetch_detached`].
    pub fn follow(&self, id: &ImageId) -> Result<Option<FollowReader>> {
        self.layout.admit(id)?;
        // Never waits: a busy registry (a fill being registered) is a "no".
        Ok(self.fills.try_get(id).flatten().map(FollowReader::new))
    }

    /// Reads `id` from wherever it is, as [`ImageCache::fetch`] does, but
    /// with a fill that belongs to no caller: on a miss, `open` runs on a
    /// thread of its own, which reads the origin into the cache at the
    /// origin's pace, and every caller — this one included — gets a
    /// [`FollowReader`] of the filling file, to read at its own pace.
    ///
    /// This is what a server wants: a slow client never slows the fill or
    /// the others, a client that leaves does not stop it, and a failed fill
    /// (the origin's error, a wrong size or checksum, a full disk) reaches
    /// every follower as an error, never as a clean end. The size the
    /// origin announces is checked, as is its checksum.
    ///
    /// - cached: [`Fetched::Cached`] (a hit counted);
    /// - being filled, by this call or an earlier one: [`Fetched::Following`];
    /// - the metadata store cannot be reached: [`Fetched::Uncached`], the
    ///   origin's object opened by `open` on this thread, to pass through
    ///   (nothing is cached).
    ///
    /// Errors from `open` reach the followers ([`FollowReader::started`]):
    /// [`Error::OriginNotFound`] as itself, others as
    /// [`Error::FillFailed`].
    pub fn fetch_detached<F>(&self, id: &ImageId, open: F) -> Result<Fetched>
    where
        F: FnOnce() -> Result<OriginObject> + Send + 'static,
    {
        let key = self.layout.admit(id)?;
        let (writer, permit) = match self.find(key)? {
            Found::Hit(image) => return Ok(Fetched::Cached(image)),
            Found::Follow(fill) => return Ok(Fetched::Following(FollowReader::new(fill))),
            Found::StoreDown(e) => {
                tracing::warn!("imgcache: {id}: {e}; serving it from the origin, uncached");
                return Ok(Fetched::Uncached(checked_object(id, open()?)));
            }
            Found::Fill(writer, permit) => (writer, permit),
        };
        let follower = FollowReader::new(permit.fill().clone()).leading();
        let stopping = self.fills.clone();
        let id2 = id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("imgcache-fill-{id}"))
            .spawn(move || run_fill(open, writer, permit, &stopping, id2));
        if let Err(e) = spawned {
            // The closure is gone, and with it the writer (its drop moves
            // the file aside) and the permit (its drop ends the fill).
            return Err(Error::FillFailed {
                id: id.clone(),
                reason: format!("cannot start a fill thread: {e}"),
            });
        }
        Ok(Fetched::Following(follower))
    }

    /// The fills in progress in this process, by id: what each origin
    /// announced and how far each got.
    pub fn fills_in_progress(&self) -> Vec<FillProgress> {
        self.fills.progress()
    }

    /// Commits this process's fills made so far, and their bytes (fills
    /// through [`ImageCache::fetch`], [`ImageCache::fetch_detached`] and
    /// the caching tee).
    pub fn commits(&self) -> (u64, u64) {
        self.fills.commits()
    }

    /// Waits until this process commits a fill after the `seen`-th
    /// commit, at most `timeout` (or until [`ImageCache::stop_fills`]);
    /// returns the count of commits. A pruner waits here.
    pub fn wait_for_commit(&self, seen: u64, timeout: Duration) -> u64 {
        self.fills.wait_commit(seen, timeout)
    }

    /// [`ImageCache::wait_for_commit`] that does not wait once `stop` is
    /// set (the flag is read under the lock [`ImageCache::wake_commit_waiters`]
    /// takes: set it, then wake, and no waiter misses it). A job that
    /// waits for commits and must stop promptly waits here.
    pub fn wait_for_commit_unless(
        &self,
        seen: u64,
        timeout: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> u64 {
        self.fills.wait_commit_unless(seen, timeout, stop)
    }

    /// Wakes the callers of [`ImageCache::wait_for_commit`] early (a job
    /// that is stopping).
    pub fn wake_commit_waiters(&self) {
        self.fills.wake();
    }

    /// Asks every fill of [`ImageCache::fetch_detached`] in progress, and
    /// every later one, to stop at its next read: what each wrote goes to
    /// `invalid/` and its followers get an error. For a process that is
    /// shutting down and will not wait for its fills.
    pub fn stop_fills(&self) {
        self.fills.stop();
    }

    /// Moves the file of every fill still in progress to `invalid/` with
    /// `reason`, and ends those fills with an error: for a process that
    /// stopped its fills ([`ImageCache::stop_fills`]) and will exit before
    /// the ones blocked on a slow origin notice, so that it leaves nothing
    /// in `incomplete/`. Returns how many it moved. A fill thread that
    /// wakes afterwards fails to commit (its file is gone) and caches
    /// nothing.
    pub fn invalidate_fills(&self, reason: &str) -> usize {
        let mut moved = 0;
        for fill in self.fills.all() {
            let id = fill.id().clone();
            let key = fill.key();
            // Only the fill's own file: one that has already left the name
            // (its writer gave up) may have been followed by another
            // writer's, which is not this fill's to move.
            let own = fill
                .file()
                .metadata()
                .is_ok_and(|meta| crate::files::names(&self.layout.incomplete(key), &meta));
            if !own {
                continue;
            }
            match self.layout.invalidate(key) {
                Ok(()) => {
                    moved += 1;
                    let path = self.layout.invalid(key);
                    let file = fill.file();
                    if let Ok(meta) = file.metadata() {
                        let why = Invalidation::new(
                            id.clone(),
                            meta.len(),
                            reason,
                            round_trip(self.options.clock_ref().now()),
                        );
                        if let Err(e) = self
                            .store
                            .invalidate(&why, OnDisk::new(&path, Some(file), &meta))
                        {
                            tracing::warn!("imgcache: cannot record why {id} failed: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("imgcache: cannot invalidate the fill of {id}: {e}"),
            }
            self.fills.end(&fill, Failure::new(reason));
        }
        moved
    }

    /// Whether this process has no fill in progress.
    pub fn is_idle(&self) -> bool {
        self.fills.is_empty()
    }

    /// An origin's object to pass through uncached, checked as a fill
    /// would be: its announced size and checksum verified, a mismatch the
    /// error of its last read. For a server that cannot cache an image
    /// ([`Error::NoRoom`]) yet must never pass on a wrong byte cleanly.
    pub fn pass_through(&self, id: &ImageId, object: OriginObject) -> OriginObject {
        checked_object(id, object)
    }

    /// Caches `id` from `source`: `Ok(true)` if it was cached now, `Ok(false)`
    /// if it already was, or another writer is filling it. A read error from
    /// `source` moves what was written to `invalid/` and is returned as
    /// [`Error::Io`].
    pub fn cache_image_file(&self, id: &ImageId, mut source: impl Read) -> Result<bool> {
        let key = self.layout.admit(id)?;
        let mut writer = match self.writer(key) {
            Ok(w) => w,
            Err(Error::AlreadyCached { .. } | Error::AlreadyBeingCached { .. }) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = io::copy(&mut source, &mut writer) {
            let path = self.layout.incomplete(key);
            let reason = format!("copy failed: {e}");
            // The copy's error is the one to report; a failure to move the
            // file aside (on a full disk, say) only goes to the log.
            if let Err(abort) = writer.abort(&reason) {
                tracing::error!("imgcache: cannot invalidate {id}: {abort}");
            }
            return Err(Error::io("copy into", path, e));
        }
        match writer.commit() {
            Ok(_) => Ok(true),
            Err(Error::AlreadyCached { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A detached fill's own thread ([`ImageCache::fetch_detached`]): opens
/// the origin, then reads it through the caching tee into the filling file
/// at the origin's pace, in large reads that wake the followers, until the
/// end (the commit), a failure, or the cache's shutdown. However it ends (a
/// panic in `open` included), the fill ends: its followers never wait for
/// ever.
fn run_fill<F>(open: F, writer: CacheWriter, permit: FillPermit, fills: &Fills, id2: ImageId)
where
    F: FnOnce() -> Result<OriginObject>,
{
    // However this thread ends (a panic in `open` included), the permit's
    // drop ends the fill: its followers never wait for ever.
    let object = match open() {
        Ok(object) => object,
        Err(e) => {
            if let Err(discard) = writer.discard() {
                tracing::error!("imgcache: {id2}: {discard}");
            }
            permit.release(Outcome::Failed(Failure::opening(e)));
            return;
        }
    };
    permit.fill().start(object.size, object.checksum.clone());
    let source = SizeChecked {
        inner: object.reader,
        announced: object.size,
        seen: 0,
    };
    let mut tee =
        TeeReader::filling(writer, permit, source, object.checksum, false).on_own_thread();
    // Large reads (each one wakes the followers), and no more of
    // them once caching failed: the next request fills afresh.
    let mut buf = vec![0u8; FILL_BUFFER];
    let drained = loop {
        if fills.is_stopping() {
            // Shutting down: the tee's drop moves what was
            // written aside, and the followers see a failure.
            break Err(io::Error::other("the cache is shutting down"));
        }
        match tee.read(&mut buf) {
            Ok(0) => break Ok(tee.stats().bytes),
            Ok(_) if !tee.is_caching() => break Ok(tee.stats().bytes),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match drained {
        Ok(n) if tee.stats().cached => {
            tracing::info!("imgcache: {id2}: filled, {n} bytes")
        }
        Ok(_) => tracing::warn!(
            "imgcache: {id2}: fill not cached: {}",
            tee.stats().cache_error.as_deref().unwrap_or("?")
        ),
        Err(e) => tracing::warn!("imgcache: {id2}: fill failed: {e}"),
    }
}
