//! The `imgcache` binary, run as an operator would: every subcommand in
//! human and JSON output, prefetch from a directory and from an HTTP origin
//! on loopback, the Glance config file, and every error path's exit code.
#![cfg(feature = "cli")]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::bytes;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn imgcache(dir: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
    for var in [
        "IMGCACHE_DIR",
        "IMGCACHE_CONFIG",
        "IMGCACHE_DRIVER",
        "IMGCACHE_MAX_SIZE",
        "IMGCACHE_STALL_TIME",
        "IMGCACHE_SQLITE_DB",
        "IMGCACHE_ORIGIN",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.arg("--dir").arg(dir).args(args).output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = imgcache(dir, args);
    assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(dir, &all)).unwrap()
}

/// An origin directory with `names`, each with its MD5 beside it.
fn origin(names: &[&str]) -> (tempfile::TempDir, HashMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut images = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        let data = bytes(i as u64 + 1, 50_000 + i * 7_777);
        std::fs::write(dir.path().join(n), &data).unwrap();
        images.insert(n.to_string(), data);
    }
    (dir, images)
}

fn md5_hex(data: &[u8]) -> String {
    let mut h = imgcache::checksum::Hasher::new(imgcache::checksum::Algorithm::Md5);
    h.update(data);
    h.finish().hex().to_owned()
}

#[test]
fn queue_prefetch_list_and_manage_in_human_output() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let (src, images) = origin(&["cirros", "ubuntu", "debian"]);
    std::fs::write(
        src.path().join("cirros.md5"),
        format!("{}  cirros\n", md5_hex(&images["cirros"])),
    )
    .unwrap();
    let out = ok(c, &["queue-image", "cirros", "ubuntu", "debian"]);
    assert!(
        out.contains("queued cirros") && out.contains("queued debian"),
        "{out}"
    );
    let again = ok(c, &["queue-image", "cirros"]);
    assert!(
        again.contains("already cached, being cached, or queued"),
        "{again}"
    );
    assert_eq!(ok(c, &["list-queued"]), "cirros\nubuntu\ndebian\n");
    let out = ok(c, &["prefetch", "--origin", src.path().to_str().unwrap()]);
    assert!(out.contains("cached    cirros"), "{out}");
    assert_eq!(ok(c, &["list-queued"]), "No queued images.\n");
    let listing = ok(c, &["list-cached"]);
    let lines: Vec<&str> = listing.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LAST ACCESSED"),
        "{listing}"
    );
    assert!(
        lines[1].starts_with("cirros") && lines[1].contains("KiB"),
        "{listing}"
    );
    assert!(
        lines[1].contains('T') && lines[1].ends_with('Z'),
        "ISO-8601: {listing}"
    );
    assert!(lines.last().unwrap().starts_with("3 images"), "{listing}");
    // fetch: a hit, then a miss from the origin.
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("fetched");
    let out = imgcache(
        c,
        &[
            "fetch",
            "cirros",
            "--origin",
            src.path().to_str().unwrap(),
            "-o",
            out_file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("cirros: hit"), "{}", out.stderr);
    assert_eq!(std::fs::read(&out_file).unwrap(), images["cirros"]);
    let stats = ok(c, &["stats"]);
    assert!(
        stats.contains("entries    3") && stats.contains("hits       1"),
        "{stats}"
    );
    assert!(ok(c, &["verify"]).contains("intact     cirros"));
    assert!(ok(c, &["scrub"]).contains("3 intact"));
    assert!(ok(c, &["delete-cached-image", "debian"]).contains("deleted debian"));
    assert!(ok(c, &["--max-size", "60KB", "prune"]).contains("pruned 1 images"));
    assert!(ok(c, &["clean", "--stall-time", "1h"]).contains("removed 0 invalid"));
    ok(c, &["queue-image", "x1", "x2"]);
    assert!(ok(c, &["delete-queued-image", "x1"]).contains("removed x1"));
    assert!(ok(c, &["delete-all-queued-images"]).contains("removed 1 queued"));
    assert!(ok(c, &["delete-all-cached-images"]).contains("deleted 1 cached"));
    assert_eq!(ok(c, &["list-cached"]), "No cached images.\n");
    let _ = std::fs::remove_file(out_file);
}

