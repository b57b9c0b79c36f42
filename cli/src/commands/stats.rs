//! `modelfs stats` and `status`: what a running mount reports about itself,
//! read from the statistics file it publishes (MOUNTPOINT/.modelfs/stats.json).
//!
//! Why together: both find the mount, read that file and exit 3 when nothing
//! is mounted; `status` adds the store's usage.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use super::locate::is_modelfs_mount;
use modelfs_fs::MountStats;
use modelfs_store::Store;

use crate::output;

/// Where a mount publishes its statistics, below the mount point.
const STATS_FILE: &str = ".modelfs/stats.json";

/// The statistics file `path` (whose text is `text`) as the mount wrote it.
/// The same struct writes and reads it, so a file that does not parse came
/// from another modelfs version (or is damaged): say which file and why.
fn parse_stats(path: &Path, text: &str) -> Result<MountStats> {
    serde_json::from_str(text).with_context(|| {
        format!(
            "{}: not the statistics of this modelfs version (mounted by another version?)",
            path.display()
        )
    })
}

/// Exit 3 (nothing mounted), saying why.
pub fn not_mounted(why: &str) -> Result<ExitCode> {
    eprintln!("modelfs: {why}");
    Ok(ExitCode::from(3))
}

/// `modelfs stats`: the mount's statistics file, as a table or as is.
pub fn stats(mnt: &Path, model: Option<&str>, as_json: bool) -> Result<ExitCode> {
    if !is_modelfs_mount(mnt) {
        return not_mounted(&format!("{}: no modelfs mount there", mnt.display()));
    }
    let path = mnt.join(STATS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut stats = parse_stats(&path, &text)?;
    if let Some(name) = model {
        let models = std::mem::take(&mut stats.models);
        let Some(line) = models.into_iter().find(|m| m.name == name) else {
            bail!("the mount at {} has no model {name:?}", mnt.display());
        };
        stats.models = vec![line];
    }
    output::mount_stats(mnt, &stats, as_json)?;
    Ok(ExitCode::SUCCESS)
}

/// `modelfs status`: the mount's own statistics plus the store's usage; exit
/// 3 if nothing is mounted.
pub fn status(store: &Path, mountpoint: Option<&Path>, as_json: bool) -> Result<ExitCode> {
    let mounted = mountpoint.filter(|m| is_modelfs_mount(m));
    // A mount whose file cannot be read (a daemon that died leaves its
    // mount point answering ENOTCONN) is reported as not mounted; one whose
    // file does not parse is an error, not a missing mount.
    let stats = mounted
        .and_then(|m| {
            let path = m.join(STATS_FILE);
            let text = std::fs::read_to_string(&path).ok()?;
            Some(parse_stats(&path, &text))
        })
        .transpose()?;
    // A mounted store is the one the daemon serves, whatever --store says.
    let served = stats.as_ref().map(|s| s.store.clone());
    let store = served.as_deref().unwrap_or(store);
    let usage = Store::open(store).ok().map(|s| s.usage()).transpose()?;
    let found_mount = stats.is_some();
    let st = output::Status {
        mountpoint,
        store,
        stats,
        usage,
    };
    output::status(&st, as_json)?;
    Ok(if found_mount {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelfs_fs::{ModelStats, ServingMode};

    fn sample() -> MountStats {
        MountStats {
            store: "/var/lib/modelfs".into(),
            mode: ServingMode::Passthrough,
            uptime_seconds: 12.5,
            directories: 4,
            files: 3,
            read_requests: 10,
            read_bytes: 1 << 20,
            eio: 1,
            passthrough_opens: 2,
            passthrough_opened_bytes: 4 << 20,
            copy_opens: 1,
            refreshes: 0,
            imports_seen: 1,
            removals_seen: 0,
            pin_budget: 1 << 30,
            pinned_bytes: 1 << 19,
            cache_hits: 7,
            cache_misses: 3,
            prefetch_window: 256 << 20,
            traces_saved: 1,
            trace_replays: 1,
            trace_errors: 0,
            trace_replays_running: 0,
            layouts: 2,
            layout_bytes: 3 << 20,
            layout_gaps: 0,
            layout_refusals: 1,
            read_resident_bytes: 1 << 19,
            read_disk_bytes: 1 << 19,
            prefetched_bytes: 0,
            models: vec![ModelStats {
                name: "llama".into(),
                files: 3,
                pinned_bytes: 1 << 19,
                read_bytes: 1 << 20,
                read_resident_bytes: 1 << 19,
                read_disk_bytes: 1 << 19,
                prefetched_bytes: 0,
            }],
        }
    }

    #[test]
    fn the_file_a_mount_writes_reads_back_as_the_same_document() {
        let text = sample().to_json();
        let path = Path::new("/mnt/.modelfs/stats.json");
        let typed = parse_stats(path, &text).unwrap();
        assert_eq!(typed, sample());
        let untyped: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), untyped);
    }

    #[test]
    fn a_file_of_another_version_is_a_one_line_error_naming_it() {
        let path = Path::new("/mnt/.modelfs/stats.json");
        for text in [
            "{\"store\": \"/s\", \"mode\": \"copy\"}",
            "not json",
            "{\"mode\": 3}",
        ] {
            let e = format!("{:#}", parse_stats(path, text).unwrap_err());
            assert!(e.starts_with("/mnt/.modelfs/stats.json: "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = format!(
            "{:#}",
            parse_stats(path, "{\"store\": \"/s\", \"mode\": \"copy\"}").unwrap_err()
        );
        assert!(e.contains("missing field"), "{e}");
    }
}
