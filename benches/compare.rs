//! Each crate path against its physical yardstick, measured on the same
//! disk in the same run, printed as ratios (this machine is shared and
//! noisy: absolute figures mean little, ratios in one run do).
//!
//! ```text
//! cargo bench --bench compare              # full sizes (1 GiB, 100 000 entries)
//! cargo bench --bench compare -- --quick   # small sizes, for CI
//! ```
//!
//! Yardsticks: `dd conv=fsync` of the same bytes (large fill), raw
//! `sendfile(2)`/`splice(2)` of the same file and a `read`/`write` loop
//! (`send_to`), a write+`fsync`-per-file loop (small fills). Every figure is
//! the median of five runs. `IMGCACHE_BENCH_DIR` picks the file system
//! (default: the system temp dir); `IMGCACHE_BENCH_ONLY=large,small,group,
//! hits,send,management,maintenance` runs some sections only (`small`
//! includes `group`). The small-fill sections keep every run's files until
//! the section ends and alternate the order of a run and its yardstick
//! from round to round (see `Fresh`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcache::{CacheOptions, DriverKind, Durability, ImageCache, ImageId};

/// Runs per figure; the median is reported.
const ROUNDS: usize = 5;

struct Sizes {
    large: u64,
    small_fills: usize,
    hits: usize,
    entries: usize,
    quick: bool,
}

