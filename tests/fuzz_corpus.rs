//! The fuzz targets' checked-in corpora (`fuzz/corpus/<target>/`), replayed
//! on stable Rust as ordinary tests. Inputs that once broke something are
//! kept there, so every crash found becomes a regression test.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

#[test]
fn urls_corpus() {
    for (path, data) in corpus("urls") {
        imgcache::testing::urls(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn id_corpus() {
    for (path, data) in corpus("id") {
        imgcache::testing::id(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn stored_values_corpus() {
    for (path, data) in corpus("stored_values") {
        imgcache::testing::stored_values(&data)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn sqlite_db_corpus() {
    for (path, data) in corpus("sqlite_db") {
        let dir = tempfile::tempdir().unwrap();
        imgcache::testing::sqlite_db(dir.path(), &data)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn ops_corpus() {
    for (path, data) in corpus("ops") {
        let dir = tempfile::tempdir().unwrap();
        imgcache::testing::ops(dir.path(), &data)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn http_request_corpus() {
    for (path, data) in corpus("http_request") {
        imgcache::testing::http_request(&data)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn admin_request_corpus() {
    for (path, data) in corpus("admin_request") {
        imgcache::testing::admin_request(&data)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
