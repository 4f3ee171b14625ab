//! [`CacheDriver`]: where a cache's metadata lives — and nothing else.
//!
//! A driver (a *metadata store*; the same trait as a *metadata store*) keeps
//! rows: one per cached image (size, hits, last access, checksum, CRC), the
//! reasons recorded for failed writes, and the queue's counter. It never
//! sees a path policy, makes or moves a file, takes one of the file layer's
//! locks or decides anything (the xattr store serializes its own
//! read-modify-write of a file's hit count with an `flock` of that file,
//! which no other lock of the cache uses):
//! [`crate::ImageCache`] owns the one local file layer (`files/`:
//! writer, reader, locks, queue folder, recovery walk) and the policies
//! (prune, clean, quarantine), and asks the driver what it needs to know.
//!
//! # The xattr store, and why files appear in some signatures
//!
//! Glance's `xattr` driver keeps its metadata *on* the cached files. A seam
//! with no files at all would leave it two bad shapes: re-opening files by
//! path behind the file layer's back (a second copy of the path policy), or
//! the file layer learning xattr names (a second copy of the store). So the
//! methods that concern one entry take an [`OnDisk`] — the file as the file
//! layer found or opened it — and the walks take a [`CachedFiles`], the file
//! layer's listing. A store that keeps rows elsewhere ([`SqliteDriver`],
//! a shared database) ignores both; it never receives a path it could act
//! on beyond the one it was given.
//!
//! # Order of calls, and crash safety
//!
//! A commit is: `prepare` (the file complete but not synced: a store on the
//! file writes its metadata now, so that it is synced and published with
//! the bytes) → `fsync` → no-replace rename → directory `fsync` → `insert`
//! (a store elsewhere records the row now: a row never names a file that
//! is not in place). Removal is files first, rows second; a crash between
//! leaves rows without files, which the recovery walk drops. Invalidation
//! moves the file first and records the reason second (a crash between
//! loses only the reason).
//!
//! # Nodes
//!
//! A store answers for one node's cache: a local store has exactly one
//! ([`LOCAL_NODE`]); a store on a shared database offers the [`Fleet`]
//! capability, keys every row by its node ([`Fleet::node`]), and tells
//! which other nodes hold an image ([`Fleet::nodes_holding`]).
//!
//! # The core and the capabilities
//!
//! [`CacheDriver`] is what every store writes: fourteen methods, four of
//! them with defaults. What only some stores offer are traits of their
//! own, which a store names in [`CacheDriver::extensions`]: [`Fleet`] (a
//! database shared by many nodes), [`Watermarks`] (group durability: a
//! store without it is used with `Durability::Immediate`), and
//! [`InvalidReasons`] (why a file went to `invalid/`). Hit batching, which
//! every built-in store does, is written once (`hits.rs`).

use std::fmt;
use std::time::SystemTime;

use crate::entry::{CachedImageInfo, NodeImage};
use crate::error::Result;
use crate::id::ImageId;

#[cfg(feature = "postgres")]
pub mod centralized_db;
pub(crate) mod hits;
pub(crate) mod sqlite;
pub(crate) mod xattr;

#[cfg(feature = "postgres")]
pub use self::centralized_db::CentralizedDbDriver;
pub use self::sqlite::{SqliteDriver, SqliteJournal};
pub use self::xattr::XattrDriver;
// What a store implementer reads and writes, beside the rows
// (`CachedImageInfo`, `LruEntry`, `NodeImage`, at the crate root).
pub use crate::entry::{CachedFiles, Invalidation, OnDisk, Scanned, Watermark};

/// The node name of a store that serves one local cache only.
pub const LOCAL_NODE: &str = "local";

/// Where a cache keeps its metadata: the small core every store writes.
/// See the [module docs](self) for the order of calls and what each store
/// may rely on; what only some stores offer (a fleet of nodes, a
/// durability watermark, the reasons of invalid files) are capabilities
/// beside it, which a store names in [`CacheDriver::extensions`].
///
/// Implemented by [`SqliteDriver`], [`XattrDriver`] and (feature
/// `postgres`) `CentralizedDbDriver`; object safe
/// ([`crate::ImageCache`] holds an `Arc<dyn CacheDriver>`). Ids reaching a
/// driver have been admitted by the cache (never one of its own file
/// names).
pub trait CacheDriver: Send + Sync + fmt::Debug {
    /// The driver's name, as Glance's `image_cache_driver` spells it.
    fn name(&self) -> &'static str;

