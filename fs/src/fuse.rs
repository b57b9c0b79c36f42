//! The FUSE adapter: translates fuser requests into calls on [`Vfs`] and
//! holds the per-open state the kernel protocol needs (file handles and
//! passthrough backing ids). No filesystem logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use modelfs_store::locks;
use tracing::{info, warn};

use crate::vfs::{Attr, OpenContent, OpenPlan, Vfs};

/// Files never change once published, so the kernel may cache names and
/// attributes for long; removals are pushed to it by invalidation.
const TTL: Duration = Duration::from_secs(3600);

enum Handle {
    Copy(Arc<OpenContent>),
    Passthrough(u64),
    Generated(Vec<u8>),
}

/// A passthrough backing file shared by all opens of one inode.
struct Backing {
    id: BackingId,
    _file: File,
    opens: usize,
}

pub struct FuseFs {
    vfs: Arc<Vfs>,
    uid: u32,
    gid: u32,
    /// Read on every request, written on open/release: a reader-writer lock.
    handles: RwLock<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    backings: Mutex<HashMap<u64, Backing>>,
}

impl FuseFs {
    pub fn new(vfs: Arc<Vfs>) -> FuseFs {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseFs {
            vfs,
            uid,
            gid,
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            backings: Mutex::new(HashMap::new()),
        }
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind: if a.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: a.perm,
            nlink: a.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.write().expect("handles").insert(fh, h);
        fh
    }

