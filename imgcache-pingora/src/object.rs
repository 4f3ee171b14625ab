//! How an object lies in its imgcache file: a prefix with its HTTP
//! metadata and key, then the body. The prefix is written first and the
//! whole file is committed by imgcache's one atomic rename, so a body never
//! exists without its metadata nor the reverse, and a torn object is never
//! served (imgcache serves only committed files whose size matches).
//!
//! ```text
//! "IMGCPG01"  tag: u64  internal: u32  header: u32  key: u32   (all LE)
//! internal bytes | header bytes | key bytes | body
//! ```
//!
//! `internal` and `header` are pingora's own [`CacheMeta::serialize`]
//! blobs; `key` is the readable primary key (for operators); `tag` names
//! this write, so that a metadata update ([`Sidecar`]) is applied only to
//! the body it was made for.
//!
//! A metadata update (a `304` revalidation) would mean rewriting the body:
//! it goes to a small sidecar object instead, `<id>.meta`, holding the
//! body's tag and the new blobs. A sidecar whose tag is not the body's (left
//! from an earlier body) is ignored, and a missing one (pruned, or not
//! written before a crash) means the body's own, older metadata: stale at
//! worst, never wrong.

use pingora_cache::CacheMeta;
use pingora_error::{ErrorType, Result};

/// The prefix's magic.
pub(crate) const MAGIC: &[u8; 8] = b"IMGCPG01";
/// The sidecar's magic.
pub(crate) const SIDECAR_MAGIC: &[u8; 8] = b"IMGCPM01";
/// The fixed part of the prefix: magic, tag, three lengths.
pub(crate) const FIXED: usize = 8 + 8 + 4 * 3;
/// The longest blob taken (a length past it is a damaged prefix).
const MAX_BLOB: u32 = 16 << 20;

/// The fixed part of an object's prefix, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefix {
    pub(crate) tag: u64,
    internal: u32,
    header: u32,
    key: u32,
}

impl Prefix {
    /// Decodes the fixed part; `None` if it is not one.
    pub(crate) fn parse(fixed: &[u8]) -> Option<Prefix> {
        if fixed.len() < FIXED || &fixed[..8] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().unwrap());
        let p = Prefix {
            tag: u64::from_le_bytes(fixed[8..16].try_into().unwrap()),
            internal: u32_at(16),
            header: u32_at(20),
            key: u32_at(24),
        };
        (p.internal <= MAX_BLOB && p.header <= MAX_BLOB && p.key <= MAX_BLOB).then_some(p)
    }

    /// The whole prefix's length: where the body starts.
    pub(crate) fn len(&self) -> u64 {
        FIXED as u64 + u64::from(self.internal) + u64::from(self.header) + u64::from(self.key)
    }

    /// The metadata and the readable key, from the variable part (the
    /// bytes after the fixed part).
    pub(crate) fn decode(&self, rest: &[u8]) -> Result<(CacheMeta, Vec<u8>)> {
        let (i, h, k) = (
            self.internal as usize,
            self.header as usize,
            self.key as usize,
        );
        if rest.len() < i + h + k {
            return Err(pingora_error::Error::explain(
                ErrorType::InternalError,
                "imgcache object: prefix cut short",
            ));
        }
        let meta = CacheMeta::deserialize(&rest[..i], &rest[i..i + h])?;
        Ok((meta, rest[i + h..i + h + k].to_vec()))
    }
}

/// The prefix of a new object: `tag`, `meta` and the readable `key`.
pub(crate) fn encode(tag: u64, meta: &CacheMeta, key: &[u8]) -> Result<Vec<u8>> {
    let (internal, header) = meta.serialize()?;
    let len = |b: &[u8]| -> Result<u32> {
        match u32::try_from(b.len()) {
            Ok(n) if n <= MAX_BLOB => Ok(n),
            _ => pingora_error::Error::e_explain(
                ErrorType::InternalError,
                "imgcache object: metadata too large",
            ),
        }
    };
    let (li, lh) = (len(&internal)?, len(&header)?);
    // A key past the limit is kept cut: it is for people to read.
    let key = &key[..key.len().min(4096)];
    let lk = len(key)?;
    let mut out = Vec::with_capacity(FIXED + internal.len() + header.len() + key.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&li.to_le_bytes());
    out.extend_from_slice(&lh.to_le_bytes());
    out.extend_from_slice(&lk.to_le_bytes());
    out.extend_from_slice(&internal);
    out.extend_from_slice(&header);
    out.extend_from_slice(key);
    Ok(out)
}

/// A metadata update of the body written with `tag`.
pub(crate) struct Sidecar;

impl Sidecar {
    /// The sidecar of `tag`'s body, with `meta`.
    pub(crate) fn encode(tag: u64, meta: &CacheMeta) -> Result<Vec<u8>> {
        let (internal, header) = meta.serialize()?;
        let mut out = Vec::with_capacity(24 + internal.len() + header.len());
        out.extend_from_slice(SIDECAR_MAGIC);
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&(internal.len() as u32).to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&internal);
        out.extend_from_slice(&header);
        Ok(out)
    }

    /// The metadata in `bytes`, if it is a sidecar of `tag`'s body.
    pub(crate) fn decode(bytes: &[u8], tag: u64) -> Option<CacheMeta> {
        if bytes.len() < 24 || &bytes[..8] != SIDECAR_MAGIC {
            return None;
        }
        if u64::from_le_bytes(bytes[8..16].try_into().ok()?) != tag {
            return None;
        }
        let i = u32::from_le_bytes(bytes[16..20].try_into().ok()?) as usize;
        let h = u32::from_le_bytes(bytes[20..24].try_into().ok()?) as usize;
        let rest = &bytes[24..];
        if rest.len() != i.checked_add(h)? {
            return None;
        }
        CacheMeta::deserialize(&rest[..i], &rest[i..]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    fn meta(fresh: u64) -> CacheMeta {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.append_header("content-type", "application/octet-stream")
            .unwrap();
        let now = SystemTime::now();
        CacheMeta::new(now + Duration::from_secs(fresh), now, 0, 0, h)
    }

    #[test]
    fn a_prefix_round_trips() {
        let m = meta(60);
        let p = encode(7, &m, b"example.org/a").unwrap();
        let fixed = Prefix::parse(&p).unwrap();
        assert_eq!(fixed.tag, 7);
        assert_eq!(fixed.len(), p.len() as u64);
        let (back, key) = fixed.decode(&p[FIXED..]).unwrap();
        assert_eq!(key, b"example.org/a");
        assert_eq!(back.fresh_until(), m.fresh_until());
        assert_eq!(back.headers()["content-type"], "application/octet-stream");
    }

    #[test]
    fn damaged_prefixes_are_refused() {
        let p = encode(7, &meta(60), b"k").unwrap();
        assert!(Prefix::parse(&p[..FIXED - 1]).is_none());
        let mut bad = p.clone();
        bad[0] ^= 1;
        assert!(Prefix::parse(&bad).is_none());
        let mut huge = p.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Prefix::parse(&huge).is_none());
        let fixed = Prefix::parse(&p).unwrap();
        assert!(fixed.decode(&p[FIXED..p.len() - 1]).is_err());
    }

    #[test]
    fn a_sidecar_applies_to_its_body_only() {
        let s = Sidecar::encode(9, &meta(120)).unwrap();
        assert!(Sidecar::decode(&s, 9).is_some());
        assert!(Sidecar::decode(&s, 8).is_none());
        assert!(Sidecar::decode(&s[..s.len() - 1], 9).is_none());
    }
}
