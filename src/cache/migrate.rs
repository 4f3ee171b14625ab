//! Moving metadata between stores: Glance's migration of a node's local
//! `cache.db` into a shared database ([`ImageCache::migrate_from_sqlite`]),
//! and the rebuild of a broken SQLite database from the files
//! ([`ImageCache::rebuild`]).

use super::ImageCache;
use crate::clock::to_epoch_secs;
use crate::drivers::StoreExt;
use crate::drivers::{CacheDriver, SqliteDriver};
use crate::error::{Error, Result};
use crate::options::{CacheOptions, DriverKind};

/// What [`ImageCache::migrate_from_sqlite`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MigrationReport {
    /// Rows the SQLite database held.
    pub rows: usize,
    /// Rows now in the store and deleted from the SQLite database.
    pub migrated: usize,
}

/// [`ImageCache::migrate_from_sqlite`], on a store alone.
pub(super) fn migrate_into(
    store: &dyn CacheDriver,
    db: &std::path::Path,
) -> Result<MigrationReport> {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    // In the private folder beside the database: a regular file in a
    // cache's base directory would be an image to Glance.
    let private = crate::files::layout::private_dir_of(parent);
    std::fs::create_dir_all(&private).map_err(|e| Error::io("create directory", &private, e))?;
    let lock_path = private.join(format!("migrate-{name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("create", &lock_path, e))?;
    lock.lock().map_err(|e| Error::io("lock", &lock_path, e))?;
    // Earlier versions kept the lock beside the database.
    let _ = std::fs::remove_file(parent.join(format!(".imgcache-migrate-{name}")));
    let local = SqliteDriver::open(db)?;
    let rows = local.entries()?;
    let present = store.import(&rows)?;
    local.delete(&present)?;
    drop(lock);
    Ok(MigrationReport {
        rows: rows.len(),
        migrated: present.len(),
    })
}

impl ImageCache {
    /// Moves this node's rows from a local SQLite database (Glance's
    /// `cache.db`) into the store, as Glance migrates to `centralized_db`
    /// (at start-up: [`CacheOptions::migrate_sqlite`] runs it before the
    /// recovery walk, which would otherwise adopt the files without their
    /// rows' hits):
    /// the rows the store lacks are recorded, every row the store then holds
    /// is deleted from the SQLite file (the file is kept). One way,
    /// idempotent, and safe to run from several processes and nodes at once
    /// (an exclusive lock beside the SQLite file here, the store's own lock
    /// there); a run killed half-way loses nothing: a row leaves SQLite only
    /// once the store has it.
    pub fn migrate_from_sqlite(&self, db: &std::path::Path) -> Result<MigrationReport> {
        migrate_into(&*self.store, db)
    }

    /// Opens the cache after moving a broken SQLite database (see
    /// [`Error::BadDatabase`]) aside to `.imgcache/broken-<unix time>-<name>`
    /// beside it (the cache's private folder): the
    /// metadata is recreated from the cached files, which are adopted
    /// unverified ([`ImageCache::scrub`] verifies them). Hit counts and
    /// access times are lost. Stop other processes using the directory
    /// first. With the xattr driver, where metadata lives on the files, this
    /// is [`ImageCache::open`].
    pub fn rebuild(options: CacheOptions) -> Result<Self> {
        if options.image_cache_driver() == DriverKind::Sqlite || options.falls_back_to_sqlite() {
            let db = options.sqlite_db_path();
            if db.exists() {
                let stamp = to_epoch_secs(options.clock_ref().now()).max(0.0) as u64;
                // Into the private folder beside it: in a cache's base
                // directory, a regular file would be an image to Glance.
                let private = crate::files::layout::private_dir_of(
                    db.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(std::path::Path::new(".")),
                );
                std::fs::create_dir_all(&private)
                    .map_err(|e| Error::io("create directory", &private, e))?;
                SqliteDriver::move_aside(&db, &private, &format!("broken-{stamp}-"))?;
            }
        }
        Self::open(options)
    }
}
