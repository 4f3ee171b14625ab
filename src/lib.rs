//! `imgcache` is a local, on-disk cache for large immutable blobs — VM
//! images, container layers, model files — that an API server puts in front
//! of a slow backend store.
//!
//! It is OpenStack Glance's image cache, made safe under crashes and
//! concurrency: the same four states on disk (`queue/`, `incomplete/`, the
//! cached files, `invalid/`), the same metadata drivers (a SQLite
//! `cache.db`, or extended attributes on the files), the same operator jobs
//! (prune to a size, clean stalled and invalid files), so it can open a
//! directory Glance wrote and leave it readable by Glance.
//!
//! ```
//! use std::io::{Read, Write};
//! use imgcache::{ImageCache, ImageId};
//!
//! let dir = tempfile::tempdir()?;
//! let cache = ImageCache::builder(dir.path()).max_size(1 << 20).open()?;
//!
//! // Cache an image: written to incomplete/, then renamed into place.
//! let id = ImageId::new("8f2f6b4e-7cba-4d41-9c6f-2a4e6d0b1c55")?;
//! let mut writer = cache.open_for_write(&id)?;
//! writer.write_all(&vec![7u8; 300_000])?;
//! writer.commit()?;
//!
//! // Read it back: every open counts a hit.
//! let mut image = cache.open_for_read(&id)?.expect("cached");
//! let mut bytes = Vec::new();
//! image.read_to_end(&mut bytes)?;
//! assert_eq!(bytes.len(), 300_000);
//! assert_eq!(cache.hit_count(&id)?, 1);
//!
//! // Or from any reader in one call.
//! let small = ImageId::new("small")?;
//! assert!(cache.cache_image_file(&small, &b"tiny"[..])?);
//!
//! // Prune: least recently accessed first, until at most max_size remain.
//! let report = cache.prune_to(100_000)?;
//! assert_eq!(report.removed, vec![id]);
//! assert!(cache.is_cached(&small)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Pieces
//!
//! - [`ImageId`]: a validated id; anything that is not a safe single file
//!   name is refused before it reaches the file system.
//! - [`CacheOptions`]: Glance's settings (`image_cache_dir`,
//!   `image_cache_max_size`, `image_cache_stall_time`, `image_cache_driver`,
//!   `image_cache_sqlite_db`) and defaults.
//! - [`ImageCache`]: the facade — the local file layer and a metadata store
//!   joined, and the policies: `prune`, `clean`, `verify`/`scrub`,
//!   `rebuild`, `caching_reader`, `fetch`, `cache_image_file`, `prefetch`.
//! - [`CacheDriver`](drivers::CacheDriver): where metadata lives,
//!   and nothing else. [`SqliteDriver`](drivers::SqliteDriver) and [`XattrDriver`](drivers::XattrDriver) (Linux)
//!   implement it for one node; `CentralizedDbDriver` (feature `postgres`)
//!   for many nodes on one PostgreSQL database, as Glance's
//!   `centralized_db`.
//! - `Layout`: the one local file layer's paths and file moves.
//! - [`CacheWriter`]: `Write` into `incomplete/<id>`; `commit()` publishes,
//!   dropping it moves the bytes to `invalid/`.
//! - [`CachedImage`]: an open cached file: `Read + Seek`, ranged reads,
//!   `mmap`, and zero-copy [`CachedImage::send_to`] (`sendfile`, `splice`,
//!   `copy_file_range` on Linux; a `read`/`write` fallback elsewhere).
//! - [`TeeReader`]: the caching tee — a backend stream cached as the caller
//!   reads it, checked against a [`Checksum`](checksum::Checksum) in the same pass.
//! - [`ImageCache::fetch`]: single flight — one backend open however many
//!   callers want a cold image; the others follow the fill
//!   ([`FollowReader`]) or wait for another process's writer.
//! - [`ImageCache::fetch_detached`]: the same, with a fill that belongs to
//!   no caller (a thread of its own reads the origin); every caller
//!   follows it at its own pace. Its async face (feature `tokio`):
//!   `fetch_async`, `open_for_read_async`, `send_file_async`.
//! - `serve` (feature `serve`): Glance's image-file path over HTTP — a
//!   tower `Service` for any hyper or axum app, and the zero-copy HTTP/1.1
//!   `Server` that `imgcache serve` runs; every request authorized with
//!   the origin unless public, counted in Prometheus `Metrics`.
//! - `serve::admin` and `serve::jobs` (feature `admin`): Glance's cache
//!   management API (`/v2/cache`) on a listener of its own, and the
//!   prefetcher, pruner and cleaner inside the serving process.
//! - [`ImageCache::make_room`]: admission under a hard limit and a minimum
//!   of free space ([`CacheOptions::hard_limit`], [`CacheOptions::min_free`]).
//!
//! # Layers: one file layer, a narrow metadata store
//!
//! ```text
//!                  ImageCache   policy: prune, clean, quarantine, recovery walk,
//!                      │        single-flight fills, tee; admits every id once
//!          ┌───────────┴────────────┐
//!     files (Layout)          dyn CacheDriver      rows, hits, LRU order, queue
//!     writer's file moves,    ┌──────┼───────┐     counter, invalid reasons,
//!     reader, locks, queue   SQLite  xattr  PostgreSQL  the node its rows belong to
//!     folder, zero copy          (one node)   (many nodes)
//! ```
//!
//! How bytes move between `incomplete/`, the base directory and `invalid/`,
//! who holds which lock, and how files are reconciled with metadata after a
//! crash do not depend on where metadata lives, so they are written once
//! (the file layer and the facade's recovery walk). A store keeps rows and
//! decides nothing; the facade asks it, in an order that keeps metadata and
//! files agreeing after a crash at any instant (see [`drivers`]).
//!
//! Glance's `xattr` driver keeps its metadata on the cached files. Rather
//! than have that store open files behind the file layer's back (a second
//! path policy) or teach the file layer attribute names (a second store),
//! the store's per-entry methods take an [`OnDisk`](drivers::OnDisk) — the file as the file
//! layer found or opened it — and its walks a [`CachedFiles`](drivers::CachedFiles) listing.
//! Stores that keep rows elsewhere (SQLite, a shared database) ignore both.
//!
//! Ids are checked once: an [`ImageId`] refuses what is no safe file name,
//! and `Layout::admit` refuses this cache's own names (its configured
//! database and side files, Glance's `image_cache_db_init`). Every path of
//! an image is built from an `Admitted` id, which only `admit` makes, so
//! no entry point can reach the file system with an unchecked one.
//!
//! # Where things live
//!
//! Each concern is found by its file's name, and the layers import
//! downwards only: `files/` and `drivers/` never import each other (the
//! facade joins them), and `serve/` uses the cache's public API alone (and
//! the crate's small parsers), as any embedding server would.
//!
//! | place | what |
//! |---|---|
//! | `id.rs`, `error.rs`, `clock.rs`, `options.rs`, `checksum.rs`, `range.rs`, `entry.rs` | the vocabulary every layer uses |
//! | `files/` | the one local file layer: layout and every private name of the cache directory (`.imgcache/`), the writer's file moves, the reader, the descriptors of hot files kept open, locks, the queue, zero-copy sends |
//! | `drivers/` | [`CacheDriver`](drivers::CacheDriver), the small core every store writes, and the capabilities beside it (`Fleet`, `Watermarks`, `InvalidReasons`); `hits.rs`, hit batching written once; `sqlite/`, `xattr/`, `centralized_db/` (pool, schema, hits, store) |
//! | `cache/` | [`ImageCache`], the facade: `mod.rs` (opening, the read path), `flight.rs` (single flight: take a fill and its permit, or follow one), `fetch.rs` (the miss path and fill threads), `fill.rs` (what a fill shares with its followers), `tee.rs`, `writer.rs`, `evict.rs` (prune, admission, clean), `verify.rs` (verify, scrub, quarantine), `recover.rs`, `durability.rs` (the checkpoint), `session.rs` (the session mark), `migrate.rs`, `prefetch.rs` |
//! | `origin/` | where bytes come from on a miss: a directory, HTTP (blocking, `ureq`), HTTP (async, `reqwest`) |
//! | `serve/` | (feature) the HTTP data service (`plan.rs` the HTTP semantics, `server.rs` the zero-copy transport, `body.rs` hyper's), `peers.rs` (peer fill across a fleet), the admin API, metrics, jobs |
//! | `testing/` | (feature `test-utils`) the model, the store conformance kit, the fuzz entry points |
//! | `bin/imgcache/` | the CLI: `inspect.rs`, `manage.rs`, `fetch.rs`, `serve.rs`, one file per group of commands |
//!
//! Single flight stays under `cache/` (not a `fill/` of its own beside it)
//! because a fill holds the facade's writer and commits through the facade:
//! `flight.rs` decides who fills, `fill.rs` is what a fill shares,
//! `fetch.rs` drives it. The vocabulary has two import cycles on purpose:
//! [`Error`] names the [`ImageId`] and [`Checksum`](checksum::Checksum) an error concerns, and
//! their constructors return [`Error`] so that `?` carries a bad id or
//! checksum anywhere; cutting them would change what `ImageId::new` and
//! `Checksum::new` return. Two HTTP clients are kept on purpose:
//! the blocking origin of feature `http` costs 21 crates (`ureq`: 64 in all
//! with no other feature, against 43 without it), where `reqwest` brings the
//! async stack (167 crates with feature `serve`); a user who only prefetches
//! from Glance's API should not compile tokio and hyper.
//!
//! # Guarantees
//!
//! - A cached image is complete: a writer's bytes become visible only by an
//!   atomic rename, a reader is refused a file whose size differs from what
//!   was committed, and after an unclean shutdown nothing a checkpoint did
//!   not cover is served before it is checked (see *Durability*).
//! - One writer per image: `incomplete/<id>` is created exclusively, and a
//!   commit never replaces a cached file.
//! - A live writer holds a lock on its file, so `clean` never deletes a file
//!   that is still being filled, however old it looks.
//! - A read never `fsync`s, and costs no metadata write of its own: hits
//!   are counted in memory (those on descriptors kept open join the batch
//!   every half second) and written in batches, once a second or once
//!   256 images have hits held — by a background thread (SQLite), or by the
//!   read that finds the batch due, adding to each file's attributes under
//!   its lock (xattr; [`ImageCache::flush`]).
//!   Writers of different images share no lock on the data path; with
//!   group durability a commit makes no `fsync` at all, and with
//!   `Immediate` commits that land together share one of the directory.
//! - Errors are values ([`Error`]), each naming the id or path involved.
//!
//! # Durability
//!
//! A cache does not need every entry to survive a power cut: a lost entry
//! is fetched again. It needs no entry ever to be *served wrong* after one.
//! So there are two modes ([`Durability`], [`CacheOptions::durability`]),
//! and both keep that promise; they differ in what a power cut may lose and
//! in what a commit costs.
//!
//! - **[`Durability::Immediate`]**: a commit is, in this order (recorded
//!   with strace in `tests/syscalls.rs`): data `write`s → `fsync` of the
//!   file → `renameat2(RENAME_NOREPLACE)` into the base directory → `fsync`
//!   of the directory → metadata. It is durable when `commit` returns.
//! - **[`Durability::Group`]** (the default): the same steps without the
//!   two `fsync`s; a store may hold the commit's metadata and write it with
//!   others (the SQLite store does: in Glance's journal mode each of its
//!   transactions costs two `fsync`s; see
//!   [`CacheDriver::insert_batched`](drivers::CacheDriver::insert_batched)).
//!   Other processes serve such a commit at once, from its file; they list
//!   it, and count its hits, once its entry is written (within a second;
//!   a read-only handle serves it only then). A background checkpoint makes everything committed so
//!   far durable at once — one `syncfs(2)` of the cache's file system
//!   (`sync(2)` where there is none) at most 1 s after a commit, or after
//!   256 MiB — and then records a [`Watermark`](drivers::Watermark) in the store, durably: the
//!   cache's clock and the file system's, as they were just before that
//!   sync. Each entry is stamped (`last_modified`) after its last data
//!   write, so an entry stamped before the watermark was on disk before
//!   the watermark was recorded. (The sync covers every process's files;
//!   entries another process holds are written by it, and one a crash
//!   takes leaves a file without metadata, judged as such below.)
//!
//! When a cache is opened, in either mode, entries stamped at or after the
//! last watermark (a crash came before their checkpoint, or their writer
//! is still running) are read whole and checked against the size and
//! CRC-32 they were committed with, *before* the cache is returned: a torn
//! one is moved to `invalid/` with the reason (that move is synced at
//! once) and is fetched again. A file without metadata is adopted, as
//! before — unless the last session of processes on the cache ended
//! uncleanly (the watermark file `.imgcache/watermark`, marked `dirty` by
//! the first process to open and `clean` by the last to close, tells;
//! [`RecoveryReport::unclean_shutdown`]), the machine went down since (the
//! mark names the boot it was made in: after crashes of processes alone the
//! page cache kept every byte they wrote, and a file renamed in is whole)
//! and the file's bytes were made or written after the watermark (its birth and modification times, on the
//! file system's clock, say so): that one could be a torn commit whose row
//! was lost, and with nothing to check it by, it goes to `invalid/` too
//! ([`RecoveryReport::torn`]). The same holds for an entry without a CRC-32
//! (one Glance wrote, or one adopted). A hit count or access time written
//! on a file is no change of its bytes: a node's hot set survives a crash.
//! Where the file system keeps no birth time, the change time is used
//! (which moves with hits too: safe, but more is refetched). A clean close makes a last checkpoint, so
//! the next open checks nothing.
//!
//! **Why group is the default.** It is what a cache needs and no more: the
//! promise that matters (no wrong byte, ever) holds as firmly as with
//! `Immediate`, because nothing is trusted that a checkpoint did not
//! cover. What a power cut can cost is the entries of the last second,
//! fetched again; the price of `Immediate` is two `fsync`s on every commit,
//! which is what bounded small fills on every disk measured here (see
//! `benches/compare.rs`). Verifying rather than discarding the uncovered
//! entries keeps a *process* crash (far more common than a power cut, and
//! which leaves the page cache whole) from costing anything at all, and it
//! reads at most one checkpoint interval of commits. Choose `Immediate`
//! where an entry must survive the instant `commit` returns (the origin is
//! gone once a fill is done, or refetching is dearer than a sync), or over
//! a store that records no watermark (then it is used whatever is asked).
//!
//! The argument assumes the clocks do not run backwards across a
//! checkpoint: a wall clock stepped back by more than the interval could
//! make a newer commit look covered.
//!
//! After a *process* crash (SIGKILL at any instant, `tests/crash.rs`) nothing
//! is lost that was committed (an entry the store still held is adopted
//! from its file, without its CRC-32: `tests/processes.rs`), and reopening
//! reconciles the rest: an entry
//! whose file is gone is dropped, an `incomplete/` file is stalled and
//! `clean` removes it. Reads never `fsync`.
//!
//! After a *power loss* (simulated in `tests/power_cut.rs`: files truncated,
//! zeroed or left unrenamed, rows rolled back to the watermark):
//!
//! - **both modes**: everything committed before the watermark (with
//!   `Immediate`, before `commit` returned) is there with its bytes; later
//!   entries are there and intact, or gone.
//! - **sqlite**: in Glance's journal mode (`DELETE`, the default) a row is
//!   durable when its transaction commits; with `SqliteJournal::Wal`, at
//!   the next log checkpoint or watermark. With group durability a
//!   commit's row is held and written with others, before every checkpoint's
//!   sync: a power cut may take the rows of the last commits (their files
//!   are then judged as files without metadata). Both run `synchronous = NORMAL`,
//!   so the latest hit counts and access times may be lost, and the
//!   database is never left damaged: SQLite keeps it consistent.
//! - **xattr**: the attributes (the entry — commit time, size and CRC in
//!   one value — first, the hit count last) are set on the file before its
//!   rename, so an image appears with its metadata or without any. Hit counts and access times updated
//!   since the file system last wrote its inode back may be lost.
//! - **both**: `invalid/` and `incomplete/` files, and queue markers, are not
//!   synced: they may vanish or reappear; `clean` takes care of either.

