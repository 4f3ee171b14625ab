//! The in-memory model of a cache, and the operation sequences that the
//! model-based test (`tests/model.rs`) and the `ops` fuzz target run
//! against a real cache on every store, comparing after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Store;
use crate::clock::{round_trip, to_epoch_secs, Clock, ManualClock};
use crate::{CacheOptions, CacheWriter, Error, ImageCache, ImageId};

/// The ids the model uses (Glance's test ids, and a UUID).
pub const IDS: [&str; 5] = [
    "1",
    "2",
    "99",
    "xxx",
    "3f1c0e8a-5b1e-4c53-9d0e-1f2a3b4c5d6e",
];

/// One operation on the cache. Ids are indexes into [`IDS`].
#[derive(Debug, Clone)]
pub enum Op {
    /// `queue_image`.
    Queue(usize),
    /// Open, write `len` bytes made from `seed`, commit.
    WriteCommit(usize, u64, usize),
    /// Open, write `len` bytes, abort.
    WriteAbort(usize, usize),
    /// Open a writer, write `len` bytes from `seed`, and keep it open.
    Begin(usize, u64, usize),
    /// Commit (`true`) or drop (`false`) the writer kept for an id, if any.
    Finish(usize, bool),
    /// `open_for_read` and read it whole.
    Read(usize),
    /// `delete_cached_image`.
    DeleteOne(usize),
    /// `delete_all_cached_images`.
    DeleteAll,
    /// `delete_queued_image`.
    DeleteQueued(usize),
    /// `delete_all_queued_images`.
    DeleteAllQueued,
    /// `prune_to(limit)`.
    Prune(u64),
    /// `clean(None)`.
    Clean,
    /// Moves the clock forward by this many 0.7 s steps.
    Tick(u64),
    /// Drops the cache handle and opens a new one on the directory.
    Reopen,
}

impl Op {
    /// Decodes a sequence of operations from fuzzer bytes, four per op.
    pub fn decode(data: &[u8]) -> Vec<Op> {
        data.chunks(4)
            .map(|c| {
                let b = |i: usize| c.get(i).copied().unwrap_or(0);
                let i = b(1) as usize % IDS.len();
                let n = u16::from_le_bytes([b(2), b(3)]);
                match b(0) % 14 {
                    0 => Op::Queue(i),
                    1 => Op::WriteCommit(i, u64::from(b(2)), usize::from(n % 3000)),
                    2 => Op::WriteAbort(i, usize::from(n % 3000)),
                    3 => Op::Begin(i, u64::from(b(2)), usize::from(n % 3000)),
                    4 => Op::Finish(i, n % 2 == 0),
                    5 => Op::Read(i),
                    6 => Op::DeleteOne(i),
                    7 => Op::DeleteAll,
                    8 => Op::DeleteQueued(i),
                    9 => Op::DeleteAllQueued,
                    10 => Op::Prune(u64::from(n)),
                    11 => Op::Clean,
                    12 => Op::Tick(u64::from(n % 3)),
                    _ => Op::Reopen,
                }
            })
            .collect()
    }
}

/// Deterministic bytes for a write.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Entry {
    data: Vec<u8>,
    hits: u64,
    accessed: SystemTime,
    modified: SystemTime,
}

/// What the cache should hold, in memory.
#[derive(Debug, Default)]
struct Model {
    cached: BTreeMap<String, Entry>,
    queue: Vec<String>,
    writing: BTreeSet<String>,
    invalid: BTreeSet<String>,
}

/// The real cache under test.
struct Real<'a> {
    dir: &'a Path,
    store: Store,
    clock: ManualClock,
    cache: ImageCache,
    writers: HashMap<String, (CacheWriter, Vec<u8>)>,
}

