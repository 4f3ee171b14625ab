//! The prefetcher: fetch every queued image from an origin, a bounded
//! number at a time.

use std::collections::VecDeque;
use std::io::Read;

use parking_lot::Mutex;

use super::ImageCache;
use crate::error::{Error, Result};
use crate::id::ImageId;
use crate::origin::Origin;

/// How one queued image fared.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrefetchOutcome {
    /// Fetched and cached: this many bytes.
    Cached {
        /// Bytes fetched.
        bytes: u64,
    },
    /// It was cached already; taken off the queue.
    AlreadyCached,
    /// Another writer is filling it now; left queued.
    BeingCached,
}

/// One queued image and what happened to it.
#[derive(Debug)]
pub struct PrefetchResult {
    /// The image.
    pub id: ImageId,
    /// Its outcome; an error leaves it queued for the next run.
    pub outcome: Result<PrefetchOutcome>,
}

/// What [`ImageCache::prefetch`] did, in queue order.
#[derive(Debug, Default)]
pub struct PrefetchReport {
    /// One entry per image that was queued when the run began.
    pub results: Vec<PrefetchResult>,
}

impl PrefetchReport {
    /// The failures (still queued).
    pub fn failures(&self) -> impl Iterator<Item = (&ImageId, &Error)> {
        self.results
            .iter()
            .filter_map(|r| r.outcome.as_ref().err().map(|e| (&r.id, e)))
    }

    /// Whether every image was fetched (or was cached already).
    pub fn all_succeeded(&self) -> bool {
        self.failures().next().is_none()
    }

    /// Bytes fetched in all.
    pub fn bytes(&self) -> u64 {
        self.results
            .iter()
            .map(|r| match r.outcome {
                Ok(PrefetchOutcome::Cached { bytes }) => bytes,
                _ => 0,
            })
            .sum()
    }
}

/// Progress of a prefetch run, for progress bars and logs. Events come from
/// the worker threads.
#[derive(Debug)]
#[non_exhaustive]
pub enum PrefetchEvent<'a> {
    /// A fetch began; the origin may know the size.
    Started {
        /// The image.
        id: &'a ImageId,
        /// Its size, if the origin knows it.
        size: Option<u64>,
    },
    /// Bytes so far of one fetch.
    Progress {
        /// The image.
        id: &'a ImageId,
        /// Bytes fetched so far.
        bytes: u64,
    },
    /// One image is done.
    Finished {
        /// The image.
        id: &'a ImageId,
        /// How it fared.
        outcome: &'a Result<PrefetchOutcome>,
    },
}

impl ImageCache {
    /// Fetches every queued image from `origin` through the caching tee,
    /// `parallel` at a time (at least one). A success leaves the queue; a
    /// failure stays queued for the next run and is in the report.
    pub fn prefetch(&self, origin: &dyn Origin, parallel: usize) -> Result<PrefetchReport> {
        self.prefetch_with(origin, parallel, &|_| {})
    }

    /// [`ImageCache::prefetch`], reporting progress to `on_event`.
    pub fn prefetch_with(
        &self,
        origin: &dyn Origin,
        parallel: usize,
        on_event: &(dyn Fn(PrefetchEvent<'_>) + Sync),
    ) -> Result<PrefetchReport> {
        let queued = self.queued_images()?;
        let work: Mutex<VecDeque<(usize, ImageId)>> =
            Mutex::new(queued.iter().cloned().enumerate().collect());
        let results: Mutex<Vec<Option<PrefetchResult>>> =
            Mutex::new((0..queued.len()).map(|_| None).collect());
        let workers = parallel.max(1).min(queued.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let Some((i, id)) = work.lock().pop_front() else {
                        break;
                    };
                    let outcome = self.prefetch_one(origin, &id, on_event);
                    on_event(PrefetchEvent::Finished {
                        id: &id,
                        outcome: &outcome,
                    });
                    if let Err(e) = &outcome {
                        tracing::warn!("imgcache: prefetch of {id} failed: {e}");
                    }
                    results.lock()[i] = Some(PrefetchResult { id, outcome });
                });
            }
        });
        Ok(PrefetchReport {
            results: results.into_inner().into_iter().flatten().collect(),
        })
    }

    fn prefetch_one(
        &self,
        origin: &dyn Origin,
        id: &ImageId,
        on_event: &(dyn Fn(PrefetchEvent<'_>) + Sync),
    ) -> Result<PrefetchOutcome> {
        if self.is_cached(id)? {
            self.delete_queued_image(id)?;
            return Ok(PrefetchOutcome::AlreadyCached);
        }
        // Never cacheable here: off the queue, with the reason.
        if let Err(e) = self.storable(id) {
            self.delete_queued_image(id)?;
            return Err(e);
        }
        let object = origin.open(id)?;
        on_event(PrefetchEvent::Started {
            id,
            size: object.size,
        });
        let mut tee = self.caching_reader(id, object.checksum, object.reader)?;
        if !tee.is_caching() {
            return Ok(PrefetchOutcome::BeingCached);
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            match tee.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    bytes += n as u64;
                    on_event(PrefetchEvent::Progress { id, bytes });
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::from_io_of(id, e)),
            }
        }
        match &tee.stats().cache_error {
            None if tee.stats().cached => Ok(PrefetchOutcome::Cached { bytes }),
            error => Err(Error::FillFailed {
                id: id.clone(),
                reason: error.clone().unwrap_or_else(|| "not committed".into()),
            }),
        }
    }
}
