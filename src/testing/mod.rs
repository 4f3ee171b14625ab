//! Test support (feature `test-utils`; never in a release build): the
//! store conformance kit, the in-memory model of a cache, and the entry
//! points of the fuzz targets under `fuzz/` (which the tests replay on
//! stable Rust).
//!
//! # The conformance kit
//!
//! A [`Store`] says how to open one metadata store for a cache directory.
//! The behaviour suite, the streaming and zero-copy suites, the model test
//! and the kill test run every case against every store of
//! [`Store::all`], through [`crate::ImageCache::with_driver`]. A new store
//! joins them by one line in [`Store::all`] (and one in the tests'
//! `for_each_driver!` macro).
//!
//! The fuzz entry points return `Err` with a description when an invariant
//! breaks; the fuzz targets panic on it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::drivers::xattr::encoding;
use crate::drivers::{CacheDriver, SqliteDriver, XattrDriver};
use crate::error::Result;
use crate::{CacheOptions, Error, ImageCache, ImageId};

pub mod model;
#[cfg(feature = "postgres")]
pub mod postgres;

pub use model::{content, run, Op, IDS};

/// How to open one metadata store for a cache directory: the unit of the
/// conformance kit.
#[derive(Clone, Copy)]
pub struct Store {
    name: &'static str,
    open: fn(&CacheOptions) -> Result<Arc<dyn CacheDriver>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Store {
    /// The SQLite store, its database where `options` puts it.
    pub const SQLITE: Store = Store {
        name: "sqlite",
        open: |o| Ok(Arc::new(SqliteDriver::open(&o.sqlite_db_path())?)),
    };

    /// The xattr store (the directory's file system must take user xattrs).
    pub const XATTR: Store = Store {
        name: "xattr",
        open: |o| Ok(Arc::new(XattrDriver::open(o.image_cache_dir())?)),
    };

    /// A store of your own, for running the kit against it.
    pub const fn new(
        name: &'static str,
        open: fn(&CacheOptions) -> Result<Arc<dyn CacheDriver>>,
    ) -> Store {
        Store { name, open }
    }

    /// The `centralized_db` store on the test process's PostgreSQL server
    /// ([`postgres::cluster`]), as the node named by the cache directory
    /// (or the options' node URL).
    #[cfg(feature = "postgres")]
    pub const CENTRALIZED_DB: Store = Store {
        name: "centralized_db",
        open: |o| {
            let url = postgres::database_url()?;
            let node = match o.node_url_ref() {
                Some(n) => n.to_owned(),
                None => postgres::node_for(o.image_cache_dir()),
            };
            // The tests' database holds no Glance: the store makes its
            // tables, as a fleet without Glance does.
            Ok(Arc::new(crate::drivers::CentralizedDbDriver::open_with(
                &url,
                &node,
                crate::drivers::centralized_db::Tables::Create,
            )?))
        },
    };

    /// The `centralized_db` store if a PostgreSQL server can be had here;
    /// `None` after saying why (a panic where `IMGCACHE_REQUIRE_POSTGRES` is
    /// set). Always `None` without the `postgres` feature.
    pub fn centralized_db() -> Option<Store> {
        #[cfg(feature = "postgres")]
        {
            postgres::cluster().map(|_| Store::CENTRALIZED_DB)
        }
        #[cfg(not(feature = "postgres"))]
        {
            None
        }
    }

    /// Every store the kit runs against: SQLite, xattr, and
    /// `centralized_db` where a PostgreSQL server can be had.
    pub fn all() -> &'static [Store] {
        static ALL: std::sync::OnceLock<Vec<Store>> = std::sync::OnceLock::new();
        ALL.get_or_init(|| {
            let mut all = vec![Store::SQLITE, Store::XATTR];
            all.extend(Store::centralized_db());
            all
        })
    }

    /// The store named `name`, if it can be had here (only
    /// `centralized_db` reaches for a PostgreSQL server).
    pub fn by_name(name: &str) -> Option<Store> {
        match name {
            "sqlite" => Some(Store::SQLITE),
            "xattr" => Some(Store::XATTR),
            "centralized_db" => Store::centralized_db(),
            _ => None,
        }
    }

