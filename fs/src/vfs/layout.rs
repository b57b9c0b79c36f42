//! Where the bytes of a file lie in the store's objects, for processes that
//! map them from the objects themselves (docs/store-format.md §11). The
//! kernel shares page-cache pages only within one file; a fine-tune and its
//! base share pages only if both processes map the base's object.
//!
//! A layout hands out the daemon's own object descriptions, so the rule of
//! the copy-mode read path holds here too: no run covers a chunk that was
//! not checked against its hash in this mount. A chunk that fails is left
//! out (a gap), so the client reads it through the mount and gets the EIO
//! the mount gives everyone.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use modelfs_share::{Run, MAX_OBJECTS, MAX_RUNS};
use modelfs_store::MappedObject;

use super::Vfs;

/// The answer to one layout request: runs of `[from, end)` and the objects
/// they index.
pub struct FileLayout {
    /// Bytes of the file.
    pub file_size: u64,
    /// Served by kernel passthrough from its whole-file object.
    pub passthrough: bool,
    /// The runs describe `[from, end)`; less than `file_size` when a reply
    /// limit was reached (the client asks again from here).
    pub end: u64,
    /// The objects the runs index, each the mount's one locked mapping.
    pub objects: Vec<Arc<MappedObject>>,
    /// Sorted, non-overlapping runs; back-to-back chunks merged.
    pub runs: Vec<Run>,
}

impl FileLayout {
    /// Bytes the runs cover.
    pub fn covered(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

impl Vfs {
    /// The layout of file `ino` from file offset `from` on. Errors are the
    /// errno values of §11: ENOENT (no such file, or removed), EIO (its
    /// objects cannot be opened).
    pub fn layout(&self, ino: u64, from: u64) -> Result<FileLayout, i32> {
        let tree = self.tree();
        let Some(file) = tree.files.get(&ino) else {
            return Err(libc::ENOENT);
        };
        let content = file.content.clone();
        // A passthrough file's object is checked whole once per mount (which
        // marks all its chunks checked); doing it here first saves hashing
        // it again chunk by chunk.
        let passthrough = content.whole_object.is_some()
            && self.passthrough_enabled()
            && self.whole_object_intact(&content, &file.label)?.is_some();
        let open = self.open_content(content, &file.label)?;
        let reader = &open.reader;
        let size = reader.size();
        let mut out = FileLayout {
            file_size: size,
            passthrough,
            end: size,
            objects: Vec::new(),
            runs: Vec::new(),
        };
        let mut index: HashMap<*const MappedObject, u32> = HashMap::new();
        for i in reader.segments_in(from, size) {
            let s = &reader.segments()[i];
            let obj = reader.object_of(i);
            let start = reader.segment_start(i);
            if obj.range(s.object_offset, u64::from(s.len)).is_none()
                || !open.check_segment(i, &self.verified_chunks)
            {
                self.stats.layout_gaps.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Only the first segment can begin before `from`.
            let skip = from.saturating_sub(start);
            let (file_offset, object_offset) = (start + skip, s.object_offset + skip);
            let len = u64::from(s.len) - skip;
            let known = index.get(&Arc::as_ptr(obj)).copied();
            if let (Some(o), Some(last)) = (known, out.runs.last_mut()) {
                if last.object == o
                    && last.file_offset + last.len == file_offset
                    && last.object_offset + last.len == object_offset
                {
                    last.len += len;
                    continue;
                }
            }
            if out.runs.len() == MAX_RUNS || (known.is_none() && out.objects.len() == MAX_OBJECTS) {
                out.end = file_offset;
                break;
            }
            let o = match known {
                Some(o) => o,
                None => {
                    out.objects.push(obj.clone());
                    let o = (out.objects.len() - 1) as u32;
                    index.insert(Arc::as_ptr(obj), o);
                    o
                }
            };
            out.runs.push(Run {
                file_offset,
                len,
                object: o,
                object_offset,
            });
        }
        self.stats.layouts.fetch_add(1, Ordering::Relaxed);
        self.stats
            .layout_bytes
            .fetch_add(out.covered(), Ordering::Relaxed);
        Ok(out)
    }
}
