//! Replaying a trace through a [`Policy`]: every load reads its model's
//! blocks in file order, and whatever the policy does not hold is a read from
//! disk. [`Outcome`] is what every replay, the oracle's included, counts.

use serde::Serialize;

use super::Family;
use crate::Policy;

/// Bytes and requests of one replay.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// Which policy: its [`SimPolicy::label`](super::SimPolicy::label) in
    /// a [`run`](super::run), else [`Policy::name`] (or `"oracle"`).
    pub policy: &'static str,
    /// Bytes read by all loads.
    pub accessed_bytes: u64,
    /// Bytes served from resident (pinned) blocks.
    pub hit_bytes: u64,
    /// Bytes read from disk (misses).
    pub disk_bytes: u64,
    /// Blocks read from disk (misses).
    pub disk_reads: u64,
    /// `hit_bytes / accessed_bytes`, from 0 to 1.
    pub byte_hit_ratio: f64,
    /// `disk_bytes` relative to LRU's on the same trace and budget: -0.4 is
    /// 40% fewer bytes than LRU.
    pub disk_bytes_vs_lru: f64,
}

/// Replay `order` (model indices) against `policy`. With `refs_visible`
/// false, every block is reported with one reference.
pub fn replay(
    policy: &mut dyn Policy,
    family: &Family,
    order: &[usize],
    refs_visible: bool,
) -> Outcome {
    let mut outcome = Outcome::new(policy.name());
    let mut evicted = Vec::new();
    for &model in order {
        for b in &family.models[model].blocks {
            let refs = if refs_visible {
                family.refs[&b.block]
            } else {
                1
            };
            let hit = policy.access(b.block, b.size, refs, &mut evicted).is_hit();
            outcome.count(b.size, hit);
            evicted.clear();
            assert!(policy.pinned_bytes() <= policy.budget(), "budget exceeded");
        }
    }
    outcome.finish()
}

impl Outcome {
    /// Nothing counted yet.
    pub(super) fn new(policy: &'static str) -> Self {
        Outcome {
            policy,
            accessed_bytes: 0,
            hit_bytes: 0,
            disk_bytes: 0,
            disk_reads: 0,
            byte_hit_ratio: 0.0,
            disk_bytes_vs_lru: 0.0,
        }
    }

    /// One block read, from memory (`hit`) or from disk.
    pub(super) fn count(&mut self, size: u64, hit: bool) {
        self.accessed_bytes += size;
        if hit {
            self.hit_bytes += size;
        } else {
            self.disk_bytes += size;
            self.disk_reads += 1;
        }
    }

    /// The ratios, once every read is counted.
    pub(super) fn finish(mut self) -> Self {
        self.byte_hit_ratio = self.hit_bytes as f64 / self.accessed_bytes.max(1) as f64;
        self
    }
}
