//! The filesystem's logic, independent of FUSE: which inode is what, how a
//! file is opened (kernel passthrough or copy mode), and how copy-mode bytes
//! are read and checked. The FUSE adapter only translates.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Instant, SystemTime};

use memmap2::Mmap;
use modelfs_store::{locks, trace, ContentInfo, ObjectId, Store, TraceRecorder};
use tracing::{error, info, warn};

use crate::tree::{Tree, CONTROL_DIR_INO, ROOT_INO, STATS_INO};

/// What changed in a refresh, for kernel cache invalidation.
#[derive(Debug, Default)]
pub struct Changes {
    /// (parent inode, name) whose lookup result changed or vanished.
    pub entries: Vec<(u64, String)>,
    /// Directories whose listing or link count changed.
    pub dirs: Vec<u64>,
}

/// What a stat shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub is_dir: bool,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
}

/// Counters behind `.modelfs/stats.json`.
#[derive(Debug, Default)]
pub struct Stats {
    pub read_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub eio: AtomicU64,
    pub passthrough_opens: AtomicU64,
    /// Sizes of the files opened by passthrough: the kernel reads them
    /// without the daemon, so this is the only byte count it has for them.
    pub passthrough_opened_bytes: AtomicU64,
    pub copy_opens: AtomicU64,
    pub refreshes: AtomicU64,
    /// Models that appeared (imports) and disappeared (removals) while mounted.
    pub imports_seen: AtomicU64,
    pub removals_seen: AtomicU64,
    /// Load traces written, failed to write, and replayed.
    pub traces_saved: AtomicU64,
    pub trace_errors: AtomicU64,
    pub trace_replays: AtomicU64,
    /// Copy-mode read latency histogram: counts per bucket of
    /// [`LATENCY_BUCKETS_US`] (the last counts everything slower).
    pub read_latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub read_latency_sum_us: AtomicU64,
}

/// Upper bounds (microseconds) of the read latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

impl Stats {
    pub fn record_read_latency(&self, micros: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.read_latency[i].fetch_add(1, Ordering::Relaxed);
        self.read_latency_sum_us
            .fetch_add(micros, Ordering::Relaxed);
    }
}

/// An object file mapped for copy-mode reads. Holding it holds a shared
/// OFD lock, so gc does not punch holes in it while it is in use.
pub struct MappedObject {
    _file: File,
    pub(crate) map: Mmap,
    path: PathBuf,
}

impl MappedObject {
    /// Whole pages inside `[offset, offset+len)` of the mapping: pages at a
    /// block's edges are shared with its neighbours and are left alone, so
    /// unlocking one block never unlocks part of another.
    fn inner_pages(&self, offset: u64, len: u64) -> Option<(*const libc::c_void, usize)> {
        const PAGE: usize = 4096;
        let base = self.map.as_ptr() as usize;
        let end = (offset + len).min(self.map.len() as u64) as usize;
        let start = (base + offset as usize).div_ceil(PAGE) * PAGE;
        let stop = (base + end) / PAGE * PAGE;
        if stop > start {
            Some((start as *const libc::c_void, stop - start))
        } else {
            None
        }
    }

    /// mlock a range (faulting it in). False if the kernel refused.
    pub fn lock_range(&self, offset: u64, len: u64) -> bool {
        let Some((ptr, n)) = self.inner_pages(offset, len) else {
            return true;
        };
        // SAFETY: the range lies inside our live mapping.
        if unsafe { libc::mlock(ptr, n) } == 0 {
            return true;
        }
        crate::pin::warn_lock_failure(std::io::Error::last_os_error());
        false
    }

    /// The part of `[offset, offset+len)` inside the mapping.
    fn slice(&self, offset: u64, len: u64) -> &[u8] {
        let end = (offset.saturating_add(len)).min(self.map.len() as u64) as usize;
        &self.map[(offset as usize).min(end)..end]
    }

    /// Bytes of `[offset, offset+len)` whose pages are in the page cache
    /// (page granular, so an edge page counts whole when resident).
    pub fn resident_bytes(&self, offset: u64, len: u64) -> u64 {
        let bytes = self.slice(offset, len);
        let (resident, _) = modelfs_store::pages::residency(bytes);
        (resident as u64 * 4096).min(bytes.len() as u64)
    }