#[test]
fn every_subcommand_speaks_json() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let (src, images) = origin(&["a", "b"]);
    let s = src.path().to_str().unwrap();
    let q = json(c, &["queue-image", "a", "b", "a"]);
    assert_eq!(q[0]["queued"], true);
    assert_eq!(q[2]["queued"], false);
    assert_eq!(json(c, &["list-queued"]), serde_json::json!(["a", "b"]));
    let p = json(c, &["prefetch", "--origin", s]);
    assert_eq!(p[0]["outcome"], "cached");
    assert_eq!(p[1]["bytes"], images["b"].len());
    let l = json(c, &["list-cached"]);
    assert_eq!(l.as_array().unwrap().len(), 2);
    assert_eq!(l[0]["id"], "a");
    assert_eq!(l[0]["size"], images["a"].len());
    assert_eq!(
        l[0]["crc32"],
        format!("{:08x}", crc32fast::hash(&images["a"]))
    );
    assert!(l[0]["last_accessed"].as_str().unwrap().ends_with('Z'));
    let f = json(
        c,
        &[
            "fetch",
            "a",
            "--origin",
            s,
            "-o",
            c.join("../a.out").to_str().unwrap(),
        ],
    );
    assert_eq!(f["result"], "hit");
    let _ = std::fs::remove_file(c.join("../a.out"));
    let st = json(c, &["stats"]);
    assert_eq!(st["entries"], 2);
    assert_eq!(st["hits"], 1);
    assert_eq!(st["driver"], "sqlite");
    assert_eq!(json(c, &["verify"])[0]["state"], "intact");
    assert_eq!(json(c, &["scrub"])["intact"], 2);
    assert_eq!(json(c, &["clean"])["bytes"], 0);
    // `a` was read by the fetch above, so `b` is the least recently accessed.
    assert_eq!(
        json(c, &["--max-size", "0", "prune"])["removed"],
        serde_json::json!(["b", "a"])
    );
    json(c, &["queue-image", "z"]);
    assert_eq!(json(c, &["delete-queued-image", "z"])["dequeued"], "z");
    assert_eq!(json(c, &["delete-all-queued-images"])["dequeued"], 0);
    assert_eq!(json(c, &["delete-all-cached-images"])["deleted"], 0);
    json(c, &["queue-image", "b"]);
    json(c, &["prefetch", "--origin", s]);
    assert_eq!(json(c, &["delete-cached-image", "b"])["deleted"], "b");
}

#[test]
fn a_failed_prefetch_exits_4_lists_the_failures_and_keeps_them_queued() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let (src, _) = origin(&["good"]);
    std::fs::write(
        src.path().join("bad.md5"),
        "00000000000000000000000000000000  bad\n",
    )
    .unwrap();
    std::fs::write(src.path().join("bad"), b"bytes that do not hash to zero").unwrap();
    ok(c, &["queue-image", "good", "missing", "bad"]);
    let out = imgcache(c, &["prefetch", "--origin", src.path().to_str().unwrap()]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("cached    good"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("FAILED    missing: image missing not found"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("FAILED    bad:") && out.stdout.contains("checksum mismatch"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("prefetch failed for 2 of 3 images (still queued): missing, bad"),
        "{}",
        out.stderr
    );
    assert_eq!(ok(c, &["list-queued"]), "missing\nbad\n");
}

/// Serves `images` over HTTP on loopback for `requests` requests, with
/// Glance's Content-MD5 header; unknown ids get 404.
fn serve(
    images: HashMap<String, Vec<u8>>,
    md5_override: HashMap<String, String>,
    requests: usize,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let id = path
                .strip_prefix("/v2/images/")
                .and_then(|p| p.strip_suffix("/file"))
                .unwrap_or("");
            match images.get(id) {
                Some(data) => {
                    let md5 = md5_override
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| md5_hex(data));
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-MD5: {md5}\r\nConnection: close\r\n\r\n", data.len()).unwrap();
                    stream.write_all(data).unwrap();
                }
                None => {
                    write!(
                        stream,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .unwrap();
                }
            }
        }
    });
    format!("http://{addr}/v2/images/{{id}}/file")
}

