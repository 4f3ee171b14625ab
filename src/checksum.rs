//! [`Checksum`]: what a backend says an image's bytes hash to — Glance's
//! `checksum` (MD5), its `os_hash_value` (SHA-256 or SHA-512), or a CRC-32 —
//! and the hasher that checks it in the same pass as the copy.

use std::fmt;

use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

use crate::error::{Error, Result};

/// The algorithm of a [`Checksum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// MD5: Glance's `checksum` field.
    Md5,
    /// SHA-256: Glance's `os_hash_algo = sha256`.
    Sha256,
    /// SHA-512: Glance's `os_hash_algo = sha512` (its default).
    Sha512,
    /// CRC-32 (IEEE), as the cache records it.
    Crc32,
}

impl Algorithm {
    /// The name Glance uses (`md5`, `sha256`, `sha512`), or `crc32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
            Algorithm::Crc32 => "crc32",
        }
    }

    /// Length of the digest in hex digits.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
            Algorithm::Crc32 => 8,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An expected digest: an algorithm and the lowercase hex of the digest.
///
/// ```
/// use imgcache::checksum::Checksum;
/// let c = Checksum::md5("D41D8CD98F00B204E9800998ECF8427E")?; // MD5 of nothing
/// assert_eq!(c.to_string(), "md5:d41d8cd98f00b204e9800998ecf8427e");
/// assert!(Checksum::sha256("abc").is_err());
/// # Ok::<(), imgcache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checksum {
    algorithm: Algorithm,
    hex: String,
}

impl Checksum {
    /// A checksum of `algorithm` with digest `hex` (case-insensitive).
    pub fn new(algorithm: Algorithm, hex: &str) -> Result<Self> {
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidChecksum {
                input: hex,
                detail: format!("a {algorithm} digest is {} hex digits", algorithm.hex_len()),
            });
        }
        Ok(Checksum { algorithm, hex })
    }

    /// Glance's `checksum`: an MD5 hex digest.
    pub fn md5(hex: &str) -> Result<Self> {
        Self::new(Algorithm::Md5, hex)
    }

    /// A SHA-256 hex digest.
    pub fn sha256(hex: &str) -> Result<Self> {
        Self::new(Algorithm::Sha256, hex)
    }

    /// A SHA-512 hex digest.
    pub fn sha512(hex: &str) -> Result<Self> {
        Self::new(Algorithm::Sha512, hex)
    }

    /// A CRC-32.
    pub fn crc32(crc: u32) -> Self {
        Checksum {
            algorithm: Algorithm::Crc32,
            hex: format!("{crc:08x}"),
        }
    }

    /// Glance's multihash fields: `os_hash_algo` (`sha256`, `sha512`, `md5`)
    /// and `os_hash_value`.
    pub fn os_hash(algo: &str, value: &str) -> Result<Self> {
        let algorithm = match algo.trim().to_ascii_lowercase().as_str() {
            "md5" => Algorithm::Md5,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            "crc32" => Algorithm::Crc32,
            other => {
                return Err(Error::InvalidChecksum {
                    input: other.to_owned(),
                    detail: "unknown os_hash_algo (expected md5, sha256 or sha512)".into(),
                })
            }
        };
        Self::new(algorithm, value)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The digest, lowercase hex.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The checksum as a cache entry records it, in Glance's `checksum`
    /// column: an MD5 as its plain hex digest (what Glance writes), any
    /// other as `algorithm:hex`.
    pub fn stored_form(&self) -> String {
        match self.algorithm {
            Algorithm::Md5 => self.hex.clone(),
            _ => self.to_string(),
        }
    }

    /// Reads back what [`Checksum::stored_form`] wrote: a plain hex digest
    /// as an MD5 (Glance's form), `algorithm:hex` as that algorithm.
    pub fn from_stored_form(stored: &str) -> Result<Self> {
        match stored.split_once(':') {
            Some((algorithm, hex)) => Self::os_hash(algorithm, hex),
            None => Self::md5(stored),
        }
    }

    /// A hasher for this checksum's algorithm.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

/// Computes a digest incrementally.
#[derive(Clone)]
pub struct Hasher(Inner);

#[derive(Clone)]
enum Inner {
    Md5(Md5),
    Sha256(Sha256),
    Sha512(Sha512),
    Crc32(crc32fast::Hasher),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Hasher").field(&self.algorithm()).finish()
    }
}

impl Hasher {
    /// A new hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        Hasher(match algorithm {
            Algorithm::Md5 => Inner::Md5(Md5::new()),
            Algorithm::Sha256 => Inner::Sha256(Sha256::new()),
            Algorithm::Sha512 => Inner::Sha512(Sha512::new()),
            Algorithm::Crc32 => Inner::Crc32(crc32fast::Hasher::new()),
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            Inner::Md5(_) => Algorithm::Md5,
            Inner::Sha256(_) => Algorithm::Sha256,
            Inner::Sha512(_) => Algorithm::Sha512,
            Inner::Crc32(_) => Algorithm::Crc32,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            Inner::Md5(h) => h.update(data),
            Inner::Sha256(h) => h.update(data),
            Inner::Sha512(h) => h.update(data),
            Inner::Crc32(h) => h.update(data),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Checksum {
        let algorithm = self.algorithm();
        let hex = match self.0 {
            Inner::Md5(h) => to_hex(&h.finalize()),
            Inner::Sha256(h) => to_hex(&h.finalize()),
            Inner::Sha512(h) => to_hex(&h.finalize()),
            Inner::Crc32(h) => format!("{:08x}", h.finalize()),
        };
        Checksum { algorithm, hex }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_reads_back() {
        for c in [
            Checksum::md5("d41d8cd98f00b204e9800998ecf8427e").unwrap(),
            Checksum::sha256(&"ab".repeat(32)).unwrap(),
            Checksum::crc32(0xdead_beef),
        ] {
            assert_eq!(Checksum::from_stored_form(&c.stored_form()).unwrap(), c);
        }
        assert!(Checksum::from_stored_form("sha1:00").is_err());
        assert!(Checksum::from_stored_form("not hex").is_err());
    }

    fn digest(a: Algorithm, data: &[u8]) -> String {
        let mut h = Hasher::new(a);
        for chunk in data.chunks(7) {
            h.update(chunk);
        }
        h.finish().hex().to_owned()
    }

    #[test]
    fn known_digests() {
        assert_eq!(
            digest(Algorithm::Md5, b""),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            digest(Algorithm::Md5, b"abc"),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            digest(Algorithm::Sha256, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            digest(Algorithm::Sha512, b"abc"),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
        assert_eq!(digest(Algorithm::Crc32, b"123456789"), "cbf43926");
    }

    #[test]
    fn finished_hasher_matches_expected() {
        let expected =
            Checksum::sha256("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD")
                .unwrap();
        let mut h = expected.hasher();
        h.update(b"abc");
        assert_eq!(h.finish(), expected);
    }

    #[test]
    fn malformed_digests_are_refused() {
        assert!(Checksum::md5("xyz").is_err());
        assert!(Checksum::md5(&"g".repeat(32)).is_err());
        assert!(Checksum::sha512(&"a".repeat(64)).is_err());
        let e = Checksum::os_hash("sha1", "00").unwrap_err().to_string();
        assert!(e.contains("sha1"), "{e}");
        assert_eq!(
            Checksum::os_hash("SHA512", &"A".repeat(128))
                .unwrap()
                .algorithm(),
            Algorithm::Sha512
        );
        assert_eq!(Checksum::crc32(0xcbf43926).to_string(), "crc32:cbf43926");
    }
}
