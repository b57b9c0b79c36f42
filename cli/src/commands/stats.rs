//! `modelfs stats` and `status`: what a running mount reports about itself,
//! read from the statistics file it publishes (MOUNTPOINT/.modelfs/stats.json).
//!
//! Why together: both find the mount, read that file and exit 3 when nothing
//! is mounted; `status` adds the store's usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use modelfs_store::Store;

use crate::output;

/// Where a mount publishes its statistics, below the mount point.
const STATS_FILE: &str = ".modelfs/stats.json";

/// Is a modelfs mount at `mountpoint`?
fn is_modelfs_mount(mountpoint: &Path) -> bool {
    modelfs_fs::mount_entry(mountpoint).is_some_and(|(_, fstype)| fstype == "fuse.modelfs")
}

/// `modelfs stats`: the mount's statistics file, as a table or as is.
pub fn stats(mountpoint: Option<&Path>, model: Option<&str>, as_json: bool) -> Result<ExitCode> {
    let Some(mnt) = mountpoint else {
        bail!("no mount point: give one, or set `mountpoint` in the configuration file");
    };
    if !is_modelfs_mount(mnt) {
        eprintln!("modelfs: {}: no modelfs mount there", mnt.display());
        return Ok(ExitCode::from(3));
    }
    let path = mnt.join(STATS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    if let Some(name) = model {
        let models = v["models"].as_array().cloned().unwrap_or_default();
        let Some(line) = models.into_iter().find(|m| m["name"] == name) else {
            bail!("the mount at {} has no model {name:?}", mnt.display());
        };
        v["models"] = serde_json::Value::Array(vec![line]);
    }
    output::mount_stats(mnt, &v, as_json)?;
    Ok(ExitCode::SUCCESS)
}

/// `modelfs status`: the mount's own statistics plus the store's usage; exit
/// 3 if nothing is mounted.
pub fn status(store: &Path, mountpoint: Option<&Path>, as_json: bool) -> Result<ExitCode> {
    let mounted = mountpoint.filter(|m| is_modelfs_mount(m));
    let stats: Option<serde_json::Value> = mounted.and_then(|m| {
        let text = std::fs::read_to_string(m.join(STATS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    });
    // A mounted store is the one the daemon serves, whatever --store says.
    let served = stats
        .as_ref()
        .and_then(|s| s.get("store")?.as_str().map(PathBuf::from));
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
