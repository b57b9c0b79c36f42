//! `mount.fuse.modelfs`: the helper mount(8) runs for `-t fuse.modelfs` and
//! for fstab lines of that type, as `mount.fuse.modelfs SOURCE MOUNTPOINT
//! [-o OPTIONS] [-n] [-s] [-f] [-v]`. SOURCE is the store directory.
//!
//! Why this crate exists: mount(8), fstab and systemd speak their own
//! dialect (comma-separated `-o` options, generic options every filesystem
//! must accept, a helper found by file name). This crate is that dialect and
//! nothing else: it translates a helper command line into the `modelfs mount`
//! arguments that mean the same, and it carries the systemd units and the
//! example configuration that ship with the helper. The `modelfs` binary
//! (cli/) runs as the helper when invoked as `mount.fuse.modelfs` and parses
//! what [`translate`] returns like any other command line, so the helper can
//! never accept an option the CLI would not.

use std::ffi::OsString;

/// The service unit that mounts the store at boot (`modelfs install` puts it in place).
pub const SERVICE_UNIT: &str = include_str!("../systemd/modelfs.service");
/// The `.mount` unit alternative to the service.
pub const MOUNT_UNIT: &str = include_str!("../systemd/models.mount");
/// The example `/etc/modelfs/config.toml`.
pub const EXAMPLE_CONFIG: &str = include_str!("../systemd/config.toml");

/// What `mount.fuse.modelfs -h` prints.
pub const USAGE: &str = "usage: mount.fuse.modelfs STORE MOUNTPOINT [-o OPTIONS] [-f]\n  options: allow_other, pin_budget=SIZE, prefetch_window=SIZE, passthrough=auto|off, threads=N, read_ahead_kb=N, shutdown_grace=SECONDS, metrics=ADDR, log_file=PATH, config=FILE (generic mount options such as defaults, ro, noauto, nofail, _netdev, x-systemd.* are accepted and ignored)";

/// Why a helper command line cannot be translated.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// `-h`/`--help`: not an error for the user, but nothing to mount.
    #[error("{USAGE}")]
    Help,
    /// Anything else, said in one line that names the argument.
    #[error("{0}")]
    Usage(String),
}

fn usage(msg: impl Into<String>) -> HelperError {
    HelperError::Usage(msg.into())
}

/// Mount options that are about the generic mount, not about modelfs, and
/// that a read-only FUSE filesystem can ignore.
fn ignored(opt: &str) -> bool {
    matches!(
        opt,
        "ro" | "rw"
            | "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "_netdev"
            | "user"
            | "users"
            | "nouser"
            | "owner"
            | "group"
            | "exec"
            | "noexec"
            | "suid"
            | "nosuid"
            | "dev"
            | "nodev"
            | "atime"
            | "noatime"
            | "relatime"
            | "strictatime"
            | "nodiratime"
            | "sync"
            | "async"
            | "default_permissions"
            | "nosymfollow"
            | "silent"
            | "loud"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
        || opt.starts_with("fsname=")
        || opt.starts_with("subtype=")
}

/// Translate the helper's arguments (without argv\[0\]) into the `modelfs`
/// arguments (again without argv\[0\]) that mean the same:
/// `--store STORE [--config FILE] mount MOUNTPOINT [--daemon] [--flag=value...]`.
pub fn translate(args: Vec<OsString>) -> Result<Vec<OsString>, HelperError> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut foreground = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a
            .into_string()
            .map_err(|a| usage(format!("arguments must be UTF-8 (got {a:?})")))?;
        match s.as_str() {
            "-o" => options.push(
                it.next()
                    .ok_or_else(|| usage("-o needs an argument"))?
                    .to_string_lossy()
                    .into_owned(),
            ),
            "-f" => foreground = true,
            "-n" | "-s" | "-v" => {}
            "-h" | "--help" => return Err(HelperError::Help),
            o if o.starts_with("-o") && o.len() > 2 => options.push(o[2..].to_string()),
            o if o.starts_with('-') => return Err(usage(format!("unknown flag {o}"))),
            _ => positional.push(s),
        }
    }
    let [store, mountpoint] = <[String; 2]>::try_from(positional)
        .map_err(|p| usage(format!("expected STORE MOUNTPOINT, got {p:?}")))?;
    let mut global: Vec<String> = vec!["--store".into(), store];
    let mut mount: Vec<String> = vec!["mount".into(), mountpoint];
    if !foreground {
        mount.push("--daemon".into());
    }
    for opt in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        if ignored(opt) {
            continue;
        }
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let flag = match key {
            "allow_other" => {
                if value.is_some() {
                    return Err(usage(format!(
                        "mount option allow_other takes no value (got {opt:?})"
                    )));
                }
                mount.push("--allow-other".into());
                continue;
            }
            "config" => {
                global.push("--config".into());
                global.push(value.ok_or_else(|| usage("config= needs a file"))?.into());
                continue;
            }
            "pin_budget" | "prefetch_window" | "passthrough" | "threads" | "read_ahead_kb"
            | "shutdown_grace" | "metrics" | "log_file" => format!("--{}", key.replace('_', "-")),
            _ => {
                return Err(usage(format!(
                    "unknown mount option {opt:?} (see mount.fuse.modelfs -h)"
                )))
            }
        };
        let value =
            value.ok_or_else(|| usage(format!("mount option {key} needs a value ({key}=...)")))?;
        // One argument `--flag=value`, so a value like "-1" is not taken for a flag.
        mount.push(format!("{flag}={value}"));
    }
    Ok(global
        .into_iter()
        .chain(mount)
        .map(OsString::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn fstab_options_map_to_flags() {
        let args = translate(os(&[
            "/var/lib/modelfs",
            "/models",
            "-o",
            "rw,defaults,allow_other,_netdev,x-systemd.requires=network.target,pin_budget=2GiB,passthrough=off",
        ]))
        .unwrap();
        assert_eq!(
            args,
            os(&[
                "--store",
                "/var/lib/modelfs",
                "mount",
                "/models",
                "--daemon",
                "--allow-other",
                "--pin-budget=2GiB",
                "--passthrough=off"
            ])
        );
    }

    #[test]
    fn foreground_and_config() {
        let args = translate(os(&["/s", "/m", "-f", "-oconfig=/etc/x.toml,threads=2"])).unwrap();
        assert_eq!(
            args,
            os(&[
                "--store",
                "/s",
                "--config",
                "/etc/x.toml",
                "mount",
                "/m",
                "--threads=2"
            ])
        );
    }

    #[test]
    fn unknown_options_are_named() {
        let e = translate(os(&["/s", "/m", "-o", "pin_budgte=1G"])).unwrap_err();
        assert!(e.to_string().contains("pin_budgte"), "{e}");
        assert!(translate(os(&["/s"])).is_err());
        assert!(matches!(translate(os(&["-h"])), Err(HelperError::Help)));
        let e = translate(os(&["/s", "/m", "-o", "threads"])).unwrap_err();
        assert!(e.to_string().contains("threads=..."), "{e}");
    }
}