#[test]
fn prefetch_and_fetch_from_an_http_origin() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let images: HashMap<String, Vec<u8>> =
        [("img-1", 300_000), ("img-2", 70_000), ("tampered", 1000)]
            .into_iter()
            .map(|(n, len)| (n.to_string(), bytes(len as u64, len)))
            .collect();
    let tampered: HashMap<String, String> = [(
        "tampered".to_string(),
        "11111111111111111111111111111111".to_string(),
    )]
    .into();
    let url = serve(images.clone(), tampered, 5);
    ok(c, &["queue-image", "img-1", "img-2", "tampered", "gone"]);
    let out = imgcache(c, &["prefetch", "--origin", &url, "--parallel", "2"]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("cached    img-1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("FAILED    tampered:") && out.stdout.contains("checksum mismatch"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("FAILED    gone: image gone not found at http://"),
        "{}",
        out.stdout
    );
    // The MD5 the server sent is recorded as Glance's checksum.
    let listed = json(c, &["list-cached"]);
    assert_eq!(listed[0]["checksum"], md5_hex(&images["img-1"]));
    // fetch: a miss through HTTP (the fifth request).
    let dest = cache.path().join("../http.out");
    let out = imgcache(
        c,
        &[
            "fetch",
            "img-2",
            "--origin",
            &url,
            "-o",
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("img-2: hit"),
        "already prefetched: {}",
        out.stderr
    );
    assert_eq!(std::fs::read(&dest).unwrap(), images["img-2"]);
    let _ = std::fs::remove_file(dest);
}

#[test]
fn settings_from_a_glance_config_file_and_the_environment() {
    let root = tempfile::tempdir().unwrap();
    let cache: PathBuf = root.path().join("glance-cache");
    let conf = root.path().join("glance-api.conf");
    std::fs::write(
        &conf,
        format!(
            "[DEFAULT]\n# the cache\nimage_cache_dir = {}\nimage_cache_max_size = 1KiB\nimage_cache_stall_time = 7200\nimage_cache_driver = xattr\n\n[glance_store]\nimage_cache_dir = /not/this/one\n",
            cache.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
        for var in [
            "IMGCACHE_DIR",
            "IMGCACHE_CONFIG",
            "IMGCACHE_DRIVER",
            "IMGCACHE_MAX_SIZE",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd.envs(envs.iter().copied()).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(
        &["--config", conf.to_str().unwrap(), "--json", "stats"],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["dir"], cache.display().to_string());
    assert_eq!(stats["driver"], "xattr");
    assert_eq!(stats["max_size"], 1024);
    // The environment, then flags, override the file.
    let (_, out) = run(
        &["--json", "stats"],
        &[
            ("IMGCACHE_CONFIG", conf.to_str().unwrap()),
            ("IMGCACHE_MAX_SIZE", "2KiB"),
        ],
    );
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["max_size"], 2048);
    let (_, out) = run(
        &[
            "--config",
            conf.to_str().unwrap(),
            "--max-size",
            "3k",
            "--json",
            "stats",
        ],
        &[("IMGCACHE_MAX_SIZE", "2KiB")],
    );
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["max_size"], 3000);
}

#[test]
fn errors_exit_non_zero_with_one_line() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let (src, _) = origin(&["present"]);
    let s = src.path().to_str().unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["queue-image", "../etc/passwd"],
            2,
            "invalid image id \"../etc/passwd\": it contains a path separator",
        ),
        (
            vec!["delete-cached-image", "cache.db"],
            2,
            "names one of the cache's own files",
        ),
        (
            vec!["--config", "/nonexistent/glance-api.conf", "stats"],
            2,
            "cannot read config /nonexistent/glance-api.conf",
        ),
        (
            vec!["--max-size", "lots", "prune"],
            2,
            "max size: \"lots\" is not a size",
        ),
        (
            vec!["--driver", "redis", "stats"],
            2,
            "unknown image_cache_driver \"redis\"",
        ),
        (
            vec!["--stall-time", "soon", "clean"],
            2,
            "stall time: \"soon\" is not a duration",
        ),
        (
            vec!["fetch", "absent", "--origin", s, "-o", "/dev/null"],
            3,
            "image absent not found at",
        ),
        (
            vec![
                "fetch",
                "present",
                "--origin",
                "/no/such/dir",
                "-o",
                "/dev/null",
            ],
            2,
            "is neither a directory nor an http(s) URL template",
        ),
        (
            vec![
                "fetch",
                "present",
                "--origin",
                "http://127.0.0.1:9/no-placeholder",
                "-o",
                "/dev/null",
            ],
            2,
            "has no {id} placeholder",
        ),
        (
            vec!["delete-cached-image", "never"],
            3,
            "image never is not cached",
        ),
        (
            vec!["delete-queued-image", "never"],
            3,
            "image never is not queued",
        ),
    ];
    for (args, code, message) in cases {
        let out = imgcache(c, &args);
        assert_eq!(out.code, code, "{args:?}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {:?}", out.stderr);
        assert!(
            lines[0].starts_with("imgcache: ") && lines[0].contains(message),
            "{args:?}: {}",
            lines[0]
        );
    }
    // No directory anywhere.
    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_remove("IMGCACHE_DIR")
        .env_remove("IMGCACHE_CONFIG")
        .arg("stats")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cache directory"));
    // A corrupt image found by verify: exit 5.
    ok(c, &["queue-image", "present"]);
    ok(c, &["prefetch", "--origin", s]);
    std::fs::write(c.join("present"), bytes(99, 50_000)).unwrap();
    let out = imgcache(c, &["verify"]);
    assert_eq!(out.code, 5, "{}", out.stdout);
    assert!(
        out.stdout.contains("CORRUPT    present: CRC-32"),
        "{}",
        out.stdout
    );
}

