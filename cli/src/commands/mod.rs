//! The commands, one module per command or group of commands, and the
//! dispatch from a parsed command line to them.
//!
//! Why this split: each command's logic (what it asks the store or the mount,
//! which exit code it returns) reads on its own, without the argument
//! definitions ([`crate::args`]) or the rendering of its results
//! ([`crate::output`]). This module also resolves what every command shares:
//! the configuration file and the store directory.

pub mod exec;
mod hint;
pub mod import;
pub mod locate;
pub mod mount;
pub mod stats;
pub mod store_cmds;
pub mod warm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use modelfs_store::default_store_dir;

use crate::args::{Cli, Command, ConfigCommand};
use crate::{config, install, output};

/// A command that failed: the error, and what to do about it when the
/// error alone does not say (a store the user may not write, say).
pub struct Failure {
    /// What went wrong, with its causes.
    pub error: anyhow::Error,
    /// Advice, for the line after the error.
    pub hint: Option<String>,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { error, hint: None }
    }
}

/// Run the command; its exit code, or the failure to report.
pub fn run(cli: Cli) -> Result<ExitCode, Failure> {
    if let Command::Config(ConfigCommand::Check { file }) = &cli.command {
        let path = file
            .clone()
            .or_else(|| cli.config.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
        return Ok(config_check(path)?);
    }
    // Needs neither the store nor the configuration.
    if let Command::Exec { print_env, command } = &cli.command {
        return Ok(exec::exec(command, *print_env)?);
    }
    let (config_path, file_cfg) = config::FileConfig::discover(cli.config.as_deref())?;
    let dir = cli
        .store
        .clone()
        .or_else(|| file_cfg.store.clone())
        .unwrap_or_else(default_store_dir);
    run_with_store(cli.command, &dir, config_path, &file_cfg).map_err(|error| Failure {
        hint: hint::store_access(&error, &dir),
        error,
    })
}

/// The commands that work on (or may create) the store at `dir`.
fn run_with_store(
    command: Command,
    dir: &Path,
    config_path: Option<PathBuf>,
    file_cfg: &config::FileConfig,
) -> Result<ExitCode> {
    let dir = dir.to_path_buf();
    let configured_mountpoint = || file_cfg.mountpoint.clone();
    match command {
        Command::Config(_) => unreachable!("handled above"),
        Command::Install(args) => install::run(&args)?,
        Command::Exec { .. } => unreachable!("handled above"),
        Command::Warm {
            name,
            paths,
            mountpoint,
            json,
        } => {
            let named = mountpoint.is_some();
            let mnt = locate::mount_point(&dir, mountpoint.or_else(configured_mountpoint));
            // A configured mount point that is not mounted means "not
            // mounted" (warm from the store); a named one is a mistake.
            let mnt = match mnt {
                Err(e) if named => return Err(e),
                Err(_) => None,
                Ok(m) => m,
            };
            warm::warm(&dir, &name, &paths, mnt, json)?
        }
        Command::Stats {
            mountpoint,
            model,
            json,
        } => {
            let mnt = mountpoint.or_else(configured_mountpoint);
            return match locate::mount_point(&dir, mnt.clone()) {
                Ok(Some(found)) => stats::stats(&found, model.as_deref(), json),
                Ok(None) => stats::not_mounted(&locate::not_mounted_message(&dir)),
                Err(e) => stats::not_mounted(&format!("{e:#}")),
            };
        }
        Command::Status { mountpoint, json } => {
            let mnt = mountpoint.or_else(configured_mountpoint);
            let found = locate::mount_point(&dir, mnt.clone()).unwrap_or(None);
            return stats::status(&dir, found.as_deref().or(mnt.as_deref()), json);
        }
        Command::Init => store_cmds::init(&dir)?,
        Command::Import {
            paths,
            name,
            revision,
            replace,
            follow_symlinks,
            allow_malformed,
            json,
        } => import::import(
            &dir,
            &paths,
            name,
            import::Flags {
                replace,
                follow_symlinks,
                allow_malformed,
                revision,
            },
            json,
        )?,
        Command::Ls { name, json } => store_cmds::ls(&dir, name.as_deref(), json)?,
        Command::Rm {
            names,
            recursive,
            dry_run,
            json,
        } => store_cmds::rm(&dir, &names, recursive, dry_run, json)?,
        Command::Gc { json } => store_cmds::gc(&dir, json)?,
        Command::Verify { name, json } => return store_cmds::verify(&dir, name.as_deref(), json),
        Command::Upgrade { json } => store_cmds::upgrade(&dir, json)?,
        Command::Cat { file } => store_cmds::cat(&dir, &file)?,
        Command::Mount(args) => return mount::mount(dir, args, config_path, file_cfg),
        Command::Umount { mountpoint, lazy } => mount::umount(&mountpoint, lazy)?,
        Command::Du { name, matrix, json } => store_cmds::du(&dir, name.as_deref(), matrix, json)?,
        Command::Mv { old, new, json } => store_cmds::mv(&dir, &old, &new, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `modelfs config check`: load and validate the file (errors name the key).
fn config_check(path: PathBuf) -> Result<ExitCode> {
    let cfg = config::FileConfig::load(&path)?;
    let budget = match &cfg.pin_budget {
        Some(b) => Some((b.as_str(), config::parse_size(b)?)),
        None => None,
    };
    output::config_ok(&path, budget);
    Ok(ExitCode::SUCCESS)
}
