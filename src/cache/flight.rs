//! Single flight within a process: at most one fill per image, which every
//! other reader of the image follows.
//!
//! The shape is a lock's (as pingora-cache's cache lock): a reader
//! [`Fills::take`]s an image and gets either a [`FillPermit`] — it leads,
//! and must fill — or the [`Fill`] in progress, to follow. The permit ends
//! the fill when it is released with an [`Outcome`]; a permit dropped
//! unreleased (a panic, a thread that could not start, a tee dropped on a
//! path that forgot it) ends the fill as abandoned, so that no follower
//! ever waits for a fill that nobody drives.
//!
//! The registry also counts this process's commits, for the callers that
//! wait for the next one (the prefetcher, `serve`'s jobs).

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::fill::{Failure, Fill, FillProgress, Outcome};
use crate::error::Result;
use crate::files::Admitted;
use crate::id::ImageId;

/// The fills in progress in this process, by image.
#[derive(Debug, Default)]
pub(crate) struct Fills {
    map: Mutex<HashMap<ImageId, Arc<Fill>>>,
    /// Commits so far, and bytes committed so far, by this process's fills.
    commits: Mutex<(u64, u64)>,
    committed: Condvar,
    /// Set when the cache is shutting down: fills stop at their next read.
    stopping: AtomicBool,
}

/// What [`Fills::take`] gave the caller.
#[derive(Debug)]
pub(crate) enum Flight<W> {
    /// The caller fills: the writer `start` opened, and the permit that
    /// ends the fill.
    Lead(W, FillPermit),
    /// Another reader of this process fills: follow it.
    Follow(Arc<Fill>),
}

/// The right, and the duty, to end one fill: held by whoever drives it
/// (a tee, a fill thread). [`FillPermit::release`] ends the fill with its
/// outcome; a permit dropped unreleased ends it as abandoned.
#[derive(Debug)]
pub(crate) struct FillPermit {
    fill: Arc<Fill>,
    fills: Arc<Fills>,
    released: bool,
}

impl FillPermit {
    /// The fill this permit ends.
    pub(crate) fn fill(&self) -> &Arc<Fill> {
        &self.fill
    }

    /// Ends the fill with `outcome`. The fill leaves the registry before
    /// its followers hear of the end, so that a request that comes after a
    /// follower's end finds the cached file (a hit), not a finished fill.
    pub(crate) fn release(mut self, outcome: Outcome) {
        self.released = true;
        self.fills.remove(&self.fill);
        if let Outcome::Committed(size) = &outcome {
            self.fills.note_commit(*size);
        }
        self.fill.end(outcome);
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        if !self.released {
            self.fills.remove(&self.fill);
            self.fill.end(Outcome::Failed(Failure::new(
                "the fill was abandoned before its end",
            )));
        }
    }
}

impl Fills {
    /// Takes the fill of `key`, or follows the one in progress: the
    /// registry stays locked while `start` opens the caller's writer (and
    /// the file followers will read), so that readers arriving meanwhile
    /// follow this fill rather than start their own. An error of `start`
    /// (the image is cached, another process writes it, the disk refuses)
    /// is the caller's, and registers nothing.
    pub(crate) fn take<W>(
        self: &Arc<Self>,
        key: Admitted<'_>,
        start: impl FnOnce() -> Result<(W, File)>,
    ) -> Result<Flight<W>> {
        let mut map = self.map.lock();
        if let Some(fill) = map.get(key.id()) {
            return Ok(Flight::Follow(fill.clone()));
        }
        let (writer, file) = start()?;
        let fill = Arc::new(Fill::new(key.to_owned(), file));
        map.insert(key.id().clone(), fill.clone());
        Ok(Flight::Lead(
            writer,
            FillPermit {
                fill,
                fills: self.clone(),
                released: false,
            },
        ))
    }

    /// The fill of `id` in progress, if any.
    pub(crate) fn get(&self, id: &ImageId) -> Option<Arc<Fill>> {
        self.map.lock().get(id).cloned()
    }

    /// The fill of `id`, if the registry can be had without waiting:
    /// `None` when it is busy (a fill is being registered, which touches
    /// the disk), so that an async caller never waits on it.
    pub(crate) fn try_get(&self, id: &ImageId) -> Option<Option<Arc<Fill>>> {
        self.map.try_lock().map(|map| map.get(id).cloned())
    }

    /// Every fill in progress.
    pub(crate) fn all(&self) -> Vec<Arc<Fill>> {
        self.map.lock().values().cloned().collect()
    }

    /// Ends `fill` from outside, whoever holds its permit (an operator's
    /// [`crate::ImageCache::invalidate_fills`]): its permit's later release
    /// changes nothing.
    pub(crate) fn end(&self, fill: &Arc<Fill>, failure: Failure) {
        self.remove(fill);
        fill.end(Outcome::Failed(failure));
    }

    /// The fills in progress, by id.
    pub(crate) fn progress(&self) -> Vec<FillProgress> {
        let mut out: Vec<FillProgress> = self.all().iter().map(|f| f.progress_now()).collect();
        out.sort_by(|a, b| a.image_id.cmp(&b.image_id));
        out
    }

    /// Bytes the fills in progress (other than `except`) are still to
    /// write, as far as their origins announced them.
    pub(crate) fn reserved(&self, except: &ImageId) -> u64 {
        self.progress()
            .iter()
            .filter(|p| &p.image_id != except)
            .map(|p| p.size.unwrap_or(0).saturating_sub(p.bytes_written))
            .sum()
    }

