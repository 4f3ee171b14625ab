//! A durable disk store for [pingora-cache](https://docs.rs/pingora-cache)
//! 0.9, on [`imgcache`].
//!
//! pingora-cache ships only an in-memory store. [`DiskCache`] implements
//! its [`Storage`] trait on an [`ImageCache`]: objects live on disk, crash
//! safe (a body never without its metadata, a torn object never served),
//! pruned to a byte limit by least recent use, and readers of an object
//! still being written stream it as its bytes land (imgcache's followers of
//! a fill), so a stampede on a cold object costs one upstream request.
//!
//! ```no_run
//! use std::sync::Arc;
//! use imgcache::ImageCache;
//! use imgcache_pingora::DiskCache;
//!
//! let cache = ImageCache::builder("/var/cache/proxy").max_size(50 << 30).open()?;
//! // pingora wants a `&'static` store.
//! let storage: &'static DiskCache = Box::leak(Box::new(DiskCache::new(Arc::new(cache))?));
//! // In `ProxyHttp::request_cache_filter`:
//! // session.cache.enable(storage, None, None, Some(lock), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # How it maps
//!
//! | pingora | imgcache |
//! |---|---|
//! | an object (meta + body) | one cached image: a prefix with the meta, then the body (see `object.rs`) |
//! | [`CacheKey`] | an id: the readable primary key (unsafe bytes replaced, cut to 160 bytes), `~`, and the key's 32 hex digits (`combined()`): unique by the hash, recognisable in `imgcache list-cached` |
//! | `get_miss_handler` + `write_body` + `finish` | a fill ([`ImageCache::fetch_detached`]) reading the response through a channel, its `Content-Length` checked; committed by the rename on `finish`; a handler dropped unfinished leaves nothing cached; a stale object is replaced; a second write of an object under way is refused (pingora passes that response on uncached) |
//! | `lookup_streaming_write` | that write's own fill, found by its tag: never another write's bytes |
//! | `lookup` during a write | the write's fill, shared by its readers: bytes as they land, the end only with the commit, a failure an error at once |
//! | `lookup` | the cached file, read with `pread` (what the page cache holds, on the runtime's thread), seekable |
//! | `update_meta` | a sidecar `<id>.meta` naming the body it updates |
//! | `purge` | a delete of the image and its sidecar |
//! | eviction | imgcache's own: `max_size`, least recently used first, durable across restarts |
//!
//! **Eviction:** leave pingora's eviction manager out (`None` in
//! `HttpCache::enable`). imgcache keeps hits and access times durably and
//! prunes to [`imgcache::CacheOptions::max_size`] after every fill and
//! before one (admission), where pingora's managers are in memory and
//! forget everything at a restart. A manager passed anyway works: its
//! evictions arrive as purges.
//!
//! **Metadata** is stored with pingora's own `CacheMeta::serialize`: its
//! header blob is compressed with the process's header dictionary
//! (`pingora_cache::set_compression_dict_path`), so keep that dictionary
//! for as long as the cache lives; an object whose metadata no longer
//! decodes is a miss and is removed.
//!
//! Linux-only parts (reads of resident pages without waiting) fall back to
//! the blocking pool elsewhere.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use imgcache::{Fetched, FollowReader, ImageCache, ImageId};
use pingora_cache::key::CacheHashKey;
use pingora_cache::storage::{HandleMiss, MissFinishType};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{
    CacheKey, CacheMeta, HitHandler, MissHandler, PurgeOutcome, PurgeTarget, PurgeType, Storage,
};
use pingora_error::{Error, ErrorType, OrErr, Result};

mod hit;
mod object;

use hit::{read_exact_at, CompleteHit, PartialHit};
use object::{Prefix, Sidecar, FIXED};

/// The longest readable part of an id, in bytes.
const READABLE: usize = 160;

/// The first read of a hit: the prefix and the body's first bytes.
const HEAD: usize = 64 << 10;

/// Chunks a miss handler queues for its fill before `write_body` waits.
const QUEUED_CHUNKS: usize = 32;

/// A write under way.
#[derive(Debug, Clone)]
struct Write {
    tag: u64,
    prefix: Bytes,
    fill: Arc<FollowReader>,
}

