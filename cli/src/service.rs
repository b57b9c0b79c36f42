//! Running as a service: logging set-up, systemd notification, SIGHUP
//! reload, and the Prometheus metrics endpoint.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use modelfs_fs::stats::LATENCY_BUCKETS_US;
use modelfs_fs::{Hooks, Vfs};
use modelfs_store::{Store, Usage};
use tracing::{info, warn};
use tracing_subscriber::{prelude::*, reload, EnvFilter, Registry};

use crate::config::{parse_size, FileConfig};

type FilterHandle = reload::Handle<EnvFilter, Registry>;
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Logs go to stderr: human-readable with colours on a terminal; JSON lines
/// under systemd (JOURNAL_STREAM is set), which journald stores as fields.
/// The filter is `RUST_LOG`, else `default`, and can be replaced on SIGHUP.
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let registry = tracing_subscriber::registry().with(filter);
    if under_systemd {
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
    pub metrics: Option<std::net::SocketAddr>,
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
        if let Some(addr) = self.metrics {
            match tiny_http::Server::http(addr) {
                Ok(server) => {
                    info!(%addr, "serving Prometheus metrics at /metrics");
                    let (vfs, store, live) = (vfs.clone(), self.store.clone(), self.live.clone());
                    std::thread::Builder::new()
                        .name("metrics".into())
                        .spawn(move || serve_metrics(server, vfs, store, live))
                        .expect("spawn metrics thread");
                }
                Err(e) => warn!(%addr, "cannot serve metrics: {e}"),
            }
        }
        let tree = vfs.tree();
        let status = format!(
            "serving {} models, {} logical ({} files)",
            tree.models,
            indicatif::HumanBytes(tree.logical_bytes),
            tree.files.len()
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
                    .or_else(|| parse_size(crate::commands::mount::DEFAULT_PIN_BUDGET).ok());
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

/// Per-model byte counts are costly (a pass over all recipes), so they are
/// recomputed only when the catalog changed since the last scrape.
struct UsageCache {
    version: i64,
    usage: Option<Usage>,
}

fn serve_metrics(server: tiny_http::Server, vfs: Arc<Vfs>, store_root: PathBuf, live: Arc<Live>) {
    let mut cache = UsageCache {
        version: i64::MIN,
        usage: None,
    };
    let store = Store::open(&store_root).ok();
    for req in server.incoming_requests() {
        if req.url() != "/metrics" {
            let _ = req
                .respond(tiny_http::Response::from_string("see /metrics\n").with_status_code(404));
            continue;
        }
        if let Some(store) = &store {
            if let Ok(v) = store.data_version() {
                if v != cache.version || cache.usage.is_none() {
                    cache.usage = store.usage().ok();
                    cache.version = v;
                }
            }
        }
        let body = render_metrics(&vfs, cache.usage.as_ref(), &live);
        let header =
            tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4"[..])
                .expect("static header");
        let _ = req.respond(tiny_http::Response::from_string(body).with_header(header));
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format, written directly: every value is read
/// at scrape time from the filesystem's own counters.
pub fn render_metrics(vfs: &Vfs, usage: Option<&Usage>, live: &Live) -> String {
    let s = &vfs.stats;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
    metric(
        "modelfs_up",
        "gauge",
        "1 while the mount is serving.",
        &one(1),
    );
    metric(
        "modelfs_uptime_seconds",
        "gauge",
        "Seconds since the mount started.",
        &[(String::new(), vfs.uptime())],
    );
    metric(
        "modelfs_passthrough_enabled",
        "gauge",
        "1 if whole-file objects are served by kernel passthrough.",
        &one(vfs.passthrough_enabled() as u64),
    );
    metric(
        "modelfs_read_bytes_total",
        "counter",
        "Bytes served by the daemon (copy mode). Passthrough reads bypass the daemon; see modelfs_passthrough_opened_bytes_total.",
        &[("{mode=\"copy\"}".into(), g(&s.read_bytes) as f64)],
    );
    metric(
        "modelfs_read_requests_total",
        "counter",
        "FUSE READ requests served (copy mode).",
        &one(g(&s.read_requests)),
    );
    metric(
        "modelfs_opens_total",
        "counter",
        "File opens by serving mode.",
        &[
            (
                "{mode=\"passthrough\"}".into(),
                g(&s.passthrough_opens) as f64,
            ),
            ("{mode=\"copy\"}".into(), g(&s.copy_opens) as f64),
        ],
    );
    metric(
        "modelfs_passthrough_opened_bytes_total",
        "counter",
        "Sum of the sizes of files opened by passthrough.",
        &one(g(&s.passthrough_opened_bytes)),
    );
    metric(
        "modelfs_verification_failures_total",
        "counter",
        "Reads that returned EIO because a chunk did not match its hash.",
        &one(g(&s.eio)),
    );
    metric(
        "modelfs_catalog_refreshes_total",
        "counter",
        "Times the tree was rebuilt after an import or removal.",
        &one(g(&s.refreshes)),
    );
    metric(
        "modelfs_imports_total",
        "counter",
        "Models imported (or replaced) while mounted, as seen by the mount.",
        &one(g(&s.imports_seen)),
    );
    metric(
        "modelfs_removals_total",
        "counter",
        "Models removed while mounted, as seen by the mount.",
        &one(g(&s.removals_seen)),
    );
    metric(
        "modelfs_pin_budget_bytes",
        "gauge",
        "Memory budget for pinning shared chunks.",
        &one(live.pin_budget.load(Ordering::Relaxed)),
    );
    metric(
        "modelfs_pinned_bytes",
        "gauge",
        "Bytes of shared chunks currently locked in memory.",
        &one(g(&vfs.pinner.stats.pinned_bytes)),
    );
    metric(
        "modelfs_cache_hits_total",
        "counter",
        "Chunk reads the pinning policy found pinned.",
        &one(g(&vfs.pinner.stats.hits)),
    );
    metric(
        "modelfs_cache_misses_total",
        "counter",
        "Chunk reads the pinning policy did not find pinned.",
        &one(g(&vfs.pinner.stats.misses)),
    );
    let totals = vfs.read_totals();
    metric(
        "modelfs_read_source_bytes_total",
        "counter",
        "Copy-mode bytes served from pages already in memory (pinned, prefetched or cached) vs read from disk.",
        &[
            (
                "{source=\"memory\"}".into(),
                totals.read_resident_bytes as f64,
            ),
            ("{source=\"disk\"}".into(), totals.read_disk_bytes as f64),
        ],
    );
    metric(
        "modelfs_prefetched_bytes_total",
        "counter",
        "Bytes brought in from disk ahead of loaders by load-trace replay.",
        &one(totals.prefetched_bytes),
    );
    metric(
        "modelfs_load_traces_total",
        "counter",
        "Load traces saved, replayed, and failed to save.",
        &[
            ("{event=\"saved\"}".into(), g(&s.traces_saved) as f64),
            ("{event=\"replayed\"}".into(), g(&s.trace_replays) as f64),
            ("{event=\"failed\"}".into(), g(&s.trace_errors) as f64),
        ],
    );
    metric(
        "modelfs_config_reloads_total",
        "counter",
        "Successful configuration reloads (SIGHUP).",
        &one(live.reloads.load(Ordering::Relaxed)),
    );

    let _ = writeln!(
        o,
        "# HELP modelfs_read_latency_seconds Daemon read latency (copy mode).\n# TYPE modelfs_read_latency_seconds histogram"
    );
    let mut cumulative = 0u64;
    for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += g(&s.read_latency[i]);
        let _ = writeln!(
            o,
            "modelfs_read_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += g(&s.read_latency[LATENCY_BUCKETS_US.len()]);
    let _ = writeln!(
        o,
        "modelfs_read_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        o,
        "modelfs_read_latency_seconds_sum {}",
        g(&s.read_latency_sum_us) as f64 / 1e6
    );
    let _ = writeln!(o, "modelfs_read_latency_seconds_count {cumulative}");

    if let Some(u) = usage {
        let _ = writeln!(o, "# HELP modelfs_models Models in the store.\n# TYPE modelfs_models gauge\nmodelfs_models {}", u.models.len());
        let _ = writeln!(o, "# HELP modelfs_logical_bytes Sum of all models' file sizes.\n# TYPE modelfs_logical_bytes gauge\nmodelfs_logical_bytes {}", u.logical_bytes);
        let _ = writeln!(o, "# HELP modelfs_stored_bytes Disk space of referenced store objects.\n# TYPE modelfs_stored_bytes gauge\nmodelfs_stored_bytes {}", u.stored_bytes);
        for (name, help, pick) in [
            (
                "modelfs_model_logical_bytes",
                "A model's file sizes summed.",
                0,
            ),
            (
                "modelfs_model_unique_bytes",
                "Bytes of chunks only this model references.",
                1,
            ),
            (
                "modelfs_model_shared_bytes",
                "Bytes of chunks this model shares with others.",
                2,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            for m in &u.models {
                let v = [m.logical_bytes, m.unique_bytes, m.shared_bytes][pick];
                let _ = writeln!(o, "{name}{{model=\"{}\"}} {v}", label(&m.name));
            }
        }
    }
    o
}
