//! Hit batching, written once for every store: a read counts its hit in
//! memory, and the store writes the counts held every [`HIT_DELAY`], or
//! once [`HIT_BATCH`] images have hits held (and before anything reports or
//! changes metadata, on `flush`, and when it is dropped), so that a read costs no metadata write
//! of its own (DESIGN, invariant 4). Hits on descriptors the cache keeps
//! open reach a store in batches of their own, up to half a second later
//! (`files::open_files`; [`crate::CacheDriver::add_hits`]). Each store decides *how* a batch is
//! written (one SQLite transaction, an attribute added to under the file's
//! lock, a numbered statement to the shared database) and keeps with each
//! image's hits what it needs to write them (`T`: the file they belong to,
//! for the xattr store).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::id::ImageId;

/// Images with hits held in memory at most before they are written. Not
/// hits: a hot image's hits are written once per [`HIT_DELAY`] however
/// many there are (each write moves its file's change time, which a kept
/// descriptor's check then cannot trust for a moment, and costs a SQLite
/// store in Glance's journal mode two `fsync`s).
pub(crate) const HIT_BATCH: usize = 256;

/// Time a hit is held in memory at most (checked at the next read, or by a
/// store's own writer thread).
pub(crate) const HIT_DELAY: Duration = Duration::from_secs(1);

/// The hits of one image held in memory.
#[derive(Debug, Clone)]
pub(crate) struct Held<T> {
    /// How many.
    pub(crate) hits: u64,
    /// The time of the latest, as the cache's clock gave it.
    pub(crate) last: SystemTime,
    /// What the store keeps with them.
    pub(crate) of: T,
}

/// A batch of hits, per image.
pub(crate) type Batch<T> = HashMap<ImageId, Held<T>>;

/// The hits a store holds, not yet written.
#[derive(Debug)]
pub(crate) struct Hits<T> {
    by_id: Batch<T>,
    count: u64,
    oldest: Option<Instant>,
    /// The time the first hit held was counted at, by the cache's clock.
    oldest_at: Option<SystemTime>,
}

impl<T> Default for Hits<T> {
    fn default() -> Self {
        Hits {
            by_id: HashMap::new(),
            count: 0,
            oldest: None,
            oldest_at: None,
        }
    }
}

impl<T> Hits<T> {
    /// Counts one hit of `id` at `at`; `of` makes what the store keeps
    /// with a new image's hits. Returns the image's hits held now. No
    /// allocation when the image already has hits held.
    pub(crate) fn add(&mut self, id: &ImageId, at: SystemTime, of: impl FnOnce() -> T) -> u64 {
        self.add_n(id, 1, at, of)
    }

    /// [`Hits::add`] for `n` hits, the latest at `at`.
    pub(crate) fn add_n(
        &mut self,
        id: &ImageId,
        n: u64,
        at: SystemTime,
        of: impl FnOnce() -> T,
    ) -> u64 {
        let held = match self.by_id.get_mut(id) {
            Some(held) => {
                held.hits += n;
                held.last = held.last.max(at);
                held.hits
            }
            None => {
                self.by_id.insert(
                    id.clone(),
                    Held {
                        hits: n,
                        last: at,
                        of: of(),
                    },
                );
                n
            }
        };
        self.count += n;
        self.oldest.get_or_insert_with(Instant::now);
        self.oldest_at.get_or_insert(at);
        held
    }

    /// Whether the batch is due: hits of [`HIT_BATCH`] images, or the
    /// first of them [`HIT_DELAY`] ago.
    pub(crate) fn due(&self) -> bool {
        self.full() || self.oldest.is_some_and(|t| t.elapsed() >= HIT_DELAY)
    }

    /// [`Hits::due`] by the time of a hit just counted, `at` (the cache's
    /// clock, already read): no clock read of its own, for a store that
    /// writes its batches from the hits themselves. Hits come a little out
    /// of order (each read the clock before it took the lock; a batch
    /// handed over carries its latest time): a time up to [`HIT_DELAY`]
    /// before the first is not due; a clock that went back further makes
    /// the batch due.
    pub(crate) fn due_at(&self, at: SystemTime) -> bool {
        self.full()
            || self.oldest_at.is_some_and(|t| match at.duration_since(t) {
                Ok(d) => d >= HIT_DELAY,
                Err(e) => e.duration() > HIT_DELAY,
            })
    }

