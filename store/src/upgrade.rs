//! `upgrade`: convert a store written by an older modelfs in place.
//!
//! Schema 1 keyed contents by the BLAKE3 of the whole file; schema 2 keys
//! them by the content key (store-format §3), which lets an import hash each
//! byte once, and gives every chunk its fingerprint (`chunks.fast`), which lets an
//! import recognise known chunks without hashing them. Objects, recipes and
//! ids are unchanged; each content's key is derived again from its bytes
//! (every chunk checked as it is read), each chunk's fingerprint computed, and all
//! of it written in one transaction, so a crash leaves the old store as it was.
//! Load traces are named by content key and are renamed after the commit (a
//! trace that misses the rename is only a lost hint; `gc` removes it).

use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::catalog::{Catalog, SCHEMA_VERSION};
use crate::error::{Error, Result};
use crate::ids::{ContentId, ContentKey, ObjectId};
use crate::recipe::fingerprint;
use crate::{chunker, Store, CATALOG_FILE};

/// What one [`Store::upgrade`] converted. Equal versions mean the store was
/// already current and nothing was read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpgradeReport {
    /// Catalog schema version found.
    pub from_version: i64,
    /// Catalog schema version the store has now.
    pub to_version: i64,
    /// Contents whose key was derived again from their bytes.
    pub contents: u64,
    /// Bytes read (and checked) to do it: each content's size, once.
    pub bytes_read: u64,
    /// Load traces renamed to their content's new key.
    pub traces_renamed: u64,
}

impl Store {
    /// Upgrade the store at `root` to the current schema; a no-op report if
    /// it already is current. Takes the writer lock, so no import, rm or gc
    /// runs meanwhile; a mount may stay up but must be restarted after it
    /// (it keeps the keys it read at mount time).
    pub fn upgrade(root: &Path, on_wait: impl FnOnce()) -> Result<UpgradeReport> {
        let root = std::path::absolute(root).map_err(|e| Error::Io {
            path: root.to_path_buf(),
            cause: e,
        })?;
        let cat_path = root.join(CATALOG_FILE);
        if !cat_path.is_file() {
            return Err(Error::NotAStore {
                path: root,
                reason: format!("no {CATALOG_FILE}"),
            });
        }
        let (catalog, version) = Catalog::open_any_version(&cat_path, false)?;
        let store = Store {
            root: root.clone(),
            catalog,
        };
        let _lock = store.lock_writer(on_wait)?;
        let mut report = UpgradeReport {
            from_version: version,
            to_version: SCHEMA_VERSION,
            contents: 0,
            bytes_read: 0,
            traces_renamed: 0,
        };
        match version {
            SCHEMA_VERSION => return Ok(report),
            1 => {}
            v => {
                return Err(Error::NotAStore {
                    path: cat_path,
                    reason: format!(
                        "catalog schema version {v}: this modelfs can only upgrade version 1"
                    ),
                })
            }
        }
        let contents = store.catalog.all_contents()?;
        report.contents = contents.len() as u64;
        report.bytes_read = contents.iter().map(|c| c.size).sum();
        // One reader per content and thread; each thread needs its own
        // catalog connection to build a Store handle.
        let keys: Vec<(ContentId, ContentKey, ContentKey)> = contents
            .into_par_iter()
            .map(|c| {
                let (catalog, _) = Catalog::open_any_version(&cat_path, false)?;
                let handle = Store {
                    root: root.clone(),
                    catalog,
                };
                let (id, old) = (c.id, c.hash);
                let reader = handle.read_content(c)?;
                let key = chunker::canonical_key(&reader).map_err(|e| {
                    Error::Corrupt(format!(
                        "content {old} cannot be read back to derive its key ({e}); run `modelfs verify` with the previous modelfs, remove the damaged model, then upgrade"
                    ))
                })?;
                Ok((id, old, key))
            })
            .collect::<Result<_>>()?;

        // Every chunk row's fingerprint, from its bytes in its object.
        let chunk_rows: Vec<(Vec<u8>, i64, i64, i64)> = store.catalog.sql(|c| {
            let mut st = c.prepare("SELECT hash, object, offset, length FROM chunks")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect()
        })?;
        let paths: Vec<std::path::PathBuf> = chunk_rows
            .iter()
            .map(|r| store.object_path(ObjectId(r.1 as u64)))
            .collect();
        let fast: Vec<(Vec<u8>, i64)> = chunk_rows
            .into_par_iter()
            .zip(paths)
            .map(|((hash, _, offset, len), path)| {
                let mut buf = vec![0u8; len as usize];
                std::fs::File::open(&path)
                    .and_then(|f| f.read_exact_at(&mut buf, offset as u64))
                    .map_err(|e| Error::Io { path, cause: e })?;
                Ok((hash, fingerprint(&buf) as i64))
            })
            .collect::<Result<_>>()?;

        let conn = &store.catalog.conn;
        let tx = conn
            .unchecked_transaction()
            .map_err(|e| store.catalog.err(e))?;
        let run = || -> rusqlite::Result<()> {
            tx.execute_batch(
                "ALTER TABLE chunks ADD COLUMN fast INTEGER NOT NULL DEFAULT 0;
                 CREATE INDEX chunks_by_fast ON chunks(fast);",
            )?;
            let mut set_fast = tx.prepare("UPDATE chunks SET fast = ?1 WHERE hash = ?2")?;
            for (hash, f) in &fast {
                set_fast.execute(rusqlite::params![f, hash])?;
            }
            let mut update = tx.prepare("UPDATE contents SET hash = ?1 WHERE id = ?2")?;
            // Two passes through a temporary value, so a new key equal to
            // another row's old key never trips the UNIQUE index midway.
            for (id, _, _) in &keys {
                update.execute(rusqlite::params![id.0.to_le_bytes().to_vec(), id])?;
            }
            for (id, _, key) in &keys {
                update.execute(rusqlite::params![&key.0[..], id])?;
            }
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                [SCHEMA_VERSION.to_string()],
            )?;
            Ok(())
        };
        run().map_err(|e| store.catalog.err(e))?;
        tx.commit().map_err(|e| store.catalog.err(e))?;

        for (_, old, key) in &keys {
            let from = crate::trace::trace_path(&root, old);
            let to = crate::trace::trace_path(&root, key);
            if from.is_file() {
                if let Some(dir) = to.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if std::fs::rename(&from, &to).is_ok() {
                    report.traces_renamed += 1;
                }
            }
        }
        Ok(report)
    }
}
