//! The commands that read images through the cache: `prefetch` (the
//! queue, from an origin, in parallel, with progress bars on a terminal)
//! and `fetch` (one image to a file or standard output).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use imgcache::prefetch::{PrefetchEvent, PrefetchOutcome};
use imgcache::{Error, ImageCache, ImageId, ImageStream};
use serde::Serialize;

use crate::output::{human_size, json};
use crate::{code, origin, Failure};

pub fn prefetch(
    cache: &ImageCache,
    spec: &str,
    parallel: usize,
    as_json: bool,
) -> Result<u8, Failure> {
    let origin = origin(spec)?;
    let bars = (!as_json && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
    let active: bars::Bars = Default::default();
    let on_event = |event: PrefetchEvent<'_>| {
        let Some(multi) = &bars else { return };
        match event {
            PrefetchEvent::Started { id, size } => {
                let bar = multi.add(match size {
                    Some(n) => indicatif::ProgressBar::new(n),
                    None => indicatif::ProgressBar::new_spinner(),
                });
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:<40} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(id.to_string());
                active.insert(id, bar);
            }
            PrefetchEvent::Progress { id, bytes } => active.with(id, |b| b.set_position(bytes)),
            PrefetchEvent::Finished { id, .. } => active.with(id, |b| b.finish()),
            _ => {}
        }
    };
    let report = cache.prefetch_with(&*origin, parallel, &on_event)?;
    #[derive(Serialize)]
    struct Row<'a> {
        id: &'a str,
        outcome: &'static str,
        bytes: u64,
        error: Option<String>,
    }
    let rows: Vec<Row> = report
        .results
        .iter()
        .map(|r| match &r.outcome {
            Ok(PrefetchOutcome::Cached { bytes }) => Row {
                id: r.id.as_str(),
                outcome: "cached",
                bytes: *bytes,
                error: None,
            },
            Ok(PrefetchOutcome::AlreadyCached) => Row {
                id: r.id.as_str(),
                outcome: "already cached",
                bytes: 0,
                error: None,
            },
            Ok(PrefetchOutcome::BeingCached) => Row {
                id: r.id.as_str(),
                outcome: "being cached elsewhere",
                bytes: 0,
                error: None,
            },
            Ok(_) => Row {
                id: r.id.as_str(),
                outcome: "done",
                bytes: 0,
                error: None,
            },
            Err(e) => Row {
                id: r.id.as_str(),
                outcome: "failed",
                bytes: 0,
                error: Some(e.to_string()),
            },
        })
        .collect();
    if as_json {
        json(&rows);
    } else if rows.is_empty() {
        println!("Nothing queued.");
    } else {
        for r in &rows {
            match &r.error {
                None if r.outcome == "cached" => {
                    println!("{:<9} {} ({})", r.outcome, r.id, human_size(r.bytes))
                }
                None => println!("{:<9} {}", r.outcome, r.id),
                Some(e) => println!("FAILED    {}: {e}", r.id),
            }
        }
    }
    let failed = report.failures().count();
    if failed > 0 {
        let ids: Vec<&str> = report.failures().map(|(i, _)| i.as_str()).collect();
        eprintln!(
            "imgcache: prefetch failed for {failed} of {} images (still queued): {}",
            report.results.len(),
            ids.join(", ")
        );
        return Ok(code::PREFETCH_FAILED);
    }
    Ok(0)
}

/// Progress bars by image, shared between the prefetch workers.
mod bars {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use imgcache::ImageId;

    #[derive(Default)]
    pub struct Bars(Mutex<HashMap<ImageId, indicatif::ProgressBar>>);

    impl Bars {
        pub fn insert(&self, id: &ImageId, bar: indicatif::ProgressBar) {
            if let Ok(mut m) = self.0.lock() {
                m.insert(id.clone(), bar);
            }
        }

        pub fn with(&self, id: &ImageId, f: impl FnOnce(&indicatif::ProgressBar)) {
            if let Ok(m) = self.0.lock() {
                if let Some(b) = m.get(id) {
                    f(b);
                }
            }
        }
    }
}

pub fn fetch(
    cache: &ImageCache,
    id: &ImageId,
    spec: &str,
    output: Option<PathBuf>,
    as_json: bool,
) -> Result<u8, Failure> {
    let origin = origin(spec)?;
    // `-o -` is standard output, as for curl, tar and wget.
    let output = output.filter(|p| p.as_os_str() != "-");
    let stdout = std::io::stdout();
    if output.is_none() && stdout.is_terminal() {
        return Err(Failure::input(
            "refusing to write an image to a terminal: give -o FILE or redirect stdout",
        ));
    }
    let stream = cache.fetch_from(id, &*origin)?;
    let how = match &stream {
        ImageStream::Cached(_) => "hit",
        ImageStream::Filling(_) => "miss",
        ImageStream::Following(_) => "joined a fill",
    };
    // Why a miss was not cached, if it was not (the stream is unaffected).
    let not_cached = |stream: &ImageStream<Box<dyn std::io::Read + Send>>| match stream {
        ImageStream::Filling(tee) => tee.stats().cache_error.clone(),
        _ => None,
    };
    let (bytes, note) = match (stream, &output) {
        (ImageStream::Cached(image), Some(path)) => {
            let file = std::fs::File::create(path)
                .map_err(|e| Failure::input(format!("cannot create {}: {e}", path.display())))?;
            (image.send_to(&file, None)?, None)
        }
        (ImageStream::Cached(image), None) => {
            (image.send_to(std::io::stdout().lock(), None)?, None)
        }
        (mut stream, Some(path)) => {
            let mut file = std::fs::File::create(path)
                .map_err(|e| Failure::input(format!("cannot create {}: {e}", path.display())))?;
            let n = copy(
                id,
                &mut stream,
                &mut file,
                std::io::stderr().is_terminal() && !as_json,
            )?;
            (n, not_cached(&stream))
        }
        (mut stream, None) => {
            let mut out = std::io::stdout().lock();
            let n = copy(id, &mut stream, &mut out, false)?;
            out.flush().map_err(|e| Failure {
                code: code::FAILED,
                message: format!("stdout: {e}"),
            })?;
            (n, not_cached(&stream))
        }
    };
    let summary = serde_json::json!({"id": id.as_str(), "result": how, "bytes": bytes,
        "cached": cache.is_cached(id)?, "not_cached": note});
    if as_json && output.is_some() {
        json(&summary);
    } else if let Some(why) = &note {
        eprintln!(
            "{id}: {how}, {} ({} bytes), not cached: {why}",
            human_size(bytes),
            bytes
        );
    } else {
        eprintln!("{id}: {how}, {} ({} bytes)", human_size(bytes), bytes);
    }
    Ok(0)
}

/// Copies a fill or follow to `out`, with a progress bar if asked.
fn copy(
    id: &ImageId,
    stream: &mut ImageStream<Box<dyn std::io::Read + Send>>,
    out: &mut dyn Write,
    progress: bool,
) -> Result<u64, Failure> {
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(id.to_string());
        b
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match std::io::Read::read(stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from_io_of(id, e).into()),
        };
        out.write_all(&buf[..n]).map_err(|e| Failure {
            code: code::FAILED,
            message: format!("writing {id}: {e}"),
        })?;
        total += n as u64;
        if let Some(b) = &bar {
            b.set_position(total);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(total)
}