/// `-o -` is standard output, as for every Unix tool; nothing named `-` is
/// created. A corrupt cached file is quarantined and the same `fetch`
/// succeeds from the origin.
#[test]
fn fetch_to_dash_is_stdout_and_a_corrupt_entry_is_fetched_again() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let (src, images) = origin(&["cirros"]);
    let s = src.path().to_str().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let run = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
        cmd.env_remove("IMGCACHE_DIR").env_remove("IMGCACHE_CONFIG");
        let out = cmd
            .current_dir(cwd.path())
            .arg("--dir")
            .arg(c)
            .args(["fetch", "cirros", "--origin", s, "-o", "-"])
            .output()
            .unwrap();
        (
            out.status.code(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("cirros: miss"), "{stderr}");
    assert_eq!(stdout, images["cirros"]);
    let (code, stdout, stderr) = run();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("cirros: hit"), "{stderr}");
    assert_eq!(stdout, images["cirros"]);
    assert!(!cwd.path().join("-").exists(), "a file named - was written");

    // Damage the cached copy behind the cache's back.
    std::fs::OpenOptions::new()
        .append(true)
        .open(c.join("cirros"))
        .unwrap()
        .write_all(b"trailing garbage")
        .unwrap();
    let (code, stdout, stderr) = run();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("cirros: miss"), "{stderr}");
    assert_eq!(stdout, images["cirros"]);
    let (_, stdout, stderr) = run();
    assert!(stderr.contains("cirros: hit"), "{stderr}");
    assert_eq!(stdout, images["cirros"]);
}

/// With a custom database name, the database cannot be deleted (or
/// otherwise reached) as an image.
#[test]
fn the_configured_database_is_never_an_image() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    ok(c, &["--sqlite-db", "meta.sqlite", "stats"]);
    assert!(c.join("meta.sqlite").is_file());
    for name in ["meta.sqlite", "meta.sqlite-wal", "meta.sqlite-shm"] {
        let out = imgcache(
            c,
            &["--sqlite-db", "meta.sqlite", "delete-cached-image", name],
        );
        assert_eq!(out.code, 2, "{name}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("names one of the cache's own files"),
            "{}",
            out.stderr
        );
    }
    assert!(c.join("meta.sqlite").is_file(), "the database was deleted");
    ok(c, &["--sqlite-db", "meta.sqlite", "stats"]);
}

