//! Page-cache queries and hints on byte ranges of memory mappings, shared by
//! the importer (source and object mappings) and the mount (object mappings).
//!
//! A range given as a subslice of a mapping need not be page-aligned; the
//! calls act on every page the range touches. That stays inside the mapping
//! because mappings start on a page boundary and cover whole pages.

use std::io;

const PAGE: usize = 4096;

/// The pages `bytes` touches: (first page address, length in bytes).
fn touched_pages(bytes: &[u8]) -> Option<(usize, usize)> {
    if bytes.is_empty() {
        return None;
    }
    let base = bytes.as_ptr() as usize;
    let start = base / PAGE * PAGE;
    let stop = (base + bytes.len()).div_ceil(PAGE) * PAGE;
    Some((start, stop - start))
}

/// (pages in the page cache, pages touched) for a range of a mapping.
pub fn residency(bytes: &[u8]) -> (usize, usize) {
    let Some((start, len)) = touched_pages(bytes) else {
        return (0, 0);
    };
    // Asked in windows, so the read path needs no allocation per request.
    const WINDOW: usize = 256;
    let mut flags = [0u8; WINDOW];
    let mut resident = 0;
    let mut at = 0;
    while at < len {
        let n = (len - at).min(WINDOW * PAGE);
        // SAFETY: the page-aligned window lies within pages of the live
        // mapping `bytes` belongs to; `flags` has a byte for each of its pages.
        let rc = unsafe { libc::mincore((start + at) as *mut libc::c_void, n, flags.as_mut_ptr()) };
        if rc != 0 {
            return (0, len / PAGE);
        }
        resident += flags[..n / PAGE].iter().filter(|&&f| f & 1 == 1).count();
        at += n;
    }
    (resident, len / PAGE)
}

/// madvise(2) on the pages `bytes` touches: hints such as MADV_WILLNEED, or
/// MADV_POPULATE_READ, which reads them in now and reports a range past the
/// end of a shrunken file as EFAULT where touching it would raise SIGBUS.
pub fn advise(bytes: &[u8], advice: libc::c_int) -> io::Result<()> {
    let Some((start, len)) = touched_pages(bytes) else {
        return Ok(());
    };
    // SAFETY: the range covers only pages of the live mapping `bytes`
    // belongs to; the advice values used here never change its contents.
    if unsafe { libc::madvise(start as *mut libc::c_void, len, advice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
