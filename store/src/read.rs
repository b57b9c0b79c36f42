//! Reading a stored file back, every chunk checked against its hash.
//!
//! Used by `cat` and `verify` here, and by the mount's copy-mode reads later:
//! whatever path bytes take out of the store, a damaged chunk is an error
//! naming where it is, never wrong bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rayon::prelude::*;

use crate::catalog::ContentInfo;
use crate::chunker;
use crate::error::{Error, IoContext, Result};
use crate::locks;
use crate::recipe::{content_key, Hash, ObjectId};
use crate::Store;

pub struct FileReader {
    content: ContentInfo,
    /// File offset at which each segment starts.
    starts: Vec<u64>,
    /// Each object the recipe uses, with its path and its length when opened.
    objects: HashMap<ObjectId, (File, PathBuf, u64)>,
}

impl FileReader {
    pub(crate) fn open(store: &Store, content: ContentInfo) -> Result<FileReader> {
        let mut objects = HashMap::new();
        for s in &content.segments {
            if objects.contains_key(&s.object) {
                continue;
            }
            let path = store.object_path(s.object);
            let file = File::open(&path).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Error::Corrupt(format!("object {} is missing", path.display()))
                } else {
                    Error::Io {
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
            // Tell gc we use this object, so it does not punch holes in it.
            locks::share_object(&file).at(&path)?;
            // Objects do not shrink (gc punches holes, it does not
            // truncate), so this length bounds every later read; one damaged
            // by truncation afterwards still fails the read cleanly (EOF).
            let len = file.metadata().at(&path)?.len();
            objects.insert(s.object, (file, path, len));
        }
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

    pub fn content(&self) -> &ContentInfo {
        &self.content
    }

    pub fn size(&self) -> u64 {
        self.content.size
    }

    /// Read segment `i` into `buf` (resized to fit) and check its hash.
    pub fn read_segment(&self, i: usize, buf: &mut Vec<u8>) -> Result<()> {
        let s = &self.content.segments[i];
        let (file, path, object_len) = &self.objects[&s.object];
        let end = s.object_offset.checked_add(u64::from(s.len));
        let truncated = || {
            Error::Corrupt(format!(
                "object {} is truncated (chunk at file offset {} needs bytes {}..{})",
                path.display(),
                self.starts[i],
                s.object_offset,
                end.map_or_else(|| "past 2^64".to_string(), |end| end.to_string())
            ))
        };
        // A record must lie inside its object (store-format §7, invariant 2).
        // Check that before sizing the buffer: a damaged or hostile recipe
        // record claiming a chunk of up to 4 GiB in a small object would
        // otherwise make every reader (one per thread in `verify`) allocate
        // and zero that much before the read fails. Found by the store_read
        // fuzz target.
        if end.is_none_or(|end| end > *object_len) {
            return Err(truncated());
        }
        buf.resize(s.len as usize, 0);
        file.read_exact_at(buf, s.object_offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                truncated()
            } else {
                Error::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        if Hash::of(buf) != s.hash {
            return Err(Error::Corrupt(format!(
                "chunk at file offset {} ({} bytes) does not match its hash (object {}, offset {})",
                self.starts[i],
                s.len,
                path.display(),
                s.object_offset
            )));
        }
        Ok(())
    }

    /// Copy the whole file to `out`, checking every chunk and the content key.
    pub fn copy_to(&self, out: &mut dyn Write) -> Result<u64> {
        let mut buf = Vec::new();
        for i in 0..self.content.segments.len() {
            self.read_segment(i, &mut buf)?;
            out.write_all(&buf).at("<output>")?;
        }
        self.check_key()?;
        Ok(self.content.size)
    }

    /// Check every chunk and the content key without copying anywhere.
    pub fn verify(&self) -> Result<()> {
        let mut buf = Vec::new();
        for i in 0..self.content.segments.len() {
            self.read_segment(i, &mut buf)?;
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
        if offset >= self.content.size || buf.is_empty() {
            return Ok(0);
        }
        let mut i = match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let mut done = 0usize;
        let mut seg = Vec::new();
        while done < buf.len() && i < self.content.segments.len() {
            self.read_segment(i, &mut seg)?;
            let pos = offset + done as u64;
            let from = (pos - self.starts[i]) as usize;
            let n = (seg.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&seg[from..from + n]);
            done += n;
            i += 1;
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
            Hash::of(&bytes[a..a + s.len as usize]) == s.hash
        });
    }
    chunker::canonical_key_of_bytes(bytes) == content.hash
}