struct Row {
    bench: String,
    figure: String,
    yardstick: String,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn id(s: &str) -> ImageId {
    ImageId::new(s).expect("id")
}

fn open(dir: &Path, kind: DriverKind) -> ImageCache {
    open_with(dir, kind, Durability::default())
}

fn open_with(dir: &Path, kind: DriverKind, durability: Durability) -> ImageCache {
    CacheOptions::new(dir)
        .driver(kind)
        .max_size(u64::MAX)
        .durability(durability)
        .open()
        .expect("open cache")
}

/// `syncfs(2)` of the file system holding `dir`.
fn syncfs(dir: &Path) {
    let d = File::open(dir).expect("open dir");
    nix::unistd::syncfs(&d).expect("syncfs");
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 of the line are utime and stime; after the ")" they
    // are at 11 and 12 (0-based), counting the state letter as unparsed.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

fn mib_s(bytes: u64, s: f64) -> String {
    format!("{:.0} MiB/s", bytes as f64 / (1 << 20) as f64 / s)
}

/// Large fill: the crate's writer against `dd conv=fsync` of as many bytes.
fn large_fill(root: &Path, kind: DriverKind, s: &Sizes, rows: &mut Vec<Row>) {
    let dir = root.join(format!("large-{kind}"));
    let cache = open(&dir, kind);
    let chunk = vec![0u8; 1 << 20];
    let (mut ours, mut dds) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let target = dir.join("dd.out");
        let x = id(&format!("large-{round}"));
        let ours_first = round % 2 == 1;
        if ours_first {
            let t = Instant::now();
            let mut w = cache.open_for_write(&x).expect("writer");
            for _ in 0..(s.large >> 20) {
                w.write_all(&chunk).expect("write");
            }
            w.commit().expect("commit");
            ours.push(secs(t.elapsed()));
            cache.delete_cached_image(&x).expect("delete");
        }
        let t = Instant::now();
        let status = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", target.display()))
            .args([
                "bs=1M",
                &format!("count={}", s.large >> 20),
                "conv=fsync",
                "status=none",
            ])
            .status()
            .expect("dd");
        assert!(status.success());
        dds.push(secs(t.elapsed()));
        std::fs::remove_file(&target).expect("rm");
        if !ours_first {
            let t = Instant::now();
            let mut w = cache.open_for_write(&x).expect("writer");
            for _ in 0..(s.large >> 20) {
                w.write_all(&chunk).expect("write");
            }
            w.commit().expect("commit");
            ours.push(secs(t.elapsed()));
            cache.delete_cached_image(&x).expect("delete");
        }
    }
    let (o, d) = (median(ours), median(dds));
    let ratio = d / o;
    rows.push(Row {
        bench: format!("{kind}: fill one {} MiB image", s.large >> 20),
        figure: mib_s(s.large, o),
        yardstick: format!("dd conv=fsync {}", mib_s(s.large, d)),
        ratio: Some(ratio),
        target: "≥ 0.9".into(),
        met: Some(ratio >= 0.9),
    });
}

/// Small fills: one writer, eight writers, against a write+fsync loop.
/// A commit's file moves by hand, `n` files by `threads` threads: write into
/// `tmp/`, rename into `dir`; with `sync_each`, as `Immediate` commits
/// (`fsync` of the file before the rename, of the directory after it),
/// else as group commits (one `syncfs` at the end). Returns files/s; the
/// files stay (see [`Fresh`]).
fn moves_by_hand(dir: &Path, data: &[u8], n: usize, threads: usize, sync_each: bool) -> f64 {
    std::fs::create_dir_all(dir.join("tmp")).expect("mkdir");
    let t = Instant::now();
    std::thread::scope(|sc| {
        for w in 0..threads {
            sc.spawn(move || {
                for i in 0..n / threads {
                    let name = format!("{w}-{i}");
                    let tmp = dir.join("tmp").join(&name);
                    let mut f = File::create(&tmp).expect("create");
                    f.write_all(data).expect("write");
                    if sync_each {
                        f.sync_all().expect("fsync");
                    }
                    std::fs::rename(&tmp, dir.join(&name)).expect("rename");
                    if sync_each {
                        File::open(dir)
                            .and_then(|d| d.sync_all())
                            .expect("fsync dir");
                    }
                }
            });
        }
    });
    if !sync_each {
        syncfs(dir);
    }
    (n / threads * threads) as f64 / secs(t.elapsed())
}

/// `n` fills of `data` through the cache by `threads` writers, ids tagged
/// `tag`, until durable as the cache's mode promises (with group
/// durability, its checkpoint after the last). Returns fills/s.
fn fills(cache: &ImageCache, data: &[u8], n: usize, threads: usize, tag: &str) -> f64 {
    let t = Instant::now();
    std::thread::scope(|sc| {
        for w in 0..threads {
            sc.spawn(move || {
                for i in 0..n / threads {
                    let x = id(&format!("{tag}-{w}-{i}"));
                    assert!(cache.cache_image_file(&x, data).expect("fill"));
                }
            });
        }
    });
    if cache.durability() != Durability::Immediate {
        cache.checkpoint().expect("checkpoint");
    }
    (n / threads * threads) as f64 / secs(t.elapsed())
}

/// A fresh directory for each measured run of a section, all removed
/// together when the section ends, never between its runs: on ext4
/// without a journal (this project's machines), creating a file skips
/// every inode freed in its group in the last minute or more (ext4's
/// `recently_deleted`), so a run that follows a removal of thousands of
/// files pays for them, and a yardstick and the run it is compared with
/// would not face the same disk. Each round runs its blocks (the
/// yardsticks, the cache's runs) in the reverse order of the round before,
/// and the second store's sections start the other way round from the
/// first's (the first blocks of a section pay for the removal that ended
/// the section before it).
///
/// Space: the group section keeps about 2.1 GiB at full size (0.42 GiB with
/// `--quick`) until it ends, in `IMGCACHE_BENCH_DIR`.
struct Fresh {
    root: PathBuf,
    next: std::cell::Cell<usize>,
    /// Whether this section's even rounds run the yardsticks last.
    flip: bool,
}

impl Fresh {
    /// The section `name` of store `kind`'s runs.
    fn new(root: &Path, name: &str, kind: DriverKind) -> Self {
        let root = root.join(format!("{name}-{kind}"));
        std::fs::create_dir_all(&root).expect("mkdir");
        Fresh {
            root,
            next: std::cell::Cell::new(0),
            flip: kind != DriverKind::Sqlite,
        }
    }

    /// Whether round `round` runs the yardsticks first.
    fn yardsticks_first(&self, round: usize) -> bool {
        round.is_multiple_of(2) != self.flip
    }

