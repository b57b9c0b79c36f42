//! Every result the CLI prints: human-readable lines and tables, and the
//! `--json` renderings.
//!
//! Why one place: the commands compute values and hand them here, so what a
//! person reads and what a script parses are defined side by side, and a
//! command's logic can be followed without its formatting in the way. This
//! file renders the store's results (import, listings, usage, gc, verify,
//! upgrade); [`mount`] renders what concerns a mount (stats, status, warm).
//! Diagnostics (warnings, "waiting for a lock") go to stderr where they
//! arise and are not here.

mod mount;

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use indicatif::HumanBytes;
use modelfs_store::{
    FileInfo, GcReport, ImportSummary, ModelInfo, UpgradeReport, Usage, VerifyReport,
};

pub use mount::{daemon_mounted, mount_stats, status, warm, Status, Warmed};

/// Pretty-printed JSON on stdout, one document.
pub fn json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `n` and the noun, singular for one: "1 file", "2 files", "0 files".
/// Every noun the CLI counts takes a plain "s".
pub fn count(n: impl TryInto<u64>, noun: &str) -> String {
    let n = n.try_into().unwrap_or(u64::MAX);
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Width of a table's first column: its longest value, at least its heading.
fn column_width<'a>(heading: &str, values: impl Iterator<Item = &'a str>) -> usize {
    values.map(str::len).max().unwrap_or(0).max(heading.len())
}

fn rfc3339(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `modelfs config check`: the file is valid; the pin budget as bytes.
pub fn config_ok(path: &Path, pin_budget: Option<(&str, u64)>) {
    println!("{}: ok", path.display());
    if let Some((b, bytes)) = pin_budget {
        println!("  pin_budget = {b} ({bytes} bytes)");
    }
}

/// `modelfs init`.
pub fn store_ready(dir: &Path, created: bool) {
    if created {
        println!("created a new store at {}", dir.display());
    } else {
        println!("{} is a store already (left as it was)", dir.display());
    }
}

/// `modelfs import`: the summary.
pub fn import(summary: &ImportSummary, as_json: bool) -> Result<()> {
    if as_json {
        return json(summary);
    }
    println!(
        "imported {}: {}, {}, {} new stored ({} whole, {} recipe, {} identical to stored files; {} recognised in memory), {:.2} s",
        summary.name,
        count(summary.files, "file"),
        HumanBytes(summary.logical_bytes),
        HumanBytes(summary.new_bytes),
        summary.whole_files,
        summary.recipe_files,
        summary.identical_files,
        HumanBytes(summary.recognised_bytes),
        summary.seconds
    );
    Ok(())
}

/// `modelfs ls`: the models.
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
                    "revision": m.revision,
                    "commit": m.commit,
                })
            })
            .collect();
        return json(&list);
    }
    let width = column_width("NAME", models.iter().map(|m| m.name.as_str()));
    // A commit is shown as its first 12 characters, as the hub shows it;
    // `ls --json` has it whole.
    let revs: Vec<String> = models
        .iter()
        .map(|m| match (&m.revision, &m.commit) {
            (Some(r), Some(c)) if r == c => c.chars().take(12).collect(),
            (Some(r), Some(c)) => format!("{r}@{}", c.chars().take(12).collect::<String>()),
            _ => "-".to_string(),
        })
        .collect();
    let rev_width = column_width("REVISION", revs.iter().map(String::as_str));
    println!(
        "{:width$}  {:>6}  {:>11}  {:rev_width$}  IMPORTED",
        "NAME", "FILES", "SIZE", "REVISION"
    );
    for (m, rev) in models.iter().zip(&revs) {
        println!(
            "{:width$}  {:>6}  {:>11}  {:rev_width$}  {}",
            m.name,
            m.files,
            HumanBytes(m.logical_bytes).to_string(),
            rev,
            rfc3339(m.imported_at_ns)
        );
    }
    Ok(())
}

/// `modelfs ls MODEL`: its files and how each is stored.
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
    let width = column_width("PATH", files.iter().map(|f| f.path.as_str()));
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

/// `modelfs rm`: one line per model removed (or, with `dry_run`, that
/// would be).
pub fn removed(models: &[ModelInfo], dry_run: bool, as_json: bool) -> Result<()> {
    if as_json {
        let list: Vec<_> = models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "files": m.files,
                    "logical_bytes": m.logical_bytes,
                })
            })
            .collect();
        return json(&serde_json::json!({ "dry_run": dry_run, "removed": list }));
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for m in models {
        println!(
            "{verb} {} ({}, {})",
            m.name,
            count(m.files, "file"),
            HumanBytes(m.logical_bytes)
        );
    }
    if dry_run {
        println!("nothing removed (--dry-run)");
    } else {
        println!("run `modelfs gc` to reclaim the bytes no other model uses");
    }
    Ok(())
}

/// `modelfs mv`: the model under its new name.
pub fn renamed(old: &str, m: &ModelInfo, as_json: bool) -> Result<()> {
    if as_json {
        return json(&serde_json::json!({
            "old": old,
            "new": m.name,
            "files": m.files,
            "logical_bytes": m.logical_bytes,
        }));
    }
    println!(
        "renamed {old} to {} ({}, {})",
        m.name,
        count(m.files, "file"),
        HumanBytes(m.logical_bytes)
    );
    Ok(())
}

