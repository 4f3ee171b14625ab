//! Model-based test: random operation sequences run against the real cache
//! (each driver, real files) and a small in-memory model; after every step
//! the two must agree on everything the cache reports.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use imgcache::{CacheOptions, CacheWriter, Clock, DriverKind, Error, ImageCache, ManualClock};
use proptest::prelude::*;

use common::{bytes, id};

const IDS: [&str; 5] = [
    "1",
    "2",
    "99",
    "xxx",
    "3f1c0e8a-5b1e-4c53-9d0e-1f2a3b4c5d6e",
];

/// Cases per driver; `PROPTEST_CASES` overrides it.
const CASES: u32 = 256;

#[derive(Debug, Clone)]
enum Op {
    Queue(usize),
    /// Open, write `len` bytes of seed `seed`, commit.
    WriteCommit(usize, u64, usize),
    /// Open, write `len` bytes, abort.
    WriteAbort(usize, usize),
    /// Open a writer and keep it open across steps.
    Begin(usize, u64, usize),
    /// Commit (true) or drop (false) the writer kept for an id, if any.
    Finish(usize, bool),
    Read(usize),
    DeleteOne(usize),
    DeleteAll,
    DeleteQueued(usize),
    DeleteAllQueued,
    Prune(u64),
    Clean,
    Tick(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0..IDS.len();
    prop_oneof![
        3 => i.clone().prop_map(Op::Queue),
        4 => (i.clone(), any::<u64>(), 0usize..3000).prop_map(|(i, s, l)| Op::WriteCommit(i, s, l)),
        1 => (i.clone(), 0usize..3000).prop_map(|(i, l)| Op::WriteAbort(i, l)),
        2 => (i.clone(), any::<u64>(), 0usize..3000).prop_map(|(i, s, l)| Op::Begin(i, s, l)),
        2 => (i.clone(), any::<bool>()).prop_map(|(i, c)| Op::Finish(i, c)),
        4 => i.clone().prop_map(Op::Read),
        2 => i.clone().prop_map(Op::DeleteOne),
        1 => Just(Op::DeleteAll),
        1 => i.clone().prop_map(Op::DeleteQueued),
        1 => Just(Op::DeleteAllQueued),
        2 => (0u64..8000).prop_map(Op::Prune),
        1 => Just(Op::Clean),
        3 => (0u64..3).prop_map(Op::Tick),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct Entry {
    data: Vec<u8>,
    hits: u64,
    accessed: SystemTime,
    modified: SystemTime,
}

#[derive(Debug, Default)]
struct Model {
    cached: BTreeMap<String, Entry>,
    queue: Vec<String>,
    writing: BTreeSet<String>,
    invalid: BTreeSet<String>,
}

/// The clock's time as the cache stores it (seconds in an `f64`).
fn stored(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs)
}

struct Real {
    dir: tempfile::TempDir,
    kind: DriverKind,
    clock: ManualClock,
    cache: ImageCache,
    writers: HashMap<String, (CacheWriter, Vec<u8>)>,
}

impl Real {
    fn open(dir: &std::path::Path, kind: DriverKind, clock: &ManualClock) -> ImageCache {
        CacheOptions::new(dir)
            .driver(kind)
            .clock(Arc::new(clock.clone()))
            .open()
            .unwrap()
    }
}

fn run(kind: DriverKind, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let cache = Real::open(dir.path(), kind, &clock);
    let mut real = Real {
        dir,
        kind,
        clock,
        cache,
        writers: HashMap::new(),
    };
    let mut m = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        apply(&mut real, &mut m, &op)
            .map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
        check(&real, &m)
            .map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
    }
    Ok(())
}

/// What opening a writer for `name` should give, per the model.
fn expect_open(m: &Model, name: &str) -> Result<(), &'static str> {
    if m.cached.contains_key(name) {
        Err("cached")
    } else if m.writing.contains(name) {
        Err("being cached")
    } else {
        Ok(())
    }
}

