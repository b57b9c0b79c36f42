//! Reading a stored file back, every chunk checked against its hash: the
//! second half of the store's read protocol (the first is
//! [`crate::object`]).
//!
//! [`FileReader`] is the one checked-segment reader: `cat`, `verify`,
//! `upgrade` and the mount's copy-mode reads all find segments and check
//! them here, so a damaged chunk is an error naming where it is, never wrong
//! bytes, whichever way the bytes leave the store. It is also the layout of
//! a file as a process that maps store objects itself needs it: for each
//! segment, its file offset, object and object offset.

use std::collections::HashMap;
use std::io::{self, Write};
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::catalog::ContentInfo;
use crate::chunker;
use crate::error::{Error, IoContext, Result};
use crate::ids::{ChunkHash, ObjectId};
use crate::object::MappedObject;
use crate::recipe::{content_key, Segment};

/// A stored file opened for reading: every object its recipe uses, mapped
/// and share-locked (so gc leaves them alone), and where each segment starts.
pub struct FileReader {
    content: Arc<ContentInfo>,
    /// File offset at which each segment starts.
    starts: Vec<u64>,
    objects: HashMap<ObjectId, Arc<MappedObject>>,
}

impl FileReader {
    /// Build a reader from objects already mapped (by
    /// [`crate::Store::open_content_with`], which owns the liveness check).
    pub(crate) fn new(
        content: Arc<ContentInfo>,
        objects: HashMap<ObjectId, Arc<MappedObject>>,
    ) -> Result<FileReader> {
        let mut starts = Vec::with_capacity(content.segments.len());
        let mut pos = 0u64;
        for s in &content.segments {
            starts.push(pos);
            pos += u64::from(s.len);
        }
        if pos != content.size {
            return Err(Error::Corrupt(format!(
                "content {} has chunks adding up to {pos} bytes, not its size {}",
                content.hash, content.size
            )));
        }
        Ok(FileReader {
            content,
            starts,
            objects,
        })
    }

    /// The content being read, with its recipe.
    pub fn content(&self) -> &Arc<ContentInfo> {
        &self.content
    }

    /// Bytes of the file.
    pub fn size(&self) -> u64 {
        self.content.size
    }

    /// The file's chunks in file order; segment `i` starts at
    /// [`segment_start(i)`](Self::segment_start).
    pub fn segments(&self) -> &[Segment] {
        &self.content.segments
    }

    /// File offset of segment `i`.
    pub fn segment_start(&self, i: usize) -> u64 {
        self.starts[i]
    }

    /// The segments that hold bytes of `[offset, end)`.
    pub fn segments_in(&self, offset: u64, end: u64) -> Range<usize> {
        if offset >= end || offset >= self.content.size {
            return 0..0;
        }
        // The last segment starting at or before `offset` (segments[0]
        // starts at 0), up to the first one starting at or after `end`.
        let first = self.starts.partition_point(|&s| s <= offset) - 1;
        let last = self.starts.partition_point(|&s| s < end);
        first..last
    }

    /// The mapped object segment `i` lives in.
    pub fn object_of(&self, i: usize) -> &Arc<MappedObject> {
        &self.objects[&self.content.segments[i].object]
    }

    /// Segment `i`'s bytes as stored, not yet checked against its hash; an
    /// error if the object is too short to hold them.
    pub fn segment_bytes(&self, i: usize) -> Result<&[u8]> {
        let s = &self.content.segments[i];
        let obj = self.object_of(i);
        // A record must lie inside its object (store-format §7, invariant 2).
        obj.range(s.object_offset, u64::from(s.len)).ok_or_else(|| {
            let end = s.object_offset.checked_add(u64::from(s.len));
            Error::Corrupt(format!(
                "object {} is truncated (chunk at file offset {} needs bytes {}..{})",
                obj.path().display(),
                self.starts[i],
                s.object_offset,
                end.map_or_else(|| "past 2^64".to_string(), |end| end.to_string())
            ))
        })
    }

