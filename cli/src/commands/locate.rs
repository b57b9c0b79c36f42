//! Which mount a command about a running mount talks to.
//!
//! Why: `status`, `stats` and `warm` are about the mount of the store, and
//! the kernel already knows where that is (/proc/self/mountinfo lists every
//! modelfs mount with the store it serves). A mount point given on the
//! command line or in the configuration must be a modelfs mount: warming
//! from the store when the user named a directory that is not mounted would
//! quietly do something else than asked.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The store's mounts, by the kernel's mount table.
fn mounts_of(store: &Path) -> Vec<PathBuf> {
    let want = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    modelfs_fs::modelfs_mounts()
        .into_iter()
        .filter(|(_, s)| std::fs::canonicalize(s).unwrap_or_else(|_| s.clone()) == want)
        .map(|(m, _)| m)
        .collect()
}

/// Is a modelfs mount at `mountpoint`?
pub fn is_modelfs_mount(mountpoint: &Path) -> bool {
    modelfs_fs::mount_entry(mountpoint).is_some_and(|(_, fstype)| fstype == "fuse.modelfs")
}

/// The mount point to use: the one named (which must be a modelfs mount),
/// else the store's own mount found in the mount table. None if the store
/// is not mounted.
pub fn mount_point(store: &Path, named: Option<PathBuf>) -> Result<Option<PathBuf>> {
    if let Some(m) = named {
        if is_modelfs_mount(&m) {
            return Ok(Some(m));
        }
        let hint = match mounts_of(store).first() {
            Some(f) => format!(
                "; the store {} is mounted at {}",
                store.display(),
                f.display()
            ),
            None => format!("; the store {} is not mounted", store.display()),
        };
        bail!("{} is not a modelfs mount{hint}", m.display());
    }
    Ok(mounts_of(store).into_iter().next())
}

/// "the store S is not mounted", and which stores are, so that a user whose
/// store differs from the mounted one (`sudo modelfs mount` serves root's
/// store) sees why.
pub fn not_mounted_message(store: &Path) -> String {
    let others: Vec<String> = modelfs_fs::modelfs_mounts()
        .iter()
        .map(|(m, s)| format!("{} (store {})", m.display(), s.display()))
        .collect();
    if others.is_empty() {
        format!("the store {} is not mounted", store.display())
    } else {
        format!(
            "the store {} is not mounted; modelfs mounts here: {} (pass --store to pick one)",
            store.display(),
            others.join(", ")
        )
    }
}
