//! [`ImageId`]: a validated image id that is always a safe single file name.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The longest id accepted, in bytes (the usual `NAME_MAX`).
pub(crate) const MAX_ID_LEN: usize = ImageId::MAX_LEN;

/// Names the cache uses for its own files and folders in the base directory,
/// and files Glance itself leaves there: the external locks of oslo's
/// `lockutils`, whose lock path Glance's drivers set to the base directory
/// (`image_cache_db_init` of its sqlite driver, `glance-cache` of its
/// prefetcher, `glance-cache-clean` and `glance-cache-prune` of its cache
/// API, `sqlite_centralized_migrate` of its migration to `centralized_db`),
/// each a 0-byte file. An id equal to one of them would collide with the
/// cache itself, or take Glance's lock for an image.
pub(crate) const RESERVED_NAMES: &[&str] = &[
    "queue",
    "incomplete",
    "invalid",
    "image_cache_db_init",
    "glance-cache",
    "glance-cache-clean",
    "glance-cache-prune",
    "sqlite_centralized_migrate",
];

/// Suffixes SQLite adds to a database file name for its side files.
pub(crate) const SQLITE_SIDE_SUFFIXES: &[&str] = &["", "-wal", "-shm", "-journal"];

/// The default SQLite database file name (Glance's `image_cache_sqlite_db`).
pub(crate) const DEFAULT_SQLITE_DB: &str = "cache.db";

/// The prefix of every temporary or private file the cache may create.
/// Ids starting with it are refused.
pub(crate) const PRIVATE_PREFIX: &str = ".imgcache";

/// Why a string was refused as an [`ImageId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty.
    #[error("it is empty")]
    Empty,
    /// The id is `.` or `..`.
    #[error("`.` and `..` name folders, not files")]
    DotName,
    /// The id contains a `/` (or, on any platform, a `\`).
    #[error("it contains a path separator")]
    Separator,
    /// The id contains NUL.
    #[error("it contains a NUL byte")]
    Nul,
    /// The id contains a control character (U+0000–U+001F, U+007F–U+009F).
    #[error("it contains a control character")]
    Control,
    /// The id is longer than [`ImageId::MAX_LEN`] bytes.
    #[error("it is longer than 255 bytes")]
    TooLong,
    /// The id is not valid UTF-8.
    #[error("it is not valid UTF-8")]
    NotUtf8,
    /// The id names one of the cache's own files or folders.
    #[error("it names one of the cache's own files or folders")]
    Reserved,
    /// The id is valid, but longer than the metadata store can record
    /// (Glance's `cached_images.image_id` holds 36 bytes): such an image
    /// is served from the origin, never cached.
    #[error("it is longer than the {max} bytes the metadata store records")]
    TooLongForStore {
        /// The store's limit, in bytes.
        max: usize,
    },
}

/// The id of a cached image: a non-empty, valid UTF-8 string that is safe to
/// use as a single file name inside the cache directory.
///
/// Refused: the empty string, `.` and `..`, anything containing `/`, `\`, NUL
/// or another control character, anything over 255 bytes, and names of the
/// cache's own files (`queue`, `incomplete`, `invalid`, the default database
/// `cache.db` with its `-wal`/`-shm`/`-journal` side files, and anything
/// starting with `.imgcache`). A cache configured with another database name
/// refuses that name as well, when the id is used with it.
///
/// Glance's ids are UUIDs, but anything else safe works too:
///
/// ```
/// use imgcache::ImageId;
/// assert!(ImageId::new("8f2f6b4e-7cba-4d41-9c6f-2a4e6d0b1c55").is_ok());
/// assert!(ImageId::new("xxx").is_ok());
/// assert!(ImageId::new("../etc/passwd").is_err());
/// assert!(ImageId::new("cache.db").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "String", into = "String")
)]
pub struct ImageId(Box<str>);

impl ImageId {
    /// The longest id, in bytes: a file name's limit.
    pub const MAX_LEN: usize = 255;

    /// Validates `s` and makes an id of it.
    pub fn new(s: impl AsRef<str>) -> Result<Self, Error> {
        let s = s.as_ref();
        validate(s).map_err(|reason| Error::InvalidId {
            input: s.to_owned(),
            reason,
        })?;
        Ok(ImageId(s.into()))
    }

