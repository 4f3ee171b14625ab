//! Moving a cached file's bytes to another descriptor without copying them
//! through user space: `copy_file_range(2)` to a file, `splice(2)` to a
//! pipe, `sendfile(2)` to a socket (Linux), and a `pread`/`write` loop
//! wherever the kernel refuses, and on other systems.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

/// The largest single request (Linux caps a transfer near 2 GiB anyway).
const CHUNK: u64 = 1 << 30;

/// The buffer of the `read`/`write` fallback.
const FALLBACK_BUFFER: usize = 256 * 1024;

/// How bytes are moved, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    #[cfg(target_os = "linux")]
    CopyFileRange,
    #[cfg(target_os = "linux")]
    Splice,
    #[cfg(target_os = "linux")]
    Sendfile,
    ReadWrite,
}

impl Mode {
    /// The best mode for what `out` is.
    fn for_target(out: BorrowedFd<'_>) -> Mode {
        #[cfg(target_os = "linux")]
        {
            use nix::sys::stat::{fstat, SFlag};
            if let Ok(st) = fstat(out) {
                let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
                if kind == SFlag::S_IFREG {
                    return Mode::CopyFileRange;
                }
                if kind == SFlag::S_IFIFO {
                    return Mode::Splice;
                }
            }
            Mode::Sendfile
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = out;
            Mode::ReadWrite
        }
    }

    /// What to try when this mode is refused.
    fn fallback(self) -> Mode {
        match self {
            #[cfg(target_os = "linux")]
            Mode::CopyFileRange | Mode::Splice => Mode::Sendfile,
            _ => Mode::ReadWrite,
        }
    }
}

/// Sends bytes `start..end` of `file` to `out`; returns how many.
pub(crate) fn send(file: &File, out: BorrowedFd<'_>, start: u64, end: u64) -> io::Result<u64> {
    let mut mode = Mode::for_target(out);
    let mut off = start;
    let mut buffer = Vec::new();
    // The fallback writes through a File sharing `out`'s descriptor (a dup:
    // same offset and flags), made only if needed.
    let mut out_file: Option<File> = None;
    while off < end {
        let want = (end - off).min(CHUNK);
        let step = match mode {
            Mode::ReadWrite => {
                if buffer.is_empty() {
                    buffer = vec![0u8; FALLBACK_BUFFER];
                }
                let n = usize::try_from(want)
                    .unwrap_or(usize::MAX)
                    .min(buffer.len());
                match file.read_at(&mut buffer[..n], off) {
                    Ok(0) => Ok(0),
                    Ok(got) => {
                        let w = match out_file.as_mut() {
                            Some(f) => f,
                            None => out_file.insert(File::from(out.try_clone_to_owned()?)),
                        };
                        write_all_waiting(w, out, &buffer[..got]).map(|()| got)
                    }
                    Err(e) => Err(e),
                }
            }
            #[cfg(target_os = "linux")]
            kernel => kernel_step(kernel, file, out, off, want),
        };
        match step {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended at byte {off}, before {end}"),
                ))
            }
            Ok(n) => off += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(out)?,
            Err(e) if mode != Mode::ReadWrite && refused(&e) => mode = mode.fallback(),
            Err(e) => return Err(e),
        }
    }
    Ok(off - start)
}

/// One kernel-side transfer of up to `want` bytes at `off`.
#[cfg(target_os = "linux")]
fn kernel_step(
    mode: Mode,
    file: &File,
    out: BorrowedFd<'_>,
    off: u64,
    want: u64,
) -> io::Result<usize> {
    let mut offset = i64::try_from(off).map_err(io::Error::other)?;
    let want = usize::try_from(want).unwrap_or(usize::MAX);
    let r = match mode {
        Mode::CopyFileRange => {
            nix::fcntl::copy_file_range(file, Some(&mut offset), out, None, want)
        }
        Mode::Splice => nix::fcntl::splice(
            file,
            Some(&mut offset),
            out,
            None,
            want,
            nix::fcntl::SpliceFFlags::SPLICE_F_MOVE,
        ),
        Mode::Sendfile => nix::sys::sendfile::sendfile(out, file, Some(&mut offset), want),
        Mode::ReadWrite => return Err(io::Error::other("not a kernel mode")),
    };
    r.map_err(io::Error::from)
}

