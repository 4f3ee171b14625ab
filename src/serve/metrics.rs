//! What a serving process counts, in Prometheus' text format
//! (`prometheus-client`): requests by result, bytes by source, origin
//! requests, coalesced requests, fills in flight, evictions, the cache's
//! size and free space, and job runs.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ImageCache;
use crate::PruneReport;

/// One label.
type Label = [(&'static str, &'static str); 1];
/// Two labels.
type Labels2 = [(&'static str, &'static str); 2];

/// The counters of a serving process, shared by the data path
/// ([`super::ImageService`]), the management API and the jobs. Cheap to
/// update (atomics); [`Metrics::encode`] writes them out.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Label, Counter>,
    served: Family<Label, Counter>,
    origin_requests: Family<Label, Counter>,
    fill_bytes: Family<Label, Counter>,
    peer_events: Family<Label, Counter>,
    coalesced: Counter,
    evictions: Counter,
    evicted_bytes: Counter,
    job_runs: Family<Labels2, Counter>,
    fills_in_flight: Gauge,
    cache_bytes: Gauge,
    free_bytes: Gauge,
    cached_images: Gauge,
    queued_images: Gauge,
    /// The series every request touches, made once (a lookup by labels
    /// hashes them under a lock): requests by [`Outcome::index`], and
    /// body bytes served from the cache, the origin and peers.
    by_outcome: [Counter; Outcome::ALL.len()],
    served_from: [Counter; 3],
}

/// Where served bytes come from, as [`Metrics`] labels them.
const SERVED_FROM: [&str; 3] = ["cache", "origin", "peer"];

