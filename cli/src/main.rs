//! `modelfs`: the command-line tool that drives a modelfs store.
//!
//! Why this crate exists: it is the one binary an operator installs. It
//! parses commands, prints results (text for people, `--json` for scripts)
//! and runs the mount daemon with its service duties (config file, logging,
//! metrics, readiness). The work itself is the store's (import, read,
//! verify, gc) and the fs crate's (the mount). Invoked as
//! `mount.fuse.modelfs`, the same binary is the mount helper: the
//! mount-helper crate translates mount(8)'s arguments into a `modelfs mount`
//! command line, which is then parsed like any other.

mod config;
mod install;
mod output;
mod service;

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use modelfs_mount_helper::HelperError;
use modelfs_store::{default_model_name, default_store_dir, ImportOptions, ImportProgress, Store};

#[derive(Parser)]
#[command(
    name = "modelfs",
    version,
    about = "Keep many ML models on one machine: a deduplicating, content-addressed model store",
    long_about = "modelfs stores model directories (safetensors, torch .bin/.pt, GGUF, ONNX, configs, \
tokenizers) in a content-addressed store. Files are cut into chunks on tensor boundaries, so a tensor \
shared by several models, fine-tunes, re-shards or re-saves is stored once.\n\n\
The store is --store DIR, else $MODELFS_STORE, else /var/lib/modelfs (root) or \
$XDG_DATA_HOME/modelfs (other users)."
)]
struct Cli {
    /// Store directory [default: $MODELFS_STORE, /var/lib/modelfs for root, else $XDG_DATA_HOME/modelfs]
    #[arg(long, global = true, env = "MODELFS_STORE", value_name = "DIR")]
    store: Option<PathBuf>,

