//! The mount's Prometheus endpoint: `/metrics` over HTTP, in the Prometheus
//! text format (version 0.0.4).
//!
//! Why it is built this way: every value already lives in the filesystem's
//! own counters (the ones stats.json reports too), so the metrics are one
//! prometheus-client [`Collector`] that reads them at scrape time instead of
//! a second set of counters kept in step. prometheus-client writes the
//! exposition (names, `_total` suffixes, label escaping, histogram buckets);
//! tiny_http serves it on a thread of its own, away from the FUSE workers.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use modelfs_fs::stats::LATENCY_BUCKETS_US;
use modelfs_fs::Vfs;
use modelfs_store::{Store, Usage};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::service::Live;

/// A bound metrics address, not yet answering.
///
/// Only the socket exists until [`Endpoint::serve`]: tiny_http starts its
/// accept thread when the server is built, and a thread started before the
/// mount blocks its signals would take SIGHUP or SIGTERM with the default
/// action (the process would die instead of reloading or unmounting).
pub struct Endpoint {
    addr: SocketAddr,
    listener: std::net::TcpListener,
}

impl Endpoint {
    /// Bind `addr`. Monitoring relies on a configured endpoint, so one that
    /// cannot be bound is an error that ends the start, not a warning.
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Endpoint> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot serve metrics at {addr}: {e}; free the port or set another `metrics` address"
            )
        })?;
        Ok(Endpoint { addr, listener })
    }

    /// Answer `/metrics` until the process exits.
    pub fn serve(self, vfs: Arc<Vfs>, store_root: PathBuf, live: Arc<Live>) {
        let addr = self.addr;
        let server = match tiny_http::Server::from_listener(self.listener, None) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%addr, "cannot serve metrics: {e}");
                return;
            }
        };
        info!(%addr, "serving Prometheus metrics at /metrics");
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || respond(server, &registry(vfs, &store_root, live)))
            .expect("spawn metrics thread");
    }
}

/// The registry a scrape encodes: the mount's collector.
fn registry(vfs: Arc<Vfs>, store_root: &std::path::Path, live: Arc<Live>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MountMetrics {
        vfs,
        live,
        usage: Mutex::new(UsageCache {
            store: Store::open(store_root).ok(),
            version: i64::MIN,
            usage: None,
        }),
    }));
    registry
}

fn respond(server: tiny_http::Server, registry: &Registry) {
    let content_type =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], prometheus_text::CONTENT_TYPE)
            .expect("static header");
    for req in server.incoming_requests() {
        if req.url() != "/metrics" {
            let _ = req
                .respond(tiny_http::Response::from_string("see /metrics\n").with_status_code(404));
            continue;
        }
        let mut body = String::new();
        let response = match prometheus_text::encode(&mut body, registry) {
            Ok(()) => tiny_http::Response::from_string(body).with_header(content_type.clone()),
            Err(_) => tiny_http::Response::from_string("cannot encode the metrics\n")
                .with_status_code(500),
        };
        let _ = req.respond(response);
    }
}

/// Per-model byte counts are costly (a pass over all recipes), so they are
/// recomputed only when the catalog changed since the last scrape.
struct UsageCache {
    /// `None` if the store could not be opened: no usage metrics then.
    store: Option<Store>,
    version: i64,
    usage: Option<Usage>,
}

impl UsageCache {
    fn current(&mut self) -> Option<&Usage> {
        if let Some(store) = &self.store {
            if let Ok(v) = store.data_version() {
                if v != self.version || self.usage.is_none() {
                    self.usage = store.usage().ok();
                    self.version = v;
                }
            }
        }
        self.usage.as_ref()
    }
}

/// All of the mount's metrics, read at scrape time.
struct MountMetrics {
    vfs: Arc<Vfs>,
    live: Arc<Live>,
    usage: Mutex<UsageCache>,
}

impl fmt::Debug for MountMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountMetrics").finish_non_exhaustive()
    }
}