    /// The entry of `id`, whose cached file is `file`, without counting a
    /// hit; `None` if the store has none (a file renamed in place whose
    /// row is not written yet, or one nobody recorded).
    fn get(&self, id: &ImageId, file: OnDisk<'_>) -> Result<Option<CachedImageInfo>>;

    /// Counts one hit of `id` at `at` and returns its entry as of that hit;
    /// `None` if the store has no entry. Stores batch these writes: a read
    /// costs at most one metadata update, never one per chunk. The cache
    /// calls it for a file it has just opened; hits on a descriptor it
    /// kept open since are counted by the cache and come in batches
    /// through [`CacheDriver::add_hits`]. Where [`OnDisk::known`] is set
    /// (the entry an earlier hit returned, for a file the file layer
    /// vouches for) a store counts the hit without a lookup of its own,
    /// and must not wait on anything but its own in-memory state (an
    /// async caller may be asking from a runtime's thread).
    fn hit(
        &self,
        id: &ImageId,
        at: SystemTime,
        file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>>;

    /// Counts `n` hits of `id`, the latest at `at`, without returning the
    /// entry: hits the cache counted on a descriptor it kept open, handed
    /// over in batches (every half second, by a thread of the cache's,
    /// and before it reads counts or access times back). `file` is as for
    /// [`CacheDriver::hit`] on a kept file: [`OnDisk::known`] is the entry
    /// kept, and its metadata are as of the keep. The same rules as `hit`:
    /// no wait but on the store's own in-memory state. By default, `hit`
    /// `n` times.
    fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, file: OnDisk<'_>) -> Result<()> {
        for _ in 0..n {
            self.hit(id, at, file)?;
        }
        Ok(())
    }

    /// Before a commit's file is synced and published (`file` is the
    /// complete incomplete file). For stores that keep metadata on the file.
    fn prepare(&self, _entry: &CachedImageInfo, _file: OnDisk<'_>) -> Result<()> {
        Ok(())
    }

    /// Records a published entry (its file is in place and synced),
    /// replacing any earlier entry of the same id.
    fn insert(&self, entry: &CachedImageInfo) -> Result<()>;

    /// Records a published entry as [`CacheDriver::insert`] does, for a
    /// commit that group durability makes durable later (its file is in
    /// place, `file`, and not synced): the store may hold the entry in
    /// memory and write it with others, by its next
    /// [`CacheDriver::flush`] at the latest — every checkpoint flushes
    /// before it syncs. This process sees a held entry at once (`get`,
    /// `hit`, `set_crc32` and `remove` see it; listings flush first); other
    /// processes find the file without an entry meanwhile, which the cache
    /// serves as it is (every file in place was renamed there whole). A
    /// held entry whose file is no longer the one passed when it is
    /// written (removed, replaced) is dropped. By default, recorded at
    /// once.
    fn insert_batched(&self, entry: &CachedImageInfo, file: OnDisk<'_>) -> Result<()> {
        let _ = file;
        self.insert(entry)
    }

    /// Forgets the entries of those `ids` for which `still_gone(id)` holds
    /// once the store has excluded concurrent `insert`s (of this process
    /// and others): a commit renames its file before it inserts, so a fresh
    /// entry is never taken for a stale one. Returns how many it forgot.
    /// The cache passes `&|_| true` where it removed the files itself.
    fn remove(&self, ids: &[ImageId], still_gone: &dyn Fn(&ImageId) -> bool) -> Result<usize>;

    /// Records the CRC-32 of an entry that had none (adopted, or written by
    /// Glance), once a scrub has read its `file` whole.
    fn set_crc32(&self, id: &ImageId, crc32: u32, file: OnDisk<'_>) -> Result<()>;

    /// Every entry, ordered by id. Entries whose metadata cannot be decoded
    /// are logged and passed over. (The pruner's least-recently-used order
    /// is this list sorted by last access.)
    fn list(&self, files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>>;

    /// Total bytes of the entries (admission asks it before each fill: a
    /// store that can sum without listing should).
    fn total_size(&self, files: &dyn CachedFiles) -> Result<u64> {
        Ok(self.list(files)?.iter().map(|e| e.size).sum())
    }

    /// Every entry the store holds, for the recovery walk, undecodable
    /// ones included. Rows whose id is not even a valid image id (no file
    /// can have that name) are dropped by the store as it scans.
    fn scan(&self, files: &dyn CachedFiles) -> Result<Vec<Scanned>>;

    /// Adopts cached files that have no entry (a crash between rename and
    /// `insert`, or files another tool put there): records each `entry`
    /// (its real size, no CRC) unless a committer recorded one meanwhile,
    /// in one batch. Files that vanished meanwhile are passed over. Returns
    /// the ids it adopted.
    fn adopt(&self, orphans: &[(CachedImageInfo, OnDisk<'_>)]) -> Result<Vec<ImageId>>;

    /// The next number of the queue's order, from a counter every process
    /// on the cache shares; `queue` is the queue folder.
    fn next_queue_seq(&self, queue: OnDisk<'_>) -> Result<u64>;

    /// Writes metadata held in memory (batched hits, batched entries) now.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// What this store offers beside the core: none by default.
    fn extensions(&self) -> Extensions<'_> {
        Extensions::default()
    }
}

/// What a store offers beside [`CacheDriver`]'s core, as it says in
/// [`CacheDriver::extensions`]: built with the `with_` methods, read with
/// the others.
#[derive(Clone, Copy, Default)]
pub struct Extensions<'a> {
    fleet: Option<&'a dyn Fleet>,
    watermarks: Option<&'a dyn Watermarks>,
    invalid_reasons: Option<&'a dyn InvalidReasons>,
    files: &'a [std::path::PathBuf],
    max_id_len: Option<usize>,
    hits_written_inline: bool,
}

impl fmt::Debug for Extensions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("fleet", &self.fleet.is_some())
            .field("watermarks", &self.watermarks.is_some())
            .field("invalid_reasons", &self.invalid_reasons.is_some())
            .field("files", &self.files)
            .field("max_id_len", &self.max_id_len)
            .field("hits_written_inline", &self.hits_written_inline)
            .finish()
    }
}

impl<'a> Extensions<'a> {
    /// The store is shared by many nodes.
    pub fn with_fleet(mut self, fleet: &'a dyn Fleet) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// The store records a durability watermark.
    pub fn with_watermarks(mut self, watermarks: &'a dyn Watermarks) -> Self {
        self.watermarks = Some(watermarks);
        self
    }

    /// The store records why files were invalidated.
    pub fn with_invalid_reasons(mut self, reasons: &'a dyn InvalidReasons) -> Self {
        self.invalid_reasons = Some(reasons);
        self
    }

    /// The files the store keeps, so that a cache whose directory holds
    /// them never takes them for images (a SQLite database).
    pub fn with_files(mut self, files: &'a [std::path::PathBuf]) -> Self {
        self.files = files;
        self
    }

    /// The longest id, in bytes, the store can record (Glance's
    /// `centralized_db` table holds 36): a longer one is served from the
    /// origin, never cached.
    pub fn with_max_id_len(mut self, max: usize) -> Self {
        self.max_id_len = Some(max);
        self
    }

    /// The store writes batches of hits from the reading thread
    /// ([`CacheDriver::hit`] may touch the disk every so many hits, as the
    /// xattr store does on the files), rather than from a thread of its
    /// own: an async caller asks it on the blocking pool.
    pub fn with_hits_written_inline(mut self) -> Self {
        self.hits_written_inline = true;
        self
    }

    /// The fleet's views, for a store shared by many nodes.
    pub fn fleet(&self) -> Option<&'a dyn Fleet> {
        self.fleet
    }

    /// The watermark, for a store that records one. A cache over a store
    /// that does not commits with [`crate::Durability::Immediate`]
    /// whatever it was asked, since nothing could tell it, after an
    /// unclean shutdown, which entries to check.
    pub fn watermarks(&self) -> Option<&'a dyn Watermarks> {
        self.watermarks
    }

    /// The reasons of invalid files, for a store that records them.
    pub fn invalid_reasons(&self) -> Option<&'a dyn InvalidReasons> {
        self.invalid_reasons
    }

    /// The files the store keeps.
    pub fn files(&self) -> &'a [std::path::PathBuf] {
        self.files
    }