    /// The environment a child process needs to open this store as its
    /// parent does (the parent's PostgreSQL server).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        #[cfg(feature = "postgres")]
        if self.name == Store::CENTRALIZED_DB.name {
            return postgres::cluster()
                .map(|c| vec![c.child_env()])
                .unwrap_or_default();
        }
        Vec::new()
    }

    /// `options` with what [`ImageCache::open`] needs to open this store by
    /// its [`crate::DriverKind`] (for `centralized_db`: the test server's
    /// URL and a node URL of the cache directory).
    pub fn configure(&self, options: CacheOptions) -> CacheOptions {
        let options = options.driver(self.name.parse().unwrap_or_default());
        #[cfg(feature = "postgres")]
        if self.name == Store::CENTRALIZED_DB.name {
            let node = postgres::node_for(options.image_cache_dir());
            let options = options.node_url(node);
            return match postgres::database_url() {
                Ok(url) => options.database_url(url),
                Err(_) => options,
            };
        }
        options
    }

    /// Its name (the driver's, as Glance spells it).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Opens the store alone, for a cache `options` describe.
    pub fn driver(&self, options: &CacheOptions) -> Result<Arc<dyn CacheDriver>> {
        (self.open)(options)
    }

    /// Opens a cache on this store: the directory first, as
    /// [`ImageCache::open`] does, then the store, then
    /// [`ImageCache::with_driver`].
    pub fn open(&self, options: CacheOptions) -> Result<ImageCache> {
        crate::files::Layout::new(options.image_cache_dir(), Some(&options.sqlite_db_path()))
            .create()?;
        ImageCache::with_driver(self.driver(&options)?, options)
    }
}

/// `ImageId` parsing: never panics, and whatever it accepts is one plain
/// file name.
pub fn id(data: &[u8]) -> Result<(), String> {
    let Ok(s) = std::str::from_utf8(data) else {
        return Ok(());
    };
    match ImageId::new(s) {
        Ok(id) => {
            let mut parts = Path::new(id.as_str()).components();
            let one_normal = matches!(parts.next(), Some(std::path::Component::Normal(_)))
                && parts.next().is_none();
            if !one_normal || s.len() > 255 || s.contains(['/', '\0']) {
                return Err(format!("accepted unsafe id {s:?}"));
            }
            if id.as_str() != s {
                return Err("id changed its input".into());
            }
            Ok(())
        }
        Err(Error::InvalidId { input, .. }) if input == s => Ok(()),
        Err(e) => Err(format!("unexpected error {e}")),
    }
}

/// Decoders of stored values (xattr values, queue markers): never panic,
/// and what decodes re-encodes to something that decodes the same.
pub fn stored_values(data: &[u8]) -> Result<(), String> {
    if let Ok(n) = encoding::decode_u64(data) {
        if encoding::decode_u64(&encoding::encode_u64(n)) != Ok(n) {
            return Err(format!("count {n} does not round-trip"));
        }
    }
    if let Ok(t) = encoding::decode_time(data) {
        if encoding::decode_time(&encoding::encode_time(t)) != Ok(t) {
            return Err(format!("time {t:?} does not round-trip"));
        }
    }
    if let Ok(c) = encoding::decode_crc(data) {
        if encoding::decode_crc(&encoding::encode_crc(c)) != Ok(c) {
            return Err(format!("crc {c} does not round-trip"));
        }
    }
    if let Ok(e) = encoding::decode_entry(data) {
        if encoding::decode_entry(&encoding::encode_entry(&e)) != Ok(e) {
            return Err(format!("entry {e:?} does not round-trip"));
        }
    }
    if let Ok(w) = encoding::decode_watermark(data) {
        let (a, b) = w.to_micros();
        if encoding::decode_watermark(format!("{a} {b}").as_bytes()) != Ok(w) {
            return Err(format!("watermark {w:?} does not round-trip"));
        }
    }
    if let Some(seq) = crate::files::queue::decode_seq(data) {
        let again = crate::files::queue::encode_seq(seq);
        if crate::files::queue::decode_seq(again.as_bytes()) != Some(seq) {
            return Err(format!("queue seq {seq} does not round-trip"));
        }
    }
    Ok(())
}