    /// A new directory's path (not created).
    fn dir(&self) -> PathBuf {
        let n = self.next.get();
        self.next.set(n + 1);
        self.root.join(n.to_string())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn small_fills(root: &Path, kind: DriverKind, s: &Sizes, rows: &mut Vec<Row>) {
    let data = vec![7u8; 64 * 1024];
    let n = s.small_fills;
    let mut one = Vec::new();
    let mut eight = Vec::new();
    let mut loops = Vec::new();
    let mut loops8 = Vec::new();
    let mut protocol = Vec::new();
    let mut protocol8 = Vec::new();
    // The yardstick: the same files, written and fsynced one by one, by one
    // thread and by eight.
    let fsync_loop = |dir: &Path, threads: usize| -> f64 {
        std::fs::create_dir_all(dir).expect("mkdir");
        let t = Instant::now();
        std::thread::scope(|sc| {
            for w in 0..threads {
                let data = &data;
                sc.spawn(move || {
                    for i in 0..n / threads {
                        let mut f = File::create(dir.join(format!("{w}-{i}"))).expect("create");
                        f.write_all(data).expect("write");
                        f.sync_all().expect("fsync");
                    }
                });
            }
        });
        (n / threads * threads) as f64 / secs(t.elapsed())
    };
    let fresh = Fresh::new(root, "small", kind);
    for round in 0..ROUNDS {
        let mut yardsticks = || {
            loops.push(fsync_loop(&fresh.dir(), 1));
            loops8.push(fsync_loop(&fresh.dir(), 8));
            // The same durability protocol as a commit, by hand: write,
            // fsync, rename into place (across directories, as a commit
            // does), fsync the directory; by one thread and by eight.
            protocol.push(moves_by_hand(&fresh.dir(), &data, n, 1, true));
            protocol8.push(moves_by_hand(&fresh.dir(), &data, n, 8, true));
        };
        let first = fresh.yardsticks_first(round);
        if first {
            yardsticks();
        }
        let cache = open_with(&fresh.dir(), kind, Durability::Immediate);
        one.push(fills(&cache, &data, n, 1, "one"));
        eight.push(fills(&cache, &data, n, 8, "eight"));
        drop(cache);
        if !first {
            yardsticks();
        }
    }
    drop(fresh);
    let (o, e, l, l8, p) = (
        median(one),
        median(eight),
        median(loops),
        median(loops8),
        median(protocol),
    );
    let p8 = median(protocol8);
    rows.push(Row {
        bench: format!("{kind}, immediate: 64 KiB fills, 8 writers"),
        figure: format!("{e:.0} fills/s"),
        yardstick: format!(
            "the same protocol by hand, 8 threads: {p8:.0}/s = {:.2} × 1 thread",
            p8 / p
        ),
        ratio: Some(e / p8),
        target: "(yardstick)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}, immediate: 64 KiB fills, 1 writer"),
        figure: format!("{o:.0} fills/s"),
        yardstick: format!("write+fsync+rename+fsync(dir) by hand {p:.0}/s"),
        ratio: Some(o / p),
        target: "(yardstick)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}, immediate: 64 KiB fills, 1 writer"),
        figure: format!("{o:.0} fills/s"),
        yardstick: format!("write+fsync loop {l:.0} files/s"),
        ratio: Some(o / l),
        target: "(yardstick)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}, immediate: 64 KiB fills, 8 writers"),
        figure: format!("{e:.0} fills/s = {:.2} × 1 writer", e / o),
        yardstick: format!("write+fsync loop, 8 threads = {:.2} × 1 thread", l8 / l),
        ratio: Some(e / o),
        target: "≥ 3".into(),
        met: Some(e / o >= 3.0),
    });
}