/// How a request for an image ended, as [`Metrics`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Started a fill, and streamed it.
    Miss,
    /// Joined a fill in progress.
    Follow,
    /// Served from the origin, uncached (no room, or the store is down).
    Bypass,
    /// Refused: the origin denied the client access.
    Denied,
    /// Served to another node of the fleet (peer fill).
    Peer,
    /// Anything else that did not serve the image (404, 4xx, 5xx, 304 is
    /// not one: it counts as its source).
    Error,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Follow,
        Outcome::Bypass,
        Outcome::Denied,
        Outcome::Peer,
        Outcome::Error,
    ];

    fn index(self) -> usize {
        match self {
            Outcome::Hit => 0,
            Outcome::Miss => 1,
            Outcome::Follow => 2,
            Outcome::Bypass => 3,
            Outcome::Denied => 4,
            Outcome::Peer => 5,
            Outcome::Error => 6,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Follow => "follow",
            Outcome::Bypass => "bypass",
            Outcome::Denied => "denied",
            Outcome::Peer => "peer",
            Outcome::Error => "error",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh counters, registered under the `imgcache_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("imgcache");
        let requests = Family::<Label, Counter>::default();
        let served = Family::<Label, Counter>::default();
        let origin_requests = Family::<Label, Counter>::default();
        let fill_bytes = Family::<Label, Counter>::default();
        let peer_events = Family::<Label, Counter>::default();
        let job_runs = Family::<Labels2, Counter>::default();
        let coalesced = Counter::default();
        let evictions = Counter::default();
        let evicted_bytes = Counter::default();
        let fills_in_flight = Gauge::default();
        let cache_bytes = Gauge::default();
        let free_bytes = Gauge::default();
        let cached_images = Gauge::default();
        let queued_images = Gauge::default();
        registry.register(
            "requests",
            "Image requests by result (hit, miss, follow, bypass, denied, peer, error)",
            requests.clone(),
        );
        registry.register(
            "served_bytes",
            "Body bytes sent to clients, by where they came from (cache: hits; origin: fills and pass-throughs; peer: fills from a peer)",
            served.clone(),
        );
        registry.register(
            "origin_requests",
            "Requests made of the origin, by kind (fill, bypass, authorize)",
            origin_requests.clone(),
        );
        registry.register(
            "fill_bytes",
            "Bytes fills read, by source (origin, peer), with peer fill on",
            fill_bytes.clone(),
        );
        registry.register(
            "peer_events",
            "Peer fill: fill (a fill from a peer), busy (a peer at its fan-out), failover (a peer replaced mid-transfer), bad (a peer's bytes failed the checksum), served (a transfer to a peer), refused (a peer's request without the fleet token)",
            peer_events.clone(),
        );
        registry.register(
            "coalesced_requests",
            "Requests that joined a fill in progress instead of asking the origin",
            coalesced.clone(),
        );
        registry.register(
            "evictions",
            "Images evicted (pruned, or made room for)",
            evictions.clone(),
        );
        registry.register(
            "evicted_bytes",
            "Bytes of the images evicted",
            evicted_bytes.clone(),
        );
        registry.register(
            "job_runs",
            "Runs of the in-process jobs (prefetch, prune, clean) by outcome",
            job_runs.clone(),
        );
        registry.register(
            "fills_in_flight",
            "Fills in progress in this process",
            fills_in_flight.clone(),
        );
        registry.register("cache_bytes", "Bytes of cached images", cache_bytes.clone());
        registry.register(
            "free_bytes",
            "Free bytes on the cache's file system (for unprivileged users)",
            free_bytes.clone(),
        );
        registry.register("cached_images", "Cached images", cached_images.clone());
        registry.register(
            "queued_images",
            "Images queued for prefetching",
            queued_images.clone(),
        );
        let by_outcome =
            Outcome::ALL.map(|o| requests.get_or_create(&[("result", o.label())]).clone());
        let served_from = SERVED_FROM.map(|s| served.get_or_create(&[("source", s)]).clone());
        Metrics {
            by_outcome,
            served_from,
            registry,
            requests,
            served,
            origin_requests,
            fill_bytes,
            peer_events,
            coalesced,
            evictions,
            evicted_bytes,
            job_runs,
            fills_in_flight,
            cache_bytes,
            free_bytes,
            cached_images,
            queued_images,
        }
    }

    /// Counts a request.
    pub fn request(&self, outcome: Outcome) {
        self.by_outcome[outcome.index()].inc();
    }

    /// The requests counted with `outcome`.
    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&[("result", outcome.label())])
            .get()
    }

    /// The counter of body bytes from `source` (`"cache"` or `"origin"`).
    pub(crate) fn served_counter(&self, source: &'static str) -> Counter {
        match SERVED_FROM.iter().position(|s| *s == source) {
            Some(i) => self.served_from[i].clone(),
            None => self.served.get_or_create(&[("source", source)]).clone(),
        }
    }

    /// Body bytes sent from `source` (`"cache"` or `"origin"`).
    pub fn served_bytes(&self, source: &'static str) -> u64 {
        self.served.get_or_create(&[("source", source)]).get()
    }

    /// Counts a request of the origin of `kind` (`fill`, `bypass`,
    /// `authorize`).
    pub fn origin_request(&self, kind: &'static str) {
        self.origin_requests.get_or_create(&[("kind", kind)]).inc();
    }

    /// The origin requests of `kind` counted.
    pub fn origin_requests(&self, kind: &'static str) -> u64 {
        self.origin_requests.get_or_create(&[("kind", kind)]).get()
    }

    /// Counts `n` bytes a fill read from `source` (`origin`, `peer`).
    pub(crate) fn fill_bytes(&self, source: &'static str, n: u64) {
        self.fill_bytes
            .get_or_create(&[("source", source)])
            .inc_by(n);
    }

    /// Bytes fills read from `source` so far (peer fill on).
    pub fn fill_bytes_from(&self, source: &'static str) -> u64 {
        self.fill_bytes.get_or_create(&[("source", source)]).get()
    }

    /// Counts a peer fill event (`fill`, `busy`, `failover`, `bad`,
    /// `served`, `refused`).
    pub(crate) fn peer_event(&self, event: &'static str) {
        self.peer_events.get_or_create(&[("event", event)]).inc();
    }

    /// Peer fill events of one kind so far.
    pub fn peer_events(&self, event: &'static str) -> u64 {
        self.peer_events.get_or_create(&[("event", event)]).get()
    }

    /// Counts a request that joined a fill in progress.
    pub fn coalesced(&self) {
        self.coalesced.inc();
    }

    /// The requests that joined a fill in progress.
    pub fn coalesced_requests(&self) -> u64 {
        self.coalesced.get()
    }

    /// Counts what a prune (or an admission) evicted.
    pub fn evicted(&self, report: &PruneReport) {
        self.evictions.inc_by(report.files() as u64);
        self.evicted_bytes.inc_by(report.bytes);
    }

    /// Images evicted so far, and their bytes.
    pub fn evictions(&self) -> (u64, u64) {
        (self.evictions.get(), self.evicted_bytes.get())
    }

    /// Counts a run of `job` (`prefetch`, `prune`, `clean`).
    pub fn job_run(&self, job: &'static str, ok: bool) {
        self.job_runs
            .get_or_create(&[("job", job), ("outcome", if ok { "ok" } else { "error" })])
            .inc();
    }

    /// The runs of `job` that ended `ok` (or not).
    pub fn job_runs(&self, job: &'static str, ok: bool) -> u64 {
        self.job_runs
            .get_or_create(&[("job", job), ("outcome", if ok { "ok" } else { "error" })])
            .get()
    }

    /// Reads the gauges off `cache` (the store and the file system: call
    /// it off an async runtime's threads).
    pub fn observe(&self, cache: &ImageCache) {
        self.fills_in_flight
            .set(cache.fills_in_progress().len() as i64);
        if let Ok(images) = cache.cached_images() {
            self.cached_images.set(images.len() as i64);
            self.cache_bytes.set(
                images
                    .iter()
                    .map(|i| i.size)
                    .sum::<u64>()
                    .min(i64::MAX as u64) as i64,
            );
        }
        if let Ok(queued) = cache.queued_images() {
            self.queued_images.set(queued.len() as i64);
        }
        if let Ok((free, _)) = cache.file_system_space() {
            self.free_bytes.set(free.min(i64::MAX as u64) as i64);
        }
    }

    /// The counters as OpenMetrics text (`application/openmetrics-text`),
    /// which Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_series() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i, "{o:?}");
        }
        let m = Metrics::new();
        m.request(Outcome::Peer);
        m.request(Outcome::Peer);
        m.request(Outcome::Hit);
        assert_eq!(m.requests(Outcome::Peer), 2);
        assert_eq!(m.requests(Outcome::Hit), 1);
        assert_eq!(m.requests(Outcome::Error), 0);
        m.served_counter("peer").inc_by(5);
        assert_eq!(m.served_bytes("peer"), 5);
    }
}
