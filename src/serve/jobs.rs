//! The cache's jobs, run inside the serving process instead of from cron
//! (feature `admin`): a prefetch worker pool fed by the queue and by
//! `PUT /v2/cache/{id}`, a pruner that holds the cache under its
//! `max_size` (woken by every commit, and on a period for other processes'
//! commits), and a periodic cleaner of invalid and stalled files (which
//! also adopts files left without an entry, `ImageCache::adopt_unrecorded`).
//!
//! The jobs run on threads of their own (the cache's calls block); every
//! fill goes through the same admission as the data path's
//! ([`ImageCache::make_room`]).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::Metrics;
use crate::error::Error;
use crate::id::ImageId;
use crate::origin::{Origin, OriginRequest};
use crate::{Fetched, ImageCache};

/// How the jobs run.
#[derive(Clone)]
pub struct JobOptions {
    prefetch_workers: usize,
    counts_origin: bool,
    origin_token: Option<String>,
    queue_interval: Option<Duration>,
    prune_interval: Option<Duration>,
    clean_interval: Option<Duration>,
}

impl std::fmt::Debug for JobOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobOptions")
            .field("prefetch_workers", &self.prefetch_workers)
            .field("origin_token", &self.origin_token.as_ref().map(|_| "***"))
            .field("queue_interval", &self.queue_interval)
            .field("prune_interval", &self.prune_interval)
            .field("clean_interval", &self.clean_interval)
            .finish()
    }
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            prefetch_workers: 2,
            counts_origin: true,
            origin_token: None,
            queue_interval: Some(Duration::from_secs(60)),
            prune_interval: Some(Duration::from_secs(60)),
            clean_interval: Some(Duration::from_secs(600)),
        }
    }
}

impl JobOptions {
    /// Images fetched at once by the prefetcher (default 2). Zero: no
    /// prefetcher in this process — queued images stay queued, for
    /// `imgcache prefetch` or another process to fetch.
    pub fn prefetch_workers(mut self, n: usize) -> Self {
        self.prefetch_workers = n;
        self
    }

    /// Whether the prefetcher counts its origin requests (default yes);
    /// not where its origin counts them itself (peer fill on: see
    /// [`crate::serve::ImageService::origin_counts_requests`]).
    pub fn count_origin_requests(mut self, yes: bool) -> Self {
        self.counts_origin = yes;
        self
    }

    /// The `X-Auth-Token` the prefetcher sends to the origin (a service
    /// token: its fetches belong to no client). Default none.
    pub fn origin_token(mut self, token: Option<String>) -> Self {
        self.origin_token = token;
        self
    }

    /// How often the prefetcher passes over the queue for images queued
    /// otherwise than through [`Jobs::submit`] (the legacy `PUT`, another
    /// process, `imgcache queue-image`): default 60 s; `None`: only at the
    /// start.
    pub fn queue_interval(mut self, every: Option<Duration>) -> Self {
        self.queue_interval = every;
        self
    }

    /// How often the pruner looks, besides after each commit of this
    /// process (default 60 s; `None`: no pruner at all).
    pub fn prune_interval(mut self, every: Option<Duration>) -> Self {
        self.prune_interval = every;
        self
    }

    /// How often the cleaner runs (default 10 min; `None`: never). It uses
    /// the cache's `image_cache_stall_time`.
    pub fn clean_interval(mut self, every: Option<Duration>) -> Self {
        self.clean_interval = every;
        self
    }
}

/// The running jobs. Stop them with [`Jobs::stop`] (dropping the last
/// handle stops them too).
#[derive(Debug)]
pub struct Jobs {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    /// Whether the prefetcher counts its origin requests.
    counts_origin: bool,
    /// Whether this process prefetches at all.
    prefetches: bool,
    cache: Arc<ImageCache>,
    origin: Arc<dyn Origin>,
    metrics: Arc<Metrics>,
    /// What the prefetcher's origin requests carry.
    request: OriginRequest,
    /// Images waiting for a prefetch worker, and those being fetched.
    work: Mutex<Work>,
    more: Condvar,
    stopping: AtomicBool,
    /// Wakes sleeping periodic jobs at a stop.
    tick: Mutex<()>,
    woken: Condvar,
    /// The commit count the pruner last looked at.
    pruned: Mutex<u64>,
    pruned_cv: Condvar,
}

#[derive(Debug, Default)]
struct Work {
    pending: VecDeque<ImageId>,
    active: HashSet<ImageId>,
}

