//! [`DirOrigin`]: one file per image in a directory.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::{Origin, OriginObject};
use crate::checksum::{Algorithm, Checksum};
use crate::error::{Error, Result};
use crate::id::ImageId;

/// The checksum files beside an image, in the order they are looked for.
const SIDECARS: [(&str, Algorithm); 3] = [
    ("md5", Algorithm::Md5),
    ("sha256", Algorithm::Sha256),
    ("sha512", Algorithm::Sha512),
];

/// Serves image `<id>` from the file `<dir>/<id>`.
///
/// An expected checksum may sit beside it, in `md5sum`/`sha256sum` format
/// (the digest first): `<id>.md5`, `<id>.sha256` or `<id>.sha512` (the first
/// found, in that order). Those files are checksums, never images: an id
/// that ends in one of those extensions is not found here.
#[derive(Debug, Clone)]
pub struct DirOrigin {
    dir: PathBuf,
}

impl DirOrigin {
    /// An origin serving the files of `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirOrigin { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn checksum(&self, id: &ImageId) -> Result<Option<Checksum>> {
        for (ext, algorithm) in SIDECARS {
            let path = self.dir.join(format!("{id}.{ext}"));
            match fs::read_to_string(&path) {
                Ok(text) => {
                    let digest = text.split_whitespace().next().unwrap_or("");
                    return Checksum::new(algorithm, digest)
                        .map(Some)
                        .map_err(|e| Error::Origin {
                            id: id.clone(),
                            origin: self.describe(),
                            detail: format!("{}: {e}", path.display()),
                        });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("read", &path, e)),
            }
        }
        Ok(None)
    }
}

impl Origin for DirOrigin {
    fn open(&self, id: &ImageId) -> Result<OriginObject> {
        if SIDECARS.iter().any(|(ext, _)| {
            id.as_str()
                .rsplit_once('.')
                .is_some_and(|(_, e)| e.eq_ignore_ascii_case(ext))
        }) {
            return Err(Error::OriginNotFound {
                id: id.clone(),
                origin: self.describe(),
            });
        }
        let path = self.dir.join(id.as_str());
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::OriginNotFound {
                    id: id.clone(),
                    origin: self.describe(),
                })
            }
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let meta = file.metadata().map_err(|e| Error::io("stat", &path, e))?;
        if !meta.is_file() {
            return Err(Error::OriginNotFound {
                id: id.clone(),
                origin: self.describe(),
            });
        }
        Ok(OriginObject {
            size: Some(meta.len()),
            checksum: self.checksum(id)?,
            reader: Box::new(file),
        })
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}
