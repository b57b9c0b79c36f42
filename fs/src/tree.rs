//! The directory tree the mount shows, built from a catalog snapshot.
//!
//! Inode numbers are derived, not allocated, so they are stable across
//! refreshes and remounts: a file's inode is its *content* id (identical
//! files anywhere in the mount are one inode and share page-cache pages), a
//! directory's inode is a hash of its path.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use modelfs_store::{ContentId, ContentInfo, ObjectId, Snapshot, RESERVED_NAME};

/// Inode of the mount's root directory (FUSE's fixed root inode).
pub const ROOT_INO: u64 = 1;
/// `.modelfs/` at the root, and `.modelfs/stats.json` in it.
pub const CONTROL_DIR_INO: u64 = 2;
/// Inode of `.modelfs/stats.json`, generated afresh at every open.
pub const STATS_INO: u64 = 3;
pub(crate) const STATS_NAME: &str = "stats.json";
/// File inodes are `FILE_INO_BASE + content id`.
const FILE_INO_BASE: u64 = 1 << 32;
/// Directory inodes have this bit set, the rest is a hash of the path.
const DIR_INO_FLAG: u64 = 1 << 62;

#[derive(Debug)]
pub(crate) struct DirNode {
    pub parent: u64,
    pub children: BTreeMap<String, u64>,
    pub subdirs: u32,
    pub mtime: SystemTime,
}

/// A file inode: one distinct content, however many paths show it.
#[derive(Debug)]
pub struct FileNode {
    pub(crate) content: Arc<ContentInfo>,
    /// One `model/path` this content appears as, for log messages.
    pub(crate) label: String,
    pub(crate) mode: u32,
    pub(crate) nlink: u32,
    pub(crate) mtime: SystemTime,
}

/// An immutable view of the mount at one catalog version.
#[derive(Debug, Default)]
pub struct Tree {
    pub(crate) dirs: HashMap<u64, DirNode>,
    /// File inodes by inode number; one per distinct content.
    pub files: HashMap<u64, FileNode>,
    /// Number of models (for status lines).
    pub models: usize,
    /// Sum of the models' file sizes in bytes, shared bytes counted in every
    /// model and file that has them.
    pub logical_bytes: u64,
    /// For each chunk location (object, offset): how many models reference it.
    pub chunk_refs: HashMap<(ObjectId, u64), u32>,
    /// (name, import time) of every model: imports and removals between two
    /// trees are the differences.
    pub model_imports: std::collections::HashSet<(String, i64)>,
    /// Content ids of each model's files (each once), for per-model stats.
    pub model_contents: BTreeMap<String, Vec<ContentId>>,
}

pub(crate) fn file_ino(content_id: ContentId) -> u64 {
    FILE_INO_BASE + content_id.0 as u64
}

fn dir_ino(path: &str) -> u64 {
    let h = blake3::hash(path.as_bytes());
    let n = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    DIR_INO_FLAG | (n & (DIR_INO_FLAG - 1))
}