    /// Whether hits of [`HIT_BATCH`] images are held (a writer thread's own
    /// test; it keeps the time itself).
    pub(crate) fn full(&self) -> bool {
        self.by_id.len() >= HIT_BATCH
    }

    /// Whether no hit is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The hits held for `id`.
    pub(crate) fn get(&self, id: &ImageId) -> Option<&Held<T>> {
        self.by_id.get(id)
    }

    /// Takes every hit held, to be written.
    pub(crate) fn take(&mut self) -> Batch<T> {
        self.count = 0;
        self.oldest = None;
        self.oldest_at = None;
        std::mem::take(&mut self.by_id)
    }

    /// Puts back a batch whose write failed, merged with the hits counted
    /// meanwhile (theirs are the later times).
    pub(crate) fn restore(&mut self, batch: Batch<T>) {
        // Tried again a delay after the latest hit of the batch.
        let latest = batch.values().map(|h| h.last).max();
        for (id, held) in batch {
            self.count += held.hits;
            match self.by_id.get_mut(&id) {
                Some(now) => now.hits += held.hits,
                None => {
                    self.by_id.insert(id, held);
                }
            }
        }
        if self.count > 0 {
            self.oldest.get_or_insert_with(Instant::now);
            if let Some(t) = latest {
                self.oldest_at.get_or_insert(t);
            }
        }
    }

    /// Drops the hits held for `ids` (their images were removed or
    /// replaced: the hits belonged to the old files).
    pub(crate) fn forget(&mut self, ids: &[ImageId]) {
        for id in ids {
            if let Some(held) = self.by_id.remove(id) {
                self.count = self.count.saturating_sub(held.hits);
            }
        }
        if self.count == 0 {
            self.oldest = None;
            self.oldest_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ImageId {
        ImageId::new(s).unwrap()
    }

    #[test]
    fn counts_batches_and_restores() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(1);
        let mut h: Hits<u8> = Hits::default();
        assert!(h.is_empty() && !h.due());
        assert_eq!(h.add(&id("a"), t0, || 7), 1);
        assert_eq!(h.add(&id("a"), t1, || unreachable!()), 2);
        assert_eq!(h.add(&id("b"), t0, || 9), 1);
        let a = h.get(&id("a")).unwrap();
        assert_eq!((a.hits, a.last, a.of), (2, t1, 7));
        let batch = h.take();
        assert!(h.is_empty() && h.get(&id("a")).is_none());
        h.add(&id("a"), t1, || 8);
        h.restore(batch);
        assert_eq!(h.get(&id("a")).unwrap().hits, 3);
        assert_eq!(h.get(&id("b")).unwrap().hits, 1);
        h.forget(&[id("a")]);
        assert_eq!(h.get(&id("b")).unwrap().hits, 1);
        // Many hits of one image are not a batch (within the delay)...
        for _ in 0..10_000 {
            h.add(&id("c"), t0, || 0);
        }
        assert!(!h.full());
        // ...hits of as many images as a batch holds are.
        for i in 0..HIT_BATCH {
            h.add(&id(&format!("d{i}")), t0, || 0);
        }
        assert!(h.full() && h.due());
    }

    #[test]
    fn due_by_the_hits_own_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut h: Hits<u8> = Hits::default();
        assert!(!h.due_at(t0));
        h.add(&id("a"), t0, || 0);
        assert!(!h.due_at(t0 + HIT_DELAY / 2));
        assert!(h.due_at(t0 + HIT_DELAY));
        // Hits a little out of order are not due; a clock that went back
        // further: written rather than held for ever.
        assert!(!h.due_at(t0 - HIT_DELAY / 2));
        assert!(h.due_at(t0 - HIT_DELAY * 2));
        let batch = h.take();
        assert!(!h.due_at(t0 + HIT_DELAY * 10));
        // A failed write is tried again a delay after its latest hit.
        h.restore(batch);
        assert!(!h.due_at(t0 + HIT_DELAY / 2));
        assert!(h.due_at(t0 + HIT_DELAY));
    }
}
