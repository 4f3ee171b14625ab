//! Origins: the backends a cache fills from.
//!
//! An [`Origin`] opens an image's bytes by id, and may know their size and
//! expected checksum. [`DirOrigin`] serves files from a directory;
//! [`HttpOrigin`] (feature `http`) fetches from a URL template such as
//! Glance's `http://glance:9292/v2/images/{id}/file`.

use std::fmt;
use std::io::Read;

use crate::checksum::Checksum;
use crate::error::Result;
use crate::id::ImageId;

mod dir;
#[cfg(feature = "http")]
mod http;

pub use dir::DirOrigin;
#[cfg(feature = "http")]
pub use http::HttpOrigin;

/// An image's bytes, opened at an origin.
pub struct OriginObject {
    /// The bytes.
    pub reader: Box<dyn Read + Send>,
    /// Their size, if the origin knows it.
    pub size: Option<u64>,
    /// What they should hash to, if the origin says.
    pub checksum: Option<Checksum>,
}

impl fmt::Debug for OriginObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginObject")
            .field("size", &self.size)
            .field("checksum", &self.checksum)
            .finish_non_exhaustive()
    }
}

/// A backend a cache fills from.
///
/// Errors: [`crate::Error::OriginNotFound`] when the origin has no such
/// image, [`crate::Error::Origin`] for everything else it refuses.
pub trait Origin: Send + Sync + fmt::Debug {
    /// Opens image `id`.
    fn open(&self, id: &ImageId) -> Result<OriginObject>;

    /// Where the origin is, for messages (a path, a URL template).
    fn describe(&self) -> String;
}
