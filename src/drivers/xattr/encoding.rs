//! The attributes the xattr store keeps (Glance's `user.hits` and
//! `user.error`, imgcache's `user.imgcache.*`), and the encodings of their
//! values. Decoders never panic; they say what was wrong.

use std::time::SystemTime;

use crate::clock::from_epoch_secs;
use crate::entry::Watermark;

/// Glance's hit counter.
pub(crate) const HITS: &str = "user.hits";
/// Glance's failure reason.
pub(crate) const ERROR: &str = "user.error";
/// Last access time.
pub(crate) const ACCESSED: &str = "user.imgcache.accessed";
/// Commit time.
pub(crate) const MODIFIED: &str = "user.imgcache.modified";
/// Commit time, size, CRC-32 and whether a checksum is recorded, in one
/// value ([`encoding::encode_entry`]).
pub(crate) const ENTRY: &str = "user.imgcache.entry";
/// Committed size.
pub(crate) const SIZE: &str = "user.imgcache.size";
/// CRC-32 of the bytes.
pub(crate) const CRC32: &str = "user.imgcache.crc32";
/// Declared checksum.
pub(crate) const CHECKSUM: &str = "user.imgcache.checksum";
/// Time of invalidation.
pub(crate) const INVALIDATED: &str = "user.imgcache.invalidated";
/// Queue counter, on the `queue/` folder.
pub(crate) const QUEUE_SEQ: &str = "user.imgcache.queue_seq";
/// On the base directory: the durability [`Watermark`], as
/// `<committed_before> <changed_before>` in microseconds since the epoch.
pub(crate) const WATERMARK: &str = "user.imgcache.watermark";

/// A decimal count (`user.hits`, `user.imgcache.size`). Glance writes
/// Python's `str(int)`; surrounding whitespace is tolerated.
pub fn decode_u64(v: &[u8]) -> std::result::Result<u64, String> {
    let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))
}

/// Encodes a count.
pub fn encode_u64(n: u64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// Seconds since the epoch, as Rust prints an `f64` (shortest form that
/// reads back to the same value).
pub fn encode_time(t: SystemTime) -> Vec<u8> {
    // Exact decimal microseconds (a float's shortest form is not exact
    // to the microsecond past 2106).
    let (sign, d) = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => ("", d),
        Err(e) => ("-", e.duration()),
    };
    let micros = (d.as_nanos() + 500) / 1000;
    format!("{sign}{}.{:06}", micros / 1_000_000, micros % 1_000_000).into_bytes()
}

/// Decodes [`encode_time`], or any number of seconds as Glance writes
/// them (Python's `str(float)`), to the microsecond.
pub fn decode_time(v: &[u8]) -> std::result::Result<SystemTime, String> {
    let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
    let t = s.trim();
    if let Some(micros) = decimal_micros(t) {
        let d = std::time::Duration::from_micros(micros.unsigned_abs());
        let at = if micros >= 0 {
            std::time::UNIX_EPOCH.checked_add(d)
        } else {
            std::time::UNIX_EPOCH.checked_sub(d)
        };
        return at.ok_or_else(|| format!("{s:?} is not a time"));
    }
    let secs: f64 = t
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    from_epoch_secs(secs).ok_or_else(|| format!("{s:?} is not a time"))
}

/// A plain decimal number of seconds (`-12.5`, `1700000000.123456`) as
/// microseconds, rounded half up, without going through a float; `None`
/// for anything else (exponents, `NaN`) or out of range.
fn decimal_micros(s: &str) -> Option<i64> {
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || int.len() > 15 {
        return None;
    }
    let whole: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let f = frac.as_bytes();
    let mut micros: i64 = 0;
    for i in 0..6 {
        micros = micros * 10 + f.get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    if f.get(6).is_some_and(|d| *d >= b'5') {
        micros += 1;
    }
    let total = whole.checked_mul(1_000_000)?.checked_add(micros)?;
    Some(if negative { -total } else { total })
}

/// What a commit records of an entry, as `user.imgcache.entry` holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Commit time.
    pub modified: SystemTime,
    /// Committed size.
    pub size: u64,
    /// CRC-32 of the bytes, when known.
    pub crc32: Option<u32>,
    /// Whether `user.imgcache.checksum` is set.
    pub has_checksum: bool,
}

/// `<seconds> <size> <crc or -> <c or ->`, the time as [`encode_time`].
pub fn encode_entry(p: &Packed) -> Vec<u8> {
    let mut v = encode_time(p.modified);
    let crc = p.crc32.map_or("-".to_string(), |c| format!("{c:08x}"));
    let c = if p.has_checksum { "c" } else { "-" };
    v.extend_from_slice(format!(" {} {crc} {c}", p.size).as_bytes());
    v
}

/// Decodes [`encode_entry`].
pub fn decode_entry(v: &[u8]) -> std::result::Result<Packed, String> {
    let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
    let bad = || format!("{s:?} is not <time> <size> <crc|-> <c|->");
    let mut parts = s.split(' ');
    let (Some(t), Some(size), Some(crc), Some(c), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad());
    };
    let modified = decode_time(t.as_bytes())?;
    let size = decode_u64(size.as_bytes())?;
    let crc32 = match crc {
        "-" => None,
        c => Some(decode_crc(c.as_bytes())?),
    };
    let has_checksum = match c {
        "c" => true,
        "-" => false,
        _ => return Err(bad()),
    };
    Ok(Packed {
        modified,
        size,
        crc32,
        has_checksum,
    })
}

/// Decodes the durability watermark: two decimal microsecond counts,
/// separated by a space.
pub fn decode_watermark(v: &[u8]) -> std::result::Result<Watermark, String> {
    let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
    let bad = || format!("{s:?} is not two whole numbers of microseconds");
    let (a, b) = s.trim().split_once(' ').ok_or_else(bad)?;
    let a: i64 = a.parse().map_err(|_| bad())?;
    let b: i64 = b.parse().map_err(|_| bad())?;
    if a < 0 || b < 0 {
        return Err(bad());
    }
    Ok(Watermark::from_micros(a, b))
}

/// A CRC-32 as 8 lowercase hex digits (the store writes it within
/// [`ENTRY`]; alone it is an earlier version's attribute, read still).
#[cfg(any(test, feature = "test-utils"))]
pub fn encode_crc(crc: u32) -> Vec<u8> {
    format!("{crc:08x}").into_bytes()
}

/// Decodes [`encode_crc`].
pub fn decode_crc(v: &[u8]) -> std::result::Result<u32, String> {
    let s = std::str::from_utf8(v).map_err(|_| "not UTF-8".to_string())?;
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not 8 hex digits"));
    }
    u32::from_str_radix(s, 16).map_err(|_| format!("{s:?} is not 8 hex digits"))
}