/// pingora-cache's [`Storage`] on an [`ImageCache`]. See the crate docs.
#[derive(Debug)]
pub struct DiskCache {
    cache: Arc<ImageCache>,
    /// Ids by key hash (`combined()`), for purges, which name hashes only.
    by_hash: Mutex<HashMap<String, ImageId>>,
    /// The metadata updates there are (sidecars), so that a hit of an
    /// object without one does not look for it.
    sidecars: Mutex<std::collections::HashSet<ImageId>>,
    /// Each write under way, by id: its tag, its prefix (a reader gets the
    /// metadata at once) and its fill, shared by its readers (a fill that
    /// fails reaches them as an error).
    writing: Mutex<HashMap<ImageId, Write>>,
    /// Tags of writes (from a random start).
    next_tag: AtomicU64,
}

impl DiskCache {
    /// A store on `cache`. Lists what it holds, to answer purges by hash.
    pub fn new(cache: Arc<ImageCache>) -> imgcache::Result<Self> {
        let mut by_hash = HashMap::new();
        let mut sidecars = std::collections::HashSet::new();
        // The files in place: another process's latest objects too, whose
        // entries it may not have written yet.
        for id in cache.cached_ids()? {
            if let Some(hash) = hash_of(id.as_str()) {
                by_hash.insert(hash.to_owned(), id);
            } else if id.as_str().ends_with(".meta") {
                sidecars.insert(id);
            }
        }
        // Random (the standard library's per-process keys): tags of two
        // processes on one directory do not meet.
        let start = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        Ok(DiskCache {
            cache,
            by_hash: Mutex::new(by_hash),
            sidecars: Mutex::new(sidecars),
            writing: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(start),
        })
    }