/// Small fills with group durability (the default), against the same
/// files written and renamed into place by hand with no sync, then one
/// `syncfs` (what the checkpoint does): the timed runs end with
/// `checkpoint()`, so both are durable at the end.
fn group_fills(root: &Path, kind: DriverKind, s: &Sizes, rows: &mut Vec<Row>) {
    let data = vec![7u8; 64 * 1024];
    let n = s.small_fills * 4;
    let (mut one, mut eight, mut hand, mut hand8, mut sync_cost, mut imm) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let fresh = Fresh::new(root, "group", kind);
    for round in 0..ROUNDS {
        let mut yardsticks = || {
            hand.push(moves_by_hand(&fresh.dir(), &data, n, 1, false));
            hand8.push(moves_by_hand(&fresh.dir(), &data, n, 8, false));
        };
        // The same fills, one writer, with Immediate: what group saves.
        let mut immediate = || {
            let cache = open_with(&fresh.dir(), kind, Durability::Immediate);
            imm.push(fills(&cache, &data, s.small_fills, 1, "one"));
        };
        // Each round runs in the reverse order of the one before it.
        let first = fresh.yardsticks_first(round);
        if first {
            yardsticks();
        } else {
            immediate();
        }
        let cache = open_with(&fresh.dir(), kind, Durability::default());
        one.push(fills(&cache, &data, n, 1, "one"));
        eight.push(fills(&cache, &data, n, 8, "eight"));
        drop(cache);
        if first {
            immediate();
        } else {
            yardsticks();
        }
        // An idle syncfs: one right after another.
        syncfs(root);
        let t = Instant::now();
        syncfs(root);
        sync_cost.push(secs(t.elapsed()) * 1e3);
    }
    drop(fresh);
    let (o, e, h, h8, c, i) = (
        median(one),
        median(eight),
        median(hand),
        median(hand8),
        median(sync_cost),
        median(imm),
    );
    rows.push(Row {
        bench: format!("{kind}, group (default): 64 KiB fills, 1 writer"),
        figure: format!("{o:.0} fills/s"),
        yardstick: format!(
            "write+rename by hand, one syncfs at the end: {h:.0}/s (an idle syncfs: {c:.1} ms)"
        ),
        ratio: Some(o / h),
        target: "(yardstick)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}, group (default): 64 KiB fills, 1 writer"),
        figure: format!("{o:.0} fills/s"),
        yardstick: format!("the same cache with Durability::Immediate: {i:.0} fills/s"),
        ratio: Some(o / i),
        target: "(how much group saves)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}, group (default): 64 KiB fills, 8 writers"),
        figure: format!("{e:.0} fills/s = {:.2} × 1 writer", e / o),
        yardstick: format!(
            "write+rename by hand, 8 threads: {h8:.0}/s = {:.2} × 1 thread",
            h8 / h
        ),
        ratio: Some(e / h8),
        target: "(yardstick)".into(),
        met: None,
    });
}

