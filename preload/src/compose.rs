//! Building a mapping of a modelfs file from the store's objects.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{c_int, off_t, size_t};
use modelfs_share::{plan_pieces, request_layout, Piece};

use crate::regions::{self, Region};

/// `f_type` of every FUSE filesystem.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// Below this a layout round trip costs more than the pages could save.
const MIN_SHARED_LEN: usize = 64 << 10;
const MAP_TYPE: c_int = 0x0f;

fn raw_mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: the mmap syscall itself: it validates every argument, and a
    // MAP_FIXED caller (us included) owns the range it replaces.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) as *mut c_void }
}

fn raw_munmap(addr: *mut c_void, len: size_t) {
    // SAFETY: only ever called on a range this module just mapped.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
}

fn errno() -> c_int {
    // SAFETY: errno is thread local and always valid to read.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as above, for writing.
    unsafe { *libc::__errno_location() = e };
}

fn enabled() -> bool {
    // SAFETY: getenv with a NUL-terminated name; the value is only read.
    let v = unsafe { libc::getenv(c"MODELFS_SHARE".as_ptr()) };
    // SAFETY: getenv returned a NUL-terminated string or NULL.
    v.is_null() || unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes() != b"0"
}

fn debug(msg: impl FnOnce() -> String) {
    // SAFETY: as in `enabled`.
    let v = unsafe { libc::getenv(c"MODELFS_SHARE_DEBUG".as_ptr()) };
    if v.is_null() {
        return;
    }
    let line = format!("modelfs-share: {}\n", msg());
    // SAFETY: writing our own buffer to stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// Whether `fd` is a regular file on a FUSE filesystem: the only files a
/// modelfs mount could answer for. Two cheap syscalls; everything else is
/// left alone without ever touching a socket.
fn on_fuse(fd: c_int) -> bool {
    // SAFETY: zeroed stat buffers are valid; the calls fill them.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a caller's descriptor into our buffer.
    if unsafe { libc::fstatfs(fd, &mut sfs) } != 0 || sfs.f_type as i64 != FUSE_SUPER_MAGIC {
        return false;
    }
    // SAFETY: as above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a caller's descriptor into our buffer.
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG }
}

/// The interposed mmap.
///
/// # Safety
/// The contract of `mmap(2)`.
pub unsafe fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    let map_type = flags & MAP_TYPE;
    let shared = map_type == libc::MAP_SHARED || map_type == libc::MAP_SHARED_VALIDATE;
    if flags & (libc::MAP_ANONYMOUS | libc::MAP_HUGETLB) != 0
        || fd < 0
        || len < MIN_SHARED_LEN
        || (shared && prot & libc::PROT_WRITE != 0)
        || !enabled()
        || !on_fuse(fd)
    {
        return raw_mmap(addr, len, prot, flags, fd, offset);
    }
    let saved_errno = errno();
    // A panic must not unwind into C; any failure means "not shared".
    let composed =
        std::panic::catch_unwind(|| compose(addr, len, prot, flags, fd, offset)).unwrap_or(None);
    match composed {
        Some(p) => {
            set_errno(saved_errno);
            p
        }
        None => {
            set_errno(saved_errno);
            raw_mmap(addr, len, prot, flags, fd, offset)
        }
    }
}