    fn lock_sidecars(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<ImageId>> {
        self.sidecars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache underneath.
    pub fn cache(&self) -> &Arc<ImageCache> {
        &self.cache
    }

    /// The imgcache id `key` is stored under.
    pub fn object_id(key: &CacheKey) -> ImageId {
        let hash = key.combined();
        let readable = key.primary_key_str().map(readable).unwrap_or_default();
        let id = if readable.is_empty() {
            hash
        } else {
            format!("{readable}~{hash}")
        };
        // Only safe bytes and 32 hex digits: always a valid id.
        ImageId::new(&id).expect("a readable part and a hash make a valid id")
    }

    fn remember(&self, key: &CacheKey, id: &ImageId) {
        self.by_hash
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.combined(), id.clone());
    }

    /// What is stored for `id`: the object being written, else the
    /// committed one; `None` if neither.
    async fn find(&'static self, id: &ImageId) -> Result<Option<(CacheMeta, HitHandler)>> {
        if let Some(found) = self.partial(id, None)? {
            return Ok(Some(found));
        }
        let Some(image) = self
            .cache
            .open_for_read_async(id)
            .await
            .or_err(ErrorType::InternalError, "imgcache: open")?
        else {
            // A write may have started while the file was looked for: a
            // reader that calls it a miss now would make a second upstream
            // request (pingora's lock is free once the write streams).
            return self.partial(id, None);
        };
        self.complete(id, image).await
    }

    /// A reader of this process's write of `id`, if one is under way
    /// (`tag`: that write only).
    fn partial(&self, id: &ImageId, tag: Option<u64>) -> Result<Option<(CacheMeta, HitHandler)>> {
        let write = self
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        let Some(write) = write.filter(|w| tag.is_none_or(|t| t == w.tag)) else {
            return Ok(None);
        };
        Ok(
            PartialHit::open(write.fill, &write.prefix)?.map(|(meta, hit)| {
                let hit: HitHandler = Box::new(hit);
                (meta, hit)
            }),
        )
    }

    /// A committed object, from its open file.
    async fn complete(
        &'static self,
        id: &ImageId,
        image: imgcache::CachedImage,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let image = Arc::new(image);
        // One read for the prefix and the body's first bytes, which the
        // hit handler serves first.
        let head_len = image.len().min(HEAD as u64) as usize;
        let mut head = read_exact_at(&image, 0, head_len.max(FIXED.min(head_len))).await?;
        let decoded = Prefix::parse(&head).and_then(|prefix| {
            // `len` past the file: damaged.
            (prefix.len() <= image.len()).then_some(prefix)
        });
        let Some(prefix) = decoded else {
            self.discard(id, "no valid prefix").await;
            return Ok(None);
        };
        let plen = prefix.len() as usize;
        if head.len() < plen {
            let more = read_exact_at(&image, head.len() as u64, plen - head.len()).await?;
            head.extend_from_slice(&more);
        }
        let first = Bytes::copy_from_slice(&head[plen..]);
        let meta = match prefix.decode(&head[FIXED..plen]) {
            Ok((meta, _key)) => meta,
            Err(e) => {
                self.discard(id, &format!("metadata that does not decode: {e}"))
                    .await;
                return Ok(None);
            }
        };
        let meta = match self.sidecar(id, prefix.tag).await {
            Some(updated) => updated,
            None => meta,
        };
        let hit: HitHandler = Box::new(CompleteHit::new(image, prefix.len(), first));
        Ok(Some((meta, hit)))
    }

    /// The metadata update of the body written with `tag`, if there is one.
    async fn sidecar(&'static self, id: &ImageId, tag: u64) -> Option<CacheMeta> {
        let sid = sidecar_id(id)?;
        // Most objects have none: asked only of those known to.
        if !self.lock_sidecars().contains(&sid) {
            return None;
        }
        let image = self.cache.open_for_read_async(&sid).await.ok()??;
        let len = usize::try_from(image.len()).ok()?;
        let image = Arc::new(image);
        let bytes = read_exact_at(&image, 0, len).await.ok()?;
        Sidecar::decode(&bytes, tag)
    }

    /// Removes an object that cannot be served (a miss from now on).
    async fn discard(&self, id: &ImageId, why: &str) {
        tracing::warn!(object = %id, "imgcache-pingora: removing an object with {why}");
        let _ = self.remove(id).await;
    }

    /// Removes the object `id` and its metadata update; whether it was
    /// there.
    async fn remove(&self, id: &ImageId) -> Result<bool> {
        if let Some(sid) = sidecar_id(id) {
            self.lock_sidecars().remove(&sid);
        }
        let cache = self.cache.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let removed = cache.delete_cached_image(&id)?;
            if let Some(sid) = sidecar_id(&id) {
                cache.delete_cached_image(&sid)?;
            }
            Ok::<_, imgcache::Error>(removed)
        })
        .await
        .or_err(ErrorType::InternalError, "imgcache: remove task")?
        .or_err(ErrorType::InternalError, "imgcache: remove")
    }

    /// The id stored under key hash `hash`: from the index, else from a
    /// listing (an object written since by another process, or after a
    /// purge of its write).
    async fn id_of_hash(&self, hash: &str) -> Result<Option<ImageId>> {
        let known = self
            .by_hash
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned();
        if known.is_some() {
            return Ok(known);
        }
        let cache = self.cache.clone();
        let hash = hash.to_owned();
        tokio::task::spawn_blocking(move || {
            Ok::<_, imgcache::Error>(
                cache
                    .cached_ids()?
                    .into_iter()
                    .find(|id| hash_of(id.as_str()) == Some(hash.as_str())),
            )
        })
        .await
        .or_err(ErrorType::InternalError, "imgcache: list task")?
        .or_err(ErrorType::InternalError, "imgcache: list")
    }
}

