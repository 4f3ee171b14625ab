//! Peer fill: the nodes of a fleet on one `centralized_db` fill their
//! misses from each other, so that the origin serves each image once per
//! fleet.
//!
//! **The filling side** (`PeerOrigin`, an [`Origin`] in front of the real
//! one). On a miss, a node asks the shared store where the image is
//! ([`Fleet::sources`]):
//!
//! 1. a node that holds it: its data port serves the cached file;
//! 2. else the fleet's claim to fill it ([`Fleet::claim_fill`], an advisory
//!    lock that dies with its holder): the claimant goes to the origin;
//! 3. else a node filling it: this node follows that fill over HTTP, as a
//!    local reader follows a local fill (bytes as they land, the last one
//!    only after the commit there).
//!
//! A claimant announces its fill at once, and every node announces its own
//! fill once it has a source ([`Fleet::announce_fill`]), so that the next
//! node can follow *it*: the image spreads as a tree, and each node serves
//! at most [`PeerOptions::fanout`] peers at once (the others are told
//! `503` with `X-Imgcache-Busy` and try another source, or again shortly).
//! A node waits for the fleet (up to two minutes) while another holds the
//! claim or holders are busy; only past that, or when the database cannot
//! be asked, does it go to the origin itself.
//!
//! The bytes are checked against what the fleet recorded — the size, and
//! the checksum the origin gave the first node, or else the holder's CRC-32
//! — never against a peer's word: a mismatch fails the fill (its clients'
//! responses are cut, never ended cleanly), and a peer that alone supplied
//! the wrong bytes is never asked for that image again by this node (a
//! filler's row is also dropped; a holder's rows are its own to correct).
//! A peer that fails or stalls mid-transfer is replaced by another source
//! or the origin, resuming at the byte already received (`Range`): the
//! clients' responses go on.
//!
//! **The serving side** (the planner). A request carrying
//! [`PEER_TOKEN_HEADER`] is a peer's: with the fleet token it is served
//! from what this node has — its cached file, checked whole against the
//! CRC-32 it was committed with before it is first sent (a corrupt copy is
//! quarantined, never sent; an entry without a CRC-32, adopted or written
//! by Glance, is sent as it is, and checked by the peer against the
//! recorded checksum), or its fill in progress — and never starts a fill
//! (no loops between nodes); with a wrong token, or where peers are off, it
//! is refused (`403`). Peers do not ask the origin whether a client may
//! read an image: the node a client asked did, before it filled.
//!
//! The claims live on one PostgreSQL session per node: they die with it
//! (the node's death, a database restart — then a second node may go to
//! the origin), and need a session that lasts (not PgBouncer's transaction
//! pooling). The transfers are plain HTTP/1.1 between data ports, never
//! through a proxy; put the fleet on a private network, as its database
//! is.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;

use super::metrics::Metrics;
use crate::checksum::{Checksum, Hasher};
use crate::drivers::{Announced, FillClaim, Fleet, PeerSource};
use crate::error::{Error, Result};
use crate::id::ImageId;
use crate::origin::template::percent_encode;
use crate::origin::{Access, Origin, OriginObject, OriginRequest};
use crate::ImageCache;

/// The header a peer's request carries the fleet token in.
pub const PEER_TOKEN_HEADER: &str = "x-imgcache-peer-token";

/// Peer transfers a node serves at once by default.
pub const DEFAULT_FANOUT: usize = 4;

/// How long a peer may take to accept a connection: a node that is gone
/// refuses at once, one that is unreachable is skipped after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a peer may go without sending a byte (its response head
/// included: a holder checks its file before it answers) before it is
/// taken for stalled and replaced.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a node waits for the fleet while another node holds the claim
/// or the holders are busy, and the longest pause between looks; then it
/// goes to the origin itself.
const MAX_WAIT: Duration = Duration::from_secs(120);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// The header of a `503` that means "at my fan-out, ask again".
pub const BUSY_HEADER: &str = "x-imgcache-busy";

/// How a node takes part in peer fill: `imgcache serve --peers`.
#[derive(Clone)]
pub struct PeerOptions {
    token: String,
    fanout: usize,
}

impl fmt::Debug for PeerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerOptions")
            .field("token", &"***")
            .field("fanout", &self.fanout)
            .finish()
    }
}

impl PeerOptions {
    /// Peer fill with the fleet's shared `token` (every node has the same),
    /// serving at most [`DEFAULT_FANOUT`] peers at once.
    pub fn new(token: impl Into<String>) -> Self {
        PeerOptions {
            token: token.into(),
            fanout: DEFAULT_FANOUT,
        }
    }

