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
//!
//! Where things are: [`args`] defines the command line, [`commands`] runs
//! each command, [`output`] prints every result, [`service`] and [`metrics`]
//! are the daemon's service duties, [`config`] the configuration file. This
//! file is only the entry point: which program we were invoked as, the log
//! level, and how an error ends the process.

mod args;
mod commands;
mod config;
mod install;
mod metrics;
mod output;
mod service;

use std::io;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use modelfs_mount_helper::HelperError;

use args::{Cli, Command};

/// How a write to a closed pipe or socket ends: the process (`SIG_DFL`), or
/// only the write, with EPIPE (`SIG_IGN`, Rust's default).
fn set_sigpipe(action: libc::sighandler_t) {
    // SAFETY: both actions are valid dispositions for SIGPIPE and no handler
    // function is installed; it runs before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, action);
    }
}

fn main() -> ExitCode {
    // A command whose reader went away (`modelfs du | head -1`) ends quietly
    // as every Unix tool does: by SIGPIPE, not by EPIPE turned into a panic
    // in println! or an error in a JSON writer. Set before parsing, so
    // `--help | head` is covered too.
    set_sigpipe(libc::SIG_DFL);
    args::ignore_empty_env();
    // Invoked by mount(8) as mount.fuse.modelfs (or mount.modelfs)?
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let program = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let is_helper = program.starts_with("mount.");
    let cli = if is_helper {
        match args::parse_helper_args(std::env::args_os().skip(1).collect()) {
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
    // The mount daemon writes to the FUSE device, to metrics and layout
    // clients and to its parent's pipe, any of which may go away: that must
    // fail a write, never kill the mount.
    if matches!(cli.command, Command::Mount(_)) {
        set_sigpipe(libc::SIG_IGN);
    }
    // A `--daemon` child logs to the caller's terminal until it is ready:
    // keep that to warnings unless the log goes to a file.
    let default_log = match &cli.command {
        Command::Mount(m)
            if m.log_file.is_none() && std::env::var_os(commands::mount::READY_ENV).is_some() =>
        {
            "warn"
        }
        Command::Mount(m) if m.daemon => "warn",
        Command::Mount(_) => "info",
        _ => "warn",
    };
    // A daemon's --log-file holds its whole log, startup included.
    let log_file = match &cli.command {
        Command::Mount(m) if !m.daemon => m.log_file.as_deref(),
        _ => None,
    };
    if let Err(e) = service::init_logging(default_log, log_file) {
        eprintln!("modelfs: error: {e:#}");
        return ExitCode::from(1);
    }
    match commands::run(cli) {
        Ok(code) => code,
        Err(commands::Failure { error, hint }) => {
            // A reader that went away (`modelfs cat ... | head`) is not a failure.
            if error
                .downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("modelfs: error: {error:#}");
            if let Some(hint) = hint {
                eprintln!("modelfs: hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
