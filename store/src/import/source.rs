//! What an import reads: the model's default name, the Hugging Face cache
//! layout, the list of files under the symlink policy, each file's layout
//! (refusing model files that do not parse), and the tensor spans ONNX models
//! declare in other files. Everything here runs before the writer lock is
//! taken, and nothing here writes.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use modelfs_formats::{ExternalSpan, TensorSpan};

use super::ImportProgress;
use crate::error::{Error, IoContext, MalformedFile, Result};
use crate::names::check_relative_path;

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

/// Where a Hugging Face hub cache import came from: the revision as asked
/// (a ref name, or a commit or its prefix) and the commit it resolved to (the
/// snapshot directory's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRevision {
    /// The revision as asked: `main` unless `--revision` named another.
    pub revision: String,
    /// The snapshot directory's name: the commit hash.
    pub commit: String,
}

/// The repos of a Hugging Face hub cache root (a directory holding
/// `models--org--name` directories): the model repos, and the dataset and
/// space repos an import skips. `None` if `dir` is not such a root.
pub fn hf_hub_repos(dir: &Path) -> Result<Option<(Vec<PathBuf>, Vec<PathBuf>)>> {
    let abs = std::fs::canonicalize(dir).at(dir)?;
    if !abs.is_dir() || hf_repo_dir(&abs).is_some() {
        return Ok(None);
    }
    let mut names: Vec<_> = std::fs::read_dir(&abs)
        .at(&abs)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .at(&abs)?;
    names.sort();
    let (mut models, mut skipped) = (Vec::new(), Vec::new());
    for name in names {
        let p = abs.join(&name);
        if hf_repo_dir(&p).as_deref() != Some(p.as_path()) {
            continue;
        }
        if name.to_string_lossy().starts_with("models--") {
            models.push(p);
        } else {
            skipped.push(p);
        }
    }
    if models.is_empty() && skipped.is_empty() {
        return Ok(None);
    }
    Ok(Some((models, skipped)))
}

/// The revisions a repo directory offers, for an error that lists them:
/// every ref under `refs/` and every snapshot commit.
fn hf_revisions(repo: &Path) -> String {
    let mut refs = Vec::new();
    let mut stack = vec![(repo.join("refs"), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                stack.push((e.path(), format!("{name}/")));
            } else {
                refs.push(name);
            }
        }
    }
    refs.sort();
    let mut commits: Vec<String> = std::fs::read_dir(repo.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    commits.sort();
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    format!(
        "refs: {}; snapshot commits: {}",
        list(&refs),
        list(&commits)
    )
}

/// Resolve `revision` (default `main`) in a Hugging Face cache repo: a ref
/// under `refs/` first (branches and tags live there alike), then a snapshot
/// commit or a unique prefix of one.
fn resolve_revision(repo: &Path, revision: Option<&str>) -> Result<(PathBuf, HubRevision)> {
    let rev = revision.unwrap_or("main");
    let bad = |reason: String| Error::InvalidInput {
        path: repo.to_path_buf(),
        reason,
    };
    if rev.is_empty()
        || rev
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(format!("revision {rev:?} is not a ref name or commit")));
    }
    let ref_file = repo.join("refs").join(rev);
    let commit = if ref_file.is_file() {
        let c = std::fs::read_to_string(&ref_file).at(&ref_file)?;
        let c = c.trim().to_string();
        if c.is_empty() || c.contains('/') || !repo.join("snapshots").join(&c).is_dir() {
            return Err(bad(format!(
                "refs/{rev} names snapshot {c:?}, which does not exist under snapshots/ ({})",
                hf_revisions(repo)
            )));
        }
        c
    } else {
        let matches: Vec<String> = std::fs::read_dir(repo.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(rev))
            .collect();
        match matches.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(bad(format!(
                    "no refs/{rev} and no snapshot commit starting with {rev:?} ({})",
                    hf_revisions(repo)
                )))
            }
            many => {
                return Err(bad(format!(
                    "revision {rev:?} is a prefix of several snapshot commits: {}",
                    many.join(", ")
                )))
            }
        }
    };
    let snap = repo.join("snapshots").join(&commit);
    Ok((
        snap,
        HubRevision {
            revision: rev.to_string(),
            commit,
        },
    ))
}

