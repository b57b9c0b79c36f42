//! The command line: clap's definitions of every command and flag, and the
//! mount(8) helper's arguments translated into the same definitions.
//!
//! Why a module of its own: these definitions are the CLI's contract (names,
//! flags, help texts). `main` reads them to pick the log level, the commands
//! take their arguments from them, and the `--daemon` parent starts its child
//! with the same arguments, which it takes from here.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use modelfs_mount_helper::HelperError;

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
pub struct Cli {
    /// Store directory [default: $MODELFS_STORE, /var/lib/modelfs for root, else $XDG_DATA_HOME/modelfs]
    #[arg(long, global = true, env = "MODELFS_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// Configuration file [default: /etc/modelfs/config.toml if it exists]; flags override it
    #[arg(long, global = true, env = "MODELFS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create an empty store (import also creates one on first use)
    #[command(after_help = "Examples:\n  modelfs init\n  modelfs --store /srv/models init")]
    Init,
    /// Import model directories, single files, or Hugging Face cache repos and hub roots
    #[command(
        long_about = "Import model directories, single files, or Hugging Face cache repos: a \
snapshot (models--ORG--NAME/snapshots/COMMIT), a repo directory models--ORG--NAME (its refs/main \
snapshot, or the one --revision names), or a hub root such as ~/.cache/huggingface/hub (every \
models--ORG--NAME in it, each as model ORG/NAME; datasets-- and spaces-- repos are skipped with a \
note). For a Hugging Face cache the revision and commit are recorded and shown by `ls`.\n\n\
Several PATHs import several models, one after another, each named from its path. Each model is \
atomic on its own: a failure leaves no trace of that model, the models before it stay imported and \
the rest are still tried; the command then lists what failed and exits non-zero.\n\n\
Every file is cut into chunks on tensor boundaries (safetensors, torch \
zip checkpoints, GGUF, ONNX) or by content-defined chunking (everything else); only chunks the store \
does not hold yet are written. The model becomes visible atomically once all its data is on disk. \
Symlinks are followed only inside the imported tree (and into a Hugging Face repo's blobs/).\n\n\
A file whose extension or magic bytes say it is a model file (.safetensors, .gguf, .onnx, GGUF \
magic, a torch zip named .bin/.pt/.pth/.ckpt or holding data.pkl) but whose header does not parse \
is almost always a broken download: the import is refused, naming the file and the reason, and \
nothing is stored. --allow-malformed stores such files by content-defined chunking instead. A \
directory without files is an error too.",
        after_help = "Examples:\n  modelfs import ./llama-3-8b --name org/llama-3-8b\n  \
modelfs import ~/.cache/huggingface/hub/models--org--name --revision v1.0\n  \
modelfs import ~/.cache/huggingface/hub\n  \
modelfs import ./bert ./gpt2 ./t5.safetensors\n  \
modelfs import ./checkpoint --allow-malformed"
    )]
    Import {
        /// Directories or files to import, each as its own model
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Model name, a relative path like `bert-base` or `org/llama-3-8b`; only with one PATH that is not a hub root [default: from PATH]
        #[arg(long)]
        name: Option<String>,
        /// Hugging Face cache revision: a branch or tag under refs/, or a snapshot commit or unique prefix of one [default: main]
        #[arg(long, value_name = "REV")]
        revision: Option<String>,
        /// Replace an existing model with the same name
        #[arg(long)]
        replace: bool,
        /// Also follow symlinks that point outside the imported tree
        #[arg(long)]
        follow_symlinks: bool,
        /// Store model files whose headers do not parse (by content-defined chunking) instead of refusing the import
        #[arg(long)]
        allow_malformed: bool,
        /// Print the summary as JSON (one object for one model, a list for several)
        #[arg(long)]
        json: bool,
    },
    /// List models, or the files of one model and how each is stored
    #[command(
        after_help = "Examples:\n  modelfs ls\n  modelfs ls org/llama-3-8b\n  modelfs ls --json"
    )]
    Ls {
        /// Show the files of this model
        name: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove models, all or none (their bytes are reclaimed by `gc`)
    #[command(
        long_about = "Remove models from the store (their bytes are reclaimed by `gc`). Every \
name is checked first and all are removed in one transaction: if any name is not a model, \
nothing is removed. A namespace (`org`, the common prefix of `org/a` and `org/b`) is removed \
with all its models only with --recursive.",
        after_help = "Examples:\n  modelfs rm org/llama-3-8b org/llama-3-8b-ft\n  \
modelfs rm org/ --recursive --dry-run\n  modelfs rm org/ --recursive --json"
    )]
    Rm {
        /// Models to remove (with --recursive also namespaces: every model under NAME/)
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Also remove namespaces: every model whose name starts with NAME/
        #[arg(long, short = 'r')]
        recursive: bool,
        /// Print what would be removed and remove nothing
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Print the removed models as JSON
        #[arg(long)]
        json: bool,
    },
    /// Rename a model (the catalog only: no bytes move; a mount shows the new name within a second)
    #[command(
        long_about = "Rename model OLD to NEW. Only the catalog changes: no bytes are copied, and a \
running mount shows the model under its new name within a second. NEW follows the import's naming \
rules and may be in another namespace (org/a to org2/a); it must not exist, and must not be inside \
or around another model's directory.",
        after_help = "Examples:\n  modelfs mv llama-3-8b org/llama-3-8b\n  \
modelfs mv org/llama-3-8b-ft org2/llama-3-8b-ft\n  modelfs mv bert-base bert-base-uncased --json"
    )]
    Mv {
        /// The model's name now
        old: String,
        /// Its new name
        new: String,
        /// Print the renamed model as JSON
        #[arg(long)]
        json: bool,
    },
    /// Reclaim disk space no model references (safe while the store is mounted)
    #[command(after_help = "Examples:\n  modelfs gc\n  modelfs gc --json")]
    Gc {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash stored files; exit 1 and name each damaged file
    #[command(
        after_help = "Examples:\n  modelfs verify\n  modelfs verify org/llama-3-8b\n  modelfs verify --json"
    )]
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
    #[command(
        after_help = "Examples:\n  modelfs upgrade\n  modelfs --store /srv/models upgrade --json"
    )]
    Upgrade {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Write a stored file to stdout, reassembled and checked against its hash
    #[command(after_help = "Examples:\n  modelfs cat org/llama-3-8b/config.json\n  \
modelfs cat org/llama-3-8b/model.safetensors > /tmp/model.safetensors")]
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
SIGTERM/SIGINT; --daemon returns once the mount is ready.",
        after_help = "Examples:\n  modelfs mount /models\n  \
modelfs mount /models --daemon --log-file /var/log/modelfs.log\n  \
modelfs mount /models --passthrough off --pin-budget 4GiB"
    )]
    Mount(MountArgs),
    /// Unmount a modelfs mount (the daemon then exits)
    #[command(after_help = "Examples:\n  modelfs umount /models\n  modelfs umount /models --lazy")]
    Umount {
        /// Mount point
        mountpoint: PathBuf,
        /// Detach even if files are open (they keep working until closed)
        #[arg(long)]
        lazy: bool,
    },
    /// Is the store mounted, in which mode, what it holds and serves
    #[command(after_help = "Examples:\n  modelfs status\n  modelfs status /models --json")]
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
Exits 3 if nothing is mounted there.",
        after_help = "Examples:\n  modelfs stats\n  modelfs stats /models --model org/llama-3-8b\n  \
modelfs stats /models --json"
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
    #[command(after_help = "Examples:\n  modelfs warm org/llama-3-8b\n  \
