//! Mounting: checks, the fuser session, the catalog watcher, signals, and
//! the post-mount tuning the kernel does not let us negotiate.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, INodeNo, MountOption, SessionACL};
use tracing::{error, info, warn};

use crate::fuse::FuseFs;
use crate::vfs::{Vfs, VfsConfig};

/// How whole-file objects are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Kernel passthrough when the kernel and our privileges allow it.
    Auto,
    /// Copy mode for everything.
    Off,
}

/// Everything a mount needs to know, gathered by the CLI from flags, the
/// configuration file and defaults.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The store directory to serve.
    pub store: PathBuf,
    /// Where to mount it: an existing, empty directory.
    pub mountpoint: PathBuf,
    /// Let every user read the mount, not only its owner (and root); also
    /// lets an unprivileged mount use `auto_unmount`.
    pub allow_other: bool,
    /// Whether to try kernel passthrough for whole-file objects.
    pub passthrough: Passthrough,
    /// FUSE worker threads (each with its own cloned /dev/fuse descriptor).
    pub threads: usize,
    /// read_ahead_kb written to the mount's bdi after mounting.
    pub read_ahead_kb: u32,
    /// How often the catalog is polled for imports and removals.
    pub poll_interval: Duration,
    /// After SIGTERM/SIGINT, how long files still open may keep reading
    /// before the connection is aborted.
    pub shutdown_grace: Duration,
    /// Bytes of shared chunks to keep locked in memory (0: no pinning).
    pub pin_budget: u64,
    /// How far a load-trace replay may run ahead of the reader (0: no replay).
    pub prefetch_window: u64,
}

/// Why a mount could not start or ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point is unusable (missing, not a directory, not empty, or
    /// already mounted on): its path and what is wrong.
    #[error("mount point {0}: {1}")]
    MountPoint(PathBuf, String),
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] modelfs_store::Error),
    /// The FUSE session failed to mount or to run: the mount point and the
    /// error.
    #[error("mounting {0}: {1}")]
    Mount(PathBuf, std::io::Error),
    /// The store is writable by every user, so serving it would let anyone
    /// change what loaders read; says which path and how to fix it.
    #[error("refusing to serve the store: {0}")]
    Unsafe(String),
}

/// Refuse a missing, non-directory or non-empty mount point.
pub fn check_mountpoint(p: &Path) -> Result<(), MountError> {
    let err = |m: &str| MountError::MountPoint(p.to_path_buf(), m.to_string());
    let meta = std::fs::metadata(p).map_err(|e| err(&format!("{e}")))?;
    if !meta.is_dir() {
        return Err(err("not a directory"));
    }
    if mount_entry(p).is_some() {
        return Err(err("something is already mounted there"));
    }
    let mut entries = std::fs::read_dir(p).map_err(|e| err(&format!("{e}")))?;
    if entries.next().is_some() {
        return Err(err("directory is not empty"));
    }
    Ok(())
}

