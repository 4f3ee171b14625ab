//! A throwaway PostgreSQL server for the tests (features `test-utils` and
//! `postgres`): Debian's `postgresql` package, `initdb` into a temporary
//! folder, the server on a free loopback port, as an unprivileged user when
//! the tests run as root. One per test process, started on first use.
//!
//! A small shell supervisor owns the server and reads commands on its
//! standard input (`stop`, `crash`, `start`); when the test process ends,
//! its input closes and it stops the server and removes the folder, so
//! nothing outlives the tests. Readiness is the server's own log line, never
//! a sleep.
//!
//! `IMGCACHE_TEST_DATABASE_URL` names a server to use instead (child
//! processes of a test get the parent's this way). Where no server can be
//! had, [`cluster`] says why and returns `None` — or panics when
//! `IMGCACHE_REQUIRE_POSTGRES` is set, as `.ci/run` sets it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use parking_lot::Condvar;

/// The environment variable naming a server to use instead of starting one.
pub const URL_VAR: &str = "IMGCACHE_TEST_DATABASE_URL";

/// The environment variable that turns "no server here" into a failure.
pub const REQUIRE_VAR: &str = "IMGCACHE_REQUIRE_POSTGRES";

/// How long the server may take to start or stop before the harness gives
/// up (a bound on a wait for an event, not a sleep).
const PATIENCE: Duration = Duration::from_secs(60);

/// A running server.
#[derive(Debug)]
pub struct Cluster {
    url: String,
    port: u16,
    control: Option<Mutex<ChildStdin>>,
    output: std::sync::Arc<Output>,
}

/// The supervisor's output, as a thread follows it.
#[derive(Debug, Default)]
struct Output {
    log: parking_lot::Mutex<Log>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    ended: bool,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// The test process's server, started on first use; `None` (after saying
/// why on standard error) where none can be had.
pub fn cluster() -> Option<&'static Cluster> {
    let c = CLUSTER.get_or_init(|| match start() {
        Ok(c) => Some(c),
        Err(why) => {
            if std::env::var_os(REQUIRE_VAR).is_some() {
                panic!("{REQUIRE_VAR} is set but no PostgreSQL server could be started: {why}");
            }
            eprintln!("skipped: no PostgreSQL server for the centralized_db tests: {why}");
            None
        }
    });
    c.as_ref()
}

impl Cluster {
    /// The URL of its database (`postgres://imgcache@127.0.0.1:PORT/postgres`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The environment a child process needs to use this server.
    pub fn child_env(&self) -> (&'static str, String) {
        (URL_VAR, self.url.clone())
    }

    /// Whether the harness controls the server (it started it), so that
    /// [`Cluster::stop`], [`Cluster::crash`] and [`Cluster::start`] work.
    pub fn controlled(&self) -> bool {
        self.control.is_some()
    }

    /// A fast shutdown; returns when the server is down.
    pub fn stop(&self) {
        self.command("stop", "STOPPED");
    }

    /// An immediate shutdown, as a crash (the next start recovers).
    pub fn crash(&self) {
        self.command("crash", "STOPPED");
    }

    /// Starts the server again; returns when it accepts connections.
    pub fn start(&self) {
        self.command("start", "ready to accept connections");
    }

    fn command(&self, cmd: &str, until: &str) {
        let control = self
            .control
            .as_ref()
            .expect("a server given by IMGCACHE_TEST_DATABASE_URL cannot be controlled");
        let seen = self.output.log.lock().lines.len();
        {
            let mut stdin = control.lock().unwrap_or_else(|e| e.into_inner());
            writeln!(stdin, "{cmd}").expect("write to the server's supervisor");
            stdin.flush().expect("write to the server's supervisor");
        }
        self.wait_for(seen, until)
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }

    /// Waits until a log line after the first `seen` contains `what`.
    fn wait_for(&self, seen: usize, what: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + PATIENCE;
        let mut log = self.output.log.lock();
        loop {
            if log.lines[seen.min(log.lines.len())..]
                .iter()
                .any(|l| l.contains(what))
            {
                return Ok(());
            }
            if log.ended {
                return Err(format!(
                    "the server's supervisor ended before {what:?}:\n{}",
                    log.lines.join("\n")
                ));
            }
            if self
                .output
                .changed
                .wait_until(&mut log, deadline)
                .timed_out()
            {
                return Err(format!(
                    "no {what:?} within {PATIENCE:?}:\n{}",
                    log.lines.join("\n")
                ));
            }
        }
    }
}

