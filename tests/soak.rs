//! A soak of `imgcache serve` as a process: many concurrent connections of
//! mixed clients — whole reads, ranges, `HEAD`s, clients that never read,
//! half-sent heads — against an origin that flaps (slow, failing, resetting
//! mid-body), for a while. It checks that every body that completed is
//! byte-exact, and that the server's descriptors and threads come back to
//! where they were once the load is gone; it reports requests by outcome
//! and the server's peaks (RSS, descriptors, threads).
//!
//! Ignored by default; sized by the environment:
//!
//! ```text
//! IMGCACHE_SOAK_SECS=600 IMGCACHE_SOAK_CONNS=1000 cargo test --release --test soak -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Full, StreamBody};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn image(i: usize) -> Vec<u8> {
    // 16 KiB to about 2 MiB, different bytes each.
    let len = 16 * 1024 + (i * 7919 * 64) % (2 << 20);
    imgcache::testing::model::content(i as u64 + 1, len)
}

fn md5_hex(data: &[u8]) -> String {
    let mut h = imgcache::checksum::Hasher::new(imgcache::checksum::Algorithm::Md5);
    h.update(data);
    h.finish().hex().to_owned()
}

/// An origin that flaps: of every ten requests, one fails (`503`), one
/// resets mid-body, one is slow, the rest are served whole.
async fn flapping_origin(images: Arc<Vec<Vec<u8>>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (images, n) = (images.clone(), n.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (images, n) = (images.clone(), n.clone());
                        async move {
                            let i: Option<usize> = req
                                .uri()
                                .path()
                                .trim_start_matches("/images/img")
                                .parse()
                                .ok();
                            let Some(body) = i.and_then(|i| images.get(i)).cloned() else {
                                return Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(404)
                                        .body(http_body_util::Either::Left(Full::new(Bytes::new())))
                                        .unwrap(),
                                );
                            };
                            let mode = n.fetch_add(1, Ordering::Relaxed) % 10;
                            if mode == 0 {
                                return Ok(hyper::Response::builder()
                                    .status(503)
                                    .body(http_body_util::Either::Left(Full::new(Bytes::new())))
                                    .unwrap());
                            }
                            if mode == 1 {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                            let reset = mode == 2;
                            let slow = mode == 1;
                            let len = body.len();
                            let stream = futures_util::stream::unfold(
                                (0usize, body),
                                move |(pos, body)| async move {
                                    if pos >= body.len() {
                                        return None;
                                    }
                                    if reset && pos >= body.len() / 2 {
                                        return Some((
                                            Err(std::io::Error::other("reset")),
                                            (body.len(), body),
                                        ));
                                    }
                                    if slow {
                                        tokio::time::sleep(Duration::from_millis(5)).await;
                                    }
                                    let end = (pos + 64 * 1024).min(body.len());
                                    let chunk = Bytes::copy_from_slice(&body[pos..end]);
                                    Some((Ok(hyper::body::Frame::data(chunk)), (end, body)))
                                },
                            );
                            Ok(hyper::Response::builder()
                                .header("content-length", len)
                                .header("content-md5", md5_hex(&images[i.unwrap()]))
                                .body(http_body_util::Either::Right(StreamBody::new(stream)))
                                .unwrap())
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The server's descriptors that are TCP connections to `port` (its HTTP
/// client's pool of idle connections to the origin, kept for reuse).
fn pooled_to(pid: u32, port: u16) -> u64 {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|p| {
                    p.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            let remote = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote == Some(port) {
                n += 1;
            }
        }
    }
    n
}

/// The server's descriptors of cached images in `dir`: the hot ones it
/// keeps open (`--open-files`), bounded by the images there are.
fn kept_open(pid: u32, dir: &std::path::Path) -> u64 {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|p| {
                    p.parent() == Some(dir.as_path())
                        && !p
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("cache.db"))
                })
                .count() as u64
        })
        .unwrap_or_default()
}

/// The server's resident memory (KiB), descriptors and threads now.
fn sample(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:"), fds, field("Threads:")))
}

#[derive(Default)]
struct Tally {
    outcomes: Mutex<BTreeMap<String, u64>>,
    wrong: AtomicU64,
    bytes: AtomicU64,
}

impl Tally {
    fn count(&self, what: impl Into<String>) {
        *self
            .outcomes
            .lock()
            .unwrap()
            .entry(what.into())
            .or_default() += 1;
    }
}

