//! The filesystem's logic, independent of FUSE: which inode is what, how a
//! file is opened (kernel passthrough or copy mode), and how copy-mode bytes
//! are read and checked. The FUSE adapter only translates.
//!
//! Split by job: this file holds the tree (lookups, attributes, listings,
//! catalog refresh) and the open decision; `read` the copy-mode read path
//! and the checks before bytes are served; `layout` where a file's bytes
//! lie in the objects, for processes that map them (store-format §11);
//! `traces` load-trace recording and replay; `report` the stats snapshot.

mod layout;
mod read;
mod report;
mod traces;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Instant, SystemTime};

use modelfs_store::{ContentId, ContentInfo, MappedObject, ObjectId, Store};
use tracing::info;

use crate::open_content::{ContentState, OpenContent, VerifiedChunks};
use crate::stats::Stats;
use crate::tree::{Tree, CONTROL_DIR_INO, ROOT_INO, STATS_INO};

pub use layout::FileLayout;
pub use read::ReadOut;

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
    /// Inode number (see [`crate::tree`] for how it is derived).
    pub ino: u64,
    /// Bytes of the file; 0 for directories and for stats.json, whose
    /// contents are generated at each open.
    pub size: u64,
    /// Whether it is a directory rather than a regular file.
    pub is_dir: bool,
    /// Permission bits: 0o444, or 0o555 for directories and executables.
    pub perm: u16,
    /// Links: paths showing a file's content, or 2 plus the subdirectories
    /// of a directory.
    pub nlink: u32,
    /// Import time of the model it belongs to (the earliest, for a content
    /// several models share); mount time for the root and `.modelfs`; the
    /// time of the stat for stats.json.
    pub mtime: SystemTime,
}

/// One entry of a directory listing, `.` and `..` included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the entry after this one (what the kernel passes back to
    /// continue the listing).
    pub next_offset: u64,
    /// The entry's name in the directory.
    pub name: String,
    /// The entry's attributes.
    pub attr: Attr,
}

/// How an open file is served.
pub enum OpenPlan {
    /// Kernel passthrough to this whole-file object (mapped and locked).
    Passthrough(Arc<MappedObject>),
    /// Copy mode: the daemon serves reads of this open content with
    /// [`Vfs::read`], checking each chunk.
    Copy(Arc<OpenContent>),
    /// A generated file (stats.json): these bytes.
    Generated(Vec<u8>),
}

/// How the mount is set up, as far as the core is concerned.
#[derive(Debug, Clone)]
pub struct VfsConfig {
    /// Serve whole-file objects by kernel passthrough (needs root; the
    /// kernel may still refuse it at INIT or at the first open).
    pub passthrough: bool,
    /// Bytes of chunks that may be locked in memory.
    pub pin_budget: u64,
    /// How far a trace replay may run ahead of the reader (0: no replay).
    pub prefetch_window: u64,
}

/// The mounted filesystem without FUSE: the tree of models at the latest
/// catalog version, open contents and their checks, and the counters.
/// Shared by every FUSE worker thread.
pub struct Vfs {
    store: Mutex<Store>,
    store_root: PathBuf,
    tree: RwLock<Arc<Tree>>,
    catalog_version: Mutex<i64>,
    mounted_at: SystemTime,
    started: Instant,
    /// One mapping per object, shared by every open file that uses it.
    objects: Mutex<HashMap<ObjectId, Weak<MappedObject>>>,
    contents: Mutex<HashMap<ContentId, Arc<ContentState>>>,
    verified_chunks: VerifiedChunks,
    prefetch_window: u64,
    /// Result of checking a whole-file object once per mount: true = intact.
    whole_checked: Mutex<HashMap<ContentId, Arc<OnceLock<bool>>>>,
    passthrough: AtomicBool,
    /// Request-path counters behind stats.json and the metrics.
    pub stats: Stats,
    /// The chunks locked in memory, and their budget.
    pub pinner: crate::pin::Pinner,
    /// Passthrough opens whose chunks the pin worker should consider.
    pin_queue: Mutex<Option<std::sync::mpsc::Sender<Arc<ContentInfo>>>>,
}

