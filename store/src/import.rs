//! Importing a model: walk a directory (or one file, or a Hugging Face cache
//! snapshot), cut every file into chunks, store the chunks nobody has yet,
//! then publish the model in one catalog transaction.
//!
//! Crash safety comes from ordering, not from cleanup: object files are
//! written and fsync'd first, under names no committed catalog row points to;
//! the catalog commit (fsync'd WAL append) is the single instant the model
//! becomes visible. A kill before it leaves only unreferenced object files,
//! which `gc` deletes.
//!
//! Throughput: the source is mapped, not copied; a reader thread faults the
//! next 16 MiB batch in while the current one is hashed on all cores (each
//! byte once: the content key is derived from the chunk hashes) and a writer
//! thread appends its new chunks to the object file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use modelfs_formats::TensorSpan;
use rayon::prelude::*;
use rusqlite::params;

use crate::catalog::{KIND_DIR, KIND_FILE};
use crate::chunker;
use crate::error::{Error, IoContext, Result};
use crate::names::{check_relative_path, is_ancestor, validate_model_name};
use crate::object::MappedObject;
use crate::recipe::fingerprint;
use crate::ids::{ChunkHash, ContentId, ContentKey, ObjectId};
use crate::recipe::{self, Segment};
use crate::{fsync_dir, Store};

/// Bytes read per batch. Large enough that per-batch overheads (channel hops,
/// rayon joins, one write per run of new chunks) vanish next to hashing.
const BATCH_BYTES: usize = 16 << 20;
/// Start writeback of an object every this many bytes, so the fsync at the
/// end of a large file finds little left to write.
const WRITE_BEHIND: u64 = 16 << 20;

pub struct ImportOptions {
    /// Model name; validated by [`validate_model_name`].
    pub name: String,
    /// Replace an existing model of the same name instead of failing.
    pub replace: bool,
    /// Follow symlinks that point outside the imported tree.
    pub follow_symlinks: bool,
}

/// Callbacks for a progress display. All methods default to doing nothing.
pub trait ImportProgress: Sync {
    fn begin(&self, _files: u64, _bytes: u64) {}
    fn file(&self, _path: &str) {}
    fn advance(&self, _bytes: u64) {}
    fn warn(&self, _message: &str) {}
    fn waiting_for_lock(&self) {}
}

pub struct NoProgress;
impl ImportProgress for NoProgress {}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    pub name: String,
    pub files: u64,
    pub logical_bytes: u64,
    /// Bytes written to new object files (what the store grew by).
    pub new_bytes: u64,
    pub seconds: f64,
    /// Files stored as whole-file objects.
    pub whole_files: u64,
    /// Files stored as recipes over existing chunks.
    pub recipe_files: u64,
    /// Files identical to content already stored.
    pub identical_files: u64,
    /// Bytes of chunks recognised as already stored by comparing them with
    /// the stored copy in the page cache, instead of hashing them.
    pub recognised_bytes: u64,
    pub warnings: Vec<String>,
}

/// The name a model gets when `--name` is not given: `org/name` for a Hugging
/// Face cache repo or snapshot, the directory name for a directory, the file
/// stem for a single file.
pub fn default_model_name(source: &Path) -> Option<String> {
    let abs = std::fs::canonicalize(source).ok()?;
    if let Some(repo) = hf_repo_dir(&abs) {
        let dir_name = repo.file_name()?.to_str()?;
        let rest = dir_name.split_once("--")?.1;
        return Some(rest.replace("--", "/"));
    }
    if abs.is_file() {
        return Some(abs.file_stem()?.to_str()?.to_string());
    }
    Some(abs.file_name()?.to_str()?.to_string())
}

/// If `dir` is a Hugging Face cache repo (`models--org--name`) or one of its
/// snapshots, the repo directory.
fn hf_repo_dir(dir: &Path) -> Option<PathBuf> {
    let is_repo = |p: &Path| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            ["models--", "datasets--", "spaces--"]
                .iter()
                .any(|k| n.starts_with(k))
        }) && p.join("snapshots").is_dir()
    };
    if is_repo(dir) {
        return Some(dir.to_path_buf());
    }
    let parent = dir.parent()?;
    if parent.file_name()? == "snapshots" {
        let repo = parent.parent()?;
        if is_repo(repo) {
            return Some(repo.to_path_buf());
        }
    }
    None
}

