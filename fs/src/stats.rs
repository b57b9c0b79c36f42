//! What the mount counts, and the one typed shape of `.modelfs/stats.json`.
//!
//! The daemon writes [`MountStats`] and the CLI (`modelfs stats`, `status`,
//! metrics) reads the same struct back, so a field renamed on one side is a
//! compile error on the other instead of a silently missing number.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters behind `.modelfs/stats.json`, updated on the request path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Copy-mode read requests served (passthrough reads never reach the
    /// daemon).
    pub read_requests: AtomicU64,
    /// Bytes returned by copy-mode reads.
    pub read_bytes: AtomicU64,
    /// Opens and reads answered with EIO: a file that could not be opened,
    /// or a chunk that failed its hash check or lies past its object's end.
    pub eio: AtomicU64,
    /// Opens served by kernel passthrough.
    pub passthrough_opens: AtomicU64,
    /// Sizes of the files opened by passthrough: the kernel reads them
    /// without the daemon, so this is the only byte count it has for them.
    pub passthrough_opened_bytes: AtomicU64,
    /// Opens served in copy mode, including those that fell back to it when
    /// the kernel refused passthrough.
    pub copy_opens: AtomicU64,
    /// Times the tree was rebuilt because the catalog changed.
    pub refreshes: AtomicU64,
    /// Models that appeared (imports) and disappeared (removals) while mounted.
    pub imports_seen: AtomicU64,
    /// Models that disappeared while mounted (a replaced model counts as
    /// one removal and one import).
    pub removals_seen: AtomicU64,
    /// Load traces written, failed to write, and replayed.
    pub traces_saved: AtomicU64,
    /// Load traces that could not be written (the reads were served anyway).
    pub trace_errors: AtomicU64,
    /// Load-trace replays started at a content's first open.
    pub trace_replays: AtomicU64,
    /// Copy-mode read latency histogram: counts per bucket of
    /// [`LATENCY_BUCKETS_US`] (the last counts everything slower).
    pub read_latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of all copy-mode read latencies in the histogram, microseconds.
    pub read_latency_sum_us: AtomicU64,
    /// Layout requests answered (docs/store-format.md §11).
    pub layouts: AtomicU64,
    /// Bytes the answered layouts' runs cover.
    pub layout_bytes: AtomicU64,
    /// Chunks left out of layouts because they failed their check.
    pub layout_gaps: AtomicU64,
    /// Layout requests refused: a descriptor not of this mount, not
    /// readable, a malformed request, a removed file.
    pub layout_refusals: AtomicU64,
}

/// Upper bounds (microseconds) of the read latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

impl Stats {
    /// Count one copy-mode read that took `micros` microseconds in the
    /// latency histogram and its sum.
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
pub(crate) struct ContentCounters {
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
    /// Name of the model (empty in the totals over all contents).
    pub name: String,
    /// Distinct contents among the model's files: identical files count once.
    pub files: usize,
    /// Bytes of this model's chunks locked in memory now.
    pub pinned_bytes: u64,
    /// Copy-mode reads of its files since the mount started (passthrough
    /// reads bypass the daemon and are not counted).
    pub read_bytes: u64,
    /// Of `read_bytes`, those whose pages were in memory when the read
    /// arrived (pinned, prefetched or still cached).
    pub read_resident_bytes: u64,
    /// Of `read_bytes`, those that had to come from disk.
    pub read_disk_bytes: u64,
    /// Bytes of its files that trace replays brought in from disk ahead of
    /// the reader.
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
    /// The name stats.json uses: `"passthrough"` or `"copy"`.
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
    /// The store directory being served, absolute.
    pub store: std::path::PathBuf,
    /// How whole-file objects are served now (passthrough turns into copy
    /// if the kernel refuses it).
    pub mode: ServingMode,
    /// Seconds since the mount started.
    pub uptime_seconds: f64,
    /// Directory inodes, the root and `.modelfs` included.
    pub directories: usize,
    /// File inodes: distinct contents over all models, since identical files
    /// share one inode.
    pub files: usize,
    /// See [`Stats::read_requests`].
    pub read_requests: u64,
    /// See [`Stats::read_bytes`].
    pub read_bytes: u64,
    /// See [`Stats::eio`].
    pub eio: u64,
    /// See [`Stats::passthrough_opens`].
    pub passthrough_opens: u64,
    /// See [`Stats::passthrough_opened_bytes`].
    pub passthrough_opened_bytes: u64,
    /// See [`Stats::copy_opens`].
    pub copy_opens: u64,
    /// See [`Stats::refreshes`].
    pub refreshes: u64,
    /// See [`Stats::imports_seen`].
    pub imports_seen: u64,
    /// See [`Stats::removals_seen`].
    pub removals_seen: u64,
    /// Bytes of chunks that may be locked in memory (0: no pinning).
    pub pin_budget: u64,
    /// Bytes of chunks locked in memory now, each chunk once.
    pub pinned_bytes: u64,
    /// See [`PinStats::hits`](crate::pin::PinStats::hits).
    pub cache_hits: u64,
    /// See [`PinStats::misses`](crate::pin::PinStats::misses).
    pub cache_misses: u64,
    /// Bytes a trace replay may run ahead of the reader (0: no replay).
    pub prefetch_window: u64,
    /// See [`Stats::traces_saved`].
    pub traces_saved: u64,
    /// See [`Stats::trace_replays`].
    pub trace_replays: u64,
    /// See [`Stats::trace_errors`].
    pub trace_errors: u64,
    /// Trace replays in progress when the snapshot was taken.
    pub trace_replays_running: usize,
    /// Copy-mode read bytes over all contents, by where they came from.
    pub read_resident_bytes: u64,
    /// Copy-mode read bytes over all contents that had to come from disk.
    pub read_disk_bytes: u64,
    /// Bytes trace replays brought in from disk ahead of readers, over all
    /// contents.
    pub prefetched_bytes: u64,
    /// See [`Stats::layouts`].
    #[serde(default)]
    pub layouts: u64,
    /// See [`Stats::layout_bytes`].
    #[serde(default)]
    pub layout_bytes: u64,
    /// See [`Stats::layout_gaps`].
    #[serde(default)]
    pub layout_gaps: u64,
    /// See [`Stats::layout_refusals`].
    #[serde(default)]
    pub layout_refusals: u64,
    /// One line per model, ordered by name.
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