modelfs warm org/llama-3-8b model.safetensors --mountpoint /models --json")]
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
    #[command(
        subcommand,
        after_help = "Examples:\n  modelfs config check\n  modelfs config check /etc/modelfs/config.toml"
    )]
    Config(ConfigCommand),
    /// Install the binary, the mount helper, the systemd unit and an example configuration
    #[command(
        after_help = "Examples:\n  sudo modelfs install\n  modelfs install --prefix ~/.local"
    )]
    Install(crate::install::InstallArgs),
    /// Run a command with tensor sharing on: its mmaps of mount files map the store's objects
    #[command(
        long_about = "Run COMMAND with tensor sharing switched on. Files on a modelfs mount that \
COMMAND maps with mmap (safetensors, torch.load(mmap=True), numpy.memmap, llama.cpp, ONNX Runtime) \
get their shared bytes mapped straight from the store's objects, so tensors that several models or \
processes share occupy one set of pages. Python loaders (safetensors load_file/safe_open, \
torch.load(mmap=True), transformers) share every tensor, whatever its offset, through the modelfs \
Python package's hook.\n\nSets LD_PRELOAD (libmodelfs_preload.so, found through $MODELFS_PRELOAD, \
next to this binary, or in PREFIX/lib/modelfs) and MODELFS_SHARE=1, then runs COMMAND in this \
process. Bytes read are the same with or without it; MODELFS_SHARE=0 turns it off again. \
--print-env prints the environment instead, for systemd units and containers.",
        after_help = "Examples:\n  modelfs exec -- python serve.py --model /models/llama-ft\n  \
modelfs exec -- llama-server -m /models/qwen/q4.gguf\n  modelfs exec --print-env >> /etc/modelfs/share.env"
    )]
    Exec {
        /// Print the environment that switches sharing on (KEY=VALUE lines) and exit
        #[arg(long)]
        print_env: bool,
        /// The command and its arguments
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<OsString>,
    },
    /// Show logical vs stored bytes, the dedup ratio, and per model unique/shared bytes
    #[command(
        after_help = "Examples:\n  modelfs du\n  modelfs du org/llama-3-8b    # one model, and the models it shares bytes with\n  modelfs du org/llama-3-8b --json\n  modelfs du --matrix          # which models share bytes (place them on one node)\n  modelfs du --matrix --json"
    )]
    Du {
        /// Only this model: its usage and the bytes it shares with each other model
        #[arg(conflicts_with = "matrix")]
        name: Option<String>,
        /// For every pair of models, the bytes they share
        #[arg(long)]
        matrix: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file (default: --config, else /etc/modelfs/config.toml)
    #[command(
        after_help = "Examples:\n  modelfs config check\n  modelfs config check /etc/modelfs/config.toml"
    )]
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