#[async_trait]
impl Storage for DiskCache {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let id = Self::object_id(key);
        self.find(&id).await
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        // That write, and no other: its own bytes, as they land.
        let id = Self::object_id(key);
        let tag = streaming_write_tag
            .and_then(|t| <[u8; 8]>::try_from(t).ok())
            .map(u64::from_le_bytes);
        match self.partial(&id, tag)? {
            Some(found) => Ok(Some(found)),
            None => Error::e_explain(
                ErrorType::InternalError,
                "imgcache: the write ended before it could be read",
            ),
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let id = Self::object_id(key);
        self.remember(key, &id);
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let prefix = Bytes::from(object::encode(tag, meta, key.primary_key())?);
        // The size the response announced, checked by the fill: a body cut
        // short is never committed.
        let size = meta
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .filter(|_| !meta.headers().contains_key("transfer-encoding"))
            .map(|n| n + prefix.len() as u64);
        let (mut tx, rx) = tokio::sync::mpsc::channel(QUEUED_CHUNKS);
        let reader = ChannelReader {
            pending: prefix.clone(),
            rx,
        };
        let mut reader = Some(reader);
        let mut replaced = false;
        let fill = loop {
            let cache = self.cache.clone();
            let fill_id = id.clone();
            let object_reader = reader.take();
            let fetched = tokio::task::spawn_blocking(move || {
                let room = cache.clone();
                let room_id = fill_id.clone();
                cache.fetch_detached(&fill_id, move || {
                    // Admission: room made under the limits before a byte
                    // is written.
                    room.make_room(&room_id, size)?;
                    let Some(reader) = object_reader else {
                        return Err(imgcache::Error::FillFailed {
                            id: room_id,
                            reason: "no response to read".into(),
                        });
                    };
                    Ok(imgcache::origin::OriginObject {
                        reader: Box::new(reader),
                        size,
                        checksum: None,
                    })
                })
            })
            .await
            .or_err(ErrorType::InternalError, "imgcache: fill task")?
            .or_err(ErrorType::InternalError, "imgcache: fill")?;
            match fetched {
                Fetched::Following(f) if f.started_fill() => break f,
                // A stale object being refreshed: the new response replaces
                // it (its reader was not used: a hit never opens one).
                Fetched::Cached(_) if !replaced => {
                    replaced = true;
                    self.remove(&id).await?;
                    let (tx2, rx2) = tokio::sync::mpsc::channel(QUEUED_CHUNKS);
                    reader = Some(ChannelReader {
                        pending: prefix.clone(),
                        rx: rx2,
                    });
                    tx = tx2;
                    continue;
                }
                // Another write of this key under way here, or the store
                // down: this response is not cached (pingora passes it on
                // uncached), never answered with another write's bytes.
                _ => {
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "imgcache: another write of this object is under way",
                    )
                }
            }
        };
        let fill = Arc::new(fill);
        self.writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.clone(),
                Write {
                    tag,
                    prefix,
                    fill: fill.clone(),
                },
            );
        let (tx, fill) = (Some(tx), Some(fill));
        Ok(Box::new(Miss {
            store: self,
            id,
            tx,
            fill,
            body: 0,
            tag,
            tag_bytes: tag.to_le_bytes(),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        if let PurgeTarget::Exact(pingora_cache::CacheEntryKey::Identified { .. }) = target {
            // This store names no entry ids: an exact one is not ours.
            return Ok(PurgeOutcome::NotFound);
        }
        let hash = target.key().combined();
        let Some(id) = self.id_of_hash(&hash).await? else {
            return Ok(PurgeOutcome::NotFound);
        };
        let removed = self.remove(&id).await?;
        if removed {
            self.by_hash
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&hash);
        }
        Ok(if removed {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let id = Self::object_id(key);
        let Some(image) = self
            .cache
            .open_for_read_async(&id)
            .await
            .or_err(ErrorType::InternalError, "imgcache: open")?
        else {
            return Ok(false);
        };
        let image = Arc::new(image);
        let fixed = read_exact_at(&image, 0, FIXED).await?;
        let Some(prefix) = Prefix::parse(&fixed) else {
            return Ok(false);
        };
        let Some(sid) = sidecar_id(&id) else {
            return Ok(false);
        };
        let bytes = Sidecar::encode(prefix.tag, meta)?;
        self.lock_sidecars().insert(sid.clone());
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            // Replaced, not rewritten in place: a crash between the two
            // leaves the body's own (older) metadata, stale at worst.
            cache.delete_cached_image(&sid)?;
            cache.cache_image_file(&sid, &bytes[..])
        })
        .await
        .or_err(ErrorType::InternalError, "imgcache: update task")?
        .or_err(ErrorType::InternalError, "imgcache: update meta")
        // `false`: another update won the race, and stands.
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A message from a miss handler to its fill.
enum Chunk {
    Data(Bytes),
    /// The response ended here, whole.
    End,
}

/// What a fill reads: the prefix, then the response's body as the miss
/// handler writes it. A handler dropped before the end is an error here,
/// so the fill caches nothing.
struct ChannelReader {
    pending: Bytes,
    rx: tokio::sync::mpsc::Receiver<Chunk>,
}

impl io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pending.is_empty() {
            // A fill runs on a thread of its own: waiting here is its job.
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.pending = b,
                Some(Chunk::End) => return Ok(0),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the response was abandoned before its end",
                    ))
                }
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