// Counters are named without `_total`: the encoder appends it.

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// One metric family with a series per value of `label`.
fn labelled(
    e: &mut DescriptorEncoder,
    kind: MetricType,
    name: &str,
    help: &str,
    label: &str,
    series: &[(&str, u64)],
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for &(value, v) in series {
        let labels = [(label, value)];
        let m = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(m)?,
            _ => ConstGauge::new(v).encode(m)?,
        }
    }
    Ok(())
}

impl Collector for MountMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let (vfs, live, s) = (&self.vfs, &self.live, &self.vfs.stats);
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let e = &mut e;
        gauge(e, "modelfs_up", "1 while the mount is serving.", 1u64)?;
        gauge(
            e,
            "modelfs_uptime_seconds",
            "Seconds since the mount started.",
            vfs.uptime(),
        )?;
        gauge(
            e,
            "modelfs_passthrough_enabled",
            "1 if whole-file objects are served by kernel passthrough.",
            u64::from(vfs.passthrough_enabled()),
        )?;
        labelled(
            e,
            MetricType::Counter,
            "modelfs_read_bytes",
            "Bytes served by the daemon (copy mode). Passthrough reads bypass the daemon; see modelfs_passthrough_opened_bytes_total.",
            "mode",
            &[("copy", g(&s.read_bytes))],
        )?;
        counter(
            e,
            "modelfs_read_requests",
            "FUSE READ requests served (copy mode).",
            g(&s.read_requests),
        )?;
        labelled(
            e,
            MetricType::Counter,
            "modelfs_opens",
            "File opens by serving mode.",
            "mode",
            &[
                ("passthrough", g(&s.passthrough_opens)),
                ("copy", g(&s.copy_opens)),
            ],
        )?;
        counter(
            e,
            "modelfs_passthrough_opened_bytes",
            "Sum of the sizes of files opened by passthrough.",
            g(&s.passthrough_opened_bytes),
        )?;
        counter(
            e,
            "modelfs_verification_failures",
            "Reads that returned EIO because a chunk did not match its hash.",
            g(&s.eio),
        )?;
        counter(
            e,
            "modelfs_catalog_refreshes",
            "Times the tree was rebuilt after an import or removal.",
            g(&s.refreshes),
        )?;
        counter(
            e,
            "modelfs_imports",
            "Models imported (or replaced) while mounted, as seen by the mount.",
            g(&s.imports_seen),
        )?;
        counter(
            e,
            "modelfs_removals",
            "Models removed while mounted, as seen by the mount.",
            g(&s.removals_seen),
        )?;
        gauge(
            e,
            "modelfs_pin_budget_bytes",
            "Memory budget for pinning shared chunks.",
            g(&live.pin_budget),
        )?;
        gauge(
            e,
            "modelfs_pinned_bytes",
            "Bytes of shared chunks currently locked in memory.",
            g(&vfs.pinner.stats.pinned_bytes),
        )?;
        counter(
            e,
            "modelfs_cache_hits",
            "Chunk reads the pinning policy found pinned.",
            g(&vfs.pinner.stats.hits),
        )?;
        counter(
            e,
            "modelfs_cache_misses",
            "Chunk reads the pinning policy did not find pinned.",
            g(&vfs.pinner.stats.misses),
        )?;
        let totals = vfs.read_totals();
        labelled(
            e,
            MetricType::Counter,
            "modelfs_read_source_bytes",
            "Copy-mode bytes served from pages already in memory (pinned, prefetched or cached) vs read from disk.",
            "source",
            &[
                ("memory", totals.read_resident_bytes),
                ("disk", totals.read_disk_bytes),
            ],
        )?;
        counter(
            e,
            "modelfs_prefetched_bytes",
            "Bytes brought in from disk ahead of loaders by load-trace replay.",
            totals.prefetched_bytes,
        )?;
        labelled(
            e,
            MetricType::Counter,
            "modelfs_load_traces",
            "Load traces saved, replayed, and failed to save.",
            "event",
            &[
                ("saved", g(&s.traces_saved)),
                ("replayed", g(&s.trace_replays)),
                ("failed", g(&s.trace_errors)),
            ],
        )?;
        labelled(
            e,
            MetricType::Counter,
            "modelfs_layouts",
            "Layout requests of the sharing protocol: answered, refused (access or descriptor checks).",
            "outcome",
            &[
                ("answered", g(&s.layouts)),
                ("refused", g(&s.layout_refusals)),
            ],
        )?;
        counter(
            e,
            "modelfs_layout_bytes",
            "File bytes covered by the runs of answered layouts (mapped from store objects).",
            g(&s.layout_bytes),
        )?;
        counter(
            e,
            "modelfs_layout_gaps",
            "Chunks left out of layouts because they failed verification.",
            g(&s.layout_gaps),
        )?;
        counter(
            e,
            "modelfs_config_reloads",
            "Successful configuration reloads (SIGHUP).",
            g(&live.reloads),
        )?;

        // Bucket counts as the fs crate keeps them (not cumulative; the
        // encoder sums them); the last one counts everything slower.
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_US
            .iter()
            .enumerate()
            .map(|(i, &bound)| (bound as f64 / 1e6, g(&s.read_latency[i])))
            .collect();
        let count = buckets.iter().map(|&(_, n)| n).sum::<u64>()
            + g(&s.read_latency[LATENCY_BUCKETS_US.len()]);
        e.encode_descriptor(
            "modelfs_read_latency_seconds",
            "Daemon read latency (copy mode).",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            g(&s.read_latency_sum_us) as f64 / 1e6,
            count,
            &buckets,
            None,
        )?;

        let mut cache = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let Some(u) = cache.current() else {
            return Ok(());
        };
        gauge(e, "modelfs_models", "Models in the store.", u.models.len())?;
        gauge(
            e,
            "modelfs_logical_bytes",
            "Sum of all models' file sizes.",
            u.logical_bytes,
        )?;
        gauge(
            e,
            "modelfs_stored_bytes",
            "Disk space of referenced store objects.",
            u.stored_bytes,
        )?;
        type Pick = fn(&modelfs_store::ModelUsage) -> u64;
        let per_model: [(&str, &str, Pick); 3] = [
            (
                "modelfs_model_logical_bytes",
                "A model's file sizes summed.",
                |m| m.logical_bytes,
            ),
            (
                "modelfs_model_unique_bytes",
                "Bytes of chunks only this model references.",
                |m| m.unique_bytes,
            ),
            (
                "modelfs_model_shared_bytes",
                "Bytes of chunks this model shares with others.",
                |m| m.shared_bytes,
            ),
        ];
        for (name, help, pick) in per_model {
            let series: Vec<(&str, u64)> = u
                .models
                .iter()
                .map(|m| (m.name.as_str(), pick(m)))
                .collect();
            labelled(e, MetricType::Gauge, name, help, "model", &series)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helpers' exposition, as a 0.0.4 scraper reads it: counters are
    /// declared and sampled under their `_total` name, label values are
    /// escaped, and there is no OpenMetrics `# EOF`.
    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
            let e = &mut e;
            gauge(e, "x_up", "Up.", 1u64)?;
            counter(e, "x_reads", "Reads.", 7)?;
            labelled(
                e,
                MetricType::Counter,
                "x_opens",
                "Opens.",
                "mode",
                &[("copy", 2), ("passthrough", 3)],
            )?;
            labelled(
                e,
                MetricType::Gauge,
                "x_model_bytes",
                "Bytes.",
                "model",
                &[("a\"b", 5)],
            )
        }
    }

    #[test]
    fn exposition_keeps_the_names_scrapers_know() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).unwrap();
        assert_eq!(
            text,
            "# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_reads_total Reads.\n# TYPE x_reads_total counter\nx_reads_total 7\n\
             # HELP x_opens_total Opens.\n# TYPE x_opens_total counter\n\
             x_opens_total{mode=\"copy\"} 2\nx_opens_total{mode=\"passthrough\"} 3\n\
             # HELP x_model_bytes Bytes.\n# TYPE x_model_bytes gauge\n\
             x_model_bytes{model=\"a\\\"b\"} 5\n"
        );
    }
}
