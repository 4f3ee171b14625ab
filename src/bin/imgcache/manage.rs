//! The commands that change the cache: the queue, deletions, the
//! operator's jobs (`prune`, `clean`, `scrub`), and `migrate`.

use imgcache::{ImageCache, ImageId};
use serde::Serialize;

use crate::output::{human_size, json};
use crate::{code, id, report, Failure};

/// `queue-image ID...`.
pub fn queue_image(cache: &ImageCache, ids: &[String], as_json: bool) -> Result<u8, Failure> {
    let ids: Vec<ImageId> = ids.iter().map(|s| id(s)).collect::<Result<_, _>>()?;
    #[derive(Serialize)]
    struct Queued<'a> {
        id: &'a str,
        queued: bool,
    }
    let mut out = Vec::new();
    for i in &ids {
        let queued = cache.queue_image(i)?;
        if !as_json {
            if queued {
                println!("queued {i}");
            } else {
                println!("{i} is already cached, being cached, or queued");
            }
        }
        out.push(Queued {
            id: i.as_str(),
            queued,
        });
    }
    if as_json {
        json(&out);
    }
    Ok(0)
}

/// `delete-cached-image ID`.
pub fn delete_cached_image(cache: &ImageCache, s: &str, as_json: bool) -> Result<u8, Failure> {
    let i = id(s)?;
    if !cache.delete_cached_image(&i)? {
        return Err(Failure {
            code: code::NOT_FOUND,
            message: format!("image {i} is not cached"),
        });
    }
    report(
        as_json,
        &serde_json::json!({"deleted": i.as_str()}),
        &format!("deleted {i}"),
    );
    Ok(0)
}

/// `delete-all-cached-images`.
pub fn delete_all_cached_images(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let n = cache.delete_all_cached_images()?;
    report(
        as_json,
        &serde_json::json!({"deleted": n}),
        &format!("deleted {n} cached images"),
    );
    Ok(0)
}

/// `delete-queued-image ID`.
pub fn delete_queued_image(cache: &ImageCache, s: &str, as_json: bool) -> Result<u8, Failure> {
    let i = id(s)?;
    if !cache.delete_queued_image(&i)? {
        return Err(Failure {
            code: code::NOT_FOUND,
            message: format!("image {i} is not queued"),
        });
    }
    report(
        as_json,
        &serde_json::json!({"dequeued": i.as_str()}),
        &format!("removed {i} from the queue"),
    );
    Ok(0)
}

/// `delete-all-queued-images`.
pub fn delete_all_queued_images(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let n = cache.delete_all_queued_images()?;
    report(
        as_json,
        &serde_json::json!({"dequeued": n}),
        &format!("removed {n} queued images"),
    );
    Ok(0)
}

/// `prune`: to `image_cache_max_size`, least recently accessed first.
pub fn prune(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let r = cache.prune()?;
    #[derive(Serialize)]
    struct Pruned<'a> {
        #[serde(flatten)]
        report: &'a imgcache::PruneReport,
        max_size: u64,
    }
    report(
        as_json,
        &Pruned {
            report: &r,
            max_size: cache.options().image_cache_max_size(),
        },
        &format!(
            "pruned {} images ({}); {} remain of a {} limit",
            r.files(),
            human_size(r.bytes),
            human_size(r.remaining),
            human_size(cache.options().image_cache_max_size())
        ),
    );
    Ok(0)
}

/// `clean`: invalid files and stalled incomplete ones.
pub fn clean(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let r = cache.clean(None)?;
    #[derive(Serialize)]
    struct Cleaned<'a> {
        #[serde(flatten)]
        report: &'a imgcache::CleanReport,
        bytes: u64,
    }
    report(
        as_json,
        &Cleaned {
            report: &r,
            bytes: r.bytes(),
        },
        &format!(
            "removed {} invalid and {} stalled files ({}); kept {} files being written",
            r.invalid.len(),
            r.stalled.len(),
            human_size(r.bytes()),
            r.live_writers.len()
        ),
    );
    Ok(0)
}

/// `scrub`: every entry read and checked; corrupt ones moved aside.
pub fn scrub(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let r = cache.scrub()?;
    report(
        as_json,
        &r,
        &format!(
            "{} intact, {} newly verified, {} corrupt (moved to invalid/); {} read",
            r.intact,
            r.newly_verified.len(),
            r.corrupt.len(),
            human_size(r.bytes)
        ),
    );
    for (i, why) in &r.corrupt {
        eprintln!("corrupt: {i}: {why}");
    }
    Ok(0)
}

/// `migrate --from-sqlite`: what the migration at open did.
pub fn migrate(cache: &ImageCache, as_json: bool) -> Result<u8, Failure> {
    let db = cache.options().sqlite_db_path();
    let Some(r) = cache.migration().cloned() else {
        return Err(Failure::input(format!(
            "migrating needs the centralized_db driver (this cache's is {})",
            cache.driver().name()
        )));
    };
    report(
        as_json,
        &r,
        &format!(
            "migrated {} of {} rows from {} to node {}",
            r.migrated,
            r.rows,
            db.display(),
            cache.node()
        ),
    );
    Ok(0)
}
