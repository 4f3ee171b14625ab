//! Entries held in memory: the rows of commits made with group durability,
//! written in one transaction with the batched hits instead of one
//! transaction (and, in Glance's journal mode, two `fsync`s) per commit.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::entry::{CachedImageInfo, OnDisk};
use crate::id::ImageId;

/// How long hits served from a file whose row is not there yet are kept,
/// to be written once it is: longer than another process holds an entry.
pub(super) const WAIT_FOR_ROW: Duration = Duration::from_secs(10);

/// Held entries that make a batch due: the writer thread writes them.
pub(super) const ROW_BATCH: usize = 1024;

/// How long an entry may be held before the writer thread writes it, when
/// no checkpoint came first (each one flushes): what another process may
/// wait to see it listed.
pub(super) const ROW_DELAY: Duration = Duration::from_millis(500);

/// One held entry, and the file it names.
#[derive(Debug, Clone)]
pub(super) struct HeldRow {
    pub(super) entry: CachedImageInfo,
    /// The file in place when the entry was held.
    path: PathBuf,
    file: Identity,
}

/// What tells the file committed from another put at the same path
/// since: its inode, and when it was made (a file system reuses inode
/// numbers at once; where it keeps no birth time, the inode alone).
/// Neither changes with a rename. Not its size or times: bytes changed in
/// place are for the scrub to find, against the entry.
type Identity = (u64, u64, Option<std::time::SystemTime>);

fn identity(m: &std::fs::Metadata) -> Identity {
    (m.dev(), m.ino(), m.created().ok())
}

impl HeldRow {
    /// Whether the file in place is still the one committed: a row is
    /// never written for a file that was removed, or replaced, since.
    pub(super) fn still_in_place(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| identity(&m) == self.file)
    }
}

/// The entries held, by id (a later commit of an id replaces the earlier).
#[derive(Debug)]
pub(super) struct HeldRows {
    pub(super) by_id: HashMap<ImageId, HeldRow>,
    oldest: Option<Instant>,
    /// How long the oldest may wait for the writer thread ([`ROW_DELAY`]).
    delay: Duration,
}

impl Default for HeldRows {
    fn default() -> Self {
        HeldRows {
            by_id: HashMap::new(),
            oldest: None,
            delay: ROW_DELAY,
        }
    }
}

impl HeldRows {
    /// Holds `entry`, whose file in place is `file` (as the committer
    /// opened it: the same inode as renamed); returns whether the batch is
    /// due (full).
    pub(super) fn hold(&mut self, entry: &CachedImageInfo, file: OnDisk<'_>) -> bool {
        self.by_id.insert(
            entry.id.clone(),
            HeldRow {
                entry: entry.clone(),
                path: file.path().to_path_buf(),
                file: identity(file.metadata()),
            },
        );
        self.oldest.get_or_insert_with(Instant::now);
        self.by_id.len() >= ROW_BATCH
    }

    /// The entry held for `id`, if `file` is the file it was held for; a
    /// held entry of a file since replaced (another process deleted and
    /// committed the image again) is dropped: the row, if any, tells.
    pub(super) fn get(&mut self, id: &ImageId, file: OnDisk<'_>) -> Option<&CachedImageInfo> {
        let same = self.by_id.get(id)?.file == identity(file.metadata());
        if !same {
            self.forget(id);
            return None;
        }
        self.by_id.get(id).map(|h| &h.entry)
    }

    pub(super) fn get_mut(&mut self, id: &ImageId) -> Option<&mut CachedImageInfo> {
        self.by_id.get_mut(id).map(|h| &mut h.entry)
    }

    /// Drops the held entry of `id`; whether there was one.
    pub(super) fn forget(&mut self, id: &ImageId) -> bool {
        let had = self.by_id.remove(id).is_some();
        if self.by_id.is_empty() {
            self.oldest = None;
        }
        had
    }

    /// The bytes of the entries held.
    pub(super) fn size(&self) -> u64 {
        self.by_id.values().map(|h| h.entry.size).sum()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether the writer thread should write them now.
    pub(super) fn due(&self) -> bool {
        self.by_id.len() >= ROW_BATCH || self.oldest.is_some_and(|t| t.elapsed() >= self.delay)
    }

    /// Takes every entry held, to be written.
    pub(super) fn take(&mut self) -> HeldRows {
        HeldRows {
            by_id: std::mem::take(&mut self.by_id),
            oldest: self.oldest.take(),
            delay: self.delay,
        }
    }

    /// Tests: entries wait for a flush, not for the writer thread's time.
    #[cfg(test)]
    pub(super) fn hold_until_flushed(&mut self) {
        self.delay = Duration::MAX;
    }

    /// Puts back a batch whose write failed; an entry held meanwhile for
    /// the same id is the later one and stays.
    pub(super) fn restore(&mut self, batch: HeldRows) {
        for (id, row) in batch.by_id {
            self.by_id.entry(id).or_insert(row);
        }
        if !self.by_id.is_empty() {
            self.oldest.get_or_insert_with(Instant::now);
        }
    }
}