/// `modelfs du MODEL`: one model's usage and who it shares bytes with.
pub fn model_sharing(m: &modelfs_store::ModelSharing, as_json: bool) -> Result<()> {
    if as_json {
        return json(m);
    }
    let u = &m.usage;
    println!("model   {}", u.name);
    println!("files   {}", u.files);
    println!("logical {}", HumanBytes(u.logical_bytes));
    println!(
        "unique  {} (freed by removing it)",
        HumanBytes(u.unique_bytes)
    );
    println!(
        "shared  {} (also used by other models)",
        HumanBytes(u.shared_bytes)
    );
    if m.shares_with.is_empty() {
        println!("shares bytes with no other model");
        return Ok(());
    }
    println!("shares bytes with:");
    let width = column_width("MODEL", m.shares_with.iter().map(|s| s.name.as_str()));
    for s in &m.shares_with {
        println!("  {:width$}  {}", s.name, HumanBytes(s.shared_bytes));
    }
    Ok(())
}

/// `modelfs gc`: what was reclaimed.
pub fn gc(r: &GcReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(r);
    }
    println!(
        "gc: freed {}; removed {}, {}, {}, {}; punched holes in {}{}",
        HumanBytes(r.bytes_freed),
        count(r.objects_removed, "object"),
        count(r.contents_removed, "content"),
        count(r.chunks_removed, "chunk"),
        count(r.traces_removed, "load trace"),
        count(r.objects_punched, "object"),
        if r.objects_busy > 0 {
            format!(
                "; {} in use by readers left for the next gc",
                count(r.objects_busy, "object")
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `modelfs upgrade` of the store at `dir`.
pub fn upgrade(dir: &Path, r: &UpgradeReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(r);
    }
    if r.from_version == r.to_version {
        println!(
            "store {} is already at schema version {}",
            dir.display(),
            r.to_version
        );
    } else {
        println!(
            "upgraded store {} from schema {} to {}: {} re-keyed ({} read), {} renamed",
            dir.display(),
            r.from_version,
            r.to_version,
            count(r.contents, "content"),
            HumanBytes(r.bytes_read),
            count(r.traces_renamed, "load trace")
        );
    }
    Ok(())
}

/// `modelfs du --matrix`: bytes every pair of models shares. Columns are
/// numbered (names would make the table as wide as the longest name times
/// the number of models); each row says its number and name.
pub fn sharing_matrix(m: &modelfs_store::SharingMatrix, as_json: bool) -> Result<()> {
    if as_json {
        return json(m);
    }
    if m.models.is_empty() {
        println!("no models");
        return Ok(());
    }
    let width = column_width("MODEL", m.models.iter().map(String::as_str));
    let num = m.models.len().to_string().len();
    let cells: Vec<Vec<String>> = m
        .shared_bytes
        .iter()
        .map(|row| row.iter().map(|&b| short_bytes(b)).collect())
        .collect();
    let cell = cells
        .iter()
        .flatten()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(num + 1);
    print!("{:num$}  {:width$}", "", "MODEL");
    for j in 0..m.models.len() {
        print!("  {:>cell$}", format!("#{}", j + 1));
    }
    println!();
    for (i, name) in m.models.iter().enumerate() {
        print!("{:>num$}  {name:width$}", i + 1);
        for c in &cells[i] {
            print!("  {c:>cell$}");
        }
        println!();
    }
    println!("(bytes both models reference; the diagonal is each model's own stored bytes)");
    Ok(())
}

/// Bytes in at most 6 characters ("512B", "3.2G"): matrix cells.
fn short_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    if b == 0 {
        return "-".into();
    }
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v >= 100.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// `modelfs du`: totals, then one line per model.
pub fn usage(u: &Usage, as_json: bool) -> Result<()> {
    if as_json {
        return json(u);
    }
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
    let width = column_width("MODEL", u.models.iter().map(|m| m.name.as_str()));
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
    Ok(())
}

/// `modelfs verify`: each damaged file, then the totals.
pub fn verify(r: &VerifyReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(r);
    }
    for p in &r.catalog_problems {
        println!("DAMAGED catalog: {p}");
    }
    for d in &r.damaged {
        println!("DAMAGED {}/{}: {}", d.model, d.path, d.reason);
    }
    let status = if r.is_clean() { "ok" } else { "FAILED" };
    println!(
        "verify {status}: {}, {}, {}, {} checked; {}",
        count(r.models_checked, "model"),
        count(r.files_checked, "file"),
        count(r.contents_checked, "distinct content"),
        HumanBytes(r.bytes_checked),
        count(r.damaged.len(), "damaged file")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn one_is_singular_everything_else_plural() {
        assert_eq!(count(1u64, "file"), "1 file");
        assert_eq!(count(0u64, "file"), "0 files");
        assert_eq!(count(2u64, "model"), "2 models");
        assert_eq!(count(1u64, "damaged file"), "1 damaged file");
    }
}