/// The folder of PostgreSQL's server programs (`initdb`, `postgres`).
fn bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    // The newest version first.
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.reverse();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
}

/// A user to run the server as when we are root (`initdb` refuses root):
/// the package's `postgres`, else `nobody`.
fn unprivileged() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let find = |name: &str| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    find("postgres").or_else(|| find("nobody"))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

const SUPERVISOR: &str = r#"
DATA="$1"; BIN="$2"; PORT="$3"; AS="$4"
$AS "$BIN/initdb" -D "$DATA/db" -U imgcache --auth=trust -E UTF8 --no-sync >"$DATA/initdb.log" 2>&1 \
  || { echo "INITDB FAILED"; cat "$DATA/initdb.log"; rm -rf "$DATA"; exit 1; }
start() {
  $AS "$BIN/postgres" -D "$DATA/db" -p "$PORT" -k "$DATA" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c full_page_writes=off -c max_connections=400 \
    -c log_min_messages=warning -c log_min_error_statement=panic 2>&1 &
  PID=$!
}
stop() {
  $AS "$BIN/pg_ctl" -D "$DATA/db" stop -m "$1" -w -t 60 >/dev/null 2>&1 || kill -KILL "$PID" 2>/dev/null
  wait "$PID" 2>/dev/null
  echo STOPPED
}
start
while read -r cmd; do
  case "$cmd" in
    stop) stop fast ;;
    crash) stop immediate ;;
    start) start ;;
  esac
done
stop immediate >/dev/null
rm -rf "$DATA"
"#;

fn start() -> Result<Cluster, String> {
    if let Ok(url) = std::env::var(URL_VAR) {
        return Ok(Cluster {
            port: 0,
            url,
            control: None,
            output: Default::default(),
        });
    }
    let bin = bindir().ok_or(
        "no initdb/postgres found (install Debian's postgresql package: apt-get install postgresql)",
    )?;
    let data = std::env::temp_dir().join(format!(
        "imgcache-pg-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&data).map_err(|e| format!("create {}: {e}", data.display()))?;
    let run_as = if is_root() {
        let (uid, gid) = unprivileged().ok_or("running as root, and no postgres or nobody user")?;
        std::os::unix::fs::chown(&data, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", data.display()))?;
        format!("setpriv --reuid={uid} --regid={gid} --clear-groups --")
    } else {
        String::new()
    };
    let port = free_port()?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(SUPERVISOR)
        .arg("imgcache-pg")
        .arg(&data)
        .arg(&bin)
        .arg(port.to_string())
        .arg(&run_as)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Never the test's own output: a test that captures a child's
        // output would wait for this server to end.
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start the server's supervisor: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let output = std::sync::Arc::new(Output::default());
    let follow = output.clone();
    // The supervisor reaps itself; this thread only follows its output.
    std::thread::Builder::new()
        .name("imgcache-pg-log".into())
        .spawn(move || {
            let _child = child;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                follow.log.lock().lines.push(line);
                follow.changed.notify_all();
            }
            follow.log.lock().ended = true;
            follow.changed.notify_all();
        })
        .map_err(|e| e.to_string())?;
    let cluster = Cluster {
        url: format!("postgres://imgcache@127.0.0.1:{port}/postgres"),
        port,
        control: Some(Mutex::new(stdin)),
        output,
    };
    cluster.wait_for(0, "ready to accept connections")?;
    Ok(cluster)
}

/// The cluster's URL, as the kit's store needs it.
pub(crate) fn database_url() -> crate::Result<String> {
    let c = cluster().ok_or_else(|| {
        crate::Error::Config("no PostgreSQL server for the tests (see the message above)".into())
    })?;
    Ok(c.url().to_owned())
}

/// A node URL for a cache in `dir` (its own rows, so that caches of
/// different tests share one database without meeting).
pub fn node_for(dir: &Path) -> String {
    format!("file://{}", dir.display())
}
