//! The modelfs store: model files cut into blake3-addressed chunks, every
//! distinct chunk kept once, with a catalog saying how to put each file back.
//!
//! Why this crate exists: it is the single owner of the on-disk format
//! (docs/store-format.md). Importing, listing, reading back, verifying and
//! garbage-collecting all go through it, so the mount (`fs/`) and the CLI never
//! touch store files directly and can rely on its two guarantees: a model is
//! visible only once all its bytes and metadata are durable, and bytes handed
//! out by a reader are checked against their hash.
//!
//! Layout decisions that the FUSE layer depends on:
//! * a file whose chunks were all new when imported is stored as one object
//!   file byte-identical to it ([`FileInfo::whole_object`]), so the kernel can
//!   serve it by passthrough;
//! * identical files are one content (one hash), so the mount can give them
//!   one inode and one set of page-cache pages.

mod catalog;
mod chunker;
mod error;
mod gc;
mod ids;
mod import;
pub mod locks;
mod names;
mod object;
pub mod pages;
mod read;
pub mod recipe;
pub mod trace;
mod upgrade;
mod usage;
mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use catalog::Catalog;

pub use catalog::{ContentInfo, EntryInfo, ModelInfo, Snapshot};
pub use chunker::{canonical_key_of_bytes, CDC_AVG, CDC_MAX, CDC_MIN, TENSOR_PIECE};
pub use error::{Error, MalformedFile, Result};
pub use gc::GcReport;
pub use ids::{ChunkHash, ContentId, ContentKey, ObjectId};
pub use import::{
    default_model_name, hf_hub_repos, HubRevision, ImportOptions, ImportProgress, ImportSummary,
    NoProgress,
};
pub use names::{check_relative_path, validate_model_name, RESERVED as RESERVED_NAME};
pub use object::MappedObject;
pub use read::{whole_object_matches, FileReader};
pub use recipe::Segment;
pub use trace::{LoadTrace, TraceRecorder, TRACES_DIR};
pub use upgrade::UpgradeReport;
pub use usage::{ModelSharing, ModelUsage, SharedWith, SharingMatrix, Usage};
pub use verify::{Damage, VerifyReport};

use error::IoContext;

/// File name of the catalog inside a store directory.
pub const CATALOG_FILE: &str = "catalog.db";
/// Directory of object files inside a store directory.
pub const OBJECTS_DIR: &str = "objects";
const LOCK_FILE: &str = "lock";

/// The store directory used when neither `--store` nor `$MODELFS_STORE` is given:
/// `/var/lib/modelfs` for root, `$XDG_DATA_HOME/modelfs` (or
/// `~/.local/share/modelfs`) otherwise.
pub fn default_store_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/modelfs");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("modelfs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/modelfs")
}

/// An opened store directory.
pub struct Store {
    root: PathBuf,
    catalog: Catalog,
}

/// How a file of a model is stored, as the mount needs to know it.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// Path inside the model, `/`-separated, without a leading `/`.
    pub path: String,
    /// Bytes of the file.
    pub size: u64,
    /// The content key the file is stored under; equal keys mean equal bytes.
    pub hash: ContentKey,
    /// Catalog id of the file's content, shared by every identical file.
    pub content_id: ContentId,
    /// Permission bits to present: 0o444, or 0o555 if the source file had
    /// any execute bit.
    pub mode: u32,
    /// Path of an object file byte-identical to this file, if there is one
    /// (servable by kernel passthrough). `None`: the file is a recipe of chunks.
    pub whole_object: Option<PathBuf>,
    /// Number of chunks in the file's recipe (0 for an empty file).
    pub chunks: usize,
    /// The parser that located tensors at import (`safetensors`, `torch`,
    /// `gguf`, `onnx`); `None` if the file was cut by content alone.
    pub format: Option<String>,
}

impl Store {
    /// Create a store at `root` (or open it if it already is one).
    pub fn init(root: &Path) -> Result<Store> {
        Self::create_or_open(root).map(|(store, _)| store)
    }

