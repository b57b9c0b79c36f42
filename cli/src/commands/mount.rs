//! `modelfs mount` and `umount`: the mount's settings (flags over the
//! configuration file over defaults), the `--daemon` handshake, and
//! unmounting.
//!
//! Why together: they are the mount's life outside the fs crate. `mount`
//! builds the settings and hands them to `modelfs_fs::mount` with the service
//! hooks; with `--daemon` it starts itself again detached and waits for the
//! child's "ready"; `umount` ends it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::args::{args_without_daemon, MountArgs, PassthroughArg};
use crate::{config, output, service};

/// Set by `--daemon`'s parent: the child prints "ready" on stdout once mounted.
pub const READY_ENV: &str = "MODELFS_NOTIFY_READY";

/// In the `--daemon` child, once mounted: tell the parent, then let go of
/// the parent's stdout and stderr.
fn notify_ready(log_file: Option<&Path>) {
    use std::os::fd::AsRawFd;
    if std::env::var_os(READY_ENV).is_none() {
        return;
    }
    println!("ready");
    let _ = io::stdout().flush();
    // The parent has returned: nobody reads our stdout/stderr any more, and
    // holding them would keep a caller's pipe open forever.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null");
    let log = log_file.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    });
    if let Ok(null) = &null {
        // SAFETY: dup2 only changes the descriptor table, no memory. The
        // source is an open descriptor that `null` owns and keeps open for
        // the call; the target, 1, is the process's stdout, which no Rust
        // value owns (`io::stdout()` writes to the number), so replacing it
        // cannot close a descriptor something else will close again.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    match (log, &null) {
        // SAFETY: as for stdout above: `f` owns the open source descriptor
        // and outlives the call; the target, stderr (2), is owned by no Rust
        // value.
        (Some(Ok(f)), _) => unsafe {
            libc::dup2(f.as_raw_fd(), 2);
        },
        // SAFETY: as for stdout above: `null` owns the open source
        // descriptor and outlives the call; the target, stderr (2), is owned
        // by no Rust value.
        (_, Ok(null)) => unsafe {
            libc::dup2(null.as_raw_fd(), 2);
        },
        _ => {}
    }
}

/// Enough to keep the disk busy for a fraction of a second ahead of a
/// loader, small next to any serving node's memory.
pub const DEFAULT_PREFETCH_WINDOW: &str = "256MiB";

/// Readahead of the mount. The kernel offers FUSE 128 KiB; measured here,
/// copy-mode cold reads keep up with ext4 (whose device uses 8 MiB) only
/// from about 8 MiB (docs/benchmarks.md).
pub const DEFAULT_READ_AHEAD_KB: u32 = 8192;

/// Build the mount configuration: flags, else the configuration file, else
/// defaults. Flag values go through the same validation as the file's keys.
pub fn mount(
    store: PathBuf,
    args: MountArgs,
    config_path: Option<PathBuf>,
    file: &config::FileConfig,
) -> Result<ExitCode> {
    let merged = config::FileConfig {
        store: Some(std::path::absolute(&store)?),
        mountpoint: args
            .mountpoint
            .clone()
            .or(file.mountpoint.clone())
            .map(|m| std::path::absolute(&m))
            .transpose()?,
        pin_budget: args.pin_budget.clone().or(file.pin_budget.clone()),
        prefetch_window: args
            .prefetch_window
            .clone()
            .or(file.prefetch_window.clone()),
        passthrough: args
            .passthrough
            .map(|p| {
                if p == PassthroughArg::Off {
                    "off"
                } else {
                    "auto"
                }
                .to_string()
            })
            .or(file.passthrough.clone()),
        threads: args.threads.or(file.threads),
        read_ahead_kb: args.read_ahead_kb.or(file.read_ahead_kb),
        allow_other: Some(args.allow_other || file.allow_other.unwrap_or(false)),
        metrics: args.metrics.clone().or(file.metrics.clone()),
        shutdown_grace: args.shutdown_grace.or(file.shutdown_grace),
        log: file.log.clone(),
    };
    merged
        .validate()
        .context("invalid mount settings (flags and configuration)")?;
    let Some(mountpoint) = merged.mountpoint.clone() else {
        bail!("no mount point: give one, or set `mountpoint` in the configuration file");
    };
    let passthrough = match merged.passthrough.as_deref() {
        Some("off") => modelfs_fs::Passthrough::Off,
        _ => modelfs_fs::Passthrough::Auto,
    };
    // Neither a flag nor the configuration: modelfs_cache's default share of
    // RAM (locked pages cannot be reclaimed, so most stays free for loaders
    // and the ordinary page cache).
    let pin_budget = match merged.pin_budget.as_deref() {
        Some(b) => config::parse_size(b)?,
        None => modelfs_cache::default_budget().context("default pin budget")?,
    };
    let prefetch_window = config::parse_size(
        merged
            .prefetch_window
            .as_deref()
            .unwrap_or(DEFAULT_PREFETCH_WINDOW),
    )?;
    let metrics = merged
        .metrics
        .as_deref()
        .map(|m| m.parse::<std::net::SocketAddr>())
        .transpose()
        .context("metrics address")?;
    // The configured level applies where the log goes somewhere that keeps
    // it: not to the terminal of a `--daemon` start (warnings only there).
    let on_callers_terminal =
        args.daemon || (std::env::var_os(READY_ENV).is_some() && args.log_file.is_none());
    if let (Some(l), false) = (&file.log, on_callers_terminal) {
        service::set_log_filter(l);
    }
    let cfg = modelfs_fs::MountConfig {
        store: store.clone(),
        mountpoint: mountpoint.clone(),
        allow_other: merged.allow_other.unwrap_or(false),
        passthrough,
        threads: merged.threads.unwrap_or(4),
        read_ahead_kb: merged.read_ahead_kb.unwrap_or(DEFAULT_READ_AHEAD_KB),
        poll_interval: std::time::Duration::from_millis(200),
        shutdown_grace: std::time::Duration::from_secs_f64(merged.shutdown_grace.unwrap_or(2.0)),
        pin_budget,
        prefetch_window,
    };
    if args.daemon {
        modelfs_fs::check_mountpoint(&mountpoint)?;
        return daemonize(&mountpoint);
    }
    let flag_budget = args
        .pin_budget
        .as_deref()
        .map(config::parse_size)
        .transpose()?;
    let live = std::sync::Arc::new(service::Live {
        pin_budget_flag: flag_budget,
        ..Default::default()
    });
    live.pin_budget
        .store(pin_budget, std::sync::atomic::Ordering::Relaxed);
    let log_file = args.log_file.clone();
    let metrics = metrics.map(crate::metrics::Endpoint::bind).transpose()?;
    let svc = service::Service {
        config_path,
        store,
        metrics: std::sync::Mutex::new(metrics),
        live,
        on_ready: std::sync::Mutex::new(Some(Box::new(move || notify_ready(log_file.as_deref())))),
        vfs: std::sync::OnceLock::new(),
    };
    modelfs_fs::mount(&cfg, std::sync::Arc::new(svc))?;
    Ok(ExitCode::SUCCESS)
}