/// A Hugging Face cache repo directory stands for its `refs/main` snapshot.
fn resolve_hf_repo(abs: &Path) -> Result<PathBuf> {
    if !(abs.is_dir() && hf_repo_dir(abs).as_deref() == Some(abs)) {
        return Ok(abs.to_path_buf());
    }
    let refs = abs.join("refs/main");
    let rev = std::fs::read_to_string(&refs).at(&refs)?;
    let snap = abs.join("snapshots").join(rev.trim());
    if !snap.is_dir() {
        return Err(Error::InvalidInput {
            path: snap,
            reason: "refs/main names a snapshot that does not exist".into(),
        });
    }
    Ok(snap)
}

struct SourceFile {
    rel: String,
    abs: PathBuf,
    size: u64,
    executable: bool,
}

struct SourceTree {
    files: Vec<SourceFile>,
    dirs: Vec<String>,
}

/// List the files to import, applying the symlink policy: links are followed
/// only when their target stays inside the imported tree (or, for a Hugging
/// Face snapshot, inside its repo's `blobs/`), unless `follow_symlinks`.
fn walk(source: &Path, follow_symlinks: bool) -> Result<SourceTree> {
    let root = std::fs::canonicalize(source).at(source)?;
    let root = resolve_hf_repo(&root)?;
    let mut allowed = vec![root.clone()];
    if let Some(repo) = hf_repo_dir(&root) {
        allowed.push(repo);
    }
    let meta = std::fs::metadata(&root).at(&root)?;
    let mut tree = SourceTree {
        files: Vec::new(),
        dirs: Vec::new(),
    };
    if meta.is_file() {
        let name =
            root.file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::InvalidInput {
                    path: root.clone(),
                    reason: "file name is not valid UTF-8".into(),
                })?;
        tree.files.push(SourceFile {
            rel: name.to_string(),
            abs: root.clone(),
            size: meta.len(),
            executable: meta.mode() & 0o111 != 0,
        });
        return Ok(tree);
    }
    if !meta.is_dir() {
        return Err(Error::InvalidInput {
            path: root,
            reason: "not a regular file or directory".into(),
        });
    }
    let mut visited = HashSet::new();
    visited.insert((meta.dev(), meta.ino()));
    let mut stack = vec![(root.clone(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .at(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .at(&dir)?;
        names.sort();
        for name in names {
            let abs = dir.join(&name);
            let name = name.to_str().ok_or_else(|| Error::InvalidInput {
                path: abs.clone(),
                reason: "file name is not valid UTF-8".into(),
            })?;
            let rel = if rel_dir.is_empty() {
                name.to_string()
            } else {
                format!("{rel_dir}/{name}")
            };
            check_relative_path(&rel).map_err(|reason| Error::InvalidInput {
                path: abs.clone(),
                reason: format!("unusable file name: {reason}"),
            })?;
            let lmeta = std::fs::symlink_metadata(&abs).at(&abs)?;
            let (target, meta) = if lmeta.file_type().is_symlink() {
                let target = std::fs::canonicalize(&abs).map_err(|e| Error::InvalidInput {
                    path: abs.clone(),
                    reason: format!("broken symlink ({e})"),
                })?;
                if !follow_symlinks && !allowed.iter().any(|a| target.starts_with(a)) {
                    return Err(Error::InvalidInput {
                        path: abs.clone(),
                        reason: format!(
                            "symlink points outside the imported tree (to {}); pass --follow-symlinks to import it",
                            target.display()
                        ),
                    });
                }
                let meta = std::fs::metadata(&target).at(&target)?;
                (target, meta)
            } else {
                (abs.clone(), lmeta)
            };
            if meta.is_dir() {
                if !visited.insert((meta.dev(), meta.ino())) {
                    return Err(Error::InvalidInput {
                        path: abs,
                        reason: "directory reached twice (symlink loop?)".into(),
                    });
                }
                tree.dirs.push(rel.clone());
                stack.push((target, rel));
            } else if meta.is_file() {
                tree.files.push(SourceFile {
                    rel,
                    abs: target,
                    size: meta.len(),
                    executable: meta.mode() & 0o111 != 0,
                });
            } else {
                return Err(Error::InvalidInput {
                    path: abs,
                    reason: "not a regular file or directory (device, FIFO or socket)".into(),
                });
            }
        }
    }
    tree.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    tree.dirs.sort();
    Ok(tree)
}

/// For every ONNX model in the tree, the tensor spans it declares in external
/// data files, keyed by the data file's path in the model.
fn onnx_external_spans(tree: &SourceTree) -> HashMap<String, Vec<TensorSpan>> {
    let mut out: HashMap<String, Vec<TensorSpan>> = HashMap::new();
    for f in tree.files.iter().filter(|f| f.rel.ends_with(".onnx")) {
        let Ok(file) = File::open(&f.abs) else {
            continue;
        };
        let Ok(Some(layout)) = modelfs_formats::layout(&f.rel, &file) else {
            continue;
        };
        let dir = Path::new(&f.rel).parent().unwrap_or(Path::new(""));
        for ext in layout.external {
            let joined = dir.join(&ext.location);
            // Only plain relative locations inside the model are honoured.
            if joined
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
            {
                continue;
            }
            if let Some(rel) = joined.to_str() {
                out.entry(rel.to_string()).or_default().push(TensorSpan {
                    offset: ext.offset,
                    len: ext.len,
                });
            }
        }
    }
    out
}

/// Read `bytes[from..to]` of a source mapping in now. Done for each batch
/// before any thread touches it, because MADV_POPULATE_READ reports a file
/// that shrank under the mapping as an error, where touching the missing
/// pages would kill the process with SIGBUS. (A truncation between this call
/// and the hashing still would: the import then dies like a `kill -9`, and
/// publishes nothing.)
fn populate(bytes: &[u8], from: u64, to: u64) -> io::Result<()> {
    crate::pages::advise(&bytes[from as usize..to as usize], libc::MADV_POPULATE_READ).map_err(
        |e| match e.raw_os_error() {
            Some(libc::EFAULT) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being imported",
            ),
            _ => e,
        },
    )
}

/// Group `chunks` into batches of about BATCH_BYTES: (first chunk, end chunk).
fn batches(chunks: &[(u64, u32)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut first = 0;
    let mut bytes = 0usize;
    for (i, &(_, len)) in chunks.iter().enumerate() {
        if bytes + len as usize > BATCH_BYTES && i > first {
            out.push((first, i));
            first = i;
            bytes = 0;
        }
        bytes += len as usize;
    }
    if first < chunks.len() {
        out.push((first, chunks.len()));
    }
    out
}

/// The object file a file's new chunks are appended to. Offsets are handed
/// out by the hashing thread; bytes are written by the writer thread.
struct ObjectWriter {
    id: ObjectId,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes assigned to chunks so far (written or queued for writing).
    assigned: u64,
}

/// Bytes of the source to append to an object: runs of (file offset, end,
/// object offset).
struct WriteJob {
    object: Option<(Arc<File>, PathBuf)>,
    runs: Vec<(u64, u64, u64)>,
}

/// The writer thread: copies runs of new chunks from the source mapping into
/// their object and starts writeback early. Returns the bytes written.
fn write_runs(jobs: mpsc::Receiver<WriteJob>, source: &[u8]) -> Result<u64> {
    let mut written = 0u64;
    let mut writeback_from = 0u64;
    for job in jobs {
        let Some((file, path)) = &job.object else {
            continue;
        };
        for &(start, end, at) in &job.runs {
            file.write_all_at(&source[start as usize..end as usize], at)
                .at(path)?;
            written += end - start;
            let upto = at + (end - start);
            if upto - writeback_from >= WRITE_BEHIND {
                // SAFETY: sync_file_range on our own descriptor; it only starts I/O.
                unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        writeback_from as i64,
                        (upto - writeback_from) as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                writeback_from = upto;
            }
        }
    }
    Ok(written)
}

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
struct PendingChunk {
    object: ObjectId,
    offset: u64,
    fast: u64,
}

struct NewContent {
    hash: ContentKey,
    size: u64,
    whole_object: Option<ObjectId>,
    format: Option<String>,
    segments: Vec<Segment>,
}

#[derive(Clone, Copy)]
enum ContentRef {
    Existing(ContentId),
    New(usize),
}

/// State of one import between the first byte read and the commit.
struct Ingest<'s> {
    store: &'s Store,
    next_object: ObjectId,
    /// Chunks this import stored: where, and their fingerprint (`chunks.fast`).
    pending_chunks: HashMap<ChunkHash, PendingChunk>,
    /// Committed objects mapped for comparing bytes (None: could not map).
    object_maps: HashMap<ObjectId, Option<Arc<MappedObject>>>,
    pending_contents: HashMap<ContentKey, usize>,
    new_objects: Vec<(ObjectId, u64, bool)>,
    new_contents: Vec<NewContent>,
    /// Object files created by this import: deleted again if it fails.
    created: Vec<PathBuf>,
    object_dirs: BTreeSet<PathBuf>,
    summary: ImportSummary,
}

impl Ingest<'_> {
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
        Ok(ObjectWriter {
            id,
            path,
            file: Arc::new(file),
            assigned: 0,
        })
    }

    fn ingest_file(
        &mut self,
        src: &SourceFile,
        extra_spans: &[TensorSpan],
        progress: &dyn ImportProgress,
    ) -> Result<ContentRef> {
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
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);

        let (format, mut spans) = match modelfs_formats::layout(&src.rel, &file) {
            Ok(Some(layout)) => (
                Some(format!("{:?}", layout.format).to_lowercase()),
                layout.tensors,
            ),
            Ok(None) => (None, Vec::new()),
            Err(e) => {
                let msg = format!(
                    "{}: could not parse as a model file ({e}); storing it with content-defined chunking",
                    src.abs.display()
                );
                progress.warn(&msg);
                self.summary.warnings.push(msg);
                (None, Vec::new())
            }
        };
        spans.extend_from_slice(extra_spans);
        let regions = chunker::regions(size, &spans);
        // Content-defined chunking reads the bytes it cuts.
        for r in &regions {
            if let chunker::Region::Other { offset, len } = *r {
                populate(bytes, offset, offset + len).at(&src.abs)?;
            }
        }
        let chunks = chunker::cut(bytes, &regions);

        let mut segments: Vec<Segment> = Vec::with_capacity(chunks.len());
        let mut object: Option<ObjectWriter> = None;
        let mut saw_duplicate = false;

        let batches = batches(&chunks);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<usize>>(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<WriteJob>(1);
        let result: Result<u64> = std::thread::scope(|scope| {
            let (chunks, batches) = (&chunks, &batches);
            // Faults the next batch in (from disk if it is cold) while the
            // current one is hashed.
            let reader = scope.spawn(move || {
                for (i, &(first, end)) in batches.iter().enumerate() {
                    let from = chunks[first].0;
                    let to = chunks[end - 1].0 + u64::from(chunks[end - 1].1);
                    let ready = populate(bytes, from, to).map(|()| i);
                    let failed = ready.is_err();
                    if ready_tx.send(ready).is_err() || failed {
                        break;
                    }
                }
            });
            let writer = scope.spawn(move || write_runs(job_rx, bytes));
            let outcome = (|| -> Result<()> {
                for ready in &ready_rx {
                    let (first, end) = batches[ready.at(&src.abs)?];
                    let batch = &chunks[first..end];
                    let chunk_bytes =
                        |off: u64, len: u32| &bytes[off as usize..off as usize + len as usize];
                    // Known chunks are recognised by fingerprint + comparing bytes
                    // with a resident stored copy; the rest are hashed.
                    let fast: Vec<u64> = batch
                        .par_iter()
                        .map(|&(off, len)| fingerprint(chunk_bytes(off, len)))
                        .collect();
                    let candidates = batch
                        .iter()
                        .zip(&fast)
                        .map(|(&(_, len), &f)| self.resident_candidate(f, len))
                        .collect::<Result<Vec<_>>>()?;
                    let resolved: Vec<(ChunkHash, Option<(ObjectId, u64)>)> = batch
                        .par_iter()
                        .zip(candidates.par_iter())
                        .map(|(&(off, len), candidate)| {
                            let mine = chunk_bytes(off, len);
                            match candidate {
                                Some(c) if c.bytes(len) == mine => {
                                    (c.hash, Some((c.object, c.offset)))
                                }
                                _ => (ChunkHash::of(mine), None),
                            }
                        })
                        .collect();
                    // Consecutive new chunks form one run, written with one call.
                    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
                    for ((&(off, len), (hash, known)), &fast) in
                        batch.iter().zip(resolved).zip(&fast)
                    {
                        let known = match known {
                            Some(loc) => {
                                self.summary.recognised_bytes += u64::from(len);
                                Some(loc)
                            }
                            None => self.lookup_chunk(&hash)?,
                        };
                        if let Some((obj, obj_off)) = known {
                            saw_duplicate = true;
                            segments.push(Segment {
                                hash,
                                object: obj,
                                object_offset: obj_off,
                                len,
                            });
                            continue;
                        }
                        if object.is_none() {
                            object = Some(self.new_object()?);
                        }
                        let w = object.as_mut().expect("just created");
                        let obj_off = w.assigned;
                        w.assigned += u64::from(len);
                        self.pending_chunks.insert(
                            hash,
                            PendingChunk {
                                object: w.id,
                                offset: obj_off,
                                fast,
                            },
                        );
                        segments.push(Segment {
                            hash,
                            object: w.id,
                            object_offset: obj_off,
                            len,
                        });
                        let end = off + u64::from(len);
                        match runs.last_mut() {
                            Some(run) if run.1 == off => run.1 = end,
                            _ => runs.push((off, end, obj_off)),
                        }
                    }
                    let batch_bytes: u64 = batch.iter().map(|&(_, len)| u64::from(len)).sum();
                    progress.advance(batch_bytes);
                    let target = object
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
        let now = file.metadata().at(&src.abs)?.len();
        if now != size {
            return Err(Error::InvalidInput {
                path: src.abs.clone(),
                reason: format!("file changed size while being imported ({size} -> {now} bytes)"),
            });
        }

        // The key is defined over the chunking the bytes alone decide; when
        // the file name or an ONNX model's external-data spans changed the
        // chunking, that needs a second pass (store-format §3).
        let hash = if chunker::canonical_regions(&file) == regions {
            recipe::content_key(segments.iter().map(|s| (s.hash, s.len)))
        } else {
            chunker::canonical_key_of_bytes(bytes)
        };
        let existing = match self.pending_contents.get(&hash) {
            Some(&i) => Some(ContentRef::New(i)),
            None => self
                .store
                .catalog()
                .content_by_hash(&hash)?
                .map(ContentRef::Existing),
        };
        if let Some(existing) = existing {
            // Identical to a stored file: keep nothing of this pass.
            if let Some(w) = object {
                self.pending_chunks.retain(|_, p| p.object != w.id);
                drop(w.file);
                std::fs::remove_file(&w.path).at(&w.path)?;
                self.created.retain(|p| p != &w.path);
            }
            self.summary.identical_files += 1;
            return Ok(existing);
        }

        let whole_object = match object {
            Some(w) => {
                if written != w.assigned {
                    return Err(Error::Corrupt(format!(
                        "{}: wrote {written} bytes to object {} but assigned {}",
                        src.abs.display(),
                        w.path.display(),
                        w.assigned
                    )));
                }
                w.file.sync_all().at(&w.path)?;
                self.summary.new_bytes += written;
                self.new_objects.push((w.id, written, !saw_duplicate));
                (!saw_duplicate).then_some(w.id)
            }
            None => None,
        };
        if whole_object.is_some() {
            self.summary.whole_files += 1;
        } else {
            self.summary.recipe_files += 1;
        }
        self.new_contents.push(NewContent {
            hash,
            size,
            whole_object,
            format,
            segments,
        });
        self.pending_contents
            .insert(hash, self.new_contents.len() - 1);
        Ok(ContentRef::New(self.new_contents.len() - 1))
    }
}

impl Store {
    /// Import `source` as model `opts.name`. On error nothing becomes visible
    /// and objects written so far are removed (or left for `gc` if even that fails).
    pub fn import(
        &mut self,
        source: &Path,
        opts: &ImportOptions,
        progress: &dyn ImportProgress,
    ) -> Result<ImportSummary> {
        let started = Instant::now();
        validate_model_name(&opts.name)?;
        let tree = walk(source, opts.follow_symlinks)?;
        let _lock = self.lock_writer(|| progress.waiting_for_lock())?;
        self.check_name_free(&opts.name, opts.replace)?;

        let logical: u64 = tree.files.iter().map(|f| f.size).sum();
        progress.begin(tree.files.len() as u64, logical);
        let external = onnx_external_spans(&tree);
        let next_object = self.catalog().next_object_id()?;
        let mut ingest = Ingest {
            store: self,
            next_object,
            pending_chunks: HashMap::new(),
            object_maps: HashMap::new(),
            pending_contents: HashMap::new(),
            new_objects: Vec::new(),
            new_contents: Vec::new(),
            created: Vec::new(),
            object_dirs: BTreeSet::new(),
            summary: ImportSummary {
                name: opts.name.clone(),
                files: tree.files.len() as u64,
                logical_bytes: logical,
                new_bytes: 0,
                seconds: 0.0,
                whole_files: 0,
                recipe_files: 0,
                identical_files: 0,
                recognised_bytes: 0,
                warnings: Vec::new(),
            },
        };
        let mut refs = Vec::with_capacity(tree.files.len());
        let mut outcome = Ok(());
        for f in &tree.files {
            progress.file(&f.rel);
            let extra = external.get(&f.rel).map(Vec::as_slice).unwrap_or(&[]);
            match ingest.ingest_file(f, extra, progress) {
                Ok(r) => refs.push(r),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let outcome = outcome.and_then(|()| {
            for dir in &ingest.object_dirs {
                fsync_dir(dir)?;
            }
            if !ingest.object_dirs.is_empty() {
                fsync_dir(&self.root().join(crate::OBJECTS_DIR))?;
            }
            self.commit(&ingest, &tree, &refs, source, opts)
        });
        if let Err(e) = outcome {
            for p in &ingest.created {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        let mut summary = ingest.summary;
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    fn check_name_free(&self, name: &str, replace: bool) -> Result<()> {
        for m in self.models()? {
            if m.name == name && !replace {
                return Err(Error::ModelExists(name.to_string()));
            }
            if is_ancestor(&m.name, name) || is_ancestor(name, &m.name) {
                return Err(Error::InvalidName {
                    name: name.to_string(),
                    reason: format!(
                        "it would nest with model {:?} (a model's directory cannot contain another model)",
                        m.name
                    ),
                });
            }
        }
        Ok(())
    }

    fn commit(
        &self,
        ingest: &Ingest<'_>,
        tree: &SourceTree,
        refs: &[ContentRef],
        source: &Path,
        opts: &ImportOptions,
    ) -> Result<()> {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let source = std::fs::canonicalize(source)
            .unwrap_or_else(|_| source.to_path_buf())
            .to_string_lossy()
            .into_owned();
        let catalog = self.catalog();
        let tx = catalog
            .conn
            .unchecked_transaction()
            .map_err(|e| catalog.err(e))?;
        let run = || -> rusqlite::Result<()> {
            if opts.replace {
                tx.execute("DELETE FROM models WHERE name = ?1", [&opts.name])?;
            }
            {
                let mut ins =
                    tx.prepare("INSERT INTO objects(id, size, whole) VALUES (?1, ?2, ?3)")?;
                for &(id, size, whole) in &ingest.new_objects {
                    ins.execute(params![id, size as i64, whole])?;
                }
            }
            let mut content_ids = Vec::with_capacity(ingest.new_contents.len());
            {
                let mut ins = tx.prepare(
                    "INSERT INTO contents(hash, size, whole_object, format, recipe) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                let mut chunk = tx.prepare(
                    "INSERT OR IGNORE INTO chunks(hash, object, offset, length, fast) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for c in &ingest.new_contents {
                    ins.execute(params![
                        &c.hash.0[..],
                        c.size as i64,
                        c.whole_object,
                        c.format,
                        recipe::encode(&c.segments)
                    ])?;
                    content_ids.push(ContentId(tx.last_insert_rowid()));
                    for s in &c.segments {
                        // Only chunks this import stored enter the index; the
                        // rest are in it already.
                        let stored_here = ingest
                            .pending_chunks
                            .get(&s.hash)
                            .filter(|p| (p.object, p.offset) == (s.object, s.object_offset));
                        if let Some(p) = stored_here {
                            chunk.execute(params![
                                &s.hash.0[..],
                                s.object,
                                s.object_offset as i64,
                                s.len,
                                p.fast as i64
                            ])?;
                        }
                    }
                }
            }
            tx.execute(
                "INSERT INTO models(name, imported_at, source, file_count, logical_bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![opts.name, now_ns, source, tree.files.len() as i64, ingest.summary.logical_bytes as i64],
            )?;
            let model_id = tx.last_insert_rowid();
            let mut ins = tx.prepare(
                "INSERT INTO entries(model, path, kind, content, mode) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for d in &tree.dirs {
                ins.execute(params![model_id, d, KIND_DIR, Option::<i64>::None, 0o555])?;
            }
            for (f, r) in tree.files.iter().zip(refs) {
                let cid = match *r {
                    ContentRef::Existing(id) => id,
                    ContentRef::New(i) => content_ids[i],
                };
                let mode = if f.executable { 0o555 } else { 0o444 };
                ins.execute(params![model_id, f.rel, KIND_FILE, cid, mode])?;
            }
            Ok(())
        };
        run().map_err(|e| catalog.err(e))?;
        tx.commit().map_err(|e| catalog.err(e))
    }
}