    /// Segment `i`'s bytes, checked against its hash.
    pub fn checked_segment(&self, i: usize) -> Result<&[u8]> {
        let bytes = self.segment_bytes(i)?;
        let s = &self.content.segments[i];
        if ChunkHash::of(bytes) != s.hash {
            return Err(Error::Corrupt(format!(
                "chunk at file offset {} ({} bytes) does not match its hash (object {}, offset {})",
                self.starts[i],
                s.len,
                self.object_of(i).path().display(),
                s.object_offset
            )));
        }
        Ok(bytes)
    }

    /// Copy the whole file to `out`, checking every chunk and the content key.
    pub fn copy_to(&self, out: &mut dyn Write) -> Result<u64> {
        for i in 0..self.content.segments.len() {
            out.write_all(self.checked_segment(i)?).at("<output>")?;
        }
        self.check_key()?;
        Ok(self.content.size)
    }

    /// Check every chunk and the content key without copying anywhere.
    pub fn verify(&self) -> Result<()> {
        for i in 0..self.content.segments.len() {
            self.checked_segment(i)?;
        }
        self.check_key()
    }

    /// Every chunk being right does not make the recipe right (a damaged
    /// recipe could list right chunks in a wrong order): the content key
    /// over the recipe's chunk list must be the content's key. A recipe that
    /// is not the canonical chunking (store-format §3) hashes to another
    /// value, so then the key is derived again from the bytes.
    fn check_key(&self) -> Result<()> {
        let listed = content_key(self.content.segments.iter().map(|s| (s.hash, s.len)));
        if listed == self.content.hash {
            return Ok(());
        }
        let derived = chunker::canonical_key(self).map_err(|e| match e.into_inner() {
            Some(inner) => match inner.downcast::<Error>() {
                Ok(store_error) => *store_error,
                Err(other) => Error::Corrupt(other.to_string()),
            },
            None => Error::Corrupt("read failed while deriving the content key".into()),
        })?;
        if derived != self.content.hash {
            return Err(Error::Corrupt(format!(
                "reassembled file does not match its content key {} (the recipe is damaged)",
                self.content.hash
            )));
        }
        Ok(())
    }

    /// Read up to `buf.len()` bytes at `offset`; every chunk touched is checked.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let end = offset
            .saturating_add(buf.len() as u64)
            .min(self.content.size);
        let mut done = 0usize;
        for i in self.segments_in(offset, end) {
            let seg = self.checked_segment(i)?;
            let pos = offset + done as u64;
            let from = (pos - self.starts[i]) as usize;
            let n = (seg.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&seg[from..from + n]);
            done += n;
        }
        Ok(done)
    }
}

/// Lets the format parsers and the canonical chunker read a stored file,
/// every chunk checked as it is read.
impl modelfs_formats::Source for FileReader {
    fn len(&self) -> u64 {
        self.content.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = FileReader::read_at(self, offset, buf).map_err(io::Error::other)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of a stored file",
            ));
        }
        Ok(())
    }
}

/// Whether `bytes` (a whole-file object, mapped) are exactly `content`. When
/// the recipe tiles the object in order and its chunk list gives the key,
/// each chunk is hashed on all cores against the recipe; otherwise the key
/// is derived from the bytes (store-format §3). Either way every byte is
/// hashed once.
pub fn whole_object_matches(content: &ContentInfo, bytes: &[u8]) -> bool {
    if bytes.len() as u64 != content.size {
        return false;
    }
    let mut at = 0u64;
    let tiles = content.segments.iter().all(|s| {
        let ok = Some(s.object) == content.whole_object && s.object_offset == at;
        at += u64::from(s.len);
        ok
    }) && at == content.size;
    let listed = content_key(content.segments.iter().map(|s| (s.hash, s.len)));
    if tiles && listed == content.hash {
        return content.segments.par_iter().all(|s| {
            let a = s.object_offset as usize;
            ChunkHash::of(&bytes[a..a + s.len as usize]) == s.hash
        });
    }
    chunker::canonical_key_of_bytes(bytes) == content.hash
}