/// Maintenance on a cache built the way users build it: `n` images of
/// 4 KiB filled through the API, each read once; then prune to half, clean
/// and list, each against the same work done by hand on the same disk in
/// the same run.
fn maintenance(root: &Path, kind: DriverKind, s: &Sizes, rows: &mut Vec<Row>) {
    let n = s.entries;
    let data = vec![3u8; 4096];
    let build = |dir: &Path| -> ImageCache {
        let cache = open(dir, kind);
        for i in 0..n {
            assert!(cache
                .cache_image_file(&id(&format!("img-{i:06}")), &data[..])
                .expect("fill"));
        }
        let mut buf = Vec::new();
        for i in 0..n {
            buf.clear();
            let mut img = cache
                .open_for_read(&id(&format!("img-{i:06}")))
                .expect("open")
                .expect("cached");
            img.read_to_end(&mut buf).expect("read");
        }
        cache.flush().expect("flush");
        cache.checkpoint().expect("checkpoint");
        cache
    };
    let dir = root.join(format!("maint-{kind}"));
    let cache = build(&dir);

    // list-cached, against readdir + stat of every file by hand.
    let t = Instant::now();
    assert_eq!(cache.cached_images().expect("list").len(), n);
    let list = secs(t.elapsed());
    // By hand: readdir and stat, and for xattr the attributes an entry is
    // made of, by path.
    let attrs: &[&str] = if kind == DriverKind::Xattr {
        &["user.hits", "user.imgcache.accessed", "user.imgcache.entry"]
    } else {
        &[]
    };
    let t = Instant::now();
    let mut seen = 0;
    for e in std::fs::read_dir(&dir).expect("readdir") {
        let e = e.expect("entry");
        if e.metadata().expect("stat").is_file() {
            for a in attrs {
                let _ = xattr::get(e.path(), a);
            }
            seen += 1;
        }
    }
    assert!(seen >= n);
    let by_hand = secs(t.elapsed());
    rows.push(Row {
        bench: format!("{kind}: list {n} (built by fills and reads)"),
        figure: format!("{:.0} entries/s", n as f64 / list),
        yardstick: format!(
            "readdir + stat{} by hand {:.0}/s",
            if attrs.is_empty() {
                ""
            } else {
                " + its attributes"
            },
            n as f64 / by_hand
        ),
        ratio: Some(by_hand / list),
        target: "(yardstick)".into(),
        met: None,
    });

    // Prune to half, against unlinking the same files by hand: the victims'
    // twins in a second cache built the same way (files written, read and
    // aged alike unlink alike; fresh files of the same size unlink faster
    // than these, which is not the cache's doing).
    let twin = root.join(format!("maint-twin-{kind}"));
    build(&twin);
    let victims: Vec<ImageId> = cache
        .least_recently_accessed()
        .expect("lru")
        .into_iter()
        .take(n / 2)
        .map(|e| e.id)
        .collect();
    syncfs(&twin);
    let t = Instant::now();
    for x in &victims {
        std::fs::remove_file(twin.join(x.as_str())).expect("unlink");
    }
    let unlink = secs(t.elapsed());
    std::fs::remove_dir_all(&twin).expect("rm");
    let t = Instant::now();
    let r = cache.prune_to((n as u64 / 2) * 4096).expect("prune");
    let prune = secs(t.elapsed());
    assert_eq!(r.files(), n / 2);
    assert_eq!(r.removed, victims);
    rows.push(Row {
        bench: format!("{kind}: prune {n} → {} (built by fills and reads)", n / 2),
        figure: format!("{:.0} files/s", (n / 2) as f64 / prune),
        yardstick: format!(
            "unlink the same files (a twin cache's) by hand {:.0}/s",
            (n / 2) as f64 / unlink
        ),
        ratio: Some(prune / unlink),
        target: "≤ 1.5 (time ratio)".into(),
        met: Some(prune / unlink <= 1.5),
    });

    // Clean: k invalid and k stalled, against unlinking the same files by
    // hand with the liveness check (open + try-lock) of each incomplete one.
    let k = n / 4;
    let make = |tag: &str| {
        for i in 0..k {
            std::fs::write(dir.join(format!("invalid/bad-{tag}{i}")), &data).expect("write");
            std::fs::write(dir.join(format!("incomplete/dead-{tag}{i}")), &data).expect("write");
        }
    };
    let (mut hand, mut ours) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let tag = format!("{round}-");
        make(&tag);
        // A clean by hand: list both folders, unlink the invalid files,
        // and unlink each incomplete one that no writer holds.
        let t = Instant::now();
        for e in std::fs::read_dir(dir.join("invalid")).expect("readdir") {
            std::fs::remove_file(e.expect("entry").path()).expect("unlink");
        }
        for e in std::fs::read_dir(dir.join("incomplete")).expect("readdir") {
            let p = e.expect("entry").path();
            let f = File::open(&p).expect("open");
            f.try_lock().expect("not live");
            std::fs::remove_file(&p).expect("unlink");
        }
        hand.push(secs(t.elapsed()));
        make(&tag);
        let t = Instant::now();
        let r = cache.clean(Some(Duration::ZERO)).expect("clean");
        ours.push(secs(t.elapsed()));
        assert_eq!(r.files(), 2 * k);
    }
    let (by_hand, clean) = (median(hand), median(ours));
    rows.push(Row {
        bench: format!("{kind}: clean {k} invalid + {k} stalled"),
        figure: format!("{:.0} files/s", (2 * k) as f64 / clean),
        yardstick: format!(
            "readdir + unlink + liveness check by hand {:.0}/s",
            (2 * k) as f64 / by_hand
        ),
        ratio: Some(clean / by_hand),
        target: "≤ 1.2 (time ratio)".into(),
        met: Some(clean / by_hand <= 1.2),
    });
    drop(cache);
    std::fs::remove_dir_all(&dir).expect("rm");
}