    /// Configuration file [default: /etc/modelfs/config.toml if it exists]; flags override it
    #[arg(long, global = true, env = "MODELFS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an empty store (import also creates one on first use)
    Init,
    /// Import a model directory, a single file, or a Hugging Face cache snapshot
    #[command(
        long_about = "Import a model directory, a single file, or a Hugging Face cache \
snapshot (models--ORG--NAME/snapshots/REV, or the models--ORG--NAME directory itself, which means \
its refs/main snapshot).\n\nEvery file is cut into chunks on tensor boundaries (safetensors, torch \
zip checkpoints, GGUF, ONNX) or by content-defined chunking (everything else); only chunks the store \
does not hold yet are written. The model becomes visible atomically once all its data is on disk. \
Symlinks are followed only inside the imported tree (and into a Hugging Face repo's blobs/)."
    )]
    Import {
        /// Directory or file to import
        path: PathBuf,
        /// Model name, a relative path like `bert-base` or `org/llama-3-8b` [default: from PATH]
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing model with the same name
        #[arg(long)]
        replace: bool,
        /// Also follow symlinks that point outside the imported tree
        #[arg(long)]
        follow_symlinks: bool,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// List models, or the files of one model and how each is stored
    Ls {
        /// Show the files of this model
        name: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove models (their bytes are reclaimed by `gc`)
    Rm {
        /// Models to remove
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Reclaim disk space no model references (safe while the store is mounted)
    Gc {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash stored files; exit 1 and name each damaged file
    Verify {
        /// Only this model
        name: Option<String>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Convert a store written by an older modelfs to this version's format
    ///
    /// Schema 1 stores (modelfs before 2026-11-23) keyed files by the BLAKE3
    /// of the whole file; now they are keyed by the content key (BLAKE3 over
    /// the chunk list, docs/store-format.md §3). Reads every stored byte once,
    /// checking each chunk, then rewrites the keys in one transaction: an
    /// interrupted upgrade leaves the store as it was. Restart mounts after it.
    Upgrade {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Write a stored file to stdout, reassembled and checked against its hash
    Cat {
        /// MODEL/PATH, e.g. org/llama-3-8b/config.json
        file: String,
    },
    /// Mount the store read-only: MOUNTPOINT/<model>/<file> for every model
    #[command(
        long_about = "Mount the store read-only at MOUNTPOINT (an empty directory): every model \
appears as MOUNTPOINT/<model name>/<file path>, byte-identical to what was imported. Files stored \
whole are served by kernel FUSE passthrough when the kernel and privileges allow it; others are \
reassembled from memory-mapped store objects, each chunk checked against its hash (a damaged chunk \
reads as EIO). Models imported or removed while mounted appear or disappear within a second. \
Statistics: MOUNTPOINT/.modelfs/stats.json.\n\nRuns in the foreground until unmounted or sent \
SIGTERM/SIGINT; --daemon returns once the mount is ready."
    )]
    Mount(MountArgs),
    /// Unmount a modelfs mount (the daemon then exits)
    Umount {
        /// Mount point
        mountpoint: PathBuf,
        /// Detach even if files are open (they keep working until closed)
        #[arg(long)]
        lazy: bool,
    },
    /// Is the store mounted, in which mode, what it holds and serves
    Status {
        /// Mount point [default: `mountpoint` from the configuration]
        mountpoint: Option<PathBuf>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// What a running mount serves from memory and from disk: pinned bytes, reads, prefetch, per model
    #[command(
        long_about = "Statistics of a running mount, overall and per model: bytes pinned in memory, \
copy-mode reads served from resident pages vs from disk, bytes prefetched by load-trace replay, and \
traces saved/replayed. Read from MOUNTPOINT/.modelfs/stats.json (which --json prints as is). \
Passthrough reads go from the kernel to the store without the daemon, so they are not in the read \
counters; pinned bytes cover both modes. A file shared by several models counts in each of them. \
Exits 3 if nothing is mounted there."
    )]
    Stats {
        /// Mount point [default: `mountpoint` from the configuration]
        mountpoint: Option<PathBuf>,
        /// Only this model's line
        #[arg(long)]
        model: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Pull a model's files into memory by reading them through the mount, so the
    /// mount's pinning policy can keep their shared chunks (within its budget)
    Warm {
        /// Model name
        name: String,
        /// Only these files of the model
        paths: Vec<String>,
        /// Mount point [default: `mountpoint` from the configuration]
        #[arg(long)]
        mountpoint: Option<PathBuf>,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file; names the bad key and exits 1 if it is invalid
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Install the binary, the mount helper, the systemd unit and an example configuration
    Install(install::InstallArgs),
    /// Show logical vs stored bytes, the dedup ratio, and per model unique/shared bytes
    Du {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (default: --config, else /etc/modelfs/config.toml)
    Check { file: Option<PathBuf> },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PassthroughArg {
    Auto,
    Off,
}

/// `modelfs mount` options; each unset one falls back to the configuration file.
#[derive(clap::Args, Default)]
pub struct MountArgs {
    /// Empty directory to mount on [default: `mountpoint` from the configuration]
    pub mountpoint: Option<PathBuf>,
    /// Detach once the mount is ready
    #[arg(long)]
    pub daemon: bool,
    /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf for non-root)
    #[arg(long)]
    pub allow_other: bool,
    /// Serve whole-file objects by kernel passthrough (auto) or always in copy mode (off) [default: auto]
    #[arg(long, value_enum)]
    pub passthrough: Option<PassthroughArg>,
    /// FUSE worker threads [default: 4]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Readahead set on the mount after mounting, in KiB [default: 8192]
    #[arg(long)]
    pub read_ahead_kb: Option<u32>,
    /// After SIGTERM/SIGINT, seconds files still open may keep reading before the daemon exits [default: 2]
    #[arg(long)]
    pub shutdown_grace: Option<f64>,
    /// Memory budget for pinning chunks many models share ("4GiB", "25%") [default: 25%]
    #[arg(long)]
    pub pin_budget: Option<String>,
    /// How far ahead of a loader the mount may replay a file's recorded load trace ("256MiB", "5%"; 0 turns replay off) [default: 256MiB]
    #[arg(long, value_name = "SIZE")]
    pub prefetch_window: Option<String>,
    /// Serve Prometheus metrics at this address, e.g. 127.0.0.1:9477 [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// With --daemon: write the daemon's log here (default: discarded once mounted)
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Invoked by mount(8) as mount.fuse.modelfs (or mount.modelfs)?
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let program = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let is_helper = program.starts_with("mount.");
    let cli = if is_helper {
        match parse_helper_args(std::env::args_os().skip(1).collect()) {
            Ok(cli) => cli,
            Err(HelperError::Help) => {
                println!("{}", modelfs_mount_helper::USAGE);
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{program}: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        Cli::parse()
    };
    // A `--daemon` child logs to the caller's terminal until it is ready:
    // keep that to warnings unless the log goes to a file.
    let default_log = match &cli.command {
        Command::Mount(m) if m.log_file.is_none() && std::env::var_os(READY_ENV).is_some() => {
            "warn"
        }
        Command::Mount(m) if m.daemon => "warn",
        Command::Mount(_) => "info",
        _ => "warn",
    };
    service::init_logging(default_log);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("modelfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `modelfs` arguments a helper invocation was translated into; the
/// `--daemon` child is started with these.
static HELPER_ARGS: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

fn parse_helper_args(args: Vec<OsString>) -> Result<Cli, HelperError> {
    let canonical = modelfs_mount_helper::translate(args)?;
    let cli = Cli::try_parse_from(
        std::iter::once(OsString::from("modelfs")).chain(canonical.iter().cloned()),
    )
    .map_err(|e| HelperError::Usage(e.to_string()))?;
    let _ = HELPER_ARGS.set(canonical);
    Ok(cli)
}

/// Arguments for the `--daemon` child: the same command without `--daemon`.
fn args_without_daemon() -> Vec<OsString> {
    let args: Vec<OsString> = match HELPER_ARGS.get() {
        Some(c) => c.clone(),
        None => std::env::args_os().skip(1).collect(),
    };
    args.into_iter().filter(|a| a != "--daemon").collect()
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Command::Config(ConfigCommand::Check { file }) = &cli.command {
        let path = file
            .clone()
            .or_else(|| cli.config.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
        let cfg = config::FileConfig::load(&path)?;
        println!("{}: ok", path.display());
        if let Some(b) = &cfg.pin_budget {
            println!("  pin_budget = {b} ({} bytes)", config::parse_size(b)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (config_path, file_cfg) = config::FileConfig::discover(cli.config.as_deref())?;
    let dir = cli
        .store
        .clone()
        .or_else(|| file_cfg.store.clone())
        .unwrap_or_else(default_store_dir);
    match cli.command {
        Command::Config(_) => unreachable!("handled above"),
        Command::Install(args) => install::run(&args)?,
        Command::Warm {
            name,
            paths,
            mountpoint,
            json,
        } => warm(
            &dir,
            &name,
            &paths,
            mountpoint.or(file_cfg.mountpoint.clone()),
            json,
        )?,
        Command::Stats {
            mountpoint,
            model,
            json,
        } => {
            let mnt = mountpoint.or(file_cfg.mountpoint.clone());
            return stats(mnt.as_deref(), model.as_deref(), json);
        }
        Command::Status { mountpoint, json } => {
            let mnt = mountpoint.or(file_cfg.mountpoint.clone());
            return status(&dir, mnt.as_deref(), json);
        }
        Command::Init => {
            Store::init(&dir).with_context(|| format!("creating store {}", dir.display()))?;
            println!("store ready at {}", dir.display());
        }
        Command::Import {
            path,
            name,
            replace,
            follow_symlinks,
            json,
        } => import(&dir, &path, name, replace, follow_symlinks, json)?,
        Command::Ls { name, json } => {
            let store = Store::open(&dir)?;
            match name {
                None => output::models(&store.models()?, json)?,
                Some(n) => output::files(&store.files(&n)?, json)?,
            }
        }
        Command::Rm { names } => {
            let mut store = Store::open(&dir)?;
            for n in names {
                let m = store.remove(&n)?;
                println!(
                    "removed {} ({} files, {}); run `modelfs gc` to reclaim its unique bytes",
                    m.name,
                    m.files,
                    HumanBytes(m.logical_bytes)
                );
            }
        }
        Command::Gc { json } => {
            let mut store = Store::open(&dir)?;
            let r = store.gc()?;
            if json {
                output::json(&r)?;
            } else {
                println!(
                    "gc: freed {}; removed {} objects, {} contents, {} chunks, {} load traces; punched holes in {} objects{}",
                    HumanBytes(r.bytes_freed),
                    r.objects_removed,
                    r.contents_removed,
                    r.chunks_removed,
                    r.traces_removed,
                    r.objects_punched,
                    if r.objects_busy > 0 {
                        format!("; {} objects in use by readers left for the next gc", r.objects_busy)
                    } else {
                        String::new()
                    }
                );
            }
        }
        Command::Verify { name, json } => {
            let store = Store::open(&dir)?;
            let r = store.verify(name.as_deref())?;
            if json {
                output::json(&r)?;
            } else {
                output::verify(&r);
            }
            if !r.is_clean() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Upgrade { json } => {
            let r = Store::upgrade(&dir, || {
                eprintln!("waiting for another import, rm or gc to finish...")
            })?;
            if json {
                output::json(&r)?;
            } else if r.from_version == r.to_version {
                println!(
                    "store {} is already at schema version {}",
                    dir.display(),
                    r.to_version
                );
            } else {
                println!(
                    "upgraded store {} from schema {} to {}: {} contents re-keyed ({} read), {} load traces renamed",
                    dir.display(),
                    r.from_version,
                    r.to_version,
                    r.contents,
                    HumanBytes(r.bytes_read),
                    r.traces_renamed
                );
            }
        }
        Command::Cat { file } => {
            let store = Store::open(&dir)?;
            let (model, info) = store.resolve(&file)?;
            let reader = store.open_file(info.content_id)?;
            let stdout = io::stdout();
            let mut out = stdout.lock();
            reader.copy_to(&mut out).map_err(|e| match e {
                modelfs_store::Error::Io { source, .. }
                    if source.kind() == io::ErrorKind::BrokenPipe =>
                {
                    anyhow::Error::new(source)
                }
                e => anyhow::Error::new(e).context(format!("{}/{}", model.name, info.path)),
            })?;
            out.flush()?;
        }
        Command::Mount(args) => return mount(dir, args, config_path, &file_cfg),
        Command::Umount { mountpoint, lazy } => umount(&mountpoint, lazy)?,
        Command::Du { json } => {
            let store = Store::open(&dir)?;
            let u = store.usage()?;
            if json {
                output::json(&u)?;
            } else {
                output::usage(&u);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Set by `--daemon`'s parent: the child prints "ready" on stdout once mounted.
const READY_ENV: &str = "MODELFS_NOTIFY_READY";

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
        // SAFETY: dup2 onto our own standard descriptors.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    match (log, &null) {
        // SAFETY: as above.
        (Some(Ok(f)), _) => unsafe {
            libc::dup2(f.as_raw_fd(), 2);
        },
        // SAFETY: as above.
        (_, Ok(null)) => unsafe {
            libc::dup2(null.as_raw_fd(), 2);
        },
        _ => {}
    }
}

/// Pin budget when neither a flag nor the configuration sets one: locked
/// pages cannot be reclaimed, so most memory stays free for loaders and the
/// ordinary page cache.
pub const DEFAULT_PIN_BUDGET: &str = "25%";
/// Enough to keep the disk busy for a fraction of a second ahead of a
/// loader, small next to any serving node's memory.
pub const DEFAULT_PREFETCH_WINDOW: &str = "256MiB";

/// Readahead of the mount. The kernel offers FUSE 128 KiB; measured here,
/// copy-mode cold reads keep up with ext4 (whose device uses 8 MiB) only
/// from about 8 MiB (docs/benchmarks.md).
pub const DEFAULT_READ_AHEAD_KB: u32 = 8192;

/// Build the mount configuration: flags, else the configuration file, else
/// defaults. Flag values go through the same validation as the file's keys.
fn mount(
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
    let pin_budget =
        config::parse_size(merged.pin_budget.as_deref().unwrap_or(DEFAULT_PIN_BUDGET))?;
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
    if let Some(l) = &file.log {
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
    let svc = service::Service {
        config_path,
        store,
        metrics,
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
    // SAFETY: setsid in the child before exec; async-signal-safe.
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
        println!(
            "mounted {} (daemon pid {})",
            mountpoint.display(),
            child.id()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait()?;
    bail!("the mount daemon exited before the mount was ready ({status})");
}

/// `modelfs warm`: read a model's files through the mount (the daemon pins
/// what its policy admits), or, with no mount, straight from the store objects
/// (page cache only: nothing to pin them).
fn warm(
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
    let seconds = started.elapsed().as_secs_f64();
    let via = match &mounted {
        Some(m) => format!("through the mount at {}", m.display()),
        None => "from the store (no mount: page cache only, nothing pinned)".into(),
    };
    if as_json {
        output::json(&serde_json::json!({
            "model": name, "files": wanted.len(), "bytes": bytes, "seconds": seconds,
            "through_mount": mounted.is_some(), "files_in_trace_order": traced,
        }))?;
    } else {
        println!(
            "warmed {name}: {} files ({traced} in recorded load order), {} in {seconds:.2} s {via}",
            wanted.len(),
            HumanBytes(bytes)
        );
    }
    Ok(())
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

/// `modelfs stats`: the mount's statistics file, as a table or as is.
fn stats(mountpoint: Option<&Path>, model: Option<&str>, as_json: bool) -> Result<ExitCode> {
    let Some(mnt) = mountpoint else {
        bail!("no mount point: give one, or set `mountpoint` in the configuration file");
    };
    if modelfs_fs::mount_entry(mnt).is_none_or(|(_, t)| t != "fuse.modelfs") {
        eprintln!("modelfs: {}: no modelfs mount there", mnt.display());
        return Ok(ExitCode::from(3));
    }
    let path = mnt.join(".modelfs/stats.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    if let Some(name) = model {
        let models = v["models"].as_array().cloned().unwrap_or_default();
        let Some(line) = models.into_iter().find(|m| m["name"] == name) else {
            bail!("the mount at {} has no model {name:?}", mnt.display());
        };
        v["models"] = serde_json::Value::Array(vec![line]);
    }
    if as_json {
        output::json(&v)?;
    } else {
        output::mount_stats(mnt, &v);
    }
    Ok(ExitCode::SUCCESS)
}

/// `modelfs status`: the mount's own statistics plus the store's usage.
fn status(store: &Path, mountpoint: Option<&Path>, as_json: bool) -> Result<ExitCode> {
    let mounted = mountpoint.and_then(|m| {
        let (_, fstype) = modelfs_fs::mount_entry(m)?;
        (fstype == "fuse.modelfs").then_some(m)
    });
    let stats: Option<serde_json::Value> = mounted.and_then(|m| {
        let text = std::fs::read_to_string(m.join(".modelfs/stats.json")).ok()?;
        serde_json::from_str(&text).ok()
    });
    // A mounted store is the one the daemon serves, whatever --store says.
    let served = stats
        .as_ref()
        .and_then(|s| s.get("store")?.as_str().map(PathBuf::from));
    let store = served.as_deref().unwrap_or(store);
    let usage = Store::open(store).ok().map(|s| s.usage()).transpose()?;
    let v = serde_json::json!({
        "mounted": stats.is_some(),
        "mountpoint": mountpoint,
        "store": store,
        "mode": stats.as_ref().and_then(|s| s.get("mode").cloned()),
        "uptime_seconds": stats.as_ref().and_then(|s| s.get("uptime_seconds").cloned()),
        "models": usage.as_ref().map(|u| u.models.len()),
        "logical_bytes": usage.as_ref().map(|u| u.logical_bytes),
        "stored_bytes": usage.as_ref().map(|u| u.stored_bytes),
        "pinned_bytes": stats.as_ref().and_then(|s| s.get("pinned_bytes").cloned()),
        "stats": stats,
    });
    if as_json {
        output::json(&v)?;
    } else {
        match (&stats, mountpoint) {
            (Some(s), Some(m)) => println!(
                "mounted at {} ({} mode), up {:.0} s; {} read requests, {} EIO",
                m.display(),
                s["mode"].as_str().unwrap_or("?"),
                s["uptime_seconds"].as_f64().unwrap_or(0.0),
                s["read_requests"],
                s["eio"]
            ),
            (None, Some(m)) => println!("not mounted at {}", m.display()),
            (None, None) => println!("no mount point given or configured"),
            (Some(_), None) => unreachable!(),
        }
        match &usage {
            Some(u) => println!(
                "store {}: {} models, {} logical, {} stored; pinned {}",
                store.display(),
                u.models.len(),
                HumanBytes(u.logical_bytes),
                HumanBytes(u.stored_bytes),
                HumanBytes(
                    stats
                        .as_ref()
                        .and_then(|s| s["pinned_bytes"].as_u64())
                        .unwrap_or(0)
                )
            ),
            None => println!("store {}: not a store", store.display()),
        }
    }
    Ok(if stats.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn umount(mountpoint: &Path, lazy: bool) -> Result<()> {
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
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .status()
        .context("running fusermount3 (install the fuse3 package)")?;
    if !status.success() {
        bail!(
            "{}: unmount failed (busy? files still open; --lazy detaches now and finishes when they close)",
            mountpoint.display()
        );
    }
    Ok(())
}

fn import(
    dir: &Path,
    path: &Path,
    name: Option<String>,
    replace: bool,
    follow_symlinks: bool,
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
    let mut store = Store::init(dir).with_context(|| format!("opening store {}", dir.display()))?;
    let progress = BarProgress::new();
    let summary = store
        .import(
            path,
            &ImportOptions {
                name,
                replace,
                follow_symlinks,
            },
            &progress,
        )
        .with_context(|| format!("importing {}", path.display()));
    progress.finish();
    let summary = summary?;
    if json {
        output::json(&summary)?;
    } else {
        println!(
            "imported {}: {} files, {}, {} new stored ({} whole, {} recipe, {} identical to stored files; {} recognised in memory), {:.2} s",
            summary.name,
            summary.files,
            HumanBytes(summary.logical_bytes),
            HumanBytes(summary.new_bytes),
            summary.whole_files,
            summary.recipe_files,
            summary.identical_files,
            HumanBytes(summary.recognised_bytes),
            summary.seconds
        );
    }
    Ok(())
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