    /// Start reading a range from disk in the background (used by the
    /// trace replay, which must not wait for the disk step by step).
    pub fn will_need(&self, offset: u64, len: u64) {
        // Only a hint: if the kernel refuses it, the reads fault the bytes in.
        let _ = modelfs_store::pages::advise(self.slice(offset, len), libc::MADV_WILLNEED);
    }

    pub fn unlock_range(&self, offset: u64, len: u64) {
        if let Some((ptr, n)) = self.inner_pages(offset, len) {
            // SAFETY: as in lock_range.
            unsafe { libc::munlock(ptr, n) };
        }
    }
}

/// Byte counts of one content's copy-mode reads, for per-model stats.
#[derive(Debug, Default)]
pub struct ContentCounters {
    pub read_bytes: AtomicU64,
    /// Bytes whose pages were in memory when the read arrived (pinned,
    /// prefetched or still cached) vs bytes that had to come from disk.
    pub read_resident_bytes: AtomicU64,
    pub read_disk_bytes: AtomicU64,
    /// Bytes a trace replay brought in from disk ahead of the reader.
    pub prefetched_bytes: AtomicU64,
}

/// What the mount knows about one content for as long as it runs: which
/// chunks are checked, its counters, and its load trace.
pub struct ContentState {
    /// Per segment: [`UNCHECKED`], [`CHECKING`] (a thread is hashing it) or
    /// [`CHECKED`] since the mount started. The middle state lets a request
    /// wait for another worker's hash of a chunk instead of hashing it again.
    checks: Vec<AtomicU8>,
    pub counters: ContentCounters,
    /// Copy-mode handles open now; a trace is saved when it drops to 0.
    opens: AtomicU32,
    /// First-touch order of this mount's reads.
    recorder: Mutex<TraceRecorder>,
    /// Bytes covered by the trace on disk (0: none). A recording replaces it
    /// only when it covers more, so a partial look (`head`, a header read)
    /// never overwrites the trace of a full load.
    saved_covered: AtomicU64,
    /// A replay of the trace is running.
    replaying: AtomicBool,
}

/// A content opened in copy mode.
pub struct OpenContent {
    pub(crate) content: Arc<ContentInfo>,
    label: String,
    /// File offset of each segment.
    pub(crate) starts: Vec<u64>,
    pub(crate) objects: HashMap<ObjectId, Arc<MappedObject>>,
    pub(crate) state: Arc<ContentState>,
    /// Number of models referencing each segment's chunk (for pinning).
    refs: Vec<u32>,
}

/// Chunk locations (object, offset) checked against their hash in this
/// mount, whichever file they were read through: a chunk B shares with A
/// is not hashed again when B is read after A.
#[derive(Default)]
pub struct VerifiedChunks(Mutex<HashSet<(ObjectId, u64)>>);

impl VerifiedChunks {
    pub fn contains(&self, object: ObjectId, offset: u64) -> bool {
        self.0
            .lock()
            .expect("verified lock")
            .contains(&(object, offset))
    }

    pub fn insert(&self, object: ObjectId, offset: u64) {
        self.0
            .lock()
            .expect("verified lock")
            .insert((object, offset));
    }
}

impl ContentState {
    pub(crate) fn end_replay(&self) {
        self.replaying.store(false, Ordering::Release);
    }
}

const UNCHECKED: u8 = 0;
const CHECKING: u8 = 1;
const CHECKED: u8 = 2;

impl OpenContent {
    /// Whether segment `i` is known good; checks it (hashing its bytes) if
    /// not. False: the bytes do not match the hash.
    pub(crate) fn check_segment(&self, i: usize, checked: &VerifiedChunks) -> bool {
        let state = &self.state.checks[i];
        let mut waited = 0u32;
        loop {
            match state.compare_exchange(UNCHECKED, CHECKING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(CHECKED) => return true,
                // Another worker is hashing it (two requests can share a
                // chunk): its answer arrives within a chunk's hash time, or
                // its disk read. Sleep rather than spin: two vCPUs are
                // shared with the thread doing the work.
                Err(_) => {
                    waited += 1;
                    if waited < 16 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                }
            }
        }
        self.finish_check(i, checked)
    }