#![deny(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod cache;
pub mod checksum;
pub mod clock;
pub mod drivers;
mod entry;
mod error;
mod files;
mod id;
mod options;
pub mod origin;
mod range;
#[cfg(feature = "serve")]
pub mod serve;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

/// The prefetcher's report and its progress events
/// ([`ImageCache::prefetch_with`]).
pub mod prefetch {
    pub use crate::cache::prefetch::{
        PrefetchEvent, PrefetchOutcome, PrefetchReport, PrefetchResult,
    };
}

pub use cache::fill::{FillProgress, FollowReader};
pub use cache::tee::{TeeReader, TeeStats};
pub use cache::writer::CacheWriter;
pub use cache::{
    Fetched, ImageCache, ImageStream, MigrationReport, PruneReport, RecoveryReport, ScrubReport,
    Verification,
};
pub use entry::{CachedImageInfo, InvalidImageInfo, LruEntry, NodeImage};
pub use error::{Error, Result, StoreError, StoreErrorKind};
pub use files::{CachedImage, CleanReport, MappedImage, RangeReader, RemovedFile};
pub use id::{IdError, ImageId};
pub use options::{CacheOptions, DriverKind, Durability, MinFree};
pub use range::ByteRange;

/// The README's examples, compiled as doctests so that they cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
