//! Bounded memory: streaming a 1 GiB image through the tee, through
//! `send_to`, and through a single-flight follower keeps the process's peak
//! resident memory (`VmHWM`) under 32 MiB. Each path runs in a child process
//! of its own, which reports its peak.
//!
//! Ignored in the default run (it writes 2 GiB); `.ci/run` runs it:
//! `cargo test --test memory -- --ignored --nocapture`.

mod common;

use std::io::{self, Read};
use std::process::Command;

use common::{child_cache, id};
use imgcache::ImageStream;

const GIB: u64 = 1 << 30;
const LIMIT_KIB: u64 = 32 * 1024;

/// A 1 GiB backend stream made of a repeated block: no memory of its own.
struct Pattern {
    left: u64,
    block: Vec<u8>,
}

impl Pattern {
    fn new(len: u64) -> Self {
        Pattern {
            left: len,
            block: (0..64 * 1024).map(|i| (i % 251) as u8).collect(),
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64)
            .min(self.left)
            .min(self.block.len() as u64) as usize;
        buf[..n].copy_from_slice(&self.block[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads `r` to its end through a 64 KiB buffer; returns the byte count.
fn drain(mut r: impl Read) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf).expect("read") {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The child's part: one path, then its peak.
#[test]
fn child() {
    let Some((cmd, cache)) = child_cache() else {
        return;
    };
    let bytes = match cmd.as_str() {
        "tee" => {
            let stream = cache
                .fetch(&id("big"), None, || Ok(Pattern::new(GIB)))
                .expect("fetch");
            assert!(matches!(stream, ImageStream::Filling(_)));
            drain(stream)
        }
        "send" => {
            let image = cache
                .open_for_read(&id("big"))
                .expect("open")
                .expect("cached");
            let (rd, wr) = nix::unistd::pipe().expect("pipe");
            let reader = std::thread::spawn(move || drain(std::fs::File::from(rd)));
            let sent = image.send_to(&wr, None).expect("send");
            drop(wr);
            assert_eq!(reader.join().expect("reader"), sent);
            sent
        }
        "follow" => {
            let filler = cache
                .fetch(&id("big2"), None, || Ok(Pattern::new(GIB)))
                .expect("fetch");
            let follower = cache
                .fetch(&id("big2"), None, || -> io::Result<Pattern> {
                    unreachable!()
                })
                .expect("follow");
            assert!(matches!(follower, ImageStream::Following(_)));
            let filling = std::thread::spawn(move || drain(filler));
            let followed = drain(follower);
            assert_eq!(filling.join().expect("filler"), GIB);
            followed
        }
        other => panic!("unknown command {other}"),
    };
    assert_eq!(bytes, GIB);
    println!("peak {} KiB", peak_kib());
}

fn run(dir: &std::path::Path, cmd: &str) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child",
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env("IMGCACHE_CHILD", cmd)
        .env("IMGCACHE_DIR", dir)
        .env("IMGCACHE_DRIVER", "sqlite")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split("peak ").nth(1))
        .and_then(|v| v.trim().trim_end_matches(" KiB").parse().ok())
        .unwrap_or_else(|| panic!("{cmd}: no peak reported: {stdout}"))
}

#[test]
#[ignore = "writes 2 GiB; run by .ci/run"]
fn one_gib_paths_stay_under_32_mib() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for cmd in ["tee", "send", "follow"] {
        let peak = run(dir.path(), cmd);
        report.push(format!("{cmd}: peak RSS {:.1} MiB", peak as f64 / 1024.0));
        assert!(
            peak < LIMIT_KIB,
            "{cmd}: peak RSS {peak} KiB over {LIMIT_KIB} KiB"
        );
    }
    eprintln!("1 GiB streamed; {}", report.join("; "));
}

/// `imgcache serve` (a real process) fills a 1 GiB image for 8 clients at
/// once, then serves it to 8 more as hits, on each transport: the server's
/// peak RSS stays under 64 MiB. The size comes from
/// `IMGCACHE_SERVE_BYTES` (default 1 GiB).
#[test]
#[ignore = "writes 2 GiB; run by .ci/run"]
fn serving_one_gib_to_eight_clients_stays_under_64_mib() {
    const SERVE_LIMIT_KIB: u64 = 64 * 1024;
    let size: u64 = std::env::var("IMGCACHE_SERVE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(GIB);
    let origin = tempfile::tempdir().unwrap();
    // A sparse file: the origin costs no disk; its MD5 sits beside it.
    let file = std::fs::File::create(origin.path().join("big")).unwrap();
    file.set_len(size).unwrap();
    let mut h = imgcache::checksum::Hasher::new(imgcache::checksum::Algorithm::Md5);
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    std::fs::write(origin.path().join("big.md5"), h.finish().hex()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut report = Vec::new();
    for transport in ["sendfile", "hyper"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .arg("--dir")
            .arg(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--transport",
                transport,
                "--origin",
            ])
            .arg(origin.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .expect("address line")
            .replace("{id}", "big");
        let pid = child.id();
        runtime.block_on(async {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            for round in ["miss", "hit"] {
                let mut tasks = Vec::new();
                for _ in 0..8 {
                    let (client, url) = (client.clone(), base.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut r = client.get(url).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                        let mut n = 0u64;
                        let zeros = vec![0u8; 1 << 20];
                        while let Some(chunk) = r.chunk().await.unwrap() {
                            // A slice comparison (memcmp), fast even unoptimized.
                            for part in chunk.chunks(zeros.len()) {
                                assert!(part == &zeros[..part.len()], "wrong bytes");
                            }
                            n += chunk.len() as u64;
                        }
                        n
                    }));
                }
                for t in tasks {
                    assert_eq!(t.await.unwrap(), size, "{transport} {round}");
                }
            }
        });
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let peak: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        child.kill().unwrap();
        child.wait().unwrap();
        report.push(format!(
            "{transport}: peak RSS {:.1} MiB",
            peak as f64 / 1024.0
        ));
        assert!(
            peak < SERVE_LIMIT_KIB,
            "{transport}: server peak RSS {peak} KiB over {SERVE_LIMIT_KIB} KiB"
        );
    }
    eprintln!(
        "served {} MiB to 8 followers and 8 hits; {}",
        size >> 20,
        report.join("; ")
    );
}
