//! The HTTP data path, with real sockets: a real origin server on
//! loopback (hyper), the cache's server (both transports: the zero-copy
//! `Server` and hyper's `serve_hyper`), and a real client (reqwest).

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use common::bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use imgcache::clock::ManualClock;
use imgcache::origin::AsyncHttpOrigin;
use imgcache::serve::{serve_hyper, ImageService, ServeOptions, Server};
use imgcache::testing::Store;
use imgcache::{CacheOptions, ImageCache, ImageId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// How the test origin answers for one image.
#[derive(Clone, Default)]
struct Served {
    data: Bytes,
    /// Fail after this many bytes (the connection aborted).
    fail_after: Option<usize>,
    /// Announce this MD5 (hex) instead of the right one.
    md5: Option<String>,
    /// Answer with this status and no body.
    status: Option<u16>,
    /// Send this many bytes, then wait for the gate before the rest.
    gate_after: Option<usize>,
    /// Bytes per chunk (default 64 KiB).
    chunk: Option<usize>,
}

/// A real HTTP origin on loopback, counting the requests it gets.
struct Origin {
    addr: SocketAddr,
    images: Arc<parking_lot::Mutex<HashMap<String, Served>>>,
    requests: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    tokens: Arc<parking_lot::Mutex<Vec<Option<String>>>>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let images: Arc<parking_lot::Mutex<HashMap<String, Served>>> = Default::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let tokens: Arc<parking_lot::Mutex<Vec<Option<String>>>> = Default::default();
        let (i, r, g, t) = (
            images.clone(),
            requests.clone(),
            gate.clone(),
            tokens.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (i, r, g, t) = (i.clone(), r.clone(), g.clone(), t.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (i, r, g, t) = (i.clone(), r.clone(), g.clone(), t.clone());
                            async move {
                                r.fetch_add(1, Ordering::SeqCst);
                                t.lock().push(
                                    req.headers()
                                        .get("x-auth-token")
                                        .map(|v| v.to_str().unwrap().to_owned()),
                                );
                                let name =
                                    req.uri().path().trim_start_matches("/images/").to_owned();
                                Ok::<_, Infallible>(answer(i.lock().get(&name).cloned(), g))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin {
            addr,
            images,
            requests,
            gate,
            tokens,
        }
    }

    fn put(&self, id: &str, served: Served) {
        self.images.lock().insert(id.to_owned(), served);
    }

    fn template(&self) -> String {
        format!("http://{}/images/{{id}}", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn answer(served: Option<Served>, gate: Arc<Semaphore>) -> hyper::Response<OriginBody> {
    let Some(s) = served else {
        return hyper::Response::builder()
            .status(404)
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
    };
    if let Some(status) = s.status {
        return hyper::Response::builder()
            .status(status)
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
    }
    let md5 = s.md5.clone().unwrap_or_else(|| md5_hex(&s.data));
    let len = s.data.len();
    let chunk = s.chunk.unwrap_or(64 * 1024);
    let stream = futures_util::stream::unfold((s, 0usize, false), move |(s, pos, waited)| {
        let gate = gate.clone();
        async move {
            if let Some(g) = s.gate_after {
                if pos >= g && !waited {
                    gate.acquire().await.unwrap().forget();
                    return Some((Ok(Frame::data(Bytes::new())), (s, pos, true)));
                }
            }
            if let Some(f) = s.fail_after {
                if pos >= f {
                    return Some((
                        Err(std::io::Error::other("origin failed")),
                        (s, usize::MAX, waited),
                    ));
                }
            }
            if pos >= s.data.len() {
                return None;
            }
            let mut end = (pos + chunk).min(s.data.len());
            if let Some(g) = s.gate_after.filter(|g| pos < *g && !waited) {
                end = end.min(g);
            }
            if let Some(f) = s.fail_after.filter(|f| pos < *f) {
                end = end.min(f);
            }
            let b = s.data.slice(pos..end);
            Some((Ok(Frame::data(b)), (s, end, waited)))
        }
    });
    hyper::Response::builder()
        .header("content-length", len)
        .header("content-md5", md5)
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Sendfile,
    Hyper,
}

const TRANSPORTS: [Transport; 2] = [Transport::Sendfile, Transport::Hyper];

/// The cache's server on loopback.
struct Front {
    _dir: tempfile::TempDir,
    cache: Arc<ImageCache>,
    base: String,
    client: reqwest::Client,
}

impl Front {
    async fn start(store: Store, origin: &Origin, transport: Transport) -> Front {
        Self::start_with(
            store,
            origin,
            transport,
            ServeOptions::default().public(true),
        )
        .await
    }

    async fn start_with(
        store: Store,
        origin: &Origin,
        transport: Transport,
        options: ServeOptions,
    ) -> Front {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(SystemTime::now());
        let cache_options = CacheOptions::new(dir.path()).clock(Arc::new(clock));
        // Opened off the runtime: a store may block (PostgreSQL's client
        // runs a runtime of its own).
        let cache = Arc::new(
            tokio::task::spawn_blocking(move || store.open(cache_options).unwrap())
                .await
                .unwrap(),
        );
        let http = AsyncHttpOrigin::new(origin.template()).unwrap();
        let service = ImageService::new(cache.clone(), Arc::new(http), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        match transport {
            Transport::Sendfile => {
                tokio::spawn(Server::new(listener, service).run());
            }
            Transport::Hyper => {
                tokio::spawn(serve_hyper(listener, service));
            }
        }
        Front {
            _dir: dir,
            cache,
            base: format!("http://{addr}/v2/images"),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    fn url(&self, id: &str) -> String {
        format!("{}/{id}/file", self.base)
    }

    async fn get(&self, id: &str) -> reqwest::Response {
        self.client.get(self.url(id)).send().await.unwrap()
    }
}

fn md5_hex(data: &[u8]) -> String {
    let mut h = imgcache::checksum::Hasher::new(imgcache::checksum::Algorithm::Md5);
    h.update(data);
    h.finish().hex().to_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a test's body on a fresh runtime; a failure is reported at once,
/// not after the runtime waits out work a failed test left behind.
fn block(body: impl std::future::Future<Output = ()>) {
    let rt = runtime();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(body)));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn image(seed: u64, len: usize) -> Served {
    Served {
        data: Bytes::from(bytes(seed, len)),
        ..Served::default()
    }
}

for_each_driver!(hits_and_misses_are_byte_exact);

fn hits_and_misses_are_byte_exact(store: Store) {
    block(async {
        let origin = Origin::start().await;
        let served = image(1, 3 * 1024 * 1024 + 17);
        origin.put("img", served.clone());
        origin.put("empty", image(2, 0));
        for transport in TRANSPORTS {
            let front = Front::start(store, &origin, transport).await;
            let before = origin.requests();
            let miss = front.get("img").await;
            assert_eq!(miss.status(), 200, "{transport:?}");
            assert_eq!(miss.headers()["x-imgcache"], "miss");
            assert_eq!(
                miss.headers()["content-length"],
                served.data.len().to_string().as_str()
            );
            assert_eq!(
                miss.bytes().await.unwrap(),
                served.data,
                "{transport:?} miss"
            );
            let hit = front.get("img").await;
            assert_eq!(hit.headers()["x-imgcache"], "hit", "{transport:?}");
            let md5 = md5_hex(&served.data);
            assert_eq!(hit.headers()["etag"], format!("\"{md5}\"").as_str());
            assert_eq!(hit.headers()["content-md5"], md5.as_str());
            assert_eq!(hit.headers()["accept-ranges"], "bytes");
            assert_eq!(hit.bytes().await.unwrap(), served.data, "{transport:?} hit");
            let empty = front.get("empty").await;
            assert_eq!(empty.status(), 200);
            assert!(empty.bytes().await.unwrap().is_empty());
            assert_eq!(front.get("empty").await.headers()["x-imgcache"], "hit");
            assert_eq!(
                origin.requests() - before,
                2,
                "{transport:?}: one origin request per image"
            );
            // The blocking API, off the runtime (a store may block).
            let cache = front.cache.clone();
            let hits = tokio::task::spawn_blocking(move || {
                cache.hit_count(&ImageId::new("img").unwrap()).unwrap()
            });
            assert_eq!(hits.await.unwrap(), 1);
        }
    });
}

/// Sends `n` requests for `name` at once; their responses once every one
/// has its headers (bodies unread).
async fn all_asking(front: &Front, name: &str, n: usize) -> Vec<reqwest::Response> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (front.client.clone(), front.url(name));
            tokio::spawn(async move { c.get(url).send().await.unwrap() })
        })
        .collect();
    let mut responses = Vec::with_capacity(n);
    for t in tasks {
        responses.push(t.await.unwrap());
    }
    responses
}

/// Request headers, the status wanted, and the bytes wanted.
type Case<'a> = (
    &'a [(&'a str, &'a str)],
    u16,
    Option<std::ops::Range<usize>>,
);

#[test]
fn ranges_heads_and_conditional_requests() {
    block(async {
        let origin = Origin::start().await;
        let served = image(3, 1_000_000);
        origin.put("img", served.clone());
        origin.put("cold", served.clone());
        origin.put("coldhead", served.clone());
        for transport in TRANSPORTS {
            let front = Front::start(Store::SQLITE, &origin, transport).await;
            let c = &front.client;
            let url = front.url("img");
            // A range on a miss: served from the filling file.
            let r = c
                .get(front.url("cold"))
                .header("range", "bytes=500000-500099")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206, "{transport:?}");
            assert_eq!(r.headers()["content-range"], "bytes 500000-500099/1000000");
            assert_eq!(
                r.bytes().await.unwrap(),
                served.data.slice(500_000..500_100)
            );
            // HEAD on a miss: the headers, no body, and the fill starts.
            let h = c.head(front.url("coldhead")).send().await.unwrap();
            assert_eq!(h.status(), 200);
            assert_eq!(h.headers()["content-length"], "1000000");
            assert!(h.bytes().await.unwrap().is_empty());
            // Warm "img".
            assert_eq!(
                c.get(&url).send().await.unwrap().bytes().await.unwrap(),
                served.data
            );
            let etag = c.head(&url).send().await.unwrap().headers()["etag"]
                .to_str()
                .unwrap()
                .to_owned();
            let cases: &[Case] = &[
                (&[("range", "bytes=0-0")], 206, Some(0..1)),
                (&[("range", "bytes=999990-")], 206, Some(999_990..1_000_000)),
                (&[("range", "bytes=-10")], 206, Some(999_990..1_000_000)),
                (
                    &[("range", "bytes=999990-2000000")],
                    206,
                    Some(999_990..1_000_000),
                ),
                (&[("range", "bytes=1000000-")], 416, None),
                (&[("range", "bytes=0-1,5-6")], 200, Some(0..1_000_000)),
                (&[("range", "lines=1-2")], 200, Some(0..1_000_000)),
                (&[("if-none-match", etag.as_str())], 304, None),
                (&[("if-none-match", "\"other\", *")], 304, None),
                (&[("if-none-match", "\"other\"")], 200, Some(0..1_000_000)),
                (
                    &[("range", "bytes=0-9"), ("if-range", etag.as_str())],
                    206,
                    Some(0..10),
                ),
                (
                    &[("range", "bytes=0-9"), ("if-range", "\"stale\"")],
                    200,
                    Some(0..1_000_000),
                ),
            ];
            for (headers, status, body) in cases {
                let mut req = c.get(&url);
                for (k, v) in *headers {
                    req = req.header(*k, *v);
                }
                let r = req.send().await.unwrap();
                assert_eq!(r.status().as_u16(), *status, "{transport:?} {headers:?}");
                if *status == 416 {
                    assert_eq!(r.headers()["content-range"], "bytes */1000000");
                }
                if *status == 206 {
                    let want = body.clone().unwrap();
                    assert_eq!(
                        r.headers()["content-range"],
                        format!("bytes {}-{}/1000000", want.start, want.end - 1).as_str()
                    );
                }
                let got = r.bytes().await.unwrap();
                match body {
                    Some(range) => assert_eq!(
                        got,
                        served.data.slice(range.clone()),
                        "{transport:?} {headers:?}"
                    ),
                    None if *status == 304 => assert!(got.is_empty()),
                    None => {}
                }
            }
            let head = c.head(&url).send().await.unwrap();
            assert_eq!(head.status(), 200);
            assert_eq!(head.headers()["content-length"], "1000000");
            assert!(head.bytes().await.unwrap().is_empty());
        }
    });
}

#[test]
fn statuses_for_what_is_not_an_image() {
    block(async {
        let origin = Origin::start().await;
        origin.put(
            "broken",
            Served {
                status: Some(500),
                ..Served::default()
            },
        );
        origin.put(
            "forbidden",
            Served {
                status: Some(403),
                ..Served::default()
            },
        );
        for transport in TRANSPORTS {
            let front = Front::start(Store::SQLITE, &origin, transport).await;
            let c = &front.client;
            assert_eq!(front.get("nowhere").await.status(), 404, "{transport:?}");
            assert_eq!(front.get("broken").await.status(), 502, "{transport:?}");
            assert_eq!(front.get("forbidden").await.status(), 502, "{transport:?}");
            assert_eq!(front.get("a%2Fb").await.status(), 400, "{transport:?}");
            assert_eq!(front.get("a%00b").await.status(), 400, "{transport:?}");
            assert_eq!(front.get("%ff").await.status(), 400, "{transport:?}");
            let other = c
                .get(format!("{}/x/other", front.base))
                .send()
                .await
                .unwrap();
            assert_eq!(other.status(), 404);
            let post = c.post(front.url("x")).send().await.unwrap();
            assert_eq!(post.status(), 405);
            assert_eq!(post.headers()["allow"], "GET, HEAD");
            assert!(front.cache.cached_images().unwrap().is_empty());
        }
    });
}

#[test]
fn a_hundred_cold_requests_make_one_origin_request() {
    block(async {
        let origin = Origin::start().await;
        let served = image(4, 8 * 1024 * 1024);
        for transport in TRANSPORTS {
            let name = format!("hot-{transport:?}");
            // Held at the origin until every client has asked.
            origin.put(
                &name,
                Served {
                    gate_after: Some(1024 * 1024),
                    ..served.clone()
                },
            );
            let front = Front::start(Store::SQLITE, &origin, transport).await;
            let before = origin.requests();
            // Every client has its headers (the origin answered) while the
            // origin holds the rest of the body: all follow one fill.
            let responses = all_asking(&front, &name, 100).await;
            origin.gate.add_permits(1);
            let tasks = responses.into_iter().map(|r| {
                tokio::spawn(async move {
                    let source = r.headers()["x-imgcache"].to_str().unwrap().to_owned();
                    (source, r.bytes().await.unwrap())
                })
            });
            let mut misses = 0;
            for t in tasks {
                let (source, body) = t.await.unwrap();
                assert_eq!(body, served.data, "{transport:?}");
                assert!(source == "follow" || source == "miss", "{source}");
                misses += usize::from(source == "miss");
            }
            assert_eq!(misses, 1, "{transport:?}: one request started the fill");
            assert_eq!(
                origin.requests() - before,
                1,
                "{transport:?}: single flight"
            );
        }
    });
}

#[test]
fn a_stalled_client_does_not_hold_back_the_others() {
    block(async {
        let origin = Origin::start().await;
        let served = image(5, 24 * 1024 * 1024);
        for transport in TRANSPORTS {
            let name = format!("big-{transport:?}");
            origin.put(&name, served.clone());
            let front = Front::start(Store::SQLITE, &origin, transport).await;
            // A client that asks and never reads: its socket buffers fill up.
            let addr = front
                .base
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap()
                .to_owned();
            let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stalled
                .write_all(
                    format!("GET /v2/images/{name}/file HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
            let mut first = [0u8; 1];
            stalled.read_exact(&mut first).await.unwrap();
            let mut tasks = Vec::new();
            for _ in 0..10 {
                let (c, url) = (front.client.clone(), front.url(&name));
                tasks.push(tokio::spawn(async move {
                    c.get(url).send().await.unwrap().bytes().await.unwrap()
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap(), served.data, "{transport:?}");
            }
            // The fill finished without the stalled client.
            assert!(front
                .cache
                .is_cached(&ImageId::new(&name).unwrap())
                .unwrap());
            assert_eq!(front.get(&name).await.headers()["x-imgcache"], "hit");
            drop(stalled);
        }
    });
}

#[test]
fn a_client_that_leaves_mid_fill_does_not_stop_it() {
    block(async {
        let origin = Origin::start().await;
        let served = image(6, 4 * 1024 * 1024);
        for transport in TRANSPORTS {
            let name = format!("left-{transport:?}");
            origin.put(
                &name,
                Served {
                    gate_after: Some(1024 * 1024),
                    ..served.clone()
                },
            );
            let front = Front::start(Store::SQLITE, &origin, transport).await;
            let before = origin.requests();
            let mut r = front.get(&name).await;
            let chunk = r.chunk().await.unwrap().unwrap();
            assert!(!chunk.is_empty());
            drop(r);
            origin.gate.add_permits(1);
            // The next client follows the same fill (or hits its result).
            let again = front.get(&name).await;
            assert_eq!(again.bytes().await.unwrap(), served.data, "{transport:?}");
            assert_eq!(front.get(&name).await.headers()["x-imgcache"], "hit");
            assert_eq!(origin.requests() - before, 1, "{transport:?}");
        }
    });
}

#[test]
fn a_failed_fill_cuts_every_body_and_caches_nothing() {
    block(async {
        let origin = Origin::start().await;
        let served = image(7, 2 * 1024 * 1024);
        for transport in TRANSPORTS {
            let failing = format!("failing-{transport:?}");
            let wrong = format!("wrong-{transport:?}");
            let short = format!("short-{transport:?}");
            origin.put(
                &failing,
                Served {
                    fail_after: Some(1024 * 1024),
                    gate_after: Some(512 * 1024),
                    ..served.clone()
                },
            );
            origin.put(
                &wrong,
                Served {
                    md5: Some("0".repeat(32)),
                    gate_after: Some(512 * 1024),
                    ..served.clone()
                },
            );
            origin.put(
                &short,
                Served {
                    fail_after: Some(2 * 1024 * 1024 - 1),
                    ..served.clone()
                },
            );
            let front = Front::start(Store::SQLITE, &origin, transport).await;
            for name in [&failing, &wrong] {
                let responses = all_asking(&front, name, 5).await;
                origin.gate.add_permits(1);
                let tasks = responses.into_iter().map(|r| {
                    assert_eq!(r.status(), 200);
                    tokio::spawn(r.bytes())
                });
                for t in tasks {
                    let got = t.await.unwrap();
                    assert!(
                        got.is_err(),
                        "{transport:?} {name}: a clean body of {:?} bytes",
                        got.map(|b| b.len())
                    );
                }
            }
            // Cut one byte short by the origin: the client's body is cut too.
            assert!(
                front.get(&short).await.bytes().await.is_err(),
                "{transport:?}"
            );
            assert!(
                front.cache.cached_images().unwrap().is_empty(),
                "{transport:?}"
            );
        }
    });
}

#[test]
fn the_fill_forwards_the_clients_token_when_asked() {
    block(async {
        let origin = Origin::start().await;
        origin.put("a", image(8, 1000));
        origin.put("b", image(9, 1000));
        let plain = Front::start(Store::SQLITE, &origin, Transport::Sendfile).await;
        let r = plain
            .client
            .get(plain.url("a"))
            .header("x-auth-token", "secret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 1000);
        let forwarding = Front::start_with(
            Store::SQLITE,
            &origin,
            Transport::Hyper,
            ServeOptions::default()
                .public(true)
                .forward_auth_token(true),
        )
        .await;
        let r = forwarding
            .client
            .get(forwarding.url("b"))
            .header("x-auth-token", "secret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 1000);
        assert_eq!(*origin.tokens.lock(), vec![None, Some("secret".to_owned())]);
    });
}

#[test]
fn the_service_mounts_in_an_axum_router() {
    block(async {
        let origin = Origin::start().await;
        let served = image(10, 100_000);
        origin.put("img", served.clone());
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ImageCache::builder(dir.path()).open().unwrap());
        let service = ImageService::new(
            cache,
            Arc::new(AsyncHttpOrigin::new(origin.template()).unwrap()),
            ServeOptions::default().public(true),
        );
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route_service("/v2/images/{id}/file", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{addr}/v2/images/img/file");
        assert_eq!(
            c.get(&url).send().await.unwrap().bytes().await.unwrap(),
            served.data
        );
        let hit = c
            .get(&url)
            .header("range", "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(hit.status(), 206);
        assert_eq!(hit.headers()["x-imgcache"], "hit");
        assert_eq!(hit.bytes().await.unwrap(), served.data.slice(10..20));
        let ok = c
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");
    });
}

/// Writes `request` on a fresh connection and reads until the server
/// closes it; the whole answer as text (bodies here are short).
async fn raw(addr: &str, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_zero_copy_server_speaks_http_1_0_and_1_1() {
    block(async {
        let origin = Origin::start().await;
        origin.put("img", image(11, 5000));
        let front = Front::start(Store::SQLITE, &origin, Transport::Sendfile).await;
        assert_eq!(front.get("img").await.bytes().await.unwrap().len(), 5000);
        let addr = front
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        // HTTP/1.0: a length, and the connection closed after the answer.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /v2/images/img/file HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut bytes = Vec::new();
        s.read_to_end(&mut bytes).await.unwrap();
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(bytes.len() - end, 5000);
        let old = String::from_utf8_lossy(&bytes[..end]).into_owned();
        assert!(old.starts_with("HTTP/1.1 200 OK\r\n"), "{old}");
        assert!(old.contains("content-length: 5000\r\n") && old.contains("connection: close\r\n"));
        // HTTP/1.0 keep-alive is echoed; two pipelined HTTP/1.1 requests,
        // the second closing; a HEAD with a Range gets the whole length.
        let many = raw(
            &addr,
            "HEAD /v2/images/img/file HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
             HEAD http://cache/v2/images/img/file HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n\
             GET /v2/images/img/file HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n",
        )
        .await;
        let answers: Vec<&str> = many.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), 3, "{many}");
        assert!(answers[0].starts_with("200") && answers[0].contains("connection: keep-alive"));
        assert!(
            answers[1].starts_with("200") && answers[1].contains("content-length: 5000"),
            "{}",
            answers[1]
        );
        assert!(
            answers[2].starts_with("206") && answers[2].contains("content-range: bytes 0-9/5000")
        );
        // Refused before any planning: no Host, two lengths, a body.
        for bad in [
            "GET /v2/images/img/file HTTP/1.1\r\n\r\n",
            "GET /v2/images/img/file HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nabcde",
            "GET /v2/images/img/file HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "\x01\x02 garbage\r\n\r\n",
        ] {
            let answer = raw(&addr, bad).await;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{bad:?}: {answer}");
        }
    });
}

/// An origin whose `open` panics: the fill's followers get an error, not
/// a wait for ever, and the next request fills afresh.
///
/// The first follower is still alive when the second fill starts: it must
/// not hold the failed writer's lock (a `dup` of its file would, and the
/// second fill would wait for the follower for ever).
#[test]
fn a_panicking_origin_ends_the_fill() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::builder(dir.path()).open().unwrap();
    let id = ImageId::new("boom").unwrap();
    let first = cache
        .fetch_detached(&id, || panic!("the origin panics"))
        .unwrap();
    let imgcache::Fetched::Following(follower) = first else {
        panic!("a miss is followed");
    };
    assert!(follower.wait_started().is_err());
    let again = cache
        .fetch_detached(&id, || {
            Ok(imgcache::origin::OriginObject {
                reader: Box::new(&b"fine"[..]),
                size: Some(4),
                checksum: None,
            })
        })
        .unwrap();
    let imgcache::Fetched::Following(mut follower) = again else {
        panic!("a new fill");
    };
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut follower, &mut got).unwrap();
    assert_eq!(got, b"fine");
}

/// A follower keeps reading a failed fill's file, but never its writer's
/// lock: another thread or process waiting for that writer goes on as soon
/// as the writer is gone.
#[test]
fn a_follower_does_not_hold_the_writers_lock() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::builder(dir.path()).open().unwrap();
    let id = ImageId::new("held").unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let origin_id = id.clone();
    let first = cache
        .fetch_detached(&id, move || {
            let _ = wait.recv();
            Err(imgcache::Error::Origin {
                id: origin_id,
                origin: "test".into(),
                detail: "refused".into(),
            })
        })
        .unwrap();
    let imgcache::Fetched::Following(follower) = first else {
        panic!("a miss is followed");
    };
    let file = std::fs::File::open(dir.path().join("incomplete").join("held")).unwrap();
    assert!(file.try_lock_shared().is_err(), "the writer holds its lock");
    go.send(()).unwrap();
    assert!(follower.wait_started().is_err());
    // The writer is gone (discarded before its followers heard); the
    // follower, still alive, must not keep the lock.
    file.try_lock_shared()
        .expect("the lock went with the writer, though a follower lives");
    drop(follower);
}

/// An origin's bytes, held at `at` until `go` says, telling `dropped`
/// when the fill lets go of them (after its commit, or its failure).
struct HeldReader {
    data: Vec<u8>,
    pos: usize,
    at: usize,
    go: Option<std::sync::mpsc::Receiver<()>>,
    dropped: std::sync::mpsc::Sender<()>,
}

impl std::io::Read for HeldReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.at {
            if let Some(go) = self.go.take() {
                let _ = go.recv();
            }
        }
        let end = if self.pos < self.at {
            self.at
        } else {
            self.data.len()
        };
        let n = (end - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for HeldReader {
    fn drop(&mut self) {
        let _ = self.dropped.send(());
    }
}

/// A fill invalidated under its thread (a shutdown) never publishes
/// anything when its thread wakes and reaches its end — above all not the
/// file of a newer fill of the same image, half written.
#[test]
fn an_invalidated_fill_never_publishes_another_fills_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::builder(dir.path()).open().unwrap();
    let id = ImageId::new("twice").unwrap();
    let (old_bytes, new_bytes) = (vec![1u8; 300_000], vec![2u8; 300_000]);
    let held = |data: Vec<u8>| {
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let (drop_tx, drop_rx) = std::sync::mpsc::channel();
        let reader = HeldReader {
            data,
            pos: 0,
            at: 100_000,
            go: Some(go_rx),
            dropped: drop_tx,
        };
        (reader, go_tx, drop_rx)
    };
    let (old_reader, old_go, old_dropped) = held(old_bytes.clone());
    let old = cache
        .fetch_detached(&id, move || {
            Ok(imgcache::origin::OriginObject {
                reader: Box::new(old_reader),
                size: Some(300_000),
                checksum: None,
            })
        })
        .unwrap();
    let imgcache::Fetched::Following(old) = old else {
        panic!("a miss is followed");
    };
    // The old fill has written its first 100 000 bytes, and waits.
    assert!(old.wait_ready(0, None).unwrap().is_some());
    assert_eq!(cache.invalidate_fills("test: stopped"), 1);
    assert!(old.wait_ready(0, None).is_err(), "its followers hear of it");
    // A newer fill of the same image, held half way too.
    let (new_reader, new_go, _new_dropped) = held(new_bytes.clone());
    let new = cache
        .fetch_detached(&id, move || {
            Ok(imgcache::origin::OriginObject {
                reader: Box::new(new_reader),
                size: Some(300_000),
                checksum: None,
            })
        })
        .unwrap();
    let imgcache::Fetched::Following(mut new) = new else {
        panic!("a new fill");
    };
    assert!(new.wait_ready(0, None).unwrap().is_some());
    // The old thread wakes, reads to its end and tries to commit.
    old_go.send(()).unwrap();
    old_dropped.recv().unwrap();
    assert!(
        !cache.is_cached(&id).unwrap(),
        "the old fill published the new fill's half-written file"
    );
    new_go.send(()).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut new, &mut got).unwrap();
    assert_eq!(got, new_bytes);
    let mut hit = cache.open_for_read(&id).unwrap().expect("cached");
    let mut cached = Vec::new();
    std::io::Read::read_to_end(&mut hit, &mut cached).unwrap();
    assert_eq!(cached, new_bytes);
    drop(old_bytes);
}
