//! [`CachedImage`]: an open cached image.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::driver::CachedImageInfo;
use crate::error::{Error, IoContext, Result};
use crate::id::ImageId;

/// An open cached image: the file, and its metadata as of the open.
///
/// The file stays readable to the end even if the image is pruned or
/// deleted while it is open (its bytes are freed when the last handle
/// closes). Reads go straight to the file, unbuffered: read in large chunks
/// (64 KiB or more), or wrap it in a [`std::io::BufReader`].
#[derive(Debug)]
pub struct CachedImage {
    file: File,
    path: PathBuf,
    info: CachedImageInfo,
}

impl CachedImage {
    /// Wraps an open cache file. Checks that the file holds exactly
    /// `info.size` bytes, so that a file truncated or extended behind the
    /// cache's back is refused rather than served. For driver
    /// implementations.
    pub fn new(file: File, path: PathBuf, info: CachedImageInfo) -> Result<Self> {
        let len = file.metadata().ctx("stat", &path)?.len();
        if len != info.size {
            return Err(Error::Corrupt {
                detail: format!("{len} bytes on disk, {} were committed", info.size),
                id: info.id,
                path,
            });
        }
        Ok(CachedImage { file, path, info })
    }

    /// The image's id.
    pub fn id(&self) -> &ImageId {
        &self.info.id
    }

    /// The image's size in bytes.
    pub fn len(&self) -> u64 {
        self.info.size
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.info.size == 0
    }

    /// The metadata as of the open (this open's hit included).
    pub fn info(&self) -> &CachedImageInfo {
        &self.info
    }

    /// The file's path at the time it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads the whole image into memory. For small images and tests; stream
    /// large ones.
    pub fn read_all(&mut self) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        self.file.rewind().ctx("seek", &self.path)?;
        self.file.read_to_end(&mut buf).ctx("read", &self.path)?;
        Ok(buf)
    }

    /// The open file, for callers that want it whole.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl Read for CachedImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for CachedImage {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}
