//! A fleet on loopback for the peer-fill tests and bench: an origin that
//! counts its requests and sends at a limited rate shared by all its
//! connections (a thin link), and `imgcache serve` nodes on one PostgreSQL
//! server.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use imgcache::testing::postgres::cluster;
use tokio::io::AsyncBufReadExt;

/// Deterministic bytes (the test kit's generator).
pub fn data(n: usize, seed: u64) -> Vec<u8> {
    imgcache::testing::model::content(seed, n)
}

/// A name no other test (or earlier run on the same server) uses.
pub fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_007
    )
}

/// The origin: `GET /images/{name}` with `Content-MD5` (hex, as Glance
/// sends it) and `Range: bytes=N-` support, at `rate` bytes per second.
pub struct Origin {
    pub addr: SocketAddr,
    pub gets: Arc<AtomicUsize>,
    pub ranged: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicU64>,
    /// Signalled at each GET.
    pub asked: Arc<tokio::sync::Notify>,
    /// Opened by [`Origin::release`]: a held origin's first transfer waits
    /// for it past its first bytes.
    pub gate: Arc<tokio::sync::Semaphore>,
}

impl Origin {
    pub async fn start(images: HashMap<String, Vec<u8>>, rate: u64) -> Origin {
        Self::start_held(images, rate, None).await
    }