/// The hit path: open_for_read + read of a 64 KiB image.
/// Hits of one image of `size` bytes, read whole, against the same file
/// opened, read and closed by hand. The cache keeps hot descriptors open
/// (its default), so a hit pays an `fstat` where the yardstick pays an
/// `open` and a `close`: the read itself is the floor of both.
fn hit_path(root: &Path, kind: DriverKind, size: usize, s: &Sizes, rows: &mut Vec<Row>) {
    let dir = root.join(format!("hits-{kind}-{size}"));
    let cache = Arc::new(open(&dir, kind));
    let x = id("hot");
    cache
        .cache_image_file(&x, &vec![1u8; size][..])
        .expect("fill");
    let kib = size / 1024;
    let before = cache.hit_count(&x).expect("hits");
    let read = |c: &ImageCache, buf: &mut [u8]| {
        let mut img = c.open_for_read(&x).expect("open").expect("cached");
        img.read_exact(buf).expect("read");
    };
    // The yardstick: the same file opened, read whole and closed by hand.
    let path = dir.join("hot");
    let raw = |buf: &mut [u8]| {
        let mut f = File::open(&path).expect("open");
        f.read_exact(buf).expect("read");
    };
    let (mut singles, mut multis, mut raws, mut raws8) = (vec![], vec![], vec![], vec![]);
    let mut reads = 0u64;
    for _ in 0..ROUNDS {
        let mut buf = vec![0u8; size];
        let t = Instant::now();
        for _ in 0..s.hits {
            raw(&mut buf);
        }
        raws.push(s.hits as f64 / secs(t.elapsed()));
        let t = Instant::now();
        for _ in 0..s.hits {
            read(&cache, &mut buf);
        }
        singles.push(s.hits as f64 / secs(t.elapsed()));
        let t = Instant::now();
        std::thread::scope(|sc| {
            for _ in 0..8 {
                let raw = &raw;
                sc.spawn(move || {
                    let mut buf = vec![0u8; size];
                    for _ in 0..s.hits / 8 {
                        raw(&mut buf);
                    }
                });
            }
        });
        raws8.push((s.hits / 8 * 8) as f64 / secs(t.elapsed()));
        let t = Instant::now();
        std::thread::scope(|sc| {
            for _ in 0..8 {
                let cache = &cache;
                sc.spawn(move || {
                    let mut buf = vec![0u8; size];
                    for _ in 0..s.hits / 8 {
                        read(cache, &mut buf);
                    }
                });
            }
        });
        multis.push((s.hits / 8 * 8) as f64 / secs(t.elapsed()));
        reads += (s.hits + s.hits / 8 * 8) as u64;
    }
    cache.flush().expect("flush");
    let counted = cache.hit_count(&x).expect("hits") - before;
    let (single, multi, r1, r8) = (median(singles), median(multis), median(raws), median(raws8));
    rows.push(Row {
        bench: format!("{kind}: hit path (open + read {kib} KiB), 1 thread"),
        figure: format!("{single:.0} reads/s"),
        yardstick: format!("open+read+close by hand {r1:.0}/s"),
        ratio: Some(single / r1),
        target: "(yardstick)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}: hit path ({kib} KiB), 8 threads"),
        figure: format!("{multi:.0} reads/s = {:.2} × 1 thread", multi / single),
        yardstick: format!("open+read+close by hand, 8 threads {r8:.0}/s"),
        ratio: Some(multi / r8),
        target: "(yardstick)".into(),
        met: None,
    });
    rows.push(Row {
        bench: format!("{kind}: hits counted ({kib} KiB)"),
        figure: format!("{counted} of {reads} reads"),
        yardstick: "every read".into(),
        ratio: None,
        target: "none lost".into(),
        met: Some(counted == reads),
    });
}

/// Drains `r` on a thread, returning how many bytes it read.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match r.read(&mut buf).expect("drain") {
                0 => return n,
                k => n += k as u64,
            }
        }
    })
}

/// Raw kernel copy of the whole file: sendfile to a socket, splice to a pipe.
fn raw_send(file: &File, out: impl AsFd, len: u64, pipe: bool) {
    let mut off: i64 = 0;
    while (off as u64) < len {
        let want = (len - off as u64).min(1 << 30) as usize;
        let n = if pipe {
            nix::fcntl::splice(
                file,
                Some(&mut off),
                out.as_fd(),
                None,
                want,
                nix::fcntl::SpliceFFlags::SPLICE_F_MOVE,
            )
        } else {
            nix::sys::sendfile::sendfile(out.as_fd(), file, Some(&mut off), want)
        };
        match n {
            Ok(0) => break,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("raw send: {e}"),
        }
    }
}

/// A plain copy loop: read 64 KiB, write it.
fn copy_loop(mut file: &File, mut out: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            return;
        }
        out.write_all(&buf[..n]).expect("write");
    }
}