impl Jobs {
    /// Starts the jobs on `cache`, filling from `origin`, counting into
    /// `metrics`. Everything already queued is submitted.
    pub fn start(
        cache: Arc<ImageCache>,
        origin: Arc<dyn Origin>,
        metrics: Arc<Metrics>,
        options: JobOptions,
    ) -> std::io::Result<Jobs> {
        let shared = Arc::new(Shared {
            counts_origin: options.counts_origin,
            prefetches: options.prefetch_workers > 0,
            cache,
            origin,
            metrics,
            request: match &options.origin_token {
                Some(t) => OriginRequest::with_auth_token(t.clone()),
                None => OriginRequest::default(),
            },
            work: Mutex::new(Work::default()),
            more: Condvar::new(),
            stopping: AtomicBool::new(false),
            tick: Mutex::new(()),
            woken: Condvar::new(),
            pruned: Mutex::new(0),
            pruned_cv: Condvar::new(),
        });
        let mut threads = Vec::new();
        for n in 0..options.prefetch_workers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("imgcache-prefetch-{n}"))
                    .spawn(move || s.prefetch_worker())?,
            );
        }
        if let Some(every) = options.queue_interval.filter(|_| shared.prefetches) {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("imgcache-queue".into())
                    .spawn(move || {
                        while s.nap(every) {
                            s.submit_queued();
                        }
                    })?,
            );
        }
        if let Some(every) = options.prune_interval {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("imgcache-pruner".into())
                    .spawn(move || s.pruner(every))?,
            );
        }
        if let Some(every) = options.clean_interval {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("imgcache-cleaner".into())
                    .spawn(move || s.cleaner(every))?,
            );
        }
        let jobs = Jobs {
            shared,
            threads: Mutex::new(threads),
        };
        jobs.shared.submit_queued();
        Ok(jobs)
    }

    /// Hands `id` (queued already) to a prefetch worker, unless it is
    /// pending or being fetched.
    pub fn submit(&self, id: ImageId) {
        self.shared.submit(id);
    }

    /// The images waiting for a worker, and those being fetched now.
    pub fn prefetching(&self) -> (Vec<ImageId>, Vec<ImageId>) {
        let work = self.shared.work.lock();
        let mut active: Vec<ImageId> = work.active.iter().cloned().collect();
        active.sort();
        (work.pending.iter().cloned().collect(), active)
    }

    /// Waits until the pruner has looked at the cache after this
    /// process's `commits`-th commit (see [`ImageCache::commits`]), at most
    /// `timeout`; `true` if it has.
    pub fn wait_pruned(&self, commits: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = self.shared.pruned.lock();
        while *seen < commits {
            if self
                .shared
                .pruned_cv
                .wait_until(&mut seen, deadline)
                .timed_out()
            {
                return *seen >= commits;
            }
        }
        true
    }

    /// Stops the jobs: no new work starts; a prefetch in progress ends
    /// with its fill (see [`ImageCache::stop_fills`] to cut it short).
    /// Waits for the threads.
    pub fn stop(&self) {
        self.signal_stop();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }

    /// Tells the jobs to stop, without waiting for them: a prefetch in
    /// progress ends with its fill (stop the fills to end it sooner, then
    /// [`Jobs::stop`] to wait).
    pub fn signal_stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        {
            let _w = self.shared.work.lock();
            self.shared.more.notify_all();
        }
        {
            let _t = self.shared.tick.lock();
            self.shared.woken.notify_all();
        }
        // The pruner waits for commits: wake it too.
        self.shared.cache.wake_commit_waiters();
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Publishes, when dropped, that the pruner has looked after a commit.
struct Looked<'a>(&'a Shared, u64);

