//! `du`: what the models cost and what deduplication saves.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;

use crate::error::Result;
use crate::ids::{ChunkHash, ContentId, ObjectId};
use crate::{Store, CATALOG_FILE, OBJECTS_DIR};

/// One model's share of the store, as [`Usage::models`] lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelUsage {
    /// Name of the model.
    pub name: String,
    /// Number of files in the model (directories not counted).
    pub files: u64,
    /// Sum of the sizes of the model's files.
    pub logical_bytes: u64,
    /// Bytes of chunks no other model references (freed by removing this model).
    pub unique_bytes: u64,
    /// Bytes of chunks this model shares with at least one other model.
    pub shared_bytes: u64,
}

/// Bytes every pair of models shares ([`Store::sharing_matrix`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SharingMatrix {
    /// Model names, ordered by name; the matrix's rows and columns.
    pub models: Vec<String>,
    /// `shared_bytes[i][j]`: bytes of distinct chunks models i and j both
    /// reference; `shared_bytes[i][i]`: model i's distinct chunk bytes.
    pub shared_bytes: Vec<Vec<u64>>,
}

/// One model's usage and the models it shares bytes with (`du MODEL`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSharing {
    /// The model's files, logical, unique and shared bytes.
    #[serde(flatten)]
    pub usage: ModelUsage,
    /// Every other model it shares chunks with, most shared bytes first.
    pub shares_with: Vec<SharedWith>,
}

/// Bytes a model shares with one other model ([`ModelSharing::shares_with`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SharedWith {
    /// Name of the other model.
    pub name: String,
    /// Bytes of distinct chunks both models reference.
    pub shared_bytes: u64,
}

/// Disk use of the whole store and what deduplication saves (`du`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    /// Sum of all models' file sizes: what plain copies would occupy.
    pub logical_bytes: u64,
    /// Disk space allocated to the object files the catalog references.
    pub stored_bytes: u64,
    /// Sum of distinct referenced chunk sizes (stored bytes before block rounding and garbage).
    pub chunk_bytes: u64,
    /// Size of the catalog database and its write-ahead log.
    pub metadata_bytes: u64,
    /// Disk space of object files nothing references (reclaimed by `gc`).
    pub unreferenced_bytes: u64,
    /// logical_bytes / stored_bytes.
    pub dedup_ratio: f64,
    /// Per model, ordered by name.
    pub models: Vec<ModelUsage>,
}

impl Store {
    /// Measure the store: every model's logical, unique and shared bytes,
    /// and the disk space of objects and catalog.
    pub fn usage(&self) -> Result<Usage> {
        let models = self.models()?;
        let chunk_models = self.chunk_users()?;
        let mut unique: HashMap<i64, u64> = HashMap::new();
        let mut shared: HashMap<i64, u64> = HashMap::new();
        let mut chunk_bytes = 0u64;
        for (len, users) in chunk_models.values() {
            chunk_bytes += u64::from(*len);
            let target = if users.len() == 1 {
                &mut unique
            } else {
                &mut shared
            };
            for m in users {
                *target.entry(*m).or_default() += u64::from(*len);
            }
        }

        let known: HashSet<ObjectId> = self
            .catalog()
            .objects()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let (mut stored, mut unreferenced) = (0u64, 0u64);
        for (id, allocated) in self.object_files()? {
            if known.contains(&id) {
                stored += allocated;
            } else {
                unreferenced += allocated;
            }
        }
        let metadata: u64 = [CATALOG_FILE.to_string(), format!("{CATALOG_FILE}-wal")]
            .iter()
            .filter_map(|f| std::fs::metadata(self.root().join(f)).ok())
            .map(|m| m.len())
            .sum();
        let logical: u64 = models.iter().map(|m| m.logical_bytes).sum();
        Ok(Usage {
            logical_bytes: logical,
            stored_bytes: stored,
            chunk_bytes,
            metadata_bytes: metadata,
            unreferenced_bytes: unreferenced,
            dedup_ratio: if stored == 0 {
                1.0
            } else {
                logical as f64 / stored as f64
            },
            models: models
                .iter()
                .map(|m| ModelUsage {
                    name: m.name.clone(),
                    files: m.files,
                    logical_bytes: m.logical_bytes,
                    unique_bytes: unique.get(&m.id).copied().unwrap_or(0),
                    shared_bytes: shared.get(&m.id).copied().unwrap_or(0),
                })
                .collect(),
        })
    }

