//! `modelfs import`: bring a model directory, a file or a Hugging Face cache
//! snapshot into the store, with a progress bar on a terminal.
//!
//! Why its own module: the import is the one long-running store command, and
//! its progress reporting (bar, warnings, lock waits) is part of it.

use std::io::{self, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use modelfs_store::{default_model_name, ImportOptions, ImportProgress, Store};

use crate::output;

/// The import's switches, as given on the command line.
pub struct Flags {
    /// Replace a model of the same name.
    pub replace: bool,
    /// Follow symlinks out of the imported tree.
    pub follow_symlinks: bool,
    /// Store model files that do not parse instead of refusing them.
    pub allow_malformed: bool,
}

/// Import `path` as `name` (default: derived from the path).
pub fn import(
    dir: &Path,
    path: &Path,
    name: Option<String>,
    flags: Flags,
    json: bool,
) -> Result<()> {
    if !path.exists() && path.symlink_metadata().is_err() {
        bail!("{}: no such file or directory", path.display());
    }
    let name = match name {
        Some(n) => n,
        None => default_model_name(path).with_context(|| {
            format!(
                "{}: cannot derive a model name from this path; pass --name",
                path.display()
            )
        })?,
    };
    let (mut store, created) =
        Store::create_or_open(dir).with_context(|| format!("opening store {}", dir.display()))?;
    if created {
        // On stderr: --json output stays one document. A mistyped --store,
        // or a store other than the mounted one (sudo drops MODELFS_STORE),
        // shows here at once.
        eprintln!("modelfs: created a new store at {}", store.root().display());
    }
    let progress = BarProgress::new();
    let summary = store
        .import(
            path,
            &ImportOptions {
                name,
                replace: flags.replace,
                follow_symlinks: flags.follow_symlinks,
                allow_malformed: flags.allow_malformed,
            },
            &progress,
        )
        .with_context(|| format!("importing {}", path.display()));
    progress.finish();
    output::import(&summary?, json)
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
