//! The client side: find the socket of the mount a descriptor belongs to
//! and fetch the whole layout of its file.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use crate::transport;
use crate::wire::{Reply, Request, Run, FLAG_PASSTHROUGH};

/// The layout of one open file: its runs and the objects they are in.
pub struct Layout {
    /// Bytes of the file.
    pub file_size: u64,
    /// The file is served by passthrough from its whole-file object.
    pub passthrough: bool,
    /// The objects (read-only descriptors holding the store's shared lock)
    /// and their lengths.
    pub objects: Vec<(OwnedFd, u64)>,
    /// Runs over the whole file, `object` indexing `objects`.
    pub runs: Vec<Run>,
}

impl Layout {
    /// The objects' lengths, in index order.
    pub fn object_lens(&self) -> Vec<u64> {
        self.objects.iter().map(|(_, len)| *len).collect()
    }
}

/// Why no layout was had.
#[derive(Debug)]
pub enum LayoutError {
    /// No mount's socket for this device in any runtime directory: the file
    /// is not on a modelfs mount that serves layouts.
    NoSocket,
    /// The daemon refused, with this errno.
    Refused(i32),
    /// Talking to the daemon failed, or it broke the protocol.
    Io(io::Error),
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutError::NoSocket => write!(f, "no modelfs layout socket for this file's device"),
            LayoutError::Refused(e) => write!(
                f,
                "the mount refused the layout: {}",
                io::Error::from_raw_os_error(*e)
            ),
            LayoutError::Io(e) => write!(f, "layout request failed: {e}"),
        }
    }
}

impl std::error::Error for LayoutError {}

impl From<io::Error> for LayoutError {
    fn from(e: io::Error) -> Self {
        LayoutError::Io(e)
    }
}

/// The socket file name of the mount whose files have device `dev`.
pub fn socket_name(dev: u64) -> String {
    format!(
        "share-{}-{}.sock",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    )
}

/// Runtime directories in the order §11 says clients try them.
pub fn runtime_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("MODELFS_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("/run/modelfs"));
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d).join("modelfs"));
    }
    dirs.push(PathBuf::from(format!(
        "/tmp/modelfs-{}",
        rustix::process::getuid().as_raw()
    )));
    dirs
}

/// The runtime directory a mount run by this process puts its socket in
/// (§11): `$MODELFS_RUNTIME_DIR`, else `/run/modelfs` for root, else
/// `$XDG_RUNTIME_DIR/modelfs`, else `/tmp/modelfs-<uid>`.
pub fn server_runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MODELFS_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let uid = rustix::process::geteuid().as_raw();
    if uid == 0 {
        return PathBuf::from("/run/modelfs");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("modelfs");
    }
    PathBuf::from(format!("/tmp/modelfs-{uid}"))
}

fn connect_for(dev: u64) -> Result<OwnedFd, LayoutError> {
    let name = socket_name(dev);
    for dir in runtime_dirs() {
        match transport::connect(&dir.join(&name)) {
            Ok(sock) => return Ok(sock),
            // A socket file left by a mount that is gone refuses
            // connections; a later directory may hold the live one.
            Err(_) => continue,
        }
    }
    Err(LayoutError::NoSocket)
}

/// Fetch the whole layout of the open file `fd` from the mount it is on.
pub fn request_layout(fd: BorrowedFd<'_>) -> Result<Layout, LayoutError> {
    let stat = rustix::fs::fstat(fd).map_err(io::Error::from)?;
    let sock = connect_for(stat.st_dev)?;
    let mut layout = Layout {
        file_size: 0,
        passthrough: false,
        objects: Vec::new(),
        runs: Vec::new(),
    };
    let mut from = 0u64;
    loop {
        transport::send(sock.as_fd(), &Request { from }.encode(), &[fd])?;
        let Some((bytes, fds)) = transport::recv_reply(sock.as_fd())? else {
            return Err(io::Error::other("the mount closed the connection").into());
        };
        let reply = Reply::decode(&bytes, from)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if reply.status != 0 {
            return Err(LayoutError::Refused(reply.status));
        }
        if fds.len() != reply.object_lens.len() {
            return Err(io::Error::other("descriptor count does not match the objects").into());
        }
        let base = layout.objects.len() as u32;
        layout.file_size = reply.file_size;
        layout.passthrough = reply.flags & FLAG_PASSTHROUGH != 0;
        layout
            .objects
            .extend(fds.into_iter().zip(reply.object_lens.iter().copied()));
        layout.runs.extend(reply.runs.iter().map(|r| Run {
            object: r.object + base,
            ..*r
        }));
        if reply.end >= reply.file_size {
            return Ok(layout);
        }
        if reply.end <= from {
            return Err(io::Error::other("the mount's layout made no progress").into());
        }
        from = reply.end;
    }
}