fn open(dir: &Path, store: Store, clock: &ManualClock) -> Result<ImageCache, String> {
    store
        .open(CacheOptions::new(dir).clock(Arc::new(clock.clone())))
        .map_err(|e| format!("open: {e}"))
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn valid(name: &str) -> Result<ImageId, String> {
    ImageId::new(name).map_err(s)
}

/// Runs `ops` against a cache in `dir` (which must be empty) on `store`,
/// and against the model; after every step they must agree on every thing
/// the cache reports. `Err` says which step and what differed.
pub fn run(store: Store, dir: &Path, ops: &[Op]) -> Result<(), String> {
    let clock = ManualClock::new(SystemTime::now());
    let cache = open(dir, store, &clock)?;
    let mut real = Real {
        dir,
        store,
        clock,
        cache,
        writers: HashMap::new(),
    };
    let mut m = Model::default();
    for (step, op) in ops.iter().enumerate() {
        apply(&mut real, &mut m, op).map_err(|e| format!("step {step} {op:?}: {e}"))?;
        check(&real, &m).map_err(|e| format!("after step {step} {op:?}: {e}"))?;
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

fn open_outcome(r: &Result<CacheWriter, Error>) -> Result<Result<(), &'static str>, String> {
    match r {
        Ok(_) => Ok(Ok(())),
        Err(Error::AlreadyCached { .. }) => Ok(Err("cached")),
        Err(Error::AlreadyBeingCached { .. }) => Ok(Err("being cached")),
        Err(e) => Err(format!("unexpected error {e}")),
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

fn apply(r: &mut Real<'_>, m: &mut Model, op: &Op) -> Result<(), String> {
    let now = round_trip(r.clock.now());
    let c = &r.cache;
    match *op {
        Op::Queue(i) => {
            let name = IDS[i];
            let expected = !m.cached.contains_key(name)
                && !m.writing.contains(name)
                && !m.queue.iter().any(|q| q == name);
            let got = c.queue_image(&valid(name)?).map_err(s)?;
            if got != expected {
                return Err(format!("queue_image gave {got}, model {expected}"));
            }
            if expected {
                m.queue.push(name.to_owned());
            }
        }
        Op::WriteCommit(i, seed, len) | Op::Begin(i, seed, len) => {
            let name = IDS[i];
            let w = c.open_for_write(&valid(name)?);
            let (got, want) = (open_outcome(&w)?, expect_open(m, name));
            if got != want {
                return Err(format!("open_for_write gave {got:?}, model {want:?}"));
            }
            if let Ok(mut w) = w {
                let data = content(seed, len);
                for chunk in data.chunks(1000) {
                    w.write_all(chunk).map_err(s)?;
                }
                if matches!(op, Op::WriteCommit(..)) {
                    let info = w.commit().map_err(s)?;
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
            let w = c.open_for_write(&valid(name)?);
            let (got, want) = (open_outcome(&w)?, expect_open(m, name));
            if got != want {
                return Err(format!("open_for_write gave {got:?}, model {want:?}"));
            }
            if let Ok(mut w) = w {
                w.write_all(&vec![0xAB; len]).map_err(s)?;
                w.abort("model abort").map_err(s)?;
                m.invalid.insert(name.to_owned());
            }
        }
        Op::Finish(i, ok) => {
            let name = IDS[i];
            if let Some((w, data)) = r.writers.remove(name) {
                m.writing.remove(name);
                if ok {
                    w.commit().map_err(s)?;
                    commit(m, name, data, now);
                } else {
                    drop(w);
                    m.invalid.insert(name.to_owned());
                }
            }
        }
        Op::Read(i) => {
            let name = IDS[i];
            let got = c.open_for_read(&valid(name)?).map_err(s)?;
            match (got, m.cached.get_mut(name)) {
                (None, None) => {}
                (Some(mut img), Some(e)) => {
                    e.hits += 1;
                    e.accessed = now;
                    if img.read_all().map_err(s)? != e.data {
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
            let got = c.delete_cached_image(&valid(name)?).map_err(s)?;
            let want = m.cached.remove(name).is_some();
            if got != want {
                return Err(format!("delete gave {got}, model {want}"));
            }
        }
        Op::DeleteAll => {
            let got = c.delete_all_cached_images().map_err(s)?;
            if got != m.cached.len() {
                return Err(format!("delete_all gave {got}, model {}", m.cached.len()));
            }
            m.cached.clear();
        }
        Op::DeleteQueued(i) => {
            let name = IDS[i];
            let got = c.delete_queued_image(&valid(name)?).map_err(s)?;
            let want = m.queue.iter().any(|q| q == name);
            m.queue.retain(|q| q != name);
            if got != want {
                return Err(format!("delete_queued gave {got}, model {want}"));
            }
        }
        Op::DeleteAllQueued => {
            let got = c.delete_all_queued_images().map_err(s)?;
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
            let report = c.prune_to(limit).map_err(s)?;
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
            let report = c.clean(None).map_err(s)?;
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
        Op::Tick(n) => r.clock.advance(Duration::from_millis(n * 700)),
        Op::Reopen => {
            r.cache = open(r.dir, r.store, &r.clock)?;
            if !r.cache.recovery().is_clean() {
                return Err(format!("reopen had to recover: {:?}", r.cache.recovery()));
            }
        }
    }
    Ok(())
}

fn check(r: &Real<'_>, m: &Model) -> Result<(), String> {
    let c = &r.cache;
    let images = c.cached_images().map_err(s)?;
    type Row = (String, u64, u64, f64, f64);
    let got: Vec<Row> = images
        .iter()
        .map(|i| {
            (
                i.id.to_string(),
                i.size,
                i.hits,
                to_epoch_secs(i.last_accessed),
                to_epoch_secs(i.last_modified),
            )
        })
        .collect();
    let want: Vec<Row> = m
        .cached
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                e.data.len() as u64,
                e.hits,
                to_epoch_secs(e.accessed),
                to_epoch_secs(e.modified),
            )
        })
        .collect();
    if got != want {
        return Err(format!("cached_images {got:?}\n model {want:?}"));
    }
    for i in &images {
        let data = m
            .cached
            .get(i.id.as_str())
            .map(|e| e.data.as_slice())
            .unwrap_or_default();
        if i.crc32 != Some(crc32fast::hash(data)) {
            return Err(format!("crc of {} differs", i.id));
        }
    }
    let size: u64 = m.cached.values().map(|e| e.data.len() as u64).sum();
    if c.cache_size().map_err(s)? != size {
        return Err("cache_size differs".into());
    }
    let queued: Vec<String> = c
        .queued_images()
        .map_err(s)?
        .into_iter()
        .map(String::from)
        .collect();
    if queued != m.queue {
        return Err(format!("queue {queued:?}, model {:?}", m.queue));
    }
    let invalid: BTreeSet<String> = c
        .invalid_images()
        .map_err(s)?
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    if invalid != m.invalid {
        return Err(format!("invalid {invalid:?}, model {:?}", m.invalid));
    }
    for name in IDS {
        let i = valid(name)?;
        let cached = c.is_cached(&i).map_err(s)?;
        let busy = c.is_being_cached(&i).map_err(s)?;
        if cached != m.cached.contains_key(name) || busy != m.writing.contains(name) {
            return Err(format!("{name}: cached {cached} busy {busy}"));
        }
        let hits = m.cached.get(name).map_or(0, |e| e.hits);
        if c.hit_count(&i).map_err(s)? != hits {
            return Err(format!("{name}: hit count differs"));
        }
    }
    Ok(())
}