    /// The longest id the store can record (any valid id by default).
    pub fn max_id_len(&self) -> usize {
        self.max_id_len.unwrap_or(crate::id::MAX_ID_LEN)
    }

    /// Whether [`CacheDriver::hit`] may write from the reading thread
    /// ([`Extensions::with_hits_written_inline`]; `false` by default).
    pub fn hits_written_inline(&self) -> bool {
        self.hits_written_inline
    }
}

/// A store shared by many nodes (Glance's `centralized_db`): each node's
/// rows keyed by its name, and views across them.
pub trait Fleet: Send + Sync {
    /// The node whose rows this store reads and writes (Glance's
    /// `worker_self_reference_url`).
    fn node(&self) -> &str;

    /// The nodes whose caches hold `id`.
    fn nodes_holding(&self, id: &ImageId) -> Result<Vec<String>>;

    /// Every cached image of every node, ordered by node and id.
    fn all_nodes(&self) -> Result<Vec<NodeImage>>;

    /// Takes over `entries` from a node's local SQLite database (Glance's
    /// migration to `centralized_db`): records those this node lacks, and
    /// returns every id of `entries` the store now holds for this node, for
    /// the caller to delete from the old database. Must be idempotent and
    /// safe when several processes import at once.
    fn import(&self, entries: &[CachedImageInfo]) -> Result<Vec<ImageId>>;

