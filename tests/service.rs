//! `imgcache serve` as a service: the management API on its own listener
//! (Glance's `/v2/cache` shapes), access control, the in-process jobs and
//! admission, metrics, graceful shutdown, configuration. A real HTTP client
//! against real listening servers, and a real process for the signals.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use imgcache::origin::{AsyncHttpOrigin, DirOrigin, Origin};
use imgcache::serve::admin::{serve_admin, AdminOptions, AdminService};
use imgcache::serve::jobs::{JobOptions, Jobs};
use imgcache::serve::{ImageService, Metrics, Outcome, ServeOptions, Server};
use imgcache::{ImageCache, ImageId, MinFree};
use serde_json::Value;
use tokio::sync::Semaphore;

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a fresh runtime, then lets the blocking pool go.
fn block<F: std::future::Future>(f: F) -> F::Output {
    let rt = runtime();
    let out = rt.block_on(f);
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}

/// A data port and a management port on one cache.
struct Node {
    data: SocketAddr,
    admin: SocketAddr,
    cache: Arc<ImageCache>,
    metrics: Arc<Metrics>,
    jobs: Arc<Jobs>,
    client: reqwest::Client,
    token: Option<String>,
}

impl Node {
    async fn start(
        cache: ImageCache,
        origin: Arc<dyn Origin>,
        serve: ServeOptions,
        admin: AdminOptions,
    ) -> Node {
        let jobs = JobOptions::default().clean_interval(None);
        Self::start_with_jobs(cache, origin, serve, admin, jobs).await
    }

    async fn start_with_jobs(
        cache: ImageCache,
        origin: Arc<dyn Origin>,
        serve: ServeOptions,
        admin: AdminOptions,
        job_options: JobOptions,
    ) -> Node {
        let cache = Arc::new(cache);
        let metrics = Arc::new(Metrics::new());
        let service =
            ImageService::with_metrics(cache.clone(), origin.clone(), serve, metrics.clone());
        let (c, o, m) = (cache.clone(), origin.clone(), metrics.clone());
        let jobs = Arc::new(
            tokio::task::spawn_blocking(move || Jobs::start(c, o, m, job_options))
                .await
                .unwrap()
                .unwrap(),
        );
        let data_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (data, admin_addr) = (data_l.local_addr().unwrap(), admin_l.local_addr().unwrap());
        let token = admin.requires_token().then(|| "s3cret-token".to_owned());
        let api = AdminService::new(cache.clone(), metrics.clone(), Some(jobs.clone()), admin);
        tokio::spawn(Server::new(data_l, service).run());
        tokio::spawn(serve_admin(admin_l, api, std::future::pending()));
        Node {
            data,
            admin: admin_addr,
            cache,
            metrics,
            jobs,
            client: reqwest::Client::new(),
            token,
        }
    }

