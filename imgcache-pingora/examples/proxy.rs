//! A caching reverse proxy on pingora, its cache on disk with imgcache.
//!
//! ```text
//! cargo run --release -p imgcache-pingora --example proxy -- \
//!     --listen 127.0.0.1:6188 --upstream 127.0.0.1:8080 \
//!     --dir /var/cache/proxy --max-size 50GiB [--threads 2]
//! ```
//!
//! Whole `200` responses to `GET` and `HEAD` that the upstream lets be
//! cached (its `Cache-Control`, or an hour where it says nothing; nothing
//! fetched with a client's credentials unless it says `public`) are kept
//! on disk, keyed by host and path (the upstream is always asked for the
//! whole object: no `Range`, no preconditions, `HEAD` as `GET`); concurrent misses of one object make one
//! upstream request (pingora's cache lock), the others reading the write
//! as it lands. Every response says `x-cache-status` (`hit`, `miss`, …).
//! `--memory` runs the same proxy on pingora's in-memory store instead,
//! for comparison.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use imgcache::{CacheOptions, ImageCache};
use imgcache_pingora::DiskCache;
use pingora_cache::cache_control::CacheControl;
use pingora_cache::filters::resp_cacheable;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::{CacheKey, CacheMetaDefaults, MemCache, NoCacheReason, RespCacheable, Storage};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_http::{Method, RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};

/// An hour for a `200` whose upstream says nothing about caching.
const DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(
    |status| (status.as_u16() == 200).then_some(Duration::from_secs(3600)),
    60,
    60,
);

struct Proxy {
    upstream: String,
    storage: &'static (dyn Storage + Sync),
    lock: &'static CacheKeyLockImpl,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    fn request_cache_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<()> {
        let method = &session.req_header().method;
        if method == Method::GET || method == Method::HEAD {
            // Eviction is imgcache's own (its byte limit, least recently
            // used first, durable): no pingora eviction manager.
            session
                .cache
                .enable(self.storage, None, None, Some(self.lock), None);
        }
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, _ctx: &mut ()) -> Result<CacheKey> {
        let req = session.req_header();
        let host = req
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        Ok(CacheKey::new(format!("{host}{path}"), ""))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if session.cache.enabled() {
            // The whole object, whatever the client asked: HEAD as GET, no
            // Range, no preconditions (a revalidation's own are added).
            pingora_cache::filters::upstream::request_filter(
                upstream_request,
                session.cache.maybe_cache_meta(),
            );
        }
        Ok(())
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        _ctx: &mut (),
    ) -> Result<RespCacheable> {
        // Whole objects only, and nothing a client's credentials fetched
        // unless the upstream says it may be shared.
        if resp.status.as_u16() != 200 {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                "not a whole object",
            )));
        }
        let authorized = session.req_header().headers.contains_key("authorization");
        let cc = CacheControl::from_resp_headers(resp);
        Ok(resp_cacheable(
            cc.as_ref(),
            resp.clone(),
            authorized,
            &DEFAULTS,
        ))
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        let status = match session.cache.phase() {
            pingora_cache::CachePhase::Hit => "hit".to_owned(),
            pingora_cache::CachePhase::Miss => "miss".to_owned(),
            pingora_cache::CachePhase::Stale => "stale".to_owned(),
            pingora_cache::CachePhase::Expired => "expired".to_owned(),
            pingora_cache::CachePhase::Revalidated => "revalidated".to_owned(),
            other => format!("bypass ({other:?})"),
        };
        upstream_response.insert_header("x-cache-status", status)?;
        Ok(())
    }
}

struct Args {
    listen: String,
    upstream: String,
    dir: Option<String>,
    max_size: u64,
    threads: usize,
    memory: bool,
}

fn args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:6188".into(),
        upstream: "127.0.0.1:8080".into(),
        dir: None,
        max_size: CacheOptions::DEFAULT_MAX_SIZE,
        threads: 2,
        memory: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value(),
            "--upstream" => a.upstream = value(),
            "--dir" => a.dir = Some(value()),
            "--max-size" => {
                a.max_size = CacheOptions::parse_size(&value()).unwrap_or_else(|e| panic!("{e}"))
            }
            "--threads" => a.threads = value().parse().expect("--threads N"),
            "--memory" => a.memory = true,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn main() {
    let a = args();
    let storage: &'static (dyn Storage + Sync) = if a.memory {
        Box::leak(Box::new(MemCache::new()))
    } else {
        let dir = a.dir.clone().expect("--dir DIR (or --memory)");
        let cache = ImageCache::builder(dir)
            .max_size(a.max_size)
            .open()
            .expect("open the cache");
        Box::leak(Box::new(
            DiskCache::new(Arc::new(cache)).expect("list the cache"),
        ))
    };
    let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(Duration::from_secs(600)));
    let conf = ServerConf {
        threads: a.threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        Proxy {
            upstream: a.upstream,
            storage,
            lock,
        },
    );
    proxy.add_tcp(&a.listen);
    server.add_service(proxy);
    println!("proxy listening on {}", a.listen);
    server.run_forever();
}