    /// Takes part in peer fill: registers this node as one whose data
    /// port serves peers (only such nodes are [`Fleet::sources`]), and
    /// forgets the fills an earlier run of this node announced and never
    /// withdrew (it was killed). For a node starting to serve, once. The
    /// default does nothing.
    fn join_peers(&self) -> Result<()> {
        Ok(())
    }

    /// Where else `id` can be had in the fleet: the nodes taking part in
    /// peer fill ([`Fleet::join_peers`]) that hold it (with the size,
    /// checksum and CRC-32 they recorded) and those filling it now (with
    /// what their source announced, once it did), this node included. The
    /// default: the holders of [`Fleet::nodes_holding`], with nothing
    /// recorded.
    fn sources(&self, id: &ImageId) -> Result<Vec<PeerSource>> {
        Ok(self
            .nodes_holding(id)?
            .into_iter()
            .map(|node| PeerSource::holder(node, None, None))
            .collect())
    }

    /// Takes the fleet's claim to fill `id` from the origin: `None` while
    /// another node holds it. The claim is held until the returned value is
    /// dropped, and dies with its holder (a node killed mid-fill loses it
    /// at once, so another can take over). Dropping it may block (a round
    /// trip): drop it off async runtimes' threads. The default: always
    /// granted (a store that cannot coordinate lets every node go to the
    /// origin).
    fn claim_fill(&self, id: &ImageId) -> Result<Option<FillClaim>> {
        let _ = id;
        Ok(Some(FillClaim::new(())))
    }

    /// Records that this node is filling `id` — from the origin (`leads`)
    /// or from a peer — with the size and checksum its source announced
    /// (once it did), so that other nodes can follow it. `fill` names this
    /// fill: a later announce of the same fill updates the record, and
    /// only its own [`Fleet::withdraw_fill`] removes it. The default
    /// records nothing.
    fn announce_fill(&self, id: &ImageId, fill: u64, at: &Announced<'_>) -> Result<()> {
        let _ = (id, fill, at);
        Ok(())
    }

    /// Records that this node's fill `fill` of `id` ended (committed or
    /// not); a newer fill's record stays.
    fn withdraw_fill(&self, id: &ImageId, fill: u64) -> Result<()> {
        let _ = (id, fill);
        Ok(())
    }

    /// Forgets `node` as a filler of `id`: it sent bytes that do not match
    /// what the fleet recorded. (A holder's own rows are its own to
    /// correct, by its checks and scrubs: another node never deletes them.)
    /// The default does nothing.
    fn forget_source(&self, node: &str, id: &ImageId) -> Result<()> {
        let _ = (node, id);
        Ok(())
    }
}

