//! Turning each source file into chunks and a content: the state an import
//! builds up between the first byte read and the commit, and the per-file
//! pipeline (map, cut along the file's layout, resolve and store chunks batch
//! by batch, decide what the file is stored as). Nothing here touches the catalog but to read it;
//! publishing is the caller's step.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use modelfs_formats::TensorSpan;
use rayon::prelude::*;

use super::source::{FileLayout, SourceFile};
use super::writer::{batches, populate, read_ahead, write_runs, ObjectWriter, WriteJob};
use super::{ImportProgress, ImportSummary};
use crate::chunker::{self, Region};
use crate::error::{Error, IoContext, Result};
use crate::ids::{ChunkHash, ContentId, ContentKey, ObjectId};
use crate::object::MappedObject;
use crate::recipe::{self, fingerprint, Segment};
use crate::Store;

/// A stored chunk that a new chunk may duplicate (same fingerprint and length).
struct Candidate {
    hash: ChunkHash,
    object: ObjectId,
    offset: u64,
    object_map: Arc<MappedObject>,
}

impl Candidate {
    fn bytes(&self, len: u32) -> &[u8] {
        let at = self.offset as usize;
        &self.object_map.bytes()[at..at + len as usize]
    }
}

/// A chunk stored by the import in progress.
#[derive(Clone, Copy)]
pub(super) struct PendingChunk {
    pub(super) object: ObjectId,
    pub(super) offset: u64,
    pub(super) fast: u64,
}

pub(super) struct NewContent {
    pub(super) hash: ContentKey,
    pub(super) size: u64,
    pub(super) whole_object: Option<ObjectId>,
    pub(super) format: Option<String>,
    pub(super) segments: Vec<Segment>,
}

#[derive(Clone, Copy)]
pub(super) enum ContentRef {
    Existing(ContentId),
    New(usize),
}

/// State of one import between the first byte read and the commit.
pub(super) struct Ingest<'s> {
    store: &'s Store,
    next_object: ObjectId,
    /// Chunks this import stored: where, and their fingerprint (`chunks.fast`).
    pub(super) pending_chunks: HashMap<ChunkHash, PendingChunk>,
    /// Committed objects mapped for comparing bytes (None: could not map).
    object_maps: HashMap<ObjectId, Option<Arc<MappedObject>>>,
    pending_contents: HashMap<ContentKey, usize>,
    pub(super) new_objects: Vec<(ObjectId, u64, bool)>,
    pub(super) new_contents: Vec<NewContent>,
    /// Object files created by this import: deleted again if it fails.
    pub(super) created: Vec<PathBuf>,
    pub(super) object_dirs: BTreeSet<PathBuf>,
    pub(super) summary: ImportSummary,
}

/// A chunk's hash, and where it is stored if comparing bytes settled that.
type Resolved = (ChunkHash, Option<(ObjectId, u64)>);

/// What storing one file's chunks produced: its recipe so far, the object its
/// new chunks went to (if any did), and whether any chunk was already stored.
struct StoredChunks {
    segments: Vec<Segment>,
    object: Option<ObjectWriter>,
    saw_duplicate: bool,
}

impl<'s> Ingest<'s> {
    pub(super) fn new(store: &'s Store, next_object: ObjectId, summary: ImportSummary) -> Self {
        Ingest {
            store,
            next_object,
            pending_chunks: HashMap::new(),
            object_maps: HashMap::new(),
            pending_contents: HashMap::new(),
            new_objects: Vec::new(),
            new_contents: Vec::new(),
            created: Vec::new(),
            object_dirs: BTreeSet::new(),
            summary,
        }
    }
}

