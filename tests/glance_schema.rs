//! The `centralized_db` store on a database whose cache tables are
//! Glance's: it runs no DDL on them (so no Glance query ever waits for it),
//! and it creates nothing on a database without them unless told to (so
//! Glance's own migrations still run there). Each case on a database of
//! its own on the tests' PostgreSQL server. `tests/glance/` runs Glance's
//! real `db_sync` and driver against the same cases.

use std::time::{Duration, Instant, SystemTime};

use imgcache::drivers::centralized_db::Tables;
use imgcache::drivers::{CacheDriver, CentralizedDbDriver};
use imgcache::testing::postgres::cluster;
use imgcache::{CachedImageInfo, Error, ImageId};

/// Glance's cache tables, as its 2024.1 expand migration
/// (`2024_1_expand01_add_cache_tables`) creates them on PostgreSQL.
const GLANCE_2024_1: &str = "
CREATE TABLE node_reference (
    node_reference_id BIGSERIAL NOT NULL,
    node_reference_url VARCHAR(255) NOT NULL,
    PRIMARY KEY (node_reference_id),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
);
CREATE TABLE cached_images (
    id BIGSERIAL NOT NULL,
    image_id VARCHAR(36) NOT NULL,
    last_accessed TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
);";

/// A fresh database on the tests' server: its URL and a client on it.
fn fresh_database(name: &str) -> Option<(String, postgres::Client)> {
    let server = cluster()?;
    let mut admin = postgres::Client::connect(server.url(), postgres::NoTls).unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).unwrap();
    }
    let url = server.url().replace("/postgres", &format!("/{name}"));
    let client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    Some((url, client))
}

/// Everything PostgreSQL knows of a table's shape: columns, constraints,
/// indexes.
fn shape(c: &mut postgres::Client, table: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in c
        .query(
            "SELECT column_name || ' ' || data_type || ' ' || COALESCE(character_maximum_length, 0)
                    || ' ' || is_nullable
             FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .unwrap()
    {
        out.push(r.get(0));
    }
    for r in c
        .query(
            "SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid = ($1::text)::regclass ORDER BY conname",
            &[&table],
        )
        .unwrap()
    {
        out.push(r.get(0));
    }
    for r in c
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
            &[&table],
        )
        .unwrap()
    {
        out.push(r.get(0));
    }
    out
}

fn tables(c: &mut postgres::Client) -> Vec<String> {
    c.query(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn entry(id: &str, crc: Option<u32>) -> CachedImageInfo {
    let mut e = CachedImageInfo::new(ImageId::new(id).unwrap(), 42, SystemTime::now());
    e.crc32 = crc;
    e
}

/// Glance's 2024.1 migration stops at tables someone else created, so on
/// a database without them the store refuses, says what to run, and
/// leaves the database as it found it; told to create them (a fleet
/// without Glance), it does.
#[test]
fn a_database_without_glance_tables_is_refused_untouched() {
    let Some((url, mut c)) = fresh_database("imgcache_no_glance") else {
        return;
    };
    let err = CentralizedDbDriver::open(&url, "http://node-a:9292").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(msg.contains("glance-manage db_sync"), "{msg}");
    assert!(msg.contains("--create-tables"), "{msg}");
    assert!(!msg.contains("password"), "{msg}");
    assert_eq!(tables(&mut c), Vec::<String>::new());

    let store = CentralizedDbDriver::open_with(&url, "http://node-a:9292", Tables::Create).unwrap();
    store.insert(&entry("img", Some(7))).unwrap();
    assert_eq!(
        tables(&mut c),
        [
            "cached_images",
            "imgcache_entries",
            "imgcache_fills",
            "imgcache_invalid",
            "imgcache_state",
            "node_reference"
        ]
    );
    // Once made, a plain open finds them.
    drop(store);
    CentralizedDbDriver::open(&url, "http://node-b:9292").unwrap();
}

/// On Glance's schema, the store's first start adds nothing to Glance's
/// tables and takes no lock a Glance query would wait behind, even with a
/// transaction open that has read `cached_images` (a `pg_dump`, a slow
/// request): an `ALTER TABLE` would wait behind it, and every Glance query
/// behind the `ALTER`.
#[test]
fn the_first_start_runs_no_ddl_on_glance_tables() {
    let Some((url, mut c)) = fresh_database("imgcache_glance_ddl") else {
        return;
    };
    c.batch_execute(GLANCE_2024_1).unwrap();
    let before = (
        shape(&mut c, "cached_images"),
        shape(&mut c, "node_reference"),
    );
    // A reader that holds its lock on cached_images throughout.
    let mut reader = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut held = reader.transaction().unwrap();
    held.query("SELECT * FROM cached_images", &[]).unwrap();

    let started = Instant::now();
    let store = CentralizedDbDriver::open(&url, "http://node-a:9292").unwrap();
    store.insert(&entry("aaaa", Some(0xdead_beef))).unwrap();
    let took = started.elapsed();
    // Not a timing assert of speed: a start stuck behind the lock takes
    // the store's lock timeout (10 s) and then fails.
    assert!(
        took < Duration::from_secs(5),
        "the first start waited {took:?}"
    );
    held.commit().unwrap();

    let after = (
        shape(&mut c, "cached_images"),
        shape(&mut c, "node_reference"),
    );
    assert_eq!(before, after, "Glance's tables changed");
    // What Glance has no column for is kept beside.
    let got = store.list(&NoFiles).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].crc32, Some(0xdead_beef));
    // Glance deletes the row and writes the image again: a new row, and
    // nothing of the old one's CRC attaches to it.
    c.batch_execute(
        "DELETE FROM cached_images WHERE image_id = 'aaaa';
         INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum,
                                    node_reference_id)
         SELECT 'aaaa', now(), now(), 42, 0, NULL, node_reference_id FROM node_reference",
    )
    .unwrap();
    drop(store);
    let store = CentralizedDbDriver::open(&url, "http://node-a:9292").unwrap();
    let got = store.list(&NoFiles).unwrap();
    assert_eq!(got[0].crc32, None, "{got:?}");
    let left: i64 = c
        .query_one("SELECT COUNT(*) FROM imgcache_entries", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the old row's CRC was not swept");
    // An id longer than Glance's column is refused by name.
    let long = "x".repeat(40);
    let err = store.insert(&entry(&long, None)).unwrap_err();
    assert!(err.to_string().contains(&long), "{err}");
}

