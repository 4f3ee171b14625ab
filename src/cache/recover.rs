//! The recovery walk: reconciles the store with the files when a cache is
//! opened. Written once for every store; the store only reports what it
//! holds ([`crate::drivers::CacheDriver::scan`]) and records what the walk decides.

use std::collections::{BTreeMap, BTreeSet};

use super::durability::{content_time_of, ctime_of};
use super::ImageCache;
use super::Verification;
use crate::clock::round_trip;
use crate::drivers::StoreExt;
use crate::entry::{CachedImageInfo, OnDisk, Scanned, Watermark};
use crate::error::Result;
use crate::files::AdmittedId;
use crate::id::ImageId;

/// What the recovery walk found when the cache was opened, and what it did
/// about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Entries whose file is gone: dropped.
    pub dropped: Vec<ImageId>,
    /// Files in the base directory without an entry (a crash between rename
    /// and the store's insert, or a file another tool put there): adopted
    /// with their real size and no CRC, unverified until scrubbed.
    pub adopted: Vec<ImageId>,
    /// Entries whose metadata could not be decoded: moved to `invalid/`.
    pub quarantined: Vec<ImageId>,
    /// Incomplete files whose writer is gone (no process holds their lock):
    /// stalled, for `clean` to remove.
    pub stalled: Vec<ImageId>,
    /// Entries committed at or after the durability watermark (not yet
    /// covered by a checkpoint: a crash, or another process still running),
    /// read whole and found intact.
    pub verified: Vec<ImageId>,
    /// What an unclean shutdown left torn, moved to `invalid/` before
    /// anything was served: entries after the watermark whose size or
    /// CRC-32 is not what was committed, and, after an unclean shutdown,
    /// files without metadata renamed into place after the watermark and
    /// entries without a CRC-32 committed or rewritten after it (nothing to
    /// check them against).
    pub torn: Vec<ImageId>,
    /// Whether the last session of processes on this cache ended uncleanly
    /// (one never closed: a crash or a power cut). Only then are files
    /// without metadata renamed in after the watermark taken for torn.
    pub unclean_shutdown: bool,
    /// The durability watermark found at open; `None` if the store records
    /// none, or none was ever recorded.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub watermark: Option<Watermark>,
}

impl RecoveryReport {
    /// Whether recovery found nothing to mend.
    pub fn is_clean(&self) -> bool {
        self.dropped.is_empty()
            && self.adopted.is_empty()
            && self.quarantined.is_empty()
            && self.torn.is_empty()
    }
}