/// Whether the kernel refused the method itself (rather than failed).
fn refused(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EBADF)
    )
}

/// Blocks until `out` can be written to.
fn wait_writable(out: BorrowedFd<'_>) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(out, PollFlags::POLLOUT)];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `write_all` that waits out `EAGAIN` on a non-blocking descriptor.
fn write_all_waiting(w: &mut File, out: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(out)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One non-blocking transfer of up to `want` bytes of `file` at `off` to
/// `out` (a socket, or any descriptor): `sendfile` on Linux, a `pread` and
/// one `write` where the kernel refuses and on other systems. Returns how
/// many bytes went (0 at the end of the file); `WouldBlock` when `out` is
/// full, for the caller to wait on readiness.
#[cfg(feature = "tokio")]
pub(crate) fn send_once(
    file: &File,
    out: BorrowedFd<'_>,
    off: u64,
    want: u64,
    use_kernel: &mut bool,
) -> io::Result<usize> {
    let want = want.min(CHUNK);
    #[cfg(target_os = "linux")]
    if *use_kernel {
        match kernel_step(Mode::Sendfile, file, out, off, want) {
            Err(e) if refused(&e) => *use_kernel = false,
            other => return other,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        *use_kernel = false;
    }
    let n = usize::try_from(want)
        .unwrap_or(usize::MAX)
        .min(FALLBACK_BUFFER);
    let mut buffer = vec![0u8; n];
    let got = file.read_at(&mut buffer, off)?;
    if got == 0 {
        return Ok(0);
    }
    // A short write sends fewer bytes than were read; the rest are read
    // again on the next call.
    nix::unistd::write(out, &buffer[..got]).map_err(io::Error::from)
}

#[cfg(feature = "tokio")]
/// Sends bytes `start..end` of `file` to `stream` without copying them
/// through user space (`sendfile` on Linux; a `pread`/`write` loop where
/// the kernel refuses and on other systems), waiting on the socket's
/// readiness between transfers. Returns how many bytes were sent; a file
/// that ends before `end` is `UnexpectedEof`.
pub async fn send_file_async(
    file: &File,
    stream: &tokio::net::TcpStream,
    start: u64,
    end: u64,
) -> io::Result<u64> {
    send_file_async_within(file, stream, start, end, None).await
}

/// [`send_file_async`], failing with `TimedOut` when the socket stays
/// unwritable for `idle` (a client that takes no byte).
#[cfg(feature = "tokio")]
pub(crate) async fn send_file_async_within(
    file: &File,
    stream: &tokio::net::TcpStream,
    start: u64,
    end: u64,
    idle: Option<std::time::Duration>,
) -> io::Result<u64> {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    let mut off = start;
    let mut kernel = true;
    while off < end {
        match idle {
            Some(limit) => tokio::time::timeout(limit, stream.writable())
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client took no byte for {} s", limit.as_secs_f64()),
                    )
                })??,
            None => stream.writable().await?,
        }
        match stream.try_io(Interest::WRITABLE, || {
            send_once(file, stream.as_fd(), off, end - off, &mut kernel)
        }) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended at byte {off}, before {end}"),
                ))
            }
            Ok(n) => off += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(off - start)
}

/// Reads into `buf` at `pos` only what the page cache holds now, never
/// waiting for the disk (Linux `preadv2(RWF_NOWAIT)`): `None` where the
/// read would wait, or where the system cannot tell (other systems, file
/// systems without the flag) — then read on a thread that may wait. A
/// short read is what was resident; `Some(Ok(0))` is the end of the file.
#[cfg(feature = "tokio")]
pub(crate) fn read_resident(file: &File, buf: &mut [u8], pos: u64) -> Option<io::Result<usize>> {
    #[cfg(target_os = "linux")]
    {
        use rustix::io::{preadv2, Errno, ReadWriteFlags};
        let mut bufs = [io::IoSliceMut::new(buf)];
        match preadv2(file, &mut bufs, pos, ReadWriteFlags::NOWAIT) {
            Ok(n) => Some(Ok(n)),
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => None,
            Err(e) => Some(Err(e.into())),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, buf, pos);
        None
    }
}