    /// Register (or reuse) the passthrough backing file of `ino`.
    fn open_passthrough(&self, ino: u64, object: &Path, reply: &ReplyOpen) -> io::Result<()> {
        let mut backings = self.backings.lock().expect("backings");
        if let Some(b) = backings.get_mut(&ino) {
            b.opens += 1;
            return Ok(());
        }
        let file = File::open(object)?;
        // Keep gc from punching holes while the kernel reads this object.
        locks::share_object(&file)?;
        let id = reply.open_backing(&file)?;
        backings.insert(
            ino,
            Backing {
                id,
                _file: file,
                opens: 1,
            },
        );
        Ok(())
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if self.vfs.passthrough_enabled() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                warn!("the kernel does not offer FUSE passthrough; falling back to copy mode");
                self.vfs.disable_passthrough();
            }
        }
        // Directory listings carry attributes, so `ls -l` and tree walks
        // need no LOOKUP round trip per entry.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // Several requests in flight (we run several worker threads).
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // The kernel caps its offer at 128 KiB; the mount raises the bdi's
        // read_ahead_kb after mounting instead (see mount.rs).
        let _ = config.set_max_readahead(1 << 20);
        self.vfs.log_mode();
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match name.to_str().and_then(|n| self.vfs.lookup(parent.0, n)) {
            Some(a) => reply.entry(&TTL, &self.file_attr(&a), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let tree = self.vfs.tree();
        match self.vfs.attr(&tree, ino.0) {
            Some(a) => reply.attr(&TTL, &self.file_attr(&a)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let plan = match self.vfs.open(ino.0) {
            Ok(p) => p,
            Err(e) => return reply.error(errno(e)),
        };
        match plan {
            OpenPlan::Passthrough { object, content_id } => {
                match self.open_passthrough(ino.0, &object, &reply) {
                    Ok(()) => {
                        let fh = self.add_handle(Handle::Passthrough(ino.0));
                        self.vfs
                            .stats
                            .passthrough_opens
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(f) = self.vfs.tree().files.get(&ino.0) {
                            self.vfs
                                .stats
                                .passthrough_opened_bytes
                                .fetch_add(f.content.size, Ordering::Relaxed);
                        }
                        let backings = self.backings.lock().expect("backings");
                        let b = &backings[&ino.0];
                        // KEEP_CACHE is not allowed with passthrough (the kernel
                        // fails the open with EIO); the pages are the backing
                        // object's, shared anyway.
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &b.id);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Removed and collected since the tree was built, or
                        // (content still listed) a lost object.
                        if self.vfs.content_live(content_id) {
                            reply.error(Errno::EIO);
                        } else {
                            reply.error(Errno::ENOENT);
                        }
                    }
                    Err(e) => {
                        // Without CAP_SYS_ADMIN the kernel refuses backing
                        // files: serve this and every later open in copy mode.
                        warn!(
                            content_id,
                            "passthrough open failed ({e}); switching to copy mode"
                        );
                        self.vfs.disable_passthrough();
                        match self.vfs.open(ino.0) {
                            Ok(OpenPlan::Copy(c)) => {
                                let fh = self.add_handle(Handle::Copy(c));
                                self.vfs.stats.copy_opens.fetch_add(1, Ordering::Relaxed);
                                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                            }
                            Ok(_) => reply.error(Errno::EIO),
                            Err(e) => reply.error(errno(e)),
                        }
                    }
                }
            }
            OpenPlan::Copy(c) => {
                let fh = self.add_handle(Handle::Copy(c));
                self.vfs.stats.copy_opens.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            OpenPlan::Generated(bytes) => {
                let fh = self.add_handle(Handle::Generated(bytes));
                // Fresh content on every open, whatever the size in getattr.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let handle = {
            let handles = self.handles.read().expect("handles");
            match handles.get(&fh.0) {
                Some(Handle::Copy(c)) => Ok(c.clone()),
                Some(Handle::Generated(bytes)) => {
                    let start = (offset as usize).min(bytes.len());
                    let end = (start + size as usize).min(bytes.len());
                    Err(Some(bytes[start..end].to_vec()))
                }
                // The kernel reads passthrough files itself.
                Some(Handle::Passthrough(_)) | None => Err(None),
            }
        };
        match handle {
            Ok(open) => {
                let started = std::time::Instant::now();
                match self.vfs.read(&open, offset, size) {
                    Ok(out) => reply.data(out.as_slice()),
                    Err(e) => reply.error(errno(e)),
                }
                self.vfs
                    .stats
                    .record_read_latency(started.elapsed().as_micros() as u64);
            }
            Err(Some(bytes)) => reply.data(&bytes),
            Err(None) => reply.error(Errno::EBADF),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let removed = self.handles.write().expect("handles").remove(&fh.0);
        if let Some(Handle::Copy(open)) = &removed {
            self.vfs.release(open);
        }
        if let Some(Handle::Passthrough(ino)) = removed {
            let mut backings = self.backings.lock().expect("backings");
            if let Some(b) = backings.get_mut(&ino) {
                b.opens -= 1;
                if b.opens == 0 {
                    backings.remove(&ino);
                }
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.vfs.readdir(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (child, is_dir, name)) in entries.iter().enumerate().skip(offset as usize) {
            let kind = if *is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // Loaders probe for a terminal (TCGETS); these are plain files.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.vfs.readdir(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let tree = self.vfs.tree();
        for (i, (child, _, name)) in entries.iter().enumerate().skip(offset as usize) {
            // Gone in a refresh between the two snapshots: leave it out.
            let Some(attr) = self.vfs.attr(&tree, *child) else {
                continue;
            };
            let attr = self.file_attr(&attr);
            if reply.add(
                INodeNo(*child),
                (i + 1) as u64,
                name,
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let tree = self.vfs.tree();
        let files = (tree.files.len() + tree.dirs.len()) as u64;
        let (blocks, bfree) = match nix_statvfs(self.vfs.store_root()) {
            Some((b, f)) => (b, f),
            None => (0, 0),
        };
        reply.statfs(blocks, bfree, bfree, files, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    // No extended attributes. ENOSYS (not ENODATA) makes the kernel stop
    // asking: `ls -l` otherwise costs two daemon round trips per file.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // Every modifying call: the mount is read-only (the kernel already
    // refuses most of them for an `ro` mount; these are the backstop).
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _r: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _d: &[u8],
        _wf: WriteFlags,
        _f: OpenFlags,
        _l: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _r: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn destroy(&mut self) {
        self.vfs.save_all_traces();
        info!("filesystem unmounted");
    }
}

/// (total blocks, free blocks) of the store's filesystem, in 4 KiB units.
fn nix_statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is valid; statvfs writes into it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, s a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let scale = s.f_frsize / 4096;
    Some((s.f_blocks * scale.max(1), s.f_bavail * scale.max(1)))
}