/// What a node announces of its fill; see [`Fleet::announce_fill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Announced<'a> {
    /// The image's size, once its source announced it.
    pub size: Option<u64>,
    /// Its checksum in the stored form, once its source announced it.
    pub checksum: Option<&'a str>,
    /// Whether this node fills from the origin (rather than a peer).
    pub leads: bool,
}

impl<'a> Announced<'a> {
    /// A fill from the origin (`leads`) or a peer, with what its source
    /// announced so far.
    pub fn new(size: Option<u64>, checksum: Option<&'a str>, leads: bool) -> Self {
        Announced {
            size,
            checksum,
            leads,
        }
    }
}

/// A node of the fleet that holds an image or is filling it; see
/// [`Fleet::sources`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerSource {
    /// The node's URL (Glance's `worker_self_reference_url`).
    pub node: String,
    /// The image's size, as the node recorded it (or its source announced
    /// it); `None` if not known yet.
    pub size: Option<u64>,
    /// The image's checksum, in the form the store keeps (`md5` hex, or
    /// `algorithm:hex`), as the origin gave it to the first node.
    pub checksum: Option<String>,
    /// Whether the node is filling it now (rather than holding it).
    pub filling: bool,
    /// Whether the node fills it from the origin (rather than a peer).
    pub leads: bool,
    /// The CRC-32 the holder committed its copy with, if it recorded one.
    pub crc32: Option<u32>,
}

impl PeerSource {
    /// A node that holds the image, for a store's [`Fleet::sources`].
    pub fn holder(node: String, size: Option<u64>, checksum: Option<String>) -> Self {
        PeerSource {
            node,
            size,
            checksum,
            filling: false,
            leads: false,
            crc32: None,
        }
    }

    /// With the CRC-32 the holder committed its copy with.
    pub fn with_crc32(mut self, crc32: Option<u32>) -> Self {
        self.crc32 = crc32;
        self
    }

    /// A node filling the image (from the origin if `leads`), for a
    /// store's [`Fleet::sources`].
    pub fn filler(node: String, size: Option<u64>, checksum: Option<String>, leads: bool) -> Self {
        PeerSource {
            node,
            size,
            checksum,
            filling: true,
            leads,
            crc32: None,
        }
    }
}

/// The fleet's claim to fill one image from the origin, from
/// [`Fleet::claim_fill`]: released when dropped (which may block: drop it
/// off async runtimes' threads).
pub struct FillClaim(#[allow(dead_code)] Box<dyn Send + Sync>);

impl FillClaim {
    /// A claim whose release is `guard`'s drop.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        FillClaim(Box::new(guard))
    }
}

impl fmt::Debug for FillClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FillClaim")
    }
}