    /// Serves at most `k` peer transfers at once (at least one).
    pub fn fanout(mut self, k: usize) -> Self {
        self.fanout = k.max(1);
        self
    }

    /// The most peer transfers served at once.
    pub fn fanout_value(&self) -> usize {
        self.fanout
    }

    /// Whether `given` is the fleet token (compared in constant time).
    pub fn admits(&self, given: &str) -> bool {
        !self.token.is_empty() && super::same_token(given, &self.token)
    }
}

/// An [`Origin`] that fills from the fleet's peers first; see the module
/// docs. Built by [`super::ImageService`] when [`super::ServeOptions::peers`]
/// is set and the cache's store is shared ([`Fleet`]).
pub(crate) struct PeerOrigin {
    shared: Arc<Shared>,
}

struct Shared {
    origin: Arc<dyn Origin>,
    cache: Arc<ImageCache>,
    client: reqwest::Client,
    handle: Handle,
    token: String,
    prefix: String,
    metrics: Arc<Metrics>,
    /// Peers whose bytes of an image failed its checksum: never asked for
    /// it again.
    bad: Mutex<HashSet<(String, ImageId)>>,
    /// Whether this node is registered as serving peers.
    joined: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for PeerOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerOrigin")
            .field("origin", &self.shared.origin)
            .finish_non_exhaustive()
    }
}

impl PeerOrigin {
    /// Peers first, then `origin`, for `cache` (whose store must be a
    /// fleet's); `None` outside a tokio runtime or without a fleet.
    pub(crate) fn new(
        origin: Arc<dyn Origin>,
        cache: Arc<ImageCache>,
        options: &PeerOptions,
        prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        let Some(fleet) = cache.driver().extensions().fleet() else {
            tracing::warn!(
                "peer fill needs a store shared by the fleet (centralized_db); the {} store is not: \
                 peers are off",
                cache.driver().name()
            );
            return None;
        };
        let Ok(handle) = Handle::try_current() else {
            tracing::warn!("peer fill needs a tokio runtime: peers are off");
            return None;
        };
        let client = match reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no HTTP client for peer fill: peers are off");
                return None;
            }
        };
        // Registered as a node that serves peers, its stale fills (of a
        // run that was killed) forgotten: on a thread of its own, as the
        // store's client blocks and this may run on the runtime.
        let joined = std::thread::scope(|s| s.spawn(|| fleet.join_peers()).join());
        let joined = match joined {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot register for peer fill yet; retried at the next fill");
                false
            }
            Err(_) => false,
        };
        Some(PeerOrigin {
            shared: Arc::new(Shared {
                origin,
                cache,
                client,
                handle,
                token: options.token.clone(),
                prefix: prefix.to_owned(),
                metrics,
                bad: Mutex::default(),
                joined: std::sync::atomic::AtomicBool::new(joined),
            }),
        })
    }
}

impl Origin for PeerOrigin {
    fn open(&self, id: &ImageId) -> Result<OriginObject> {
        self.open_for(id, &OriginRequest::default())
    }

    fn open_for(&self, id: &ImageId, request: &OriginRequest) -> Result<OriginObject> {
        let shared = &self.shared;
        shared.join();
        let fill = fill_token();
        let opened = shared.find(id, request, 0, None, fill)?;
        let expect = Expect {
            size: opened.size,
            checksum: opened.checksum.clone(),
        };
        let announced = shared.announce(id, fill, &expect, opened.peer.is_none());
        let (size, checksum) = (expect.size, expect.checksum.clone());
        let mut reader = FleetReader {
            shared: shared.clone(),
            id: id.clone(),
            request: request.clone(),
            fill,
            pos: 0,
            hasher: None,
            crc: None,
            expect,
            peers_used: Vec::new(),
            origin_bytes: 0,
            failed: Vec::new(),
            current: Some(opened),
            announced,
        };
        reader.arm_checks();
        Ok(OriginObject {
            reader: Box::new(reader),
            size,
            checksum,
        })
    }

    fn authorize(&self, id: &ImageId, request: &OriginRequest) -> Result<Access> {
        self.shared.origin.authorize(id, request)
    }

    fn describe(&self) -> String {
        format!("{} (peers first)", self.shared.origin.describe())
    }
}