    /// Open the store at `root`, creating it if there is none; also says
    /// whether it was created. A directory that holds anything but a store's
    /// own files is refused: a mistyped `--store` must not turn a user's
    /// directory into a store (whose gc would then manage it).
    pub fn create_or_open(root: &Path) -> Result<(Store, bool)> {
        // Absolute, so object paths handed to the mount or printed by `ls`
        // stay valid whatever the caller's working directory.
        let root = &std::path::absolute(root).at(root)?;
        let cat_path = root.join(CATALOG_FILE);
        // An existing catalog is opened, never re-created: an emptied or
        // damaged catalog.db must be an error, not a fresh empty store whose
        // next gc would delete every object.
        let existed = cat_path.exists();
        if !existed {
            refuse_foreign_directory(root)?;
        }
        std::fs::create_dir_all(root.join(OBJECTS_DIR)).at(root)?;
        // Explicit modes, whatever the umask: writable by the owner only.
        set_mode(root, 0o755)?;
        set_mode(&root.join(OBJECTS_DIR), 0o755)?;
        let catalog = Catalog::open(&cat_path, !existed)?;
        set_mode(&cat_path, 0o644)?;
        fsync_dir(root)?;
        Ok((
            Store {
                root: root.to_path_buf(),
                catalog,
            },
            !existed,
        ))
    }

    /// Open an existing store; a clear error if `root` is not one.
    pub fn open(root: &Path) -> Result<Store> {
        let root = &std::path::absolute(root).at(root)?;
        let cat_path = root.join(CATALOG_FILE);
        if !cat_path.is_file() {
            let reason = if root.exists() {
                format!("no {CATALOG_FILE}; run `modelfs init` or import something first")
            } else {
                "directory does not exist; run `modelfs init` or import something first".into()
            };
            return Err(Error::NotAStore {
                path: root.to_path_buf(),
                reason,
            });
        }
        let catalog = Catalog::open(&cat_path, false)?;
        Ok(Store {
            root: root.to_path_buf(),
            catalog,
        })
    }

    /// The store directory, absolute.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// A counter that changes whenever another process commits to the
    /// catalog: the mount polls it to notice imports and removals.
    pub fn data_version(&self) -> Result<i64> {
        self.catalog.data_version()
    }