#[test]
#[ignore = "a soak: run with --ignored, sized by IMGCACHE_SOAK_SECS and IMGCACHE_SOAK_CONNS"]
fn serve_holds_under_mixed_hostile_load() {
    let secs = env("IMGCACHE_SOAK_SECS", 20);
    let conns = env("IMGCACHE_SOAK_CONNS", 200) as usize;
    let images: Arc<Vec<Vec<u8>>> = Arc::new((0..40).map(image).collect());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let origin = flapping_origin(images.clone()).await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .arg("--dir")
            .arg(cache.path())
            .args(["serve", "--public", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--send-timeout", "3s", "--header-timeout", "3s"])
            .args(["--max-fills", "16", "--prune-interval", "0"])
            .arg("--origin")
            .arg(format!("http://{origin}/images/{{id}}"))
            .env("RUST_LOG", "imgcache=error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let addr = line
            .split("on http://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let (_, base_fds, base_threads) = sample(pid).unwrap();
        let peaks = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peaks, stop) = (peaks.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((rss, fds, threads)) = sample(pid) {
                        let mut p = peaks.lock().unwrap();
                        *p = (p.0.max(rss), p.1.max(fds), p.2.max(threads));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let tally = Arc::new(Tally::default());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(conns)
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..conns)
            .map(|t| {
                let (client, tally, images, addr) =
                    (client.clone(), tally.clone(), images.clone(), addr.clone());
                tokio::spawn(async move {
                    let mut k = t as u64;
                    while Instant::now() < deadline {
                        k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let i = (k >> 33) as usize % images.len();
                        let url = format!("http://{addr}/v2/images/img{i}/file");
                        let want = &images[i];
                        match (k >> 20) % 10 {
                            // Whole reads.
                            0..=4 => match client.get(&url).send().await {
                                Ok(r) if r.status() == 200 => match r.bytes().await {
                                    Ok(b) if b[..] == want[..] => {
                                        tally.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                                        tally.count("200 exact");
                                    }
                                    Ok(_) => {
                                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                                        tally.count("200 WRONG BYTES");
                                    }
                                    Err(_) => tally.count("200 cut (origin failed mid-body)"),
                                },
                                Ok(r) => tally.count(format!("{}", r.status().as_u16())),
                                Err(_) => tally.count("no response"),
                            },
                            // Ranges.
                            5 | 6 => {
                                let a = (k >> 7) as usize % want.len();
                                let b = (a + 100_000).min(want.len() - 1);
                                match client
                                    .get(&url)
                                    .header("range", format!("bytes={a}-{b}"))
                                    .send()
                                    .await
                                {
                                    Ok(r) if r.status() == 206 => match r.bytes().await {
                                        Ok(got) if got[..] == want[a..=b] => tally.count("206 exact"),
                                        Ok(_) => {
                                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                                            tally.count("206 WRONG BYTES");
                                        }
                                        Err(_) => tally.count("206 cut"),
                                    },
                                    Ok(r) if r.status() == 200 => match r.bytes().await {
                                        // A range of a fill whose origin
                                        // did not announce a size: whole.
                                        Ok(got) if got[..] == want[..] => tally.count("200 exact"),
                                        Ok(_) => {
                                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                                            tally.count("200 WRONG BYTES");
                                        }
                                        Err(_) => tally.count("200 cut"),
                                    },
                                    Ok(r) => tally.count(format!("{}", r.status().as_u16())),
                                    Err(_) => tally.count("no response"),
                                }
                            }
                            7 => match client.head(&url).send().await {
                                Ok(r) => tally.count(format!("HEAD {}", r.status().as_u16())),
                                Err(_) => tally.count("no response"),
                            },
                            // A client that never reads its response.
                            8 => {
                                let addr = addr.clone();
                                let _ = tokio::task::spawn_blocking(move || {
                                    if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                                        let _ = write!(
                                            s,
                                            "GET /v2/images/img{i}/file HTTP/1.1\r\nHost: x\r\n\r\n"
                                        );
                                        // Past the send timeout (3 s):
                                        // the server cuts it.
                                        std::thread::sleep(Duration::from_millis(3500));
                                    }
                                })
                                .await;
                                tally.count("non-reading");
                            }
                            // A head that never ends, until the server
                            // closes it.
                            _ => {
                                let addr = addr.clone();
                                let _ = tokio::task::spawn_blocking(move || {
                                    if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                                        let _ = s.write_all(b"GET /v2/images/img0/file HTTP/1.1\r\n");
                                        let _ = s.read(&mut [0u8; 16]);
                                    }
                                })
                                .await;
                                tally.count("half-open");
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        drop(client);
        // Back to where it was: every connection and fill of the load gone
        // (tokio's idle blocking threads leave after 10 s).
        // Idle connections to the origin stay pooled for reuse (reqwest's
        // 90 s), and hot images stay open (at most one descriptor per
        // image): not the load's, and not counted.
        let settle = Instant::now() + Duration::from_secs(60);
        let mut last = sample(pid).unwrap();
        let mut pooled = 0;
        let mut kept = 0;
        while Instant::now() < settle {
            last = sample(pid).unwrap();
            pooled = pooled_to(pid, origin.port());
            kept = kept_open(pid, cache.path());
            if last.1.saturating_sub(pooled + kept) <= base_fds + 2 && last.2 <= base_threads + 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        let open: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if last.1.saturating_sub(pooled + kept) > base_fds + 2 {
            println!("  open now: {open:?}");
        }
        let p = *peaks.lock().unwrap();
        let outcomes = tally.outcomes.lock().unwrap().clone();
        let total: u64 = outcomes.values().sum();
        println!(
            "soak: {secs} s, {conns} connections, {total} requests, {:.0} MB of exact bodies",
            tally.bytes.load(Ordering::Relaxed) as f64 / 1e6
        );
        for (what, n) in &outcomes {
            println!("  {what}: {n}");
        }
        println!(
            "  server peaks: RSS {} MiB, descriptors {} (baseline {base_fds}), threads {} (baseline {base_threads})",
            p.0 / 1024,
            p.1,
            p.2
        );
        println!(
            "  after the load: descriptors {} ({pooled} of them idle connections to the origin, pooled; {kept} hot images kept open), threads {}",
            last.1, last.2
        );
        assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "wrong bytes served");
        for served in ["200 exact", "206 exact"] {
            assert!(
                outcomes.get(served).copied().unwrap_or(0) > total / 20,
                "too few {served} among {total} requests: {outcomes:?}"
            );
        }
        assert!(
            last.1.saturating_sub(pooled + kept) <= base_fds + 2,
            "descriptors did not come back: {} ({pooled} pooled to the origin, {kept} kept open) against {base_fds}",
            last.1
        );
        assert!(
            kept <= images.len() as u64,
            "{kept} descriptors of cached images kept open, for {} images",
            images.len()
        );
        assert!(
            last.2 <= base_threads + 2,
            "threads did not come back: {} against {base_threads}",
            last.2
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server died under the load"
        );
    });
}