    /// An origin whose first GET stops after `hold_after` bytes until
    /// [`Origin::release`] (so that a test may act while a fill is
    /// certainly in progress).
    pub async fn start_held(
        images: HashMap<String, Vec<u8>>,
        rate: u64,
        hold_after: Option<usize>,
    ) -> Origin {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gets = Arc::new(AtomicUsize::new(0));
        let ranged = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let asked = Arc::new(tokio::sync::Notify::new());
        let images = Arc::new(images);
        // When the link is next free: every connection's chunks take
        // their turn on it.
        let link = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        let state = (
            gets.clone(),
            ranged.clone(),
            bytes.clone(),
            asked.clone(),
            link,
            gate.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (images, state) = (images.clone(), state.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (images, (gets, ranged, sent, asked, link, gate)) =
                                (images.clone(), state.clone());
                            async move {
                                let name = req.uri().path().trim_start_matches("/images/");
                                // Every GET counts, for an image or not.
                                let nth = gets.fetch_add(1, Ordering::SeqCst);
                                asked.notify_waiters();
                                let held = hold_after.filter(|_| nth == 0);
                                let Some(body) = images.get(name).cloned() else {
                                    return Ok::<_, Infallible>(
                                        hyper::Response::builder()
                                            .status(404)
                                            .body(http_body_util::Either::Left(Full::new(
                                                Bytes::new(),
                                            )))
                                            .unwrap(),
                                    );
                                };
                                let from = req
                                    .headers()
                                    .get("range")
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.strip_prefix("bytes="))
                                    .and_then(|v| v.strip_suffix('-'))
                                    .and_then(|v| v.parse::<usize>().ok());
                                let mut b = hyper::Response::builder()
                                    .header("content-md5", md5_hex(&body));
                                let start = match from {
                                    Some(n) if n > 0 && n < body.len() => {
                                        ranged.fetch_add(1, Ordering::SeqCst);
                                        b = b.status(206).header(
                                            "content-range",
                                            format!("bytes {n}-{}/{}", body.len() - 1, body.len()),
                                        );
                                        n
                                    }
                                    _ => 0,
                                };
                                b = b.header("content-length", body.len() - start);
                                let stream = futures_util::stream::unfold(
                                    (start, body, sent, link, gate),
                                    move |(pos, body, sent, link, gate)| async move {
                                        if pos >= body.len() {
                                            return None;
                                        }
                                        if held.is_some_and(|h| pos >= h) {
                                            let _ = gate.acquire().await;
                                        }
                                        let end = (pos + 64 * 1024).min(body.len());
                                        // The thin link, shared by every
                                        // connection: this chunk's turn.
                                        let turn = Duration::from_secs_f64(
                                            (end - pos) as f64 / rate as f64,
                                        );
                                        // A timer's overshoot (about a
                                        // millisecond) is made up by the
                                        // next turns, so that the link
                                        // keeps its rate.
                                        let until = {
                                            let mut next = link.lock().unwrap();
                                            let now = tokio::time::Instant::now();
                                            let slack = Duration::from_millis(20);
                                            *next = (*next).max(now - slack) + turn;
                                            *next
                                        };
                                        tokio::time::sleep_until(until).await;
                                        sent.fetch_add((end - pos) as u64, Ordering::SeqCst);
                                        let chunk = Bytes::copy_from_slice(&body[pos..end]);
                                        Some((
                                            Ok::<_, Infallible>(hyper::body::Frame::data(chunk)),
                                            (end, body, sent, link, gate),
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
        Origin {
            addr,
            gets,
            ranged,
            bytes,
            asked,
            gate,
        }
    }

    /// Lets a held transfer go on.
    pub fn release(&self) {
        self.gate.add_permits(1 << 20);
    }

    pub fn template(&self) -> String {
        format!("http://{}/images/{{id}}", self.addr)
    }

    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Waits until the origin has had `n` GETs.
    pub async fn wait_gets(&self, n: usize) {
        loop {
            let asked = self.asked.notified();
            if self.gets() >= n {
                return;
            }
            asked.await;
        }
    }
}

pub fn md5_hex(data: &[u8]) -> String {
    let mut h = imgcache::checksum::Hasher::new(imgcache::checksum::Algorithm::Md5);
    h.update(data);
    h.finish().hex().to_owned()
}

/// One `imgcache serve` node of the fleet.
pub struct Node {
    pub child: tokio::process::Child,
    pub url: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

/// A port free now (the node binds it next; its URL must be known before
/// it starts, as the fleet's row names it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A token file as `--peer-token-file` wants it (mode 600).
pub fn token_file(dir: &std::path::Path, name: &str, token: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

impl Node {
    pub async fn start(
        database: &str,
        origin: &Origin,
        token: &std::path::Path,
        fanout: usize,
    ) -> Node {
        Self::start_with(database, origin, Some(token), fanout).await
    }

    /// A node with peer fill on (`token`) or off.
    pub async fn start_with(
        database: &str,
        origin: &Origin,
        token: Option<&std::path::Path>,
        fanout: usize,
    ) -> Node {
        Self::start_args(database, origin, token, fanout, &[]).await
    }

    /// A node with more `serve` arguments. The node's port is picked free
    /// before it starts (its URL names it in the fleet); should another
    /// process take it first, the node is started again on another.
    pub async fn start_args(
        database: &str,
        origin: &Origin,
        token: Option<&std::path::Path>,
        fanout: usize,
        extra: &[&str],
    ) -> Node {
        for _ in 0..5 {
            if let Some(node) = Self::try_start(database, origin, token, fanout, extra).await {
                return node;
            }
        }
        panic!("no node could start on a free port in five tries");
    }

    async fn try_start(
        database: &str,
        origin: &Origin,
        token: Option<&std::path::Path>,
        fanout: usize,
        extra: &[&str],
    ) -> Option<Node> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgcache"));
        command
            .arg("--dir")
            .arg(dir.path())
            .args(["--driver", "centralized_db", "--create-tables"])
            .args(["--database-url", database, "--node-url", &url])
            .args(["serve", "--public"]);
        if let Some(token) = token {
            command
                .args(["--peers", "--peer-token-file"])
                .arg(token)
                .args(["--peer-fanout", &fanout.to_string()]);
        }
        let mut child = command
            .args(extra)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0", "--workers", "2"])
            .args(["--origin", &origin.template()])
            .env("RUST_LOG", "imgcache=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let Some(line) = lines.next_line().await.unwrap() else {
            // It could not listen (the port was taken meanwhile), or
            // failed otherwise: its standard error says which.
            let _ = child.wait().await;
            return None;
        };
        let admin = line
            .split("management API on http://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        Some(Node {
            child,
            url,
            admin,
            dir,
        })
    }

    pub fn image(&self, id: &str) -> String {
        format!("{}/v2/images/{id}/file", self.url)
    }

    /// Who holds `id`, as the node's management API says.
    pub async fn holders(&self, client: &reqwest::Client, id: &str) -> Vec<String> {
        let r = client
            .get(format!("http://{}/v2/cache/nodes/{id}", self.admin))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            return Vec::new();
        }
        let mut v: Vec<String> = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        v.sort();
        v
    }

    /// One of the node's counters, as its metrics say (0 if absent).
    pub async fn metric(&self, client: &reqwest::Client, series: &str) -> f64 {
        Self::metric_at(client, &self.admin, series).await
    }

    /// A counter from the management API at `admin` (0 if absent).
    pub async fn metric_at(client: &reqwest::Client, admin: &str, series: &str) -> f64 {
        let text = client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// `n` clients spread over `nodes`, all asking for `id` at once: each
/// body, whole.
pub async fn stampede(client: &reqwest::Client, nodes: &[&Node], id: &str, n: usize) -> Vec<Bytes> {
    let asks: Vec<_> = (0..n)
        .map(|i| {
            let url = nodes[i % nodes.len()].image(id);
            let client = client.clone();
            tokio::spawn(async move {
                let r = client.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "{url}");
                r.bytes().await.unwrap()
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for a in asks {
        bodies.push(a.await.unwrap());
    }
    bodies
}

/// The fleet's database, or a skip.
pub fn database() -> Option<String> {
    cluster().map(|c| c.url().to_owned())
}
