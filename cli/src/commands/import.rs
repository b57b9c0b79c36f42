//! `modelfs import`: bring a model directory, a file or a Hugging Face cache
//! snapshot into the store, with a progress bar on a terminal.
//!
//! Why its own module: the import is the one long-running store command, and
//! its progress reporting (bar, warnings, lock waits) is part of it.

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use modelfs_store::{
    default_model_name, hf_hub_repos, ImportOptions, ImportProgress, ImportSummary, Store,
};

use crate::output;

/// The import's switches, as given on the command line.
pub struct Flags {
    /// Replace a model of the same name.
    pub replace: bool,
    /// Follow symlinks out of the imported tree.
    pub follow_symlinks: bool,
    /// Store model files that do not parse instead of refusing them.
    pub allow_malformed: bool,
    /// Hugging Face cache revision to import instead of `main`.
    pub revision: Option<String>,
}

/// Import every path, each as its own model named from its path (or `name`,
/// with one path); a hub root stands for each model repo in it.
///
/// One path that is not a hub root behaves as a single import always did:
/// its error is the command's, `--json` prints one object. Otherwise each
/// model is imported on its own (atomic per model, as one import is), the
/// rest are still tried after a failure, `--json` prints a list, and the
/// command fails at the end naming every path that did not import.
pub fn import(
    dir: &Path,
    paths: &[PathBuf],
    name: Option<String>,
    flags: Flags,
    json: bool,
) -> Result<()> {
    if name.is_some() && paths.len() > 1 {
        bail!(
            "--name names one model, but {} paths were given; drop --name to name each model from its path",
            paths.len()
        );
    }
    let mut jobs = Vec::new();
    let mut failed: Vec<(PathBuf, anyhow::Error)> = Vec::new();
    let mut several = paths.len() > 1;
    for path in paths {
        if !path.exists() && path.symlink_metadata().is_err() {
            if paths.len() == 1 {
                bail!("{}: no such file or directory", path.display());
            }
            failed.push((
                path.clone(),
                anyhow!("{}: no such file or directory", path.display()),
            ));
            continue;
        }
        match hf_hub_repos(path).with_context(|| format!("reading {}", path.display()))? {
            Some((repos, skipped)) => {
                several = true;
                if name.is_some() {
                    bail!(
                        "{}: a Hugging Face hub root holds one model per repo; --name cannot name them all",
                        path.display()
                    );
                }
                for s in &skipped {
                    eprintln!(
                        "modelfs: note: skipping {}: only model repos (models--ORG--NAME) are imported",
                        s.display()
                    );
                }
                if repos.is_empty() {
                    failed.push((
                        path.clone(),
                        anyhow!(
                            "{}: a hub root without models--ORG--NAME repos",
                            path.display()
                        ),
                    ));
                }
                jobs.extend(repos);
            }
            None => jobs.push(path.clone()),
        }
    }
    let (mut store, created) =
        Store::create_or_open(dir).with_context(|| format!("opening store {}", dir.display()))?;
    if created {
        // On stderr: --json output stays one document. A mistyped --store,
        // or a store other than the mounted one (sudo drops MODELFS_STORE),
        // shows here at once.
        eprintln!("modelfs: created a new store at {}", store.root().display());
    }
    if !several {
        let summary = import_one(&mut store, &jobs[0], name, &flags)?;
        return output::import(&summary, json);
    }
    let mut done = Vec::new();
    for path in &jobs {
        match import_one(&mut store, path, None, &flags) {
            Ok(summary) => {
                if !json {
                    output::import(&summary, false)?;
                }
                done.push(serde_json::to_value(&summary)?);
            }
            Err(e) => {
                eprintln!("modelfs: error: {e:#}");
                failed.push((path.clone(), e));
            }
        }
    }
    if json {
        for (path, e) in &failed {
            done.push(serde_json::json!({
                "path": path.display().to_string(),
                "error": format!("{e:#}"),
            }));
        }
        output::json(&done)?;
    }
    if !failed.is_empty() {
        let names: Vec<String> = failed
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        bail!(
            "{} of {} imports failed ({}); the others are imported",
            failed.len(),
            jobs.len() + failed.iter().filter(|(p, _)| !jobs.contains(p)).count(),
            names.join(", ")
        );
    }
    Ok(())
}

/// Import one path as one model, with a progress bar.
fn import_one(
    store: &mut Store,
    path: &Path,
    name: Option<String>,
    flags: &Flags,
) -> Result<ImportSummary> {
    let name = match name {
        Some(n) => n,
        None => default_model_name(path).with_context(|| {
            format!(
                "{}: cannot derive a model name from this path; pass --name",
                path.display()
            )
        })?,
    };
    let progress = BarProgress::new();
    let summary = store
        .import(
            path,
            &ImportOptions {
                name,
                replace: flags.replace,
                follow_symlinks: flags.follow_symlinks,
                allow_malformed: flags.allow_malformed,
                revision: flags.revision.clone(),
            },
            &progress,
        )
        .with_context(|| format!("importing {}", path.display()));
    progress.finish();
    summary
}

/// A progress bar on stderr when it is a terminal; warnings always go to stderr.
struct BarProgress {
    bar: Option<ProgressBar>,
}

impl BarProgress {
    fn new() -> BarProgress {
        let bar = io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("valid template"),
            );
            b
        });
        BarProgress { bar }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl ImportProgress for BarProgress {
    fn begin(&self, _files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_length(bytes);
        }
    }
    fn file(&self, path: &str) {
        if let Some(b) = &self.bar {
            b.set_message(path.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn warn(&self, message: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("modelfs: warning: {message}")),
            None => eprintln!("modelfs: warning: {message}"),
        }
    }
    fn waiting_for_lock(&self) {
        eprintln!("modelfs: another import, rm or gc is running on this store; waiting for it");
    }
}
