//! [`CachedImage`]: an open cached image.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::open_files::OpenFile;
use super::zero_copy;
use crate::entry::CachedImageInfo;
use crate::error::{Error, IoContext, Result};
use crate::id::ImageId;
use crate::range::ByteRange;

/// An open cached image: the file, and its metadata as of the open.
///
/// The file stays readable to the end even if the image is pruned or
/// deleted while it is open (its bytes are freed when the last handle
/// closes).
///
/// Ways to read it, and what each checks:
///
/// | path | copies | checks |
/// |---|---|---|
/// | `Read + Seek` | kernel → your buffer | size at open |
/// | [`range_reader`](Self::range_reader) | kernel → your buffer (`pread`) | size at open, range, no short read |
/// | [`mmap`](Self::mmap) | none: pages mapped | size at open, range |
/// | [`send_to`](Self::send_to) | none: `sendfile`/`splice`/`copy_file_range` | size at open, range, no short send |
///
/// None of them recomputes the CRC: that costs a full read of the file, and
/// is what [`crate::ImageCache::verify`] and [`crate::ImageCache::scrub`]
/// do. Reads go straight to the file, unbuffered: read in large chunks (64
/// KiB or more), or wrap it in a [`std::io::BufReader`].
///
/// The descriptor may be shared with other readers of the same image: the
/// cache keeps those of hot images open ([`crate::CacheOptions::open_files`]).
/// Every read above is positional, so readers never move one another; this
/// handle's `Read + Seek` position is its own.
#[derive(Debug)]
pub struct CachedImage {
    held: Held,
    info: CachedImageInfo,
    pos: u64,
}

/// Where a [`CachedImage`]'s descriptor comes from.
#[derive(Debug)]
enum Held {
    /// Opened for this hit (and perhaps kept since).
    Own { file: Arc<File>, path: Arc<Path> },
    /// An entry of the open-file cache: one reference held, where the
    /// file and path would take two (each an atomic count every hit
    /// touches).
    Kept(Arc<OpenFile>),
}

impl Held {
    fn file(&self) -> &Arc<File> {
        match self {
            Held::Own { file, .. } => file,
            Held::Kept(k) => &k.file,
        }
    }

    fn path(&self) -> &Arc<Path> {
        match self {
            Held::Own { path, .. } => path,
            Held::Kept(k) => &k.path,
        }
    }
}

impl CachedImage {
    /// Wraps an open cache file. Checks that the file holds exactly
    /// `info.size` bytes, so that a file truncated or extended behind the
    /// cache's back is refused rather than served.
    pub(crate) fn new(file: File, path: PathBuf, info: CachedImageInfo) -> Result<Self> {
        let len = file.metadata().ctx("stat", &path)?.len();
        if len != info.size {
            return Err(Error::Corrupt {
                detail: format!("{len} bytes on disk, {} were committed", info.size),
                id: info.id,
                path,
            });
        }
        Ok(CachedImage {
            held: Held::Own {
                file: Arc::new(file),
                path: path.into(),
            },
            info,
            pos: 0,
        })
    }

    /// Wraps a descriptor the cache keeps open, whose size was checked.
    pub(crate) fn kept(entry: Arc<OpenFile>, info: CachedImageInfo) -> Self {
        CachedImage {
            held: Held::Kept(entry),
            info,
            pos: 0,
        }
    }

    /// The path, shared (for the open-file cache).
    pub(crate) fn shared_path(&self) -> &Arc<Path> {
        self.held.path()
    }

    /// The shared descriptor (for the open-file cache).
    pub(crate) fn shared_file(&self) -> &Arc<File> {
        self.held.file()
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
        self.held.path()
    }

    /// The open file. Other readers of the image may share it: read it
    /// with positional reads ([`FileExt::read_at`]); its offset belongs to
    /// no one.
    pub fn file(&self) -> &File {
        self.held.file()
    }

