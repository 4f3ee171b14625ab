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

#[cfg(feature = "serve")]
mod async_http;
mod dir;
#[cfg(feature = "http")]
mod http;
#[cfg(any(feature = "http", feature = "serve"))]
pub(crate) mod template;

#[cfg(feature = "serve")]
pub use async_http::{AsyncHttpOrigin, AsyncOriginObject};
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

/// What a client's request carries that an origin may need: its
/// credentials, passed on when a server forwards them.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct OriginRequest {
    /// The client's `X-Auth-Token` (Keystone's), if it sent one and the
    /// server forwards it.
    pub auth_token: Option<String>,
}

impl OriginRequest {
    /// A request carrying `token` as its `X-Auth-Token`.
    pub fn with_auth_token(token: impl Into<String>) -> Self {
        OriginRequest {
            auth_token: Some(token.into()),
        }
    }
}

impl fmt::Debug for OriginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A token is a secret: never in a log line.
        f.debug_struct("OriginRequest")
            .field("auth_token", &self.auth_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What an origin says of a client's access to an image
/// ([`Origin::authorize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The client may read it.
    Allowed,
    /// The client may not: the origin's status (`401`, `403`, or `404`
    /// for an image the client may not even see), to answer with.
    Denied(u16),
}

/// The answer of an HTTP origin to an authorization `HEAD`.
#[cfg(any(feature = "http", feature = "serve"))]
pub(crate) fn access_of(status: u16, id: &ImageId, url: &str) -> Result<Access> {
    match status {
        200..=299 => Ok(Access::Allowed),
        401 | 403 | 404 => Ok(Access::Denied(status)),
        other => Err(crate::Error::Origin {
            id: id.clone(),
            origin: url.to_owned(),
            detail: format!("authorizing: HTTP {other}"),
        }),
    }
}

/// A backend a cache fills from.
///
/// `open` blocks; a fill calls it on a thread of its own (see
/// [`crate::ImageCache::fetch_detached`]), never on an async runtime's.
///
/// Errors: [`crate::Error::OriginNotFound`] when the origin has no such
/// image, [`crate::Error::Origin`] for everything else it refuses.
pub trait Origin: Send + Sync + fmt::Debug {
    /// Opens image `id`.
    fn open(&self, id: &ImageId) -> Result<OriginObject>;

    /// Opens image `id` for a client's `request` (its credentials passed
    /// on). By default the request is ignored.
    fn open_for(&self, id: &ImageId, request: &OriginRequest) -> Result<OriginObject> {
        let _ = request;
        self.open(id)
    }

    /// Opens image `id` at byte `offset` (to resume a transfer that broke
    /// there): the object's reader starts at `offset`, its `size` and
    /// `checksum` are the whole image's. `None` if this origin cannot start
    /// anywhere but at the beginning (the default); the caller then opens
    /// it whole and skips.
    fn open_from(
        &self,
        id: &ImageId,
        request: &OriginRequest,
        offset: u64,
    ) -> Result<Option<OriginObject>> {
        let _ = (id, request, offset);
        Ok(None)
    }

    /// Whether the client making `request` may read image `id`, as the
    /// origin decides it: a server asks before it serves a hit, so that a
    /// cached image is never served to a client the origin would refuse.
    /// An HTTP origin sends a `HEAD` carrying the client's token. By
    /// default (an origin with no notion of clients, such as a directory)
    /// every client may. Blocks, as [`Origin::open`] does.
    fn authorize(&self, id: &ImageId, request: &OriginRequest) -> Result<Access> {
        let _ = (id, request);
        Ok(Access::Allowed)
    }

    /// Where the origin is, for messages (a path, a URL template).
    fn describe(&self) -> String;
}
