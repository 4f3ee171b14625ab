//! The example proxy (`examples/proxy.rs`, pingora with imgcache as its
//! disk store) as a real process in front of a loopback upstream that
//! counts its requests, driven by a real HTTP client over TCP: hits
//! byte-exact, ranges, 50 clients of one cold object making one upstream
//! request, and a proxy killed with SIGKILL serving its cache again after
//! a restart.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The bytes of object `name`, `len` long.
fn body(name: &str, len: usize) -> Vec<u8> {
    let mut x = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An upstream on loopback: `GET /<name>?len=<n>` answers `n` bytes of
/// `body(name)`, cacheable for an hour; counts requests by path; holds
/// the bodies of paths under `/held/` until `release`.
struct Upstream {
    port: u16,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (c, g) = (counts.clone(), gate.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (c, g) = (c.clone(), g.clone());
                std::thread::spawn(move || serve(conn, &c, &g));
            }
        });
        Upstream { port, counts, gate }
    }

    fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Waits until `path` was asked for once.
    fn wait_asked(&self, path: &str) {
        let (lock, cv) = &*self.gate;
        let mut g = lock.lock().unwrap();
        while self.count(path) == 0 {
            g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
        }
    }

    fn release(&self) {
        let (lock, cv) = &*self.gate;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

fn serve(conn: TcpStream, counts: &Mutex<HashMap<String, usize>>, gate: &(Mutex<bool>, Condvar)) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        *counts.lock().unwrap().entry(path.to_owned()).or_default() += 1;
        gate.1.notify_all();
        let len: usize = query
            .strip_prefix("len=")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        let data = body(path, len);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nCache-Control: max-age=3600\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut sent = 0;
        if path.starts_with("/held/") {
            // The first 64 KiB, then the rest once released.
            sent = len.min(64 << 10);
            if conn.write_all(&data[..sent]).is_err() {
                return;
            }
            let (lock, cv) = gate;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        if conn.write_all(&data[sent..]).is_err() {
            return;
        }
    }
}

/// A response: status, headers (lowercase names), body.
struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// One request over a fresh connection.
fn get(port: u16, target: &str, extra: &str) -> Response {
    get_after(port, target, extra, None)
}

/// [`get`], waiting at `sent` once the request is sent.
fn get_after(port: u16, target: &str, extra: &str, sent: Option<&std::sync::Barrier>) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    if let Some(b) = sent {
        b.wait();
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").expect("chunk size");
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The example proxy, as a process.
struct Proxy {
    child: Child,
    port: u16,
}

/// The example proxy, built now in this test's profile (`cargo test
/// --test proxy` alone does not build examples: never a stale one).
fn example() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/proxy
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "-p", "imgcache-pingora", "--example", "proxy"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    assert!(
        build.status().unwrap().success(),
        "cannot build the example proxy"
    );
    profile_dir.join("examples").join("proxy")
}

impl Proxy {
    fn start(dir: &Path, upstream: u16) -> Proxy {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(example())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the example proxy (built by cargo test)");
        // pingora says nothing when it listens: try until it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the proxy never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy { child, port }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hits_ranges_a_stampede_and_a_restart() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(dir.path(), upstream.port);
    let p = proxy.port;

    // A miss, then hits: byte-exact, one upstream request.
    let want = body("/obj/a", 1 << 20);
    let first = get(p, "/obj/a?len=1048576", "");
    assert_eq!(first.status, 200);
    assert_eq!(first.body, want);
    assert_eq!(first.headers["x-cache-status"], "miss");
    for _ in 0..3 {
        let hit = get(p, "/obj/a?len=1048576", "");
        assert_eq!(hit.headers["x-cache-status"], "hit");
        assert_eq!(hit.body, want);
    }
    assert_eq!(upstream.count("/obj/a"), 1);

    // Ranges of a hit.
    let r = get(p, "/obj/a?len=1048576", "Range: bytes=1000-1999\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, want[1000..2000]);
    let r = get(p, "/obj/a?len=1048576", "Range: bytes=-100\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, want[want.len() - 100..]);

    // 50 clients of one cold object: one upstream request; every body
    // exact, whether it was read as it landed or from the disk after.
    let cold = "/held/b?len=8388608";
    let want = body("/held/b", 8 << 20);
    // Released only once all 50 requests are sent: none can be a plain hit
    // of a committed object; each waits for the write or follows it.
    let sent = Arc::new(std::sync::Barrier::new(51));
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let sent = sent.clone();
            std::thread::spawn(move || get_after(p, cold, "", Some(&sent)))
        })
        .collect();
    let t0 = Instant::now();
    sent.wait();
    upstream.wait_asked("/held/b");
    upstream.release();
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for c in clients {
        let r = c.join().unwrap();
        *statuses
            .entry(r.headers.get("x-cache-status").cloned().unwrap_or_default())
            .or_default() += 1;
        assert_eq!(r.status, 200);
        if r.body != want {
            let at = r.body.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "a body of {} bytes differs (first at {at:?}; {:?})",
                r.body.len(),
                r.headers
            );
        }
    }
    eprintln!("stampede: {statuses:?} after {:?}", t0.elapsed());
    assert_eq!(
        upstream.count("/held/b"),
        1,
        "one upstream request for 50 clients"
    );

    // SIGKILL, restart on the same directory: still hits, nothing asked.
    drop(proxy);
    let proxy = Proxy::start(dir.path(), upstream.port);
    let again = get(proxy.port, "/obj/a?len=1048576", "");
    assert_eq!(again.headers["x-cache-status"], "hit");
    assert_eq!(again.body, body("/obj/a", 1 << 20));
    let again = get(proxy.port, cold, "");
    assert_eq!(again.headers["x-cache-status"], "hit");
    assert!(again.body == want);
    assert_eq!(upstream.count("/obj/a"), 1);
    assert_eq!(upstream.count("/held/b"), 1);
    // An operator recognises what is cached.
    let cache = imgcache::ImageCache::builder(dir.path())
        .read_only(true)
        .open()
        .unwrap();
    let ids: Vec<String> = cache
        .cached_images()
        .unwrap()
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    assert!(
        ids.iter()
            .any(|i| i.starts_with("origin.test_obj_a_len_1048576~")),
        "{ids:?}"
    );
}
