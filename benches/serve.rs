//! `imgcache serve` against nginx (Debian's package) with `proxy_cache` and
//! `proxy_cache_lock`, in front of the same origin (an nginx serving files,
//! rate-limited for the cold run) on loopback, driven by the same load
//! generator (`wrk`), in the same run, as ratios:
//!
//! - hits of a 1 MiB image, 64 connections: requests/s (goal ≥ 1.0 × nginx);
//! - hits of a 4 KiB image, 64 connections: requests/s, where a hit's
//!   `open` shows (nginx with its `open_file_cache` on, as imgcache keeps
//!   hot descriptors open);
//! - a 1 GiB hit, 4 connections: GB/s (goal ≥ 0.95 × nginx);
//! - 100 concurrent cold requests of a 256 MiB image from an origin limited
//!   to 128 MiB/s: origin requests (goal 1), and the median time to first
//!   byte of the 99 followers against the leader's (goal ≤ 2 ×);
//! - the server's peak RSS in each run.
//!
//! imgcache runs on both transports: `sendfile` (what `imgcache serve`
//! runs) and `hyper` (what an app that mounts `ImageService` gets).
//!
//! ```text
//! cargo bench --bench serve              # full sizes
//! cargo bench --bench serve -- --quick   # small sizes and short runs, for CI
//! ```
//!
//! Skips with a message where nginx or wrk is missing (`.ci/run` installs
//! both). Not part of `cargo test`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Sizes {
    tiny: u64,
    small: u64,
    big: u64,
    cold: u64,
    cold_clients: usize,
    secs: u32,
    rate: &'static str,
}

fn find(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A peak RSS, in MiB, of `pid`; reset after reading (Linux's
/// `clear_refs` 5), so that the next run has its own.
fn take_peak(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    kib as f64 / 1024.0
}

/// nginx's peak: its largest worker's (the master holds no bodies).
fn nginx_peak(master: u32) -> f64 {
    let mut peak = 0f64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let child = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .is_some_and(|p| p.trim() == master.to_string());
        if child {
            peak = peak.max(take_peak(pid));
        }
    }
    peak
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nginx, master and workers in a process group of their own.
struct Nginx {
    child: Child,
}

impl Nginx {
    /// Stops nginx as it is meant to be stopped — `SIGQUIT` to its group
    /// (a graceful stop: the master waits for its workers, cache manager
    /// and loader) — and waits until no process of the group is left;
    /// `SIGKILL` to the group only if some are still there after 10 s.
    /// Returns how many processes outlived the graceful stop.
    fn stop(&mut self) -> usize {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGQUIT);
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Until the group is empty (ESRCH): the workers leave after their
        // master, and are not this process's children to wait for.
        while killpg(group, None).is_ok() {
            if Instant::now() >= deadline {
                let left = group_members(group.as_raw());
                let _ = killpg(group, Signal::SIGKILL);
                return left.max(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        0
    }
}

/// The processes of process group `pgid` (from /proc).
fn group_members(pgid: i32) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|stat| {
                    // pid (comm) state ppid pgrp …: after the last ')'.
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                        .is_some_and(|g| g == pgid.to_string())
                })
                .count()
        })
        .unwrap_or(0)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn start_nginx(
    nginx: &Path,
    work: &Path,
    origin_dir: &Path,
    origin: u16,
    front: u16,
    rate: &str,
) -> Nginx {
    // /proc/self belongs to the effective user.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let user = if root { "user root;" } else { "" };
    let w = work.display();
    let o = origin_dir.display();
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
    open_file_cache max=1000 inactive=60s;
    open_file_cache_valid 60s;
    keepalive_requests 1000000;
    client_body_temp_path {w}/client;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    proxy_cache_path {w}/cache levels=1:2 keys_zone=img:16m max_size=64g inactive=1d use_temp_path=off;
    log_format origin "$request_uri";
    server {{
        listen 127.0.0.1:{origin};
        access_log {w}/origin.log origin;
        location /o/ {{ alias {o}/; }}
        location /o/cold- {{ alias {o}/cold-; limit_rate {rate}; }}
    }}
    server {{
        listen 127.0.0.1:{front};
        location ~ ^/v2/images/([^/]+)/file$ {{
            proxy_pass http://127.0.0.1:{origin}/o/$1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache img;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 1h;
            proxy_cache_lock_age 1h;
            proxy_cache_valid 200 1d;
            proxy_read_timeout 1h;
        }}
    }}
}}
"#
    );
    let path = work.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(work)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // A group of its own: stopped, and checked for, as one.
        .process_group(0)
        .spawn()
        .expect("start nginx");
    wait_listening(front);
    wait_listening(origin);
    Nginx { child }
}

