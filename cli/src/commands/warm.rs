//! `modelfs warm`: pull a model's files into memory ahead of a loader.
//!
//! Why its own module: warming reads through the mount (so the daemon's
//! pinning policy sees the reads), in the file's recorded load order when the
//! store has a load trace for it, and falls back to reading the store's
//! objects when nothing is mounted.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use modelfs_store::Store;

use crate::output;

/// `modelfs warm`: read a model's files through the mount (the daemon pins
/// what its policy admits), or, with no mount, straight from the store objects
/// (page cache only: nothing to pin them).
pub fn warm(
    store: &Path,
    name: &str,
    only: &[String],
    mountpoint: Option<PathBuf>,
    as_json: bool,
) -> Result<()> {
    use std::io::Read;
    let store = Store::open(store)?;
    let files = store.files(name)?;
    let wanted: Vec<_> = files
        .iter()
        .filter(|f| only.is_empty() || only.iter().any(|p| p == &f.path))
        .collect();
    for p in only {
        if !files.iter().any(|f| &f.path == p) {
            bail!("model {name:?} has no file {p:?}");
        }
    }
    let mounted =
        mountpoint.filter(|m| modelfs_fs::mount_entry(m).is_some_and(|(_, t)| t == "fuse.modelfs"));
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    let mut traced = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    for f in &wanted {
        match &mounted {
            Some(m) => {
                let path = m.join(name).join(&f.path);
                let mut file =
                    std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
                // The recorded load order first, so what a loader reads
                // first is in memory first; then whatever the trace missed.
                if let Some(trace) = store.load_trace(&f.hash, f.size) {
                    traced += 1;
                    bytes += read_in_trace_order(&file, &trace, &mut buf)
                        .with_context(|| format!("{}", path.display()))?;
                    continue;
                }
                loop {
                    let n = file
                        .read(&mut buf)
                        .with_context(|| format!("{}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
            }
            None => {
                let reader = store.open_file(f.content_id)?;
                bytes += reader
                    .copy_to(&mut io::sink())
                    .with_context(|| format!("{name}/{}", f.path))?;
            }
        }
    }
    let warmed = output::Warmed {
        model: name,
        files: wanted.len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        mountpoint: mounted.as_deref(),
        files_in_trace_order: traced,
    };
    output::warm(&warmed, as_json)
}

/// Read the trace's ranges in order, then the bytes it does not cover.
fn read_in_trace_order(
    file: &std::fs::File,
    trace: &modelfs_store::LoadTrace,
    buf: &mut [u8],
) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let read_range = |offset: u64, len: u64, buf: &mut [u8]| -> io::Result<()> {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            at += n as u64;
        }
        Ok(())
    };
    for &(offset, len) in &trace.ranges {
        read_range(offset, len, buf)?;
    }
    let mut sorted = trace.ranges.clone();
    sorted.sort_unstable();
    let mut pos = 0;
    for (offset, len) in sorted.into_iter().chain([(trace.file_size, 0)]) {
        if offset > pos {
            read_range(pos, offset - pos, buf)?;
        }
        pos = pos.max(offset + len);
    }
    Ok(trace.file_size)
}
