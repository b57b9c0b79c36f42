//! Running as a service: logging set-up, systemd notification, SIGHUP
//! reload, and starting the Prometheus endpoint ([`crate::metrics`]).
//!
//! Why a module of its own: these are the mount daemon's duties towards the
//! system around it (journald, systemd, the operator's configuration file),
//! as opposed to serving files, which is the fs crate's.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use modelfs_fs::{Hooks, Vfs};
use tracing::{info, warn};
use tracing_subscriber::{prelude::*, reload, EnvFilter, Registry};

use crate::config::{parse_size, FileConfig};

type FilterHandle = reload::Handle<EnvFilter, Registry>;
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Logs go to stderr: human-readable with colours on a terminal; JSON lines
/// under systemd (JOURNAL_STREAM is set), which journald stores as fields;
/// plain lines appended to `log_file` if one is given (errors that end the
/// process still go to stderr, where the caller sees them). The filter is
/// `RUST_LOG`, else `default`, and can be replaced on SIGHUP.
pub fn init_logging(default: &str, log_file: Option<&Path>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let registry = tracing_subscriber::registry().with(filter);
    if let Some(path) = log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the log file {}", path.display()))?;
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(Mutex::new(file))
                    .with_ansi(false),
            )
            .init();
    } else if under_systemd {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .init();
    }
    Ok(())
}

/// Replace the log filter (on SIGHUP), unless RUST_LOG pins it.
pub fn set_log_filter(spec: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    if let (Some(h), Ok(f)) = (FILTER.get(), EnvFilter::try_new(spec)) {
        let _ = h.reload(f);
    }
}

/// Settings that can change without unmounting.
#[derive(Debug, Default)]
pub struct Live {
    pub pin_budget: AtomicU64,
    pub reloads: AtomicU64,
    /// A pin budget given as a flag wins over the file, also on reload.
    pub pin_budget_flag: Option<u64>,
}

/// The service layer's hooks into the mount.
pub struct Service {
    pub config_path: Option<PathBuf>,
    pub store: PathBuf,
    /// The metrics endpoint, bound before mounting (a configured endpoint
    /// that cannot serve fails the start); served once ready.
    pub metrics: Mutex<Option<crate::metrics::Endpoint>>,
    pub live: Arc<Live>,
    /// Called once ready (the `--daemon` handshake).
    pub on_ready: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The running filesystem, once ready (SIGHUP changes its pin budget).
    pub vfs: OnceLock<Arc<Vfs>>,
}

fn notify(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(state) {
            warn!("sd_notify failed: {e}");
        }
    }
}

impl Hooks for Service {
    fn ready(&self, vfs: &Arc<Vfs>) {
        let _ = self.vfs.set(vfs.clone());
        if let Some(endpoint) = self.metrics.lock().expect("lock").take() {
            endpoint.serve(vfs.clone(), self.store.clone(), self.live.clone());
        }
        let tree = vfs.tree();
        let status = format!(
            "serving {}, {} logical ({})",
            crate::output::count(tree.models, "model"),
            indicatif::HumanBytes(tree.logical_bytes),
            crate::output::count(tree.files.len(), "file")
        );
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
        if let Some(f) = self.on_ready.lock().expect("lock").take() {
            f();
        }
    }

    fn reload(&self) {
        let Some(path) = &self.config_path else {
            info!("no configuration file to reload");
            return;
        };
        notify(&[sd_notify::NotifyState::Reloading]);
        match FileConfig::load(path) {
            Ok(cfg) => {
                // Precedence as at start: flag, else file, else default.
                let budget = self
                    .live
                    .pin_budget_flag
                    .or_else(|| cfg.pin_budget.as_deref().and_then(|b| parse_size(b).ok()))
                    .or_else(|| modelfs_cache::default_budget().ok());
                if let Some(b) = budget {
                    self.live.pin_budget.store(b, Ordering::Relaxed);
                    if let Some(vfs) = self.vfs.get() {
                        if vfs.pinner.budget() != b {
                            vfs.pinner.set_budget(b);
                        }
                    }
                }
                set_log_filter(cfg.log.as_deref().unwrap_or("info"));
                self.live.reloads.fetch_add(1, Ordering::Relaxed);
                info!(config = %path.display(), "configuration reloaded (pin_budget, log); other keys take effect at the next mount");
            }
            Err(e) => warn!("configuration not reloaded, keeping the current one: {e:#}"),
        }
        notify(&[sd_notify::NotifyState::Ready]);
    }

    fn stopping(&self) {
        notify(&[sd_notify::NotifyState::Stopping]);
    }
}