    /// For each distinct chunk a model references: its length and the
    /// models (by id) that reference it.
    fn chunk_users(&self) -> Result<HashMap<ChunkHash, (u32, HashSet<i64>)>> {
        let mut users_of_content: HashMap<ContentId, HashSet<i64>> = HashMap::new();
        for (model, content) in self.catalog().file_references()? {
            users_of_content.entry(content).or_default().insert(model);
        }
        let mut chunk_models: HashMap<ChunkHash, (u32, HashSet<i64>)> = HashMap::new();
        for c in self.catalog().all_contents()? {
            let Some(users) = users_of_content.get(&c.id) else {
                continue;
            };
            for s in &c.segments {
                let e = chunk_models
                    .entry(s.hash)
                    .or_insert_with(|| (s.len, HashSet::new()));
                e.1.extend(users.iter().copied());
            }
        }
        Ok(chunk_models)
    }

    /// For every pair of models, the bytes of distinct chunks both reference
    /// (`du --matrix`): which models belong together, and would share memory
    /// on one node. The diagonal is each model's distinct chunk bytes.
    pub fn sharing_matrix(&self) -> Result<SharingMatrix> {
        let models = self.models()?;
        let index: HashMap<i64, usize> =
            models.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
        // Chunks grouped by the set of models using them: few distinct sets,
        // however many chunks, so the pairs are added per set.
        let mut by_users: HashMap<Vec<usize>, u64> = HashMap::new();
        for (len, users) in self.chunk_users()?.into_values() {
            let mut set: Vec<usize> = users.iter().filter_map(|u| index.get(u).copied()).collect();
            set.sort_unstable();
            *by_users.entry(set).or_default() += u64::from(len);
        }
        let n = models.len();
        let mut shared_bytes = vec![vec![0u64; n]; n];
        for (set, bytes) in by_users {
            for &a in &set {
                for &b in &set {
                    shared_bytes[a][b] += bytes;
                }
            }
        }
        Ok(SharingMatrix {
            models: models.into_iter().map(|m| m.name).collect(),
            shared_bytes,
        })
    }

    /// One model's usage and the bytes it shares with each other model
    /// (`du MODEL`), from the same counts as [`Store::usage`] and
    /// [`Store::sharing_matrix`].
    pub fn model_sharing(&self, name: &str) -> Result<ModelSharing> {
        let usage = self
            .usage()?
            .models
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| crate::Error::NoSuchModel(name.to_string()))?;
        let matrix = self.sharing_matrix()?;
        let mut shares_with: Vec<SharedWith> = match matrix.models.iter().position(|m| m == name) {
            Some(i) => matrix
                .models
                .iter()
                .zip(&matrix.shared_bytes[i])
                .enumerate()
                .filter(|&(j, (_, &bytes))| j != i && bytes > 0)
                .map(|(_, (other, &bytes))| SharedWith {
                    name: other.clone(),
                    shared_bytes: bytes,
                })
                .collect(),
            None => Vec::new(),
        };
        shares_with.sort_by(|a, b| {
            b.shared_bytes
                .cmp(&a.shared_bytes)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(ModelSharing { usage, shares_with })
    }

    /// (object id, allocated bytes) of every object file on disk, referenced or not.
    pub(crate) fn object_files(&self) -> Result<Vec<(ObjectId, u64)>> {
        use crate::error::IoContext;
        let objects = self.root().join(OBJECTS_DIR);
        let mut out = Vec::new();
        for fan in std::fs::read_dir(&objects).at(&objects)? {
            let fan = fan.at(&objects)?.path();
            if !fan.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&fan).at(&fan)? {
                let f = f.at(&fan)?;
                let Some(id) = f
                    .file_name()
                    .to_str()
                    .filter(|n| n.len() == 16)
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                    .map(ObjectId)
                else {
                    continue;
                };
                let meta = f.metadata().at(f.path())?;
                out.push((id, meta.blocks() * 512));
            }
        }
        Ok(out)
    }
}
