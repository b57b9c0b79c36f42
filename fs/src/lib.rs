//! The modelfs filesystem: model files from a store, presented read-only at
//! a mount point for unmodified loaders.
//!
//! Why it is split the way it is: [`vfs`] holds all the logic (the tree of
//! models, how a file is opened, how copy-mode bytes are read and checked)
//! and can be tested without a kernel mount; [`fuse`] is a thin adapter that
//! translates fuser requests into `vfs` calls; [`mount`](mod@mount) owns the
//! session's life (checks, signals, catalog watching, post-mount tuning);
//! [`share_server`] answers layout requests so processes can map shared
//! tensors from the store's objects (docs/store-format.md §11).
//!
//! Serving follows ../shared/design-notes.md: identical content is one
//! inode (page cache shared by every path and process), every open keeps the
//! cache, whole-file objects go through kernel passthrough when allowed, and
//! recipe files are served from memory-mapped objects with per-chunk checks.

pub mod fuse;
pub mod handles;
pub mod mount;
mod open_content;
pub mod pin;
mod prefetch;
pub mod share_server;
pub mod stats;
pub mod tree;
pub mod vfs;

pub use mount::{
    check_mountpoint, lazy_unmount, modelfs_mounts, mount, mount_entry, Hooks, MountConfig,
    MountError, NoHooks, Passthrough,
};
pub use stats::{ModelStats, MountStats, ServingMode};
pub use vfs::{Vfs, VfsConfig};
