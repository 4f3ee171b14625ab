//! Rows: decoding what Glance or imgcache wrote (refusing nonsense with
//! the field named), and writing and deleting them.

use std::time::SystemTime;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Row};

use crate::clock::{from_epoch_secs, to_epoch_secs};
use crate::entry::CachedImageInfo;
use crate::id::ImageId;

/// Reads a number SQLite may hold as INTEGER, REAL or NULL (Glance's
/// defaults).
pub(super) fn real(v: ValueRef<'_>, what: &str) -> std::result::Result<f64, String> {
    match v {
        ValueRef::Null => Ok(0.0),
        ValueRef::Integer(i) => Ok(i as f64),
        ValueRef::Real(f) if f.is_finite() => Ok(f),
        other => Err(format!("{what} is {other:?}, not a number")),
    }
}

pub(super) fn count(v: ValueRef<'_>, what: &str) -> std::result::Result<u64, String> {
    match v {
        ValueRef::Null => Ok(0),
        ValueRef::Integer(i) => u64::try_from(i).map_err(|_| format!("{what} is negative ({i})")),
        other => Err(format!("{what} is {other:?}, not a whole number")),
    }
}

pub(super) fn time(v: ValueRef<'_>, what: &str) -> std::result::Result<SystemTime, String> {
    let secs = real(v, what)?;
    from_epoch_secs(secs).ok_or_else(|| format!("{what} {secs} is not a time"))
}

/// Decodes one row of `image_id, size, hits, last_accessed, last_modified,
/// checksum, crc32`. Errors describe the bad field; the
/// caller names the database.
pub(super) fn decode_row(
    row: &Row<'_>,
) -> rusqlite::Result<std::result::Result<CachedImageInfo, String>> {
    let id = match row.get_ref(0)? {
        ValueRef::Text(t) => match std::str::from_utf8(t).ok().map(ImageId::new) {
            Some(Ok(id)) => id,
            _ => {
                return Ok(Err(format!(
                    "image_id {:?} is not a valid id",
                    String::from_utf8_lossy(t)
                )))
            }
        },
        other => return Ok(Err(format!("image_id is {other:?}, not text"))),
    };
    let decoded = (|| {
        let checksum = match row.get_ref(5).map_err(|e| e.to_string())? {
            ValueRef::Null => None,
            ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            other => return Err(format!("checksum is {other:?}, not text")),
        };
        let crc32 = match row.get_ref(6).map_err(|e| e.to_string())? {
            ValueRef::Null => None,
            ValueRef::Integer(i) => {
                Some(u32::try_from(i).map_err(|_| format!("crc32 {i} is out of range"))?)
            }
            other => return Err(format!("crc32 is {other:?}, not an integer")),
        };
        let get = |i| row.get_ref(i).map_err(|e| e.to_string());
        Ok(CachedImageInfo {
            size: count(get(1)?, "size")?,
            hits: count(get(2)?, "hits")?,
            last_accessed: time(get(3)?, "last_accessed")?,
            last_modified: time(get(4)?, "last_modified")?,
            checksum,
            crc32,
            id: id.clone(),
        })
    })();
    Ok(decoded.map_err(|e| format!("row {id}: {e}")))
}

/// Writes `entry`'s row with `verb` (`INSERT OR REPLACE`, `INSERT OR
/// IGNORE`); returns how many rows it wrote.
pub(super) fn write_row(
    c: &Connection,
    verb: &str,
    entry: &CachedImageInfo,
) -> rusqlite::Result<usize> {
    c.prepare_cached(&format!(
        "{verb} INTO cached_images
         (image_id, last_accessed, last_modified, size, hits, checksum, crc32)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))?
    .execute(params![
        entry.id.as_str(),
        to_epoch_secs(entry.last_accessed),
        to_epoch_secs(entry.last_modified),
        entry.size as i64,
        entry.hits as i64,
        entry.checksum,
        entry.crc32.map(i64::from)
    ])
}

/// Deletes with `sql` (one `?1` parameter) for each of `keys`, in one
/// transaction; returns how many rows went.
pub(super) fn delete_each<K: rusqlite::ToSql>(
    c: &mut Connection,
    sql: &str,
    keys: impl IntoIterator<Item = K>,
) -> rusqlite::Result<usize> {
    let tx = c.transaction()?;
    let mut n = 0;
    {
        let mut stmt = tx.prepare_cached(sql)?;
        for key in keys {
            n += stmt.execute([key])?;
        }
    }
    tx.commit()?;
    Ok(n)
}

/// A row as recovery sees it: its rowid, its raw id, and the row decoded
/// (or what is wrong with it).
pub(super) type RawRow = (i64, String, std::result::Result<CachedImageInfo, String>);