impl ImageCache {
    /// Reconciles the store with the files: drops entries whose file is
    /// gone, adopts files without an entry (unverified), quarantines
    /// entries whose metadata cannot be decoded, and reports stalled
    /// incomplete files.
    ///
    /// Entries first, files second: a commit renames its file before the
    /// store records it, so an entry seen here has a file unless someone
    /// deleted it since (and then dropping the entry is what they meant).
    pub(crate) fn recover(&self, unclean: bool) -> Result<RecoveryReport> {
        let layout = &self.layout;
        let mut report = RecoveryReport {
            unclean_shutdown: unclean,
            ..RecoveryReport::default()
        };
        if self.durable.keeps_watermark() {
            report.watermark = self.durable.watermark()?;
        }
        // After an unclean shutdown, with no watermark to go by (a store
        // recreated, a database moved aside), nothing is trusted unchecked.
        let epoch = Watermark {
            committed_before: std::time::UNIX_EPOCH,
            changed_before: std::time::UNIX_EPOCH,
        };
        let mark = report.watermark.or(unclean.then_some(epoch));
        // Files changed after the watermark are suspect only after an
        // unclean shutdown, and one the machine went down in: after process
        // crashes alone (the session's mark names this boot) the page cache
        // kept every byte, and a file renamed in is whole; after a clean
        // shutdown they are another tool's.
        let survived = self.durable.session().crashed_in_this_boot();
        let suspect_after = mark
            .filter(|_| unclean && !survived)
            .map(|w| w.changed_before);
        let mut untrusted = Vec::new();
        let scanned = self.store.scan(layout)?;
        // The files as the layout listed them: their ids admitted.
        let files: BTreeMap<AdmittedId, std::fs::Metadata> =
            layout.list(layout.base())?.into_iter().collect();
        let listed = |id: &ImageId| files.get_key_value(id).map(|(k, _)| k.clone());
        let mut known = BTreeSet::new();
        let mut dropped = Vec::new();
        for entry in scanned {
            match entry {
                Scanned::Entry(info) => {
                    if !files.contains_key(&info.id) {
                        dropped.push(info.id.clone());
                    } else if let Some(w) = mark {
                        // Committed after the checkpoint; or, after an
                        // unclean shutdown, its file changed after it (a row
                        // rolled back to an older commit of the same image,
                        // renamed in since; a CRC recorded by a scrub of
                        // unsynced bytes). The change time: a write stamps
                        // the modification time when it starts. Being read
                        // whole costs only the read (an entry with a CRC is
                        // quarantined only if it does not match); see below
                        // for one without.
                        let changed = files.get(&info.id).map(ctime_of);
                        if info.last_modified >= w.committed_before
                            || (suspect_after.is_some()
                                && changed.is_some_and(|c| c >= w.changed_before))
                        {
                            if let Some(key) = listed(&info.id) {
                                untrusted.push((key, info.last_modified));
                            }
                        }
                    }
                    known.insert(info.id);
                }
                Scanned::Corrupt { id, detail } => {
                    // Only an id the layout listed can name a file: any other
                    // (one of the cache's own names) loses its entry only.
                    if let Some(key) = listed(&id) {
                        if self.quarantine(key.key(), &format!("corrupt metadata: {detail}"))? {
                            report.quarantined.push(id.clone());
                        }
                    } else {
                        dropped.push(id.clone());
                    }
                    known.insert(id);
                }
            }
        }
        // A commit landing meanwhile (rename, then insert) is not dropped:
        // the store re-checks each file where it excludes inserts.
        let in_place = |id: &ImageId| match layout.admit(id) {
            Ok(key) => layout.cached(key).exists(),
            Err(_) => false,
        };
        self.store
            .remove_if_missing(&dropped, &|id| !in_place(id))?;
        report.dropped = dropped;
        let changed_before = suspect_after;
        // Entries a checkpoint does not cover yet: read whole before
        // anything is served.
        for (admitted, committed) in untrusted {
            let key = admitted.key();
            let id = admitted.id().clone();
            match self.verify_key(key)? {
                Some((Verification::Intact, _)) => report.verified.push(id),
                Some((Verification::Corrupt { detail }, _)) => {
                    self.quarantine(
                        key,
                        &format!("torn by an unclean shutdown (committed after the last checkpoint): {detail}"),
                    )?;
                    report.torn.push(id);
                }
                // No CRC to check it against, and committed after the
                // checkpoint (the stamp comes after the last data write) or
                // its bytes changed since (a hit count or access time
                // written on the file is no change of its bytes): as a
                // file without metadata.
                Some((Verification::Unverified { .. }, (_, _, meta)))
                    if changed_before.is_some()
                        && (mark.is_some_and(|w| committed >= w.committed_before)
                            || changed_before.is_some_and(|w| content_time_of(&meta) >= w)) =>
                {
                    let reason = "no CRC-32, and committed or changed after the last checkpoint: \
                                  cannot be verified after an unclean shutdown";
                    if self.quarantine(key, reason)? {
                        report.torn.push(id);
                    }
                }
                Some(_) | None => {}
            }
        }
        let mut orphans: Vec<(ImageId, std::path::PathBuf, std::fs::Metadata)> = Vec::new();
        let others = self.durable.session().others_were_open();
        let now = std::time::SystemTime::now();
        for (admitted, meta) in files.iter().filter(|(id, _)| !known.contains(id.id())) {
            let (key, id) = (admitted.key(), admitted.id().clone());
            let meta = meta.clone();
            if others && written_lately(&meta, now) {
                // Likely another process's commit whose entry it holds, to
                // write with others (`CacheDriver::insert_batched`): left
                // to it (the file is served meanwhile). One still without
                // an entry later is adopted by a later open.
                tracing::debug!("imgcache: {id}: no entry yet, written {HELD_GRACE:?} ago at most");
                continue;
            }
            if changed_before.is_some_and(|w| ctime_of(&meta) >= w) {
                // Renamed into place (or changed) after the last checkpoint,
                // without metadata: its bytes may be torn, and there is
                // nothing to check them against. The change time, not the
                // modification time: a write stamps the latter when it
                // starts, so a write that began before the checkpoint may
                // have landed after it. No hit is ever written on a file
                // without metadata, so nothing else moves it. A committer
                // that recorded its entry (with its CRC) meanwhile keeps it.
                let path = layout.cached(key);
                let recorded = self
                    .store
                    .get(&id, OnDisk::new(&path, None, &meta))?
                    .is_some_and(|info| info.crc32.is_some());
                if !recorded
                    && self.quarantine(
                        key,
                        "no metadata, and renamed into place after the last checkpoint: \
                         cannot be verified after an unclean shutdown",
                    )?
                {
                    report.torn.push(id);
                }
                continue;
            }
            let path = layout.cached(key);
            orphans.push((id, path, meta));
        }
        report.adopted = self.adopt(&orphans)?;
        report.stalled = layout.stalled()?;
        Ok(report)
    }