/// A `cache.db` holding `data`, opened in `dir`: opening gives a cache or a
/// typed error, and an opened cache answers every query without panicking.
pub fn sqlite_db(dir: &Path, data: &[u8]) -> Result<(), String> {
    std::fs::write(dir.join("cache.db"), data).map_err(|e| e.to_string())?;
    let cache = match CacheOptions::new(dir).open() {
        Ok(c) => c,
        Err(Error::BadDatabase { .. } | Error::Store(_) | Error::CorruptMetadata { .. }) => {
            return Ok(())
        }
        Err(e) => return Err(format!("unexpected error opening a fuzzed database: {e}")),
    };
    // Errors are fine; panics are not.
    let _ = cache.cache_size();
    let _ = cache.least_recently_accessed();
    let _ = cache.queued_images();
    let _ = cache.invalid_images();
    if let Ok(images) = cache.cached_images() {
        for info in images {
            let _ = cache.open_for_read(&info.id);
            let _ = cache.verify(&info.id);
        }
    }
    let _ = cache.prune_to(0);
    let _ = cache.clean(Some(Duration::ZERO));
    Ok(())
}

/// The `ops` fuzz target: the first byte picks the store, the rest decode
/// to operations ([`Op::decode`]) run against the model in `dir`.
pub fn ops(dir: &Path, data: &[u8]) -> Result<(), String> {
    let Some((&pick, rest)) = data.split_first() else {
        return Ok(());
    };
    let stores = Store::all();
    let store = stores[usize::from(pick) % stores.len()];
    run(store, dir, &Op::decode(rest)).map_err(|e| format!("{store}: {e}"))
}

/// Database URLs as the options and the CLI take them: redaction never
/// panics, and where the input has a password, the output has `***` in its
/// place (in the URL's authority, or after libpq's `password=`).
pub fn urls(data: &[u8]) -> Result<(), String> {
    let Ok(url) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let shown = crate::options::redact_url(url);
    let authority = |u: &str| -> Option<String> {
        let (_, rest) = u.split_once("://")?;
        let at = rest.rfind('@')?;
        Some(rest[..at].to_owned())
    };
    match (authority(url), authority(&shown)) {
        (Some(given), Some(out)) => {
            if given.contains(':') && out.split_once(':').map(|(_, p)| p) != Some("***") {
                return Err(format!("{url:?} shown as {shown:?} keeps its password"));
            }
        }
        (Some(_), None) => return Err(format!("{url:?} lost its form: {shown:?}")),
        _ => {
            if !url.contains("://") {
                for (given, out) in url.split(' ').zip(shown.split(' ')) {
                    if let Some((k, _)) = given.split_once('=') {
                        if k.trim().eq_ignore_ascii_case("password") && out != format!("{k}=***") {
                            return Err(format!("{url:?} shown as {shown:?} keeps its password"));
                        }
                    }
                }
            }
        }
    }
    // The store's own description reads no password at all; it must not
    // panic on anything the client library accepts.
    #[cfg(feature = "postgres")]
    let _ = crate::drivers::centralized_db::redact(url);
    Ok(())
}

