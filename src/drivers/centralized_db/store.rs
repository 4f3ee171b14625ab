//! [`CacheDriver`] on the shared database: every query keyed by this
//! node, but the cross-node views.

use std::time::SystemTime;

use super::{
    decode, glance_checksum, identity, long_checksum, CentralizedDbDriver, Memo, COLUMNS, ENTRIES,
    SCHEMA_LOCK,
};
use crate::clock::round_trip;
use crate::drivers::{
    Announced, CacheDriver, Extensions, FillClaim, Fleet, InvalidReasons, PeerSource, Watermarks,
};
use crate::entry::{
    CachedFiles, CachedImageInfo, Invalidation, NodeImage, OnDisk, Scanned, Watermark,
};
use crate::error::{Error, Result};
use crate::id::ImageId;

impl CacheDriver for CentralizedDbDriver {
    fn name(&self) -> &'static str {
        "centralized_db"
    }

    fn get(&self, id: &ImageId, file: OnDisk<'_>) -> Result<Option<CachedImageInfo>> {
        let Some(info) = self.row(id)? else {
            self.inner.memo.lock().remove(id);
            return Ok(None);
        };
        self.inner.memo.lock().insert(
            id.clone(),
            Memo {
                file: identity(file),
                info: info.clone(),
            },
        );
        Ok(Some(self.with_pending(info)))
    }

    fn hit(
        &self,
        id: &ImageId,
        at: SystemTime,
        file: OnDisk<'_>,
    ) -> Result<Option<CachedImageInfo>> {
        // An entry the file layer vouches for needs no round trip (a
        // runtime's thread may be asking).
        let known = match file.known() {
            Some(known) => Some(known.clone()),
            None => {
                let memo = self.inner.memo.lock();
                memo.get(id)
                    .filter(|m| m.file == identity(file))
                    .map(|m| m.info.clone())
            }
        };
        // First sight of this file in this process: one round trip.
        let info = match known {
            Some(info) => info,
            None => match self.row(id)? {
                Some(info) => {
                    self.inner.memo.lock().insert(
                        id.clone(),
                        Memo {
                            file: identity(file),
                            info: info.clone(),
                        },
                    );
                    info
                }
                None => return Ok(None),
            },
        };
        let due = {
            let mut hits = self.inner.hits.lock();
            hits.hits.add(id, at, || ());
            hits.hits.full()
        };
        if due {
            self.inner.wake.notify_one();
        }
        Ok(Some(self.with_pending(info)))
    }

    fn add_hits(&self, id: &ImageId, n: u64, at: SystemTime, _file: OnDisk<'_>) -> Result<()> {
        let full = {
            let mut hits = self.inner.hits.lock();
            hits.hits.add_n(id, n, at, || ());
            hits.hits.full()
        };
        if full {
            self.inner.wake.notify_one();
        }
        Ok(())
    }

    fn insert(&self, entry: &CachedImageInfo) -> Result<()> {
        if entry.id.as_str().len() > self.inner.max_id {
            return Err(Error::InvalidId {
                input: entry.id.to_string(),
                reason: crate::id::IdError::TooLongForStore {
                    max: self.inner.max_id,
                },
            });
        }
        // Hits held for an earlier image of this id belonged to its file,
        // which this one replaces (with hits reset, as every store does).
        self.inner.forget(std::slice::from_ref(&entry.id));
        let node = self.inner.node_id;
        let size = i64::try_from(entry.size).unwrap_or(i64::MAX);
        let hits = i32::try_from(entry.hits).unwrap_or(i32::MAX);
        let crc = entry.crc32.map(i64::from);
        self.with(|c| {
            // Glance's row and imgcache's in one statement (one round
            // trip, one transaction).
            c.exec(
                "WITH c AS (
                   INSERT INTO cached_images
                   (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (image_id, node_reference_id) DO UPDATE SET
                   last_accessed = EXCLUDED.last_accessed, last_modified = EXCLUDED.last_modified,
                   size = EXCLUDED.size, hits = EXCLUDED.hits, checksum = EXCLUDED.checksum
                   RETURNING id)
                 INSERT INTO imgcache_entries (cached_image_id, crc32, checksum)
                 SELECT id, $8, $9 FROM c
                 ON CONFLICT (cached_image_id) DO UPDATE SET
                 crc32 = EXCLUDED.crc32, checksum = EXCLUDED.checksum",
                &[
                    &entry.id.as_str(),
                    &entry.last_accessed,
                    &entry.last_modified,
                    &size,
                    &hits,
                    &glance_checksum(&entry.checksum),
                    &node,
                    &crc,
                    &long_checksum(&entry.checksum),
                ],
            )
        })?;
        Ok(())
    }

    fn remove(&self, ids: &[ImageId], still_gone: &dyn Fn(&ImageId) -> bool) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let node = self.inner.node_id;
        let names: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        // Most misses have no row at all: one prepared look, no transaction.
        let any: bool = self.with(|c| {
            c.one(
                "SELECT EXISTS (SELECT 1 FROM cached_images
                 WHERE node_reference_id = $1 AND image_id = ANY($2))",
                &[&node, &names],
            )
            .map(|r| r.get(0))
        })?;
        if !any {
            return Ok(0);
        }
        // Lock the rows first: a committer's upsert of one of them waits
        // for this transaction. Then check the files: a commit that renamed
        // its file before the check is seen; one after it inserts after us.
        let gone = self.with(|c| {
            let mut tx = c.transaction()?;
            let locked = tx.query(
                "SELECT image_id FROM cached_images
                 WHERE node_reference_id = $1 AND image_id = ANY($2) FOR UPDATE",
                &[&node, &names],
            )?;
            let gone: Vec<ImageId> = locked
                .iter()
                .filter_map(|r| r.try_get::<_, String>(0).ok())
                .filter_map(|s| ImageId::new(s).ok())
                .filter(|id| still_gone(id))
                .collect();
            let gone_names: Vec<&str> = gone.iter().map(|i| i.as_str()).collect();
            tx.execute(
                "WITH c AS (
                   DELETE FROM cached_images WHERE node_reference_id = $1 AND image_id = ANY($2)
                   RETURNING id)
                 DELETE FROM imgcache_entries WHERE cached_image_id IN (SELECT id FROM c)",
                &[&node, &gone_names],
            )?;
            tx.commit()?;
            Ok(gone)
        })?;
        self.inner.forget(&gone);
        Ok(gone.len())
    }

    fn set_crc32(&self, id: &ImageId, crc32: u32, _file: OnDisk<'_>) -> Result<()> {
        self.inner.memo.lock().remove(id);
        let node = self.inner.node_id;
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_entries (cached_image_id, crc32)
                 SELECT id, $3 FROM cached_images WHERE node_reference_id = $1 AND image_id = $2
                 ON CONFLICT (cached_image_id) DO UPDATE SET crc32 = EXCLUDED.crc32",
                &[&node, &id.as_str(), &i64::from(crc32)],
            )
        })?;
        Ok(())
    }

    fn list(&self, _files: &dyn CachedFiles) -> Result<Vec<CachedImageInfo>> {
        self.rows("c.image_id")
    }

    fn total_size(&self, _files: &dyn CachedFiles) -> Result<u64> {
        let node = self.inner.node_id;
        let total: i64 = self.with(|c| {
            c.one(
                "SELECT COALESCE(SUM(GREATEST(size, 0)), 0)::BIGINT FROM cached_images
                 WHERE node_reference_id = $1",
                &[&node],
            )
            .map(|r| r.get(0))
        })?;
        Ok(u64::try_from(total).unwrap_or(0))
    }

    fn scan(&self, _files: &dyn CachedFiles) -> Result<Vec<Scanned>> {
        self.inner.flush_or_warn();
        let node = self.inner.node_id;
        let rows = self.with(|c| {
            c.rows(
                &format!("SELECT {COLUMNS}, c.id FROM {ENTRIES} WHERE c.node_reference_id = $1"),
                &[&node],
            )
        })?;
        let mut out = Vec::new();
        let mut unusable: Vec<i64> = Vec::new();
        for row in &rows {
            match decode(row) {
                Ok(info) => out.push(Scanned::Entry(info)),
                Err((raw, detail)) => match ImageId::new(&raw) {
                    Ok(id) => out.push(Scanned::Corrupt { id, detail }),
                    Err(_) => {
                        tracing::warn!(
                            "imgcache: dropping row {raw:?} of {}: {detail}",
                            self.inner.pool.location
                        );
                        unusable.extend(row.try_get::<_, i64>(7).ok());
                    }
                },
            }
        }
        if !unusable.is_empty() {
            self.with(|c| {
                c.exec(
                    "WITH c AS (
                       DELETE FROM cached_images WHERE node_reference_id = $1 AND id = ANY($2)
                       RETURNING id)
                     DELETE FROM imgcache_entries WHERE cached_image_id IN (SELECT id FROM c)",
                    &[&node, &unusable],
                )
            })?;
        }
        Ok(out)
    }

    fn adopt(&self, orphans: &[(CachedImageInfo, OnDisk<'_>)]) -> Result<Vec<ImageId>> {
        if orphans.is_empty() {
            return Ok(Vec::new());
        }
        let node = self.inner.node_id;
        let orphans: Vec<&CachedImageInfo> = orphans
            .iter()
            .map(|(e, _)| e)
            .filter(|e| self.fits(e))
            .collect();
        let ids: Vec<&str> = orphans.iter().map(|e| e.id.as_str()).collect();
        let sizes: Vec<i64> = orphans
            .iter()
            .map(|e| i64::try_from(e.size).unwrap_or(i64::MAX))
            .collect();
        let times: Vec<SystemTime> = orphans.iter().map(|e| e.last_modified).collect();
        // One statement; DO NOTHING: a committer that wrote its row
        // meanwhile knows better (it has the CRC).
        let rows = self.with(|c| {
            c.rows(
                "INSERT INTO cached_images
                 (image_id, last_accessed, last_modified, size, hits, node_reference_id)
                 SELECT v.image_id, v.at, v.at, v.size, 0, $1
                 FROM UNNEST($2::text[], $3::bigint[], $4::timestamp[]) AS v(image_id, size, at)
                 ON CONFLICT (image_id, node_reference_id) DO NOTHING
                 RETURNING image_id",
                &[&node, &ids, &sizes, &times],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|s| ImageId::new(s).ok())
            .collect())
    }

    fn next_queue_seq(&self, _queue: OnDisk<'_>) -> Result<u64> {
        let node = self.inner.node_id;
        let v: i64 = self.with(|c| {
            c.one(
                "INSERT INTO imgcache_state (node_reference_id, key, value) VALUES ($1, 'queue_seq', 1)
                 ON CONFLICT (node_reference_id, key) DO UPDATE SET value = imgcache_state.value + 1
                 RETURNING value",
                &[&node],
            )
            .map(|r| r.get(0))
        })?;
        u64::try_from(v).map_err(|_| Error::CorruptMetadata {
            path: self.inner.pool.location.clone().into(),
            detail: format!("queue counter is negative ({v})"),
        })
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush_hits()
    }

    fn extensions(&self) -> Extensions<'_> {
        Extensions::default()
            .with_fleet(self)
            .with_invalid_reasons(self)
            .with_watermarks(self)
            .with_max_id_len(self.inner.max_id)
    }
}

impl Fleet for CentralizedDbDriver {
    fn node(&self) -> &str {
        &self.inner.node_url
    }

    fn nodes_holding(&self, id: &ImageId) -> Result<Vec<String>> {
        let rows = self.with(|c| {
            c.rows(
                "SELECT n.node_reference_url FROM cached_images c
                 JOIN node_reference n ON n.node_reference_id = c.node_reference_id
                 WHERE c.image_id = $1 ORDER BY 1",
                &[&id.as_str()],
            )
        })?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn all_nodes(&self) -> Result<Vec<NodeImage>> {
        self.inner.flush_or_warn();
        let rows = self.with(|c| {
            c.rows(
                &format!(
                    "SELECT {COLUMNS}, n.node_reference_url FROM {ENTRIES}
                     JOIN node_reference n ON n.node_reference_id = c.node_reference_id
                     ORDER BY n.node_reference_url, c.image_id"
                ),
                &[],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let image = decode(r).ok()?;
                Some(NodeImage {
                    node: r.get(7),
                    image,
                })
            })
            .collect())
    }

    fn import(&self, entries: &[CachedImageInfo]) -> Result<Vec<ImageId>> {
        // Glance's migration: insert this node's rows that the database
        // lacks, then report every id the database now has for this node
        // (imported now or before), for the caller to delete locally. One
        // transaction, under a per-node lock: several processes of a node
        // migrating at once insert each row once.
        let node = self.inner.node_id;
        let entries: Vec<&CachedImageInfo> = entries.iter().filter(|e| self.fits(e)).collect();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let sizes: Vec<i64> = entries
            .iter()
            .map(|e| i64::try_from(e.size).unwrap_or(i64::MAX))
            .collect();
        let hits: Vec<i32> = entries
            .iter()
            .map(|e| i32::try_from(e.hits).unwrap_or(i32::MAX))
            .collect();
        let accessed: Vec<SystemTime> = entries.iter().map(|e| e.last_accessed).collect();
        let modified: Vec<SystemTime> = entries.iter().map(|e| e.last_modified).collect();
        let checksums: Vec<Option<&str>> = entries
            .iter()
            .map(|e| glance_checksum(&e.checksum))
            .collect();
        let crcs: Vec<Option<i64>> = entries.iter().map(|e| e.crc32.map(i64::from)).collect();
        let long: Vec<Option<&str>> = entries.iter().map(|e| long_checksum(&e.checksum)).collect();
        let present = self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&(SCHEMA_LOCK as i32), &(node as i32)])?;
            tx.execute(
                "WITH v AS (
                   SELECT * FROM UNNEST($2::text[], $3::bigint[], $4::int[], $5::timestamp[],
                                        $6::timestamp[], $7::text[], $8::bigint[], $9::text[])
                     AS v(image_id, size, hits, accessed, modified, checksum, crc32, long)),
                 c AS (
                   INSERT INTO cached_images
                   (image_id, size, hits, last_accessed, last_modified, checksum, node_reference_id)
                   SELECT v.image_id, v.size, v.hits, v.accessed, v.modified, v.checksum, $1 FROM v
                   ON CONFLICT (image_id, node_reference_id) DO NOTHING
                   RETURNING id, image_id)
                 INSERT INTO imgcache_entries (cached_image_id, crc32, checksum)
                 SELECT c.id, v.crc32, v.long FROM c JOIN v ON v.image_id = c.image_id
                 WHERE v.crc32 IS NOT NULL OR v.long IS NOT NULL
                 ON CONFLICT (cached_image_id) DO NOTHING",
                &[&node, &ids, &sizes, &hits, &accessed, &modified, &checksums, &crcs, &long],
            )?;
            let rows = tx.query(
                "SELECT image_id FROM cached_images WHERE node_reference_id = $1 AND image_id = ANY($2)",
                &[&node, &ids],
            )?;
            tx.commit()?;
            Ok(rows)
        })?;
        Ok(present
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|s| ImageId::new(s).ok())
            .collect())
    }

    fn join_peers(&self) -> Result<()> {
        let node = self.inner.node_id;
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO imgcache_state (node_reference_id, key, value)
                 VALUES ($1, 'peer_fill', 1)
                 ON CONFLICT (node_reference_id, key) DO UPDATE SET value = 1",
                &[&node],
            )?;
            tx.execute(
                "DELETE FROM imgcache_fills WHERE node_reference_id = $1",
                &[&node],
            )?;
            tx.commit()
        })
    }

    fn sources(&self, id: &ImageId) -> Result<Vec<PeerSource>> {
        // Only nodes that serve peers: a Glance node's rows are Glance's.
        let rows = self.with(|c| {
            c.rows(
                "SELECT n.node_reference_url, c.size, COALESCE(e.checksum, c.checksum),
                        false, false, e.crc32
                 FROM cached_images c
                 LEFT JOIN imgcache_entries e ON e.cached_image_id = c.id
                 JOIN node_reference n ON n.node_reference_id = c.node_reference_id
                 JOIN imgcache_state p ON p.node_reference_id = c.node_reference_id
                      AND p.key = 'peer_fill' AND p.value = 1
                 WHERE c.image_id = $1
                 UNION ALL
                 SELECT n.node_reference_url, f.size, f.checksum, true, f.leads, NULL
                 FROM imgcache_fills f
                 JOIN node_reference n ON n.node_reference_id = f.node_reference_id
                 WHERE f.image_id = $1
                 ORDER BY 4, 1",
                &[&id.as_str()],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                let size: Option<i64> = r.get(1);
                let size = size.and_then(|s| u64::try_from(s).ok());
                if r.get(3) {
                    PeerSource::filler(r.get(0), size, r.get(2), r.get(4))
                } else {
                    let crc: Option<i64> = r.get(5);
                    PeerSource::holder(r.get(0), size, r.get(2))
                        .with_crc32(crc.and_then(|c| u32::try_from(c).ok()))
                }
            })
            .collect())
    }

    fn claim_fill(&self, id: &ImageId) -> Result<Option<FillClaim>> {
        // A session-level advisory lock, on one session of this store's
        // that holds every claim of this node: the server releases them
        // when the session ends, so a holder that dies (its socket closed
        // by its kernel) loses them at once. Keyed by a hash of the id;
        // two ids that share a key only make one of them wait for the
        // other, then go to the origin.
        let key = fill_lock_key(id);
        let pool = &self.inner.pool;
        let mut claims = self.inner.claims.lock();
        let (session, generation) = &mut *claims;
        if session.as_ref().is_none_or(|c| c.is_closed()) {
            *session = Some(
                pool.config
                    .connect(postgres::NoTls)
                    .map_err(|e| pool.error(e))?,
            );
            *generation += 1;
        }
        let client = session.as_mut().expect("a session");
        let taken: bool = match client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]) {
            Ok(row) => row.get(0),
            Err(e) => {
                // The session is suspect: the next claim opens another
                // (and the claims it held died with it).
                *session = None;
                return Err(pool.error(e));
            }
        };
        Ok(taken.then(|| {
            FillClaim::new(Claim {
                inner: self.inner.0.clone(),
                key,
                generation: *generation,
            })
        }))
    }

    fn announce_fill(&self, id: &ImageId, fill: u64, at: &Announced<'_>) -> Result<()> {
        let node = self.inner.node_id;
        let size = at.size.and_then(|s| i64::try_from(s).ok());
        let token = fill as i64;
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_fills
                     (node_reference_id, image_id, size, checksum, leads, fill_token)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (node_reference_id, image_id) DO UPDATE
                 SET size = EXCLUDED.size, checksum = EXCLUDED.checksum,
                     leads = EXCLUDED.leads, fill_token = EXCLUDED.fill_token,
                     started_at = now() AT TIME ZONE 'utc'",
                &[&node, &id.as_str(), &size, &at.checksum, &at.leads, &token],
            )
        })?;
        Ok(())
    }

    fn withdraw_fill(&self, id: &ImageId, fill: u64) -> Result<()> {
        let node = self.inner.node_id;
        let token = fill as i64;
        self.with(|c| {
            c.exec(
                "DELETE FROM imgcache_fills
                 WHERE node_reference_id = $1 AND image_id = $2 AND fill_token = $3",
                &[&node, &id.as_str(), &token],
            )
        })?;
        Ok(())
    }

    fn forget_source(&self, node: &str, id: &ImageId) -> Result<()> {
        self.with(|c| {
            c.exec(
                "DELETE FROM imgcache_fills f USING node_reference n
                 WHERE n.node_reference_id = f.node_reference_id
                   AND n.node_reference_url = $1 AND f.image_id = $2",
                &[&node, &id.as_str()],
            )
        })?;
        Ok(())
    }
}

