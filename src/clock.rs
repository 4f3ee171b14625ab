//! Time: an injectable [`Clock`], and the seconds-since-epoch encoding
//! Glance stores.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Where the cache reads the current time: hits, commits, queueing and the
/// stall rule of `clean` all ask it.
///
/// The default is [`SystemClock`]. Tests (yours and ours) use a
/// [`ManualClock`] to move time without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until it is told to move.
///
/// ```
/// use imgcache::clock::{Clock, ManualClock};
/// use std::time::Duration;
/// let clock = ManualClock::at_secs(1_000);
/// let before = clock.now();
/// clock.advance(Duration::from_secs(60));
/// assert_eq!(clock.now().duration_since(before).unwrap(), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock showing `t`.
    pub fn new(t: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(t)))
    }

    /// A clock showing `secs` seconds after the Unix epoch.
    pub fn at_secs(secs: u64) -> Self {
        ManualClock::new(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock();
        *t += d;
    }

    /// Moves the clock backward by `d`, as a wall clock may after an NTP step.
    pub fn rewind(&self, d: Duration) {
        let mut t = self.0.lock();
        *t = t.checked_sub(d).unwrap_or(UNIX_EPOCH);
    }

    /// Sets the clock to `t`.
    pub fn set(&self, t: SystemTime) {
        *self.0.lock() = t;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

/// A time as Glance stores it: seconds since the Unix epoch as an `f64`
/// (Python's `time.time()`). Times before the epoch are negative.
pub(crate) fn to_epoch_secs(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The inverse of [`to_epoch_secs`], to the nearest microsecond. Values
/// that are not finite, or lie beyond what `SystemTime` holds, give `None`.
pub(crate) fn from_epoch_secs(secs: f64) -> Option<SystemTime> {
    if !secs.is_finite() {
        return None;
    }
    let micros = (secs * 1e6).round();
    if micros.abs() >= 9.0e18 {
        return None;
    }
    let d = Duration::from_micros(micros.abs() as u64);
    if micros >= 0.0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
}

/// Rounds `t` to the microsecond: the precision every store keeps exactly
/// (the xattrs and PostgreSQL's `timestamp` hold whole microseconds; an
/// `f64` of seconds, as Glance's SQLite table holds it, is exact to the
/// microsecond until 2106 and within one after). Values the cache reports
/// back then compare equal to what it was given.
pub(crate) fn round_trip(t: SystemTime) -> SystemTime {
    // In whole nanoseconds, not through an f64: a time half-way between two
    // microseconds rounds the same way everywhere (up).
    let (d, after) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    // Whole seconds are whole microseconds: only the fraction rounds (in
    // 64 bits; a hit reads the clock, and a 128-bit division shows).
    let Some(micros) = d
        .as_secs()
        .checked_mul(1_000_000)
        .and_then(|m| m.checked_add(u64::from((d.subsec_nanos() + 500) / 1000)))
    else {
        return t;
    };
    let d = Duration::from_micros(micros);
    let rounded = if after {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    };
    rounded.unwrap_or(t)
}

/// A time as RFC 3339 in UTC, to the microsecond
/// (`2026-12-01T18:52:43.123456Z`). Times before the epoch (a Glance row
/// with a negative time, a file with such an mtime) show as the epoch.
#[cfg(feature = "serde")]
fn rfc3339(t: SystemTime) -> impl fmt::Display {
    humantime::format_rfc3339_micros(t.max(UNIX_EPOCH))
}

/// Serializes a time as [`rfc3339`].
#[cfg(feature = "serde")]
pub(crate) fn serde_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&rfc3339(*t))
}

/// [`serde_time`] for an optional time (`null` when absent).
#[cfg(feature = "serde")]
pub(crate) fn serde_opt_time<S: serde::Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// Serializes a path as text, lossily where it is not UTF-8 (a report is
/// never lost to one odd file name).
#[cfg(feature = "serde")]
pub(crate) fn serde_path<S: serde::Serializer>(
    p: &std::path::Path,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(&p.display())
}

/// Serializes an optional CRC-32 as 8 hex digits, as the xattr store and
/// the CLI write it.
#[cfg(feature = "serde")]
pub(crate) fn serde_crc<S: serde::Serializer>(c: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => s.collect_str(&format_args!("{c:08x}")),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_secs_round_trip() {
        for secs in [0.0, 1.5, 1_732_170_000.25, -3.5, 4_102_444_800.0] {
            let t = from_epoch_secs(secs).unwrap();
            assert_eq!(to_epoch_secs(t), secs);
        }
        let now = SystemTime::now();
        let r = round_trip(now);
        assert_eq!(round_trip(r), r);
        // A whole number of microseconds: what a PostgreSQL timestamp holds.
        assert_eq!(
            r.duration_since(UNIX_EPOCH).unwrap().subsec_nanos() % 1000,
            0
        );
        let diff = match now.duration_since(r) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(diff < Duration::from_micros(1));
    }

    #[test]
    fn bad_epoch_secs_are_none() {
        assert!(from_epoch_secs(f64::NAN).is_none());
        assert!(from_epoch_secs(f64::INFINITY).is_none());
        assert!(from_epoch_secs(1e300).is_none());
    }

    #[test]
    fn manual_clock_moves_both_ways() {
        let c = ManualClock::at_secs(100);
        c.advance(Duration::from_secs(5));
        assert_eq!(to_epoch_secs(c.now()), 105.0);
        c.rewind(Duration::from_secs(10));
        assert_eq!(to_epoch_secs(c.now()), 95.0);
        c.rewind(Duration::from_secs(1000));
        assert_eq!(to_epoch_secs(c.now()), -905.0);
    }
}