    /// Models, entries and the contents they use, read in one transaction
    /// so they are consistent with each other.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.catalog.snapshot()
    }

    /// Whether a content is still in the catalog. gc deletes a content's row
    /// before it frees its bytes, so a reader that holds the shared locks of
    /// a content's objects and then sees it live knows its bytes stay.
    pub fn content_live(&self, id: ContentId) -> Result<bool> {
        self.catalog.content_exists(id)
    }

    /// Path of an object file. Objects fan out over 256 directories by the
    /// low byte of their id so no directory grows huge.
    pub fn object_path(&self, id: ObjectId) -> PathBuf {
        self.root
            .join(OBJECTS_DIR)
            .join(format!("{:02x}", id.0 & 0xff))
            .join(format!("{:016x}", id.0))
    }

    pub(crate) fn lock_writer(&self, on_wait: impl FnOnce()) -> Result<locks::WriterLock> {
        locks::WriterLock::acquire(&self.root.join(LOCK_FILE), on_wait)
    }

    /// Every model, ordered by name.
    pub fn models(&self) -> Result<Vec<ModelInfo>> {
        self.catalog.models()
    }

    fn model_or_err(&self, name: &str) -> Result<ModelInfo> {
        self.catalog
            .model(name)?
            .ok_or_else(|| Error::NoSuchModel(name.to_string()))
    }

    /// The files of a model with how each is stored.
    pub fn files(&self, model: &str) -> Result<Vec<FileInfo>> {
        let m = self.model_or_err(model)?;
        let mut out = Vec::new();
        for e in self.catalog.entries(m.id)? {
            if let Some(cid) = e.content {
                out.push(self.file_info(e.path, cid, e.mode)?);
            }
        }
        Ok(out)
    }

    fn file_info(&self, path: String, content_id: ContentId, mode: u32) -> Result<FileInfo> {
        let c = self.catalog.content(content_id)?;
        Ok(FileInfo {
            path,
            size: c.size,
            hash: c.hash,
            content_id,
            mode,
            whole_object: c.whole_object.map(|o| self.object_path(o)),
            chunks: c.segments.len(),
            format: c.format,
        })
    }

    /// Resolve `NAME/PATH` where NAME may itself contain `/`: the longest
    /// prefix that names a model wins.
    pub fn resolve(&self, name_and_path: &str) -> Result<(ModelInfo, FileInfo)> {
        let trimmed = name_and_path.trim_matches('/');
        let mut split_points: Vec<usize> = trimmed.match_indices('/').map(|(i, _)| i).collect();
        split_points.reverse();
        for i in split_points {
            let (name, path) = (&trimmed[..i], &trimmed[i + 1..]);
            if let Some(m) = self.catalog.model(name)? {
                let entry = self.catalog.entry(m.id, path)?;
                return match entry {
                    Some(EntryInfo {
                        content: Some(cid),
                        mode,
                        ..
                    }) => {
                        let fi = self.file_info(path.to_string(), cid, mode)?;
                        Ok((m, fi))
                    }
                    Some(_) => Err(Error::InvalidInput {
                        path: name_and_path.into(),
                        reason: "is a directory".into(),
                    }),
                    None => Err(Error::NoSuchFile {
                        model: m.name,
                        path: path.to_string(),
                    }),
                };
            }
        }
        if let Some(m) = self.catalog.model(trimmed)? {
            // A model named alone: say so, with one of its files to copy.
            let entries = self.catalog.entries(m.id)?;
            let files: Vec<&str> = entries
                .iter()
                .filter(|e| e.content.is_some())
                .map(|e| e.path.as_str())
                .collect();
            let example = files
                .iter()
                .find(|p| **p == "config.json")
                .or(files.first())
                .map_or_else(|| "config.json".to_string(), |p| p.to_string());
            return Err(Error::InvalidInput {
                path: trimmed.into(),
                reason: format!(
                    "is a model, not a file: name one of its files, e.g. {trimmed}/{example} \
                     (`modelfs ls {trimmed}` lists them)"
                ),
            });
        }
        Err(Error::InvalidInput {
            path: name_and_path.into(),
            reason: "no model name is a prefix of this path (expected MODEL/PATH)".into(),
        })
    }

    /// Open, share-lock and map one object file.
    pub fn map_object(&self, id: ObjectId) -> Result<MappedObject> {
        MappedObject::open(id, self.object_path(id))
    }

    /// Open a stored file for reading (every chunk checked as it is read).
    pub fn open_file(&self, content_id: ContentId) -> Result<FileReader> {
        self.read_content(self.catalog.content(content_id)?)
    }

    /// [`Store::open_file`] for a content row already read.
    pub(crate) fn read_content(&self, content: ContentInfo) -> Result<FileReader> {
        self.open_content_with(Arc::new(content), |id| self.map_object(id).map(Arc::new))
    }

    /// The read protocol, with the caller's way of mapping objects (the
    /// mount shares one mapping per object between all its open files):
    /// map and lock every object the recipe uses, then make sure the content
    /// is still in the catalog. gc deletes catalog rows before it punches
    /// holes and cannot punch while the locks are held, so a content found
    /// live here keeps its bytes for as long as the reader lives.
    /// [`Error::ContentRemoved`]: it was removed meanwhile (for the mount,
    /// ENOENT); [`Error::ObjectMissing`] with the content still listed is
    /// damage (EIO).
    pub fn open_content_with(
        &self,
        content: Arc<ContentInfo>,
        mut map: impl FnMut(ObjectId) -> Result<Arc<MappedObject>>,
    ) -> Result<FileReader> {
        let mut objects = HashMap::new();
        for s in &content.segments {
            if let std::collections::hash_map::Entry::Vacant(slot) = objects.entry(s.object) {
                match map(s.object) {
                    Ok(o) => {
                        slot.insert(o);
                    }
                    Err(Error::ObjectMissing { .. }) if !self.content_live(content.id)? => {
                        return Err(Error::ContentRemoved)
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if !self.content_live(content.id)? {
            return Err(Error::ContentRemoved);
        }
        FileReader::new(content, objects)
    }

    /// Remove a model. Its bytes stay on disk until `gc`.
    pub fn remove(&mut self, name: &str) -> Result<ModelInfo> {
        let mut removed = self.remove_models(&[name], RemoveOptions::default())?;
        Ok(removed.remove(0))
    }

    /// Remove models, all or none. Every name is resolved first: a model,
    /// or with `opts.recursive` a namespace (`org` or `org/`, for every model
    /// named `org/...`). If any name resolves to nothing, nothing is removed:
    /// the error is that name's ([`Error::NoSuchModel`], [`Error::IsNamespace`],
    /// [`Error::InvalidName`]), or, for several names, [`Error::NothingRemoved`]
    /// with the error of each name that failed. Then every model is removed
    /// in one catalog transaction. Returns the removed models (with
    /// `opts.dry_run`, those that would be, and nothing changes), by name.
    /// Their bytes stay on disk until `gc`.
    pub fn remove_models(
        &mut self,
        names: &[impl AsRef<str>],
        opts: RemoveOptions,
    ) -> Result<Vec<ModelInfo>> {
        // Taken before the models are read, so that no import or rm can
        // change what the names resolve to before they are removed.
        let _lock = if opts.dry_run {
            None
        } else {
            Some(self.lock_writer(|| {})?)
        };
        let models = self.models()?;
        let mut chosen: Vec<&ModelInfo> = Vec::new();
        let mut errors = Vec::new();
        for name in names {
            match resolve_removal(&models, name.as_ref(), opts.recursive) {
                Ok(found) => chosen.extend(found),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(if names.len() == 1 {
                errors.remove(0)
            } else {
                Error::NothingRemoved(errors)
            });
        }
        chosen.sort_by(|a, b| a.name.cmp(&b.name));
        chosen.dedup_by_key(|m| m.id);
        if !opts.dry_run {
            let ids: Vec<i64> = chosen.iter().map(|m| m.id).collect();
            self.catalog.remove_models(&ids)?;
        }
        Ok(chosen.into_iter().cloned().collect())
    }
}

impl Store {
    /// Rename model `old` to `new` (`mv`): the catalog only, no byte moves,
    /// so a mount shows the new name at its next catalog refresh. `new`
    /// follows the import's rules: a valid name, no model of that name, and
    /// neither inside nor around another model's directory.
    pub fn rename_model(&mut self, old: &str, new: &str) -> Result<ModelInfo> {
        validate_model_name(new)?;
        // Taken before the names are checked, so that no import, rm or mv
        // can take `new` or remove `old` in between.
        let _lock = self.lock_writer(|| {})?;
        let models = self.models()?;
        let Some(model) = models.iter().find(|m| m.name == old) else {
            let under = models
                .iter()
                .filter(|m| names::is_ancestor(old, &m.name))
                .count();
            return Err(if under > 0 {
                Error::InvalidName {
                    name: old.to_string(),
                    reason: format!(
                        "it is not a model but the namespace of {under} model(s); rename them one by one"
                    ),
                }
            } else {
                Error::NoSuchModel(old.to_string())
            });
        };
        if old == new {
            return Ok(model.clone());
        }
        for m in &models {
            if m.id == model.id {
                continue;
            }
            if m.name == new {
                return Err(Error::NameTaken(new.to_string()));
            }
            if names::is_ancestor(&m.name, new) || names::is_ancestor(new, &m.name) {
                return Err(Error::InvalidName {
                    name: new.to_string(),
                    reason: format!(
                        "it would nest with model {:?} (a model's directory cannot contain another model)",
                        m.name
                    ),
                });
            }
        }
        self.catalog.rename_model(model.id, new)?;
        Ok(ModelInfo {
            name: new.to_string(),
            ..model.clone()
        })
    }
}

/// How [`Store::remove_models`] reads its names.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoveOptions {
    /// A name that is a namespace stands for every model under it.
    pub recursive: bool,
    /// Resolve the names and report what would be removed, removing nothing.
    pub dry_run: bool,
}

/// The models `name` stands for in a removal: the model of that name, or
/// with `recursive` every model under it as a namespace.
fn resolve_removal<'m>(
    models: &'m [ModelInfo],
    name: &str,
    recursive: bool,
) -> Result<Vec<&'m ModelInfo>> {
    // `org/` names the namespace as a shell's completion writes it; the
    // empty name (`/`) would be every model and is refused as invalid.
    let bare = name.trim_end_matches('/');
    validate_model_name(bare).map_err(|e| match e {
        Error::InvalidName { reason, .. } => Error::InvalidName {
            name: name.to_string(),
            reason,
        },
        e => e,
    })?;
    if let Some(m) = models.iter().find(|m| m.name == bare) {
        return Ok(vec![m]);
    }
    let under: Vec<&ModelInfo> = models
        .iter()
        .filter(|m| names::is_ancestor(bare, &m.name))
        .collect();
    match under.first() {
        None => Err(Error::NoSuchModel(name.to_string())),
        Some(_) if recursive => Ok(under),
        Some(example) => Err(Error::IsNamespace {
            name: bare.to_string(),
            count: under.len(),
            example: example.name.clone(),
        }),
    }
}

/// chmod, independent of the process umask.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).at(path)
}

/// fsync a directory so that entries created in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Names a store directory may hold before its catalog exists: those of an
/// `init` that was interrupted.
const STORE_ENTRIES: &[&str] = &[CATALOG_FILE, OBJECTS_DIR, LOCK_FILE, TRACES_DIR];

/// Refuse to create a store in a directory that has other things in it.
fn refuse_foreign_directory(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at(root),
    };
    for entry in entries {
        let name = entry.at(root)?.file_name();
        let name = name.to_string_lossy();
        let own = STORE_ENTRIES.contains(&name.as_ref()) || name.starts_with(CATALOG_FILE);
        if !own {
            return Err(Error::NotAStore {
                path: root.to_path_buf(),
                reason: format!(
                    "the directory is not empty ({name:?} is in it) and is not a modelfs store; \
                     a new store needs an empty or new directory"
                ),
            });
        }
    }
    Ok(())
}