    /// Records `orphans` (files in place without an entry) unverified: their
    /// real size, no CRC-32; a committer's entry recorded meanwhile stays.
    fn adopt(
        &self,
        orphans: &[(ImageId, std::path::PathBuf, std::fs::Metadata)],
    ) -> Result<Vec<ImageId>> {
        let entries: Vec<(CachedImageInfo, OnDisk<'_>)> = orphans
            .iter()
            .map(|(id, path, meta)| {
                let mtime = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                (
                    CachedImageInfo::new(id.clone(), meta.len(), round_trip(mtime)),
                    OnDisk::new(path, None, meta),
                )
            })
            .collect();
        self.store.adopt(&entries)
    }

    /// Adopts the files in place that have no entry and were last written
    /// 10 s ago or more, as the recovery walk does when a cache is opened:
    /// recorded unverified (their real size, no CRC-32; a scrub checks
    /// them), so that they count in the cache's size and can be evicted.
    /// They are the commits of a process that crashed before it wrote the
    /// entries it held (the SQLite store with group durability), or files
    /// another tool put there; newer ones are left to their committer.
    /// Returns the ids adopted. `imgcache serve`'s cleaner runs it with
    /// every clean; a read-only handle adopts nothing.
    pub fn adopt_unrecorded(&self) -> Result<Vec<ImageId>> {
        if self.options.is_read_only() {
            return Ok(Vec::new());
        }
        let layout = &self.layout;
        // What the store knows, undecodable entries included (those are
        // the next read's to quarantine, not files to adopt).
        let known: BTreeSet<ImageId> = self
            .store
            .scan(layout)?
            .into_iter()
            .map(|s| match s {
                Scanned::Entry(info) => info.id,
                Scanned::Corrupt { id, .. } => id,
            })
            .collect();
        let now = std::time::SystemTime::now();
        let orphans: Vec<(ImageId, std::path::PathBuf, std::fs::Metadata)> = layout
            .list(layout.base())?
            .into_iter()
            .filter(|(id, meta)| !known.contains(id.id()) && !written_lately(meta, now))
            .map(|(admitted, meta)| {
                let path = layout.cached(admitted.key());
                (admitted.into_id(), path, meta)
            })
            .collect();
        let adopted = self.adopt(&orphans)?;
        if !adopted.is_empty() {
            tracing::warn!(
                "imgcache: adopted {} files without metadata in {} (unverified)",
                adopted.len(),
                layout.base().display()
            );
        }
        Ok(adopted)
    }
}

/// How long after its last write a file in place without an entry is left
/// to its committer when other processes have the cache open: they write
/// held entries within a second, or at their next checkpoint.
const HELD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether `meta`'s file was last written within [`HELD_GRACE`] of `now`
/// (its modification time, which the last write of a commit sets). A
/// commit whose rename comes more than that after its last write (a slow
/// `fsync`) may be adopted first: its committer's entry then replaces the
/// adopted one, CRC-32 and all.
fn written_lately(meta: &std::fs::Metadata, now: std::time::SystemTime) -> bool {
    let Ok(modified) = meta.modified() else {
        return false;
    };
    match now.duration_since(modified) {
        Ok(age) => age < HELD_GRACE,
        Err(ahead) => ahead.duration() < HELD_GRACE,
    }
}