/// Refuse to serve a store others could write to: whoever can write it can
/// change what every loader on the machine reads.
pub fn check_store_permissions(store: &Path) -> Result<(), MountError> {
    use std::os::unix::fs::MetadataExt;
    for p in [
        store.to_path_buf(),
        store.join("objects"),
        store.join("catalog.db"),
    ] {
        if let Ok(meta) = std::fs::metadata(&p) {
            if meta.mode() & 0o002 != 0 {
                return Err(MountError::Unsafe(format!(
                    "{} is writable by every user (mode {:o}); fix with `chmod o-w {}`",
                    p.display(),
                    meta.mode() & 0o7777,
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// (device "major:minor", fstype) of the mount at `p`, from /proc/self/mountinfo.
pub fn mount_entry(p: &Path) -> Option<(String, String)> {
    let want = std::fs::canonicalize(p).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() <= sep + 1 {
            continue;
        }
        if Path::new(&unescape(fields[4])) == want {
            // The last matching line is the topmost mount.
            found = Some((fields[2].to_string(), fields[sep + 1].to_string()));
        }
    }
    found
}

/// Every modelfs mount this process can see: (mount point, the store it
/// serves), from /proc/self/mountinfo. The store is the mount's source
/// field, which the daemon sets to the store directory (`FSName`).
pub fn modelfs_mounts() -> Vec<(PathBuf, PathBuf)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() <= sep + 2 || fields[sep + 1] != "fuse.modelfs" {
            continue;
        }
        out.push((
            PathBuf::from(unescape(fields[4])),
            PathBuf::from(unescape(fields[sep + 2])),
        ));
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Detach the mount: new path lookups fail at once, open files keep being
/// served until closed, then the session ends.
pub fn lazy_unmount(mountpoint: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let status = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q", "--"])
        .arg(mountpoint)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "fusermount3 -u -z {} failed",
            mountpoint.display()
        )))
    }
}

/// What the program around the mount wants to hear about: the service layer
/// (readiness notification, metrics, configuration reload) lives outside
/// this crate.
pub trait Hooks: Send + Sync {
    /// The kernel accepted the mount; requests are about to be served.
    fn ready(&self, _vfs: &Arc<Vfs>) {}
    /// SIGHUP.
    fn reload(&self) {}
    /// SIGTERM/SIGINT: the mount is going away.
    fn stopping(&self) {}
}

/// Hooks that do nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Mount and serve until unmounted or SIGTERM/SIGINT.
pub fn mount(cfg: &MountConfig, hooks: Arc<dyn Hooks>) -> Result<(), MountError> {
    // Signals are taken by a dedicated thread; block them before any other
    // thread starts (threads inherit the mask; one that does not block them
    // would be killed by SIGTERM instead of unmounting cleanly).
    let sigset = block_signals();
    check_mountpoint(&cfg.mountpoint)?;
    check_store_permissions(&cfg.store)?;
    let mountpoint = std::fs::canonicalize(&cfg.mountpoint)
        .map_err(|e| MountError::MountPoint(cfg.mountpoint.clone(), e.to_string()))?;
    let vfs = Arc::new(Vfs::new(
        &cfg.store,
        &VfsConfig {
            passthrough: cfg.passthrough == Passthrough::Auto,
            pin_budget: cfg.pin_budget,
            prefetch_window: cfg.prefetch_window,
        },
    )?);
    vfs.start_pin_worker();

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let acl = if cfg.allow_other {
        SessionACL::All
    } else if root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    let mut options = vec![
        MountOption::FSName(vfs.store_root().display().to_string()),
        MountOption::Subtype("modelfs".into()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if acl != SessionACL::Owner {
        // fusermount3 unmounts for us if this process dies, even by SIGKILL.
        options.push(MountOption::AutoUnmount);
    } else {
        warn!("without --allow-other an unprivileged mount cannot use auto_unmount: if the daemon is killed, run `modelfs umount {}`", mountpoint.display());
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = acl;
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;

    let session = fuser::Session::new(FuseFs::new(vfs.clone()), &mountpoint, &config)
        .map_err(|e| MountError::Mount(mountpoint.clone(), e))?;
    let models = vfs.tree().models;
    info!(mountpoint = %mountpoint.display(), store = %vfs.store_root().display(), models, "mounted");
    if models == 0 {
        // The usual cause: models imported by another user went to that
        // user's store (sudo resets MODELFS_STORE).
        warn!(store = %vfs.store_root().display(), "the store has no models yet; if you imported some, they went to another store (each user has their own unless --store or MODELFS_STORE says otherwise)");
    }
    set_read_ahead(&mountpoint, cfg.read_ahead_kb);
    let device = mount_entry(&mountpoint).map(|(dev, _)| dev);
    // Sharing below the file is an addition: a mount that cannot offer it
    // still serves every file.
    let share = device
        .as_deref()
        .map(|dev| crate::share_server::start(vfs.clone(), dev))
        .transpose()
        .unwrap_or_else(|e| {
            warn!("no layout service, so processes cannot map shared tensors from the store: {e}");
            None
        });

    let stop = Arc::new(AtomicBool::new(false));
    let notifier = session.notifier();
    let watcher = {
        let (vfs, stop, interval) = (vfs.clone(), stop.clone(), cfg.poll_interval);
        std::thread::Builder::new()
            .name("catalog-watch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    match vfs.refresh() {
                        Ok(Some(changes)) => {
                            info!(
                                entries = changes.entries.len(),
                                "catalog changed; tree rebuilt"
                            );
                            for (parent, name) in changes.entries {
                                if stop.load(Ordering::Relaxed) {
                                    break;
                                }
                                let _ = notifier.inval_entry(INodeNo(parent), OsStr::new(&name));
                            }
                            for dir in changes.dirs {
                                let _ = notifier.inval_inode(INodeNo(dir), 0, 0);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => warn!("cannot refresh from the catalog: {e}"),
                    }
                }
            })
            .expect("spawn watcher")
    };
    {
        let mountpoint = mountpoint.clone();
        let device = device.clone();
        let socket = share.as_ref().map(|s| s.path().to_path_buf());
        let grace = cfg.shutdown_grace;
        let hooks = hooks.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait on a set of blocked signals.
                if unsafe { libc::sigwait(&sigset, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGHUP {
                    info!("SIGHUP: reloading configuration");
                    hooks.reload();
                    continue;
                }
                info!(signal = sig, "unmounting");
                hooks.stopping();
                if let Some(socket) = &socket {
                    let _ = std::fs::remove_file(socket);
                }
                if let Err(e) = lazy_unmount(&mountpoint) {
                    error!("unmount failed: {e}");
                }
                // Detached: no new opens. Requests in flight finish now; files
                // still held open get `grace` to be closed, then the
                // connection is aborted so the daemon exits.
                std::thread::sleep(grace);
                if let Some(dev) = &device {
                    let minor = dev.rsplit(':').next().unwrap_or("");
                    let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
                }
                std::thread::sleep(Duration::from_millis(500));
                warn!("files were still open {grace:?} after the signal; exiting");
                std::process::exit(0);
            })
            .expect("spawn signal thread");
    }
    hooks.ready(&vfs);
    let result = session.run();
    stop.store(true, Ordering::Relaxed);
    // Not joined: the watcher may be inside a kernel invalidation that can
    // only finish once the connection is gone; the process exits anyway.
    drop(watcher);
    drop(share);
    info!("session ended");
    result.map_err(|e| MountError::Mount(mountpoint, e))
}

/// The kernel's INIT offer caps FUSE readahead at 128 KiB; the mount's bdi
/// accepts more once mounted, which makes copy-mode requests 1 MiB.
fn set_read_ahead(mountpoint: &Path, kb: u32) {
    let Some((dev, _)) = mount_entry(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => info!(path, kb, "readahead raised"),
        Err(e) => info!(
            path,
            "cannot raise readahead ({e}); keeping the kernel default"
        ),
    }
}
