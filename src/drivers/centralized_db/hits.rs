//! Hits held in memory and written in batches by a background thread:
//! each batch numbered, so that one sent again after a lost reply is
//! applied once.

use super::{HitBatch, Inner};
use crate::drivers::hits::HIT_DELAY;
use crate::error::Result;
use crate::id::ImageId;

impl Inner {
    /// Writes the hits held in memory, in one statement. On failure they
    /// stay held (merged with any that arrived meanwhile).
    pub(super) fn flush_hits(&self) -> Result<()> {
        // One flush at a time: a flush asked for (before a query, on
        // `flush`) waits for the flusher's write in flight, so that it
        // never returns while hits are on their way.
        let mut unsent = self.flushing.lock();
        // A batch whose reply was lost goes again first, as it was (same
        // number): applied once whether or not the first try landed.
        if let Some((seq, batch)) = unsent.take() {
            if let Err(e) = self.send(seq, &batch) {
                *unsent = Some((seq, batch));
                return Err(e);
            }
            self.applied(batch);
        }
        let pending = {
            let mut hits = self.hits.lock();
            if hits.hits.is_empty() {
                return Ok(());
            }
            hits.hits.take()
        };
        let seq = self
            .batches
            .1
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        match self.send(seq, &pending) {
            Ok(()) => {
                self.applied(pending);
                Ok(())
            }
            Err(e) => {
                *unsent = Some((seq, pending));
                Err(e)
            }
        }
    }

    /// Adds batch `seq` to the rows, in one statement, unless the database
    /// has applied that batch of this store already.
    pub(super) fn send(&self, seq: i64, batch: &HitBatch) -> Result<()> {
        let mut ids = Vec::with_capacity(batch.len());
        let mut counts = Vec::with_capacity(batch.len());
        let mut times = Vec::with_capacity(batch.len());
        for (id, held) in batch {
            ids.push(id.as_str());
            counts.push(i64::try_from(held.hits).unwrap_or(i64::MAX));
            times.push(held.last);
        }
        let node = self.node_id;
        let key = &self.batches.0;
        self.pool.with(|c| {
            c.exec(
                "WITH mark AS (
                     INSERT INTO imgcache_state (node_reference_id, key, value) VALUES ($1, $5, $6)
                     ON CONFLICT (node_reference_id, key) DO UPDATE SET value = excluded.value
                     WHERE imgcache_state.value < excluded.value
                     RETURNING 1
                 )
                 UPDATE cached_images AS c
                 SET hits = LEAST(c.hits::bigint + v.n, 2147483647), last_accessed = v.at
                 FROM UNNEST($2::text[], $3::bigint[], $4::timestamp[]) AS v(image_id, n, at)
                 WHERE c.node_reference_id = $1 AND c.image_id = v.image_id
                   AND EXISTS (SELECT 1 FROM mark)",
                &[&node, &ids, &counts, &times, key, &seq],
            )
        })?;
        Ok(())
    }

    /// Records a batch the database holds in the entries remembered.
    pub(super) fn applied(&self, batch: HitBatch) {
        let mut memo = self.memo.lock();
        for (id, held) in batch {
            if let Some(m) = memo.get_mut(&id) {
                m.info.hits += held.hits;
                m.info.last_accessed = held.last;
            }
        }
    }

    /// Writes the hits held before a read of rows; a failure (the database
    /// gone between two statements) leaves them held for the flusher, and
    /// the read goes on.
    pub(super) fn flush_or_warn(&self) {
        if let Err(e) = self.flush_hits() {
            tracing::warn!("imgcache: hits held in memory for now: {e}");
        }
    }

    /// Forgets what this process remembers or holds of `ids`.
    pub(super) fn forget(&self, ids: &[ImageId]) {
        let mut memo = self.memo.lock();
        for id in ids {
            memo.remove(id);
        }
        self.hits.lock().hits.forget(ids);
    }
}

/// The background writer of batched hits: every [`HIT_DELAY`], or as soon
/// as a batch fills; ends when the last handle is dropped.
pub(super) fn flusher(me: &Inner) {
    let mut failing = false;
    loop {
        {
            let mut hits = me.hits.lock();
            if hits.stop {
                return;
            }
            // After a failure, always the full delay: no connect storm
            // against a database that is down.
            if !hits.hits.full() || failing {
                me.wake.wait_for(&mut hits, HIT_DELAY);
            }
            if hits.stop {
                return;
            }
        }
        match me.flush_hits() {
            Ok(()) => {
                if failing {
                    tracing::info!("imgcache: {}: hits written again", me.pool.location);
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("imgcache: hits held in memory until the database is back: {e}");
                    failing = true;
                }
            }
        }
    }
}
