//! The catalog: models, their files, contents, recipes and the chunk index,
//! in one SQLite database in WAL mode.
//!
//! Why SQLite/WAL: the importer (one process) writes while mounted
//! filesystems (other processes) read. WAL gives every reader a consistent
//! snapshot across processes without blocking the writer, and a commit is one
//! atomic, fsync'd append to the log, which is exactly the "a model becomes
//! visible only when complete and durable" rule. A single-process database
//! would force every import through the mount daemon.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, Result};
use crate::ids::{ChunkHash, ContentId, ContentKey, ObjectId};
use crate::recipe::{self, Segment};

/// Version of the catalog schema written to `meta.schema_version`.
/// 2: `contents.hash` is the content key (BLAKE3 over the chunk list,
/// store-format §3); in 1 it was the BLAKE3 of the whole file.
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    size  INTEGER NOT NULL,
    whole INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS contents (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    hash         BLOB NOT NULL UNIQUE,
    size         INTEGER NOT NULL,
    whole_object INTEGER REFERENCES objects(id),
    format       TEXT,
    recipe       BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    hash   BLOB PRIMARY KEY,
    object INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    fast   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_fast ON chunks(fast);
CREATE TABLE IF NOT EXISTS models (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    imported_at   INTEGER NOT NULL,
    source        TEXT NOT NULL,
    file_count    INTEGER NOT NULL,
    logical_bytes INTEGER NOT NULL,
    hf_revision   TEXT,
    hf_commit     TEXT
);
CREATE TABLE IF NOT EXISTS entries (
    model   INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path    TEXT NOT NULL,
    kind    INTEGER NOT NULL,
    content INTEGER REFERENCES contents(id),
    mode    INTEGER NOT NULL,
    PRIMARY KEY (model, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_content ON entries(content);
"#;

/// Entry kinds in `entries.kind`.
pub const KIND_FILE: i64 = 0;
pub const KIND_DIR: i64 = 1;

pub(crate) struct Catalog {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    /// Whether `models` has the `hf_revision`/`hf_commit` columns: a store
    /// made before them gets them at the first open that can write, and one
    /// opened read-only meanwhile reads them as NULL.
    hf_columns: bool,
}

/// A model as listed by `ls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// Catalog row id; [`Snapshot::entries`] names a model's entries by it.
    #[serde(skip)]
    pub id: i64,
    /// Model name: a relative `/`-separated path, the model's directory
    /// under the mount point.
    pub name: String,
    /// Number of files in the model (directories not counted).
    pub files: u64,
    /// Sum of the files' sizes in bytes, as the model's reader sees them:
    /// bytes shared with other models or between files count every time.
    pub logical_bytes: u64,
    /// Import time, nanoseconds since the Unix epoch.
    pub imported_at_ns: i64,
    /// Absolute, symlink-resolved path that was imported; informational only.
    pub source: String,
    /// For a model imported from a Hugging Face cache: the revision as asked
    /// (`main`, a tag, a commit prefix).
    pub revision: Option<String>,
    /// For a model imported from a Hugging Face cache: the snapshot commit.
    pub commit: Option<String>,
}

/// A file or directory inside a model.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    /// Path inside the model, `/`-separated, without a leading `/`.
    pub path: String,
    /// Whether the entry is a directory rather than a regular file.
    pub is_dir: bool,
    /// The file's content; `None` for a directory.
    pub content: Option<ContentId>,
    /// Permission bits to present: 0o444 or 0o555 for a file (0o555 if the
    /// source had any execute bit), 0o555 for a directory.
    pub mode: u32,
}

/// A distinct file content.
#[derive(Debug, Clone)]
pub struct ContentInfo {
    /// Catalog id, never reused; the mount derives inode numbers from it.
    pub id: ContentId,
    /// The content key: BLAKE3 over the chunk list, so equal keys mean
    /// equal bytes.
    pub hash: ContentKey,
    /// Bytes of the file; the segments' lengths add up to it.
    pub size: u64,
    /// Set when an object file exists that is byte-identical to this content.
    pub whole_object: Option<ObjectId>,
    /// The parser that located tensors at import (`safetensors`, `torch`,
    /// `gguf`, `onnx`); `None` if the file was cut by content alone.
    /// Informational: reading does not depend on it.
    pub format: Option<String>,
    /// The recipe: every chunk of the file in file order, each with where
    /// its bytes are stored. Empty for an empty file.
    pub segments: Vec<Segment>,
}

impl Catalog {
    /// Open (creating if asked) the catalog at `path`.
    pub fn open(path: &Path, create: bool) -> Result<Catalog> {
        let (mut cat, version) = Catalog::open_any_version(path, create)?;
        match version {
            SCHEMA_VERSION => {
                cat.hf_columns = cat.add_hf_columns()?;
                Ok(cat)
            }
            1 => Err(Error::NotAStore {
                path: path.to_path_buf(),
                reason: format!(
                    "catalog schema version 1, this modelfs reads {SCHEMA_VERSION}; run `modelfs upgrade` to convert it (objects are kept; every stored byte is read once)"
                ),
            }),
            v => Err(Error::NotAStore {
                path: path.to_path_buf(),
                reason: format!("catalog schema version {v}, this modelfs reads {SCHEMA_VERSION}"),
            }),
        }
    }

    /// Open (creating if asked) a catalog of any schema version, and say
    /// which; `upgrade` uses it directly.
    pub(crate) fn open_any_version(path: &Path, create: bool) -> Result<(Catalog, i64)> {
        let flags = if create {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| Error::Catalog {
            path: path.to_path_buf(),
            cause: e,
        })?;
        let cat = Catalog {
            conn,
            path: path.to_path_buf(),
            hf_columns: false,
        };
        let version = cat.setup(create)?;
        Ok((cat, version))
    }

    /// Set up the connection (and the schema if `create`); the schema version.
    fn setup(&self, create: bool) -> Result<i64> {
        // FULL: a commit is fsync'd before it returns, so a model reported as
        // imported survives power loss. WAL: readers in other processes keep
        // reading a consistent snapshot while an import commits.
        self.sql(|c| {
            c.busy_timeout(std::time::Duration::from_secs(30))?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.pragma_update(None, "foreign_keys", "ON")?;
            Ok(())
        })?;
        if create {
            self.sql(|c| {
                c.execute_batch(SCHEMA)?;
                c.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )?;
                Ok(())
            })?;
        }
        let version: Option<String> = self.sql(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
        })?;
        match version.as_deref() {
            Some(v) => v.parse().map_err(|_| Error::NotAStore {
                path: self.path.clone(),
                reason: format!("catalog schema version {v:?} is not a number"),
            }),
            None => Err(Error::NotAStore {
                path: self.path.clone(),
                reason: "catalog has no schema version".into(),
            }),
        }
    }

    /// Add the nullable `models.hf_revision`/`hf_commit` columns to a store
    /// made before them; whether the columns are there now. Adding nullable
    /// columns keeps the schema version: older modelfs name the columns they
    /// read, so the extra ones are invisible to them. The check and the
    /// change share one write transaction, so two processes opening at once
    /// cannot both add them. A catalog this user cannot write is read with
    /// the columns as NULL.
    fn add_hf_columns(&self) -> Result<bool> {
        let has = |c: &Connection| -> rusqlite::Result<bool> {
            let n: i64 = c.query_row(
                "SELECT count(*) FROM pragma_table_info('models') WHERE name IN ('hf_revision', 'hf_commit')",
                [],
                |r| r.get(0),
            )?;
            Ok(n == 2)
        };
        if self.sql(has)? {
            return Ok(true);
        }
        let added = self.conn.execute_batch("BEGIN IMMEDIATE").and_then(|()| {
            let run = || -> rusqlite::Result<()> {
                if !has(&self.conn)? {
                    self.conn.execute_batch(
                        "ALTER TABLE models ADD COLUMN hf_revision TEXT;
                         ALTER TABLE models ADD COLUMN hf_commit TEXT;",
                    )?;
                }
                self.conn.execute_batch("COMMIT")
            };
            run().inspect_err(|_| {
                let _ = self.conn.execute_batch("ROLLBACK");
            })
        });
        match added {
            Ok(()) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// The `models` columns [`row_to_model`] reads.
    fn model_columns(&self) -> &'static str {
        if self.hf_columns {
            "id, name, file_count, logical_bytes, imported_at, source, hf_revision, hf_commit"
        } else {
            "id, name, file_count, logical_bytes, imported_at, source, NULL, NULL"
        }
    }

    /// Run a rusqlite call, naming the catalog file in any error.
    pub(crate) fn sql<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        f(&self.conn).map_err(|e| self.err(e))
    }

    pub(crate) fn err(&self, e: rusqlite::Error) -> Error {
        Error::Catalog {
            path: self.path.clone(),
            cause: e,
        }
    }

    pub fn models(&self) -> Result<Vec<ModelInfo>> {
        self.sql(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {} FROM models ORDER BY name",
                self.model_columns()
            ))?;
            let rows = st.query_map([], row_to_model)?;
            rows.collect()
        })
    }

    pub fn model(&self, name: &str) -> Result<Option<ModelInfo>> {
        self.sql(|c| {
            c.prepare_cached(&format!(
                "SELECT {} FROM models WHERE name = ?1",
                self.model_columns()
            ))?
            .query_row([name], row_to_model)
            .optional()
        })
    }

    pub fn entries(&self, model_id: i64) -> Result<Vec<EntryInfo>> {
        self.sql(|c| {
            let mut st = c.prepare_cached(
                "SELECT path, kind, content, mode FROM entries WHERE model = ?1 ORDER BY path",
            )?;
            let rows = st.query_map([model_id], row_to_entry)?;
            rows.collect()
        })
    }

    pub fn entry(&self, model_id: i64, path: &str) -> Result<Option<EntryInfo>> {
        self.sql(|c| {
            c.prepare_cached(
                "SELECT path, kind, content, mode FROM entries WHERE model = ?1 AND path = ?2",
            )?
            .query_row(params![model_id, path], row_to_entry)
            .optional()
        })
    }

    pub fn content(&self, id: ContentId) -> Result<ContentInfo> {
        let row = self
            .sql(|c| {
                c.prepare_cached(
                "SELECT id, hash, size, whole_object, format, recipe FROM contents WHERE id = ?1",
            )?
            .query_row([id], raw_content)
            })
            .map_err(|e| match e {
                Error::Catalog {
                    cause: rusqlite::Error::QueryReturnedNoRows,
                    ..
                } => Error::ContentRemoved,
                e => e,
            })?;
        self.content_from_row(row)
    }

    /// Every content row, decoded. Used by gc, du and verify, which need them all.
    pub fn all_contents(&self) -> Result<Vec<ContentInfo>> {
        let rows = self.sql(|c| {
            let mut st = c.prepare(
                "SELECT id, hash, size, whole_object, format, recipe FROM contents ORDER BY id",
            )?;
            let rows = st.query_map([], raw_content)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter().map(|r| self.content_from_row(r)).collect()
    }

    fn content_from_row(
        &self,
        (id, hash, size, whole, format, blob): RawContent,
    ) -> Result<ContentInfo> {
        let corrupt = |what: &str| {
            Error::Corrupt(format!(
                "catalog {}: content {id} has {what}",
                self.path.display()
            ))
        };
        let hash = ContentKey::from_slice(&hash).ok_or_else(|| corrupt("a malformed hash"))?;
        let segments = recipe::decode(&blob).ok_or_else(|| corrupt("a malformed recipe"))?;
        Ok(ContentInfo {
            id,
            hash,
            size: u64::try_from(size).map_err(|_| corrupt("a negative size"))?,
            whole_object: whole.map(|w| ObjectId(w as u64)),
            format,
            segments,
        })
    }

    /// Whether a content row still exists (gc deletes rows before it frees bytes).
    pub fn content_exists(&self, id: ContentId) -> Result<bool> {
        self.sql(|c| {
            c.prepare_cached("SELECT 1 FROM contents WHERE id = ?1")?
                .query_row([id], |_| Ok(()))
                .optional()
                .map(|r| r.is_some())
        })
    }

    /// The next object id: never one used before, even if gc deleted it,
    /// because a running mount may still map the old object under that id.
    pub fn next_object_id(&self) -> Result<ObjectId> {
        self.sql(|c| {
            c.query_row(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'objects'), 0),
                            COALESCE((SELECT MAX(id) FROM objects), 0)) + 1",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|v| ObjectId(v as u64))
    }

    pub fn content_by_hash(&self, hash: &ContentKey) -> Result<Option<ContentId>> {
        self.sql(|c| {
            c.prepare_cached("SELECT id FROM contents WHERE hash = ?1")?
                .query_row([hash], |r| r.get(0))
                .optional()
        })
    }

    /// Where an already-stored chunk lives, if it is stored.
    pub fn chunk(&self, hash: &ChunkHash) -> Result<Option<(ObjectId, u64)>> {
        self.sql(|c| {
            c.prepare_cached("SELECT object, offset FROM chunks WHERE hash = ?1")?
                .query_row([hash], |r| {
                    Ok((r.get::<_, ObjectId>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .optional()
        })
    }

    /// Stored chunks of length `len` whose fingerprint is `fast` (candidates for
    /// holding the same bytes; only comparing the bytes tells).
    pub fn chunks_by_fast(&self, fast: u64, len: u32) -> Result<Vec<(ChunkHash, ObjectId, u64)>> {
        self.sql(|c| {
            let mut st = c.prepare_cached(
                "SELECT hash, object, offset FROM chunks WHERE fast = ?1 AND length = ?2 LIMIT 4",
            )?;
            let rows = st.query_map(rusqlite::params![fast as i64, len], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, ObjectId>(1)?,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .map(|rows| {
            rows.into_iter()
                .filter_map(|(h, o, off)| Some((ChunkHash::from_slice(&h)?, o, off)))
                .collect()
        })
    }

    /// (model name, file path) of every entry that uses a content.
    pub fn users_of_content(&self, content: ContentId) -> Result<Vec<(String, String)>> {
        self.sql(|c| {
            let mut st = c.prepare_cached(
                "SELECT m.name, e.path FROM entries e JOIN models m ON m.id = e.model
                 WHERE e.content = ?1 ORDER BY m.name, e.path",
            )?;
            let rows = st.query_map([content], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// (object id, recorded size) of every object the catalog knows.
    pub fn objects(&self) -> Result<Vec<(ObjectId, u64)>> {
        self.sql(|c| {
            let mut st = c.prepare("SELECT id, size FROM objects ORDER BY id")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, ObjectId>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
    }

    /// (model id, content id) for every file entry: who references what.
    pub fn file_references(&self) -> Result<Vec<(i64, ContentId)>> {
        self.sql(|c| {
            let mut st =
                c.prepare("SELECT model, content FROM entries WHERE content IS NOT NULL")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }
}

/// A `contents` row as stored (id, hash, size, whole_object, format, recipe),
/// decoded and checked by `Catalog::content_from_row`.
type RawContent = (
    ContentId,
    Vec<u8>,
    i64,
    Option<i64>,
    Option<String>,
    Vec<u8>,
);

fn raw_content(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawContent> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn row_to_model(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModelInfo> {
    Ok(ModelInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        files: r.get::<_, i64>(2)? as u64,
        logical_bytes: r.get::<_, i64>(3)? as u64,
        imported_at_ns: r.get(4)?,
        source: r.get(5)?,
        revision: r.get(6)?,
        commit: r.get(7)?,
    })
}

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<EntryInfo> {
    Ok(EntryInfo {
        path: r.get(0)?,
        is_dir: r.get::<_, i64>(1)? == KIND_DIR,
        content: r.get(2)?,
        mode: r.get::<_, i64>(3)? as u32,
    })
}

/// Everything the mount needs, read in one transaction so it is consistent.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every model, ordered by name.
    pub models: Vec<ModelInfo>,
    /// (model id, entry) for every entry of every model.
    pub entries: Vec<(i64, EntryInfo)>,
    /// Every content some entry uses, by id.
    pub contents: std::collections::HashMap<ContentId, ContentInfo>,
}

impl Catalog {
    /// A counter that changes whenever another connection commits: the
    /// mount polls it to notice imports and removals.
    pub fn data_version(&self) -> Result<i64> {
        self.sql(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
    }

    /// Delete these models (their entries go with them) in one transaction:
    /// a reader sees all of them or none of them gone.
    pub fn remove_models(&self, ids: &[i64]) -> Result<()> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        self.sql(|c| {
            let mut st = c.prepare("DELETE FROM models WHERE id = ?1")?;
            for id in ids {
                st.execute([id])?;
            }
            Ok(())
        })?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Give model `id` the name `new` in one transaction. The caller has
    /// checked the name; the catalog's UNIQUE constraint still refuses a
    /// name another connection took meanwhile.
    pub fn rename_model(&self, id: i64, new: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        self.sql(|c| {
            c.execute(
                "UPDATE models SET name = ?2 WHERE id = ?1",
                rusqlite::params![id, new],
            )
        })?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Read models, entries and the contents they use in one read transaction.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        let models = self.models()?;
        let entries = self.sql(|c| {
            let mut st = c.prepare("SELECT model, path, kind, content, mode FROM entries")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    EntryInfo {
                        path: r.get(1)?,
                        is_dir: r.get::<_, i64>(2)? == KIND_DIR,
                        content: r.get(3)?,
                        mode: r.get::<_, i64>(4)? as u32,
                    },
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let contents = self
            .all_contents()?
            .into_iter()
            .map(|c| (c.id, c))
            .collect();
        tx.finish().map_err(|e| self.err(e))?;
        Ok(Snapshot {
            models,
            entries,
            contents,
        })
    }
}

#[cfg(test)]
mod ddl_doc_test {
    //! docs/store-format.md §5.2 must be the DDL a new catalog is created with.

    use super::SCHEMA;

    /// The body of the fenced `sql` block right after `<!-- catalog-ddl -->`.
    fn documented_ddl(doc: &str) -> String {
        let (_, after) = doc
            .split_once("<!-- catalog-ddl -->\n")
            .expect("docs/store-format.md has a <!-- catalog-ddl --> marker");
        let body = after
            .strip_prefix("```sql\n")
            .expect("a ```sql block right after the marker");
        let (ddl, _) = body.split_once("\n```").expect("the sql block is closed");
        ddl.to_string()
    }

    /// Lines with trailing whitespace removed, and no trailing blank lines.
    fn normalised(text: &str) -> String {
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        lines.join("\n").trim_end().to_string()
    }

    #[test]
    fn store_format_md_has_the_exact_ddl() {
        let doc = include_str!("../../docs/store-format.md");
        assert_eq!(normalised(&documented_ddl(doc)), normalised(SCHEMA.trim()));
    }
}

#[cfg(test)]
mod hf_columns_test {
    //! A catalog made before `models.hf_revision`/`hf_commit` keeps working.

    use super::Catalog;

    #[test]
    fn an_older_catalog_gets_the_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let cat = Catalog::open(&path, true).unwrap();
            cat.conn
                .execute_batch(
                    "ALTER TABLE models DROP COLUMN hf_revision;
                     ALTER TABLE models DROP COLUMN hf_commit;
                     INSERT INTO models(name, imported_at, source, file_count, logical_bytes)
                     VALUES ('old', 1, '/src', 0, 0);",
                )
                .unwrap();
        }
        let cat = Catalog::open(&path, false).unwrap();
        assert!(cat.hf_columns);
        let m = cat.model("old").unwrap().unwrap();
        assert_eq!((m.revision, m.commit), (None, None));
        // A second open finds them and adds nothing.
        assert!(Catalog::open(&path, false).unwrap().hf_columns);
    }
}
