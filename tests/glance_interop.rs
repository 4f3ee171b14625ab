//! imgcache beside OpenStack Glance's own code, both ways: runs the Python
//! suite in `tests/glance` (Glance from PyPI, in a venv) against this
//! build's `imgcache` binary, streaming its output, and fails if it fails.
//!
//! ```text
//! bash tests/glance/setup.sh                  # once: the venv with Glance 33.0.0
//! cargo test --locked --test glance_interop
//! ```
//!
//! Without the venv (`IMGCACHE_GLANCE_VENV`, default `target/glance-venv`)
//! the test says so and passes, unless `IMGCACHE_REQUIRE_GLANCE=1`.
//! Without PostgreSQL's server programs the suite skips its centralized_db
//! cases with a message, unless `IMGCACHE_REQUIRE_POSTGRES=1`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Says something on the real standard error: the test harness captures
/// `eprintln!`, and a skip must be seen.
fn say(what: &str) {
    let _ = writeln!(std::io::stderr(), "{what}");
}

/// The venv's Python, if it holds Glance and its drivers' imports.
fn glance_python(root: &Path) -> Result<PathBuf, String> {
    let venv = std::env::var_os("IMGCACHE_GLANCE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/glance-venv"));
    let venv = if venv.is_absolute() {
        venv
    } else {
        root.join(venv)
    };
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        return Err(format!("no venv at {}", venv.display()));
    }
    // Package metadata, not an import (importing Glance takes a second).
    let check = Command::new(&python)
        .args([
            "-c",
            "from importlib import metadata as m\n\
             print(m.version('glance'), m.version('xattr'), m.version('psycopg2-binary'))",
        ])
        .output()
        .map_err(|e| format!("run {}: {e}", python.display()))?;
    if !check.status.success() {
        return Err(format!(
            "{} lacks glance, xattr or psycopg2-binary: {}",
            venv.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    say(&format!(
        "glance_interop: {} (glance, xattr, psycopg2: {})",
        venv.display(),
        String::from_utf8_lossy(&check.stdout).trim()
    ));
    Ok(python)
}

#[test]
fn glance_interop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = match glance_python(root) {
        Ok(p) => p,
        Err(why) => {
            if std::env::var("IMGCACHE_REQUIRE_GLANCE").is_ok_and(|v| v == "1") {
                panic!("IMGCACHE_REQUIRE_GLANCE=1 but Glance cannot be run: {why} (bash tests/glance/setup.sh)");
            }
            say(&format!(
                "skipped: Glance interop suite: {why} (bash tests/glance/setup.sh installs it)"
            ));
            return;
        }
    };
    // The suite's output goes straight to the terminal (not captured): it
    // is long-running, and what failed is in it.
    let status = Command::new(&python)
        .args(["-m", "unittest", "-v", "test_interop"])
        .current_dir(root.join("tests").join("glance"))
        .env("IMGCACHE_BIN", env!("CARGO_BIN_EXE_imgcache"))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    assert!(
        status.success(),
        "the Glance interop suite failed ({status}): see its output above"
    );
}
