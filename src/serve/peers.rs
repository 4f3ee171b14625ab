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
//! Whichever it picked, it announces its own fill ([`Fleet::announce_fill`])
//! so that the next node can follow *it*: the image spreads as a tree, and
//! each node serves at most [`PeerOptions::fanout`] peers at once (the
//! others are told `503` and try another source). The bytes are checked
//! against the size and checksum the fleet recorded (what the origin gave
//! the first node), never against what a peer says. A peer that fails
//! mid-transfer is replaced by another source, resuming at the byte already
//! received (`Range`); a peer whose bytes fail the checksum is forgotten
//! as a source of that image ([`Fleet::forget_source`]) and never asked
//! for it again by this node.
//!
//! **The serving side** (the planner). A request carrying
//! [`PEER_TOKEN_HEADER`] is a peer's: with the fleet token it is served
//! from what this node has — its cached file, read whole and checked
//! against its CRC-32 first (a corrupt copy is quarantined, never sent), or
//! its fill in progress — and never starts a fill (no loops between
//! nodes); with a wrong token, or where peers are off, it is refused
//! (`403`). Peers do not ask the origin whether a client may read an
//! image: the node a client asked did, before it filled.
//!
//! Linux or not, the transfers are plain HTTP/1.1 between data ports; put
//! the fleet on a private network, as its database is.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;

use super::metrics::Metrics;
use crate::checksum::{Checksum, Hasher};
use crate::drivers::{FillClaim, Fleet, PeerSource};
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

/// How long a peer may go without sending a byte before it is taken for
/// stalled and replaced.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How many times a node looks again for a source while the fleet's claim
/// is held by a node whose fill it cannot see or follow yet, and the
/// longest pause between looks; then it goes to the origin itself.
const ROUNDS: u32 = 40;
const MAX_PAUSE: Duration = Duration::from_millis(250);

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
        if cache.driver().extensions().fleet().is_none() {
            tracing::warn!(
                "peer fill needs a store shared by the fleet (centralized_db); the {} store is not: \
                 peers are off",
                cache.driver().name()
            );
            return None;
        }
        let handle = Handle::try_current().ok()?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .ok()?;
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
            }),
        })
    }
}

impl Origin for PeerOrigin {
    fn open(&self, id: &ImageId) -> Result<OriginObject> {
        self.open_for(id, &OriginRequest::default())
    }