/// HTTP requests as the data path reads them: the request head (httparse),
/// the image path and its percent-encoded id, and the `Range` header, on
/// anything a client may send. Nothing panics; a head parsed is within the
/// input and the size limit; an id routed is valid and routes back to
/// itself once encoded again; a range granted lies inside the image.
#[cfg(feature = "serve")]
pub fn http_request(data: &[u8]) -> Result<(), String> {
    use crate::serve::{parse_head, range_ask, route, RangeAsk};
    let prefix = "/v2/images/";
    if let Ok(head) = parse_head(data) {
        if head.len > data.len() || head.len > 16 * 1024 {
            return Err(format!(
                "head of {} bytes from {} bytes",
                head.len,
                data.len()
            ));
        }
        check_route(prefix, &head.target)?;
        for value in head.headers.get_all("range") {
            if let Ok(v) = value.to_str() {
                check_range(v)?;
            }
        }
    }
    // The bytes as a path, and as a Range value, whatever they are.
    if let Ok(text) = std::str::from_utf8(data) {
        check_route(prefix, text)?;
        check_route(prefix, &format!("{prefix}{text}/file"))?;
        check_range(text)?;
        // As a peer's or an origin's answer to a resumed transfer.
        if let Some((start, Some(total))) = crate::range::content_range_start(text) {
            if start >= total {
                return Err(format!("{text:?} read as byte {start} of {total}"));
            }
        }
    }
    fn check_route(prefix: &str, path: &str) -> Result<(), String> {
        if let Some(Ok(id)) = route(prefix, path) {
            let again = format!(
                "{prefix}{}/file",
                crate::origin::template::percent_encode(id.as_str())
            );
            match route(prefix, &again) {
                Some(Ok(back)) if back == id => {}
                other => return Err(format!("{path:?} routed to {id}, {again:?} to {other:?}")),
            }
        }
        Ok(())
    }
    fn check_range(value: &str) -> Result<(), String> {
        for size in [0, 1, 100, u64::MAX] {
            if let RangeAsk::Part(r) = range_ask(Some(value), size) {
                if !(r.start < r.end && r.end <= size) {
                    return Err(format!("{value:?} on {size} bytes granted {r}"));
                }
            }
        }
        Ok(())
    }
    Ok(())
}

/// Management requests as the admin listener reads them (feature `admin`):
/// the method and path router, the token headers, and the size and
/// free-space values of its configuration, on anything. Nothing panics;
/// an id routed routes back to itself once encoded again; a free space
/// read as a share lies within 0–100 %.
#[cfg(feature = "admin")]
pub fn admin_request(data: &[u8]) -> Result<(), String> {
    use crate::serve::admin::{presented_token, route, AdminRoute};
    use http::Method;
    let Some((&selector, rest)) = data.split_first() else {
        return Ok(());
    };
    let methods = [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::POST,
        Method::HEAD,
        Method::PATCH,
    ];
    let method = &methods[usize::from(selector) % methods.len()];
    if let Ok(path) = std::str::from_utf8(rest) {
        let id_of = |r: &AdminRoute| match r {
            AdminRoute::Queue(id)
            | AdminRoute::Delete(id)
            | AdminRoute::Nodes(id)
            | AdminRoute::LegacyDeleteCached(id)
            | AdminRoute::LegacyQueue(id)
            | AdminRoute::LegacyDeleteQueued(id) => Some(id.clone()),
            _ => None,
        };
        let routed = route(method, path);
        if let Some(id) = id_of(&routed) {
            let encoded = crate::origin::template::percent_encode(id.as_str());
            let raw = path.split(['?', '#']).next().unwrap_or("");
            let raw = raw.strip_suffix('/').unwrap_or(raw);
            let base = &raw[..raw.rfind('/').unwrap_or(0)];
            let again = route(method, &format!("{base}/{encoded}"));
            if id_of(&again).as_ref() != Some(&id) {
                return Err(format!("{path:?} routed to {routed:?}, again to {again:?}"));
            }
        }
        for text in [path, path.trim()] {
            if let Ok(crate::MinFree::Percent(p)) = text.parse::<crate::MinFree>() {
                if !(0.0..=100.0).contains(&p) {
                    return Err(format!("{text:?} read as {p}%"));
                }
            }
            let _ = crate::options::parse_size(text);
        }
    }
    if let Ok(head) = crate::serve::parse_head(rest) {
        if let Some(token) = presented_token(&head.headers) {
            if token.len() > rest.len() {
                return Err(format!(
                    "a token of {} bytes from {}",
                    token.len(),
                    rest.len()
                ));
            }
        }
        let _ = route(&head.method, &head.target);
    }
    Ok(())
}
