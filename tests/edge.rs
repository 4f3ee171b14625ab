//! `imgcache serve` at the edge, as a hostile or broken client meets it:
//! what one client may hold (connections, descriptors, fill threads) and
//! for how long (heads, idle connections, responses nobody reads), and the
//! HTTP details such clients probe. Real processes, real sockets; every
//! wait is for an event (a response, a close), with a generous guard so a
//! failure cannot hang the suite.

mod fleet_kit;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_kit::{data, runtime, Origin};

/// The longest any single wait here may take before the test fails.
const GUARD: Duration = Duration::from_secs(60);

/// `imgcache serve` on a directory origin (or `origin`), with `args`;
/// started through `sh` when `nofile` asks for a descriptor limit.
struct Serve {
    child: Child,
    data: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(origin: &str, args: &[&str], nofile: Option<u32>) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_imgcache");
    let mut argv: Vec<String> = vec![
        "--dir".into(),
        dir.path().join("cache").display().to_string(),
        "serve".into(),
        "--public".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--origin".into(),
        origin.into(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut command = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(bin)
                .args(&argv);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.args(&argv);
            c
        }
    };
    let mut child = command
        .env("RUST_LOG", "imgcache=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("serving"), "{line}");
    let after = |marker: &str| {
        line.split(marker)
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    Serve {
        data: after("on http://"),
        admin: after("management API on http://"),
        child,
        _dir: dir,
    }
}

/// A directory origin holding `images`.
fn dir_origin(images: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in images {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.set_write_timeout(Some(GUARD)).unwrap();
    s
}

/// One whole request on a connection of its own: the status and body.
fn get(addr: &str, path: &str, headers: &str) -> (u16, Vec<u8>) {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, all[end..].to_vec())
}

/// Reads until the server closes the connection (or resets it): how many
/// bytes came.
fn read_until_closed(s: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return n,
            Err(e) => panic!("no close within {GUARD:?}: {e}"),
        }
    }
}