fn zero_copy(root: &Path, s: &Sizes, rows: &mut Vec<Row>) {
    let dir = root.join("send");
    let cache = open(&dir, DriverKind::Sqlite);
    let x = id("big");
    let mut w = cache.open_for_write(&x).expect("writer");
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..(s.large >> 20) {
        w.write_all(&chunk).expect("write");
    }
    w.commit().expect("commit");
    let path = dir.join("big");
    for target in ["TCP loopback", "Unix socket", "pipe"] {
        let pipe = target == "pipe";
        let what = target;
        let (mut ours, mut raws, mut loops) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            // Each round in another order, so that no mode always goes first.
            for step in 0..3 {
                let mode = (step + round) % 3;
                let (tx, rx): (Box<dyn AsFdWrite>, Box<dyn Read + Send>) = match target {
                    "pipe" => {
                        let (r, w) = nix::unistd::pipe().expect("pipe");
                        (Box::new(File::from(w)), Box::new(File::from(r)))
                    }
                    "Unix socket" => {
                        let (a, b) = UnixStream::pair().expect("socketpair");
                        (Box::new(a), Box::new(b))
                    }
                    _ => {
                        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                        let client = std::net::TcpStream::connect(l.local_addr().expect("addr"))
                            .expect("connect");
                        let (server, _) = l.accept().expect("accept");
                        (Box::new(server), Box::new(client))
                    }
                };
                let reader = drain(rx);
                let t = Instant::now();
                match mode {
                    0 => {
                        let img = cache.open_for_read(&x).expect("open").expect("cached");
                        img.send_to(tx.fd(), None).expect("send");
                    }
                    1 => raw_send(&File::open(&path).expect("open"), tx.fd(), s.large, pipe),
                    _ => copy_loop(&File::open(&path).expect("open"), tx.writer()),
                }
                drop(tx);
                assert_eq!(reader.join().expect("drain"), s.large);
                let el = secs(t.elapsed());
                [&mut ours, &mut raws, &mut loops][mode].push(el);
            }
        }
        let (o, r, l) = (median(ours), median(raws), median(loops));
        rows.push(Row {
            bench: format!("send_to {} MiB → {what}", s.large >> 20),
            figure: mib_s(s.large, o),
            yardstick: format!(
                "raw {} {}",
                if pipe { "splice" } else { "sendfile" },
                mib_s(s.large, r)
            ),
            ratio: Some(r / o),
            target: "≥ 0.9".into(),
            met: Some(r / o >= 0.9),
        });
        rows.push(Row {
            bench: format!("send_to {} MiB → {what}", s.large >> 20),
            figure: mib_s(s.large, o),
            yardstick: format!("read+write loop {}", mib_s(s.large, l)),
            ratio: Some(l / o),
            target: "≥ 2".into(),
            met: Some(l / o >= 2.0),
        });
    }
}

/// A writable descriptor (socket or pipe end) for `zero_copy`.
trait AsFdWrite: Send {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_>;
    fn writer(&self) -> Box<dyn Write + '_>;
}

impl AsFdWrite for File {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.as_fd()
    }
    fn writer(&self) -> Box<dyn Write + '_> {
        Box::new(self)
    }
}

impl AsFdWrite for std::net::TcpStream {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.as_fd()
    }
    fn writer(&self) -> Box<dyn Write + '_> {
        Box::new(self)
    }
}

impl AsFdWrite for UnixStream {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.as_fd()
    }
    fn writer(&self) -> Box<dyn Write + '_> {
        Box::new(self)
    }
}