/// A database an earlier version set up (columns added to Glance's table)
/// keeps its CRCs: copied into imgcache's own table, nothing dropped.
#[test]
fn crcs_in_columns_an_earlier_version_added_are_kept() {
    let Some((url, mut c)) = fresh_database("imgcache_glance_legacy") else {
        return;
    };
    c.batch_execute(GLANCE_2024_1).unwrap();
    c.batch_execute(
        "ALTER TABLE cached_images ADD COLUMN crc32 BIGINT;
         ALTER TABLE cached_images ADD COLUMN imgcache_checksum TEXT;
         INSERT INTO node_reference (node_reference_url) VALUES ('http://node-a:9292');
         INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum,
                                    node_reference_id, crc32, imgcache_checksum)
         SELECT 'old', now(), now(), 42, 3, NULL, node_reference_id, 12345, 'sha256:abc'
         FROM node_reference",
    )
    .unwrap();
    let store = CentralizedDbDriver::open(&url, "http://node-a:9292").unwrap();
    let got = store.list(&NoFiles).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].crc32, Some(12345));
    assert_eq!(got[0].checksum.as_deref(), Some("sha256:abc"));
    assert_eq!(got[0].hits, 3);
    // New commits still insert into the table with those columns.
    store.insert(&entry("new", Some(9))).unwrap();
    assert_eq!(store.list(&NoFiles).unwrap().len(), 2);
}

/// The store keeps no files: a listing needs none.
struct NoFiles;

impl imgcache::drivers::CachedFiles for NoFiles {
    fn each_cached(
        &self,
        _open: bool,
        _f: &mut dyn FnMut(&ImageId, imgcache::drivers::OnDisk<'_>) -> imgcache::Result<()>,
    ) -> imgcache::Result<()> {
        Ok(())
    }
}

/// An id longer than Glance's `VARCHAR(36)`: served from the origin with a
/// word that it was not cached, and taken off the prefetch queue with its
/// reason instead of failing at every pass.
#[test]
fn an_id_longer_than_glance_takes_is_served_uncached_and_unqueued() {
    use std::io::Read;
    let Some((url, mut c)) = fresh_database("imgcache_glance_long_id") else {
        return;
    };
    c.batch_execute(GLANCE_2024_1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let origin_dir = tempfile::tempdir().unwrap();
    let long = format!("{}-{}", "a".repeat(36), "tail");
    std::fs::write(origin_dir.path().join(&long), b"long id bytes").unwrap();
    let origin = imgcache::origin::DirOrigin::new(origin_dir.path());
    let store = std::sync::Arc::new(CentralizedDbDriver::open(&url, "http://node-a:9292").unwrap());
    let cache =
        imgcache::ImageCache::with_driver(store, imgcache::CacheOptions::new(dir.path())).unwrap();
    let id = ImageId::new(&long).unwrap();
    let err = cache.storable(&id).unwrap_err();
    assert!(err.to_string().contains("36 bytes"), "{err}");

    let mut stream = cache.fetch_from(&id, &origin).unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"long id bytes");
    match &stream {
        imgcache::ImageStream::Filling(tee) => {
            let why = tee.stats().cache_error.clone().unwrap_or_default();
            assert!(why.contains("36 bytes"), "{why:?}");
        }
        _ => panic!("not a miss"),
    }
    drop(stream);
    assert!(!cache.is_cached(&id).unwrap());

    cache.queue_image(&id).unwrap();
    let report = cache.prefetch(&origin, 2).unwrap();
    assert_eq!(report.results.len(), 1);
    let outcome = report.results[0].outcome.as_ref().unwrap_err();
    assert!(matches!(outcome, Error::InvalidId { .. }), "{outcome:?}");
    assert!(cache.queued_images().unwrap().is_empty(), "still queued");
}