    /// Records a commit of `size` bytes.
    fn note_commit(&self, size: u64) {
        let mut c = self.commits.lock();
        c.0 += 1;
        c.1 += size;
        drop(c);
        self.committed.notify_all();
    }

    /// Waits until the commit count passes `seen`, at most `timeout`;
    /// returns the count.
    pub(crate) fn wait_commit(&self, seen: u64, timeout: Duration) -> u64 {
        let mut c = self.commits.lock();
        if c.0 == seen {
            self.committed.wait_for(&mut c, timeout);
        }
        c.0
    }

    /// [`Fills::wait_commit`], unless `stop` is set: checked under the
    /// lock that [`Fills::wake`] takes, so that a stop signalled (then
    /// woken) just before the wait is never missed.
    pub(crate) fn wait_commit_unless(
        &self,
        seen: u64,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> u64 {
        let mut c = self.commits.lock();
        if c.0 == seen && !stop.load(Ordering::SeqCst) {
            self.committed.wait_for(&mut c, timeout);
        }
        c.0
    }

    /// Wakes the waiters of [`Fills::wait_commit`] early.
    pub(crate) fn wake(&self) {
        let _c = self.commits.lock();
        self.committed.notify_all();
    }

    /// Commits so far, and their bytes.
    pub(crate) fn commits(&self) -> (u64, u64) {
        *self.commits.lock()
    }

    /// Asks every fill to stop at its next read.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _c = self.commits.lock();
        self.committed.notify_all();
    }

    /// Whether [`Fills::stop`] was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Whether no fill is in progress.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }

    /// Removes `fill` from the registry (if it is still the one
    /// registered for its id).
    fn remove(&self, fill: &Arc<Fill>) {
        let mut map = self.map.lock();
        if map.get(fill.id()).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            map.remove(fill.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fill::FollowReader;
    use crate::error::Error;
    use crate::files::Layout;

    fn file() -> File {
        tempfile::tempfile().unwrap()
    }

    fn lead(flight: Flight<()>) -> FillPermit {
        match flight {
            Flight::Lead((), permit) => permit,
            Flight::Follow(_) => panic!("followed, expected to lead"),
        }
    }

    fn follow(flight: Flight<()>) -> Arc<Fill> {
        match flight {
            Flight::Follow(fill) => fill,
            Flight::Lead(..) => panic!("led, expected to follow"),
        }
    }

    #[test]
    fn the_first_taker_leads_and_the_others_follow_until_release() {
        let layout = Layout::new("/c", None);
        let id = ImageId::new("img").unwrap();
        let key = layout.admit(&id).unwrap();
        let fills = Arc::new(Fills::default());
        let permit = lead(fills.take(key, || Ok(((), file()))).unwrap());
        let fill = follow(
            fills
                .take(key, || panic!("opened a second writer"))
                .unwrap(),
        );
        assert!(Arc::ptr_eq(&fill, permit.fill()));
        let reader = FollowReader::new(fill);
        permit.release(Outcome::Committed(0));
        assert_eq!(reader.wait_committed().unwrap(), 0);
        assert_eq!(fills.commits(), (1, 0));
        // Released: the next taker leads a fill of its own.
        assert!(fills.is_empty());
        lead(fills.take(key, || Ok(((), file()))).unwrap());
    }

    #[test]
    fn a_permit_dropped_unreleased_fails_its_followers() {
        let layout = Layout::new("/c", None);
        let id = ImageId::new("img").unwrap();
        let key = layout.admit(&id).unwrap();
        let fills = Arc::new(Fills::default());
        let permit = lead(fills.take(key, || Ok(((), file()))).unwrap());
        let reader = FollowReader::new(permit.fill().clone());
        std::thread::spawn(move || drop(permit)).join().unwrap();
        match reader.wait_committed() {
            Err(Error::FillFailed { reason, .. }) => {
                assert!(reason.contains("abandoned"), "{reason}")
            }
            other => panic!("expected an abandoned fill, got {other:?}"),
        }
        assert!(fills.is_empty());
        assert_eq!(fills.commits(), (0, 0));
    }

    #[test]
    fn an_error_of_start_registers_nothing() {
        let layout = Layout::new("/c", None);
        let id = ImageId::new("img").unwrap();
        let key = layout.admit(&id).unwrap();
        let fills = Arc::new(Fills::default());
        let taken = fills.take::<()>(key, || {
            Err(Error::AlreadyCached {
                id: ImageId::new("img").unwrap(),
            })
        });
        assert!(matches!(taken, Err(Error::AlreadyCached { .. })));
        assert!(fills.is_empty());
    }

    #[test]
    fn a_fill_ended_from_outside_keeps_that_end() {
        let layout = Layout::new("/c", None);
        let id = ImageId::new("img").unwrap();
        let key = layout.admit(&id).unwrap();
        let fills = Arc::new(Fills::default());
        let permit = lead(fills.take(key, || Ok(((), file()))).unwrap());
        let reader = FollowReader::new(permit.fill().clone());
        fills.end(permit.fill(), Failure::new("invalidated by the operator"));
        // A new reader leads a new fill at once.
        let second = lead(fills.take(key, || Ok(((), file()))).unwrap());
        // The first permit's late release neither revives its fill nor
        // unregisters the second.
        permit.release(Outcome::Committed(7));
        assert!(matches!(
            reader.wait_committed(),
            Err(Error::FillFailed { ref reason, .. }) if reason == "invalidated by the operator"
        ));
        assert!(!fills.is_empty());
        drop(second);
        assert!(fills.is_empty());
    }
}