    fn image(&self, id: &str) -> String {
        format!("http://{}/v2/images/{id}/file", self.data)
    }

    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        let mut r = self.client.request(method, self.api(path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap()
    }

    async fn json(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let r = self.call(method, path).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, id: &str) -> (u16, String, Bytes) {
        let r = self.client.get(self.image(id)).send().await.unwrap();
        let status = r.status().as_u16();
        let source = r.headers()["x-imgcache"].to_str().unwrap().to_owned();
        (status, source, r.bytes().await.unwrap())
    }

    /// Waits (on the cache's commits, not a clock) until `id` is cached.
    async fn wait_cached(&self, id: &str) {
        let cache = self.cache.clone();
        let id = ImageId::new(id).unwrap();
        tokio::task::spawn_blocking(move || {
            let mut seen = 0;
            for _ in 0..1000 {
                // Cached, and out of the queue (the commit's last step).
                if cache.is_cached(&id).unwrap() && !cache.is_queued(&id).unwrap() {
                    return;
                }
                seen = cache.wait_for_commit(seen, Duration::from_millis(100));
            }
            panic!("{id} never cached");
        })
        .await
        .unwrap();
    }
}

fn dir_origin(images: &[(&str, &[u8])]) -> (tempfile::TempDir, Arc<dyn Origin>) {
    let dir = tempfile::tempdir().unwrap();
    for (id, bytes) in images {
        std::fs::write(dir.path().join(id), bytes).unwrap();
    }
    let origin = Arc::new(DirOrigin::new(dir.path()));
    (dir, origin)
}

#[test]
fn the_management_api_answers_as_glance_does() {
    let cache_dir = tempfile::tempdir().unwrap();
    let (a, b) = (data(300_000, 1), data(200_000, 2));
    let (_o, origin) = dir_origin(&[("a", &a), ("b", &b)]);
    block(async {
        let cache = ImageCache::builder(cache_dir.path()).open().unwrap();
        let node = Node::start(
            cache,
            origin,
            ServeOptions::default(),
            AdminOptions::default(),
        )
        .await;
        use reqwest::Method as M;

        // A client caches `a` and reads it again.
        assert_eq!(node.get("a").await.0, 200);
        let (status, source, body) = node.get("a").await;
        assert_eq!((status, source.as_str()), (200, "hit"));
        assert_eq!(body, a);

        let (status, state) = node.json(M::GET, "/v2/cache").await;
        assert_eq!(status, 200);
        let cached = state["cached_images"].as_array().unwrap();
        assert_eq!(cached.len(), 1);
        let entry = &cached[0];
        assert_eq!(entry["image_id"], "a");
        assert_eq!(entry["size"], 300_000);
        assert_eq!(entry["hits"], 1);
        assert!(entry["last_accessed"].as_f64().unwrap() > 1.6e9);
        assert!(entry["last_modified"].as_f64().unwrap() > 1.6e9);
        assert_eq!(state["queued_images"], serde_json::json!([]));

        // PUT: queued, and cached without any client asking.
        let r = node.call(M::PUT, "/v2/cache/b").await;
        assert_eq!(r.status(), 202);
        node.wait_cached("b").await;
        let (_, state) = node.json(M::GET, "/v2/cache").await;
        assert_eq!(state["cached_images"].as_array().unwrap().len(), 2);
        assert_eq!(state["queued_images"], serde_json::json!([]));
        assert_eq!(node.get("b").await.1, "hit");

        // DELETE one: 204, then 404; invalid ids 400; other methods 405.
        assert_eq!(node.call(M::DELETE, "/v2/cache/b").await.status(), 204);
        let (status, err) = node.json(M::DELETE, "/v2/cache/b").await;
        assert_eq!(status, 404);
        assert_eq!(err["code"], 404);
        assert!(err["message"].as_str().unwrap().contains('b'));
        assert_eq!(node.json(M::PUT, "/v2/cache/a%2Fb").await.0, 400);
        assert_eq!(node.json(M::DELETE, "/v2/cache/%00").await.0, 400);
        let r = node.call(M::POST, "/v2/cache").await;
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET, DELETE");
        assert_eq!(node.call(M::GET, "/v2/cache/prune").await.status(), 405);
        assert_eq!(node.json(M::GET, "/v2/nothing").await.0, 404);

        // DELETE /v2/cache and its header.
        let clear = |target: Option<&'static str>| {
            let mut r = node.client.delete(node.api("/v2/cache"));
            if let Some(t) = target {
                r = r.header("x-image-cache-clear-target", t);
            }
            r.send()
        };
        assert_eq!(node.call(M::PUT, "/queued_images/q1").await.status(), 200);
        let r = clear(Some("bogus")).await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("x-image-cache-clear-target"));
        assert_eq!(clear(Some("queue")).await.unwrap().status(), 204);
        let (_, state) = node.json(M::GET, "/v2/cache").await;
        assert_eq!(state["queued_images"], serde_json::json!([]));
        assert_eq!(state["cached_images"].as_array().unwrap().len(), 1);
        assert_eq!(clear(Some("cache")).await.unwrap().status(), 204);
        assert_eq!(
            node.json(M::GET, "/cached_images").await.1["cached_images"],
            serde_json::json!([])
        );
        assert_eq!(node.get("a").await.1, "miss");
        assert_eq!(clear(None).await.unwrap().status(), 204);
        assert_eq!(clear(Some("")).await.unwrap().status(), 204);
        assert!(!node.cache.is_cached(&ImageId::new("a").unwrap()).unwrap());

        // Prune and clean report their totals.
        assert_eq!(node.get("a").await.1, "miss");
        let (status, pruned) = node.json(M::POST, "/v2/cache/prune").await;
        assert_eq!(status, 200);
        assert_eq!(pruned["total_files_pruned"], 0);
        assert_eq!(pruned["total_bytes_pruned"], 0);
        std::fs::write(cache_dir.path().join("invalid").join("junk"), b"12345").unwrap();
        let (status, cleaned) = node.json(M::POST, "/v2/cache/clean").await;
        assert_eq!(status, 200);
        assert_eq!(cleaned["total_files_cleaned"], 1);
        assert_eq!(cleaned["total_bytes_cleaned"], 5);
        assert_eq!(cleaned["invalid_files_cleaned"], 1);

        // Nodes: only with the shared store (Glance's 409).
        assert_eq!(node.json(M::GET, "/v2/cache/nodes/a").await.0, 409);

        // The legacy paths.
        let (status, listed) = node.json(M::GET, "/v1/cached-images").await;
        assert_eq!(status, 200);
        assert_eq!(listed["cached_images"][0]["image_id"], "a");
        assert_eq!(node.call(M::PUT, "/queued-images/zz").await.status(), 200);
        assert_eq!(
            node.json(M::GET, "/queued_images").await.1["queued_images"],
            serde_json::json!(["zz"])
        );
        assert_eq!(
            node.json(M::DELETE, "/queued_images").await.1["num_deleted"],
            1
        );
        assert_eq!(node.call(M::DELETE, "/cached_images/a").await.status(), 204);
        assert_eq!(node.call(M::DELETE, "/cached_images/a").await.status(), 404);

        // The counters are what this test did: 2 hits (a, b), 3 misses
        // (a three times), no follows.
        let m = &node.metrics;
        assert_eq!(m.requests(Outcome::Hit), 2);
        assert_eq!(m.requests(Outcome::Miss), 3);
        assert_eq!(m.requests(Outcome::Follow), 0);
        assert_eq!(m.served_bytes("cache"), 300_000 + 200_000);
        assert_eq!(m.served_bytes("origin"), 3 * 300_000);
        assert_eq!(m.origin_requests("authorize"), 5);
        // The prefetch worker counts its run after the commit: its join
        // waits for it (the API still answers without the jobs).
        let jobs = node.jobs.clone();
        tokio::task::spawn_blocking(move || jobs.stop())
            .await
            .unwrap();
        let text = node.call(M::GET, "/metrics").await.text().await.unwrap();
        assert!(
            text.contains("imgcache_requests_total{result=\"hit\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("imgcache_requests_total{result=\"miss\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("imgcache_served_bytes_total{source=\"cache\"} 500000"),
            "{text}"
        );
        assert!(text.contains("imgcache_cached_images 0"), "{text}");
        assert!(
            text.contains("imgcache_job_runs_total{job=\"prefetch\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("imgcache_free_bytes "), "{text}");
        let health = node.client.get(node.api("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);

        // The management API is never on the data port, nor the data path
        // on the management port.
        let r = node
            .client
            .get(format!("http://{}/v2/cache", node.data))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = node
            .client
            .get(format!("http://{}/v2/images/a/file", node.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        node.jobs.stop();
    });
}

#[test]
fn the_management_api_wants_its_token() {
    let cache_dir = tempfile::tempdir().unwrap();
    let (_o, origin) = dir_origin(&[]);
    block(async {
        let cache = ImageCache::builder(cache_dir.path()).open().unwrap();
        let node = Node::start(
            cache,
            origin,
            ServeOptions::default(),
            AdminOptions::default().token(Some("s3cret-token".into())),
        )
        .await;
        let url = node.api("/v2/cache");
        let c = &node.client;
        let none = c.get(&url).send().await.unwrap();
        assert_eq!(none.status(), 401);
        assert!(none.headers().contains_key("www-authenticate"));
        assert_eq!(
            c.get(&url)
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(
            c.get(&url)
                .bearer_auth("s3cret-token")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let r = c
            .get(&url)
            .header("x-auth-token", "s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            c.get(node.api("/metrics")).send().await.unwrap().status(),
            401
        );
        assert_eq!(
            c.put(node.api("/v2/cache/x"))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
        assert_eq!(
            c.get(node.api("/healthz")).send().await.unwrap().status(),
            200
        );
        assert!(!node.cache.is_queued(&ImageId::new("x").unwrap()).unwrap());
        node.jobs.stop();
    });
}

/// An HTTP origin that checks tokens: `good` may read everything, `other`
/// everything but `secret` (which it may not even see: 404), a wrong token
/// is 403, none 401. `gate`d images hold their bodies until a permit.
struct AuthOrigin {
    addr: SocketAddr,
    heads: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
}

async fn auth_origin(images: HashMap<String, Vec<u8>>, gate: Arc<Semaphore>) -> AuthOrigin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let gets = Arc::new(AtomicUsize::new(0));
    let images = Arc::new(images);
    let (h, g) = (heads.clone(), gets.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (images, h, g, gate) = (images.clone(), h.clone(), g.clone(), gate.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (images, h, g, gate) =
                            (images.clone(), h.clone(), g.clone(), gate.clone());
                        async move {
                            let head = req.method() == hyper::Method::HEAD;
                            if head {
                                h.fetch_add(1, Ordering::SeqCst);
                            } else {
                                g.fetch_add(1, Ordering::SeqCst);
                            }
                            let name = req.uri().path().trim_start_matches("/images/").to_owned();
                            let token = req
                                .headers()
                                .get("x-auth-token")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let status = match (token.as_deref(), name.as_str()) {
                                (None, _) => 401,
                                (Some("good"), _) => 200,
                                (Some("other"), "secret") => 404,
                                (Some("other"), _) => 200,
                                _ => 403,
                            };
                            let body = images.get(&name).cloned();
                            let status = if status == 200 && body.is_none() {
                                404
                            } else {
                                status
                            };
                            let mut b = hyper::Response::builder().status(status);
                            if status != 200 || head {
                                if let Some(body) = &body {
                                    b = b.header("content-length", body.len());
                                }
                                return Ok::<_, Infallible>(
                                    b.body(http_body_util::Either::Left(Full::new(Bytes::new())))
                                        .unwrap(),
                                );
                            }
                            let body = body.unwrap();
                            b = b.header("content-length", body.len());
                            let gated = name.starts_with("slow");
                            let stream = futures_util::stream::unfold(
                                (0usize, body, gate, gated),
                                |(pos, body, gate, gated)| async move {
                                    if pos >= body.len() {
                                        return None;
                                    }
                                    if pos > 0 && gated {
                                        gate.acquire().await.unwrap().forget();
                                    }
                                    let end = (pos + 64 * 1024).min(body.len());
                                    let chunk = Bytes::copy_from_slice(&body[pos..end]);
                                    Some((
                                        Ok::<_, Infallible>(hyper::body::Frame::data(chunk)),
                                        (end, body, gate, gated),
                                    ))
                                },
                            );
                            Ok(
                                b.body(http_body_util::Either::Right(StreamBody::new(stream)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    AuthOrigin { addr, heads, gets }
}

#[test]
fn a_client_the_origin_refuses_never_gets_a_cached_image() {
    let cache_dir = tempfile::tempdir().unwrap();
    let (img, secret) = (data(100_000, 3), data(50_000, 4));
    block(async {
        let images = HashMap::from([
            ("img".to_owned(), img.clone()),
            ("secret".to_owned(), secret.clone()),
        ]);
        let origin = auth_origin(images, Arc::new(Semaphore::new(0))).await;
        let http: Arc<dyn Origin> = Arc::new(
            AsyncHttpOrigin::new(format!("http://{}/images/{{id}}", origin.addr)).unwrap(),
        );
        let cache = ImageCache::builder(cache_dir.path()).open().unwrap();
        let node = Node::start(
            cache,
            http,
            ServeOptions::default(),
            AdminOptions::default(),
        )
        .await;
        let get = |id: &'static str, token: Option<&'static str>| {
            let mut r = node.client.get(node.image(id));
            if let Some(t) = token {
                r = r.header("x-auth-token", t);
            }
            async move {
                let r = r.send().await.unwrap();
                let status = r.status().as_u16();
                let source = r.headers()["x-imgcache"].to_str().unwrap().to_owned();
                (status, source, r.bytes().await.unwrap())
            }
        };
        // A client with access caches both.
        for (id, bytes) in [("img", &img), ("secret", &secret)] {
            let (status, source, body) = get(id, Some("good")).await;
            assert_eq!((status, source.as_str()), (200, "miss"));
            assert_eq!(&body[..], &bytes[..]);
            assert_eq!(get(id, Some("good")).await.1, "hit");
        }
        assert_eq!(origin.gets.load(Ordering::SeqCst), 2);
        // Cached, and still refused as the origin refuses it.
        assert_eq!(get("img", None).await.0, 401);
        assert_eq!(get("img", Some("stolen")).await.0, 403);
        assert_eq!(get("secret", Some("other")).await.0, 404);
        let (status, source, body) = get("img", Some("other")).await;
        assert_eq!((status, source.as_str()), (200, "hit"));
        assert_eq!(&body[..], &img[..]);
        assert_eq!(node.metrics.requests(Outcome::Denied), 3);
        // Every request asked the origin: 4 + 4 authorizations.
        assert_eq!(origin.heads.load(Ordering::SeqCst), 8);
        assert_eq!(origin.gets.load(Ordering::SeqCst), 2);
        node.jobs.stop();

        // With a positive cache, a yes is remembered; a no never is.
        let cache = ImageCache::builder(cache_dir.path()).open().unwrap();
        let http: Arc<dyn Origin> = Arc::new(
            AsyncHttpOrigin::new(format!("http://{}/images/{{id}}", origin.addr)).unwrap(),
        );
        let node = Node::start(
            cache,
            http,
            ServeOptions::default().authorization_ttl(Duration::from_secs(3600)),
            AdminOptions::default(),
        )
        .await;
        let heads = origin.heads.load(Ordering::SeqCst);
        for _ in 0..3 {
            let mut r = node
                .client
                .get(node.image("img"))
                .header("x-auth-token", "good");
            r = r.header("accept", "*/*");
            assert_eq!(r.send().await.unwrap().status(), 200);
            let r = node
                .client
                .get(node.image("img"))
                .header("x-auth-token", "stolen");
            assert_eq!(r.send().await.unwrap().status(), 403);
        }
        assert_eq!(origin.heads.load(Ordering::SeqCst) - heads, 1 + 3);
        node.jobs.stop();
    });
}

#[test]
fn the_prefetcher_sends_its_own_token() {
    let cache_dir = tempfile::tempdir().unwrap();
    let img = data(200_000, 9);
    block(async {
        let images = HashMap::from([("tokened".to_owned(), img.clone())]);
        let origin = auth_origin(images, Arc::new(Semaphore::new(0))).await;
        let http: Arc<dyn Origin> = Arc::new(
            AsyncHttpOrigin::new(format!("http://{}/images/{{id}}", origin.addr)).unwrap(),
        );
        let cache = ImageCache::builder(cache_dir.path()).open().unwrap();
        let node = Node::start_with_jobs(
            cache,
            http,
            ServeOptions::default(),
            AdminOptions::default(),
            JobOptions::default()
                .clean_interval(None)
                .origin_token(Some("good".into())),
        )
        .await;
        let r = node.call(reqwest::Method::PUT, "/v2/cache/tokened").await;
        assert_eq!(r.status(), 202);
        node.wait_cached("tokened").await;
        assert_eq!(origin.gets.load(Ordering::SeqCst), 1);
        // The worker counts its run after the commit: the join waits for it.
        let jobs = node.jobs.clone();
        tokio::task::spawn_blocking(move || jobs.stop())
            .await
            .unwrap();
        assert_eq!(node.metrics.job_runs("prefetch", true), 1);
    });
}

#[test]
fn the_pruner_holds_the_limit_while_eight_clients_fill() {
    let cache_dir = tempfile::tempdir().unwrap();
    // Held by the origin after their first chunk until all eight have
    // started: the fills run at once, so admission alone cannot keep the
    // cache under its limit (each counts the others); the pruner must.
    let images: HashMap<String, Vec<u8>> = (0..8)
        .map(|i| (format!("slow-big{i}"), data(1_500_000, i as u8)))
        .collect();
    let limit = 4_000_000;
    block(async {
        let gate = Arc::new(Semaphore::new(0));
        let origin = auth_origin(images.clone(), gate.clone()).await;
        let http: Arc<dyn Origin> = Arc::new(
            AsyncHttpOrigin::new(format!("http://{}/images/{{id}}", origin.addr)).unwrap(),
        );
        let cache = ImageCache::builder(cache_dir.path())
            .max_size(limit)
            .open()
            .unwrap();
        let node = Arc::new(
            Node::start(
                cache,
                http,
                ServeOptions::default(),
                AdminOptions::default(),
            )
            .await,
        );
        let mut started = Vec::new();
        for name in images.keys() {
            let r = node
                .client
                .get(node.image(name))
                .header("x-auth-token", "good")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            started.push((name.clone(), r));
        }
        gate.add_permits(10_000);
        for (name, r) in started {
            let body = r.bytes().await.unwrap();
            assert_eq!(&body[..], &images[&name][..], "{name}");
        }
        let (commits, _) = node.cache.commits();
        assert_eq!(commits, 8);
        let jobs = node.jobs.clone();
        let caught_up =
            tokio::task::spawn_blocking(move || jobs.wait_pruned(commits, Duration::from_secs(30)))
                .await
                .unwrap();
        assert!(caught_up, "the pruner never looked after the last commit");
        let size = node.cache.cache_size().unwrap();
        assert!(size <= limit, "{size} bytes cached, over the {limit} limit");
        assert!(
            node.metrics.job_runs("prune", true) >= 1,
            "the pruner pruned"
        );
        let (evicted, bytes) = node.metrics.evictions();
        assert!(evicted >= 6, "{evicted} evictions");
        assert_eq!(bytes, evicted * 1_500_000);
        node.jobs.stop();
    });
}

#[test]
fn a_fill_over_the_hard_limit_is_served_uncached() {
    let cache_dir = tempfile::tempdir().unwrap();
    let (small, large) = (data(1_000_000, 5), data(3_000_000, 6));
    let (_o, origin) = dir_origin(&[("s1", &small), ("s2", &small), ("large", &large)]);
    block(async {
        let cache = ImageCache::builder(cache_dir.path())
            .hard_limit(Some(2_500_000))
            .open()
            .unwrap();
        let node = Node::start(
            cache,
            origin,
            ServeOptions::default(),
            AdminOptions::default(),
        )
        .await;
        assert_eq!(node.get("s1").await.1, "miss");
        assert_eq!(node.get("s2").await.1, "miss");
        // Never fits: passed through, whole and right, not cached.
        let (status, source, body) = node.get("large").await;
        assert_eq!((status, source.as_str()), (200, "bypass"));
        assert_eq!(&body[..], &large[..]);
        assert!(!node
            .cache
            .is_cached(&ImageId::new("large").unwrap())
            .unwrap());
        assert_eq!(node.metrics.requests(Outcome::Bypass), 1);
        assert_eq!(node.cache.cache_size().unwrap(), 2_000_000);
        node.jobs.stop();
    });
}

/// Mounts a tmpfs of `bytes` at a fresh directory (root only).
fn tmpfs(bytes: u64) -> Option<(tempfile::TempDir, Unmount)> {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("IMGCACHE_REQUIRE_MOUNTS").is_some() {
            panic!("IMGCACHE_REQUIRE_MOUNTS is set but a tmpfs could not be mounted");
        }
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return None;
    }
    let u = Unmount(dir.path().to_owned());
    Some((dir, u))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn min_free_evicts_first_and_bypasses_what_cannot_fit() {
    let Some((mount, _unmount)) = tmpfs(16 << 20) else {
        return;
    };
    let images: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("m{i}"), data(3 << 20, 10 + i as u8)))
        .collect();
    let huge = data(12 << 20, 20);
    let mut refs: Vec<(&str, &[u8])> = images.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    refs.push(("huge", &huge));
    let (_o, origin) = dir_origin(&refs);
    block(async {
        let cache = ImageCache::builder(mount.path().join("cache"))
            .min_free(Some(MinFree::Percent(50.0)))
            .open()
            .unwrap();
        let node = Node::start(
            cache,
            origin,
            ServeOptions::default(),
            AdminOptions::default(),
        )
        .await;
        let free = || {
            let fs = nix::sys::statvfs::statvfs(mount.path()).unwrap();
            fs.blocks_available() as u64 * fs.fragment_size() as u64
        };
        for (name, bytes) in &images {
            let (status, source, body) = node.get(name).await;
            assert_eq!((status, source.as_str()), (200, "miss"), "{name}");
            assert_eq!(&body[..], &bytes[..]);
            assert!(free() >= 8 << 20, "{} bytes free after {name}", free());
        }
        // The third fill evicted the first.
        assert!(!node.cache.is_cached(&ImageId::new("m0").unwrap()).unwrap());
        assert!(node.cache.is_cached(&ImageId::new("m2").unwrap()).unwrap());
        assert!(node.metrics.evictions().0 >= 1);
        // 12 MiB never fits above 8 MiB free on 16 MiB: passed through.
        let (status, source, body) = node.get("huge").await;
        assert_eq!((status, source.as_str()), (200, "bypass"));
        assert_eq!(&body[..], &huge[..]);
        assert!(free() >= 8 << 20);
        node.jobs.stop();
    });
}

#[test]
fn nodes_are_listed_with_the_shared_store() {
    let Some(store) = imgcache::testing::Store::centralized_db() else {
        return;
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let img = data(10_000, 7);
    let (_o, origin) = dir_origin(&[("shared1", &img)]);
    let node_url = imgcache::testing::postgres::node_for(cache_dir.path());
    let options = imgcache::CacheOptions::new(cache_dir.path()).node_url(node_url.clone());
    let cache = store.open(options).unwrap();
    block(async {
        let node = Node::start(
            cache,
            origin,
            ServeOptions::default(),
            AdminOptions::default(),
        )
        .await;
        use reqwest::Method as M;
        assert_eq!(node.json(M::GET, "/v2/cache/nodes/shared1").await.0, 404);
        assert_eq!(node.get("shared1").await.1, "miss");
        let (status, nodes) = node.json(M::GET, "/v2/cache/nodes/shared1").await;
        assert_eq!(status, 200);
        assert_eq!(nodes, serde_json::json!([node_url]));
        assert_eq!(node.json(M::GET, "/v2/cache/nodes/%2F").await.0, 400);
        let jobs = node.jobs.clone();
        tokio::task::spawn_blocking(move || jobs.stop())
            .await
            .unwrap();
        drop(node);
    });
}

/// `imgcache serve` as a process.
fn imgcache() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imgcache"))
}

#[test]
fn serve_checks_its_config_and_its_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("glance-api.conf");
    std::fs::write(
        &conf,
        format!(
            "[DEFAULT]\nimage_cache_dir = {}\nimage_cache_max_size = 1GiB\nbind_host = 127.0.0.1\nbind_port = 19999\n[imgcache]\nadmin_bind_port = 19998\nmin_free = 5%\n",
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let out = imgcache()
        .arg("--config")
        .arg(&conf)
        .args(["serve", "--origin", "/tmp", "--check-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "image_cache_max_size = 1073741824",
        "listen = 127.0.0.1:19999",
        "admin_listen = 127.0.0.1:19998",
        "min_free = 5%",
        "public = false",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
    // A token file others may read is refused; so is a public admin
    // address without one; so is the data port for both.
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = |args: &[&str]| {
        let out = imgcache()
            .arg("--dir")
            .arg(dir.path().join("cache"))
            .args(["serve", "--origin", "/tmp", "--check-config"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let t = token.to_str().unwrap();
    assert!(refused(&["--admin-token-file", t]).contains("chmod 600"));
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(refused(&["--admin-token-file", t]).contains("its group or others"));
    assert!(refused(&["--admin-listen", "0.0.0.0:9293"]).contains("needs --admin-token-file"));
    assert!(refused(&[
        "--listen",
        "127.0.0.1:7000",
        "--admin-listen",
        "127.0.0.1:7000"
    ])
    .contains("never shares"));
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = imgcache()
        .arg("--dir")
        .arg(dir.path().join("cache"))
        .args([
            "serve",
            "--origin",
            "/tmp",
            "--check-config",
            "--admin-listen",
            "0.0.0.0:9293",
            "--admin-token-file",
            t,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("t0ken"));

    // Peer fill: off by default; on, it needs the fleet's token file (mode
    // 600), a shared store, and a fan-out of one or more.
    assert!(text.contains("peers = off"), "{text}");
    assert!(refused(&["--peers"]).contains("--peer-token-file"));
    assert!(refused(&["--peers", "--peer-token-file", t]).contains("centralized_db"));
    let fleet = |args: &[&str]| {
        imgcache()
            .arg("--dir")
            .arg(dir.path().join("cache"))
            .args(["--driver", "centralized_db"])
            .args(["--database-url", "postgres://u:secret@127.0.0.1:1/db"])
            .args(["--node-url", "http://node1:9292"])
            .args(["serve", "--origin", "/tmp", "--check-config"])
            .args(["--peers", "--peer-token-file", t])
            .args(args)
            .output()
            .unwrap()
    };
    let out = fleet(&["--peer-fanout", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--peer-fanout 0"));
    let out = fleet(&["--peer-fanout", "8"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "peers = on",
        "peer_fanout = 8",
        "peer_token = required (from ",
    ] {
        assert!(shown.contains(line), "{line:?} not in {shown}");
    }
    assert!(
        !shown.contains("t0ken") && !shown.contains("secret"),
        "{shown}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fleet(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn sigterm_lets_downloads_finish_or_cuts_them_and_the_restart_is_consistent() {
    let cache_dir = tempfile::tempdir().unwrap();
    let n: usize = std::env::var("IMGCACHE_SHUTDOWN_DOWNLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let images: HashMap<String, Vec<u8>> = (0..n)
        .map(|i| {
            // Half are held by the origin past the shutdown's grace.
            let name = if i % 2 == 0 {
                format!("fast{i}")
            } else {
                format!("slow{i}")
            };
            (name, data(1_000_000 + i * 1000, i as u8))
        })
        .collect();
    let rt = runtime();
    rt.block_on(async {
        let gate = Arc::new(Semaphore::new(0));
        // `fast` images are never held; `slow` ones wait for permits that
        // never come.
        let origin = auth_origin(images.clone(), gate).await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .arg("--dir")
            .arg(cache_dir.path())
            .args([
                "serve",
                "--public",
                "--forward-auth-token",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--shutdown-timeout",
                "3s",
                "--origin",
            ])
            .arg(format!("http://{}/images/{{id}}", origin.addr))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let client = reqwest::Client::new();
        // Every download has its headers before the signal.
        let mut started = Vec::new();
        for (name, _) in images.iter() {
            let r = client
                .get(format!("http://{addr}/v2/images/{name}/file"))
                .header("x-auth-token", "good")
                .send()
                .await
                .unwrap();
            if r.status() != 200 {
                panic!("{name}: {} {}", r.status(), r.text().await.unwrap());
            }
            started.push((name.clone(), r));
        }
        // The fills in flight show in the management API, with how far
        // each got.
        let admin = line
            .split("management API on http://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let text = client
            .get(format!("http://{admin}/v2/cache"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let state: Value = serde_json::from_str(&text).unwrap();
        let caching = state["caching_images"].as_array().unwrap();
        let slow: Vec<_> = caching
            .iter()
            .filter(|c| c["image_id"].as_str().unwrap().starts_with("slow"))
            .collect();
        assert_eq!(slow.len(), n / 2, "{state}");
        for c in slow {
            let size = c["size"].as_u64().unwrap();
            assert!(size >= 1_000_000, "{c}");
            assert!(c["bytes_written"].as_u64().unwrap() < size, "{c}");
        }
        let pid = child.id().unwrap().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let mut completed = 0;
        let mut cut = 0;
        for (name, r) in started {
            match r.bytes().await {
                Ok(body) => {
                    assert_eq!(
                        &body[..],
                        &images[&name][..],
                        "{name}: a clean end is the whole image"
                    );
                    completed += 1;
                }
                Err(_) => cut += 1,
            }
        }
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{status}");
        assert_eq!(completed, n.div_ceil(2), "the fast ones finish");
        assert_eq!(cut, n / 2, "the held ones are cut at the grace");
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    // The restart finds a consistent cache: the finished ones cached and
    // verified, the cut ones not cached, nothing left incomplete.
    let cache = ImageCache::builder(cache_dir.path()).open().unwrap();
    let scrub = cache.scrub().unwrap();
    assert!(scrub.corrupt.is_empty(), "{scrub:?}");
    assert_eq!(scrub.intact, n.div_ceil(2));
    for (name, bytes) in &images {
        let id = ImageId::new(name).unwrap();
        if name.starts_with("fast") {
            let mut image = cache.open_for_read(&id).unwrap().expect("cached");
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut image, &mut got).unwrap();
            assert_eq!(&got, bytes);
        } else {
            assert!(!cache.is_cached(&id).unwrap(), "{name} cut, yet cached");
        }
    }
    let left: Vec<_> = std::fs::read_dir(cache_dir.path().join("incomplete"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `--prefetch-workers 0` means no prefetcher in this process: a queued
/// image stays queued (for `imgcache prefetch` or another process), and is
/// never handed to a worker that does not exist.
#[test]
fn zero_prefetch_workers_leave_the_queue_alone() {
    let cache_dir = tempfile::tempdir().unwrap();
    let (_o, origin) = dir_origin(&[("queued", b"bytes")]);
    let cache = Arc::new(ImageCache::builder(cache_dir.path()).open().unwrap());
    let id = ImageId::new("queued").unwrap();
    cache.queue_image(&id).unwrap();
    for workers in [0, 1] {
        let jobs = Jobs::start(
            cache.clone(),
            origin.clone(),
            Arc::new(Metrics::new()),
            JobOptions::default()
                .prefetch_workers(workers)
                .queue_interval(None)
                .prune_interval(None)
                .clean_interval(None),
        )
        .unwrap();
        jobs.submit(id.clone());
        let (pending, active) = jobs.prefetching();
        let handed = pending.contains(&id) || active.contains(&id) || cache.is_cached(&id).unwrap();
        jobs.stop();
        if workers == 0 {
            assert!(!handed, "handed to a prefetcher that does not exist");
            assert_eq!(cache.queued_images().unwrap(), std::slice::from_ref(&id));
            assert!(!cache.is_cached(&id).unwrap());
        } else {
            assert!(handed, "a worker was never given the image");
        }
    }
    let out = imgcache()
        .arg("--dir")
        .arg(cache_dir.path())
        .args([
            "serve",
            "--origin",
            "/tmp",
            "--check-config",
            "--prefetch-workers",
            "0",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("prefetch_workers = 0 (no prefetcher"));
}
