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
//!
//! The parts, in the order an import uses them: [`source`] decides which
//! files are imported and what else is known about them; [`ingest`] turns
//! each file into chunks and a content, with the threads of [`writer`]
//! around it; this file holds the public types and publishes the result.

mod ingest;
mod source;
mod writer;

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Transaction};

use crate::catalog::{KIND_DIR, KIND_FILE};
use crate::error::{Error, Result};
use crate::ids::ContentId;
use crate::names::{is_ancestor, validate_model_name};
use crate::recipe;
use crate::{fsync_dir, Store};

use ingest::{ContentRef, Ingest};
pub use source::{default_model_name, hf_hub_repos, HubRevision};
use source::{layouts, onnx_external_spans, walk, SourceTree};

/// What to import a source as.
pub struct ImportOptions {
    /// Model name; validated by [`validate_model_name`].
    pub name: String,
    /// Replace an existing model of the same name instead of failing.
    pub replace: bool,
    /// Follow symlinks that point outside the imported tree.
    pub follow_symlinks: bool,
    /// Store files that declare a model format but do not parse (cut by
    /// content alone, with a warning) instead of refusing the import.
    pub allow_malformed: bool,
    /// For a Hugging Face cache repo: the ref name (branch or tag under
    /// `refs/`) or commit (or unique prefix of one) to import; `None` means
    /// `main`. An error for any other source.
    pub revision: Option<String>,
}

/// Callbacks for a progress display. All methods default to doing nothing.
pub trait ImportProgress: Sync {
    /// The source was listed: this many files of this many bytes in all.
    fn begin(&self, _files: u64, _bytes: u64) {}
    /// Importing the file at this path in the model starts.
    fn file(&self, _path: &str) {}
    /// This many more bytes of the current file were processed.
    fn advance(&self, _bytes: u64) {}
    /// Something the user should know; the import goes on. The message is
    /// also kept in [`ImportSummary::warnings`]. May come before
    /// [`ImportProgress::begin`].
    fn warn(&self, _message: &str) {}
    /// Another writer holds the store's lock; the import waits for it.
    fn waiting_for_lock(&self) {}
}

/// Progress callbacks that do nothing.
pub struct NoProgress;
impl ImportProgress for NoProgress {}

/// What an import did, for the caller to report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    /// Name of the imported model.
    pub name: String,
    /// Files in the model.
    pub files: u64,
    /// Bytes of all its files together.
    pub logical_bytes: u64,
    /// Bytes written to new object files (what the store grew by).
    pub new_bytes: u64,
    /// Wall-clock seconds the import took.
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
    /// The warnings reported through [`ImportProgress::warn`].
    pub warnings: Vec<String>,
    /// For a Hugging Face cache import, the revision as asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// For a Hugging Face cache import, the snapshot commit imported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

impl Store {
    /// Import `source` as model `opts.name`. On error nothing becomes visible
    /// and objects written so far are removed (or left for `gc` if even that fails).
    ///
    /// Refused before anything is written: a source without files
    /// ([`Error::NothingToImport`]), and, unless `opts.allow_malformed`, one
    /// with files that declare a model format but do not parse
    /// ([`Error::MalformedModelFiles`], naming each).
    pub fn import(
        &mut self,
        source: &Path,
        opts: &ImportOptions,
        progress: &dyn ImportProgress,
    ) -> Result<ImportSummary> {
        let started = Instant::now();
        validate_model_name(&opts.name)?;
        let tree = walk(source, opts.follow_symlinks, opts.revision.as_deref())?;
        if tree.files.is_empty() {
            return Err(Error::NothingToImport(source.to_path_buf()));
        }
        let (layouts, warnings) = layouts(&tree, opts.allow_malformed, progress)?;
        let external = onnx_external_spans(&tree, &layouts);
        let _lock = self.lock_writer(|| progress.waiting_for_lock())?;
        self.check_name_free(&opts.name, opts.replace)?;

        let logical: u64 = tree.files.iter().map(|f| f.size).sum();
        progress.begin(tree.files.len() as u64, logical);
        let next_object = self.catalog().next_object_id()?;
        let mut ingest = Ingest::new(
            self,
            next_object,
            ImportSummary {
                name: opts.name.clone(),
                files: tree.files.len() as u64,
                logical_bytes: logical,
                new_bytes: 0,
                seconds: 0.0,
                whole_files: 0,
                recipe_files: 0,
                identical_files: 0,
                recognised_bytes: 0,
                warnings,
                revision: tree.hub.as_ref().map(|h| h.revision.clone()),
                commit: tree.hub.as_ref().map(|h| h.commit.clone()),
            },
        );
        let mut refs = Vec::with_capacity(tree.files.len());
        let mut outcome = Ok(());
        for (f, layout) in tree.files.iter().zip(layouts) {
            progress.file(&f.rel);
            let extra = external.get(&f.rel).map(Vec::as_slice).unwrap_or(&[]);
            match ingest.ingest_file(f, layout, extra, progress) {
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

    /// Publish the import: one transaction adds its objects, contents, chunks
    /// and the model with its entries (replacing a model of the same name if
    /// asked to).
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
            let content_ids = insert_contents(&tx, ingest)?;
            tx.execute(
                "INSERT INTO models(name, imported_at, source, file_count, logical_bytes, hf_revision, hf_commit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    opts.name,
                    now_ns,
                    source,
                    tree.files.len() as i64,
                    ingest.summary.logical_bytes as i64,
                    tree.hub.as_ref().map(|h| &h.revision),
                    tree.hub.as_ref().map(|h| &h.commit)
                ],
            )?;
            let model_id = tx.last_insert_rowid();
            insert_entries(&tx, model_id, tree, refs, &content_ids)
        };
        run().map_err(|e| catalog.err(e))?;
        tx.commit().map_err(|e| catalog.err(e))
    }
}

/// Insert the import's new contents, and the chunks it stored, returning the
/// contents' ids in the order of `ingest.new_contents`.
fn insert_contents(tx: &Transaction<'_>, ingest: &Ingest<'_>) -> rusqlite::Result<Vec<ContentId>> {
    let mut content_ids = Vec::with_capacity(ingest.new_contents.len());
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
    Ok(content_ids)
}

/// Insert the model's entries: its directories, then its files pointing at
/// their contents.
fn insert_entries(
    tx: &Transaction<'_>,
    model_id: i64,
    tree: &SourceTree,
    refs: &[ContentRef],
    content_ids: &[ContentId],
) -> rusqlite::Result<()> {
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
}