impl Drop for Looked<'_> {
    fn drop(&mut self) {
        let mut p = self.0.pruned.lock();
        *p = (*p).max(self.1);
        drop(p);
        self.0.pruned_cv.notify_all();
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn submit(&self, id: ImageId) {
        if !self.prefetches {
            return;
        }
        let mut work = self.work.lock();
        if work.active.contains(&id) || work.pending.contains(&id) {
            return;
        }
        work.pending.push_back(id);
        drop(work);
        self.more.notify_one();
    }

    /// Submits everything queued.
    fn submit_queued(&self) {
        if !self.prefetches {
            return;
        }
        match self.cache.queued_images() {
            Ok(queued) => queued.into_iter().for_each(|id| self.submit(id)),
            Err(e) => tracing::warn!(error = %e, "cannot list the queue"),
        }
    }

    /// Sleeps `d`, or until the jobs stop; `false` if they did.
    fn nap(&self, d: Duration) -> bool {
        let mut t = self.tick.lock();
        if self.stopping() {
            return false;
        }
        self.woken.wait_for(&mut t, d);
        !self.stopping()
    }

    fn prefetch_worker(&self) {
        loop {
            let id = {
                let mut work = self.work.lock();
                loop {
                    if self.stopping() {
                        return;
                    }
                    if let Some(id) = work.pending.pop_front() {
                        work.active.insert(id.clone());
                        break id;
                    }
                    self.more.wait(&mut work);
                }
            };
            let ok = self.prefetch(&id);
            self.metrics.job_run("prefetch", ok);
            self.work.lock().active.remove(&id);
        }
    }

    /// Fetches one queued image into the cache; `true` if it is cached.
    fn prefetch(&self, id: &ImageId) -> bool {
        // Never cacheable here (an id longer than the store records): off
        // the queue, with the reason, instead of failing at every pass.
        if let Err(e) = self.cache.storable(id) {
            tracing::warn!(image = %id, error = %e, "prefetch impossible; unqueued");
            let _ = self.cache.delete_queued_image(id);
            return false;
        }
        let (cache, origin, metrics) = (
            self.cache.clone(),
            self.origin.clone(),
            self.metrics.clone(),
        );
        let open_id = id.clone();
        let request = self.request.clone();
        let counts = self.counts_origin;
        let fetched = self.cache.fetch_detached(id, move || {
            if counts {
                metrics.origin_request("fill");
            }
            let object = origin.open_for(&open_id, &request)?;
            let evicted = cache.make_room(&open_id, object.size)?;
            metrics.evicted(&evicted);
            Ok(object)
        });
        let outcome = match fetched {
            Ok(Fetched::Cached(_)) => Ok(0),
            Ok(Fetched::Following(f)) => f.wait_committed(),
            Ok(Fetched::Uncached(_)) => Err(Error::FillFailed {
                id: id.clone(),
                reason: "the metadata store is down".into(),
            }),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(n) => {
                tracing::info!(image = %id, bytes = n, "prefetched");
                if let Err(e) = self.cache.delete_queued_image(id) {
                    tracing::warn!(image = %id, error = %e, "cannot unqueue");
                }
                true
            }
            // Never cacheable as things are: out of the queue. (No room
            // while the store is down is no verdict: nothing could be
            // evicted; it stays queued.)
            Err(e @ (Error::OriginNotFound { .. } | Error::NoRoom { .. }))
                if !matches!(e, Error::NoRoom { .. }) || self.cache.cache_size().is_ok() =>
            {
                tracing::warn!(image = %id, error = %e, "prefetch failed; unqueued");
                let _ = self.cache.delete_queued_image(id);
                false
            }
            // Stays queued for the next PUT or start.
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "prefetch failed; still queued");
                false
            }
        }
    }

    fn pruner(&self, every: Duration) {
        let mut seen = self.cache.commits().0;
        let mut first = true;
        loop {
            if !first {
                seen = self
                    .cache
                    .wait_for_commit_unless(seen, every, &self.stopping);
            }
            first = false;
            if self.stopping() {
                return;
            }
            let _looked = Looked(self, seen);
            let limit = self.cache.options().image_cache_max_size();
            let over = match self.cache.cache_size() {
                Ok(size) => size > limit,
                Err(e) => {
                    tracing::warn!(error = %e, "pruner: cannot size the cache");
                    self.metrics.job_run("prune", false);
                    if !self.nap(every) {
                        return;
                    }
                    continue;
                }
            };
            if !over {
                continue;
            }
            match self.cache.prune() {
                Ok(report) => {
                    self.metrics.evicted(&report);
                    self.metrics.job_run("prune", true);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruner failed");
                    self.metrics.job_run("prune", false);
                }
            }
        }
    }

    fn cleaner(&self, every: Duration) {
        while self.nap(every) {
            // Files whose entries a crashed process held are recorded too
            // (counted in the size, evictable).
            let cleaned = self
                .cache
                .clean(None)
                .and_then(|_| self.cache.adopt_unrecorded());
            match cleaned {
                Ok(_) => self.metrics.job_run("clean", true),
                Err(e) => {
                    tracing::warn!(error = %e, "cleaner failed");
                    self.metrics.job_run("clean", false);
                }
            }
        }
    }
}
