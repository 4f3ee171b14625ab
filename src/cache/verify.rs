//! Verification: an entry's bytes read whole and checked against the size
//! and CRC-32 they were committed with ([`ImageCache::verify`],
//! [`ImageCache::scrub`]), and quarantine, which moves a file that failed
//! to `invalid/` with the reason.

use std::io::{self, Read};

use super::ImageCache;
use crate::drivers::StoreExt;
use crate::entry::{Invalidation, OnDisk};
use crate::error::{Error, Result};
use crate::files::Admitted;
use crate::id::ImageId;

/// What [`ImageCache::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum Verification {
    /// Size and CRC-32 match what was committed.
    Intact,
    /// The entry has no recorded CRC (adopted, or written by Glance); this
    /// is the CRC of its bytes now.
    Unverified {
        /// CRC-32 of the file as read.
        crc32: u32,
    },
    /// The file is not what was committed.
    Corrupt {
        /// What differs.
        detail: String,
    },
}

/// What [`ImageCache::scrub`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ScrubReport {
    /// Entries whose size and CRC matched.
    pub intact: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Entries that had no CRC and now have one recorded.
    pub newly_verified: Vec<ImageId>,
    /// Entries that did not match, moved to `invalid/`, with the reason
    /// (serialized as `{"id": …, "reason": …}`).
    #[cfg_attr(feature = "serde", serde(serialize_with = "serde_corrupt"))]
    pub corrupt: Vec<(ImageId, String)>,
}

#[cfg(feature = "serde")]
fn serde_corrupt<S: serde::Serializer>(v: &[(ImageId, String)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    #[derive(serde::Serialize)]
    struct Corrupt<'a> {
        id: &'a ImageId,
        reason: &'a str,
    }
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for (id, reason) in v {
        seq.serialize_element(&Corrupt { id, reason })?;
    }
    seq.end()
}

/// A cached file as [`ImageCache::verify`] read it: open, with its path and
/// metadata.
type Verified = (std::fs::File, std::path::PathBuf, std::fs::Metadata);

impl ImageCache {
    /// Moves cached image `id` to `invalid/` with `reason` recorded, and
    /// drops its entry; `false` if its file was not there (its entry goes
    /// all the same).
    pub(crate) fn quarantine(&self, key: Admitted<'_>, reason: &str) -> Result<bool> {
        if self.options.is_read_only() {
            tracing::warn!(
                "imgcache: {}: {reason} (left in place: opened read-only)",
                key.id()
            );
            return Ok(false);
        }
        let ids = std::slice::from_ref(key.id());
        let Some((file, _, meta)) = self.layout.open_cached(key)? else {
            self.store.remove(ids, &|_| true)?;
            return Ok(false);
        };
        // Files first: the move, then the reason (on the moved file), then
        // the entry. A crash between leaves an entry without a file, which
        // the recovery walk drops.
        let moved = self.layout.quarantine(key)?;
        if moved {
            // Durable at once, whatever the mode: a torn file that came
            // back after a power cut would be served.
            self.layout.sync_base()?;
            let why = Invalidation::new(key.id().clone(), meta.len(), reason, self.now());
            let path = self.layout.invalid(key);
            if let Err(e) = self
                .store
                .invalidate(&why, OnDisk::new(&path, Some(&file), &meta))
            {
                tracing::warn!("imgcache: cannot record why {key} was quarantined: {e}");
            }
            tracing::error!("imgcache: quarantined {key}: {reason}");
        }
        drop(file);
        self.store.remove(ids, &|_| true)?;
        Ok(moved)
    }

    /// Reads cached image `id` whole and checks its size and CRC-32 against
    /// what was committed, without counting a hit; `None` if it is not
    /// cached. Reads through a 1 MiB buffer; costs one full read of the file.
    pub fn verify(&self, id: &ImageId) -> Result<Option<Verification>> {
        let key = self.layout.admit(id)?;
        Ok(self.verify_key(key)?.map(|(v, _)| v))
    }

    /// [`ImageCache::verify`], and a corrupt file moved to `invalid/` with
    /// what differs (its entry dropped), as a scrub does for one image:
    /// for a server about to hand the file to someone who cannot tell.
    pub fn verify_or_quarantine(&self, id: &ImageId) -> Result<Option<Verification>> {
        let key = self.layout.admit(id)?;
        let verdict = self.verify_key(key)?.map(|(v, _)| v);
        if let Some(Verification::Corrupt { detail }) = &verdict {
            self.quarantine(key, detail)?;
        }
        Ok(verdict)
    }

    /// [`ImageCache::verify`], keeping the file it read (so that a scrub
    /// records the CRC on the inode it checked).
    pub(super) fn verify_key(&self, key: Admitted<'_>) -> Result<Option<(Verification, Verified)>> {
        let Some((mut file, path, meta)) = self.layout.open_cached(key)? else {
            return Ok(None);
        };
        let Some(info) = self
            .store
            .get(key.id(), OnDisk::new(&path, Some(&file), &meta))?
        else {
            return Ok(None);
        };
        let len = meta.len();
        let verdict = if len != info.size {
            Verification::Corrupt {
                detail: format!("{len} bytes on disk, {} were committed", info.size),
            }
        } else {
            let mut crc = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read", &path, e)),
                };
                crc.update(&buf[..n]);
            }
            let crc = crc.finalize();
            match info.crc32 {
                Some(c) if c == crc => Verification::Intact,
                Some(c) => Verification::Corrupt {
                    detail: format!("CRC-32 is {crc:08x}, {c:08x} was committed"),
                },
                None => Verification::Unverified { crc32: crc },
            }
        };
        Ok(Some((verdict, (file, path, meta))))
    }

    /// Verifies every cached image: corrupt ones are moved to `invalid/`
    /// with the reason, unverified ones get their CRC recorded. Reads every
    /// cached byte once.
    pub fn scrub(&self) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        for info in self.cached_images()? {
            let Ok(key) = self.layout.admit(&info.id) else {
                continue;
            };
            match self.verify_key(key)? {
                None => {}
                Some((Verification::Intact, _)) => {
                    report.intact += 1;
                    report.bytes += info.size;
                }
                Some((Verification::Unverified { crc32 }, (file, path, meta))) => {
                    let on = OnDisk::new(&path, Some(&file), &meta);
                    self.store.set_crc32(&info.id, crc32, on)?;
                    // A descriptor kept with the entry as it was goes: the
                    // next hit returns the CRC-32.
                    self.layout.open_files().forget(&info.id);
                    report.bytes += info.size;
                    report.newly_verified.push(info.id);
                }
                Some((Verification::Corrupt { detail }, _)) => {
                    self.quarantine(key, &detail)?;
                    report.corrupt.push((info.id, detail));
                }
            }
        }
        Ok(report)
    }
}
