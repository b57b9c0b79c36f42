//! The FUSE adapter: translates fuser requests into calls on [`Vfs`] and
//! [`Handles`] and their answers into replies. No filesystem logic lives
//! here: what is decided is decided in the core, which is tested without a
//! kernel mount.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyPoll,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{info, warn};

use crate::handles::{Handles, Opened};
use crate::vfs::{Attr, Vfs};

/// Files never change once published, so the kernel may cache names and
/// attributes for long; removals are pushed to it by invalidation.
const TTL: Duration = Duration::from_secs(3600);

/// The longest name (one path component, in bytes) the mount accepts; what
/// statfs reports as `f_namelen`.
const NAME_MAX: usize = 255;

/// ENAMETOOLONG for a component longer than [`NAME_MAX`]. The kernel passes
/// FUSE names of up to 1024 bytes, so a longer name has to be refused here,
/// and before any other check: POSIX (and pjdfstest) want ENAMETOOLONG, not
/// the ENOENT or EROFS the name would otherwise get.
fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        Err(Errno::ENAMETOOLONG)
    } else {
        Ok(())
    }
}

/// [`check_name`] for every name of a call, then `otherwise` (what a
/// read-only mount answers a valid name).
fn refuse(names: &[&OsStr], otherwise: Errno) -> Errno {
    names
        .iter()
        .try_for_each(|n| check_name(n))
        .err()
        .unwrap_or(otherwise)
}

pub(crate) struct FuseFs {
    vfs: Arc<Vfs>,
    uid: u32,
    gid: u32,
    handles: Handles<BackingId>,
}

impl FuseFs {
    pub(crate) fn new(vfs: Arc<Vfs>) -> FuseFs {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseFs {
            vfs,
            uid,
            gid,
            handles: Handles::default(),
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
            kind: kind(a),
            perm: a.perm,
            nlink: a.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }
}

fn kind(a: &Attr) -> FileType {
    if a.is_dir {
        FileType::Directory
    } else {
        FileType::RegularFile
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
        if let Err(e) = check_name(name) {
            return reply.error(e);
        }
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
        let opened = self
            .handles
            .open(&self.vfs, ino.0, |file| reply.open_backing(file));
        match opened {
            Ok((fh, Opened::Passthrough)) => {
                // KEEP_CACHE is not allowed with passthrough (the kernel
                // fails the open with EIO); the pages are the backing
                // object's, shared anyway.
                let replied = self.handles.with_backing(ino.0, |id| {
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, id)
                });
                if replied.is_none() {
                    // Released in between (cannot happen for an open the
                    // kernel has not seen yet); never leave the kernel waiting.
                    warn!(ino = ino.0, "backing file vanished during open");
                }
            }
            Ok((fh, Opened::Copy)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            // Fresh content on every open, whatever the size in getattr.
            Ok((fh, Opened::Generated)) => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(errno(e)),
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
        match self.handles.read(&self.vfs, fh.0, offset, size) {
            Ok(out) => reply.data(out.as_slice()),
            Err(e) => reply.error(errno(e)),
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
        self.handles.release(&self.vfs, fh.0);
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
        let Some(entries) = self.vfs.dir_entries(ino.0, offset) else {
            return reply.error(Errno::ENOENT);
        };
        for e in entries {
            if reply.add(INodeNo(e.attr.ino), e.next_offset, kind(&e.attr), &e.name) {
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
        let Some(entries) = self.vfs.dir_entries(ino.0, offset) else {
            return reply.error(Errno::ENOENT);
        };
        for e in entries {
            let attr = self.file_attr(&e.attr);
            let ino = INodeNo(e.attr.ino);
            if reply.add(ino, e.next_offset, &e.name, &TTL, &attr, Generation(0)) {
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
        reply.statfs(blocks, bfree, bfree, files, 0, 4096, NAME_MAX as u32, 4096);
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

    // Files are always readable and never change: ENOSYS makes the kernel
    // stop asking and answer every poll "ready" itself, which io_uring and
    // event-loop readers then get without a daemon round trip (or the
    // default implementation's warning per call).
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
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
        n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(refuse(&[n], Errno::EROFS));
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(refuse(&[n], Errno::EROFS));
    }

    fn unlink(&self, _r: &Request, _p: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        reply.error(refuse(&[n], Errno::EROFS));
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        reply.error(refuse(&[n], Errno::EROFS));
    }

    fn symlink(&self, _r: &Request, _p: INodeNo, n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(refuse(&[n], Errno::EROFS));
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        n: &OsStr,
        _np: INodeNo,
        nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(refuse(&[n, nn], Errno::EROFS));
    }

    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, nn: &OsStr, reply: ReplyEntry) {
        reply.error(refuse(&[nn], Errno::EROFS));
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
        n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(refuse(&[n], Errno::EROFS));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_over_name_max_are_too_long_before_anything_else() {
        let ok = OsStr::new("a").to_owned();
        let max: std::ffi::OsString = "a".repeat(NAME_MAX).into();
        let long: std::ffi::OsString = "a".repeat(NAME_MAX + 1).into();
        assert_eq!(check_name(&max), Ok(()));
        assert_eq!(check_name(&long), Err(Errno::ENAMETOOLONG));
        assert_eq!(refuse(&[&max], Errno::EROFS), Errno::EROFS);
        assert_eq!(refuse(&[&long], Errno::EROFS), Errno::ENAMETOOLONG);
        // Either name of a rename.
        assert_eq!(refuse(&[&ok, &long], Errno::EROFS), Errno::ENAMETOOLONG);
        assert_eq!(refuse(&[&long, &ok], Errno::EROFS), Errno::ENAMETOOLONG);
    }

    #[test]
    fn name_max_counts_bytes_not_characters() {
        // 128 two-byte characters: 256 bytes.
        let wide: std::ffi::OsString = "\u{e9}".repeat(128).into();
        assert_eq!(check_name(&wide), Err(Errno::ENAMETOOLONG));
    }
}