/// A Hugging Face cache repo directory stands for the snapshot of `revision`
/// (default `main`); a snapshot directory for itself, its name being both
/// revision and commit. Anything else is imported as it is, and a revision
/// for it is an error.
pub(super) fn resolve_hf_repo(
    abs: &Path,
    revision: Option<&str>,
) -> Result<(PathBuf, Option<HubRevision>)> {
    match hf_repo_dir(abs) {
        Some(repo) if abs.is_dir() && repo == abs => {
            let (snap, rev) = resolve_revision(abs, revision)?;
            Ok((snap, Some(rev)))
        }
        Some(_) if abs.is_dir() && revision.is_none() => {
            let commit = abs
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((
                abs.to_path_buf(),
                Some(HubRevision {
                    revision: commit.clone(),
                    commit,
                }),
            ))
        }
        _ if revision.is_some() => Err(Error::InvalidInput {
            path: abs.to_path_buf(),
            reason: "--revision needs a Hugging Face cache repo (models--ORG--NAME) or hub root; this path is neither"
                .into(),
        }),
        _ => Ok((abs.to_path_buf(), None)),
    }
}

pub(super) struct SourceFile {
    pub(super) rel: String,
    /// Where the bytes are read from: symlinks resolved.
    pub(super) abs: PathBuf,
    /// Where the user sees the file: under the imported path, symlinks not
    /// resolved (a Hugging Face snapshot's files are links to hashed blobs).
    pub(super) shown: PathBuf,
    pub(super) size: u64,
    pub(super) executable: bool,
}

pub(super) struct SourceTree {
    pub(super) files: Vec<SourceFile>,
    pub(super) dirs: Vec<String>,
    pub(super) hub: Option<HubRevision>,
}

/// List the files to import, applying the symlink policy: links are followed
/// only when their target stays inside the imported tree (or, for a Hugging
/// Face snapshot, inside its repo's `blobs/`), unless `follow_symlinks`.
pub(super) fn walk(
    source: &Path,
    follow_symlinks: bool,
    revision: Option<&str>,
) -> Result<SourceTree> {
    let root = std::fs::canonicalize(source).at(source)?;
    let (root, hub) = resolve_hf_repo(&root, revision)?;
    let mut allowed = vec![root.clone()];
    if let Some(repo) = hf_repo_dir(&root) {
        allowed.push(repo);
    }
    let meta = std::fs::metadata(&root).at(&root)?;
    if meta.is_file() {
        return single_file(root, &meta);
    }
    if !meta.is_dir() {
        return Err(Error::InvalidInput {
            path: root,
            reason: "not a regular file or directory".into(),
        });
    }
    let mut tree = SourceTree {
        files: Vec::new(),
        dirs: Vec::new(),
        hub,
    };
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
            let rel = relative_name(&abs, &name, &rel_dir)?;
            let (target, meta) = follow(&abs, follow_symlinks, &allowed)?;
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
                    shown: abs,
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

/// The tree of a single-file import: the file, under its own name.
fn single_file(root: PathBuf, meta: &Metadata) -> Result<SourceTree> {
    let name = root
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidInput {
            path: root.clone(),
            reason: "file name is not valid UTF-8".into(),
        })?;
    let file = SourceFile {
        rel: name.to_string(),
        abs: root.clone(),
        shown: root.clone(),
        size: meta.len(),
        executable: meta.mode() & 0o111 != 0,
    };
    Ok(SourceTree {
        files: vec![file],
        dirs: Vec::new(),
        hub: None,
    })
}

/// The path in the model of entry `name` (at `abs`) of the directory at
/// `rel_dir`; names the model could not hold are refused.
fn relative_name(abs: &Path, name: &OsStr, rel_dir: &str) -> Result<String> {
    let name = name.to_str().ok_or_else(|| Error::InvalidInput {
        path: abs.to_path_buf(),
        reason: "file name is not valid UTF-8".into(),
    })?;
    let rel = if rel_dir.is_empty() {
        name.to_string()
    } else {
        format!("{rel_dir}/{name}")
    };
    check_relative_path(&rel).map_err(|reason| Error::InvalidInput {
        path: abs.to_path_buf(),
        reason: format!("unusable file name: {reason}"),
    })?;
    Ok(rel)
}

