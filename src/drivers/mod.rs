//! The metadata drivers: one file each.

pub mod sqlite;
pub mod xattr;

pub use self::sqlite::SqliteDriver;
pub use self::xattr::XattrDriver;