fn start_imgcache(dir: &Path, origin: u16, transport: &str, extra: &[&str]) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .arg("--dir")
        .arg(dir)
        .args(["serve"])
        .args(extra)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--transport",
            transport,
            "--origin",
        ])
        .arg(format!("http://127.0.0.1:{origin}/o/{{id}}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start imgcache serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, port)
}

/// Reads `id` from `port` whole, once (to warm a cache); its length.
fn get(port: u16, id: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /v2/images/{id}/file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{id} from {port}: {line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    std::io::copy(&mut r, &mut std::io::sink()).unwrap()
}

/// `wrk` on one URL: requests per second.
fn wrk(wrk: &Path, port: u16, id: &str, connections: usize, secs: u32) -> f64 {
    let out = Command::new(wrk)
        .args(["-t2", &format!("-c{connections}"), &format!("-d{secs}s")])
        .arg(format!("http://127.0.0.1:{port}/v2/images/{id}/file"))
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Non-2xx"),
        "wrk saw errors on {port}: {text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate from wrk: {text}"))
}

/// 100 cold requests: the leader's time to its first body byte, and the
/// median of the 99 followers' (each sent as soon as the leader's request
/// is, each timed from its own start); every body read whole.
fn cold(port: u16, id: &str, clients: usize, size: u64) -> (f64, f64) {
    fn one(port: u16, id: &str, first: Option<std::sync::mpsc::Sender<()>>, size: u64) -> f64 {
        let start = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET /v2/images/{id}/file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        if let Some(tx) = &first {
            tx.send(()).unwrap();
        }
        let mut r = BufReader::with_capacity(1 << 20, s);
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).unwrap();
        let ttfb = start.elapsed().as_secs_f64();
        let rest = std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        assert_eq!(rest + 1, size, "{id} from {port}");
        ttfb
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let id2 = id.to_owned();
    let leader = std::thread::spawn(move || one(port, &id2, Some(tx), size));
    rx.recv().unwrap();
    let followers: Vec<_> = (1..clients)
        .map(|_| {
            let id = id.to_owned();
            std::thread::spawn(move || one(port, &id, None, size))
        })
        .collect();
    let leader = leader.join().unwrap();
    let mut ttfbs: Vec<f64> = followers.into_iter().map(|t| t.join().unwrap()).collect();
    ttfbs.sort_by(|a, b| a.total_cmp(b));
    (leader, ttfbs[ttfbs.len() / 2])
}

