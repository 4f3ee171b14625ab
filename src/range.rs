//! [`ByteRange`]: a validated range of an image's bytes.

use std::fmt;
use std::ops::{Range, RangeInclusive};

use crate::error::{Error, Result};
use crate::id::ImageId;

/// Bytes `start..end` of an image (half-open, as `Range<u64>`).
///
/// Build one from a `Range<u64>`, an inclusive range, or an HTTP `Range`
/// header; [`ByteRange::within`] checks it against an image's size, and
/// every read path of [`crate::CachedImage`] does so before reading: a range
/// outside the image is [`Error::RangeNotSatisfiable`], never a panic or a
/// short read.
///
/// ```
/// use imgcache::ByteRange;
/// assert_eq!(ByteRange::from(10..20).len(), 10);
/// assert_eq!(ByteRange::from(10..=19), ByteRange::from(10..20));
/// assert_eq!(ByteRange::parse_http("bytes=-5", 100).unwrap(), ByteRange::from(95..100));
/// assert_eq!(ByteRange::parse_http("bytes=90-", 100).unwrap(), ByteRange::from(90..100));
/// assert!(ByteRange::parse_http("bytes=100-", 100).is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// The whole of an image of `size` bytes.
    pub fn full(size: u64) -> Self {
        ByteRange {
            start: 0,
            end: size,
        }
    }

    /// Bytes in the range (0 if `end <= start`).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the range lies within an image of `size` bytes
    /// (`start <= end <= size`).
    pub fn within(self, id: &ImageId, size: u64) -> Result<Self> {
        if self.start <= self.end && self.end <= size {
            Ok(self)
        } else {
            Err(Error::RangeNotSatisfiable {
                id: id.clone(),
                start: self.start,
                end: self.end,
                size,
            })
        }
    }

    /// Parses a single-range HTTP `Range` header value (`bytes=a-b`,
    /// `bytes=a-`, `bytes=-n`) for an image of `size` bytes; `None` if it is
    /// malformed, has several ranges, or is not satisfiable (HTTP 416). A
    /// last byte past the end is clamped, as HTTP says.
    pub fn parse_http(header: &str, size: u64) -> Option<Self> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let num = |s: &str| -> Option<u64> {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let range = match (first.trim().is_empty(), last.trim().is_empty()) {
            (true, false) => {
                let n = num(last)?;
                if n == 0 {
                    return None;
                }
                ByteRange {
                    start: size.saturating_sub(n),
                    end: size,
                }
            }
            (false, true) => ByteRange {
                start: num(first)?,
                end: size,
            },
            (false, false) => {
                let (a, b) = (num(first)?, num(last)?);
                if b < a {
                    return None;
                }
                ByteRange {
                    start: a,
                    end: b.saturating_add(1).min(size),
                }
            }
            (true, true) => return None,
        };
        (range.start < size).then_some(range)
    }
}

impl From<Range<u64>> for ByteRange {
    fn from(r: Range<u64>) -> Self {
        ByteRange {
            start: r.start,
            end: r.end,
        }
    }
}

impl From<RangeInclusive<u64>> for ByteRange {
    fn from(r: RangeInclusive<u64>) -> Self {
        ByteRange {
            start: *r.start(),
            end: r.end().saturating_add(1),
        }
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// What a `Content-Range: bytes a-b/total` answer says (`total` may be
/// `*`): the first byte `a` and the total, if given. `None` when it is
/// malformed, or inconsistent (`a > b`, `b >= total`).
#[cfg(any(feature = "serve", test))]
pub(crate) fn content_range_start(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes ")?.trim_start();
    let (range, total) = spec.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let digits = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (first, last) = (digits(first)?, digits(last)?);
    let total = match total.trim() {
        "*" => None,
        t => Some(digits(t)?),
    };
    if first > last || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_or_are_refused() {
        assert_eq!(
            content_range_start("bytes 10-99/100"),
            Some((10, Some(100)))
        );
        assert_eq!(content_range_start("bytes 0-0/*"), Some((0, None)));
        for bad in [
            "bytes 10-9/100",
            "bytes 10-100/100",
            "bytes -5/100",
            "bytes 1-2",
            "items 1-2/3",
            "bytes +1-2/3",
            "bytes 1-2/x",
            "bytes 99999999999999999999-1/2",
            "",
        ] {
            assert_eq!(content_range_start(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn within_checks_bounds() {
        let id = ImageId::new("x").unwrap();
        assert!(ByteRange::from(0..10).within(&id, 10).is_ok());
        assert!(ByteRange::from(10..10).within(&id, 10).is_ok());
        assert!(ByteRange::from(5..11).within(&id, 10).is_err());
        assert!(ByteRange { start: 7, end: 3 }.within(&id, 10).is_err());
        let e = ByteRange::from(5..11)
            .within(&id, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5..11") && e.contains("10 bytes"), "{e}");
    }

    #[test]
    fn http_ranges() {
        let p = |h| ByteRange::parse_http(h, 100);
        assert_eq!(p("bytes=0-99"), Some(ByteRange::from(0..100)));
        assert_eq!(p("bytes=0-0"), Some(ByteRange::from(0..1)));
        assert_eq!(p("bytes=50-500"), Some(ByteRange::from(50..100)));
        assert_eq!(p("bytes=-1000"), Some(ByteRange::from(0..100)));
        for bad in [
            "bytes=100-",
            "bytes=5-4",
            "bytes=-0",
            "bytes=-",
            "bytes=a-b",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=+1-2",
            "",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
        assert_eq!(ByteRange::parse_http("bytes=0-", 0), None);
        assert_eq!(ByteRange::from(3..=u64::MAX).end, u64::MAX);
    }
}
