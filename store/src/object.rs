//! Object files opened for reading: the first half of the store's read
//! protocol, and the only code that opens an object to read it.
//!
//! Opening an object takes a shared OFD lock on it ([`crate::locks`]) before
//! mapping it, and the lock lives exactly as long as the mapping: gc punches
//! holes only in objects it can lock exclusively, so bytes a reader holds a
//! [`MappedObject`] for never turn into zeros underneath it. Whether the
//! content the reader wanted is still live is the second half, checked after
//! every object is locked ([`crate::Store::open_content`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::ids::ObjectId;
use crate::locks;

const PAGE: usize = 4096;

/// An object file, share-locked and mapped read-only.
pub struct MappedObject {
    id: ObjectId,
    path: PathBuf,
    file: File,
    map: Mmap,
}

impl MappedObject {
    /// Open, lock and map the object at `path`. A missing file is
    /// [`Error::ObjectMissing`], so callers can tell "collected by gc" (the
    /// content is gone too) from damage (the content is still listed).
    pub(crate) fn open(id: ObjectId, path: PathBuf) -> Result<MappedObject> {
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::ObjectMissing { path: path.clone() },
            _ => Error::Io {
                path: path.clone(),
                cause: e,
            },
        })?;
        locks::share_object(&file).map_err(|cause| Error::Io {
            path: path.clone(),
            cause,
        })?;
        // SAFETY: an object's bytes are never rewritten once committed, and
        // holes are punched only in objects no reader holds the shared lock
        // on, which this mapping's owner holds until it is dropped. A file
        // truncated by outside damage is bounded by `len()` taken here, but
        // pages lost after this point would fault (SIGBUS): the same risk
        // every reader of a mapped file takes.
        let map = unsafe { Mmap::map(&file) }.map_err(|cause| Error::Io {
            path: path.clone(),
            cause,
        })?;
        Ok(MappedObject {
            id,
            path,
            file,
            map,
        })
    }

    /// The object's catalog id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// Where the object file is, for error messages and logs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for handing to the kernel as a passthrough backing
    /// file (its lock is held as long as this object lives).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// All of the object's bytes, as long as it was when opened.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Bytes mapped: the file's length when it was opened.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the mapping holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `[offset, offset+len)`, or None if any of it lies past the end.
    pub fn range(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        Some(&self.map[offset as usize..end as usize])
    }

    /// The part of `[offset, offset+len)` inside the object.
    fn clamped(&self, offset: u64, len: u64) -> &[u8] {
        let end = offset.saturating_add(len).min(self.len()) as usize;
        &self.map[(offset as usize).min(end)..end]
    }

    /// Whole pages inside `[offset, offset+len)`: pages at a chunk's edges
    /// are shared with its neighbours and are left alone, so unlocking one
    /// chunk never unlocks part of another.
    fn inner_pages(&self, offset: u64, len: u64) -> Option<(*const libc::c_void, usize)> {
        let bytes = self.clamped(offset, len);
        let base = bytes.as_ptr() as usize;
        let start = base.div_ceil(PAGE) * PAGE;
        let stop = (base + bytes.len()) / PAGE * PAGE;
        if stop > start {
            Some((start as *const libc::c_void, stop - start))
        } else {
            None
        }
    }

    /// mlock the whole pages of a range (faulting them in).
    pub fn lock_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some((ptr, n)) = self.inner_pages(offset, len) else {
            return Ok(());
        };
        // SAFETY: the page-aligned range lies inside our live mapping.
        if unsafe { libc::mlock(ptr, n) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Undo [`MappedObject::lock_range`] for the same range.
    pub fn unlock_range(&self, offset: u64, len: u64) {
        if let Some((ptr, n)) = self.inner_pages(offset, len) {
            // SAFETY: as in lock_range; munlock of unlocked pages is harmless.
            unsafe { libc::munlock(ptr, n) };
        }
    }

    /// Bytes of `[offset, offset+len)` whose pages are in the page cache
    /// (page granular, so an edge page counts whole when resident).
    pub fn resident_bytes(&self, offset: u64, len: u64) -> u64 {
        let bytes = self.clamped(offset, len);
        let (resident, _) = crate::pages::residency(bytes);
        (resident as u64 * PAGE as u64).min(bytes.len() as u64)
    }

    /// Let the page cache drop the whole pages of a range: this mapping's
    /// page-table entries go, then the file's cached pages, except pages
    /// another mapping still uses (a process that maps the object, a pinned
    /// range's mlock: the kernel keeps those). For bytes that were read only
    /// to be copied elsewhere, so they are not kept twice.
    pub fn drop_pages(&self, offset: u64, len: u64) {
        let Some((ptr, n)) = self.inner_pages(offset, len) else {
            return;
        };
        let file_offset = ptr as usize - self.map.as_ptr() as usize;
        // SAFETY: the page-aligned range lies inside our live mapping, which
        // is read-only and file-backed: MADV_DONTNEED only drops its page
        // table entries, and the next access faults the same bytes back in.
        // Both calls are hints; a refusal (a locked range: EINVAL) leaves
        // the pages where they are.
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, n, libc::MADV_DONTNEED);
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                file_offset as libc::off_t,
                n as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }

    /// Start reading a range from disk in the background.
    pub fn will_need(&self, offset: u64, len: u64) {
        // Only a hint: if the kernel refuses it, the reads fault the bytes in.
        let _ = crate::pages::advise(self.clamped(offset, len), libc::MADV_WILLNEED);
    }
}
