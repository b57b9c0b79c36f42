//! Open file handles, and the passthrough backing files behind them.
//!
//! The kernel protocol needs a handle per open and, for passthrough, one
//! registered backing file per inode that lives while any open of that inode
//! does. Both are bookkeeping with rules worth testing without a kernel: a
//! backing is registered once per inode however many opens share it, dropped
//! with the last one, and a kernel that refuses backing files turns
//! passthrough off for the rest of the mount and serves this open in copy
//! mode instead. The type of a backing registration is a parameter, so the
//! FUSE adapter plugs in fuser's `BackingId` and tests plug in a fake.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use modelfs_store::MappedObject;
use tracing::warn;

use crate::open_content::OpenContent;
use crate::vfs::{OpenPlan, ReadOut, Vfs};

enum Handle {
    Copy(Arc<OpenContent>),
    Passthrough(u64),
    Generated(Arc<[u8]>),
}

/// A passthrough backing file shared by all opens of one inode. The mapped
/// object holds the shared lock that keeps gc away while the kernel reads it.
struct Backing<B> {
    registration: B,
    _object: Arc<MappedObject>,
    opens: usize,
}

/// How an open was served, for the adapter's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Kernel passthrough: reply with the inode's backing registration.
    Passthrough,
    /// Copy mode: the daemon serves reads; the page cache is kept.
    Copy,
    /// A generated file: served fresh on every open (direct I/O).
    Generated,
}

/// What a read of a handle returns.
pub enum ReadReply {
    /// Bytes of a stored file, from [`Vfs::read`].
    Data(ReadOut),
    /// Bytes `start..end` of a generated file's contents, taken at open.
    Generated(Arc<[u8]>, usize, usize),
}

impl ReadReply {
    /// The bytes to reply with; shorter than asked for only at end of file.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReadReply::Data(out) => out.as_slice(),
            ReadReply::Generated(bytes, a, b) => &bytes[*a..*b],
        }
    }
}

/// The table of open handles and backing registrations of one mount.
pub struct Handles<B> {
    /// Read on every request, written on open/release: a reader-writer lock.
    table: RwLock<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    backings: Mutex<HashMap<u64, Backing<B>>>,
}

impl<B> Default for Handles<B> {
    fn default() -> Self {
        Handles {
            table: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            backings: Mutex::new(HashMap::new()),
        }
    }
}

impl<B> Handles<B> {
    fn add(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.table.write().expect("handles").insert(fh, h);
        fh
    }

    /// Open `ino` read-only. `register` hands an object file to the kernel
    /// as a backing file (called at most once per inode while it has opens).
    /// Errors are errno values.
    pub fn open(
        &self,
        vfs: &Vfs,
        ino: u64,
        register: impl FnOnce(&std::fs::File) -> io::Result<B>,
    ) -> Result<(u64, Opened), i32> {
        match vfs.open(ino)? {
            OpenPlan::Passthrough(object) => self.open_passthrough(vfs, ino, object, register),
            OpenPlan::Copy(c) => Ok((self.add_copy(vfs, c), Opened::Copy)),
            OpenPlan::Generated(bytes) => {
                Ok((self.add(Handle::Generated(bytes.into())), Opened::Generated))
            }
        }
    }

    /// Serve an open by passthrough to `object`, or, if the kernel refuses
    /// the backing file, in copy mode from now on.
    fn open_passthrough(
        &self,
        vfs: &Vfs,
        ino: u64,
        object: Arc<MappedObject>,
        register: impl FnOnce(&std::fs::File) -> io::Result<B>,
    ) -> Result<(u64, Opened), i32> {
        // The whole-file object's length is the file's size (checked before
        // passthrough was chosen).
        let size = object.len();
        match self.attach_backing(ino, object, register) {
            Ok(()) => {
                let fh = self.add(Handle::Passthrough(ino));
                vfs.count_passthrough_open(size);
                Ok((fh, Opened::Passthrough))
            }
            Err(e) => {
                // Without CAP_SYS_ADMIN the kernel refuses backing files:
                // serve this and every later open in copy mode.
                warn!(ino, "passthrough open failed ({e}); switching to copy mode");
                vfs.disable_passthrough();
                match vfs.open(ino)? {
                    OpenPlan::Copy(c) => Ok((self.add_copy(vfs, c), Opened::Copy)),
                    _ => Err(libc::EIO),
                }
            }
        }
    }

    fn add_copy(&self, vfs: &Vfs, open: Arc<OpenContent>) -> u64 {
        vfs.stats.copy_opens.fetch_add(1, Ordering::Relaxed);
        self.add(Handle::Copy(open))
    }

    /// Register (or reuse) the backing file of `ino`.
    fn attach_backing(
        &self,
        ino: u64,
        object: Arc<MappedObject>,
        register: impl FnOnce(&std::fs::File) -> io::Result<B>,
    ) -> io::Result<()> {
        let mut backings = self.backings.lock().expect("backings");
        if let Some(b) = backings.get_mut(&ino) {
            b.opens += 1;
            return Ok(());
        }
        let registration = register(object.file())?;
        backings.insert(
            ino,
            Backing {
                registration,
                _object: object,
                opens: 1,
            },
        );
        Ok(())
    }

    /// Call `f` with the backing registration of `ino` (for the open reply).
    pub fn with_backing<T>(&self, ino: u64, f: impl FnOnce(&B) -> T) -> Option<T> {
        let backings = self.backings.lock().expect("backings");
        backings.get(&ino).map(|b| f(&b.registration))
    }

    /// Number of inodes with a registered backing file now.
    pub fn backings(&self) -> usize {
        self.backings.lock().expect("backings").len()
    }

    /// Read from handle `fh`. EBADF for an unknown handle or a passthrough
    /// one (the kernel reads those itself).
    pub fn read(&self, vfs: &Vfs, fh: u64, offset: u64, size: u32) -> Result<ReadReply, i32> {
        let open = {
            let table = self.table.read().expect("handles");
            match table.get(&fh) {
                Some(Handle::Copy(c)) => c.clone(),
                Some(Handle::Generated(bytes)) => {
                    let start = (offset as usize).min(bytes.len());
                    let end = start.saturating_add(size as usize).min(bytes.len());
                    return Ok(ReadReply::Generated(bytes.clone(), start, end));
                }
                Some(Handle::Passthrough(_)) | None => return Err(libc::EBADF),
            }
        };
        let started = std::time::Instant::now();
        let out = vfs.read(&open, offset, size);
        vfs.stats
            .record_read_latency(started.elapsed().as_micros() as u64);
        out.map(ReadReply::Data)
    }

    /// Close handle `fh`: the last copy-mode handle of a content saves its
    /// load trace, the last passthrough handle of an inode drops its backing.
    pub fn release(&self, vfs: &Vfs, fh: u64) {
        let removed = self.table.write().expect("handles").remove(&fh);
        match removed {
            Some(Handle::Copy(open)) => vfs.release(&open),
            Some(Handle::Passthrough(ino)) => {
                let mut backings = self.backings.lock().expect("backings");
                if let Some(b) = backings.get_mut(&ino) {
                    b.opens -= 1;
                    if b.opens == 0 {
                        backings.remove(&ino);
                    }
                }
            }
            Some(Handle::Generated(_)) | None => {}
        }
    }
}