impl Ingest<'_> {
    /// Store one source file (its new chunks, and its content unless an
    /// identical one is stored already) and say which content it is.
    pub(super) fn ingest_file(
        &mut self,
        src: &SourceFile,
        layout: FileLayout,
        extra_spans: &[TensorSpan],
        progress: &dyn ImportProgress,
    ) -> Result<ContentRef> {
        let (file, size, map) = map_source(src)?;
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let FileLayout {
            format,
            tensors: mut spans,
            ..
        } = layout;
        spans.extend_from_slice(extra_spans);
        let regions = chunker::regions(size, &spans);
        let chunks = cut_chunks(src, bytes, &regions)?;

        let (stored, written) = self.store_chunks(src, bytes, &chunks, progress)?;
        let now = file.metadata().at(&src.abs)?.len();
        if now != size {
            return Err(Error::InvalidInput {
                path: src.abs.clone(),
                reason: format!("file changed size while being imported ({size} -> {now} bytes)"),
            });
        }

        let hash = content_key(&file, bytes, &regions, &stored.segments);
        if let Some(existing) = self.stored_content(&hash)? {
            // Identical to a stored file: keep nothing of this pass.
            if let Some(w) = stored.object {
                self.discard_object(w)?;
            }
            self.summary.identical_files += 1;
            return Ok(existing);
        }
        let whole_object = match stored.object {
            Some(w) => self.seal_object(src, w, written, stored.saw_duplicate)?,
            None => None,
        };
        Ok(self.add_content(NewContent {
            hash,
            size,
            whole_object,
            format,
            segments: stored.segments,
        }))
    }

    /// Resolve and store `chunks` batch by batch: a reader thread faults the
    /// next batch in while this thread resolves the current one on all cores,
    /// and a writer thread appends the new chunks. Returns what was stored
    /// and the bytes the writer wrote.
    fn store_chunks(
        &mut self,
        src: &SourceFile,
        bytes: &[u8],
        chunks: &[(u64, u32)],
        progress: &dyn ImportProgress,
    ) -> Result<(StoredChunks, u64)> {
        let mut stored = StoredChunks {
            segments: Vec::with_capacity(chunks.len()),
            object: None,
            saw_duplicate: false,
        };
        let batches = batches(chunks);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<usize>>(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<WriteJob>(1);
        let result: Result<u64> = std::thread::scope(|scope| {
            let batches = &batches;
            let reader = scope.spawn(move || read_ahead(chunks, batches, bytes, ready_tx));
            let writer = scope.spawn(move || write_runs(job_rx, bytes));
            let outcome = (|| -> Result<()> {
                for ready in &ready_rx {
                    let (first, end) = batches[ready.at(&src.abs)?];
                    let batch = &chunks[first..end];
                    let runs = self.store_batch(&mut stored, batch, bytes)?;
                    let batch_bytes: u64 = batch.iter().map(|&(_, len)| u64::from(len)).sum();
                    progress.advance(batch_bytes);
                    let target = stored
                        .object
                        .as_ref()
                        .map(|w| (Arc::clone(&w.file), w.path.clone()));
                    if job_tx
                        .send(WriteJob {
                            object: target,
                            runs,
                        })
                        .is_err()
                    {
                        break; // the writer failed; its error is reported below
                    }
                }
                Ok(())
            })();
            drop(ready_rx);
            drop(job_tx);
            reader.join().expect("reader thread panicked");
            let written = writer.join().expect("writer thread panicked");
            outcome.and(written)
        });
        let written = result?;
        Ok((stored, written))
    }

    /// Add one batch of chunks to `stored`: known chunks by where they are
    /// stored, new ones by the place assigned to them in the object. Returns
    /// the runs of source bytes the writer is to append.
    fn store_batch(
        &mut self,
        stored: &mut StoredChunks,
        batch: &[(u64, u32)],
        bytes: &[u8],
    ) -> Result<Vec<(u64, u64, u64)>> {
        let (fast, resolved) = self.resolve_batch(batch, bytes)?;
        // Consecutive new chunks form one run, written with one call.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for ((&(off, len), (hash, known)), &fast) in batch.iter().zip(resolved).zip(&fast) {
            // Looked up one chunk at a time, after the chunks before it were
            // assigned: a chunk may repeat an earlier one of the same batch.
            let known = match known {
                Some(loc) => {
                    self.summary.recognised_bytes += u64::from(len);
                    Some(loc)
                }
                None => self.lookup_chunk(&hash)?,
            };
            let (object, object_offset) = match known {
                Some(loc) => {
                    stored.saw_duplicate = true;
                    loc
                }
                None => {
                    let loc = self.assign_new_chunk(&mut stored.object, hash, off, len, fast)?;
                    let end = off + u64::from(len);
                    match runs.last_mut() {
                        Some(run) if run.1 == off => run.1 = end,
                        _ => runs.push((off, end, loc.1)),
                    }
                    loc
                }
            };
            stored.segments.push(Segment {
                hash,
                object,
                object_offset,
                len,
            });
        }
        Ok(runs)
    }

    /// Each chunk's fingerprint, and its hash together with where it is stored
    /// if that was settled by comparing bytes. Known chunks are recognised by
    /// fingerprint + comparing bytes with a resident stored copy; the rest are
    /// hashed.
    fn resolve_batch(
        &mut self,
        batch: &[(u64, u32)],
        bytes: &[u8],
    ) -> Result<(Vec<u64>, Vec<Resolved>)> {
        let chunk_bytes = |off: u64, len: u32| &bytes[off as usize..off as usize + len as usize];
        let fast: Vec<u64> = batch
            .par_iter()
            .map(|&(off, len)| fingerprint(chunk_bytes(off, len)))
            .collect();
        let candidates = batch
            .iter()
            .zip(&fast)
            .map(|(&(_, len), &f)| self.resident_candidate(f, len))
            .collect::<Result<Vec<_>>>()?;
        let resolved = batch
            .par_iter()
            .zip(candidates.par_iter())
            .map(|(&(off, len), candidate)| {
                let mine = chunk_bytes(off, len);
                match candidate {
                    Some(c) if c.bytes(len) == mine => (c.hash, Some((c.object, c.offset))),
                    _ => (ChunkHash::of(mine), None),
                }
            })
            .collect();
        Ok((fast, resolved))
    }

    fn lookup_chunk(&self, hash: &ChunkHash) -> Result<Option<(ObjectId, u64)>> {
        if let Some(p) = self.pending_chunks.get(hash) {
            return Ok(Some((p.object, p.offset)));
        }
        self.store.catalog().chunk(hash)
    }

    /// A committed chunk that may hold the same bytes as a chunk of length
    /// `len` whose fingerprint is `fast`, if its bytes are in the page cache now.
    /// Comparing with resident bytes costs a fraction of hashing; comparing
    /// with bytes on disk would cost a read, so those are hashed instead.
    fn resident_candidate(&mut self, fast: u64, len: u32) -> Result<Option<Candidate>> {
        for (hash, object, offset) in self.store.catalog().chunks_by_fast(fast, len)? {
            let map = match self.object_maps.get(&object) {
                Some(m) => m.clone(),
                None => {
                    // An object that cannot be mapped only means no
                    // candidate: the chunk is hashed instead.
                    let m = self.store.map_object(object).ok().map(Arc::new);
                    self.object_maps.insert(object, m.clone());
                    m
                }
            };
            let Some(object_map) = map else { continue };
            let Some(bytes) = object_map.range(offset, u64::from(len)) else {
                continue;
            };
            let (resident, pages) = crate::pages::residency(bytes);
            if resident == pages {
                return Ok(Some(Candidate {
                    hash,
                    object,
                    offset,
                    object_map,
                }));
            }
        }
        Ok(None)
    }

    /// Give a new chunk its place in the file's object (created on the first
    /// new chunk; see [`ObjectWriter::assign`]) and record it as stored by
    /// this import. Returns where it goes.
    fn assign_new_chunk(
        &mut self,
        object: &mut Option<ObjectWriter>,
        hash: ChunkHash,
        file_offset: u64,
        len: u32,
        fast: u64,
    ) -> Result<(ObjectId, u64)> {
        if object.is_none() {
            *object = Some(self.new_object()?);
        }
        let w = object.as_mut().expect("just created");
        let obj_off = w.assign(file_offset, len);
        self.pending_chunks.insert(
            hash,
            PendingChunk {
                object: w.id,
                offset: obj_off,
                fast,
            },
        );
        Ok((w.id, obj_off))
    }

    fn new_object(&mut self) -> Result<ObjectWriter> {
        let id = self.next_object;
        self.next_object.0 += 1;
        let path = self.store.object_path(id);
        let dir = path
            .parent()
            .expect("object path has a parent")
            .to_path_buf();
        if self.object_dirs.insert(dir.clone()) {
            std::fs::create_dir_all(&dir).at(&dir)?;
            crate::set_mode(&dir, 0o755)?;
        }
        // Truncate: a file of this id can only be left over from an import
        // that died before committing, so nothing refers to it.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)
            .at(&path)?;
        self.created.push(path.clone());
        // open(2) applies the umask to the mode; the store's files are
        // 0644 whatever it is (store-format §2), like its directories.
        crate::set_mode(&path, 0o644)?;
        Ok(ObjectWriter {
            id,
            path,
            file: Arc::new(file),
            assigned: 0,
            padding: 0,
            run_end: None,
        })
    }

    /// The content with key `hash`, if this import or an earlier one stored it.
    fn stored_content(&self, hash: &ContentKey) -> Result<Option<ContentRef>> {
        Ok(match self.pending_contents.get(hash) {
            Some(&i) => Some(ContentRef::New(i)),
            None => self
                .store
                .catalog()
                .content_by_hash(hash)?
                .map(ContentRef::Existing),
        })
    }

    /// Forget an object whose file turned out to be stored already: its
    /// chunks, and the file itself.
    fn discard_object(&mut self, w: ObjectWriter) -> Result<()> {
        self.pending_chunks.retain(|_, p| p.object != w.id);
        drop(w.file);
        std::fs::remove_file(&w.path).at(&w.path)?;
        self.created.retain(|p| p != &w.path);
        Ok(())
    }

    /// Check and fsync the object a file's new chunks went to, and record it.
    /// Returns it as the file's whole object if every chunk of the file is in
    /// it (no chunk was stored already).
    fn seal_object(
        &mut self,
        src: &SourceFile,
        w: ObjectWriter,
        written: u64,
        saw_duplicate: bool,
    ) -> Result<Option<ObjectId>> {
        if written + w.padding != w.assigned {
            return Err(Error::Corrupt(format!(
                "{}: wrote {written} bytes to object {} but assigned {} (+{} of holes)",
                src.abs.display(),
                w.path.display(),
                w.assigned - w.padding,
                w.padding
            )));
        }
        w.file.sync_all().at(&w.path)?;
        self.summary.new_bytes += written;
        self.new_objects.push((w.id, w.assigned, !saw_duplicate));
        Ok((!saw_duplicate).then_some(w.id))
    }

    /// Record a content this import stores, and refer to it.
    fn add_content(&mut self, content: NewContent) -> ContentRef {
        if content.whole_object.is_some() {
            self.summary.whole_files += 1;
        } else {
            self.summary.recipe_files += 1;
        }
        let hash = content.hash;
        self.new_contents.push(content);
        self.pending_contents
            .insert(hash, self.new_contents.len() - 1);
        ContentRef::New(self.new_contents.len() - 1)
    }
}