impl Vfs {
    /// Open the store at `store_root` and build the tree from its catalog.
    /// Passthrough is enabled only if asked for and running as root.
    pub fn new(store_root: &Path, config: &VfsConfig) -> modelfs_store::Result<Vfs> {
        // Registering passthrough backing files needs CAP_SYS_ADMIN.
        // SAFETY: geteuid has no preconditions.
        let passthrough = config.passthrough && unsafe { libc::geteuid() } == 0;
        let store = Store::open(store_root)?;
        let version = store.data_version()?;
        let mounted_at = SystemTime::now();
        let tree = Tree::build(&store.snapshot()?, mounted_at);
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
            prefetch_window: config.prefetch_window,
            whole_checked: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(passthrough),
            stats: Stats::default(),
            pinner: crate::pin::Pinner::new(config.pin_budget),
            pin_queue: Mutex::new(None),
        })
    }

    pub(crate) fn store_root(&self) -> &Path {
        &self.store_root
    }

    /// The tree as of the last refresh; it does not change under the caller.
    pub fn tree(&self) -> Arc<Tree> {
        self.tree.read().expect("tree lock").clone()
    }

    /// Whether opens of whole-file objects are served by passthrough now
    /// (false once the kernel has refused it).
    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Turn passthrough off (the kernel refused it); later opens use copy mode.
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    /// Seconds since the mount started.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Rebuild the tree if the catalog changed. Returns what the kernel must
    /// forget, or None if nothing changed.
    pub fn refresh(&self) -> modelfs_store::Result<Option<Changes>> {
        let store = self.store.lock().expect("store lock");
        let version = store.data_version()?;
        let mut known = self.catalog_version.lock().expect("version lock");
        if version == *known {
            return Ok(None);
        }
        let snap = store.snapshot()?;
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
            .release_unless(|b| new.chunk_refs.contains_key(&(ObjectId(b.object), b.offset)));
        Ok(Some(Changes {
            entries: new.changed_entries(&old),
            dirs: new.changed_dirs(&old),
        }))
    }

    /// What a stat of `ino` in `tree` shows; None if no such inode.
    pub(crate) fn attr(&self, tree: &Tree, ino: u64) -> Option<Attr> {
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

    /// The entry `name` of directory `parent` in the current tree; None if
    /// `parent` is not a directory or has no such entry.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<Attr> {
        let tree = self.tree();
        let ino = *tree.dirs.get(&parent)?.children.get(name)?;
        self.attr(&tree, ino)
    }

    /// The listing of directory `ino` from entry `offset` on, with `.` and
    /// `..` first and each entry's attributes (READDIRPLUS sends them; plain
    /// READDIR uses the kind). None: not a directory.
    pub fn dir_entries(&self, ino: u64, offset: u64) -> Option<Vec<DirEntry>> {
        let tree = self.tree();
        let d = tree.dirs.get(&ino)?;
        let names = [(ino, "."), (d.parent, "..")]
            .into_iter()
            .chain(d.children.iter().map(|(n, &c)| (c, n.as_str())));
        let entries = names
            .enumerate()
            .skip(offset as usize)
            // A child gone in a refresh since this tree was taken has no
            // attributes: leave it out.
            .filter_map(|(i, (child, name))| {
                Some(DirEntry {
                    next_offset: (i + 1) as u64,
                    name: name.to_string(),
                    attr: self.attr(&tree, child)?,
                })
            })
            .collect();
        Some(entries)
    }

    /// Decide how to serve an open of `ino`. Errors are errno values.
    pub fn open(&self, ino: u64) -> Result<OpenPlan, i32> {
        if ino == STATS_INO {
            return Ok(OpenPlan::Generated(
                self.mount_stats().to_json().into_bytes(),
            ));
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
        if f.content.whole_object.is_some() && self.passthrough_enabled() {
            if let Some(object) = self.whole_object_intact(&f.content, &f.label)? {
                self.queue_for_pinning(&f.content);
                return Ok(OpenPlan::Passthrough(object));
            }
        }
        self.open_copy(f.content.clone(), &f.label)
            .map(OpenPlan::Copy)
    }

    /// Count an open of a `size`-byte file served by passthrough (its
    /// reads never reach us, so its size is the only byte count we have).
    pub fn count_passthrough_open(&self, size: u64) {
        self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        self.stats
            .passthrough_opened_bytes
            .fetch_add(size, Ordering::Relaxed);
    }

    /// Whether a content is still in the catalog (false also when the
    /// catalog cannot be read: then nothing can be served anyway).
    pub fn content_live(&self, id: ContentId) -> bool {
        let store = self.store.lock().expect("store lock");
        store.content_live(id).unwrap_or(false)
    }

    /// The mount's one mapping of an object, mapping it if no open file
    /// holds it now.
    fn map_object(&self, id: ObjectId) -> modelfs_store::Result<Arc<MappedObject>> {
        let store = self.store.lock().expect("store lock");
        self.map_cached(&store, id)
    }

    /// [`Vfs::map_object`] with the store already locked (locks are always
    /// taken store first, then the object cache).
    fn map_cached(&self, store: &Store, id: ObjectId) -> modelfs_store::Result<Arc<MappedObject>> {
        let mut objects = self.objects.lock().expect("objects lock");
        if let Some(o) = objects.get(&id).and_then(Weak::upgrade) {
            return Ok(o);
        }
        let o = Arc::new(store.map_object(id)?);
        objects.insert(id, Arc::downgrade(&o));
        Ok(o)
    }

    /// Start the worker that pins the chunks of files opened by passthrough.
    pub fn start_pin_worker(self: &Arc<Self>) {
        let tx = crate::pin::spawn_worker(Arc::downgrade(self));
        *self.pin_queue.lock().expect("pin queue") = Some(tx);
    }

    /// Offer every chunk of a content opened by passthrough to the pinner.
    pub(crate) fn pin_content(&self, content: &ContentInfo) {
        let tree = self.tree();
        for s in &content.segments {
            let Ok(obj) = self.map_object(s.object) else {
                break;
            };
            let refs = tree
                .chunk_refs
                .get(&(s.object, s.object_offset))
                .copied()
                .unwrap_or(1);
            self.pinner
                .access(&obj, s.object, s.object_offset, u64::from(s.len), refs);
        }
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