fn open_outcome(r: &Result<CacheWriter, Error>) -> Result<(), &'static str> {
    match r {
        Ok(_) => Ok(()),
        Err(Error::AlreadyCached { .. }) => Err("cached"),
        Err(Error::AlreadyBeingCached { .. }) => Err("being cached"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn commit(m: &mut Model, name: &str, data: Vec<u8>, now: SystemTime) {
    m.cached.insert(
        name.to_owned(),
        Entry {
            data,
            hits: 0,
            accessed: now,
            modified: now,
        },
    );
    m.queue.retain(|q| q != name);
}

fn apply(r: &mut Real, m: &mut Model, op: &Op) -> Result<(), String> {
    let now = stored(r.clock.now());
    let c = &r.cache;
    match *op {
        Op::Queue(i) => {
            let name = IDS[i];
            let expected = !m.cached.contains_key(name)
                && !m.writing.contains(name)
                && !m.queue.iter().any(|q| q == name);
            let got = c.queue_image(&id(name)).map_err(|e| e.to_string())?;
            if got != expected {
                return Err(format!("queue_image gave {got}, model {expected}"));
            }
            if expected {
                m.queue.push(name.to_owned());
            }
        }
        Op::WriteCommit(i, seed, len) | Op::Begin(i, seed, len) => {
            let name = IDS[i];
            let w = c.open_for_write(&id(name));
            let (got, want) = (open_outcome(&w), expect_open(m, name));
            if got != want {
                return Err(format!("open_for_write gave {got:?}, model {want:?}"));
            }
            if let Ok(mut w) = w {
                let data = bytes(seed, len);
                for chunk in data.chunks(1000) {
                    w.write_all(chunk).map_err(|e| e.to_string())?;
                }
                if matches!(op, Op::WriteCommit(..)) {
                    let info = w.commit().map_err(|e| e.to_string())?;
                    if info.crc32 != Some(crc32fast::hash(&data)) {
                        return Err("commit crc differs".into());
                    }
                    commit(m, name, data, now);
                } else {
                    m.writing.insert(name.to_owned());
                    r.writers.insert(name.to_owned(), (w, data));
                }
            }
        }
        Op::WriteAbort(i, len) => {
            let name = IDS[i];
            let w = c.open_for_write(&id(name));
            let (got, want) = (open_outcome(&w), expect_open(m, name));
            if got != want {
                return Err(format!("open_for_write gave {got:?}, model {want:?}"));
            }
            if let Ok(mut w) = w {
                w.write_all(&vec![0xAB; len]).map_err(|e| e.to_string())?;
                w.abort("model abort").map_err(|e| e.to_string())?;
                m.invalid.insert(name.to_owned());
            }
        }
        Op::Finish(i, ok) => {
            let name = IDS[i];
            if let Some((w, data)) = r.writers.remove(name) {
                m.writing.remove(name);
                if ok {
                    w.commit().map_err(|e| e.to_string())?;
                    commit(m, name, data, now);
                } else {
                    drop(w);
                    m.invalid.insert(name.to_owned());
                }
            }
        }
        Op::Read(i) => {
            let name = IDS[i];
            let got = c.open_for_read(&id(name)).map_err(|e| e.to_string())?;
            match (got, m.cached.get_mut(name)) {
                (None, None) => {}
                (Some(mut img), Some(e)) => {
                    e.hits += 1;
                    e.accessed = now;
                    let bytes = img.read_all().map_err(|e| e.to_string())?;
                    if bytes != e.data {
                        return Err("read returned other bytes".into());
                    }
                    if img.info().hits != e.hits {
                        return Err(format!(
                            "open reported {} hits, model {}",
                            img.info().hits,
                            e.hits
                        ));
                    }
                }
                (g, e) => {
                    return Err(format!(
                        "open_for_read: cache {}, model {}",
                        g.is_some(),
                        e.is_some()
                    ))
                }
            }
        }
        Op::DeleteOne(i) => {
            let name = IDS[i];
            let got = c
                .delete_cached_image(&id(name))
                .map_err(|e| e.to_string())?;
            let want = m.cached.remove(name).is_some();
            if got != want {
                return Err(format!("delete gave {got}, model {want}"));
            }
        }
        Op::DeleteAll => {
            let got = c.delete_all_cached_images().map_err(|e| e.to_string())?;
            if got != m.cached.len() {
                return Err(format!("delete_all gave {got}, model {}", m.cached.len()));
            }
            m.cached.clear();
        }
        Op::DeleteQueued(i) => {
            let name = IDS[i];
            let got = c
                .delete_queued_image(&id(name))
                .map_err(|e| e.to_string())?;
            let want = m.queue.iter().any(|q| q == name);
            m.queue.retain(|q| q != name);
            if got != want {
                return Err(format!("delete_queued gave {got}, model {want}"));
            }
        }
        Op::DeleteAllQueued => {
            let got = c.delete_all_queued_images().map_err(|e| e.to_string())?;
            if got != m.queue.len() {
                return Err(format!(
                    "delete_all_queued gave {got}, model {}",
                    m.queue.len()
                ));
            }
            m.queue.clear();
        }
        Op::Prune(limit) => {
            let mut order: Vec<(SystemTime, String, u64)> = m
                .cached
                .iter()
                .map(|(k, e)| (e.accessed, k.clone(), e.data.len() as u64))
                .collect();
            order.sort();
            let mut total: u64 = order.iter().map(|o| o.2).sum();
            let mut want = Vec::new();
            for (_, k, size) in order {
                if total <= limit {
                    break;
                }
                total -= size;
                want.push(k);
            }
            let report = c.prune_to(limit).map_err(|e| e.to_string())?;
            let got: Vec<String> = report.removed.iter().map(|i| i.to_string()).collect();
            if got != want {
                return Err(format!("prune removed {got:?}, model {want:?}"));
            }
            if report.remaining != total {
                return Err(format!("prune left {}, model {total}", report.remaining));
            }
            for k in want {
                m.cached.remove(&k);
            }
        }
        Op::Clean => {
            let report = c.clean(None).map_err(|e| e.to_string())?;
            let got: BTreeSet<String> = report
                .invalid
                .iter()
                .filter_map(|f| f.id.as_ref().map(|i| i.to_string()))
                .collect();
            if got != m.invalid || !report.stalled.is_empty() {
                return Err(format!(
                    "clean removed {got:?} + {:?}, model {:?}",
                    report.stalled, m.invalid
                ));
            }
            m.invalid.clear();
        }
        Op::Tick(s) => r.clock.advance(Duration::from_millis(s * 700)),
        Op::Reopen => {
            r.cache = Real::open(r.dir.path(), r.kind, &r.clock);
        }
    }
    Ok(())
}

fn check(r: &Real, m: &Model) -> Result<(), String> {
    let c = &r.cache;
    let images = c.cached_images().map_err(|e| e.to_string())?;
    let got: Vec<(String, u64, u64, SystemTime, SystemTime)> = images
        .iter()
        .map(|i| {
            (
                i.id.to_string(),
                i.size,
                i.hits,
                i.last_accessed,
                i.last_modified,
            )
        })
        .collect();
    let want: Vec<(String, u64, u64, SystemTime, SystemTime)> = m
        .cached
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                e.data.len() as u64,
                e.hits,
                e.accessed,
                e.modified,
            )
        })
        .collect();
    if got != want {
        return Err(format!("cached_images {got:?}\n model {want:?}"));
    }
    for i in &images {
        let e = &m.cached[i.id.as_str()];
        if i.crc32 != Some(crc32fast::hash(&e.data)) {
            return Err(format!("crc of {} differs", i.id));
        }
    }
    let size: u64 = m.cached.values().map(|e| e.data.len() as u64).sum();
    if c.cache_size().map_err(|e| e.to_string())? != size {
        return Err("cache_size differs".into());
    }
    let queued: Vec<String> = c
        .queued_images()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(String::from)
        .collect();
    if queued != m.queue {
        return Err(format!("queue {queued:?}, model {:?}", m.queue));
    }
    let invalid: BTreeSet<String> = c
        .invalid_images()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    if invalid != m.invalid {
        return Err(format!("invalid {invalid:?}, model {:?}", m.invalid));
    }
    for name in IDS {
        let i = id(name);
        let cached = c.is_cached(&i).map_err(|e| e.to_string())?;
        let busy = c.is_being_cached(&i).map_err(|e| e.to_string())?;
        if cached != m.cached.contains_key(name) || busy != m.writing.contains(name) {
            return Err(format!("{name}: cached {cached} busy {busy}"));
        }
        if c.hit_count(&i).map_err(|e| e.to_string())? != m.cached.get(name).map_or(0, |e| e.hits) {
            return Err(format!("{name}: hit count differs"));
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CASES),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sqlite_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(DriverKind::Sqlite, ops)?;
    }

    #[test]
    fn xattr_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(DriverKind::Xattr, ops)?;
    }
}
