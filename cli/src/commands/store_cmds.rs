//! The commands that work on the store alone, mounted or not: `init`, `ls`,
//! `du`, `rm`, `gc`, `verify`, `cat` and `upgrade`.
//!
//! Why together: each is a call or two into the store crate followed by its
//! rendering; none needs the mount, the daemon or the configuration beyond
//! the store directory.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use modelfs_store::{RemoveOptions, Store};

use crate::output;

/// `modelfs init`: create an empty store.
pub fn init(dir: &Path) -> Result<()> {
    let (store, created) =
        Store::create_or_open(dir).with_context(|| format!("creating store {}", dir.display()))?;
    output::store_ready(store.root(), created);
    Ok(())
}

/// `modelfs ls [MODEL]`: the models, or one model's files.
pub fn ls(dir: &Path, name: Option<&str>, json: bool) -> Result<()> {
    let store = Store::open(dir)?;
    match name {
        None => output::models(&store.models()?, json),
        Some(n) => output::files(&store.files(n)?, json),
    }
}

/// `modelfs du`: logical vs stored bytes, per model.
pub fn du(dir: &Path, name: Option<&str>, matrix: bool, json: bool) -> Result<()> {
    let store = Store::open(dir)?;
    if let Some(name) = name {
        return output::model_sharing(&store.model_sharing(name)?, json);
    }
    if matrix {
        return output::sharing_matrix(&store.sharing_matrix()?, json);
    }
    output::usage(&store.usage()?, json)
}

/// `modelfs rm`: remove models (or namespaces, with `recursive`), all or
/// none; with `dry_run` only say which.
pub fn rm(dir: &Path, names: &[String], recursive: bool, dry_run: bool, json: bool) -> Result<()> {
    let mut store = Store::open(dir)?;
    let removed = store.remove_models(names, RemoveOptions { recursive, dry_run })?;
    output::removed(&removed, dry_run, json)
}

/// `modelfs mv`: rename a model in the catalog.
pub fn mv(dir: &Path, old: &str, new: &str, json: bool) -> Result<()> {
    let mut store = Store::open(dir)?;
    let model = store.rename_model(old, new)?;
    output::renamed(old, &model, json)
}

/// `modelfs gc`: reclaim what no model references.
pub fn gc(dir: &Path, json: bool) -> Result<()> {
    let mut store = Store::open(dir)?;
    output::gc(&store.gc()?, json)
}

/// `modelfs verify`: exit 1 if anything is damaged.
pub fn verify(dir: &Path, name: Option<&str>, json: bool) -> Result<ExitCode> {
    let store = Store::open(dir)?;
    let r = store.verify(name)?;
    output::verify(&r, json)?;
    Ok(if r.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `modelfs upgrade`: convert an older store in place.
pub fn upgrade(dir: &Path, json: bool) -> Result<()> {
    let r = Store::upgrade(dir, || {
        eprintln!("waiting for another import, rm or gc to finish...")
    })?;
    output::upgrade(dir, &r, json)
}

/// `modelfs cat MODEL/PATH`: the file's bytes on stdout, each chunk checked.
/// A reader that goes away early (`| head`) is not an error.
pub fn cat(dir: &Path, file: &str) -> Result<()> {
    let store = Store::open(dir)?;
    let (model, info) = store.resolve(file)?;
    let reader = store.open_file(info.content_id)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    reader.copy_to(&mut out).map_err(|e| match e {
        modelfs_store::Error::Io { cause, .. } if cause.kind() == io::ErrorKind::BrokenPipe => {
            anyhow::Error::new(cause)
        }
        e => anyhow::Error::new(e).context(format!("{}/{}", model.name, info.path)),
    })?;
    out.flush()?;
    Ok(())
}