    /// Validates a file name as read from a directory.
    pub(crate) fn from_os(name: &std::ffi::OsStr) -> Result<Self, Error> {
        match name.to_str() {
            Some(s) => ImageId::new(s),
            None => Err(Error::InvalidId {
                input: name.to_string_lossy().into_owned(),
                reason: IdError::NotUtf8,
            }),
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the rules of [`ImageId`] without allocating.
pub fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if s == "." || s == ".." {
        return Err(IdError::DotName);
    }
    for c in s.chars() {
        match c {
            '\0' => return Err(IdError::Nul),
            '/' | '\\' => return Err(IdError::Separator),
            c if c.is_control() => return Err(IdError::Control),
            _ => {}
        }
    }
    if is_reserved(s, DEFAULT_SQLITE_DB) {
        return Err(IdError::Reserved);
    }
    Ok(())
}

/// Whether `name` collides with the cache's own files, given the database
/// file name in use.
pub(crate) fn is_reserved(name: &str, sqlite_db: &str) -> bool {
    RESERVED_NAMES.contains(&name)
        || name.starts_with(PRIVATE_PREFIX)
        || SQLITE_SIDE_SUFFIXES.iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|stem| stem == sqlite_db || stem == DEFAULT_SQLITE_DB)
        })
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for ImageId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for ImageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        ImageId::new(s)
    }
}

impl TryFrom<&str> for ImageId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        ImageId::new(s)
    }
}

impl TryFrom<String> for ImageId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        validate(&s).map_err(|reason| Error::InvalidId {
            input: s.clone(),
            reason,
        })?;
        Ok(ImageId(s.into_boxed_str()))
    }
}

impl From<ImageId> for String {
    fn from(id: ImageId) -> String {
        id.0.into_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_glance_ids() {
        for ok in [
            "1",
            "99",
            "xxx",
            "8f2f6b4e-7cba-4d41-9c6f-2a4e6d0b1c55",
            "image with spaces",
            "ünïcödé-名前",
            ".hidden",
            "...",
            "cache.db.bak",
            "queued",
            "a.db",
        ] {
            assert!(ImageId::new(ok).is_ok(), "{ok:?} should be accepted");
        }
        let max = "a".repeat(MAX_ID_LEN);
        assert!(ImageId::new(&max).is_ok());
    }

    #[test]
    fn refuses_unsafe_names_with_reason() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            (".", IdError::DotName),
            ("..", IdError::DotName),
            ("a/b", IdError::Separator),
            ("/", IdError::Separator),
            ("../x", IdError::Separator),
            ("a\\b", IdError::Separator),
            ("a\0b", IdError::Nul),
            ("a\nb", IdError::Control),
            ("tab\there", IdError::Control),
            ("\u{7f}", IdError::Control),
            ("\u{85}", IdError::Control),
            ("queue", IdError::Reserved),
            ("incomplete", IdError::Reserved),
            ("invalid", IdError::Reserved),
            ("image_cache_db_init", IdError::Reserved),
            ("glance-cache", IdError::Reserved),
            ("glance-cache-clean", IdError::Reserved),
            ("glance-cache-prune", IdError::Reserved),
            ("sqlite_centralized_migrate", IdError::Reserved),
            ("cache.db", IdError::Reserved),
            ("cache.db-wal", IdError::Reserved),
            ("cache.db-shm", IdError::Reserved),
            ("cache.db-journal", IdError::Reserved),
            (".imgcache", IdError::Reserved),
            (".imgcache-tmp-1", IdError::Reserved),
        ];
        for (input, reason) in cases {
            match ImageId::new(input) {
                Err(Error::InvalidId {
                    input: got,
                    reason: r,
                }) => {
                    assert_eq!(&got, input);
                    assert_eq!(r, *reason, "{input:?}");
                }
                other => panic!("{input:?} gave {other:?}"),
            }
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            ImageId::new(&long),
            Err(Error::InvalidId {
                reason: IdError::TooLong,
                ..
            })
        ));
        // 255 bytes of a multi-byte character is still measured in bytes.
        let wide = "é".repeat(128);
        assert_eq!(wide.len(), 256);
        assert!(ImageId::new(&wide).is_err());
    }

    #[test]
    fn error_message_names_the_input() {
        let e = ImageId::new("a/b").unwrap_err().to_string();
        assert!(e.contains("\"a/b\""), "{e}");
        assert!(e.contains("path separator"), "{e}");
    }

    #[test]
    fn reserved_depends_on_configured_db() {
        assert!(is_reserved("meta.sqlite", "meta.sqlite"));
        assert!(is_reserved("meta.sqlite-wal", "meta.sqlite"));
        assert!(!is_reserved("meta.sqlite", "cache.db"));
        assert!(is_reserved("cache.db", "meta.sqlite"));
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_file_names_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"\xff\xfe");
        assert!(matches!(
            ImageId::from_os(name),
            Err(Error::InvalidId {
                reason: IdError::NotUtf8,
                ..
            })
        ));
    }

    #[test]
    fn conversions_round_trip() {
        let id: ImageId = "abc".parse().unwrap();
        assert_eq!(id.as_str(), "abc");
        assert_eq!(format!("{id}"), "abc");
        assert_eq!(format!("[{id:<5}]"), "[abc  ]");
        assert_eq!(format!("{id:?}"), "\"abc\"");
        assert_eq!(String::from(id.clone()), "abc");
        assert_eq!(ImageId::try_from(String::from("abc")).unwrap(), id);
    }
}
