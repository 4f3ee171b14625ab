//! The cache's main job, end to end, on the embedded default (SQLite in a
//! local directory): requests for images arrive, misses are fetched from a
//! (generated) backend and cached, hits are served from disk, the cache is
//! pruned to its size limit, and the listing is printed.
//!
//! ```text
//! cargo run --example demo                        # ./imgcache-demo, sqlite
//! cargo run --example demo -- /tmp/c --driver xattr --max-size 3000000
//! ```
//!
//! Run it twice: the second run's requests are all hits.

use std::io::{self, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use imgcache::{CacheOptions, DriverKind, ImageCache, ImageId};

/// A stand-in for the slow backend: `size` deterministic bytes per image.
struct Backend {
    state: u64,
    left: u64,
}

impl Backend {
    fn open(id: &ImageId, size: u64) -> Self {
        let seed = id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Backend {
            state: seed | 1,
            left: size,
        }
    }
}

impl Read for Backend {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for b in &mut buf[..n] {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The images the backend holds, and their sizes.
const CATALOGUE: &[(&str, u64)] = &[
    ("cirros-0.6.2-x86_64", 1_048_576 + 7),
    ("ubuntu-24.04-minimal", 2_500_000),
    ("debian-12-genericcloud", 1_800_000),
    ("fedora-coreos-40", 900_000),
];

/// Requests as an API server sees them: popular images come back.
const REQUESTS: &[&str] = &[
    "cirros-0.6.2-x86_64",
    "ubuntu-24.04-minimal",
    "cirros-0.6.2-x86_64",
    "debian-12-genericcloud",
    "cirros-0.6.2-x86_64",
    "fedora-coreos-40",
    "ubuntu-24.04-minimal",
];

fn serve(
    cache: &ImageCache,
    id: &ImageId,
    size: u64,
) -> Result<(&'static str, u64), imgcache::Error> {
    if let Some(mut image) = cache.open_for_read(id)? {
        let sent = io::copy(&mut image, &mut io::sink())
            .map_err(|e| imgcache::Error::Config(format!("serving {id}: {e}")))?;
        return Ok(("hit ", sent));
    }
    cache.cache_image_file(id, Backend::open(id, size))?;
    Ok(("miss", size))
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut dir = PathBuf::from("imgcache-demo");
    let mut driver = DriverKind::Sqlite;
    let mut max_size = 5_000_000u64;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--driver" => driver = args.next().ok_or("--driver needs a value")?.parse()?,
            "--max-size" => max_size = args.next().ok_or("--max-size needs a value")?.parse()?,
            "-h" | "--help" => {
                println!("usage: demo [DIR] [--driver sqlite|xattr] [--max-size BYTES]");
                return Ok(());
            }
            other => dir = PathBuf::from(other),
        }
    }
    let cache = CacheOptions::new(&dir)
        .driver(driver)
        .max_size(max_size)
        .open()?;
    println!(
        "cache {} (driver {}, max size {max_size} bytes)\n",
        dir.display(),
        driver
    );

    for name in REQUESTS {
        let id = ImageId::new(name)?;
        let size = CATALOGUE
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, s)| s)
            .ok_or("not in the catalogue")?;
        let start = Instant::now();
        let (how, bytes) = serve(&cache, &id, size)?;
        println!(
            "GET {name:<24} {how} {bytes:>9} bytes  {:>8.2?}",
            start.elapsed()
        );
    }

    let queued = ImageId::new("windows-server-2022")?;
    cache.queue_image(&queued)?;
    let pruned = cache.prune()?;
    let cleaned = cache.clean(None)?;
    println!(
        "\npruned {} images ({} bytes); cleaned {} files; queued: {:?}\n",
        pruned.files(),
        pruned.bytes,
        cleaned.files(),
        cache
            .queued_images()?
            .iter()
            .map(ImageId::as_str)
            .collect::<Vec<_>>()
    );

    println!(
        "{:<24} {:>9} {:>5}  {:<20}  {:<20}  crc32",
        "id", "size", "hits", "last accessed", "last modified"
    );
    for image in cache.cached_images()? {
        println!(
            "{:<24} {:>9} {:>5}  {:<20}  {:<20}  {}",
            image.id,
            image.size,
            image.hits,
            time(image.last_accessed),
            time(image.last_modified),
            image.crc32.map_or("-".into(), |c| format!("{c:08x}"))
        );
    }
    println!("\ntotal {} bytes", cache.cache_size()?);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