fn origin_requests(work: &Path, id: &str) -> usize {
    std::fs::read_to_string(work.join("origin.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim_end().ends_with(&format!("/o/{id}")))
        .count()
}

struct Row {
    name: String,
    values: Vec<String>,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (Some(nginx), Some(wrk_bin)) = (find("nginx"), find("wrk")) else {
        println!("serve bench skipped: nginx and wrk are needed (Debian: apt-get install nginx-light wrk)");
        return;
    };
    let sizes = if quick {
        Sizes {
            tiny: 4096,
            small: MIB,
            big: 64 * MIB,
            cold: 32 * MIB,
            cold_clients: 100,
            secs: 2,
            rate: "64m",
        }
    } else {
        Sizes {
            tiny: 4096,
            small: MIB,
            big: 1024 * MIB,
            cold: 256 * MIB,
            cold_clients: 100,
            secs: 10,
            rate: "128m",
        }
    };
    let work = tempfile::tempdir().unwrap();
    let origin_dir = work.path().join("origin");
    std::fs::create_dir(&origin_dir).unwrap();
    let write = |name: &str, size: u64| {
        let mut f = std::fs::File::create(origin_dir.join(name)).unwrap();
        let block: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
        let mut left = size;
        while left > 0 {
            let n = left.min(MIB) as usize;
            f.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
    };
    write("hit-tiny", sizes.tiny);
    write("hit-small", sizes.small);
    write("hit-big", sizes.big);
    let servers = ["nginx", "imgcache sendfile", "imgcache hyper"];
    for s in servers {
        write(&format!("cold-{}", s.replace(' ', "-")), sizes.cold);
    }
    let nginx_work = work.path().join("nginx");
    std::fs::create_dir(&nginx_work).unwrap();
    let (origin_port, front_port) = (free_port(), free_port());
    let proxy = start_nginx(
        &nginx,
        &nginx_work,
        &origin_dir,
        origin_port,
        front_port,
        sizes.rate,
    );
    let master = proxy.child.id();

    let mut rows: Vec<Row> = vec![
        Row {
            name: format!("hit {} MiB, 64 conns: req/s", sizes.small >> 20),
            values: vec![],
        },
        Row {
            name: format!("hit {} KiB, 64 conns: req/s", sizes.tiny >> 10),
            values: vec![],
        },
        Row {
            name: format!("hit {} MiB, 4 conns: GB/s", sizes.big >> 20),
            values: vec![],
        },
        Row {
            name: format!(
                "cold {} MiB x{}: origin requests",
                sizes.cold >> 20,
                sizes.cold_clients
            ),
            values: vec![],
        },
        Row {
            name: "cold: leader TTFB ms".into(),
            values: vec![],
        },
        Row {
            name: "cold: median follower TTFB ms".into(),
            values: vec![],
        },
        Row {
            name: "peak RSS MiB (small / big / cold)".into(),
            values: vec![],
        },
    ];
    let mut raw: Vec<[f64; 6]> = Vec::new();
    for server in servers {
        let cache = work
            .path()
            .join(format!("cache-{}", server.replace(' ', "-")));
        std::fs::create_dir(&cache).unwrap();
        let (child, port, pid) = if server == "nginx" {
            (None, front_port, master)
        } else {
            let transport = server.split(' ').nth(1).unwrap();
            let (child, port) = start_imgcache(&cache, origin_port, transport, &["--public"]);
            let pid = child.id();
            (Some(child), port, pid)
        };
        let peak = |pid: u32| {
            if server == "nginx" {
                nginx_peak(pid)
            } else {
                take_peak(pid)
            }
        };
        assert_eq!(get(port, "hit-tiny"), sizes.tiny);
        assert_eq!(get(port, "hit-small"), sizes.small);
        assert_eq!(get(port, "hit-big"), sizes.big);
        peak(pid);
        let small = wrk(&wrk_bin, port, "hit-small", 64, sizes.secs);
        let tiny = wrk(&wrk_bin, port, "hit-tiny", 64, sizes.secs);
        let rss_small = peak(pid);
        let big = wrk(&wrk_bin, port, "hit-big", 4, sizes.secs) * sizes.big as f64 / 1e9;
        let rss_big = peak(pid);
        let cold_id = format!("cold-{}", server.replace(' ', "-"));
        let (leader, follower) = cold(port, &cold_id, sizes.cold_clients, sizes.cold);
        let rss_cold = peak(pid);
        let requests = origin_requests(&nginx_work, &cold_id);
        rows[0].values.push(format!("{small:.0}"));
        rows[1].values.push(format!("{tiny:.0}"));
        rows[2].values.push(format!("{big:.2}"));
        rows[3].values.push(format!("{requests}"));
        rows[4].values.push(format!("{:.0}", leader * 1e3));
        rows[5].values.push(format!("{:.0}", follower * 1e3));
        rows[6]
            .values
            .push(format!("{rss_small:.0} / {rss_big:.0} / {rss_cold:.0}"));
        raw.push([small, big, requests as f64, leader, follower, tiny]);
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    // What authorizing every request with the origin costs (a HEAD to
    // nginx per hit), and what a positive cache of the origin's yes buys
    // back: the same hits, the same run.
    let mut authz = Vec::new();
    for (label, extra) in [
        ("--public", &["--public"][..]),
        ("authorized each request", &[][..]),
        (
            "--authorization-ttl 60s",
            &["--authorization-ttl", "60s"][..],
        ),
    ] {
        let cache = work.path().join(format!("cache-authz-{}", authz.len()));
        std::fs::create_dir(&cache).unwrap();
        let (mut child, port) = start_imgcache(&cache, origin_port, "sendfile", extra);
        assert_eq!(get(port, "hit-small"), sizes.small);
        let rate = wrk(&wrk_bin, port, "hit-small", 64, sizes.secs);
        let _ = child.kill();
        let _ = child.wait();
        authz.push((label, rate));
    }
    // What keeping hot descriptors open buys: the same hits with none kept
    // (every hit opens its file on the blocking pool), the same run.
    let mut kept = Vec::new();
    for (label, extra) in [
        ("--open-files 0", &["--public", "--open-files", "0"][..]),
        ("default (1024 kept)", &["--public"][..]),
    ] {
        let cache = work.path().join(format!("cache-open-{}", kept.len()));
        std::fs::create_dir(&cache).unwrap();
        let (mut child, port) = start_imgcache(&cache, origin_port, "sendfile", extra);
        assert_eq!(get(port, "hit-tiny"), sizes.tiny);
        assert_eq!(get(port, "hit-small"), sizes.small);
        let tiny = wrk(&wrk_bin, port, "hit-tiny", 64, sizes.secs);
        let small = wrk(&wrk_bin, port, "hit-small", 64, sizes.secs);
        let _ = child.kill();
        let _ = child.wait();
        kept.push((label, tiny, small));
    }
    let mut proxy = proxy;
    let outlived = proxy.stop();
    assert_eq!(
        outlived, 0,
        "nginx processes were still there 10 s after a graceful stop"
    );
    drop(proxy);
    println!(
        "\nimgcache serve vs nginx proxy_cache ({}; same run, loopback, {} cores)",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<40} {:>16} {:>18} {:>16}",
        "", servers[0], servers[1], servers[2]
    );
    for row in &rows {
        println!(
            "{:<40} {:>16} {:>18} {:>16}",
            row.name, row.values[0], row.values[1], row.values[2]
        );
    }
    let n = &raw[0];
    for (i, s) in servers.iter().enumerate().skip(1) {
        let r = &raw[i];
        println!(
            "{s}: hits {:.2} x nginx (goal >= 1.0), tiny hits {:.2} x, big hit {:.2} x (goal >= 0.95), follower TTFB {:.2} x its leader's (goal <= 2; nginx {:.1} x), origin requests {} (goal 1)",
            r[0] / n[0],
            r[5] / n[5],
            r[1] / n[1],
            r[4] / r[3].max(1e-6),
            n[4] / n[3].max(1e-6),
            r[2]
        );
    }
    println!("\nhot descriptors kept open (sendfile, 64 conns; same run):");
    for (label, tiny, small) in &kept {
        println!(
            "  {label:<28} {:>3} KiB {tiny:>8.0} req/s {:.2} x;  {} MiB {small:>8.0} req/s {:.2} x",
            sizes.tiny >> 10,
            tiny / kept[0].1,
            sizes.small >> 20,
            small / kept[0].2
        );
    }
    let public = authz[0].1;
    println!(
        "\nauthorization of {} MiB hits, 64 conns (sendfile; same run):",
        sizes.small >> 20
    );
    for (label, rate) in &authz {
        println!(
            "  {label:<28} {rate:>8.0} req/s  {:.2} x --public",
            rate / public
        );
    }
}