/// A store that records the durability [`Watermark`] (group durability).
pub trait Watermarks: Send + Sync {
    /// The last [`Watermark`] recorded for this node's cache; `None` if
    /// none ever was. `base` is the cache's base directory.
    fn durable_watermark(&self, base: OnDisk<'_>) -> Result<Option<Watermark>>;

    /// Records `mark`, durably (it is on disk when this returns): each of
    /// its two times replaces the recorded one if later (each is a claim of
    /// its own, so the later of each holds). `base` is the cache's base
    /// directory.
    fn record_watermark(&self, mark: Watermark, base: OnDisk<'_>) -> Result<()>;
}

/// A store that records why files were invalidated (Glance's `user.error`
/// on the xattr driver's files).
pub trait InvalidReasons: Send + Sync {
    /// Records why an entry was invalidated, once its `file` (a writer's
    /// incomplete file, or a cached file found corrupt) is in `invalid/`.
    /// A crash before this loses only the reason.
    fn invalidate(&self, why: &Invalidation, file: OnDisk<'_>) -> Result<()>;

    /// Why the file `file` in `invalid/` was invalidated, and when, if
    /// recorded.
    fn invalid_reason(
        &self,
        id: &ImageId,
        file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)>;

    /// Forgets the reasons of invalid files that `clean` removed.
    fn forget_invalid(&self, ids: &[ImageId]) -> Result<()>;
}

/// How the cache asks any store for what only some offer: the capabilities
/// of [`CacheDriver::extensions`], with what stands in where a store has
/// none (one local node, no watermark, no reasons recorded).
pub(crate) trait StoreExt {
    fn node(&self) -> &str;
    fn nodes_holding(&self, id: &ImageId) -> Result<Option<Vec<String>>>;
    fn all_nodes(&self) -> Result<Option<Vec<NodeImage>>>;
    fn import(&self, entries: &[CachedImageInfo]) -> Result<Vec<ImageId>>;
    fn remove_if_missing(&self, ids: &[ImageId], missing: &dyn Fn(&ImageId) -> bool) -> Result<()>;
    fn lru(&self, files: &dyn CachedFiles) -> Result<Vec<crate::entry::LruEntry>>;
    fn invalidate(&self, why: &Invalidation, file: OnDisk<'_>) -> Result<()>;
    fn invalid_reason(
        &self,
        id: &ImageId,
        file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)>;
    fn forget_invalid(&self, ids: &[ImageId]) -> Result<()>;
    fn records_watermark(&self) -> bool;
    fn durable_watermark(&self, base: OnDisk<'_>) -> Result<Option<Watermark>>;
    fn record_watermark(&self, mark: Watermark, base: OnDisk<'_>) -> Result<()>;
    fn max_id_len(&self) -> usize;
    fn files(&self) -> Vec<std::path::PathBuf>;
}

impl<T: CacheDriver + ?Sized> StoreExt for T {
    fn node(&self) -> &str {
        self.extensions().fleet().map_or(LOCAL_NODE, |f| f.node())
    }

    fn nodes_holding(&self, id: &ImageId) -> Result<Option<Vec<String>>> {
        self.extensions()
            .fleet()
            .map(|f| f.nodes_holding(id))
            .transpose()
    }

    fn all_nodes(&self) -> Result<Option<Vec<NodeImage>>> {
        self.extensions().fleet().map(|f| f.all_nodes()).transpose()
    }

    fn import(&self, entries: &[CachedImageInfo]) -> Result<Vec<ImageId>> {
        match self.extensions().fleet() {
            Some(f) => f.import(entries),
            None => Err(crate::Error::Config(format!(
                "the {} driver keeps its metadata locally: there is nothing to migrate to",
                self.name()
            ))),
        }
    }

    fn remove_if_missing(&self, ids: &[ImageId], missing: &dyn Fn(&ImageId) -> bool) -> Result<()> {
        if !ids.is_empty() {
            self.remove(ids, missing)?;
        }
        Ok(())
    }

    fn lru(&self, files: &dyn CachedFiles) -> Result<Vec<crate::entry::LruEntry>> {
        let mut all = self.list(files)?;
        all.sort_by(|a, b| {
            a.last_accessed
                .cmp(&b.last_accessed)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(all.into_iter().map(crate::entry::LruEntry::from).collect())
    }

    fn invalidate(&self, why: &Invalidation, file: OnDisk<'_>) -> Result<()> {
        match self.extensions().invalid_reasons() {
            Some(r) => r.invalidate(why, file),
            None => Ok(()),
        }
    }

    fn invalid_reason(
        &self,
        id: &ImageId,
        file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)> {
        match self.extensions().invalid_reasons() {
            Some(r) => r.invalid_reason(id, file),
            None => Ok((None, None)),
        }
    }

    fn forget_invalid(&self, ids: &[ImageId]) -> Result<()> {
        match self.extensions().invalid_reasons() {
            Some(r) if !ids.is_empty() => r.forget_invalid(ids),
            _ => Ok(()),
        }
    }

    fn records_watermark(&self) -> bool {
        self.extensions().watermarks().is_some()
    }

    fn durable_watermark(&self, base: OnDisk<'_>) -> Result<Option<Watermark>> {
        match self.extensions().watermarks() {
            Some(w) => w.durable_watermark(base),
            None => Ok(None),
        }
    }

    fn record_watermark(&self, mark: Watermark, base: OnDisk<'_>) -> Result<()> {
        match self.extensions().watermarks() {
            Some(w) => w.record_watermark(mark, base),
            None => Ok(()),
        }
    }

    fn max_id_len(&self) -> usize {
        self.extensions().max_id_len()
    }

    fn files(&self) -> Vec<std::path::PathBuf> {
        self.extensions().files().to_vec()
    }
}