/// A name for one fill, unique enough among one node's fills.
fn fill_token() -> u64 {
    use std::hash::{BuildHasher, Hasher as _};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    // Positive as a PostgreSQL bigint.
    h.finish() >> 1
}

/// What every source of one fill must agree on: what the fleet recorded,
/// or the origin announced.
#[derive(Debug, Clone)]
struct Expect {
    size: Option<u64>,
    checksum: Option<Checksum>,
}

/// Where a fill's bytes come from now.
struct Opened {
    reader: Box<dyn Read + Send>,
    size: Option<u64>,
    checksum: Option<Checksum>,
    /// The peer's node URL; `None` for the origin.
    peer: Option<String>,
    /// The CRC-32 of the whole image, for a holder that recorded one.
    crc32: Option<u32>,
    /// Held while this node fills from the origin for the fleet.
    claim: Option<FillClaim>,
}

impl Shared {
    fn fleet(&self) -> Option<&dyn Fleet> {
        self.cache.driver().extensions().fleet()
    }

    /// Registers this node for peer fill, if that failed so far.
    fn join(&self) {
        use std::sync::atomic::Ordering;
        if self.joined.load(Ordering::Relaxed) {
            return;
        }
        if let Some(fleet) = self.fleet() {
            match fleet.join_peers() {
                Ok(()) => self.joined.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "cannot register for peer fill yet"),
            }
        }
    }

    /// Announces this node's fill `fill` of `id`; whether it could.
    fn announce(&self, id: &ImageId, fill: u64, expect: &Expect, leads: bool) -> bool {
        let Some(fleet) = self.fleet() else {
            return false;
        };
        let stored = expect.checksum.as_ref().map(Checksum::stored_form);
        let at = Announced::new(expect.size, stored.as_deref(), leads);
        match fleet.announce_fill(id, fill, &at) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "cannot announce the fill to the fleet");
                false
            }
        }
    }

    /// A source for `id` from byte `pos`, in the order of the module docs;
    /// with `resume` (a fill whose source failed), only one that agrees
    /// with what the fill has had, never a node in `resume`'s list of
    /// failed ones, and, of the nodes filling, only one that fills from
    /// the origin (a node following this one could be picked otherwise,
    /// and the two would wait for each other).
    fn find(
        &self,
        id: &ImageId,
        request: &OriginRequest,
        pos: u64,
        resume: Option<(&Expect, &[String])>,
        fill: u64,
    ) -> Result<Opened> {
        let Some(fleet) = self.fleet() else {
            return self.open_origin(id, request, pos, None);
        };
        let me = fleet.node().to_owned();
        // Nodes that did not answer at all: out of this search.
        let mut gone: HashSet<String> = resume
            .map(|(_, failed)| failed.iter().cloned().collect())
            .unwrap_or_default();
        let give_up = std::time::Instant::now() + MAX_WAIT;
        let mut round = 0u32;
        while std::time::Instant::now() < give_up {
            round += 1;
            let sources = match fleet.sources(id) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(image = %id, error = %e, "cannot ask the fleet; going to the origin");
                    return self.open_origin(id, request, pos, None);
                }
            };
            let usable = |s: &&PeerSource| {
                s.node != me
                    && !gone.contains(&s.node)
                    && !self.bad.lock().contains(&(s.node.clone(), id.clone()))
                    && resume.is_none_or(|(e, _)| agrees(e, s))
            };
            let mut holders: Vec<&PeerSource> = sources
                .iter()
                .filter(|s| !s.filling)
                .filter(usable)
                .collect();
            let mut fillers: Vec<&PeerSource> = sources
                .iter()
                .filter(|s| s.filling && (resume.is_none() || s.leads))
                .filter(usable)
                .collect();
            shuffle(&mut holders);
            shuffle(&mut fillers);
            let mut busy = false;
            let mut unreachable = Vec::new();
            for source in holders {
                match self.open_peer(id, source, pos) {
                    Ok(opened) => return Ok(opened),
                    Err(PeerError::Busy) => busy = true,
                    Err(e) => {
                        tracing::info!(image = %id, peer = %source.node, error = %e, "peer skipped");
                        if let PeerError::Unreachable(_) = e {
                            unreachable.push(source.node.clone());
                        }
                    }
                }
            }
            // Holders at their fan-out will have room soon: no need for
            // the origin.
            if !busy {
                match fleet.claim_fill(id) {
                    Ok(Some(claim)) => {
                        // Followers may come at once: they wait, at this
                        // node's data port, for the origin's answer.
                        let expect = resume.map_or(
                            Expect {
                                size: None,
                                checksum: None,
                            },
                            |(e, _)| e.clone(),
                        );
                        let announced = self.announce(id, fill, &expect, true);
                        let opened = self.open_origin(id, request, pos, Some(claim));
                        if opened.is_err() && announced {
                            if let Err(e) = fleet.withdraw_fill(id, fill) {
                                tracing::warn!(image = %id, error = %e, "cannot withdraw the fill from the fleet");
                            }
                        }
                        return opened;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(image = %id, error = %e, "cannot claim the fill; going to the origin");
                        return self.open_origin(id, request, pos, None);
                    }
                }
            }
            for source in fillers {
                match self.open_peer(id, source, pos) {
                    Ok(opened) => return Ok(opened),
                    Err(PeerError::Busy) => {}
                    Err(e) => {
                        tracing::info!(image = %id, peer = %source.node, error = %e, "peer skipped");
                        if let PeerError::Unreachable(_) = e {
                            unreachable.push(source.node.clone());
                        }
                    }
                }
            }
            gone.extend(unreachable);
            // Another node holds the claim and its fill is not to be seen
            // or followed yet, or every source is serving its share of
            // peers: look again shortly.
            std::thread::sleep((Duration::from_millis(10) * round).min(MAX_PAUSE));
        }
        tracing::warn!(image = %id, "no peer could serve it in time; going to the origin");
        self.open_origin(id, request, pos, None)
    }

    /// The origin's bytes from `pos`.
    fn open_origin(
        &self,
        id: &ImageId,
        request: &OriginRequest,
        pos: u64,
        claim: Option<FillClaim>,
    ) -> Result<Opened> {
        self.metrics.origin_request("fill");
        let object = if pos == 0 {
            self.origin.open_for(id, request)?
        } else if let Some(object) = self.origin.open_from(id, request, pos)? {
            object
        } else {
            let mut object = self.origin.open_for(id, request)?;
            let skipped =
                io::copy(&mut (&mut object.reader).take(pos), &mut io::sink()).map_err(|e| {
                    Error::Source {
                        id: id.clone(),
                        source: e,
                    }
                })?;
            if skipped < pos {
                return Err(Error::FillFailed {
                    id: id.clone(),
                    reason: format!("the origin's image ended at {skipped} bytes, before {pos}"),
                });
            }
            object
        };
        Ok(Opened {
            reader: object.reader,
            size: object.size,
            checksum: object.checksum,
            peer: None,
            crc32: None,
            claim,
        })
    }

    /// `source`'s bytes of `id` from `pos`, with what the fleet recorded of
    /// them.
    fn open_peer(
        &self,
        id: &ImageId,
        source: &PeerSource,
        pos: u64,
    ) -> std::result::Result<Opened, PeerError> {
        let url = format!(
            "{}{}{}/file",
            source.node.trim_end_matches('/'),
            self.prefix,
            percent_encode(id.as_str())
        );
        let mut get = self.client.get(&url).header(PEER_TOKEN_HEADER, &self.token);
        if pos > 0 {
            get = get.header("Range", format!("bytes={pos}-"));
        }
        let response = self
            .handle
            .block_on(async { get.send().await })
            .map_err(|e| {
                if e.is_connect() {
                    PeerError::Unreachable(format!("{url}: {e}"))
                } else {
                    PeerError::Failed(format!("{url}: {e}"))
                }
            })?;
        let status = response.status().as_u16();
        match status {
            200 if pos == 0 => {}
            206 if pos > 0 => {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match crate::range::content_range_start(range) {
                    Some((start, _)) if start == pos => {}
                    _ => {
                        return Err(PeerError::Failed(format!(
                            "{url}: asked from byte {pos}, got Content-Range {range:?}"
                        )))
                    }
                }
            }
            503 if response.headers().contains_key(BUSY_HEADER) => {
                self.metrics.peer_event("busy");
                return Err(PeerError::Busy);
            }
            other => return Err(PeerError::Failed(format!("{url}: HTTP {other}"))),
        }
        // What the fleet recorded, not what the peer says: re-read for a
        // filler, whose row has its origin's answer by the time it answers.
        let recorded = if source.filling {
            self.fleet()
                .and_then(|f| f.sources(id).ok())
                .and_then(|all| all.into_iter().find(|s| s.node == source.node && s.filling))
                .unwrap_or_else(|| source.clone())
        } else {
            source.clone()
        };
        let checksum = match recorded.checksum.as_deref().map(Checksum::from_stored_form) {
            Some(Ok(c)) => Some(c),
            Some(Err(_)) | None => None,
        };
        if let (Some(size), Some(len)) = (recorded.size, response.content_length()) {
            if len != size.saturating_sub(pos) {
                return Err(PeerError::Failed(format!(
                    "{url}: {len} bytes from {pos} of an image the fleet recorded at {size}"
                )));
            }
        }
        use futures_util::TryStreamExt;
        let stream = response
            .bytes_stream()
            .map_err(|e| io::Error::other(e.to_string()));
        let reader = tokio_util::io::SyncIoBridge::new_with_handle(
            tokio_util::io::StreamReader::new(stream),
            self.handle.clone(),
        );
        self.metrics.peer_event("fill");
        Ok(Opened {
            reader: Box::new(reader),
            // Never the peer's Content-Length: a size the fleet did not
            // record is not known.
            size: recorded.size,
            checksum,
            peer: Some(source.node.clone()),
            crc32: if source.filling { None } else { recorded.crc32 },
            claim: None,
        })
    }
}