/// Management at scale: recovery, listing, pruning and cleaning of
/// `entries` images.
fn management(root: &Path, kind: DriverKind, s: &Sizes, rows: &mut Vec<Row>) {
    let n = s.entries;
    let dir = root.join(format!("mgmt-{kind}"));
    let _ = open(&dir, kind);
    for i in 0..n {
        std::fs::write(dir.join(format!("img-{i:06}")), b"0123456789").expect("write");
    }
    let mut measure = |bench: String, target: &str, limit: Option<f64>, f: &mut dyn FnMut()| {
        let (c0, t) = (cpu_seconds(), Instant::now());
        f();
        let (cpu, wall) = (cpu_seconds() - c0, secs(t.elapsed()));
        rows.push(Row {
            bench,
            figure: format!("{wall:.2} s wall, {cpu:.2} s CPU"),
            yardstick: "-".into(),
            ratio: None,
            target: target.into(),
            met: limit.map(|l| cpu < l),
        });
    };
    measure(
        format!("{kind}: first open of {n} files (adopt all)"),
        "-",
        None,
        &mut || {
            let c = open(&dir, kind);
            assert_eq!(c.recovery().adopted.len(), n);
        },
    );
    measure(
        format!("{kind}: reopen (recovery) of {n} entries"),
        "-",
        None,
        &mut || {
            let c = open(&dir, kind);
            assert!(c.recovery().is_clean());
        },
    );
    let cache = open(&dir, kind);
    measure(
        format!("{kind}: cached_images of {n}"),
        "-",
        None,
        &mut || {
            assert_eq!(cache.cached_images().expect("list").len(), n);
        },
    );
    // The yardstick for prune: unlinking as many files by hand.
    let scratch = root.join(format!("unlink-{kind}"));
    std::fs::create_dir_all(&scratch).expect("mkdir");
    for i in 0..n / 2 {
        std::fs::write(scratch.join(i.to_string()), b"0123456789").expect("write");
    }
    let c0 = cpu_seconds();
    for i in 0..n / 2 {
        std::fs::remove_file(scratch.join(i.to_string())).expect("unlink");
    }
    let unlink_cpu = cpu_seconds() - c0;
    let (c0, t) = (cpu_seconds(), Instant::now());
    let r = cache.prune_to((n as u64 * 10) / 2).expect("prune");
    let (cpu, wall) = (cpu_seconds() - c0, secs(t.elapsed()));
    assert_eq!(r.files(), n / 2);
    let prune_row = Row {
        bench: format!("{kind}: prune {n} entries to half"),
        figure: format!("{wall:.2} s wall, {cpu:.2} s CPU"),
        yardstick: format!("unlink {} files by hand: {unlink_cpu:.2} s CPU", n / 2),
        ratio: Some(cpu / unlink_cpu.max(0.01)),
        target: "well under 1 s CPU".into(),
        met: Some(cpu < 1.0),
    };
    let k = n / 10;
    for i in 0..k {
        std::fs::write(dir.join(format!("invalid/bad-{i}")), b"x").expect("write");
        std::fs::write(dir.join(format!("incomplete/dead-{i}")), b"x").expect("write");
    }
    measure(
        format!("{kind}: clean {k} invalid + {k} stalled"),
        "-",
        None,
        &mut || {
            let r = cache.clean(Some(Duration::ZERO)).expect("clean");
            assert_eq!(r.files(), 2 * k);
        },
    );
    rows.push(prune_row);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("IMGCACHE_BENCH_QUICK").is_some();
    let s = if quick {
        Sizes {
            large: 64 << 20,
            small_fills: 80,
            hits: 4_000,
            entries: 10_000,
            quick,
        }
    } else {
        Sizes {
            large: 1 << 30,
            small_fills: 400,
            hits: 50_000,
            entries: 100_000,
            quick,
        }
    };
    let base: PathBuf = std::env::var_os("IMGCACHE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let root = tempfile::tempdir_in(&base).expect("tempdir");
    let mut rows = Vec::new();
    // IMGCACHE_BENCH_ONLY=large,small,group,hits,send,management,maintenance
    // runs some sections (small includes group).
    let only = std::env::var("IMGCACHE_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        if run("large") {
            large_fill(root.path(), kind, &s, &mut rows);
        }
        if run("small") {
            small_fills(root.path(), kind, &s, &mut rows);
        }
        if run("small") || run("group") {
            group_fills(root.path(), kind, &s, &mut rows);
        }
        if run("hits") {
            for size in [64 << 10, 4 << 10] {
                hit_path(root.path(), kind, size, &s, &mut rows);
            }
        }
    }
    if run("send") {
        zero_copy(root.path(), &s, &mut rows);
    }
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        if run("management") {
            management(root.path(), kind, &s, &mut rows);
        }
        if run("maintenance") {
            maintenance(root.path(), kind, &s, &mut rows);
        }
    }
    println!(
        "\nimgcache compare ({} sizes; {} on {}):\n",
        if s.quick { "quick" } else { "full" },
        std::env::consts::ARCH,
        base.display()
    );
    println!("| bench | figure | yardstick (same run) | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.bench,
            r.figure,
            r.yardstick,
            r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
}
