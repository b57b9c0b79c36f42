//! `gc`: give back the disk space of bytes no model references.
//!
//! Three kinds of garbage: catalog rows of removed models' contents, object
//! files nothing references (including those of imports killed before their
//! commit), and dead ranges inside objects that are still partly referenced.
//! The catalog is cleaned first, in one transaction; files are touched only
//! after that commit, so a crash mid-gc leaves garbage for the next gc, never a
//! dangling reference. Dead ranges are freed with `fallocate(PUNCH_HOLE)`,
//! which keeps every other offset valid, so no recipe is ever rewritten.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use crate::error::{IoContext, Result};
use crate::ids::{ChunkHash, ObjectId};
use crate::locks;
use crate::Store;

const BLOCK: u64 = 4096;

/// What one [`Store::gc`] removed and how much disk space it gave back.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Contents no model's file uses any more, deleted from the catalog.
    pub contents_removed: u64,
    /// Chunks no remaining content uses, deleted from the chunk index.
    pub chunks_removed: u64,
    /// Object files nothing references, unlinked (including those of
    /// imports killed before their commit).
    pub objects_removed: u64,
    /// Object files still in use whose dead ranges were punched out, when
    /// that freed any blocks.
    pub objects_punched: u64,
    /// Objects with dead ranges left alone because a reader has them open.
    pub objects_busy: u64,
    /// Disk space given back in bytes, as allocated blocks (not file sizes):
    /// unlinked objects plus punched ranges.
    pub bytes_freed: u64,
    /// Load traces of contents no model has any more.
    pub traces_removed: u64,
}

impl Store {
    /// Delete everything no model references: catalog rows first, in one
    /// transaction, then unreferenced object files, then dead ranges of
    /// live objects (skipping any a reader has open) and orphaned load
    /// traces. Takes the writer lock, so it waits for a running import.
    pub fn gc(&mut self) -> Result<GcReport> {
        let _lock = self.lock_writer(|| {})?;
        let mut report = GcReport::default();

        // 1. Catalog: drop contents no entry uses, then chunks and objects no
        //    remaining content uses.
        let catalog = self.catalog();
        let tx = catalog
            .conn
            .unchecked_transaction()
            .map_err(|e| catalog.err(e))?;
        report.contents_removed = tx
            .execute(
                "DELETE FROM contents WHERE id NOT IN
                   (SELECT content FROM entries WHERE content IS NOT NULL)",
                [],
            )
            .map_err(|e| catalog.err(e))? as u64;
        let contents = catalog.all_contents()?;
        let mut live: HashMap<ObjectId, Vec<(u64, u64)>> = HashMap::new();
        let mut live_chunks: HashSet<ChunkHash> = HashSet::new();
        for c in &contents {
            for s in &c.segments {
                live.entry(s.object)
                    .or_default()
                    .push((s.object_offset, s.object_offset + u64::from(s.len)));
                live_chunks.insert(s.hash);
            }
        }
        let all_chunks: Vec<Vec<u8>> = {
            let mut st = tx
                .prepare("SELECT hash FROM chunks")
                .map_err(|e| catalog.err(e))?;
            let rows = st.query_map([], |r| r.get(0)).map_err(|e| catalog.err(e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| catalog.err(e))?
        };
        {
            let mut del = tx
                .prepare("DELETE FROM chunks WHERE hash = ?1")
                .map_err(|e| catalog.err(e))?;
            for h in all_chunks {
                if ChunkHash::from_slice(&h).is_none_or(|h| !live_chunks.contains(&h)) {
                    del.execute([&h]).map_err(|e| catalog.err(e))?;
                    report.chunks_removed += 1;
                }
            }
            let mut del = tx
                .prepare("DELETE FROM objects WHERE id = ?1")
                .map_err(|e| catalog.err(e))?;
            for (id, _) in catalog.objects()? {
                if !live.contains_key(&id) {
                    del.execute([id]).map_err(|e| catalog.err(e))?;
                }
            }
        }
        tx.commit().map_err(|e| catalog.err(e))?;

        // 2. Files: unlink unreferenced objects; punch dead ranges of live ones.
        for (id, allocated) in self.object_files()? {
            let path = self.object_path(id);
            let Some(ranges) = live.get_mut(&id) else {
                std::fs::remove_file(&path).at(&path)?;
                report.objects_removed += 1;
                report.bytes_freed += allocated;
                continue;
            };
            let size = std::fs::metadata(&path).at(&path)?.len();
            let holes = dead_blocks(ranges, size);
            if holes.is_empty() {
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .at(&path)?;
            if !locks::try_own_object(&file).at(&path)? {
                report.objects_busy += 1;
                continue;
            }
            for (start, end) in holes {
                // SAFETY: fallocate on our own descriptor with valid flags.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        start as i64,
                        (end - start) as i64,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error()).at(&path);
                }
            }
            let after = file.metadata().at(&path)?.blocks() * 512;
            if after < allocated {
                report.bytes_freed += allocated - after;
                report.objects_punched += 1;
            }
        }
        report.traces_removed = self.remove_orphan_traces(&contents)?;
        let _ = self
            .catalog()
            .sql(|c| c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())));
        Ok(report)
    }

    /// Delete traces whose content is gone, and temporary files a mount
    /// left behind more than a minute ago (younger ones may be mid-write).
    fn remove_orphan_traces(&self, contents: &[crate::ContentInfo]) -> Result<u64> {
        let live: HashSet<String> = contents.iter().map(|c| c.hash.to_hex()).collect();
        let root = self.root().join(crate::TRACES_DIR);
        let Ok(fanout) = std::fs::read_dir(&root) else {
            return Ok(0);
        };
        let mut removed = 0;
        for dir in fanout {
            let dir = dir.at(&root)?.path();
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for file in files {
                let file = file.at(&dir)?;
                let name = file.file_name().to_string_lossy().into_owned();
                let stale_tmp = name.starts_with(".tmp-")
                    && file
                        .metadata()
                        .ok()
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() > 60);
                if stale_tmp || (!name.starts_with(".tmp-") && !live.contains(&name)) {
                    std::fs::remove_file(file.path()).at(file.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Block-aligned ranges of `0..size` that no live range touches.
fn dead_blocks(live: &mut [(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    live.sort_unstable();
    let mut holes = Vec::new();
    let mut pos = 0u64;
    let mut push = |from: u64, to: u64| {
        let start = from.div_ceil(BLOCK) * BLOCK;
        let end = to / BLOCK * BLOCK;
        if end > start {
            holes.push((start, end));
        }
    };
    for &(s, e) in live.iter() {
        if s > pos {
            push(pos, s);
        }
        pos = pos.max(e);
    }
    if size > pos {
        push(pos, size.div_ceil(BLOCK) * BLOCK);
    }
    holes
}

#[cfg(test)]
mod tests {
    use super::dead_blocks;

    #[test]
    fn holes_never_touch_live_bytes() {
        let mut live = vec![(10_000, 20_000), (0, 100)];
        assert_eq!(
            dead_blocks(&mut live, 40_000),
            vec![(4096, 8192), (20_480, 40_960)]
        );
        let mut live = vec![(0, 4096)];
        assert!(dead_blocks(&mut live, 4096).is_empty());
    }
}