#[test]
fn a_client_that_stops_reading_is_cut_off_on_both_transports() {
    let big = data(64 << 20, 1);
    let origin = dir_origin(&[("big", &big), ("small", b"small")]);
    let o = origin.path().display().to_string();
    for transport in ["sendfile", "hyper"] {
        // One connection at a time: the second client is served only once
        // the first one's connection is let go.
        let s = serve(
            &o,
            &[
                "--transport",
                transport,
                "--send-timeout",
                "1s",
                "--max-connections",
                "1",
            ],
            None,
        );
        assert_eq!(get(&s.data, "/v2/images/big/file", "").0, 200);
        let mut stuck = connect(&s.data);
        write!(stuck, "GET /v2/images/big/file HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // Served while `stuck` holds the only slot and reads nothing:
        // only after the send timeout cut it.
        let (status, body) = get(&s.data, "/v2/images/small/file", "");
        assert_eq!((status, &body[..]), (200, &b"small"[..]), "{transport}");
        let got = read_until_closed(&mut stuck);
        assert!(got < big.len(), "{transport}: the stuck client got it all");
    }
}

#[test]
fn the_management_port_times_out_heads_and_idle_connections() {
    let origin = dir_origin(&[]);
    let s = serve(
        &origin.path().display().to_string(),
        &["--header-timeout", "1s"],
        None,
    );
    // A head that never ends, a connection that never speaks, and one
    // that stays idle after its request: each is closed by the server.
    let mut half = connect(&s.admin);
    half.write_all(b"GET /v2/cache HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut silent = connect(&s.admin);
    let mut kept = connect(&s.admin);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    for (what, conn) in [
        ("half", &mut half),
        ("silent", &mut silent),
        ("kept", &mut kept),
    ] {
        let n = read_until_closed(conn);
        assert!(what != "kept" || n > 0, "no response before the close");
    }
    // And the data port's own head timeout.
    let mut data_half = connect(&s.data);
    data_half
        .write_all(b"GET /v2/images/x/file HTTP/1.1\r\n")
        .unwrap();
    read_until_closed(&mut data_half);
}

#[test]
fn a_flood_on_the_management_port_never_stops_the_data_port() {
    let origin = dir_origin(&[("img", b"an image")]);
    // 128 descriptors in all, as a crowded host might leave a process.
    // Its budget: 128 - 64 reserved - 3 × 8 fills = 40, of which 10 for
    // the management port and 15 data connections.
    let s = serve(
        &origin.path().display().to_string(),
        &["--admin-max-connections", "16", "--max-fills", "8"],
        Some(128),
    );
    // 130 bare connections to the management port (no token is needed to
    // open one), held open: more than the 128 descriptors the process may
    // open, were it to accept them all. (The listen backlog, 128, holds
    // those the cap leaves waiting.)
    let flood: Vec<TcpStream> = (0..130).map(|_| connect(&s.admin)).collect();
    for round in 0..20 {
        let (status, body) = get(&s.data, "/v2/images/img/file", "");
        assert_eq!(
            (status, &body[..]),
            (200, &b"an image"[..]),
            "request {round}"
        );
    }
    drop(flood);
    // The management API answers again once the flood is gone.
    assert_eq!(get(&s.admin, "/healthz", "").0, 200);
}

#[test]
fn fills_are_bounded_and_what_is_cached_or_filling_is_still_served() {
    let a = data(4 << 20, 2);
    let b = data(1 << 20, 3);
    runtime().block_on(async {
        // The origin holds its first transfer after 64 KiB until released.
        let origin = Origin::start_held(
            HashMap::from([("a".to_owned(), a.clone()), ("b".to_owned(), b.clone())]),
            256 << 20,
            Some(64 << 10),
        )
        .await;
        let template = origin.template();
        let s = tokio::task::spawn_blocking(move || serve(&template, &["--max-fills", "1"], None))
            .await
            .unwrap();
        let client = reqwest::Client::new();
        let url = |id: &str| format!("http://{}/v2/images/{id}/file", s.data);
        let mut first = client.get(url("a")).send().await.unwrap();
        assert_eq!(first.status(), 200);
        assert!(first.chunk().await.unwrap().is_some());
        // The one fill runs: another miss is told to come back…
        let r = client.get(url("b")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        // …while a client of the fill in progress follows it.
        let follower = client.get(url("a")).send().await.unwrap();
        assert_eq!(follower.status(), 200);
        origin.release();
        assert!(follower.bytes().await.unwrap()[..] == a[..]);
        drop(first);
        // The slot is free again: the miss fills.
        let r = client.get(url("b")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.unwrap()[..] == b[..]);
        tokio::task::spawn_blocking(move || drop(s)).await.unwrap();
    });
}

#[test]
fn http_details_a_prober_tries() {
    let origin = dir_origin(&[("img", b"0123456789")]);
    for transport in ["sendfile", "hyper"] {
        let s = serve(
            &origin.path().display().to_string(),
            &["--transport", transport],
            None,
        );
        // Two Host headers (RFC 9112 §3.2): 400.
        let (status, _) = get(&s.data, "/v2/images/img/file", "Host: y\r\n");
        assert_eq!(status, 400, "{transport}: two Host headers");
        // A suffix of zero bytes is unsatisfiable: 416, not the image.
        let (status, body) = get(&s.data, "/v2/images/img/file", "Range: bytes=-0\r\n");
        assert_eq!(status, 416, "{transport}: bytes=-0 got {body:?}");
        let (status, body) = get(&s.data, "/v2/images/img/file", "Range: bytes=-3\r\n");
        assert_eq!((status, &body[..]), (206, &b"789"[..]), "{transport}");
    }
}

#[test]
fn a_token_in_the_query_string_never_reaches_the_log() {
    let origin = dir_origin(&[("img", b"x")]);
    let mut s = serve(&origin.path().display().to_string(), &[], None);
    let (status, _) = get(&s.data, "/v2/images/img/file?token=S3CR3T-VALUE", "");
    assert_eq!(status, 200);
    let _ = s.child.kill();
    let _ = s.child.wait();
    let mut log = String::new();
    s.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("/v2/images/img/file"),
        "no request logged: {log}"
    );
    assert!(
        !log.contains("S3CR3T"),
        "the query string was logged: {log}"
    );
}
