//! The metadata drivers: one file each.

mod checkpoint;
pub mod sqlite;
pub mod xattr;

pub use self::sqlite::SqliteDriver;
pub use self::xattr::XattrDriver;