fn time_of(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

impl Tree {
    pub(crate) fn build(snap: &Snapshot, mounted_at: SystemTime) -> Tree {
        let mut t = Tree {
            models: snap.models.len(),
            logical_bytes: snap.models.iter().map(|m| m.logical_bytes).sum(),
            model_imports: snap
                .models
                .iter()
                .map(|m| (m.name.clone(), m.imported_at_ns))
                .collect(),
            ..Tree::default()
        };
        t.dirs.insert(
            ROOT_INO,
            DirNode {
                parent: ROOT_INO,
                children: BTreeMap::new(),
                subdirs: 0,
                mtime: mounted_at,
            },
        );
        t.dirs.insert(
            CONTROL_DIR_INO,
            DirNode {
                parent: ROOT_INO,
                children: BTreeMap::from([(STATS_NAME.to_string(), STATS_INO)]),
                subdirs: 0,
                mtime: mounted_at,
            },
        );
        t.link(ROOT_INO, RESERVED_NAME, CONTROL_DIR_INO, true);

        let model_names: HashMap<i64, (&str, SystemTime)> = snap
            .models
            .iter()
            .map(|m| (m.id, (m.name.as_str(), time_of(m.imported_at_ns))))
            .collect();
        for m in &snap.models {
            t.ensure_dir(&m.name, time_of(m.imported_at_ns));
        }
        // Directories first, so files find their parents.
        let mut entries: Vec<_> = snap.entries.iter().collect();
        entries.sort_by_key(|(_, e)| !e.is_dir);
        // Distinct models per chunk: walk files model by model and count a
        // chunk once per model.
        let mut last_model: HashMap<(ObjectId, u64), i64> = HashMap::new();
        let mut by_model: Vec<&(i64, modelfs_store::EntryInfo)> =
            snap.entries.iter().filter(|(_, e)| !e.is_dir).collect();
        by_model.sort_by_key(|(m, _)| *m);
        for (model, e) in by_model {
            let Some(c) = e.content.and_then(|c| snap.contents.get(&c)) else {
                continue;
            };
            for s in &c.segments {
                let key = (s.object, s.object_offset);
                if last_model.insert(key, *model) != Some(*model) {
                    *t.chunk_refs.entry(key).or_default() += 1;
                }
            }
        }
        for (model, e) in entries {
            let Some(&(name, mtime)) = model_names.get(model) else {
                continue;
            };
            let full = format!("{name}/{}", e.path);
            if e.is_dir {
                t.ensure_dir(&full, mtime);
                continue;
            }
            let Some(cid) = e.content else { continue };
            let Some(content) = snap.contents.get(&cid) else {
                continue;
            };
            t.model_contents
                .entry(name.to_string())
                .or_default()
                .push(cid);
            let (parent_path, file_name) = full.rsplit_once('/').expect("has a model prefix");
            let parent = t.ensure_dir(parent_path, mtime);
            let ino = file_ino(cid);
            let node = t.files.entry(ino).or_insert_with(|| FileNode {
                content: Arc::new(content.clone()),
                label: full.clone(),
                mode: e.mode,
                nlink: 0,
                mtime,
            });
            node.nlink += 1;
            node.mtime = node.mtime.min(mtime);
            t.link(parent, file_name, ino, false);
        }
        for ids in t.model_contents.values_mut() {
            ids.sort_unstable();
            ids.dedup();
        }
        t
    }

    fn link(&mut self, parent: u64, name: &str, ino: u64, is_dir: bool) {
        let dir = self.dirs.get_mut(&parent).expect("parent exists");
        if dir.children.insert(name.to_string(), ino).is_none() && is_dir {
            dir.subdirs += 1;
        }
    }

    /// The inode of directory `path` (relative to the root), creating it and
    /// its ancestors as needed.
    fn ensure_dir(&mut self, path: &str, mtime: SystemTime) -> u64 {
        let mut parent = ROOT_INO;
        let mut so_far = String::new();
        for part in path.split('/') {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(part);
            let existing = self.dirs[&parent].children.get(part).copied();
            let ino = match existing {
                Some(ino) if self.dirs.contains_key(&ino) => ino,
                _ => {
                    let mut ino = dir_ino(&so_far);
                    while self.dirs.contains_key(&ino) || ino <= STATS_INO {
                        ino = DIR_INO_FLAG | ((ino + 1) & (DIR_INO_FLAG - 1));
                    }
                    self.dirs.insert(
                        ino,
                        DirNode {
                            parent,
                            children: BTreeMap::new(),
                            subdirs: 0,
                            mtime,
                        },
                    );
                    self.link(parent, part, ino, true);
                    ino
                }
            };
            let d = self.dirs.get_mut(&ino).expect("just ensured");
            d.mtime = d.mtime.max(mtime);
            parent = ino;
        }
        parent
    }

    /// Directories present in both trees whose children changed: their
    /// cached attributes (link count, mtime) are stale.
    pub fn changed_dirs(&self, old: &Tree) -> Vec<u64> {
        self.dirs
            .iter()
            .filter(|(ino, d)| old.dirs.get(ino).is_some_and(|o| o.children != d.children))
            .map(|(ino, _)| *ino)
            .collect()
    }

    /// Names whose entry changed between `old` and `self`: (parent, name).
    /// The kernel caches lookups for a long TTL, so these must be invalidated.
    pub fn changed_entries(&self, old: &Tree) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (ino, old_dir) in &old.dirs {
            // A vanished directory is reached through its parent's entry.
            let Some(new_dir) = self.dirs.get(ino) else {
                continue;
            };
            for (name, child) in &old_dir.children {
                if new_dir.children.get(name) != Some(child) {
                    out.push((*ino, name.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelfs_store::{ContentKey, EntryInfo, ModelInfo};

    fn content(id: i64) -> ContentInfo {
        ContentInfo {
            id: ContentId(id),
            hash: ContentKey([id as u8; 32]),
            size: 10,
            whole_object: None,
            format: None,
            segments: vec![],
        }
    }

    fn model(id: i64, name: &str) -> ModelInfo {
        ModelInfo {
            id,
            name: name.into(),
            files: 0,
            logical_bytes: 0,
            imported_at_ns: 1_000_000_000 * id,
            source: String::new(),
            revision: None,
            commit: None,
        }
    }

    fn file(path: &str, content: i64) -> EntryInfo {
        EntryInfo {
            path: path.into(),
            is_dir: false,
            content: Some(ContentId(content)),
            mode: 0o444,
        }
    }

    #[test]
    fn identical_content_is_one_inode_with_a_link_per_path() {
        let snap = Snapshot {
            models: vec![model(1, "a"), model(2, "org/b")],
            entries: vec![
                (1, file("w.bin", 7)),
                (
                    2,
                    EntryInfo {
                        path: "sub".into(),
                        is_dir: true,
                        content: None,
                        mode: 0o555,
                    },
                ),
                (2, file("sub/w.bin", 7)),
                (2, file("c.json", 8)),
            ],
            contents: [(ContentId(7), content(7)), (ContentId(8), content(8))].into(),
        };
        let t = Tree::build(&snap, UNIX_EPOCH);
        let a = t.dirs[&ROOT_INO].children["a"];
        let org = t.dirs[&ROOT_INO].children["org"];
        let b = t.dirs[&org].children["b"];
        let sub = t.dirs[&b].children["sub"];
        assert_eq!(t.dirs[&a].children["w.bin"], t.dirs[&sub].children["w.bin"]);
        assert_eq!(t.files[&file_ino(ContentId(7))].nlink, 2);
        assert_eq!(t.dirs[&b].subdirs, 1);
        assert_eq!(
            t.files[&file_ino(ContentId(7))].mtime,
            UNIX_EPOCH + Duration::from_secs(1)
        );
        // Rebuilding gives the same numbers: inodes are derived, not allocated.
        let again = Tree::build(&snap, UNIX_EPOCH);
        assert_eq!(again.dirs[&ROOT_INO].children["org"], org);
        assert!(again.changed_entries(&t).is_empty());
        assert!(again.changed_dirs(&t).is_empty());
        let fewer = Tree::build(
            &Snapshot {
                models: vec![model(1, "a")],
                ..snap
            },
            UNIX_EPOCH,
        );
        assert_eq!(
            fewer.changed_entries(&t),
            vec![(ROOT_INO, "org".to_string())]
        );
    }
}