/// Why a peer did not serve.
#[derive(Debug)]
enum PeerError {
    /// At its fan-out: try another, or again soon.
    Busy,
    /// No connection (refused, or not within the connect timeout): the
    /// node is taken for gone.
    Unreachable(String),
    /// It answered something else (not there yet, refused, a bad range),
    /// or not in time: skipped this time.
    Failed(String),
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Busy => f.write_str("busy"),
            PeerError::Unreachable(why) | PeerError::Failed(why) => f.write_str(why),
        }
    }
}

/// Whether `source` recorded the same image `expect` holds (what either
/// does not know cannot disagree).
fn agrees(expect: &Expect, source: &PeerSource) -> bool {
    let size = match (expect.size, source.size) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let sum = match (&expect.checksum, source.checksum.as_deref()) {
        (Some(a), Some(b)) => Checksum::from_stored_form(b).is_ok_and(|b| &b == a),
        _ => true,
    };
    size && sum
}

fn agrees_opened(expect: &Expect, opened: &Opened) -> bool {
    let size = match (expect.size, opened.size) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let sum = match (&expect.checksum, &opened.checksum) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    size && sum
}

/// Shuffles `v` (so that a fleet's nodes spread over its sources).
fn shuffle<T>(v: &mut [T]) {
    use std::hash::{BuildHasher, Hasher as _};
    let state = std::collections::hash_map::RandomState::new();
    for i in (1..v.len()).rev() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        let j = (h.finish() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// A fill's bytes from the fleet: one source, replaced by the next when it
/// fails mid-transfer, resuming at the byte reached.
struct FleetReader {
    shared: Arc<Shared>,
    id: ImageId,
    request: OriginRequest,
    /// This fill's name in the fleet's records.
    fill: u64,
    pos: u64,
    expect: Expect,
    /// The recorded checksum, over bytes from a single peer: to know that
    /// peer for a bad one. (The fill checks the checksum itself.)
    hasher: Option<Hasher>,
    /// A holder's recorded CRC-32 and the CRC-32 so far, where the fleet
    /// recorded no checksum: the only check such bytes get.
    crc: Option<(u32, crc32fast::Hasher)>,
    peers_used: Vec<String>,
    origin_bytes: u64,
    /// Peers that failed this fill: never asked again for it.
    failed: Vec<String>,
    /// `None` only while being dropped.
    current: Option<Opened>,
    announced: bool,
}

impl FleetReader {
    /// Sets up the checks of a fill that starts at byte 0.
    fn arm_checks(&mut self) {
        let Some(current) = &self.current else {
            return;
        };
        if current.peer.is_none() {
            return;
        }
        if let Some(c) = &self.expect.checksum {
            self.hasher = Some(c.hasher());
        } else if let Some(crc) = current.crc32 {
            self.crc = Some((crc, crc32fast::Hasher::new()));
        }
    }

    fn current(&mut self) -> &mut Opened {
        self.current.as_mut().expect("a source until dropped")
    }

    /// Replaces the failed source (a peer) by the next one, from `pos`.
    fn fail_over(&mut self, why: &str) -> io::Result<()> {
        let failed = self.current().peer.clone().unwrap_or_default();
        tracing::warn!(image = %self.id, peer = %failed, at = self.pos, %why, "peer failed mid-transfer; resuming elsewhere");
        self.shared.metrics.peer_event("failover");
        self.failed.push(failed);
        // Bytes from more than one source: no single peer to blame, and a
        // holder's CRC-32 covers its own bytes only.
        self.hasher = None;
        self.crc = None;
        let next = self
            .shared
            .find(
                &self.id,
                &self.request,
                self.pos,
                Some((&self.expect, &self.failed)),
                self.fill,
            )
            .map_err(|e| io::Error::other(format!("resuming at byte {}: {e}", self.pos)))?;
        if !agrees_opened(&self.expect, &next) {
            return Err(io::Error::other(format!(
                "resuming at byte {}: the new source disagrees on the image",
                self.pos
            )));
        }
        let leads = next.peer.is_none();
        self.current = Some(next);
        // Whether this node now fills from the origin: nodes resuming
        // after it may follow it only then.
        self.announced |= self
            .shared
            .announce(&self.id, self.fill, &self.expect, leads);
        Ok(())
    }

    /// At the end: the size, and what came from a single peer against the
    /// checksum (or CRC-32) the fleet recorded. A mismatch fails the fill,
    /// and that peer is never asked for this image again.
    fn check_end(&mut self) -> io::Result<()> {
        if let Some(size) = self.expect.size {
            if self.pos != size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the source ended at byte {} of {size}", self.pos),
                ));
            }
        }
        let single = self.origin_bytes == 0 && self.peers_used.len() == 1;
        let verdict = if let (Some(expected), Some(h)) = (&self.expect.checksum, self.hasher.take())
        {
            let actual = h.finish();
            (&actual != expected).then(|| format!("checksum {actual}, {expected} recorded"))
        } else if let Some((expected, h)) = self.crc.take() {
            let actual = h.finalize();
            (actual != expected)
                .then(|| format!("CRC-32 {actual:08x}, {expected:08x} recorded by the holder"))
        } else {
            None
        };
        let Some(detail) = verdict else {
            return Ok(());
        };
        if single {
            let peer = self.peers_used[0].clone();
            tracing::error!(image = %self.id, %peer, %detail, "a peer's bytes do not match what the fleet recorded: never asked for this image again");
            self.shared.metrics.peer_event("bad");
            self.shared
                .bad
                .lock()
                .insert((peer.clone(), self.id.clone()));
            if let Some(fleet) = self.shared.fleet() {
                if let Err(e) = fleet.forget_source(&peer, &self.id) {
                    tracing::warn!(image = %self.id, %peer, error = %e, "cannot forget the peer's fill");
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("image {}: {detail}", self.id),
        ))
    }
}

