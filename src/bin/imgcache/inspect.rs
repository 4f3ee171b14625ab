//! The commands that only read: `list-cached` (one node or all),
//! `list-queued`, `nodes`, `stats`, `verify`. They run on a directory this
//! user may read but not write (opened read-only).

use imgcache::{ImageCache, ImageId, Verification};

use crate::output::{human_size, iso, json, table};
use crate::{code, id, Failure};

/// `list-cached --all-nodes`: every node's images (centralized_db).
pub fn list_cached_all_nodes(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let Some(images) = cache.cached_images_all_nodes()? else {
        return Err(Failure::input(format!(
            "--all-nodes needs the centralized_db driver (this cache's is {})",
            cache.driver().name()
        )));
    };
    if as_json {
        json(&images);
    } else if images.is_empty() {
        println!("No cached images on any node.");
    } else {
        let rows: Vec<Vec<String>> = images
            .iter()
            .map(|n| {
                vec![
                    n.node.clone(),
                    n.image.id.to_string(),
                    human_size(n.image.size),
                    n.image.hits.to_string(),
                    iso(n.image.last_accessed),
                ]
            })
            .collect();
        table(
            &["NODE", "ID", "SIZE", "HITS", "LAST ACCESSED"],
            &rows,
            &[2, 3],
        );
        let nodes: std::collections::BTreeSet<&str> =
            images.iter().map(|n| n.node.as_str()).collect();
        println!("{} images on {} nodes", images.len(), nodes.len());
    }
    Ok(0)
}

/// `list-cached`: this node's images.
pub fn list_cached(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let images = cache.cached_images()?;
    if as_json {
        json(&images);
    } else if images.is_empty() {
        println!("No cached images.");
    } else {
        let rows: Vec<Vec<String>> = images
            .iter()
            .map(|i| {
                vec![
                    i.id.to_string(),
                    human_size(i.size),
                    i.hits.to_string(),
                    iso(i.last_accessed),
                    iso(i.last_modified),
                ]
            })
            .collect();
        table(
            &["ID", "SIZE", "HITS", "LAST ACCESSED", "LAST MODIFIED"],
            &rows,
            &[1, 2],
        );
        let total: u64 = images.iter().map(|i| i.size).sum();
        println!("{} images, {}", images.len(), human_size(total));
    }
    Ok(0)
}

/// `nodes ID`: the nodes holding an image (centralized_db).
pub fn nodes(cache: &ImageCache, s: &str, as_json: bool) -> Result<u8, Failure> {
    let i = id(s)?;
    let Some(nodes) = cache.cached_nodes(&i)? else {
        return Err(Failure::input(format!(
                "which nodes hold an image is known to the centralized_db driver only (this cache's is {})",
                cache.driver().name()
            )));
    };
    if as_json {
        json(&serde_json::json!({"image_id": i.as_str(), "nodes": nodes}));
    } else if nodes.is_empty() {
        return Err(Failure {
            code: code::NOT_FOUND,
            message: format!("no node holds {i}"),
        });
    } else {
        for n in &nodes {
            println!("{n}");
        }
    }
    Ok(0)
}

/// `list-queued`.
pub fn list_queued(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let queued = cache.queued_images()?;
    if as_json {
        json(&queued.iter().map(|i| i.as_str()).collect::<Vec<_>>());
    } else if queued.is_empty() {
        println!("No queued images.");
    } else {
        for i in &queued {
            println!("{i}");
        }
    }
    Ok(0)
}

/// `stats`: entries, bytes, hits, the queue and invalid files.
pub fn stats(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let images = cache.cached_images()?;
    let bytes: u64 = images.iter().map(|i| i.size).sum();
    let hits: u64 = images.iter().map(|i| i.hits).sum();
    let queued = cache.queued_images()?.len();
    let invalid = cache.invalid_images()?;
    let max = cache.options().image_cache_max_size();
    let driver = cache.driver().name();
    if as_json {
        json(&serde_json::json!({
            "dir": cache.dir(),
            "driver": driver,
            "entries": images.len(),
            "bytes": bytes,
            "max_size": max,
            "hits": hits,
            "queued": queued,
            "invalid": invalid.len(),
            "invalid_bytes": invalid.iter().map(|i| i.size).sum::<u64>(),
        }));
    } else {
        let used = if max == 0 {
            0.0
        } else {
            bytes as f64 * 100.0 / max as f64
        };
        println!("directory  {}", cache.dir().display());
        println!("driver     {driver}");
        println!("entries    {}", images.len());
        println!(
            "size       {} of {} ({used:.1}%)",
            human_size(bytes),
            human_size(max)
        );
        println!("hits       {hits}");
        println!("queued     {queued}");
        println!(
            "invalid    {} ({})",
            invalid.len(),
            human_size(invalid.iter().map(|i| i.size).sum())
        );
    }
    Ok(0)
}

pub fn verify(cache: &ImageCache, ids: &[String], as_json: bool) -> Result<u8, Failure> {
    let ids: Vec<ImageId> = if ids.is_empty() {
        cache.cached_images()?.into_iter().map(|i| i.id).collect()
    } else {
        ids.iter().map(|s| id(s)).collect::<Result<_, _>>()?
    };
    let mut corrupt = 0;
    let mut rows = Vec::new();
    for i in &ids {
        let (state, detail) = match cache.verify(i)? {
            None => ("not cached", String::new()),
            Some(Verification::Intact) => ("intact", String::new()),
            Some(Verification::Unverified { crc32 }) => {
                ("unverified", format!("crc32 {crc32:08x}, none recorded"))
            }
            Some(Verification::Corrupt { detail }) => {
                corrupt += 1;
                ("CORRUPT", detail)
            }
            Some(_) => ("unknown", String::new()),
        };
        rows.push((i.to_string(), state, detail));
    }
    if as_json {
        json(
            &rows
                .iter()
                .map(|(i, s, d)| serde_json::json!({"id": i, "state": s, "detail": d}))
                .collect::<Vec<_>>(),
        );
    } else {
        for (i, s, d) in &rows {
            if d.is_empty() {
                println!("{s:<10} {i}");
            } else {
                println!("{s:<10} {i}: {d}");
            }
        }
    }
    if corrupt > 0 {
        eprintln!("imgcache: {corrupt} corrupt images (run `imgcache scrub` to move them aside)");
        return Ok(code::CORRUPT);
    }
    Ok(0)
}