/// Run the mount in a detached child (same arguments, without --daemon) and
/// return once it reports ready.
fn daemonize(mountpoint: &Path) -> Result<ExitCode> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(args_without_daemon())
        .env(READY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is sound: it calls setsid (async-signal-safe,
    // and only detaches the child from our session and terminal), captures
    // nothing, allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        // Which store, and how many models: an empty mount is most often the
        // wrong store (sudo resets MODELFS_STORE), and this is where the
        // user looks.
        let served = std::fs::read_to_string(mountpoint.join(".modelfs/stats.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<modelfs_fs::MountStats>(&t).ok());
        output::daemon_mounted(mountpoint, child.id(), served.as_ref());
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait()?;
    bail!("the mount daemon exited before the mount was ready ({status})");
}

/// `modelfs umount`: only a modelfs mount; `--lazy` detaches at once.
pub fn umount(mountpoint: &Path, lazy: bool) -> Result<()> {
    match modelfs_fs::mount_entry(mountpoint) {
        Some((_, fstype)) if fstype == "fuse.modelfs" => {}
        Some((_, fstype)) => bail!(
            "{}: not a modelfs mount (it is {fstype})",
            mountpoint.display()
        ),
        None => bail!("{}: not mounted", mountpoint.display()),
    }
    if lazy {
        return Ok(modelfs_fs::lazy_unmount(mountpoint)?);
    }
    // fusermount3's own message is for its own command line ("failed to
    // unmount: Device or resource busy"); the user ran ours, so it is
    // captured and said again in our terms.
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running fusermount3 (install the fuse3 package)")?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let users = processes_using(mountpoint);
    if said.contains("busy") || users > 0 {
        bail!("{}", busy_message(mountpoint, users));
    }
    let said = said.trim().replace('\n', "; ");
    bail!("{}: unmount failed: {said}", mountpoint.display());
}

/// The one line a busy unmount ends with.
fn busy_message(mountpoint: &Path, processes: usize) -> String {
    let m = mountpoint.display();
    let who = match processes {
        0 => "files are still in use".to_string(),
        1 => "1 process has files open".to_string(),
        n => format!("{n} processes have files open"),
    };
    format!("{m} is busy: {who} (fuser -vm {m} lists them); close them or use --lazy")
}

/// How many processes hold something under `mountpoint` open: a file
/// descriptor, their working or root directory, or a mapping. Processes we
/// may not inspect are not counted.
fn processes_using(mountpoint: &Path) -> usize {
    let Ok(mp) = mountpoint.canonicalize() else {
        return 0;
    };
    let under = |p: &Path| p.starts_with(&mp);
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            let dir = e.path();
            let link_under = |p: std::path::PathBuf| std::fs::read_link(p).is_ok_and(|t| under(&t));
            if link_under(dir.join("cwd")) || link_under(dir.join("root")) {
                return true;
            }
            let fds = std::fs::read_dir(dir.join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| link_under(fd.path()));
            fds || std::fs::read_to_string(dir.join("maps")).is_ok_and(|maps| {
                maps.lines()
                    .filter_map(|l| l.split_whitespace().nth(5))
                    .any(|p| under(Path::new(p)))
            })
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_mount_is_one_line_that_says_what_to_do() {
        let m = busy_message(Path::new("/models"), 2);
        assert_eq!(
            m,
            "/models is busy: 2 processes have files open (fuser -vm /models lists them); \
             close them or use --lazy"
        );
        assert!(busy_message(Path::new("/m"), 1).contains("1 process has files open"));
    }

    #[test]
    fn processes_with_a_file_open_under_a_directory_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        assert_eq!(processes_using(dir.path()), 0);
        let _open = std::fs::File::create(dir.path().join("f")).unwrap();
        assert_eq!(processes_using(dir.path()), 1, "this test process");
        assert_eq!(processes_using(other.path()), 0);
    }
}