/// Open and map a source file, returning the file, its size and the mapping
/// (none for an empty file).
fn map_source(src: &SourceFile) -> Result<(File, u64, Option<memmap2::Mmap>)> {
    let file = File::open(&src.abs).at(&src.abs)?;
    let size = file.metadata().at(&src.abs)?.len();
    // Hashing and copying work on a read-only mapping of the source: no
    // copy into a buffer first (that copy cost a third as much as the
    // hashing). Pages are faulted in per batch by `populate`, so a file
    // that shrinks underneath is an error, not SIGBUS.
    let map = if size == 0 {
        None
    } else {
        let len = usize::try_from(size).map_err(|_| Error::InvalidInput {
            path: src.abs.clone(),
            reason: "file too large for the address space".into(),
        })?;
        // SAFETY: read-only private mapping of a file we opened; its bytes
        // are only read after `populate` succeeded for them.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }.at(&src.abs)?;
        let _ = map.advise(memmap2::Advice::Sequential);
        Some(map)
    };
    Ok((file, size, map))
}

/// Cut the file's bytes into chunks along `regions`.
fn cut_chunks(src: &SourceFile, bytes: &[u8], regions: &[Region]) -> Result<Vec<(u64, u32)>> {
    // Content-defined chunking reads the bytes it cuts.
    for r in regions {
        if let Region::Other { offset, len } = *r {
            populate(bytes, offset, offset + len).at(&src.abs)?;
        }
    }
    Ok(chunker::cut(bytes, regions))
}

/// The file's content key.
fn content_key(file: &File, bytes: &[u8], regions: &[Region], segments: &[Segment]) -> ContentKey {
    // The key is defined over the chunking the bytes alone decide; when
    // the file name or an ONNX model's external-data spans changed the
    // chunking, that needs a second pass (store-format §3).
    if chunker::canonical_regions(&file) == regions {
        recipe::content_key(segments.iter().map(|s| (s.hash, s.len)))
    } else {
        chunker::canonical_key_of_bytes(bytes)
    }
}