/// Map the file, then each object piece over it. None: nothing could be
/// shared (the caller maps the file plainly); Some(MAP_FAILED) is a
/// failure of the file mapping itself, with errno set by the kernel.
fn compose(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> Option<*mut c_void> {
    if offset < 0 {
        return None;
    }
    // SAFETY: the caller's descriptor, valid for the duration of the call.
    let file = unsafe { BorrowedFd::borrow_raw(fd) };
    let layout = match request_layout(file) {
        Ok(l) => l,
        Err(e) => {
            debug(|| format!("fd {fd}: not shared: {e}"));
            return None;
        }
    };
    let pieces = plan_pieces(
        &layout.runs,
        &layout.object_lens(),
        layout.file_size,
        offset as u64,
        len as u64,
    );
    if pieces.is_empty() {
        debug(|| format!("fd {fd}: no page of [{offset}, +{len}) is congruent with an object"));
        return None;
    }
    let base = raw_mmap(addr, len, prot, flags, fd, offset);
    if base == libc::MAP_FAILED {
        return Some(base);
    }
    let object_type = if flags & MAP_TYPE == libc::MAP_PRIVATE {
        libc::MAP_PRIVATE
    } else {
        libc::MAP_SHARED
    };
    let inherit = flags & (libc::MAP_NORESERVE | libc::MAP_POPULATE | libc::MAP_LOCKED);
    let mut shared_bytes = 0u64;
    for p in &pieces {
        if !map_piece(
            base,
            p,
            prot,
            object_type | inherit,
            &layout,
            flags,
            fd,
            offset,
        ) {
            raw_munmap(base, len);
            return Some(libc::MAP_FAILED);
        }
        shared_bytes += p.len;
    }
    quiet_gaps(base, len, &pieces);
    // SAFETY: dup of the caller's descriptor; the table owns the copy.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup >= 0
        && !regions::remember(Region {
            start: base as usize,
            len,
            fd: dup,
            offset,
            prot,
            flags,
        })
    {
        // SAFETY: our own duplicate, unused.
        unsafe { libc::close(dup) };
    }
    debug(|| {
        format!(
            "fd {fd}: mapped {shared_bytes} of {len} bytes from {} objects ({} pieces)",
            layout.objects.len(),
            pieces.len()
        )
    });
    // The objects' descriptors close here; the mappings keep the files
    // (and the store's shared lock on them) for as long as they exist.
    Some(base)
}

/// Gaps up to this size get no readahead (see [`quiet_gaps`]); larger ones
/// are read like any mapping, where readahead pays.
const QUIET_GAP_MAX: u64 = 2 << 20;

/// Pages left mapped from the file (the header, pages at run edges) would
/// each fault in the kernel's whole mmap read-around of the mount file
/// (megabytes with the mount's readahead), filling the FUSE file's page
/// cache with copies of bytes this mapping takes from the objects. Small
/// gaps are told to read only what they fault.
fn quiet_gaps(base: *mut c_void, len: size_t, pieces: &[Piece]) {
    let mut spans: Vec<(u64, u64)> = pieces.iter().map(|p| (p.map_offset, p.len)).collect();
    spans.sort_unstable();
    let mut at = 0u64;
    let end = (len as u64).div_ceil(4096) * 4096;
    for (offset, piece_len) in spans.into_iter().chain(std::iter::once((end, 0))) {
        if offset > at && offset - at <= QUIET_GAP_MAX {
            // SAFETY: a page-aligned range inside the mapping just made; the
            // advice changes only readahead, never contents.
            unsafe {
                libc::madvise(
                    (base as usize + at as usize) as *mut c_void,
                    (offset - at) as size_t,
                    libc::MADV_RANDOM,
                )
            };
        }
        at = at.max(offset + piece_len);
    }
}

/// Replace one piece of the file mapping by the object's pages. If the
/// kernel refuses, put the file's pages back (MAP_FIXED may already have
/// removed them); false only if even that fails.
#[allow(clippy::too_many_arguments)]
fn map_piece(
    base: *mut c_void,
    p: &Piece,
    prot: c_int,
    object_flags: c_int,
    layout: &modelfs_share::Layout,
    file_flags: c_int,
    fd: c_int,
    offset: off_t,
) -> bool {
    let at = (base as usize + p.map_offset as usize) as *mut c_void;
    let object_fd = layout.objects[p.object as usize].0.as_raw_fd();
    let got = raw_mmap(
        at,
        p.len as size_t,
        prot,
        object_flags | libc::MAP_FIXED,
        object_fd,
        p.object_offset as off_t,
    );
    if got != libc::MAP_FAILED {
        return true;
    }
    let again = raw_mmap(
        at,
        p.len as size_t,
        prot,
        (file_flags & !libc::MAP_FIXED_NOREPLACE) | libc::MAP_FIXED,
        fd,
        offset + p.map_offset as off_t,
    );
    again != libc::MAP_FAILED
}

/// The interposed mremap: composed mappings are rebuilt, everything else
/// goes to the kernel.
///
/// # Safety
/// The contract of `mremap(2)`.
pub unsafe fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_address: *mut c_void,
) -> *mut c_void {
    let raw = |new_address: *mut c_void| {
        // SAFETY: the caller's own arguments.
        unsafe {
            libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_address)
                as *mut c_void
        }
    };
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let Some(region) = regions::take(old as usize) else {
        return raw(if fixed {
            new_address
        } else {
            std::ptr::null_mut()
        });
    };
    // Shrinking in place works across mappings: the kernel just unmaps
    // the tail.
    if new_len <= old_len && !fixed {
        let got = raw(std::ptr::null_mut());
        if got != libc::MAP_FAILED {
            regions::remember(Region {
                len: new_len,
                ..region
            });
        } else {
            regions::remember(region);
        }
        return got;
    }
    if flags & libc::MREMAP_MAYMOVE == 0 || flags & libc::MREMAP_DONTUNMAP != 0 {
        regions::remember(region);
        set_errno(libc::ENOMEM);
        return libc::MAP_FAILED;
    }
    // Compose a new mapping of the file at the new size, then carry over
    // every page the process changed in the old one (a private writable
    // mapping may hold writes); unchanged pages stay shared.
    let target = if fixed {
        new_address
    } else {
        std::ptr::null_mut()
    };
    let target_flags = if fixed {
        region.flags | libc::MAP_FIXED
    } else {
        region.flags & !(libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE)
    };
    // SAFETY: composing a mapping of the region's own descriptor.
    let new = unsafe {
        mmap(
            target,
            new_len,
            region.prot,
            target_flags,
            region.fd,
            region.offset,
        )
    };
    if new == libc::MAP_FAILED {
        regions::remember(region);
        return new;
    }
    let keep = old_len.min(new_len).min(region.len);
    if region.prot & libc::PROT_WRITE != 0 {
        copy_changed_pages(old as *const u8, new as *mut u8, keep);
    }
    raw_munmap(old, old_len);
    // SAFETY: the table's duplicate, which the new mapping took a copy of.
    unsafe { libc::close(region.fd) };
    new
}

/// Copy the pages of `old` that differ from `new` (both `len` bytes).
fn copy_changed_pages(old: *const u8, new: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    let mut at = 0;
    while at < len {
        let n = PAGE.min(len - at);
        // SAFETY: both ranges are live mappings of at least `len` bytes,
        // the new one writable; they do not overlap.
        unsafe {
            let a = std::slice::from_raw_parts(old.add(at), n);
            let b = std::slice::from_raw_parts_mut(new.add(at), n);
            if a != b {
                b.copy_from_slice(a);
            }
        }
        at += n;
    }
}
