//! The mount's figures as one [`MountStats`] value: what `.modelfs/stats.json`
//! shows, and what the metrics endpoint exports.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::Vfs;
use crate::stats::{ModelStats, MountStats, ServingMode};
use crate::tree::Tree;

impl Vfs {
    /// A snapshot of every counter, as `.modelfs/stats.json` shows it.
    pub fn mount_stats(&self) -> MountStats {
        let tree = self.tree();
        let s = &self.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (totals, models) = self.model_stats(&tree);
        MountStats {
            store: self.store_root.clone(),
            mode: if self.passthrough_enabled() {
                ServingMode::Passthrough
            } else {
                ServingMode::Copy
            },
            uptime_seconds: self.uptime(),
            directories: tree.dirs.len(),
            files: tree.files.len(),
            read_requests: load(&s.read_requests),
            read_bytes: load(&s.read_bytes),
            eio: load(&s.eio),
            passthrough_opens: load(&s.passthrough_opens),
            passthrough_opened_bytes: load(&s.passthrough_opened_bytes),
            copy_opens: load(&s.copy_opens),
            refreshes: load(&s.refreshes),
            imports_seen: load(&s.imports_seen),
            removals_seen: load(&s.removals_seen),
            pin_budget: self.pinner.budget(),
            pinned_bytes: load(&self.pinner.stats.pinned_bytes),
            cache_hits: load(&self.pinner.stats.hits),
            cache_misses: load(&self.pinner.stats.misses),
            prefetch_window: self.prefetch_window,
            traces_saved: load(&s.traces_saved),
            trace_replays: load(&s.trace_replays),
            trace_errors: load(&s.trace_errors),
            trace_replays_running: self.replays_running(),
            read_resident_bytes: totals.read_resident_bytes,
            read_disk_bytes: totals.read_disk_bytes,
            prefetched_bytes: totals.prefetched_bytes,
            layouts: load(&s.layouts),
            layout_bytes: load(&s.layout_bytes),
            layout_gaps: load(&s.layout_gaps),
            layout_refusals: load(&s.layout_refusals),
            models,
        }
    }

    /// The read counters summed over all contents (for metrics).
    pub fn read_totals(&self) -> ModelStats {
        let states = self.contents.lock().expect("contents lock");
        let mut totals = ModelStats::default();
        for st in states.values() {
            st.counters.add_to(&mut totals);
        }
        totals
    }

    /// Per-model figures, and the read counters summed over all contents.
    fn model_stats(&self, tree: &Tree) -> (ModelStats, Vec<ModelStats>) {
        let totals = self.read_totals();
        let pinned = self.pinner.pinned_blocks();
        let states = self.contents.lock().expect("contents lock");
        let mut models = Vec::with_capacity(tree.model_contents.len());
        for (name, ids) in &tree.model_contents {
            let mut m = ModelStats {
                name: name.clone(),
                files: ids.len(),
                ..ModelStats::default()
            };
            let mut seen = HashSet::new();
            for id in ids {
                if let Some(st) = states.get(id) {
                    st.counters.add_to(&mut m);
                }
                if pinned.is_empty() {
                    continue;
                }
                let Some(f) = tree.files.get(&crate::tree::file_ino(*id)) else {
                    continue;
                };
                for s in &f.content.segments {
                    let key = (s.object, s.object_offset);
                    if seen.insert(key) {
                        m.pinned_bytes += pinned.get(&key).copied().unwrap_or(0);
                    }
                }
            }
            models.push(m);
        }
        (totals, models)
    }
}
