//! Results about a mount: `modelfs stats` and `status` (read from the
//! statistics file a running mount publishes), `warm`, and the `--daemon`
//! parent's "mounted" line.
//!
//! Why apart from the store's results: these render the mount's own
//! statistics, whose fields the fs crate defines, next to the store's usage.

use std::path::Path;

use anyhow::Result;
use indicatif::HumanBytes;
use modelfs_fs::MountStats;
use modelfs_store::Usage;

use super::{count, json};

/// `modelfs mount --daemon`: the child reported ready. The mount command
/// keeps SIGPIPE ignored (see main), so a caller that closed our stdout gets
/// nothing rather than a panic; the mount is up either way.
pub fn daemon_mounted(mountpoint: &Path, pid: u32, served: Option<&modelfs_fs::MountStats>) {
    use std::io::Write;
    let line = match served {
        Some(s) => format!(
            "mounted {} at {}: {} (daemon pid {pid})",
            s.store.display(),
            mountpoint.display(),
            count(s.models.len(), "model")
        ),
        None => format!("mounted {} (daemon pid {pid})", mountpoint.display()),
    };
    let _ = writeln!(std::io::stdout(), "{line}");
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
        "warmed {}: {} ({} in recorded load order), {} in {:.2} s {via}",
        w.model,
        count(w.files, "file"),
        w.files_in_trace_order,
        HumanBytes(w.bytes),
        w.seconds
    );
    Ok(())
}

/// `modelfs stats`: the mount's stats.json as a table, or as is.
pub fn mount_stats(mountpoint: &Path, s: &MountStats, as_json: bool) -> Result<()> {
    if as_json {
        // Through a `Value`, whose keys are sorted: the order `stats --json`
        // has always printed them in (stats.json itself is in field order).
        return json(&serde_json::to_value(s)?);
    }
    let b = |bytes: u64| HumanBytes(bytes).to_string();
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
        s.mode.as_str(),
        s.uptime_seconds
    );
    println!(
        "copy-mode reads: {} in {}, {:.1}% from memory ({}), {} from disk; {} EIO",
        b(s.read_bytes),
        count(s.read_requests, "request"),
        share(s.read_resident_bytes, s.read_bytes),
        b(s.read_resident_bytes),
        b(s.read_disk_bytes),
        s.eio
    );
    println!(
        "passthrough: {} ({} of files; the kernel reads them without the daemon)",
        count(s.passthrough_opens, "open"),
        b(s.passthrough_opened_bytes)
    );
    println!(
        "pinned: {} of a {} budget; pin policy hits {}, misses {}",
        b(s.pinned_bytes),
        b(s.pin_budget),
        s.cache_hits,
        s.cache_misses
    );
    println!(
        "prefetch: {} read ahead by trace replay (window {}); traces saved {}, replayed {}, failed {}",
        b(s.prefetched_bytes),
        b(s.prefetch_window),
        s.traces_saved,
        s.trace_replays,
        s.trace_errors
    );
    println!(
        "sharing: {} answered covering {}; {} left out (failed check), {} refused",
        count(s.layouts, "layout"),
        b(s.layout_bytes),
        count(s.layout_gaps, "chunk"),
        count(s.layout_refusals, "request")
    );
    let width = super::column_width("MODEL", s.models.iter().map(|m| m.name.as_str()));
    println!(
        "{:width$}  {:>6}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}",
        "MODEL", "FILES", "PINNED", "READ", "FROM MEMORY", "FROM DISK", "PREFETCHED"
    );
    for m in &s.models {
        println!(
            "{:width$}  {:>6}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}",
            m.name,
            m.files,
            b(m.pinned_bytes),
            b(m.read_bytes),
            b(m.read_resident_bytes),
            b(m.read_disk_bytes),
            b(m.prefetched_bytes)
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
    pub stats: Option<MountStats>,
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
            "mode": stats.as_ref().map(|s| s.mode),
            "uptime_seconds": stats.as_ref().map(|s| s.uptime_seconds),
            "models": usage.as_ref().map(|u| u.models.len()),
            "logical_bytes": usage.as_ref().map(|u| u.logical_bytes),
            "stored_bytes": usage.as_ref().map(|u| u.stored_bytes),
            "pinned_bytes": stats.as_ref().map(|s| s.pinned_bytes),
            "stats": stats,
        }));
    }
    match (stats, mountpoint) {
        (Some(s), Some(m)) => println!(
            "mounted at {} ({} mode), up {:.0} s; {}, {} EIO",
            m.display(),
            s.mode.as_str(),
            s.uptime_seconds,
            count(s.read_requests, "read request"),
            s.eio
        ),
        (None, Some(m)) => println!("not mounted at {}", m.display()),
        (None, None) => println!("not mounted (no modelfs mount of this store)"),
        (Some(_), None) => unreachable!(),
    }
    match usage {
        Some(u) => println!(
            "store {}: {}, {} logical, {} stored; pinned {}",
            store.display(),
            count(u.models.len(), "model"),
            HumanBytes(u.logical_bytes),
            HumanBytes(u.stored_bytes),
            HumanBytes(stats.as_ref().map_or(0, |s| s.pinned_bytes))
        ),
        None => println!("store {}: not a store", store.display()),
    }
    Ok(())
}
