//! The one local file layer: where each state of an image lives
//! ([`Layout`]), how a writer's file is created, locked, published and
//! invalidated, how a cached file is read ([`CachedImage`], zero-copy
//! [`CachedImage::send_to`]), the descriptors of hot files kept open
//! (`open_files.rs`), the queue folder, and the lock protocol that tells a
//! live writer from a dead one.
//!
//! It is written once, whatever store keeps the metadata: it never imports
//! `drivers/`, and the stores never import it. [`crate::ImageCache`] joins
//! the two.
//!
//! The lock protocol: a writer holds an exclusive `flock` on
//! `incomplete/<id>` from the moment the file appears under that name until
//! it commits or aborts: the file is locked before it has the name (made
//! without a name, then linked into place; or, where the system has no
//! `O_TMPFILE`, created under a private name, then renamed into place), and
//! a writer that gives up removes it while still holding the lock. The
//! kernel drops the lock when the writer's process dies. So "locked" means
//! "a writer is alive", and `clean`, the recovery walk and
//! [`wait_for_writer`] never take a live writer's file for a stalled one.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, Result};

pub(crate) mod layout;
pub(crate) mod open_files;
pub(crate) mod queue;
pub(crate) mod reader;
pub(crate) mod zero_copy;

pub(crate) use layout::{Admitted, AdmittedId, Layout};
pub use layout::{CleanReport, RemovedFile};
pub use reader::{CachedImage, MappedImage, RangeReader};

/// Whether `path` names the file whose metadata is `meta` (same device and
/// inode): every move or removal of a file by path that holds, or checked,
/// the file asks this first.
pub(crate) fn names(path: &std::path::Path, meta: &fs::Metadata) -> bool {
    fs::metadata(path).is_ok_and(|b| (meta.dev(), meta.ino()) == (b.dev(), b.ino()))
}

/// Blocks until the writer holding `incomplete/<id>` (in any process) is
/// done. If it died instead, removes its stalled file so that the caller can
/// take the fill over.
pub(crate) fn wait_for_writer(layout: &Layout, id: Admitted<'_>) -> Result<()> {
    let path = layout.incomplete(id);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    // A living writer holds an exclusive lock until it commits or aborts;
    // the kernel drops it if the writer dies.
    file.lock_shared()
        .map_err(|e| Error::io("lock", &path, e))?;
    let same = |f: &File| f.metadata().is_ok_and(|meta| names(&path, &meta));
    if !same(&file) {
        return Ok(()); // committed or aborted: moved away
    }
    // Still in place with nobody holding it: its writer died.
    file.unlock().map_err(|e| Error::io("unlock", &path, e))?;
    if file.try_lock().is_ok() && same(&file) {
        tracing::warn!("imgcache: {id}: taking over a fill whose writer died");
        layout::remove_if_exists(&path)?;
    }
    Ok(())
}
