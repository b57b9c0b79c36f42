//! `verify`: re-read and re-hash everything, and say which files are damaged.

use std::collections::{BTreeSet, HashSet};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::Store;

/// A damaged file of a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    /// Name of the model.
    pub model: String,
    /// Path of the file inside the model.
    pub path: String,
    /// The error reading it back gave (which chunk, which object).
    pub reason: String,
}

/// What one [`Store::verify`] checked and what it found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Models whose files were checked.
    pub models_checked: u64,
    /// Files of those models, counting each file of a shared content.
    pub files_checked: u64,
    /// Distinct contents read: each once, however many files share it.
    pub contents_checked: u64,
    /// Bytes read and hashed: the sizes of the distinct contents.
    pub bytes_checked: u64,
    /// Problems of the catalog database itself (SQLite integrity check).
    pub catalog_problems: Vec<String>,
    /// Every file of a checked model whose content failed, ordered by model
    /// then path; all files sharing a damaged content are listed.
    pub damaged: Vec<Damage>,
}

impl VerifyReport {
    /// Whether nothing was found wrong: no damaged file and no catalog problem.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.catalog_problems.is_empty()
    }
}

impl Store {
    /// Check every file of `model` (or of every model): each chunk against
    /// its hash and each file against its content key. Each distinct
    /// content is read once, however many files share it.
    pub fn verify(&self, model: Option<&str>) -> Result<VerifyReport> {
        let models = match model {
            Some(name) => vec![self
                .catalog()
                .model(name)?
                .ok_or_else(|| Error::NoSuchModel(name.to_string()))?],
            None => self.models()?,
        };
        let catalog_problems: Vec<String> = self.catalog().sql(|c| {
            let mut st = c.prepare("PRAGMA quick_check")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })?;
        let catalog_problems = catalog_problems.into_iter().filter(|p| p != "ok").collect();

        let mut contents = BTreeSet::new();
        let mut files = 0u64;
        for m in &models {
            for e in self.catalog().entries(m.id)? {
                if let Some(c) = e.content {
                    contents.insert(c);
                    files += 1;
                }
            }
        }
        let infos = contents
            .iter()
            .map(|&id| self.catalog().content(id))
            .collect::<Result<Vec<_>>>()?;
        let bytes: u64 = infos.iter().map(|c| c.size).sum();
        let root = self.root().to_path_buf();
        // One reader per content; readers need their own Store handle since a
        // SQLite connection is not shared across threads.
        let failures: Vec<(crate::ContentId, String)> = infos
            .into_par_iter()
            .filter_map(|c| {
                let id = c.id;
                let store = match Store::open(&root) {
                    Ok(s) => s,
                    Err(e) => return Some((id, e.to_string())),
                };
                let res = store.read_content(c).and_then(|r| r.verify());
                res.err().map(|e| (id, e.to_string()))
            })
            .collect();

        let wanted: HashSet<&str> = models.iter().map(|m| m.name.as_str()).collect();
        let mut damaged = Vec::new();
        for (content, reason) in failures {
            for (model, path) in self.catalog().users_of_content(content)? {
                if wanted.contains(model.as_str()) {
                    damaged.push(Damage {
                        model,
                        path,
                        reason: reason.clone(),
                    });
                }
            }
        }
        damaged.sort_by(|a, b| (&a.model, &a.path).cmp(&(&b.model, &b.path)));
        Ok(VerifyReport {
            models_checked: models.len() as u64,
            files_checked: files,
            contents_checked: contents.len() as u64,
            bytes_checked: bytes,
            catalog_problems,
            damaged,
        })
    }
}
