//! Single-flight fills within a process: the registry of fills in progress,
//! and [`FollowReader`], which streams an image from its growing
//! `incomplete/` file while another reader fills it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::Error;
use crate::id::ImageId;

/// One fill in progress: how far it got and how it ended.
#[derive(Debug)]
pub(crate) struct Fill {
    id: ImageId,
    /// The incomplete file, shared with the writer; read with `pread`, so
    /// it stays readable after the commit renames it.
    file: File,
    state: Mutex<FillState>,
    changed: Condvar,
    followers: AtomicUsize,
}

#[derive(Debug, Default)]
struct FillState {
    /// Bytes written to the file so far (and readable from it).
    written: u64,
    /// `Ok(size)` once committed; `Err(reason)` once failed.
    outcome: Option<Result<u64, String>>,
}

impl Fill {
    pub(crate) fn new(id: ImageId, file: File) -> Self {
        Fill {
            id,
            file,
            state: Mutex::new(FillState::default()),
            changed: Condvar::new(),
            followers: AtomicUsize::new(0),
        }
    }

    /// Publishes that `written` bytes are in the file.
    pub(crate) fn progress(&self, written: u64) {
        self.state.lock().written = written;
        self.changed.notify_all();
    }

    /// Publishes the end of the fill.
    pub(crate) fn finish(&self, outcome: Result<u64, String>) {
        self.state.lock().outcome = Some(outcome);
        self.changed.notify_all();
    }

    /// How many readers follow this fill now.
    pub(crate) fn followers(&self) -> usize {
        self.followers.load(Ordering::SeqCst)
    }
}

/// The fills in progress in this process, by image.
#[derive(Debug, Default)]
pub(crate) struct Fills(Mutex<HashMap<ImageId, Arc<Fill>>>);

impl Fills {
    /// Runs `f` with the registry locked.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut HashMap<ImageId, Arc<Fill>>) -> T) -> T {
        f(&mut self.0.lock())
    }

    /// Removes `fill` from the registry (if it is still the one
    /// registered for its id).
    pub(crate) fn remove(&self, fill: &Arc<Fill>) {
        let mut map = self.0.lock();
        if map.get(&fill.id).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            map.remove(&fill.id);
        }
    }
}

/// Streams an image that another reader of this process is filling, from
/// the growing `incomplete/` file: bytes arrive as soon as the filler has
/// written them, and the end of the stream comes only once the filler has
/// committed (its checksum verified). If the fill fails, the next read
/// returns [`Error::FillFailed`] (inside an [`io::Error`]); never a hang,
/// never a partial image presented as complete.
#[derive(Debug)]
pub struct FollowReader {
    fill: Arc<Fill>,
    pos: u64,
}

impl FollowReader {
    pub(crate) fn new(fill: Arc<Fill>) -> Self {
        fill.followers.fetch_add(1, Ordering::SeqCst);
        FollowReader { fill, pos: 0 }
    }

    /// The image followed.
    pub fn id(&self) -> &ImageId {
        &self.fill.id
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = {
            let mut state = self.fill.state.lock();
            loop {
                if state.written > self.pos {
                    break state.written - self.pos;
                }
                match &state.outcome {
                    Some(Ok(size)) if self.pos >= *size => return Ok(0),
                    Some(Ok(_)) => break 0,
                    Some(Err(reason)) => {
                        return Err(Error::FillFailed {
                            id: self.fill.id.clone(),
                            reason: reason.clone(),
                        }
                        .into_io())
                    }
                    None => self.fill.changed.wait(&mut state),
                }
            }
        };
        if available == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "fill committed fewer bytes than it published",
            ));
        }
        let n = usize::try_from(available)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let got = self.fill.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: the file being filled is shorter than published",
                    self.fill.id
                ),
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl Drop for FollowReader {
    fn drop(&mut self) {
        self.fill.followers.fetch_sub(1, Ordering::SeqCst);
    }
}
