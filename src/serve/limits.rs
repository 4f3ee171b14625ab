//! What one client may hold of a server, and for how long: the edge's
//! bounds, the same on every listener.
//!
//! - **Connections:** a listener accepts only while it has a slot (a
//!   semaphore permit held by the connection), so a flood waits in the
//!   kernel's backlog instead of taking descriptors; and the CLI raises the
//!   soft descriptor limit to the hard one at start and splits it between
//!   the listeners with a reserve for files, fills and the database
//!   ([`descriptor_budget`]), so a flood on one port never stops the other.
//! - **Heads:** a request head must arrive whole within the header timeout,
//!   a new connection must speak within it, and a keep-alive connection
//!   idle that long between requests is closed.
//! - **Bodies:** a client that accepts no byte of its response for the send
//!   timeout is cut off (as nginx's `send_timeout`): a write that stays
//!   blocked that long fails. Waiting for the origin is not the client's
//!   doing and is never timed here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listener's bounds.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// How long a request head may take to arrive (and a keep-alive
    /// connection may sit idle).
    pub header_timeout: Duration,
    /// How long a response write may stay blocked on the client.
    pub send_timeout: Duration,
    /// The connection slots; `None`: unbounded.
    pub slots: Option<Arc<Semaphore>>,
    /// HTTP/1.1 only (the management port): no HTTP/2, whose idle
    /// connections and streams the timeouts here do not bound.
    pub http1_only: bool,
}

impl Limits {
    pub(crate) fn new(
        header_timeout: Duration,
        send_timeout: Duration,
        max_connections: Option<usize>,
    ) -> Self {
        Limits {
            header_timeout,
            send_timeout,
            slots: max_connections
                .map(|n| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)))),
            http1_only: false,
        }
    }

    /// HTTP/1.1 only.
    pub(crate) fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }

    /// A connection slot: waits while every slot is taken (the pending
    /// connections wait in the kernel's backlog, holding no descriptor of
    /// this process).
    pub(crate) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        match &self.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }
}

/// An IO whose writes fail with `TimedOut` when they stay blocked for the
/// send timeout: for hyper, which writes bodies without a timeout of its
/// own.
#[derive(Debug)]
pub(crate) struct SendTimeout<T> {
    io: T,
    limit: Duration,
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendTimeout<T> {
    pub(crate) fn new(io: T, limit: Duration) -> Self {
        SendTimeout {
            io,
            limit,
            blocked: None,
        }
    }

    /// After a write's `Pending`: the error once it has been blocked for
    /// the limit.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(timed_out(limit)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The error of a write blocked for `limit`.
pub(crate) fn timed_out(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the client took no byte for {} s", limit.as_secs_f64()),
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.blocked = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.blocked = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(r) => {
                self.blocked = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.check(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// `write_all` that fails when the client takes nothing for `limit`.
pub(crate) async fn write_within(
    stream: &mut tokio::net::TcpStream,
    buf: &[u8],
    limit: Duration,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut out = SendTimeout::new(stream, limit);
    out.write_all(buf).await
}

/// Raises this process's soft limit on open descriptors to its hard limit
/// (as nginx's `worker_rlimit_nofile` does); returns the limit now in
/// effect. Linux and the BSDs; elsewhere, the limit as it is.
// `rlim_t` is `u64` here, `i64` on the BSDs: the casts are for them.
#[allow(clippy::unnecessary_cast)]
pub fn raise_descriptor_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    // An unlimited hard limit (macOS) cannot be set as such: a million.
    let want = hard.min(1 << 20);
    if soft < want {
        match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            Ok(()) => return Ok(want as u64),
            Err(e) => {
                tracing::warn!(error = %e, soft, "cannot raise the descriptor limit; keeping it")
            }
        }
    }
    Ok((soft as u64).min(1 << 20))
}

/// Descriptors kept out of the listeners' budget besides the fills': the
/// process's own (runtime, store, log), the origin client's idle pool,
/// prefetch and peer transfers.
pub const DESCRIPTOR_RESERVE: u64 = 64;

/// How `limit` descriptors are split: `(data connections, admin
/// connections)`. The reserve, `fills` (three descriptors each: the
/// origin's connection, the file written, one to spare) and the
/// descriptors of hot images the cache keeps open (`open_files`) come off
/// first;
/// the management API gets `admin` (at most a quarter of the rest); each
/// data connection may hold a second descriptor (the file it sends), so
/// the data port gets half of what is left; at least one each.
pub fn descriptor_budget(
    limit: u64,
    admin: usize,
    fills: usize,
    open_files: usize,
) -> (usize, usize) {
    let rest = limit.saturating_sub(DESCRIPTOR_RESERVE + 3 * fills as u64 + open_files as u64);
    let admin = (admin as u64).min(rest / 4).max(1);
    let data = rest.saturating_sub(admin) / 2;
    (
        (data.max(1) as usize).min(Semaphore::MAX_PERMITS),
        (admin as usize).min(Semaphore::MAX_PERMITS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_keep_a_reserve_and_never_reach_zero() {
        // 1024 - 64 - 3 × 64 = 768: 64 for the management port, 352 data.
        assert_eq!(descriptor_budget(1024, 64, 64, 0), (352, 64));
        // 1024 - 64 - 3 × 64 - 256 = 512: 64 for the management port, 224 data.
        assert_eq!(descriptor_budget(1024, 64, 64, 256), (224, 64));
        // 128 - 64 - 24 = 40: 10 for the management port, 15 data.
        assert_eq!(descriptor_budget(128, 64, 8, 0), (15, 10));
        assert_eq!(descriptor_budget(4, 64, 64, 1), (1, 1));
        assert_eq!(descriptor_budget(u64::MAX, 64, 64, 1024).1, 64);
        assert!(descriptor_budget(u64::MAX, 64, 64, 1024).0 <= Semaphore::MAX_PERMITS);
    }

    #[tokio::test]
    async fn a_write_blocked_past_the_limit_fails() {
        use tokio::io::AsyncWriteExt;
        // A pipe-like pair whose reader never reads.
        let (client, server) = tokio::io::duplex(1024);
        let mut out = SendTimeout::new(server, Duration::from_millis(50));
        let big = vec![0u8; 1 << 20];
        let err = out.write_all(&big).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);
    }
}