impl InvalidReasons for CentralizedDbDriver {
    fn invalidate(&self, why: &Invalidation, _file: OnDisk<'_>) -> Result<()> {
        let node = self.inner.node_id;
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_invalid (node_reference_id, image_id, reason, invalidated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (node_reference_id, image_id) DO UPDATE SET
                 reason = EXCLUDED.reason, invalidated_at = EXCLUDED.invalidated_at",
                &[&node, &why.id.as_str(), &why.reason, &why.at],
            )
        })?;
        Ok(())
    }

    fn invalid_reason(
        &self,
        id: &ImageId,
        _file: OnDisk<'_>,
    ) -> Result<(Option<String>, Option<SystemTime>)> {
        let node = self.inner.node_id;
        let row = self.with(|c| {
            c.opt(
                "SELECT reason, invalidated_at FROM imgcache_invalid
                 WHERE node_reference_id = $1 AND image_id = $2",
                &[&node, &id.as_str()],
            )
        })?;
        Ok(match row {
            Some(r) => (
                r.try_get(0).ok().flatten(),
                r.try_get::<_, Option<SystemTime>>(1)
                    .ok()
                    .flatten()
                    .map(round_trip),
            ),
            None => (None, None),
        })
    }

    fn forget_invalid(&self, ids: &[ImageId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let node = self.inner.node_id;
        let names: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        self.with(|c| {
            c.exec(
                "DELETE FROM imgcache_invalid WHERE node_reference_id = $1 AND image_id = ANY($2)",
                &[&node, &names],
            )
        })?;
        Ok(())
    }
}