/// What the entry at `abs` stands for, and its metadata: itself, or the
/// target of a symlink the policy allows.
fn follow(abs: &Path, follow_symlinks: bool, allowed: &[PathBuf]) -> Result<(PathBuf, Metadata)> {
    let lmeta = std::fs::symlink_metadata(abs).at(abs)?;
    if !lmeta.file_type().is_symlink() {
        return Ok((abs.to_path_buf(), lmeta));
    }
    let target = std::fs::canonicalize(abs).map_err(|e| Error::InvalidInput {
        path: abs.to_path_buf(),
        reason: format!("broken symlink ({e})"),
    })?;
    if !follow_symlinks && !allowed.iter().any(|a| target.starts_with(a)) {
        return Err(Error::InvalidInput {
            path: abs.to_path_buf(),
            reason: format!(
                "symlink points outside the imported tree (to {}); pass --follow-symlinks to import it",
                target.display()
            ),
        });
    }
    let meta = std::fs::metadata(&target).at(&target)?;
    Ok((target, meta))
}

/// What the parsers found in one file (store-format §8.1, §8.2).
pub(super) struct FileLayout {
    /// The format that located its tensors; `None`: cut by content alone.
    pub(super) format: Option<String>,
    pub(super) tensors: Vec<TensorSpan>,
    pub(super) external: Vec<ExternalSpan>,
}

impl FileLayout {
    /// No parser: the whole file is cut by content-defined chunking.
    fn content_only() -> FileLayout {
        FileLayout {
            format: None,
            tensors: Vec::new(),
            external: Vec::new(),
        }
    }
}

/// Every file's layout, in the order of `tree.files`, read before anything
/// is written. A file whose name or magic bytes commit it to a model format
/// (`modelfs_formats::committed_format`) and that does not parse is almost
/// always a broken download: unless `allow_malformed`, the import is refused,
/// naming every such file. A file that only looked like a format, or one
/// allowed through, is cut by content alone, with a warning (also returned).
pub(super) fn layouts(
    tree: &SourceTree,
    allow_malformed: bool,
    progress: &dyn ImportProgress,
) -> Result<(Vec<FileLayout>, Vec<String>)> {
    let mut out = Vec::with_capacity(tree.files.len());
    let mut warnings = Vec::new();
    let mut refused = Vec::new();
    for f in &tree.files {
        let file = File::open(&f.abs).at(&f.abs)?;
        let e = match modelfs_formats::layout(&f.rel, &file) {
            Ok(Some(layout)) => {
                out.push(FileLayout {
                    format: Some(layout.format.to_string()),
                    tensors: layout.tensors,
                    external: layout.external,
                });
                continue;
            }
            Ok(None) => {
                out.push(FileLayout::content_only());
                continue;
            }
            Err(e) => e,
        };
        match modelfs_formats::committed_format(&f.rel, &file) {
            Some(format) if !allow_malformed => refused.push(MalformedFile {
                path: f.shown.clone(),
                format: format.to_string(),
                reason: e.to_string(),
            }),
            _ => {
                let msg = format!(
                    "{}: could not parse as a model file ({e}); storing it with content-defined chunking",
                    f.shown.display()
                );
                progress.warn(&msg);
                warnings.push(msg);
            }
        }
        out.push(FileLayout::content_only());
    }
    if !refused.is_empty() {
        return Err(Error::MalformedModelFiles(refused));
    }
    Ok((out, warnings))
}

/// For every ONNX model in the tree, the tensor spans it declares in external
/// data files, keyed by the data file's path in the model.
pub(super) fn onnx_external_spans(
    tree: &SourceTree,
    layouts: &[FileLayout],
) -> HashMap<String, Vec<TensorSpan>> {
    let mut out: HashMap<String, Vec<TensorSpan>> = HashMap::new();
    let onnx = tree
        .files
        .iter()
        .zip(layouts)
        .filter(|(f, _)| f.rel.ends_with(".onnx"));
    for (f, layout) in onnx {
        let dir = Path::new(&f.rel).parent().unwrap_or(Path::new(""));
        for ext in &layout.external {
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