/// `imgcache` as a user who may read the cache but not write it (a
/// monitoring account: here `nobody`, through `setpriv`, as root). On a
/// directory Glance's sqlite driver wrote (no imgcache columns or tables)
/// and on one imgcache wrote (a WAL database, with nothing open on it):
/// list-cached, stats and verify answer, say on stderr what they could not
/// do, and change nothing.
#[test]
fn the_commands_that_read_work_on_a_directory_they_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !is_root || Command::new("setpriv").arg("--version").output().is_err() {
        assert!(std::env::var_os("IMGCACHE_REQUIRE_MOUNTS").is_none());
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let as_nobody = |dir: &Path, args: &[&str]| -> Out {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_imgcache"))
            .arg("--dir")
            .arg(dir)
            .args(args)
            .env_remove("IMGCACHE_DRIVER")
            .env_remove("IMGCACHE_DIR")
            .output()
            .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let snapshot = |dir: &Path| -> Vec<(String, u64)> {
        let mut all = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    stack.push(e.path());
                }
                all.push((e.path().display().to_string(), meta.len()));
            }
        }
        all.sort();
        all
    };
    let outer = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // Glance's own sqlite layout, as its driver writes it.
    let glance = outer.path().join("glance");
    for sub in ["queue", "incomplete", "invalid"] {
        std::fs::create_dir_all(glance.join(sub)).unwrap();
    }
    let db = rusqlite::Connection::open(glance.join("cache.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0,
             last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0,
             checksum TEXT);
         INSERT INTO cached_images VALUES ('aaaa', 1700000100.0, 1700000000.0, 11, 3, NULL);",
    )
    .unwrap();
    drop(db);
    std::fs::write(glance.join("aaaa"), b"first image").unwrap();
    std::fs::File::create(glance.join("queue/bbbb")).unwrap();

    // One imgcache wrote (and closed).
    let ours = outer.path().join("ours");
    let (src, images) = origin(&["cirros"]);
    ok(
        &ours,
        &[
            "fetch",
            "cirros",
            "--origin",
            src.path().to_str().unwrap(),
            "-o",
            "/dev/null",
        ],
    );

    for dir in [&glance, &ours] {
        // Readable by all, writable by its owner (root) only.
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let mode = if e.metadata().unwrap().is_dir() {
                    0o755
                } else {
                    0o644
                };
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode)).unwrap();
                if mode == 0o755 {
                    stack.push(e.path());
                }
            }
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let before = snapshot(dir);
        let listed = as_nobody(dir, &["--json", "list-cached"]);
        assert_eq!(listed.code, 0, "{}{}", listed.stdout, listed.stderr);
        assert!(listed.stderr.contains("read-only"), "{}", listed.stderr);
        let rows: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
        let stats = as_nobody(dir, &["--json", "stats"]);
        assert_eq!(stats.code, 0, "{}{}", stats.stdout, stats.stderr);
        let stats: serde_json::Value = serde_json::from_str(&stats.stdout).unwrap();
        let verified = as_nobody(dir, &["verify"]);
        assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
        assert!(
            verified.stderr.contains("not moved aside"),
            "{}",
            verified.stderr
        );
        if dir == &glance {
            assert_eq!(rows[0]["id"], "aaaa", "{rows}");
            assert_eq!(rows[0]["hits"], 3, "{rows}");
            assert_eq!(stats["entries"], 1, "{stats}");
            assert_eq!(stats["queued"], 1, "{stats}");
            assert!(
                verified.stdout.contains("unverified aaaa"),
                "{}",
                verified.stdout
            );
        } else {
            assert_eq!(rows[0]["id"], "cirros", "{rows}");
            assert_eq!(stats["bytes"], images["cirros"].len() as u64, "{stats}");
            assert!(
                verified.stdout.contains("intact     cirros"),
                "{}",
                verified.stdout
            );
        }
        assert_eq!(
            snapshot(dir),
            before,
            "a read-only inspection changed {}",
            dir.display()
        );
        // A command that writes is refused by the file system, not hidden.
        let queued = as_nobody(dir, &["queue-image", "cccc"]);
        assert_ne!(queued.code, 0, "{}", queued.stdout);
    }
}

/// Smaller breaks met beside Glance: a directory origin's checksum file is
/// no image; a glance-api.conf whose `[database] connection` is MySQL's is
/// told that only PostgreSQL is supported; every message shows a database
/// URL in one form, its password as `***`.
#[test]
fn sidecars_other_databases_and_one_form_of_url() {
    let (src, images) = origin(&["cirros"]);
    let cache = tempfile::tempdir().unwrap();
    let o = src.path().to_str().unwrap();
    // The image is there with its MD5 beside it; the MD5 is not an image.
    std::fs::write(
        src.path().join("cirros.md5"),
        format!("{}  cirros\n", md5_hex(&images["cirros"])),
    )
    .unwrap();
    ok(
        cache.path(),
        &["fetch", "cirros", "--origin", o, "-o", "/dev/null"],
    );
    let sidecar = imgcache(
        cache.path(),
        &["fetch", "cirros.md5", "--origin", o, "-o", "/dev/null"],
    );
    assert_eq!(sidecar.code, 3, "{}{}", sidecar.stdout, sidecar.stderr);
    assert_eq!(images.len(), 1);

    let conf = cache.path().join("glance-api.conf");
    std::fs::write(
        &conf,
        "[DEFAULT]\nimage_cache_driver = centralized_db\nworker_self_reference_url = http://a:9292\n\
         [database]\nconnection = mysql+pymysql://glance:s3cret@db/glance\n",
    )
    .unwrap();
    let mysql = imgcache(cache.path(), &["--config", conf.to_str().unwrap(), "stats"]);
    assert_eq!(mysql.code, 2, "{}", mysql.stderr);
    assert!(mysql.stderr.contains("mysql database"), "{}", mysql.stderr);
    assert!(mysql.stderr.contains("PostgreSQL only"), "{}", mysql.stderr);
    assert!(!mysql.stderr.contains("s3cret"), "{}", mysql.stderr);

    let shown = ok(
        cache.path(),
        &[
            "--driver",
            "centralized_db",
            "--node-url",
            "http://a:9292",
            "--database-url",
            "postgres://glance:s3cret@db:5432/glance",
            "serve",
            "--origin",
            o,
            "--check-config",
        ],
    );
    assert!(
        shown.contains("database_url = postgres://glance:***@db:5432/glance"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
}