    fn open_for(&self, id: &ImageId, request: &OriginRequest) -> Result<OriginObject> {
        let opened = self.shared.find(id, request, 0, None)?;
        let size = opened.size;
        let checksum = opened.checksum.clone();
        let leads = opened.peer.is_none();
        let announce = self.shared.fleet().map(|fleet| {
            let stored = checksum.as_ref().map(Checksum::stored_form);
            if let Err(e) = fleet.announce_fill(id, size, stored.as_deref(), leads) {
                tracing::warn!(image = %id, error = %e, "cannot announce the fill to the fleet");
            }
        });
        let hasher = checksum.as_ref().map(Checksum::hasher);
        let expect = Expect {
            size,
            checksum: checksum.clone(),
        };
        Ok(OriginObject {
            reader: Box::new(FleetReader {
                shared: self.shared.clone(),
                id: id.clone(),
                request: request.clone(),
                pos: 0,
                expect,
                hasher,
                peers_used: Vec::new(),
                failed: Vec::new(),
                current: opened,
                announced: announce.is_some(),
            }),
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
    /// Held while this node fills from the origin for the fleet.
    _claim: Option<FillClaim>,
}

impl Shared {
    fn fleet(&self) -> Option<&dyn Fleet> {
        self.cache.driver().extensions().fleet()
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
    ) -> Result<Opened> {
        let Some(fleet) = self.fleet() else {
            return self.open_origin(id, request, pos, None);
        };
        let me = fleet.node().to_owned();
        // Nodes that did not answer at all: out of this search.
        let mut gone: HashSet<String> = resume
            .map(|(_, failed)| failed.iter().cloned().collect())
            .unwrap_or_default();
        for round in 0..ROUNDS {
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
            gone.extend(unreachable.drain(..));
            // Holders at their fan-out will have room soon: no need for
            // the origin.
            if !busy {
                match fleet.claim_fill(id) {
                    Ok(Some(claim)) => return self.open_origin(id, request, pos, Some(claim)),
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
            // or followed yet (it is opening the origin, or every source
            // is serving its share of peers): look again shortly.
            std::thread::sleep((Duration::from_millis(10) * (round + 1)).min(MAX_PAUSE));
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
            _claim: claim,
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
                if e.is_connect() || e.is_timeout() {
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
            503 => {
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
                .and_then(|all| all.into_iter().find(|s| s.node == source.node))
                .unwrap_or_else(|| source.clone())
        } else {
            source.clone()
        };
        let checksum = match recorded.checksum.as_deref().map(Checksum::from_stored_form) {
            Some(Ok(c)) => Some(c),
            Some(Err(_)) | None => None,
        };
        let length = response.content_length();
        if let (Some(size), Some(len)) = (recorded.size, length) {
            if len != size.saturating_sub(pos) {
                return Err(PeerError::Failed(format!(
                    "{url}: {len} bytes from {pos} of an image the fleet recorded at {size}"
                )));
            }
        }
        let size = recorded
            .size
            .or_else(|| (pos == 0).then_some(length).flatten());
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
            size,
            checksum,
            peer: Some(source.node.clone()),
            _claim: None,
        })
    }
}

/// Why a peer did not serve.
#[derive(Debug)]
enum PeerError {
    /// It serves as many peers as it may: try another, or again soon.
    Busy,
    /// No connection (refused, or not within the connect timeout): the
    /// node is taken for gone.
    Unreachable(String),
    /// It answered something else (not there yet, refused, bad range).
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
    pos: u64,
    expect: Expect,
    /// Checks what came from peers against the recorded checksum, so that
    /// a peer that sent wrong bytes is known and forgotten.
    hasher: Option<Hasher>,
    peers_used: Vec<String>,
    /// Peers that failed this fill: never asked again for it.
    failed: Vec<String>,
    current: Opened,
    announced: bool,
}

impl FleetReader {
    /// Replaces the failed source (a peer) by the next one, from `pos`.
    fn fail_over(&mut self, why: &str) -> io::Result<()> {
        let failed = self.current.peer.clone().unwrap_or_default();
        tracing::warn!(image = %self.id, peer = %failed, at = self.pos, %why, "peer failed mid-transfer; resuming elsewhere");
        self.shared.metrics.peer_event("failover");
        self.failed.push(failed);
        let next = self
            .shared
            .find(
                &self.id,
                &self.request,
                self.pos,
                Some((&self.expect, &self.failed)),
            )
            .map_err(|e| io::Error::other(format!("resuming at byte {}: {e}", self.pos)))?;
        if !agrees_opened(&self.expect, &next) {
            return Err(io::Error::other(format!(
                "resuming at byte {}: the new source disagrees on the image",
                self.pos
            )));
        }
        self.current = next;
        // Whether this node now fills from the origin: nodes resuming
        // after it may follow it only then.
        if let Some(fleet) = self.shared.fleet() {
            let stored = self.expect.checksum.as_ref().map(Checksum::stored_form);
            let leads = self.current.peer.is_none();
            if let Err(e) =
                fleet.announce_fill(&self.id, self.expect.size, stored.as_deref(), leads)
            {
                tracing::warn!(image = %self.id, error = %e, "cannot announce the fill to the fleet");
            }
            self.announced = true;
        }
        Ok(())
    }

    /// At the end: the peers' bytes against the checksum the fleet
    /// recorded. A mismatch forgets every peer this fill used as a source
    /// of the image, and fails the fill.
    fn check_end(&mut self) -> io::Result<()> {
        if let (Some(expected), Some(hasher)) = (&self.expect.checksum, self.hasher.take()) {
            if self.peers_used.is_empty() {
                return Ok(());
            }
            let actual = hasher.finish();
            if &actual != expected {
                for peer in &self.peers_used {
                    tracing::error!(image = %self.id, %peer, %expected, %actual, "a peer's bytes fail the checksum: forgotten as a source of this image");
                    self.shared.metrics.peer_event("bad");
                    self.shared
                        .bad
                        .lock()
                        .insert((peer.clone(), self.id.clone()));
                    if let Some(fleet) = self.shared.fleet() {
                        if let Err(e) = fleet.forget_source(peer, &self.id) {
                            tracing::warn!(image = %self.id, %peer, error = %e, "cannot forget the peer's row");
                        }
                    }
                }
                return Err(Error::ChecksumMismatch {
                    id: self.id.clone(),
                    expected: expected.clone(),
                    actual,
                }
                .into_io());
            }
        }
        Ok(())
    }
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

impl Read for FleetReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let from_peer = self.current.peer.clone();
            match self.current.reader.read(buf) {
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
                    if let Some(peer) = &from_peer {
                        if !self.peers_used.contains(peer) {
                            self.peers_used.push(peer.clone());
                        }
                    }
                    if let Some(h) = self.hasher.as_mut() {
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
        if self.announced {
            if let Some(fleet) = self.shared.fleet() {
                if let Err(e) = fleet.withdraw_fill(&self.id) {
                    tracing::warn!(image = %self.id, error = %e, "cannot withdraw the fill from the fleet");
                }
            }
        }
    }
}
