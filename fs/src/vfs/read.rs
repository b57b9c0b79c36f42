//! Opening a content for reading and serving its bytes: the mount's use of
//! the store's read protocol. Nothing is served that was not checked: a
//! whole-file object is hashed once per mount before passthrough hands it
//! to the kernel, and each copy-mode chunk is hashed the first time it is
//! read in this mount; a mismatch is EIO, never wrong bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use modelfs_store::{ContentInfo, Error as StoreError, MappedObject};
use tracing::{error, warn};

use super::Vfs;
use crate::open_content::{ContentState, OpenContent};

/// Bytes answering a read. Dropped once the reply is written; then the
/// object pages it was copied from leave the page cache (see `spent`).
pub struct ReadOut {
    data: ReadData,
    /// Object ranges read for this reply that no pin keeps: once the kernel
    /// has the bytes in the FUSE file's page cache, keeping the object's
    /// pages too would hold every byte twice. Pages that processes map from
    /// the object, and pinned chunks, stay (the kernel does not drop mapped
    /// or locked pages).
    spent: Vec<(Arc<MappedObject>, u64, u64)>,
}

enum ReadData {
    /// Bytes `start..end` of the object's mapping: consecutive chunks stored
    /// back to back, served without a copy.
    Mapped(Arc<MappedObject>, usize, usize),
    /// Chunks from different places, copied together (or nothing, past the
    /// end of the file).
    Owned(Vec<u8>),
}

impl ReadOut {
    /// The bytes read; shorter than asked for only at end of file.
    pub fn as_slice(&self) -> &[u8] {
        match &self.data {
            ReadData::Mapped(o, start, end) => &o.bytes()[*start..*end],
            ReadData::Owned(v) => v,
        }
    }
}

impl Drop for ReadOut {
    fn drop(&mut self) {
        for (object, offset, len) in &self.spent {
            object.drop_pages(*offset, *len);
        }
    }
}

impl Vfs {
    /// The errno for a store error met while opening `label`: ENOENT if the
    /// file was removed meanwhile, EIO (logged, counted) for anything else.
    fn open_errno(&self, label: &str, e: StoreError) -> i32 {
        if let StoreError::ContentRemoved = e {
            return libc::ENOENT;
        }
        error!(file = label, "cannot open: {e}; returning EIO");
        self.stats.eio.fetch_add(1, Ordering::Relaxed);
        libc::EIO
    }

    /// The whole-file object of `content`, mapped and locked, if it is
    /// intact: passthrough reads never reach the daemon, so the object is
    /// checked once per mount, at its first open, with a full BLAKE3 pass
    /// (several GB/s, and it warms the page cache the reader is about to
    /// use). None: it failed the check and is served in copy mode instead,
    /// where each chunk is checked and only damaged ranges fail.
    pub(super) fn whole_object_intact(
        &self,
        content: &ContentInfo,
        label: &str,
    ) -> Result<Option<Arc<MappedObject>>, i32> {
        let Some(id) = content.whole_object else {
            return Ok(None);
        };
        // Map it through the object cache, which holds the shared lock, so
        // gc cannot punch holes between this check and the reader's use;
        // then make sure the content was not removed before the lock.
        let object = match self.map_object(id) {
            Ok(o) => o,
            Err(StoreError::ObjectMissing { .. }) if !self.content_live(content.id) => {
                return Err(libc::ENOENT)
            }
            Err(e) => return Err(self.open_errno(label, e)),
        };
        if !self.content_live(content.id) {
            return Err(libc::ENOENT);
        }
        // One check per content: concurrent first opens wait for it instead
        // of each hashing the whole object again.
        let cell = self
            .whole_checked
            .lock()
            .expect("lock")
            .entry(content.id)
            .or_default()
            .clone();
        let intact = *cell.get_or_init(|| self.check_whole_object(content, &object, label));
        Ok(intact.then_some(object))
    }

    fn check_whole_object(
        &self,
        content: &ContentInfo,
        object: &MappedObject,
        label: &str,
    ) -> bool {
        let path = object.path().display();
        if object.len() != content.size {
            error!(object = %path, file = label, size = object.len(), "whole-file object has the wrong size");
            return false;
        }
        if !modelfs_store::whole_object_matches(content, object.bytes()) {
            warn!(object = %path, file = label, "whole-file object failed its check; serving it in copy mode, damaged ranges will return EIO");
            return false;
        }
        for seg in &content.segments {
            self.verified_chunks.insert(seg.object, seg.object_offset);
        }
        true
    }

    pub(super) fn open_copy(
        &self,
        content: Arc<ContentInfo>,
        label: &str,
    ) -> Result<Arc<OpenContent>, i32> {
        let open = Arc::new(self.open_content(content, label)?);
        let first = open.state.opens.fetch_add(1, Ordering::AcqRel) == 0;
        if first {
            self.start_replay(&open);
        }
        Ok(open)
    }