impl Watermarks for CentralizedDbDriver {
    fn durable_watermark(&self, _base: OnDisk<'_>) -> Result<Option<Watermark>> {
        let node = self.inner.node_id;
        let rows = self.with(|c| {
            c.rows(
                "SELECT key, value FROM imgcache_state
                 WHERE node_reference_id = $1
                   AND key IN ('watermark_committed', 'watermark_changed')",
                &[&node],
            )
        })?;
        let mut committed = None;
        let mut changed = None;
        for row in rows {
            let key: String = row.get(0);
            let value: i64 = row.get(1);
            match key.as_str() {
                "watermark_committed" => committed = Some(value),
                _ => changed = Some(value),
            }
        }
        Ok(match (committed, changed) {
            (Some(a), Some(b)) => Some(Watermark::from_micros(a, b)),
            _ => None,
        })
    }

    fn record_watermark(&self, mark: Watermark, _base: OnDisk<'_>) -> Result<()> {
        // PostgreSQL's commit is durable: nothing more to sync. Each half
        // only moves forwards: each is a claim of its own.
        let node = self.inner.node_id;
        let (committed, changed) = mark.to_micros();
        self.with(|c| {
            c.exec(
                "INSERT INTO imgcache_state (node_reference_id, key, value)
                 VALUES ($1, 'watermark_committed', $2), ($1, 'watermark_changed', $3)
                 ON CONFLICT (node_reference_id, key)
                 DO UPDATE SET value = GREATEST(imgcache_state.value, excluded.value)",
                &[&node, &committed, &changed],
            )
        })?;
        Ok(())
    }
}

/// One fill claim of this node: released on its claims session, unless
/// that session ended (and the claim with it).
struct Claim {
    inner: std::sync::Arc<super::Inner>,
    key: i64,
    generation: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claims = self.inner.claims.lock();
        let (session, generation) = &mut *claims;
        if *generation != self.generation {
            return;
        }
        if let Some(client) = session.as_mut() {
            if let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&self.key]) {
                tracing::warn!("imgcache: cannot release a fill claim: {e}; closing its session");
                *session = None;
            }
        }
    }
}

/// The advisory lock key of the fleet's claim to fill `id`: the first 60
/// bits of a SHA-256 of the id (a positive `bigint`), the same on every
/// node and build.
fn fill_lock_key(id: &ImageId) -> i64 {
    let mut h = crate::checksum::Hasher::new(crate::checksum::Algorithm::Sha256);
    h.update(b"imgcache-fill\0");
    h.update(id.as_str().as_bytes());
    let digest = h.finish();
    i64::from_str_radix(&digest.hex()[..15], 16).unwrap_or(0)
}
