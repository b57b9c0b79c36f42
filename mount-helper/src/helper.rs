//! `mount.fuse.modelfs`: the helper mount(8) runs for `-t fuse.modelfs` and
//! for fstab lines of that type, as `mount.fuse.modelfs SOURCE MOUNTPOINT
//! [-o OPTIONS] [-n] [-s] [-f] [-v]`. SOURCE is the store directory. The
//! options map onto `modelfs mount` flags; the helper returns once the mount
//! is ready (it runs the mount as a daemon unless `-f`).

use std::ffi::OsString;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::Cli;

/// The canonical `modelfs` arguments the helper translated its own into;
/// the `--daemon` child is started with these.
static CANONICAL: OnceLock<Vec<OsString>> = OnceLock::new();

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

/// Translate the helper's arguments into a `modelfs` command line.
pub fn parse(args: Vec<OsString>) -> Result<Cli> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut foreground = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_str().context("arguments must be UTF-8")?.to_string();
        match s.as_str() {
            "-o" => options.push(it.next().context("-o needs an argument")?.to_string_lossy().into_owned()),
            "-f" => foreground = true,
            "-n" | "-s" | "-v" => {}
            "-h" | "--help" => bail!("usage: mount.fuse.modelfs STORE MOUNTPOINT [-o OPTIONS] [-f]\n  options: allow_other, pin_budget=SIZE, prefetch_window=SIZE, passthrough=auto|off, threads=N, read_ahead_kb=N, shutdown_grace=SECONDS, metrics=ADDR, log_file=PATH, config=FILE (generic mount options such as defaults, ro, noauto, nofail, _netdev, x-systemd.* are accepted and ignored)"),
            o if o.starts_with("-o") && o.len() > 2 => options.push(o[2..].to_string()),
            o if o.starts_with('-') => bail!("unknown flag {o}"),
            _ => positional.push(s),
        }
    }
    let [store, mountpoint] = <[String; 2]>::try_from(positional)
        .map_err(|p| anyhow::anyhow!("expected STORE MOUNTPOINT, got {p:?}"))?;
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
                    bail!("mount option allow_other takes no value (got {opt:?})");
                }
                mount.push("--allow-other".into());
                continue;
            }
            "config" => {
                global.push("--config".into());
                global.push(value.context("config= needs a file")?.into());
                continue;
            }
            "pin_budget" | "prefetch_window" | "passthrough" | "threads" | "read_ahead_kb"
            | "shutdown_grace" | "metrics" | "log_file" => format!("--{}", key.replace('_', "-")),
            _ => bail!("unknown mount option {opt:?} (see mount.fuse.modelfs -h)"),
        };
        let value =
            value.with_context(|| format!("mount option {key} needs a value ({key}=...)"))?;
        // One argument `--flag=value`, so a value like "-1" is not taken for a flag.
        mount.push(format!("{flag}={value}"));
    }
    let canonical: Vec<OsString> = global
        .into_iter()
        .chain(mount)
        .map(OsString::from)
        .collect();
    let cli = Cli::try_parse_from(
        std::iter::once(OsString::from("modelfs")).chain(canonical.iter().cloned()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let _ = CANONICAL.set(canonical);
    Ok(cli)
}

/// Arguments for the `--daemon` child: the same command without `--daemon`.
pub fn args_without_daemon() -> Vec<OsString> {
    let args: Vec<OsString> = match CANONICAL.get() {
        Some(c) => c.clone(),
        None => std::env::args_os().skip(1).collect(),
    };
    args.into_iter().filter(|a| a != "--daemon").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn fstab_options_map_to_flags() {
        let cli = parse(os(&[
            "/var/lib/modelfs",
            "/models",
            "-o",
            "rw,defaults,allow_other,_netdev,x-systemd.requires=network.target,pin_budget=2GiB,passthrough=off",
        ]))
        .unwrap();
        assert_eq!(
            cli.store.as_deref(),
            Some(std::path::Path::new("/var/lib/modelfs"))
        );
        match cli.command {
            crate::Command::Mount(m) => {
                assert!(m.daemon && m.allow_other);
                assert_eq!(m.pin_budget.as_deref(), Some("2GiB"));
                assert!(m.passthrough == Some(crate::PassthroughArg::Off));
            }
            _ => panic!("not a mount"),
        }
    }

    #[test]
    fn unknown_options_are_named() {
        let e = parse(os(&["/s", "/m", "-o", "pin_budgte=1G"]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("pin_budgte"), "{e}");
        assert!(parse(os(&["/s"])).is_err());
    }
}