    /// The content's reader over its mapped objects and this mount's state
    /// of it, without counting an open handle.
    pub(super) fn open_content(
        &self,
        content: Arc<ContentInfo>,
        label: &str,
    ) -> Result<OpenContent, i32> {
        let reader = {
            let store = self.store.lock().expect("store lock");
            store.open_content_with(content.clone(), |id| self.map_cached(&store, id))
        }
        .map_err(|e| self.open_errno(label, e))?;
        let state = self
            .contents
            .lock()
            .expect("contents lock")
            .entry(content.id)
            .or_insert_with(|| {
                let saved =
                    modelfs_store::trace::read_trace(&self.store_root, &content.hash, content.size)
                        .map_or(0, |t| t.covered());
                Arc::new(ContentState::new(&content, saved))
            })
            .clone();
        let tree = self.tree();
        let refs = content
            .segments
            .iter()
            .map(|s| {
                tree.chunk_refs
                    .get(&(s.object, s.object_offset))
                    .copied()
                    .unwrap_or(1)
            })
            .collect();
        Ok(OpenContent {
            reader,
            label: label.to_string(),
            state,
            refs,
        })
    }

    /// A copy-mode handle was closed. When the last one goes, the load
    /// trace is saved if this mount's reads cover more than the saved one.
    pub fn release(&self, open: &OpenContent) {
        if open.state.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.save_trace(open.content(), &open.state);
        }
    }

    /// Copy-mode read: each chunk is checked against its hash the first
    /// time it is read in this mount; a mismatch is EIO, never wrong bytes.
    pub fn read(&self, open: &OpenContent, offset: u64, size: u32) -> Result<ReadOut, i32> {
        self.stats.read_requests.fetch_add(1, Ordering::Relaxed);
        let reader = &open.reader;
        let end = offset.saturating_add(u64::from(size)).min(reader.size());
        if offset >= end {
            return Ok(ReadOut {
                data: ReadData::Owned(Vec::new()),
                spent: Vec::new(),
            });
        }
        let mut pieces: Vec<(&Arc<MappedObject>, usize, usize)> = Vec::new();
        // (object, start, end) while collecting; (object, offset, len) below.
        let mut spent: Vec<(Arc<MappedObject>, u64, u64)> = Vec::new();
        let mut resident = 0u64;
        let open_handles = open.state.opens.load(Ordering::Relaxed).max(1);
        for i in reader.segments_in(offset, end) {
            let s = &reader.segments()[i];
            let obj = reader.object_of(i);
            let start = reader.segment_start(i);
            if obj.range(s.object_offset, u64::from(s.len)).is_none() {
                return Err(self.damaged(open, i, "object is truncated"));
            }
            let from = offset.max(start) - start;
            let to = end.min(start + u64::from(s.len)) - start;
            let (a, b) = (s.object_offset + from, s.object_offset + to);
            // Measured before anything below touches the pages.
            resident += obj.resident_bytes(a, b - a);
            // A cold chunk is left to the page faults of the hash and the
            // copy and their readahead: an MADV_WILLNEED of the whole chunk
            // here filled the page cache page by page, cost the daemon about
            // 1.5x the CPU per cold byte and made cold copy-mode reads slower
            // (docs/benchmarks.md, "Copy-mode cold reads").
            if !open.check_segment(i, &self.verified_chunks) {
                return Err(self.damaged(open, i, "chunk does not match its hash"));
            }
            // Worth more the more models hold the chunk and the more
            // handles have its file open now.
            let refs = open
                .refs
                .get(i)
                .copied()
                .unwrap_or(1)
                .saturating_add(open_handles - 1);
            let pinned = self
                .pinner
                .access(obj, s.object, s.object_offset, u64::from(s.len), refs);
            if !pinned {
                match spent.last_mut() {
                    Some((last, _, stop)) if Arc::ptr_eq(last, obj) && a == *stop => *stop = b,
                    _ => spent.push((Arc::clone(obj), a, b)),
                }
            }
            let (a, b) = (a as usize, b as usize);
            // Consecutive chunks stored back to back in one object (the
            // usual case: a tensor's pieces) are served as one slice.
            match pieces.last_mut() {
                Some((last, _, end)) if Arc::ptr_eq(last, obj) && *end == a => *end = b,
                _ => pieces.push((obj, a, b)),
            }
        }
        let len = end - offset;
        self.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
        let counters = &open.state.counters;
        counters.read_bytes.fetch_add(len, Ordering::Relaxed);
        counters
            .read_resident_bytes
            .fetch_add(resident.min(len), Ordering::Relaxed);
        counters
            .read_disk_bytes
            .fetch_add(len - resident.min(len), Ordering::Relaxed);
        {
            let mut recorder = open.state.recorder.lock().expect("recorder lock");
            if !recorder.full() {
                recorder.record(offset, len);
            }
        }
        for (_, start, end) in &mut spent {
            *end -= *start;
        }
        if let [(obj, a, b)] = pieces[..] {
            return Ok(ReadOut {
                data: ReadData::Mapped(Arc::clone(obj), a, b),
                spent,
            });
        }
        let mut out = Vec::with_capacity(len as usize);
        for (obj, a, b) in pieces {
            out.extend_from_slice(&obj.bytes()[a..b]);
        }
        Ok(ReadOut {
            data: ReadData::Owned(out),
            spent,
        })
    }

    fn damaged(&self, open: &OpenContent, segment: usize, why: &str) -> i32 {
        let s = &open.reader.segments()[segment];
        error!(
            file = %open.label,
            file_offset = open.reader.segment_start(segment),
            object = %open.reader.object_of(segment).path().display(),
            object_offset = s.object_offset,
            len = s.len,
            "{why}; returning EIO"
        );
        self.stats.eio.fetch_add(1, Ordering::Relaxed);
        libc::EIO
    }
}
