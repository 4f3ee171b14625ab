//! The prefetch queue: one file per queued image in `queue/`, as Glance
//! keeps it.
//!
//! Glance orders the queue by the files' modification times, which ties
//! for images queued within one timestamp tick. `imgcache` writes a sequence
//! number into each marker file (Glance creates them empty and never reads
//! them), handed out by the metadata store from a counter that every process
//! on the directory shares. Markers without one (written by Glance) sort first, by
//! modification time.

use std::cmp::Ordering;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::time::SystemTime;

use super::layout::{remove_if_exists, Admitted, Layout};
use crate::error::{Error, IoContext, Result};
use crate::id::ImageId;

/// Encodes a queue sequence number as marker file content.
pub(crate) fn encode_seq(seq: u64) -> String {
    format!("{seq}\n")
}

/// Decodes a queue marker file's content (a decimal sequence number and a
/// newline); `None` for anything that is not a sequence
/// number as imgcache writes it (an empty Glance marker, garbage).
pub fn decode_seq(content: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(content).ok()?;
    let s = s.strip_suffix('\n').unwrap_or(s);
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Creates the marker for `id` with sequence number `seq`. `Ok(false)` if it
/// was already queued.
pub(crate) fn add(layout: &Layout, id: Admitted<'_>, seq: u64) -> Result<bool> {
    let path = layout.queued(id);
    let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(Error::io("create", &path, e)),
    };
    file.write_all(encode_seq(seq).as_bytes())
        .ctx("write", &path)?;
    Ok(true)
}

/// Removes the marker for `id`. `Ok(false)` if it was not queued.
pub(crate) fn remove(layout: &Layout, id: Admitted<'_>) -> Result<bool> {
    remove_if_exists(&layout.queued(id))
}

/// Whether `id` is queued.
pub(crate) fn contains(layout: &Layout, id: Admitted<'_>) -> bool {
    layout.queued(id).is_file()
}

/// The queued ids, oldest first.
pub(crate) fn list(layout: &Layout) -> Result<Vec<ImageId>> {
    struct Entry {
        id: ImageId,
        seq: Option<u64>,
        mtime: SystemTime,
    }
    let mut entries = Vec::new();
    for (key, meta) in layout.list(layout.queue_dir())? {
        let path = layout.queued(key.key());
        let seq = match fs::read(&path) {
            Ok(content) => decode_seq(&content),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        entries.push(Entry {
            id: key.into_id(),
            seq,
            mtime,
        });
    }
    entries.sort_by(|a, b| match (a.seq, b.seq) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.id.cmp(&b.id)),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (None, None) => a.mtime.cmp(&b.mtime).then_with(|| a.id.cmp(&b.id)),
    });
    Ok(entries.into_iter().map(|e| e.id).collect())
}

/// Removes every marker; returns how many.
pub(crate) fn clear(layout: &Layout) -> Result<usize> {
    let mut n = 0;
    for (key, _) in layout.list(layout.queue_dir())? {
        if remove(layout, key.key())? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_encoding_round_trips() {
        for n in [0, 1, 42, u64::MAX] {
            assert_eq!(decode_seq(encode_seq(n).as_bytes()), Some(n));
        }
    }

    #[test]
    fn foreign_markers_have_no_seq() {
        for bad in [
            &b""[..],
            b"\n",
            b"abc",
            b"-1",
            b"1 2",
            b"18446744073709551616",
            b"\xff",
            b"+5",
            b" 5",
        ] {
            assert_eq!(decode_seq(bad), None, "{bad:?}");
        }
        assert_eq!(decode_seq(b"7"), Some(7));
    }

    #[test]
    fn glance_markers_sort_first_by_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path(), None);
        l.create().unwrap();
        let (a, b) = (ImageId::new("a").unwrap(), ImageId::new("b").unwrap());
        let (a, b) = (l.admit(&a).unwrap(), l.admit(&b).unwrap());
        assert!(add(&l, b, 2).unwrap());
        assert!(add(&l, a, 3).unwrap());
        assert!(!add(&l, a, 4).unwrap());
        // Two empty markers, as Glance writes them, with explicit times.
        for (name, secs) in [("g2", 200), ("g1", 100)] {
            let f = fs::File::create(l.queue_dir().join(name)).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .unwrap();
        }
        let got: Vec<String> = list(&l).unwrap().iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["g1", "g2", "b", "a"]);
        assert_eq!(clear(&l).unwrap(), 4);
        assert!(list(&l).unwrap().is_empty());
    }
}
