//! The recovery walk: reconciles the store with the files when a cache is
//! opened. Written once for every store; the store only reports what it
//! holds ([`crate::CacheDriver::scan`]) and records what the walk decides.

use std::collections::{BTreeMap, BTreeSet};

use super::ImageCache;
use crate::clock::round_trip;
use crate::entry::{CachedImageInfo, OnDisk, Scanned};
use crate::error::Result;
use crate::files::Admitted;
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
}

impl RecoveryReport {
    /// Whether recovery found nothing to mend.
    pub fn is_clean(&self) -> bool {
        self.dropped.is_empty() && self.adopted.is_empty() && self.quarantined.is_empty()
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
    pub(crate) fn recover(&self) -> Result<RecoveryReport> {
        let layout = &self.layout;
        let mut report = RecoveryReport::default();
        let scanned = self.store.scan(layout)?;
        let files: BTreeMap<ImageId, std::fs::Metadata> =
            layout.list(layout.base())?.into_iter().collect();
        let mut known = BTreeSet::new();
        let mut dropped = Vec::new();
        for entry in scanned {
            match entry {
                Scanned::Entry(info) => {
                    if !files.contains_key(&info.id) {
                        dropped.push(info.id.clone());
                    }
                    known.insert(info.id);
                }
                Scanned::Corrupt { id, detail } => {
                    // Only an id the layout listed can name a file: any other
                    // (one of the cache's own names) loses its entry only.
                    if files.contains_key(&id) {
                        let key = Admitted::again(&id);
                        if self.quarantine(key, &format!("corrupt metadata: {detail}"))? {
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
        let orphans: Vec<(ImageId, std::path::PathBuf, std::fs::Metadata)> = files
            .into_iter()
            .filter(|(id, _)| !known.contains(id))
            .map(|(id, meta)| {
                let path = layout.cached(Admitted::again(&id));
                (id, path, meta)
            })
            .collect();
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
        report.adopted = self.store.adopt(&entries)?;
        report.stalled = layout.stalled()?;
        Ok(report)
    }
}