    /// Hash segment `i`, which the caller has claimed (CHECKING), and publish the result.
    fn finish_check(&self, i: usize, checked: &VerifiedChunks) -> bool {
        let state = &self.state.checks[i];
        let s = &self.content.segments[i];
        let good = checked.contains(s.object, s.object_offset) || {
            let obj = &self.objects[&s.object];
            let (a, b) = (
                s.object_offset as usize,
                s.object_offset as usize + s.len as usize,
            );
            b <= obj.map.len() && blake3::hash(&obj.map[a..b]).as_bytes() == &s.hash.0
        };
        if good {
            checked.insert(s.object, s.object_offset);
        }
        // A bad chunk goes back to unchecked, so every read of it fails.
        state.store(if good { CHECKED } else { UNCHECKED }, Ordering::Release);
        good
    }

    pub(crate) fn still_open(&self) -> bool {
        self.state.opens.load(Ordering::Relaxed) > 0
    }
}

/// How an open file is served.
pub enum OpenPlan {
    /// Kernel passthrough to this whole-file object.
    Passthrough {
        content_id: i64,
        object: PathBuf,
    },
    Copy(Arc<OpenContent>),
    /// A generated file (stats.json): these bytes.
    Generated(Vec<u8>),
}

/// Bytes answering a read: a slice of a mapped object, or a copy assembled
/// from several chunks.
pub enum ReadOut {
    Mapped(Arc<MappedObject>, usize, usize),
    Owned(Vec<u8>),
}

impl ReadOut {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            ReadOut::Mapped(o, start, end) => &o.map[*start..*end],
            ReadOut::Owned(v) => v,
        }
    }
}

pub struct Vfs {
    store: Mutex<Store>,
    tree: RwLock<Arc<Tree>>,
    catalog_version: Mutex<i64>,
    mounted_at: SystemTime,
    started: Instant,
    objects: Mutex<HashMap<ObjectId, Weak<MappedObject>>>,
    contents: Mutex<HashMap<i64, Arc<ContentState>>>,
    verified_chunks: VerifiedChunks,
    /// How far a trace replay may run ahead of the reader (0: no replay).
    prefetch_window: u64,
    /// Result of checking a whole-file object once per mount: true = intact.
    whole_checked: Mutex<HashMap<i64, Arc<std::sync::OnceLock<bool>>>>,
    passthrough: AtomicBool,
    pub stats: Stats,
    pub pinner: crate::pin::Pinner,
    /// Passthrough opens whose chunks the pin worker should consider.
    pin_queue: Mutex<Option<std::sync::mpsc::Sender<Arc<ContentInfo>>>>,
    store_root: PathBuf,
}

impl Vfs {
    pub fn new(
        store_root: &Path,
        passthrough: bool,
        pin_budget: u64,
        prefetch_window: u64,
    ) -> modelfs_store::Result<Vfs> {
        // Registering passthrough backing files needs CAP_SYS_ADMIN.
        // SAFETY: geteuid has no preconditions.
        let passthrough = passthrough && unsafe { libc::geteuid() } == 0;
        let store = Store::open(store_root)?;
        let version = store.catalog().data_version()?;
        let mounted_at = SystemTime::now();
        let tree = Tree::build(&store.catalog().snapshot()?, mounted_at);
        Ok(Vfs {
            store_root: store.root().to_path_buf(),
            store: Mutex::new(store),
            tree: RwLock::new(Arc::new(tree)),
            catalog_version: Mutex::new(version),
            mounted_at,
            started: Instant::now(),
            objects: Mutex::new(HashMap::new()),
            contents: Mutex::new(HashMap::new()),
            verified_chunks: VerifiedChunks::default(),
            prefetch_window,
            whole_checked: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(passthrough),
            stats: Stats::default(),
            pinner: crate::pin::Pinner::new(pin_budget),
            pin_queue: Mutex::new(None),
        })
    }

    pub fn store_root(&self) -> &Path {
        &self.store_root
    }

