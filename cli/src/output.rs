//! Human-readable tables and `--json` output.

use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use indicatif::HumanBytes;
use modelfs_store::{FileInfo, ModelInfo, Usage, VerifyReport};

pub fn json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn rfc3339(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn models(models: &[ModelInfo], as_json: bool) -> Result<()> {
    if as_json {
        let list: Vec<_> = models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "files": m.files,
                    "logical_bytes": m.logical_bytes,
                    "imported_at": rfc3339(m.imported_at_ns),
                    "source": m.source,
                })
            })
            .collect();
        return json(&list);
    }
    let width = models
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:width$}  {:>6}  {:>11}  IMPORTED",
        "NAME", "FILES", "SIZE"
    );
    for m in models {
        println!(
            "{:width$}  {:>6}  {:>11}  {}",
            m.name,
            m.files,
            HumanBytes(m.logical_bytes).to_string(),
            rfc3339(m.imported_at_ns)
        );
    }
    Ok(())
}

pub fn files(files: &[FileInfo], as_json: bool) -> Result<()> {
    if as_json {
        let list: Vec<_> = files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "path": f.path,
                    "size": f.size,
                    "hash": f.hash.to_hex(),
                    "storage": if f.whole_object.is_some() { "whole" } else { "recipe" },
                    "object": f.whole_object,
                    "chunks": f.chunks,
                    "format": f.format,
                    "mode": format!("{:o}", f.mode),
                })
            })
            .collect();
        return json(&list);
    }
    let width = files.iter().map(|f| f.path.len()).max().unwrap_or(4).max(4);
    println!(
        "{:width$}  {:>11}  {:7}  {:>7}  FORMAT",
        "PATH", "SIZE", "STORAGE", "CHUNKS"
    );
    for f in files {
        println!(
            "{:width$}  {:>11}  {:7}  {:>7}  {}",
            f.path,
            HumanBytes(f.size).to_string(),
            if f.whole_object.is_some() {
                "whole"
            } else {
                "recipe"
            },
            f.chunks,
            f.format.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

pub fn usage(u: &Usage) {
    println!(
        "logical {}  stored {}  dedup {:.2}x  metadata {} ({:.4}% of logical){}",
        HumanBytes(u.logical_bytes),
        HumanBytes(u.stored_bytes),
        u.dedup_ratio,
        HumanBytes(u.metadata_bytes),
        if u.logical_bytes == 0 {
            0.0
        } else {
            100.0 * u.metadata_bytes as f64 / u.logical_bytes as f64
        },
        if u.unreferenced_bytes > 0 {
            format!(
                "  unreferenced {} (run gc)",
                HumanBytes(u.unreferenced_bytes)
            )
        } else {
            String::new()
        }
    );
    let width = u
        .models
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:width$}  {:>6}  {:>11}  {:>11}  {:>11}",
        "MODEL", "FILES", "LOGICAL", "UNIQUE", "SHARED"
    );
    for m in &u.models {
        println!(
            "{:width$}  {:>6}  {:>11}  {:>11}  {:>11}",
            m.name,
            m.files,
            HumanBytes(m.logical_bytes).to_string(),
            HumanBytes(m.unique_bytes).to_string(),
            HumanBytes(m.shared_bytes).to_string()
        );
    }
}

pub fn verify(r: &VerifyReport) {
    for p in &r.catalog_problems {
        println!("DAMAGED catalog: {p}");
    }
    for d in &r.damaged {
        println!("DAMAGED {}/{}: {}", d.model, d.path, d.reason);
    }
    let status = if r.is_clean() { "ok" } else { "FAILED" };
    println!(
        "verify {status}: {} models, {} files, {} distinct contents, {} checked; {} damaged files",
        r.models_checked,
        r.files_checked,
        r.contents_checked,
        HumanBytes(r.bytes_checked),
        r.damaged.len()
    );
}

/// `modelfs stats` as text, from the mount's stats.json.
pub fn mount_stats(mountpoint: &std::path::Path, v: &serde_json::Value) {
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
}
