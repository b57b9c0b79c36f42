//! The layout protocol of docs/store-format.md §11, both ends.
//!
//! Why it exists: the kernel shares page-cache pages only within one file,
//! so two fine-tunes that share most of their tensors share pages only if
//! each process maps the store's objects itself. A mount answers "where do
//! the bytes of this open file lie, and here are the objects" over a Unix
//! socket; the preload library (`preload/`) and the Python hook build their
//! mappings from the answer. This crate holds what both ends must agree on
//! (the wire format, [`wire`]), the client (`client`), and which pages of a
//! mapping may come from an object ([`plan`]), so that the daemon, the
//! preload library and tests share one implementation. It depends on
//! nothing but rustix, because the preload library is loaded into every
//! process that asks for sharing.

pub mod client;
pub mod plan;
pub mod transport;
pub mod wire;

pub use client::{
    request_layout, runtime_dirs, server_runtime_dir, socket_name, Layout, LayoutError,
};
pub use plan::{plan_pieces, Piece};
pub use wire::{Reply, Request, Run, MAGIC, MAX_OBJECTS, MAX_RUNS};

/// The page size the congruence rule is stated in (§11).
pub const PAGE: u64 = 4096;