/// The environment variables that stand in for global flags.
const FLAG_ENV: [&str; 2] = ["MODELFS_STORE", "MODELFS_CONFIG"];

/// Remove `MODELFS_STORE=` and `MODELFS_CONFIG=` set to nothing from the
/// environment, before parsing. clap takes an empty variable as an empty
/// value, which a path refuses, and checks it again for every subcommand
/// the global flag reaches, so one empty variable (`MODELFS_STORE=` in a
/// unit file, or `export MODELFS_STORE=$UNSET`) would fail every command,
/// even one given `--store`. Empty means unset, as for most tools. Removed,
/// not skipped, so the `--daemon` child and `modelfs exec` programs do not
/// inherit it either. Call before any thread starts.
pub fn ignore_empty_env() {
    for var in FLAG_ENV {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(var);
        }
    }
}

/// The `modelfs` arguments a helper invocation was translated into; the
/// `--daemon` child is started with these.
static HELPER_ARGS: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

/// Parse a mount(8) helper invocation (`mount.fuse.modelfs SOURCE DIR -o
/// OPTIONS`) as the `modelfs mount` command it stands for.
pub fn parse_helper_args(args: Vec<OsString>) -> Result<Cli, HelperError> {
    let canonical = modelfs_mount_helper::translate(args)?;
    let cli = Cli::try_parse_from(
        std::iter::once(OsString::from("modelfs")).chain(canonical.iter().cloned()),
    )
    .map_err(|e| HelperError::Usage(e.to_string()))?;
    let _ = HELPER_ARGS.set(canonical);
    Ok(cli)
}

/// Arguments for the `--daemon` child: the same command without `--daemon`.
pub fn args_without_daemon() -> Vec<OsString> {
    let args: Vec<OsString> = match HELPER_ARGS.get() {
        Some(c) => c.clone(),
        None => std::env::args_os().skip(1).collect(),
    };
    args.into_iter().filter(|a| a != "--daemon").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both the empty-variable case and its fix, in one test: the
    /// environment is the process's, shared by every test thread, and no
    /// other test of this crate parses a command line.
    #[test]
    fn an_empty_flag_variable_counts_as_unset() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("modelfs").chain(args.iter().copied()))
        };
        for var in FLAG_ENV {
            std::env::set_var(var, "");
            assert!(
                parse(&["--store", "/s", "ls"]).is_err(),
                "clap accepts an empty {var} now: ignore_empty_env may be unnecessary"
            );
            ignore_empty_env();
            assert_eq!(std::env::var_os(var), None);
            let cli = parse(&["--store", "/s", "ls"]).expect("parses with --store");
            assert_eq!(cli.store.as_deref(), Some(std::path::Path::new("/s")));
            let cli = parse(&["ls"]).expect("parses without --store");
            assert_eq!(cli.store, None);
            assert_eq!(cli.config, None);
        }
        // A set variable is left alone.
        std::env::set_var("MODELFS_STORE", "/from/env");
        ignore_empty_env();
        let cli = parse(&["ls"]).expect("parses");
        assert_eq!(
            cli.store.as_deref(),
            Some(std::path::Path::new("/from/env"))
        );
        std::env::remove_var("MODELFS_STORE");
    }
}
