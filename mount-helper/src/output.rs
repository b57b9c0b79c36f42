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
