//! The example proxy (pingora) with imgcache's disk store, against the
//! same proxy with pingora's in-memory store and against nginx
//! `proxy_cache` (Debian's package), in front of the same loopback
//! upstream, driven by the same load generator (`wrk`), in the same run:
//!
//! - hits of a 1 MiB object, 64 connections, and of a 256 MiB object, 4
//!   connections: requests/s (goal for imgcache ≥ 0.9 × the in-memory
//!   store on hits that fit in memory);
//! - each proxy's peak RSS after those (bounded for imgcache, where the
//!   in-memory store holds every object).
//!
//! ```text
//! cargo bench -p imgcache-pingora --bench proxy              # full sizes
//! cargo bench -p imgcache-pingora --bench proxy -- --quick   # small, for CI
//! ```
//!
//! Skips with a message where nginx or wrk is missing (`.ci/run` installs
//! both). Builds the example proxy (release) itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn find(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An upstream serving `/<name>?len=<n>`: `n` bytes, cacheable for a day.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let len: usize = target
                        .split_once("len=")
                        .and_then(|(_, n)| n.parse().ok())
                        .unwrap_or(0);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nCache-Control: max-age=86400\r\n\r\n"
                    );
                    if w.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let block: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(MIB);
                        if w.write_all(&block[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                }
            });
        }
    });
    port
}

/// Waits until something listens on `port`.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One whole GET; the body's length.
fn get(port: u16, target: &str) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    raw.len() - split - 4
}

/// `wrk` on `target` for `secs`: requests/s.
fn wrk(wrk: &Path, port: u16, target: &str, conns: usize, secs: u32) -> f64 {
    let out = Command::new(wrk)
        .args([
            "-t",
            "2",
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
        ])
        .arg(format!("http://127.0.0.1:{port}{target}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Non-2xx"),
        "error responses under load: {text}"
    );
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        // Connections a server closed (keep-alive limits), reported.
        println!("  {port}{target}: {}", line.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk said: {text}"))
}

/// Peak RSS of `pid` and its children in the same process group (MiB).
fn peak_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .fold(0.0, f64::max)
        / 1024.0
}

/// The processes of group `pgid`.
fn group_of(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// Stops a process group gracefully with `signal` (nginx: `QUIT`;
/// pingora: `INT`, as its `QUIT` is a graceful upgrade that waits for a
/// successor), then kills what is left; waits for it to be gone.
fn stop(mut child: Child, signal: &str) {
    let pgid = child.id();
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !group_of(pgid).is_empty() && Instant::now() < deadline {
        let _ = child.try_wait();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    // Reaped by their parent (nginx's workers by the master, gone too):
    // wait for the group to empty.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !group_of(pgid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !std::thread::panicking() {
        assert!(
            group_of(pgid).is_empty(),
            "processes of group {pgid} outlived the bench"
        );
    }
}

/// A started server's process group, stopped when dropped (a panic of
/// the bench included): nothing it started outlives it.
struct Group {
    child: Option<Child>,
    signal: &'static str,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, self.signal);
        }
    }
}

fn start_proxy(example: &Path, port: u16, upstream: u16, extra: &[&str]) -> Child {
    let child = Command::new(example)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &format!("127.0.0.1:{upstream}")])
        .args(["--threads", "2"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_listening(port);
    child
}

fn start_nginx(nginx: &Path, work: &Path, port: u16, upstream: u16) -> Child {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let user = if root { "user root;" } else { "" };
    let w = work.display();
    let conf = format!(
        r#"{user}
worker_processes 2;
daemon off;
master_process on;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=60s;
    client_body_temp_path {w}/client;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    proxy_cache_path {w}/cache levels=1:2 keys_zone=c:16m max_size=64g inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache c;
            proxy_cache_lock on;
            proxy_cache_valid 200 1d;
        }}
    }}
}}
"#
    );
    std::fs::write(work.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(work)
        .arg("-c")
        .arg(work.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_listening(port);
    child
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (Some(nginx), Some(wrk_bin)) = (find("nginx"), find("wrk")) else {
        println!("proxy bench skipped: nginx and wrk are needed (Debian: apt-get install nginx-light wrk)");
        return;
    };
    // The example proxy, built as the bench is (release).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "imgcache-pingora",
            "--example",
            "proxy",
        ])
        .status()
        .unwrap();
    assert!(built.success(), "cannot build the example proxy");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let example = target.join("release/examples/proxy");
    let (big, secs) = if quick {
        (64 * MIB, 2)
    } else {
        (256 * MIB, 10)
    };
    let small_target = format!("/small?len={MIB}");
    let big_target = format!("/big?len={big}");
    let up = upstream();
    let work = tempfile::tempdir().unwrap();
    let names = [
        "pingora + imgcache",
        "pingora + memory",
        "nginx proxy_cache",
    ];
    let mut rows: Vec<(f64, f64, f64)> = Vec::new();
    for name in names {
        let port = free_port();
        let dir = work.path().join(name.replace([' ', '+'], "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let started = match name {
            "pingora + imgcache" => start_proxy(
                &example,
                port,
                up,
                &["--dir", dir.to_str().unwrap(), "--max-size", "8GiB"],
            ),
            "pingora + memory" => start_proxy(&example, port, up, &["--memory"]),
            _ => start_nginx(&nginx, &dir, port, up),
        };
        let pgid = started.id();
        let group = Group {
            child: Some(started),
            signal: if name.starts_with("nginx") {
                "QUIT"
            } else {
                "INT"
            },
        };
        // Warm: one miss each, then a hit.
        for t in [&small_target, &big_target] {
            let want = if t == &small_target { MIB } else { big };
            assert_eq!(get(port, t), want, "{name}: {t}");
            assert_eq!(get(port, t), want, "{name}: {t}");
        }
        let small = wrk(&wrk_bin, port, &small_target, 64, secs);
        let big_rate = wrk(&wrk_bin, port, &big_target, 4, secs) * big as f64 / 1e9;
        let rss = peak_mib(&group_of(pgid));
        rows.push((small, big_rate, rss));
        drop(group);
    }
    println!(
        "\npingora example proxy: imgcache vs in-memory store vs nginx proxy_cache ({}; same run, loopback, {} cores)",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| proxy | 1 MiB hits, 64 conns (req/s) | {} MiB hits, 4 conns (GB/s) | peak RSS (MiB) |",
        big / MIB
    );
    println!("|---|---|---|---|");
    for (name, (s, b, r)) in names.iter().zip(&rows) {
        println!("| {name} | {s:.0} | {b:.2} | {r:.0} |");
    }
    let (i, m, n) = (rows[0], rows[1], rows[2]);
    println!(
        "imgcache / memory: 1 MiB {:.2} x, {} MiB {:.2} x (goal >= 0.9 on hits that fit in memory); RSS {:.0} vs {:.0} MiB",
        i.0 / m.0,
        big / MIB,
        i.1 / m.1,
        i.2,
        m.2
    );
    println!(
        "imgcache / nginx: 1 MiB {:.2} x, {} MiB {:.2} x",
        i.0 / n.0,
        big / MIB,
        i.1 / n.1
    );
}