/// A miss handler: the response's body into a fill.
struct Miss {
    store: &'static DiskCache,
    id: ImageId,
    /// `None` once the end was sent, or where the bytes are not needed.
    tx: Option<tokio::sync::mpsc::Sender<Chunk>>,
    /// The fill this handler feeds.
    fill: Option<Arc<FollowReader>>,
    body: usize,
    tag: u64,
    tag_bytes: [u8; 8],
}

impl Drop for Miss {
    fn drop(&mut self) {
        // Finished or abandoned, this write is over: its readers now find
        // the committed file, or nothing.
        let mut writing = self.store.writing.lock().unwrap_or_else(|e| e.into_inner());
        if writing.get(&self.id).is_some_and(|w| w.tag == self.tag) {
            writing.remove(&self.id);
        }
    }
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        self.body += data.len();
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        if !data.is_empty() && tx.send(Chunk::Data(data)).await.is_err() {
            self.tx = None;
            return Error::e_explain(ErrorType::InternalError, "imgcache: the fill ended early");
        }
        if eof {
            let _ = tx.send(Chunk::End).await;
            self.tx = None;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        if let Some(tx) = self.tx.take() {
            // Finished without an end-of-stream write: the end is here.
            let _ = tx.send(Chunk::End).await;
        }
        if let Some(fill) = self.fill.take() {
            fill.committed()
                .await
                .or_err(ErrorType::InternalError, "imgcache: commit")?;
            // Held under the byte limit after every fill (under it, a prune
            // is one sum of the sizes).
            let cache = self.store.cache.clone();
            drop(tokio::task::spawn_blocking(move || {
                if let Err(e) = cache.prune() {
                    tracing::warn!("imgcache-pingora: prune: {e}");
                }
            }));
        }
        Ok(MissFinishType::Created(self.body))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.tag_bytes)
    }
}

/// The readable part of an id: the bytes of `key` that are safe in a file
/// name, others as `_`, cut at [`READABLE`] bytes.
fn readable(key: &str) -> String {
    let mut out: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(READABLE)
        .collect();
    if out.starts_with('.') {
        out.replace_range(..1, "_");
    }
    out
}

/// The key hash an object id ends with; `None` for other ids (sidecars).
fn hash_of(id: &str) -> Option<&str> {
    let hash = id.get(id.len().checked_sub(32)?..)?;
    let before = &id[..id.len() - 32];
    let hex = hash
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && (before.is_empty() || before.ends_with('~'))).then_some(hash)
}

/// The id of an object's metadata update.
fn sidecar_id(id: &ImageId) -> Option<ImageId> {
    ImageId::new(format!("{id}.meta")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_readable_unique_and_safe() {
        let k = CacheKey::new("example.org/images/ubuntu 24.04.iso?x=1", "");
        let id = DiskCache::object_id(&k);
        assert!(id
            .as_str()
            .starts_with("example.org_images_ubuntu_24.04.iso_x_1~"));
        assert_eq!(hash_of(id.as_str()), Some(k.combined().as_str()));
        let other = DiskCache::object_id(&CacheKey::new(
            "example.org/images/ubuntu_24.04.iso?x=1",
            "",
        ));
        assert_ne!(id, other, "the same readable part, told apart by the hash");
        let dots = DiskCache::object_id(&CacheKey::new("../etc/passwd", ""));
        assert!(!dots.as_str().starts_with('.') && !dots.as_str().contains('/'));
        let long = DiskCache::object_id(&CacheKey::new("x".repeat(10_000), ""));
        assert!(long.as_str().len() <= READABLE + 1 + 32);
        let binary = DiskCache::object_id(&CacheKey::new(vec![0xff, 0, 1], ""));
        assert_eq!(binary.as_str().len(), 32);
        assert_eq!(hash_of(&format!("{id}.meta")), None);
    }
}