    pub fn tree(&self) -> Arc<Tree> {
        self.tree.read().expect("tree lock").clone()
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Turn passthrough off (the kernel refused it); later opens use copy mode.
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    /// Rebuild the tree if the catalog changed. Returns what the kernel must
    /// forget, or None if nothing changed.
    pub fn refresh(&self) -> modelfs_store::Result<Option<Changes>> {
        let store = self.store.lock().expect("store lock");
        let version = store.catalog().data_version()?;
        let mut known = self.catalog_version.lock().expect("version lock");
        if version == *known {
            return Ok(None);
        }
        let snap = store.catalog().snapshot()?;
        let new = Arc::new(Tree::build(&snap, self.mounted_at));
        let old = std::mem::replace(&mut *self.tree.write().expect("tree lock"), new.clone());
        *known = version;
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        let added = new.model_imports.difference(&old.model_imports).count();
        let removed = old.model_imports.difference(&new.model_imports).count();
        self.stats
            .imports_seen
            .fetch_add(added as u64, Ordering::Relaxed);
        self.stats
            .removals_seen
            .fetch_add(removed as u64, Ordering::Relaxed);
        self.pinner
            .release_unless(|b| new.chunk_refs.contains_key(&(b.object, b.offset)));
        Ok(Some(Changes {
            entries: new.changed_entries(&old),
            dirs: new.changed_dirs(&old),
        }))
    }

    pub fn attr(&self, tree: &Tree, ino: u64) -> Option<Attr> {
        if ino == STATS_INO {
            return Some(Attr {
                ino,
                size: 0,
                is_dir: false,
                perm: 0o444,
                nlink: 1,
                mtime: SystemTime::now(),
            });
        }
        if let Some(d) = tree.dirs.get(&ino) {
            return Some(Attr {
                ino,
                size: 0,
                is_dir: true,
                perm: 0o555,
                nlink: 2 + d.subdirs,
                mtime: d.mtime,
            });
        }
        tree.files.get(&ino).map(|f| Attr {
            ino,
            size: f.content.size,
            is_dir: false,
            perm: f.mode as u16,
            nlink: f.nlink,
            mtime: f.mtime,
        })
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<Attr> {
        let tree = self.tree();
        let ino = *tree.dirs.get(&parent)?.children.get(name)?;
        self.attr(&tree, ino)
    }

    /// Directory listing with `.` and `..`: (inode, is_dir, name).
    pub fn readdir(&self, ino: u64) -> Option<Vec<(u64, bool, String)>> {
        let tree = self.tree();
        let d = tree.dirs.get(&ino)?;
        let mut out = vec![
            (ino, true, ".".to_string()),
            (d.parent, true, "..".to_string()),
        ];
        for (name, &child) in &d.children {
            let is_dir = tree.dirs.contains_key(&child);
            out.push((child, is_dir, name.clone()));
        }
        Some(out)
    }

    /// Decide how to serve an open of `ino`. Errors are errno values.
    pub fn open(&self, ino: u64) -> Result<OpenPlan, i32> {
        if ino == STATS_INO {
            return Ok(OpenPlan::Generated(self.stats_json().into_bytes()));
        }
        if ino == ROOT_INO || ino == CONTROL_DIR_INO {
            return Err(libc::EISDIR);
        }
        let tree = self.tree();
        let Some(f) = tree.files.get(&ino) else {
            return Err(if tree.dirs.contains_key(&ino) {
                libc::EISDIR
            } else {
                libc::ENOENT
            });
        };
        if let Some(obj) = f.content.whole_object {
            if self.passthrough_enabled() && self.whole_object_intact(&f.content, &f.label) {
                let path = self.store.lock().expect("store lock").object_path(obj);
                self.queue_for_pinning(&f.content);
                return Ok(OpenPlan::Passthrough {
                    content_id: f.content.id,
                    object: path,
                });
            }
        }
        self.open_copy(f.content.clone(), &f.label)
            .map(OpenPlan::Copy)
    }

    /// Passthrough reads never reach the daemon, so a whole-file object is
    /// checked once per mount, at its first open: a full BLAKE3 pass (several
    /// GB/s, and it warms the page cache the reader is about to use). A
    /// damaged object is served in copy mode instead, where each chunk is
    /// checked and only damaged ranges fail.
    fn whole_object_intact(&self, content: &ContentInfo, label: &str) -> bool {
        // One check per content: concurrent first opens wait for it instead
        // of each hashing the whole object again.
        let cell = self
            .whole_checked
            .lock()
            .expect("lock")
            .entry(content.id)
            .or_default()
            .clone();
        *cell.get_or_init(|| self.check_whole_object(content, label))
    }

    fn check_whole_object(&self, content: &ContentInfo, label: &str) -> bool {
        let path = match content.whole_object {
            Some(obj) => self.store.lock().expect("store lock").object_path(obj),
            None => return false,
        };
        // Map it through the object cache, which holds the shared lock, so gc
        // cannot punch holes between this check and the reader's use.
        let ok = match content.whole_object.map(|o| self.map_object(o)) {
            Some(Ok(obj)) if !self.content_live(content.id) => {
                drop(obj);
                return false;
            }
            Some(Ok(obj)) if obj.map.len() as u64 == content.size => {
                modelfs_store::whole_object_matches(content, &obj.map)
            }
            Some(Ok(obj)) => {
                error!(object = %path.display(), file = label, size = obj.map.len(), "whole-file object has the wrong size");
                false
            }
            Some(Err(libc::ENOENT)) | None => return false,
            Some(Err(_)) => false,
        };
        if ok {
            for seg in &content.segments {
                self.verified_chunks.insert(seg.object, seg.object_offset);
            }
        } else {
            warn!(object = %path.display(), file = label, "whole-file object failed its check; serving it in copy mode, damaged ranges will return EIO");
        }
        ok
    }

    pub fn content_live(&self, id: i64) -> bool {
        let store = self.store.lock().expect("store lock");
        store.catalog().content_exists(id).unwrap_or(false)
    }

    fn map_object(&self, id: ObjectId) -> Result<Arc<MappedObject>, i32> {
        let mut objects = self.objects.lock().expect("objects lock");
        if let Some(o) = objects.get(&id).and_then(Weak::upgrade) {
            return Ok(o);
        }
        let path = self.store.lock().expect("store lock").object_path(id);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                // Collected by gc after its model was removed: the file is gone.
                return libc::ENOENT;
            }
            error!(object = %path.display(), "cannot open object: {e}");
            libc::EIO
        })?;
        locks::share_object(&file).map_err(|_| libc::EIO)?;
        // SAFETY: objects are immutable while referenced; see whole_object_intact.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| {
            error!(object = %path.display(), "cannot map object: {e}");
            libc::EIO
        })?;
        let o = Arc::new(MappedObject {
            _file: file,
            map,
            path,
        });
        objects.insert(id, Arc::downgrade(&o));
        Ok(o)
    }

    fn open_copy(&self, content: Arc<ContentInfo>, label: &str) -> Result<Arc<OpenContent>, i32> {
        let mut objects = HashMap::new();
        for s in &content.segments {
            if let std::collections::hash_map::Entry::Vacant(slot) = objects.entry(s.object) {
                match self.map_object(s.object) {
                    Ok(o) => {
                        slot.insert(o);
                    }
                    // Missing while the catalog still lists the content: damage.
                    Err(libc::ENOENT) if self.content_live(content.id) => {
                        error!(
                            file = label,
                            object = s.object,
                            "object file is missing; returning EIO"
                        );
                        self.stats.eio.fetch_add(1, Ordering::Relaxed);
                        return Err(libc::EIO);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // Holding the shared locks, make sure gc has not removed the content
        // meanwhile (it deletes catalog rows before it punches holes, and it
        // cannot punch while we hold the locks): otherwise the file is gone.
        if !self.content_live(content.id) {
            return Err(libc::ENOENT);
        }
        let state = self
            .contents
            .lock()
            .expect("contents lock")
            .entry(content.id)
            .or_insert_with(|| {
                let saved = trace::read_trace(&self.store_root, &content.hash, content.size)
                    .map_or(0, |t| t.covered());
                Arc::new(ContentState {
                    checks: (0..content.segments.len())
                        .map(|_| AtomicU8::new(UNCHECKED))
                        .collect(),
                    counters: ContentCounters::default(),
                    opens: AtomicU32::new(0),
                    recorder: Mutex::new(TraceRecorder::new(content.size)),
                    saved_covered: AtomicU64::new(saved),
                    replaying: AtomicBool::new(false),
                })
            })
            .clone();
        let mut starts = Vec::with_capacity(content.segments.len());
        let mut pos = 0;
        for s in &content.segments {
            starts.push(pos);
            pos += u64::from(s.len);
        }
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
        let open = Arc::new(OpenContent {
            label: label.to_string(),
            content,
            starts,
            objects,
            state,
            refs,
        });
        let first = open.state.opens.fetch_add(1, Ordering::AcqRel) == 0;
        if first {
            self.start_replay(&open);
        }
        Ok(open)
    }

    /// A copy-mode handle was closed. When the last one goes, the load
    /// trace is saved if this mount's reads cover more than the saved one.
    pub fn release(&self, open: &OpenContent) {
        if open.state.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.save_trace(&open.content, &open.state);
        }
    }

    fn save_trace(&self, content: &ContentInfo, state: &ContentState) {
        let recorder = state.recorder.lock().expect("recorder lock");
        let covered = recorder.covered();
        if covered <= state.saved_covered.load(Ordering::Relaxed) {
            return;
        }
        match trace::write_trace(&self.store_root, &content.hash, recorder.trace()) {
            Ok(()) => {
                state.saved_covered.store(covered, Ordering::Relaxed);
                self.stats.traces_saved.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.trace_errors.fetch_add(1, Ordering::Relaxed);
                warn!("cannot save a load trace: {e}");
            }
        }
    }

    /// Save every trace still being recorded (at unmount).
    pub fn save_all_traces(&self) {
        let tree = self.tree();
        let states: Vec<(i64, Arc<ContentState>)> = self
            .contents
            .lock()
            .expect("contents lock")
            .iter()
            .map(|(&id, st)| (id, st.clone()))
            .collect();
        for (id, state) in states {
            if let Some(f) = tree.files.get(&crate::tree::file_ino(id)) {
                self.save_trace(&f.content, &state);
            }
        }
    }

    /// At the first open of a content (again, after all its handles were
    /// closed), replay its recorded trace ahead of the reader.
    fn start_replay(&self, open: &Arc<OpenContent>) {
        if self.prefetch_window == 0 || open.state.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(trace) =
            trace::read_trace(&self.store_root, &open.content.hash, open.content.size)
        else {
            open.state.replaying.store(false, Ordering::Release);
            return;
        };
        self.stats.trace_replays.fetch_add(1, Ordering::Relaxed);
        crate::prefetch::spawn_replay(open.clone(), trace, self.prefetch_window);
    }

    /// Copy-mode read: each chunk is checked against its hash the first
    /// time it is read in this mount; a mismatch is EIO, never wrong bytes.
    pub fn read(&self, open: &OpenContent, offset: u64, size: u32) -> Result<ReadOut, i32> {
        self.stats.read_requests.fetch_add(1, Ordering::Relaxed);
        let c = &open.content;
        if offset >= c.size || size == 0 {
            return Ok(ReadOut::Owned(Vec::new()));
        }
        let end = (offset + u64::from(size)).min(c.size);
        let first = match open.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let mut i = first;
        let mut pieces: Vec<(&Arc<MappedObject>, usize, usize)> = Vec::new();
        let mut resident = 0u64;
        while i < c.segments.len() && open.starts[i] < end {
            let s = &c.segments[i];
            let obj = &open.objects[&s.object];
            let seg_start = s.object_offset as usize;
            let seg_end = seg_start + s.len as usize;
            if seg_end > obj.map.len() {
                return Err(self.damaged(open, i, "object is truncated"));
            }
            let from = offset.max(open.starts[i]) - open.starts[i];
            let to = end.min(open.starts[i] + u64::from(s.len)) - open.starts[i];
            let (a, b) = (seg_start + from as usize, seg_start + to as usize);
            // Measured before anything below touches the pages.
            let here = obj.resident_bytes(a as u64, (b - a) as u64);
            resident += here;
            // A cold chunk is left to the page faults of the hash and the
            // copy and their readahead. An MADV_WILLNEED of the whole chunk
            // here (issue 4) filled the page cache page by page, cost the
            // daemon about 1.5x the CPU per cold byte and made cold copy-mode
            // reads slower (docs/benchmarks.md, "Copy-mode cold reads").
            if !open.check_segment(i, &self.verified_chunks) {
                return Err(self.damaged(open, i, "chunk does not match its hash"));
            }
            // Worth more the more models hold the chunk and the more
            // handles have its file open now.
            let open_handles = open.state.opens.load(Ordering::Relaxed).max(1);
            let refs = open
                .refs
                .get(i)
                .copied()
                .unwrap_or(1)
                .saturating_add(open_handles - 1);
            self.pinner
                .access(obj, s.object, s.object_offset, u64::from(s.len), refs);
            // Consecutive chunks stored back to back in one object (the
            // usual case: a tensor's pieces) are served as one slice.
            match pieces.last_mut() {
                Some((last, _, end)) if Arc::ptr_eq(last, obj) && *end == a => *end = b,
                _ => pieces.push((obj, a, b)),
            }
            i += 1;
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
        if let [(obj, a, b)] = pieces[..] {
            return Ok(ReadOut::Mapped(Arc::clone(obj), a, b));
        }
        let mut out = Vec::with_capacity(len as usize);
        for (obj, a, b) in pieces {
            out.extend_from_slice(&obj.map[a..b]);
        }
        Ok(ReadOut::Owned(out))
    }

    fn damaged(&self, open: &OpenContent, segment: usize, why: &str) -> i32 {
        let s = &open.content.segments[segment];
        let path = &open.objects[&s.object].path;
        error!(
            file = %open.label,
            file_offset = open.starts[segment],
            object = %path.display(),
            object_offset = s.object_offset,
            len = s.len,
            "{why}; returning EIO"
        );
        self.stats.eio.fetch_add(1, Ordering::Relaxed);
        libc::EIO
    }

    /// Seconds since the mount started.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn stats_json(&self) -> String {
        let tree = self.tree();
        let s = &self.stats;
        let v = serde_json::json!({
            "store": self.store_root,
            "mode": if self.passthrough_enabled() { "passthrough" } else { "copy" },
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "directories": tree.dirs.len(),
            "files": tree.files.len(),
            "read_requests": s.read_requests.load(Ordering::Relaxed),
            "read_bytes": s.read_bytes.load(Ordering::Relaxed),
            "eio": s.eio.load(Ordering::Relaxed),
            "passthrough_opens": s.passthrough_opens.load(Ordering::Relaxed),
            "passthrough_opened_bytes": s.passthrough_opened_bytes.load(Ordering::Relaxed),
            "copy_opens": s.copy_opens.load(Ordering::Relaxed),
            "refreshes": s.refreshes.load(Ordering::Relaxed),
            "imports_seen": s.imports_seen.load(Ordering::Relaxed),
            "removals_seen": s.removals_seen.load(Ordering::Relaxed),
            "pin_budget": self.pinner.budget(),
            "pinned_bytes": self.pinner.stats.pinned_bytes.load(Ordering::Relaxed),
            "cache_hits": self.pinner.stats.hits.load(Ordering::Relaxed),
            "cache_misses": self.pinner.stats.misses.load(Ordering::Relaxed),
            "prefetch_window": self.prefetch_window,
            "traces_saved": s.traces_saved.load(Ordering::Relaxed),
            "trace_replays": s.trace_replays.load(Ordering::Relaxed),
            "trace_errors": s.trace_errors.load(Ordering::Relaxed),
            "trace_replays_running": self.replays_running(),
        });
        let mut v = v;
        let (totals, models) = self.model_stats(&tree);
        v["read_resident_bytes"] = totals.read_resident_bytes.into();
        v["read_disk_bytes"] = totals.read_disk_bytes.into();
        v["prefetched_bytes"] = totals.prefetched_bytes.into();
        v["models"] = serde_json::to_value(models).expect("json");
        let mut text = serde_json::to_string_pretty(&v).expect("json");
        text.push('\n');
        text
    }
}

/// One model's line in stats.json. A content shared by several models
/// (identical files) counts in each of them, like a chunk shared by several
/// models counts in each one's `pinned_bytes`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ModelStats {
    pub name: String,
    pub files: usize,
    /// Bytes of this model's chunks locked in memory now.
    pub pinned_bytes: u64,
    /// Copy-mode reads of its files since the mount started (passthrough
    /// reads bypass the daemon and are not counted).
    pub read_bytes: u64,
    pub read_resident_bytes: u64,
    pub read_disk_bytes: u64,
    pub prefetched_bytes: u64,
}

impl Vfs {
    /// Trace replays in progress now.
    pub fn replays_running(&self) -> usize {
        let states = self.contents.lock().expect("contents lock");
        states
            .values()
            .filter(|st| st.replaying.load(Ordering::Acquire))
            .count()
    }

    /// The read counters summed over all contents (for metrics).
    pub fn read_totals(&self) -> ModelStats {
        let states = self.contents.lock().expect("contents lock");
        let mut totals = ModelStats::default();
        for st in states.values() {
            let c = &st.counters;
            totals.read_bytes += c.read_bytes.load(Ordering::Relaxed);
            totals.read_resident_bytes += c.read_resident_bytes.load(Ordering::Relaxed);
            totals.read_disk_bytes += c.read_disk_bytes.load(Ordering::Relaxed);
            totals.prefetched_bytes += c.prefetched_bytes.load(Ordering::Relaxed);
        }
        totals
    }

    /// Per-model figures, and the read counters summed over all contents.
    fn model_stats(&self, tree: &Tree) -> (ModelStats, Vec<ModelStats>) {
        let totals = self.read_totals();
        let pinned = self.pinner.pinned_blocks();
        let states = self.contents.lock().expect("contents lock");
        let mut models = Vec::with_capacity(tree.model_contents.len());
        for (name, ids) in &tree.model_contents {
            let mut m = ModelStats {
                name: name.clone(),
                files: ids.len(),
                ..ModelStats::default()
            };
            let mut seen: HashSet<(u64, u64)> = HashSet::new();
            for id in ids {
                if let Some(st) = states.get(id) {
                    let c = &st.counters;
                    m.read_bytes += c.read_bytes.load(Ordering::Relaxed);
                    m.read_resident_bytes += c.read_resident_bytes.load(Ordering::Relaxed);
                    m.read_disk_bytes += c.read_disk_bytes.load(Ordering::Relaxed);
                    m.prefetched_bytes += c.prefetched_bytes.load(Ordering::Relaxed);
                }
                if pinned.is_empty() {
                    continue;
                }
                let Some(f) = tree.files.get(&crate::tree::file_ino(*id)) else {
                    continue;
                };
                for s in &f.content.segments {
                    let key = (s.object, s.object_offset);
                    if seen.insert(key) {
                        m.pinned_bytes += pinned.get(&key).copied().unwrap_or(0);
                    }
                }
            }
            models.push(m);
        }
        (totals, models)
    }

    /// Start the worker that pins the chunks of files opened by passthrough
    /// (the daemon never sees their reads, so it considers them at open, in
    /// file order, off the request path: locking faults pages in from disk).
    pub fn start_pin_worker(self: &Arc<Self>) {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<ContentInfo>>();
        *self.pin_queue.lock().expect("pin queue") = Some(tx);
        let vfs = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("pin-worker".into())
            .spawn(move || {
                for content in rx {
                    let Some(vfs) = vfs.upgrade() else { break };
                    let tree = vfs.tree();
                    for s in &content.segments {
                        let Ok(obj) = vfs.map_object(s.object) else {
                            break;
                        };
                        let refs = tree
                            .chunk_refs
                            .get(&(s.object, s.object_offset))
                            .copied()
                            .unwrap_or(1);
                        vfs.pinner
                            .access(&obj, s.object, s.object_offset, u64::from(s.len), refs);
                    }
                }
            })
            .expect("spawn pin worker");
    }

    fn queue_for_pinning(&self, content: &Arc<ContentInfo>) {
        if let Some(tx) = self.pin_queue.lock().expect("pin queue").as_ref() {
            let _ = tx.send(content.clone());
        }
    }

    /// Log the serving mode once, at mount time.
    pub fn log_mode(&self) {
        if self.passthrough_enabled() {
            info!("serving whole-file objects by kernel passthrough, recipe files in copy mode");
        } else {
            info!("serving all files in copy mode");
        }
    }
}