impl Read for FleetReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let from_peer = self.current().peer.clone();
            match self.current().reader.read(buf) {
                Ok(0) => {
                    let short = self.expect.size.is_some_and(|s| self.pos < s);
                    if short && from_peer.is_some() {
                        self.fail_over("the peer ended early")?;
                        continue;
                    }
                    self.check_end()?;
                    return Ok(0);
                }
                Ok(n) => {
                    match &from_peer {
                        Some(peer) if !self.peers_used.contains(peer) => {
                            self.peers_used.push(peer.clone())
                        }
                        Some(_) => {}
                        None => self.origin_bytes += n as u64,
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&buf[..n]);
                    }
                    if let Some((_, h)) = self.crc.as_mut() {
                        h.update(&buf[..n]);
                    }
                    self.pos += n as u64;
                    self.shared.metrics.fill_bytes(
                        if from_peer.is_some() {
                            "peer"
                        } else {
                            "origin"
                        },
                        n as u64,
                    );
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A peer's failure is not the fill's: the next source
                // takes over at this byte.
                Err(e) if from_peer.is_some() => self.fail_over(&e.to_string())?,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for FleetReader {
    fn drop(&mut self) {
        // Round trips to the database (the withdraw, the claim's release):
        // never on an async runtime's thread, where this reader may end
        // (a pass-through body dropped by its connection).
        let claim = self.current.take().and_then(|c| c.claim);
        let withdraw = self.announced.then(|| (self.id.clone(), self.fill));
        if claim.is_none() && withdraw.is_none() {
            return;
        }
        let shared = self.shared.clone();
        let cleanup = move || {
            if let (Some((id, fill)), Some(fleet)) = (withdraw, shared.fleet()) {
                if let Err(e) = fleet.withdraw_fill(&id, fill) {
                    tracing::warn!(image = %id, error = %e, "cannot withdraw the fill from the fleet");
                }
            }
            drop(claim);
        };
        if Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("imgcache-peer-withdraw".into())
                .spawn(cleanup);
        } else {
            cleanup();
        }
    }
}
