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
use modelfs_store::Store;

use crate::output;

/// `modelfs init`: create an empty store.
pub fn init(dir: &Path) -> Result<()> {
    Store::init(dir).with_context(|| format!("creating store {}", dir.display()))?;
    output::store_ready(dir);
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
pub fn du(dir: &Path, json: bool) -> Result<()> {
    let store = Store::open(dir)?;
    output::usage(&store.usage()?, json)
}

/// `modelfs rm`: remove models, in order; the first failure stops.
pub fn rm(dir: &Path, names: &[String]) -> Result<()> {
    let mut store = Store::open(dir)?;
    for n in names {
        output::removed(&store.remove(n)?);
    }
    Ok(())
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
