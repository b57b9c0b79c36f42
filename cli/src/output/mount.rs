//! Results about a mount: `modelfs stats` and `status` (read from the
//! statistics file a running mount publishes), `warm`, and the `--daemon`
//! parent's "mounted" line.
//!
//! Why apart from the store's results: these render the mount's own
//! statistics, whose fields the fs crate defines, next to the store's usage.

use std::path::Path;

use anyhow::Result;
use indicatif::HumanBytes;
use modelfs_store::Usage;

use super::json;

/// `modelfs mount --daemon`: the child reported ready.
pub fn daemon_mounted(mountpoint: &Path, pid: u32) {
    println!("mounted {} (daemon pid {pid})", mountpoint.display());
}

/// What `modelfs warm` read.
pub struct Warmed<'a> {
    pub model: &'a str,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
    /// The mount the files were read through; `None`: read from the store.
    pub mountpoint: Option<&'a Path>,
    /// Files read in their recorded load order.
    pub files_in_trace_order: usize,
}

/// `modelfs warm`: the summary.
pub fn warm(w: &Warmed, as_json: bool) -> Result<()> {
    if as_json {
        return json(&serde_json::json!({
            "model": w.model, "files": w.files, "bytes": w.bytes, "seconds": w.seconds,
            "through_mount": w.mountpoint.is_some(), "files_in_trace_order": w.files_in_trace_order,
        }));
    }
    let via = match w.mountpoint {
        Some(m) => format!("through the mount at {}", m.display()),
        None => "from the store (no mount: page cache only, nothing pinned)".into(),
    };
    println!(
        "warmed {}: {} files ({} in recorded load order), {} in {:.2} s {via}",
        w.model,
        w.files,
        w.files_in_trace_order,
        HumanBytes(w.bytes),
        w.seconds
    );
    Ok(())
}

/// `modelfs stats`: the mount's stats.json as a table, or as is.
pub fn mount_stats(mountpoint: &Path, v: &serde_json::Value, as_json: bool) -> Result<()> {
    if as_json {
        return json(v);
    }
    let n = |key: &str| v[key].as_u64().unwrap_or(0);
    let b = |key: &str| HumanBytes(n(key)).to_string();
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            100.0 * part as f64 / whole as f64
        }
    };
    println!(
        "{} ({} mode), up {:.0} s",
        mountpoint.display(),
        v["mode"].as_str().unwrap_or("?"),
        v["uptime_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "copy-mode reads: {} in {} requests, {:.1}% from memory ({}), {} from disk; {} EIO",
        b("read_bytes"),
        n("read_requests"),
        share(n("read_resident_bytes"), n("read_bytes")),
        b("read_resident_bytes"),
        b("read_disk_bytes"),
        n("eio")
    );
    println!(
        "passthrough: {} opens ({} of files; the kernel reads them without the daemon)",
        n("passthrough_opens"),
        b("passthrough_opened_bytes")
    );
    println!(
        "pinned: {} of a {} budget; pin policy hits {}, misses {}",
        b("pinned_bytes"),
        b("pin_budget"),
        n("cache_hits"),
        n("cache_misses")
    );
    println!(
        "prefetch: {} read ahead by trace replay (window {}); traces saved {}, replayed {}, failed {}",
        b("prefetched_bytes"),
        b("prefetch_window"),
        n("traces_saved"),
        n("trace_replays"),
        n("trace_errors")
    );
    let models = v["models"].as_array().cloned().unwrap_or_default();
    let width = models
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::len))
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:width$}  {:>6}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}",
        "MODEL", "FILES", "PINNED", "READ", "FROM MEMORY", "FROM DISK", "PREFETCHED"
    );
    for m in &models {
        let mb = |key: &str| HumanBytes(m[key].as_u64().unwrap_or(0)).to_string();
        println!(
            "{:width$}  {:>6}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}",
            m["name"].as_str().unwrap_or("?"),
            m["files"].as_u64().unwrap_or(0),
            mb("pinned_bytes"),
            mb("read_bytes"),
            mb("read_resident_bytes"),
            mb("read_disk_bytes"),
            mb("prefetched_bytes")
        );
    }
    Ok(())
}

/// What `modelfs status` found.
pub struct Status<'a> {
    /// The mount point asked about (given or configured), if any.
    pub mountpoint: Option<&'a Path>,
    /// The store reported on: the one the mount serves, else `--store`'s.
    pub store: &'a Path,
    /// The mount's stats.json; `None`: nothing is mounted there.
    pub stats: Option<serde_json::Value>,
    /// The store's usage; `None`: not a store.
    pub usage: Option<Usage>,
}

/// `modelfs status`: the mount's own statistics plus the store's usage.
pub fn status(st: &Status, as_json: bool) -> Result<()> {
    let (stats, usage, store, mountpoint) = (&st.stats, &st.usage, st.store, st.mountpoint);
    if as_json {
        return json(&serde_json::json!({
            "mounted": stats.is_some(),
            "mountpoint": mountpoint,
            "store": store,
            "mode": stats.as_ref().and_then(|s| s.get("mode").cloned()),
            "uptime_seconds": stats.as_ref().and_then(|s| s.get("uptime_seconds").cloned()),
            "models": usage.as_ref().map(|u| u.models.len()),
            "logical_bytes": usage.as_ref().map(|u| u.logical_bytes),
            "stored_bytes": usage.as_ref().map(|u| u.stored_bytes),
            "pinned_bytes": stats.as_ref().and_then(|s| s.get("pinned_bytes").cloned()),
            "stats": stats,
        }));
    }
    match (stats, mountpoint) {
        (Some(s), Some(m)) => println!(
            "mounted at {} ({} mode), up {:.0} s; {} read requests, {} EIO",
            m.display(),
            s["mode"].as_str().unwrap_or("?"),
            s["uptime_seconds"].as_f64().unwrap_or(0.0),
            s["read_requests"],
            s["eio"]
        ),
        (None, Some(m)) => println!("not mounted at {}", m.display()),
        (None, None) => println!("no mount point given or configured"),
        (Some(_), None) => unreachable!(),
    }
    match usage {
        Some(u) => println!(
            "store {}: {} models, {} logical, {} stored; pinned {}",
            store.display(),
            u.models.len(),
            HumanBytes(u.logical_bytes),
            HumanBytes(u.stored_bytes),
            HumanBytes(
                stats
                    .as_ref()
                    .and_then(|s| s["pinned_bytes"].as_u64())
                    .unwrap_or(0)
            )
        ),
        None => println!("store {}: not a store", store.display()),
    }
    Ok(())
}