    /// Reads the whole image into memory (from the start, whatever this
    /// handle's position). For small images and tests; stream large ones.
    pub fn read_all(&mut self) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        self.range_reader(None)?
            .read_to_end(&mut buf)
            .ctx("read", self.path())?;
        Ok(buf)
    }

    /// The open file, for callers that want it whole, positioned at the
    /// start. A descriptor shared with other readers is opened afresh
    /// (through `/proc/self/fd` on Linux, which works for a file deleted
    /// since: its own offset); elsewhere it is duplicated, and the
    /// duplicate's offset is shared with other such duplicates.
    pub fn into_file(self) -> io::Result<File> {
        let mut file = match self.held {
            Held::Own { file, .. } => match Arc::try_unwrap(file) {
                Ok(file) => file,
                Err(shared) => reopen(&shared)?,
            },
            // The entry's descriptor itself once nobody else holds it (the
            // cache let it go since).
            Held::Kept(entry) => match Arc::try_unwrap(entry) {
                Ok(entry) => match Arc::try_unwrap(entry.file) {
                    Ok(file) => file,
                    Err(shared) => reopen(&shared)?,
                },
                Err(entry) => reopen(&entry.file)?,
            },
        };
        file.rewind()?;
        Ok(file)
    }

    /// Checks `range` against the image: [`Error::RangeNotSatisfiable`] if
    /// it does not lie within it.
    pub fn range(&self, range: impl Into<ByteRange>) -> Result<ByteRange> {
        range.into().within(self.id(), self.len())
    }

    /// A reader over `range` (`None`: the whole image). It reads with
    /// `pread`, so it does not move this handle's position, and several may
    /// read one image at once. A file that ends early (truncated behind the
    /// cache's back) is an error, never a short read.
    pub fn range_reader(&self, range: Option<ByteRange>) -> Result<RangeReader<'_>> {
        let r = self.range(range.unwrap_or(ByteRange::full(self.len())))?;
        Ok(RangeReader {
            image: self,
            pos: r.start,
            end: r.end,
        })
    }

    /// Maps `range` (`None`: the whole image) into memory, for callers that
    /// want a `&[u8]`. The pages come from the page cache; nothing is
    /// copied.
    ///
    /// A cached file is never written again by the cache (a new version is a
    /// new file, renamed over nothing), so the mapping stays valid while it
    /// lives, even if the image is deleted or pruned. Only a program that
    /// writes or truncates the file behind the cache's back could change it
    /// under the mapping; that is what [`crate::ImageCache::scrub`] detects.
    pub fn mmap(&self, range: Option<ByteRange>) -> Result<MappedImage> {
        let r = self.range(range.unwrap_or(ByteRange::full(self.len())))?;
        let len = usize::try_from(r.len()).map_err(|_| Error::RangeNotSatisfiable {
            id: self.id().clone(),
            start: r.start,
            end: r.end,
            size: self.len(),
        })?;
        #[allow(unsafe_code)]
        // SAFETY: memmap2 requires that the file not be modified while
        // mapped. The cache never writes a cached file after its commit:
        // writers fill `incomplete/<id>` and publish it with a rename that
        // refuses to replace, so this inode's bytes are final. The range was
        // checked against the file's size at open, which matched the
        // committed size.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(r.start)
                .len(len)
                .map(self.file())
        };
        map.ctx("mmap", self.path()).map(MappedImage)
    }

    /// Sends `range` (`None`: the whole image) to `out` — a socket, a pipe
    /// or a file — without copying through user space where the kernel
    /// allows: `copy_file_range(2)` to a file, `splice(2)` to a pipe,
    /// `sendfile(2)` to a socket (Linux), falling back to `read`/`write`
    /// where it refuses (and on other systems). Sends everything: short
    /// sends are continued, and on a non-blocking `out`, `EAGAIN` waits
    /// (`poll`) until it is writable. Returns the bytes sent. Writes to a
    /// file or socket go at its current position.
    pub fn send_to(&self, out: impl AsFd, range: Option<ByteRange>) -> Result<u64> {
        let r = self.range(range.unwrap_or(ByteRange::full(self.len())))?;
        zero_copy::send(self.file(), out.as_fd(), r.start, r.end).ctx("send", self.path())
    }
}

/// Reads a range of a [`CachedImage`] with `pread`; see
/// [`CachedImage::range_reader`].
#[derive(Debug)]
pub struct RangeReader<'a> {
    image: &'a CachedImage,
    pos: u64,
    end: u64,
}

impl RangeReader<'_> {
    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.remaining())
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.image.file().read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended at byte {} of {}",
                    self.image.path().display(),
                    self.pos,
                    self.image.len()
                ),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Read for CachedImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Positional: the descriptor's offset may be another reader's.
        let left = self.info.size.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file().read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            // Truncated behind the cache's back: an error, never a short
            // image.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended at byte {} of {}",
                    self.path().display(),
                    self.pos,
                    self.info.size
                ),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for CachedImage {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.info.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let Some(to) = to else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the image",
            ));
        };
        self.pos = to;
        Ok(to)
    }
}

#[cfg(feature = "tokio")]
impl CachedImage {
    /// Reads into `buf` at `pos` only what the page cache holds now, never
    /// waiting for the disk (Linux `preadv2(RWF_NOWAIT)`): for an async
    /// caller, which reads this on its runtime's thread and the rest on a
    /// thread that may wait. `None` where the read would wait, or where the
    /// system cannot tell (other systems, some file systems); a short read
    /// is what was resident, `Some(Ok(0))` the end of the file.
    pub fn read_resident_at(&self, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>> {
        super::zero_copy::read_resident(self.file(), buf, pos)
    }

    /// [`CachedImage::send_to`] into a tokio `TcpStream`: bytes of `range`
    /// (or all) by `sendfile`, driven by the socket's readiness.
    pub async fn send_to_async(
        &self,
        stream: &tokio::net::TcpStream,
        range: Option<ByteRange>,
    ) -> Result<u64> {
        let r = range
            .unwrap_or(ByteRange::full(self.len()))
            .within(self.id(), self.len())?;
        super::zero_copy::send_file_async(self.file(), stream, r.start, r.end)
            .await
            .map_err(|e| Error::io("send", self.path(), e))
    }
}

/// A cached image (or a range of it) mapped into memory
/// ([`CachedImage::mmap`]): its bytes as a `&[u8]`, straight from the page
/// cache. The mapping stays valid after the image is deleted or pruned.
pub struct MappedImage(memmap2::Mmap);

impl std::ops::Deref for MappedImage {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for MappedImage {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for MappedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedImage")
            .field("len", &self.0.len())
            .finish()
    }
}

/// The same open file with an offset of its own, where the system allows.
fn reopen(file: &File) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if let Ok(own) = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            return Ok(own);
        }
    }
    file.try_clone()
}
