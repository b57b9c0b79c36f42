//! What the mount counts, and the one typed shape of `.modelfs/stats.json`.
//!
//! The daemon writes [`MountStats`] and the CLI (`modelfs stats`, `status`,
//! metrics) reads the same struct back, so a field renamed on one side is a
//! compile error on the other instead of a silently missing number.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters behind `.modelfs/stats.json`, updated on the request path.
#[derive(Debug, Default)]
pub struct Stats {
    pub read_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub eio: AtomicU64,
    pub passthrough_opens: AtomicU64,
    /// Sizes of the files opened by passthrough: the kernel reads them
    /// without the daemon, so this is the only byte count it has for them.
    pub passthrough_opened_bytes: AtomicU64,
    pub copy_opens: AtomicU64,
    pub refreshes: AtomicU64,
    /// Models that appeared (imports) and disappeared (removals) while mounted.
    pub imports_seen: AtomicU64,
    pub removals_seen: AtomicU64,
    /// Load traces written, failed to write, and replayed.
    pub traces_saved: AtomicU64,
    pub trace_errors: AtomicU64,
    pub trace_replays: AtomicU64,
    /// Copy-mode read latency histogram: counts per bucket of
    /// [`LATENCY_BUCKETS_US`] (the last counts everything slower).
    pub read_latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub read_latency_sum_us: AtomicU64,
}

/// Upper bounds (microseconds) of the read latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

impl Stats {
    pub fn record_read_latency(&self, micros: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.read_latency[i].fetch_add(1, Ordering::Relaxed);
        self.read_latency_sum_us
            .fetch_add(micros, Ordering::Relaxed);
    }
}

/// Byte counts of one content's copy-mode reads, for per-model stats.
#[derive(Debug, Default)]
pub struct ContentCounters {
    pub read_bytes: AtomicU64,
    /// Bytes whose pages were in memory when the read arrived (pinned,
    /// prefetched or still cached) vs bytes that had to come from disk.
    pub read_resident_bytes: AtomicU64,
    pub read_disk_bytes: AtomicU64,
    /// Bytes a trace replay brought in from disk ahead of the reader.
    pub prefetched_bytes: AtomicU64,
}

impl ContentCounters {
    /// Add these counters to a model's (or the mount's) line.
    pub(crate) fn add_to(&self, m: &mut ModelStats) {
        m.read_bytes += self.read_bytes.load(Ordering::Relaxed);
        m.read_resident_bytes += self.read_resident_bytes.load(Ordering::Relaxed);
        m.read_disk_bytes += self.read_disk_bytes.load(Ordering::Relaxed);
        m.prefetched_bytes += self.prefetched_bytes.load(Ordering::Relaxed);
    }
}

/// One model's line in stats.json. A content shared by several models
/// (identical files) counts in each of them, like a chunk shared by several
/// models counts in each one's `pinned_bytes`.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelStats {
    pub name: String,
    pub files: usize,
    /// Bytes of this model's chunks locked in memory now.
    pub pinned_bytes: u64,
    /// Copy-mode reads of its files since the mount started (passthrough
    /// reads bypass the daemon and are not counted).
    pub read_bytes: u64,
    pub read_resident_bytes: u64,
    pub read_disk_bytes: u64,
    pub prefetched_bytes: u64,
}

/// How the mount serves files that have a whole-file object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServingMode {
    /// Whole-file objects by kernel passthrough, recipes in copy mode.
    Passthrough,
    /// Every file in copy mode.
    Copy,
}

impl ServingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServingMode::Passthrough => "passthrough",
            ServingMode::Copy => "copy",
        }
    }
}

/// The contents of `.modelfs/stats.json`: a snapshot of the mount's counters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MountStats {
    pub store: std::path::PathBuf,
    pub mode: ServingMode,
    pub uptime_seconds: f64,
    pub directories: usize,
    pub files: usize,
    pub read_requests: u64,
    pub read_bytes: u64,
    pub eio: u64,
    pub passthrough_opens: u64,
    pub passthrough_opened_bytes: u64,
    pub copy_opens: u64,
    pub refreshes: u64,
    pub imports_seen: u64,
    pub removals_seen: u64,
    pub pin_budget: u64,
    pub pinned_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub prefetch_window: u64,
    pub traces_saved: u64,
    pub trace_replays: u64,
    pub trace_errors: u64,
    pub trace_replays_running: usize,
    /// Copy-mode read bytes over all contents, by where they came from.
    pub read_resident_bytes: u64,
    pub read_disk_bytes: u64,
    pub prefetched_bytes: u64,
    pub models: Vec<ModelStats>,
}

impl MountStats {
    /// The JSON text of stats.json (pretty, newline-terminated).
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("stats serialize");
        text.push('\n');
        text
    }
}
