//! The schema: Glance's tables (created only for a fleet without Glance),
//! imgcache's own beside them, and the one-time copy of what an earlier
//! version kept in columns it added to Glance's table.

/// Whether Glance's tables are there, whether imgcache's own are, and
/// whether its table of fills in progress (peer fill) is: a read-only open
/// needs only the first two.
pub(super) const SCHEMA_PRESENT: &str = "
SELECT to_regclass('node_reference') IS NOT NULL AND to_regclass('cached_images') IS NOT NULL,
       to_regclass('imgcache_entries') IS NOT NULL
   AND to_regclass('imgcache_invalid') IS NOT NULL
   AND to_regclass('imgcache_state') IS NOT NULL,
       to_regclass('imgcache_fills') IS NOT NULL";

/// Glance's tables as its 2024.1 migration creates them (`image_id` with
/// room for imgcache's ids): only with [`Tables::Create`].
pub(super) const GLANCE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS node_reference (
    node_reference_id BIGSERIAL PRIMARY KEY,
    node_reference_url VARCHAR(255) NOT NULL,
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
);
CREATE TABLE IF NOT EXISTS cached_images (
    id BIGSERIAL PRIMARY KEY,
    image_id VARCHAR(255) NOT NULL,
    last_accessed TIMESTAMP NOT NULL,
    last_modified TIMESTAMP NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
);
";

/// imgcache's own tables: no foreign key into Glance's.
pub(super) const OWN_TABLES: &str = "
CREATE TABLE IF NOT EXISTS imgcache_entries (
    cached_image_id BIGINT PRIMARY KEY,
    crc32 BIGINT,
    checksum TEXT
);
CREATE TABLE IF NOT EXISTS imgcache_invalid (
    node_reference_id BIGINT NOT NULL,
    image_id VARCHAR(255) NOT NULL,
    reason TEXT,
    invalidated_at TIMESTAMP,
    PRIMARY KEY (node_reference_id, image_id)
);
CREATE TABLE IF NOT EXISTS imgcache_state (
    node_reference_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (node_reference_id, key)
);
CREATE TABLE IF NOT EXISTS imgcache_fills (
    node_reference_id BIGINT NOT NULL,
    image_id VARCHAR(255) NOT NULL,
    size BIGINT,
    checksum TEXT,
    leads BOOLEAN NOT NULL DEFAULT false,
    fill_token BIGINT NOT NULL DEFAULT 0,
    started_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    PRIMARY KEY (node_reference_id, image_id)
);
";

/// Drops the `imgcache_entries` rows whose `cached_images` row is gone
/// (every statement that writes both does so at once, so a row seen
/// without its partner has lost it for good).
pub(super) const SWEEP_ENTRIES: &str = "
DELETE FROM imgcache_entries e
WHERE NOT EXISTS (SELECT 1 FROM cached_images c WHERE c.id = e.cached_image_id)";

/// Earlier versions kept the CRC-32 and long checksums in columns they
/// added to `cached_images`: copied into `imgcache_entries` once, when it
/// is created (the columns stay: dropping them would be DDL on Glance's
/// table).
pub(super) fn copy_legacy_columns(
    tx: &mut postgres::Transaction<'_>,
) -> std::result::Result<(), postgres::Error> {
    let legacy: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM information_schema.columns
             WHERE table_name = 'cached_images' AND table_schema = current_schema()
               AND column_name IN ('crc32', 'imgcache_checksum')",
            &[],
        )?
        .get(0);
    if legacy == 2 {
        tx.batch_execute(
            "INSERT INTO imgcache_entries (cached_image_id, crc32, checksum)
             SELECT id, crc32, imgcache_checksum FROM cached_images
             WHERE crc32 IS NOT NULL OR imgcache_checksum IS NOT NULL
             ON CONFLICT (cached_image_id) DO NOTHING",
        )?;
    }
    Ok(())
}

/// This node's id (`$1`: its URL).
pub(super) const NODE_ID: &str =
    "SELECT node_reference_id FROM node_reference WHERE node_reference_url = $1";

/// The longest `image_id` the table takes (Glance's: 36).
pub(super) const IMAGE_ID_LENGTH: &str = "
SELECT character_maximum_length FROM information_schema.columns
WHERE table_name = 'cached_images' AND column_name = 'image_id'
  AND table_schema = current_schema()";
