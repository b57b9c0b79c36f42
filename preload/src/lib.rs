//! `libmodelfs_preload.so`: interposes `mmap` so that a process mapping a
//! file on a modelfs mount gets the file's shared bytes mapped straight
//! from the store's objects.
//!
//! Why: the kernel keeps page cache per file, so two fine-tunes that share
//! 90% of their tensors share no pages through the mount. Every loader that
//! matters (safetensors, `torch.load(mmap=True)`, numpy.memmap, llama.cpp,
//! ONNX Runtime external data) maps model files with libc `mmap`, so a
//! library in `LD_PRELOAD` sees those calls without any change to the
//! program. For a mapping of a modelfs file it first maps the file itself
//! (so every byte is right and pages past the end still fault as they
//! would), then asks the mount for the file's layout (docs/store-format.md
//! §11) and maps over it, `MAP_FIXED`, every page that an object holds at a
//! congruent offset. Those pages are the objects' page-cache pages: the
//! same for every process and model that uses them, and the same pages a
//! passthrough reader of a whole-file object has.
//!
//! What it leaves alone, by passing the call straight to the kernel:
//! anonymous and hugetlb mappings, files not on a FUSE filesystem, shared
//! writable mappings (the mount is read-only: the kernel refuses them just
//! the same), mappings under 64 KiB, and everything when `MODELFS_SHARE=0`.
//! Any failure to get or apply a layout also falls back to the plain
//! mapping: the program always gets its bytes, shared or not.
//!
//! `mremap` is interposed because a composed mapping spans several kernel
//! mappings, which the kernel cannot grow or move; `munmap` only to keep the
//! table of composed mappings current. Calls made with raw syscalls, and
//! statically linked programs, are not seen.

mod compose;
mod regions;

use std::ffi::c_void;

use libc::{c_int, off_t, size_t};

/// `mmap(2)`, interposed.
///
/// # Safety
/// The contract of `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: forwarded with the caller's own arguments and contract.
    unsafe { compose::mmap(addr, len, prot, flags, fd, offset) }
}

/// `mmap64(3)`: the same call where `off_t` is 64 bits.
///
/// # Safety
/// The contract of `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: as for mmap.
    unsafe { compose::mmap(addr, len, prot, flags, fd, offset) }
}

/// `munmap(2)`, interposed to forget composed mappings that go away.
///
/// # Safety
/// The contract of `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    regions::forget(addr as usize, len);
    // SAFETY: the caller's own arguments.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int }
}

/// `mremap(2)`, interposed. C declares it variadic, with `new_address`
/// read only under `MREMAP_FIXED`; on the SysV x86-64 and AArch64 ABIs the
/// fifth integer argument is in the same register either way, and it is
/// looked at only when the caller's flags say it was passed.
///
/// # Safety
/// The contract of `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_address: *mut c_void,
) -> *mut c_void {
    // SAFETY: forwarded with the caller's own arguments and contract.
    unsafe { compose::mremap(old, old_len, new_len, flags, new_address) }
}
