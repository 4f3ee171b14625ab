//! [`CacheDriver`]: where a cache's metadata lives — and nothing else.
//!
//! A driver (a *metadata store*; the same trait as a *metadata store*) keeps
//! rows: one per cached image (size, hits, last access, checksum, CRC), the
//! reasons recorded for failed writes, and the queue's counter. It never
//! sees a path policy, moves a file, takes a file lock or decides anything:
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
//! A store answers for one node's cache ([`CacheDriver::node`]): a local
//! store has exactly one; a store on a shared database keys every row by
//! it, and may tell which other nodes hold an image
//! ([`CacheDriver::nodes_holding`]).

use std::fmt;
use std::time::SystemTime;

use crate::entry::{CachedImageInfo, LruEntry, NodeImage};
use crate::error::Result;
use crate::id::ImageId;

#[cfg(feature = "postgres")]
pub mod centralized_db;
mod checkpoint;
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

/// Where a cache keeps its metadata. See the [module docs](self) for the
/// order of calls and what each store may rely on.
///
/// Implemented by [`SqliteDriver`] and [`XattrDriver`]; object safe
/// ([`crate::ImageCache`] holds an `Arc<dyn CacheDriver>`). Ids reaching a
/// driver have been admitted by the cache (never one of its own file
/// names).
pub trait CacheDriver: Send + Sync + fmt::Debug {
    /// The driver's name, as Glance's `image_cache_driver` spells it.
    fn name(&self) -> &'static str;

    /// The node whose rows this store reads and writes.
    fn node(&self) -> &str {
        LOCAL_NODE
    }

    /// The entry of `id`, whose cached file is `file`, without counting a
    /// hit; `None` if the store has none (a file renamed in place whose
    /// row is not written yet, or one nobody recorded).
    fn get(&self, id: &ImageId, file: OnDisk<'_>) -> Result<Option<CachedImageInfo>>;

    /// Counts one hit of `id` at `at` and returns its entry as of that hit;
    /// `None` if the store has no entry. Stores batch these writes: a read
    /// costs at most one metadata update, never one per chunk.
    fn hit(
        &self,
        id: &ImageId,
        at: SystemTime,
        file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>>;

    /// Before a commit's file is synced and published (`file` is the
    /// complete incomplete file). For stores that keep metadata on the file.
    fn prepare(&self, _entry: &CachedImageInfo, _file: OnDisk<'_>) -> Result<()> {
        Ok(())
    }

    /// Records a published entry (its file is in place and synced),
    /// replacing any earlier entry of the same id.
    fn insert(&self, entry: &CachedImageInfo) -> Result<()>;

    /// Forgets the entries of `ids`, whose files are gone; returns how many
    /// it held.
    fn remove(&self, ids: &[ImageId]) -> Result<usize>;

    /// Forgets the entries of those `ids` for which `missing(id)` is still
    /// true once the store has excluded concurrent `insert`s: a commit
    /// renames its file before it inserts, so a fresh entry is never taken
    /// for a stale one.
    fn remove_if_missing(&self, ids: &[ImageId], missing: &dyn Fn(&ImageId) -> bool) -> Result<()> {
        let gone: Vec<ImageId> = ids.iter().filter(|id| missing(id)).cloned().collect();
        self.remove(&gone)?;
        Ok(())
    }

    /// Records the CRC-32 of an entry that had none (adopted, or written by
    /// Glance), once a scrub has read its `file` whole.
    fn set_crc32(&self, id: &ImageId, crc32: u32, file: OnDisk<'_>) -> Result<()>;

    /// Every entry, ordered by id. Entries whose metadata cannot be decoded
    /// are logged and passed over.
    fn list(&self, files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>>;

    /// Every entry, least recently accessed first (ties broken by id).
    fn lru(&self, files: &dyn CachedFiles) -> Result<Vec<LruEntry>>;

    /// Total bytes of the entries.
    fn total_size(&self, files: &dyn CachedFiles) -> Result<u64> {
        Ok(self.lru(files)?.iter().map(|e| e.size).sum())
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
    fn forget_invalid(&self, _ids: &[ImageId]) -> Result<()> {
        Ok(())
    }

    /// The next number of the queue's order, from a counter every process
    /// on the cache shares; `queue` is the queue folder.
    fn next_queue_seq(&self, queue: OnDisk<'_>) -> Result<u64>;

    /// Whether this store records a durability [`Watermark`]. A cache
    /// over a store that does not commits with
    /// [`crate::Durability::Immediate`] whatever it was asked, since
    /// nothing could tell it, after an unclean shutdown, which entries to
    /// check.
    fn records_watermark(&self) -> bool {
        false
    }

    /// The longest id, in bytes, this store can record (Glance's
    /// `centralized_db` table holds 36): a longer one is served from the
    /// origin, never cached. By default any valid id.
    fn max_id_len(&self) -> usize {
        crate::id::MAX_ID_LEN
    }

    /// The last [`Watermark`] recorded for this node's cache; `None` if
    /// none ever was. `base` is the cache's base directory.
    fn durable_watermark(&self, _base: OnDisk<'_>) -> Result<Option<Watermark>> {
        Ok(None)
    }

    /// Records `mark`, durably (it is on disk when this returns): each of
    /// its two times replaces the recorded one if later (each is a claim of
    /// its own, so the later of each holds). `base` is the cache's base
    /// directory.
    fn record_watermark(&self, _mark: Watermark, _base: OnDisk<'_>) -> Result<()> {
        Ok(())
    }

    /// Writes metadata held in memory (batched hits) now.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The files this store keeps, so that a cache whose directory holds
    /// them never takes them for images (a SQLite database and its side
    /// files).
    fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }

    /// The nodes whose caches hold `id`, for a store shared by many nodes;
    /// `None` for a store that knows only its own node (Glance answers
    /// `409` then).
    fn nodes_holding(&self, _id: &ImageId) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    /// Every cached image of every node, ordered by node and id, for a
    /// store shared by many nodes; `None` for a store of one node.
    fn all_nodes(&self) -> Result<Option<Vec<NodeImage>>> {
        Ok(None)
    }

    /// Takes over `entries` from a node's local SQLite database (Glance's
    /// migration to `centralized_db`): records those this node lacks, and
    /// returns every id of `entries` the store now holds for this node, for
    /// the caller to delete from the old database. Must be idempotent and
    /// safe when several processes import at once. Stores that cannot take
    /// entries over refuse with [`crate::Error::Config`].
    fn import(&self, _entries: &[CachedImageInfo]) -> Result<Vec<ImageId>> {
        Err(crate::Error::Config(format!(
            "the {} driver keeps its metadata locally: there is nothing to migrate to",
            self.name()
        )))
    }
}
