//! `modelfs exec -- COMMAND`: run a program with tensor sharing switched on.
//!
//! Sharing lives in the reading process (the kernel keeps page cache per
//! file, so only the reader can map the store's objects instead of the
//! mount's files). Two pieces do it, and this command switches on both:
//! `libmodelfs_preload.so` in `LD_PRELOAD` for every program that maps
//! files with libc `mmap`, and `MODELFS_SHARE=1`, which the `modelfs`
//! Python package's `.pth` line reads to install its loader hook. The
//! environment it sets is all there is to it: docs/operations.md lists it
//! for systemd units and containers that cannot use this wrapper.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};

/// File name of the preload library, as cargo builds it.
pub const PRELOAD_NAME: &str = "libmodelfs_preload.so";
/// Where `modelfs install` puts it below the prefix.
pub const PRELOAD_LIB_DIR: &str = "lib/modelfs";

/// Where to look for the preload library, in order: `$MODELFS_PRELOAD`,
/// next to this binary (a cargo build), `../lib/modelfs/` from it (an
/// install), and the default install prefix.
fn candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("MODELFS_PRELOAD").filter(|p| !p.is_empty()) {
        // An explicit choice is the only candidate: falling back to another
        // copy would hide a typo.
        return vec![PathBuf::from(p)];
    }
    if let Some(dir) = exe.and_then(Path::parent) {
        out.push(dir.join(PRELOAD_NAME));
        if let Some(prefix) = dir.parent() {
            out.push(prefix.join(PRELOAD_LIB_DIR).join(PRELOAD_NAME));
        }
    }
    out.push(
        Path::new("/usr/local")
            .join(PRELOAD_LIB_DIR)
            .join(PRELOAD_NAME),
    );
    out
}

/// The preload library to use, or an error naming every place looked at.
pub fn find_preload() -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let tried = candidates(exe.as_deref());
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        // The dynamic loader resolves relative LD_PRELOAD entries against
        // each program's working directory: always hand it an absolute path.
        return Ok(std::path::absolute(found)?);
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "{PRELOAD_NAME} not found (looked at {}); build it with `cargo build --workspace`, \
install it with `modelfs install`, or point MODELFS_PRELOAD at it",
        list.join(", ")
    )
}

/// `LD_PRELOAD` with `lib` first and whatever the caller had kept after it
/// (the loader accepts spaces or colons as separators), without a second
/// copy of `lib`.
pub fn ld_preload_value(lib: &Path, existing: Option<&OsString>) -> OsString {
    let mut value = OsString::from(lib);
    if let Some(existing) = existing {
        let rest: Vec<&str> = existing
            .to_str()
            .unwrap_or("")
            .split([' ', ':'])
            .filter(|e| !e.is_empty() && Path::new(e) != lib)
            .collect();
        if !rest.is_empty() {
            value.push(":");
            value.push(rest.join(":"));
        }
    }
    value
}

/// Replace this process with `command`, sharing switched on. Returns only
/// if the program could not be started (exit code 127 or 126).
pub fn exec(command: &[OsString], print_env: bool) -> Result<ExitCode> {
    let lib = find_preload()?;
    let preload = ld_preload_value(&lib, std::env::var_os("LD_PRELOAD").as_ref());
    if print_env {
        println!("LD_PRELOAD={}", preload.to_string_lossy());
        println!("MODELFS_SHARE=1");
        return Ok(ExitCode::SUCCESS);
    }
    let Some((program, args)) = command.split_first() else {
        bail!("no command given: modelfs exec -- COMMAND [ARGS...]");
    };
    let err = std::process::Command::new(program)
        .args(args)
        .env("LD_PRELOAD", preload)
        .env("MODELFS_SHARE", "1")
        .exec();
    // The shell's codes, as env(1) and exec wrappers use them: 127 for a
    // program that is not there, 126 for one that cannot be run.
    eprintln!(
        "modelfs: error: cannot run {}: {err}",
        Path::new(program).display()
    );
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_goes_first_and_is_not_repeated() {
        let lib = Path::new("/opt/m/libmodelfs_preload.so");
        assert_eq!(ld_preload_value(lib, None), OsString::from(lib));
        let existing = OsString::from("/usr/lib/libjemalloc.so /opt/m/libmodelfs_preload.so");
        assert_eq!(
            ld_preload_value(lib, Some(&existing)),
            OsString::from("/opt/m/libmodelfs_preload.so:/usr/lib/libjemalloc.so")
        );
        assert_eq!(
            ld_preload_value(lib, Some(&OsString::from(""))),
            OsString::from(lib)
        );
    }

    #[test]
    fn looks_next_to_the_binary_then_in_the_install_prefix() {
        if std::env::var_os("MODELFS_PRELOAD").is_some() {
            return;
        }
        let c = candidates(Some(Path::new("/opt/x/bin/modelfs")));
        assert_eq!(c[0], Path::new("/opt/x/bin/libmodelfs_preload.so"));
        assert_eq!(c[1], Path::new("/opt/x/lib/modelfs/libmodelfs_preload.so"));
    }
}
