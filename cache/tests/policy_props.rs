//! Randomized checks of the contract every policy owes the mount: resident
//! bytes never exceed the budget, and the events it reports (admitted,
//! evicted, removed) are exactly what is resident, so a mount that mlocks
//! and munlocks by those events pins precisely the policy's blocks.

use std::collections::{HashMap, VecDeque};

use modelfs_cache::sim::XorShift64;
use modelfs_cache::{Access, BlockId, LruPolicy, Policy, SharedAwarePolicy, MIN_HALF_LIFE};

const KIB: u64 = 1024;

/// What the mount would have pinned, kept only from the policy's reports.
#[derive(Default)]
struct MountView {
    pinned: HashMap<BlockId, u64>,
}

fn check_random_ops(policy: &mut dyn Policy, seed: u64, ops: usize) {
    let mut rng = XorShift64::new(seed);
    let budget = policy.budget();
    // A fixed pool of blocks, each with one size for its whole life (a
    // chunk's length never changes): mostly tensor pieces, some small
    // chunks, and a few larger than the whole budget.
    let pool: Vec<(BlockId, u64)> = (0..300)
        .map(|n| {
            let size = match rng.below(10) {
                0..=5 => 64 * KIB,
                6..=8 => 1 + rng.below(16 * KIB),
                _ => 1 + rng.below(budget + budget / 4),
            };
            (BlockId::new(n % 7, n * 1_000_000), size)
        })
        .collect();
    let mut view = MountView::default();
    let mut evicted = Vec::new();
    // So the run is known to have exercised every path.
    let (mut hits, mut evictions, mut refused) = (0, 0, 0);
    for step in 0..ops {
        let (block, size) = pool[rng.below(pool.len() as u64) as usize];
        let was_resident = policy.contains(block);
        match rng.below(20) {
            0 => {
                let removed = policy.remove(block);
                assert_eq!(removed.is_some(), was_resident, "step {step}");
                if let Some(r) = removed {
                    assert_eq!(r.size, size);
                    view.pinned.remove(&r.block);
                }
            }
            1..=2 => policy.set_refs(block, rng.below(12) as u32),
            _ => {
                let refs = 1 + rng.below(12) as u32;
                let outcome = policy.access(block, size, refs, &mut evicted);
                assert_eq!(outcome.is_hit(), was_resident, "step {step}");
                hits += usize::from(outcome.is_hit());
                refused += usize::from(outcome == Access::Miss { admitted: false });
                evictions += evicted.len();
                if outcome == (Access::Miss { admitted: true }) {
                    assert!(view.pinned.insert(block, size).is_none());
                }
                if size > budget {
                    assert_eq!(outcome, Access::Miss { admitted: false });
                }
                for r in evicted.drain(..) {
                    assert_ne!(r.block, block, "step {step}: evicted the block it admitted");
                    assert_eq!(view.pinned.remove(&r.block), Some(r.size), "step {step}");
                    assert!(!policy.contains(r.block));
                }
            }
        }
        assert!(
            policy.pinned_bytes() <= budget,
            "step {step}: {} pinned, budget {budget}",
            policy.pinned_bytes()
        );
        let resident: HashMap<BlockId, u64> =
            policy.resident().map(|r| (r.block, r.size)).collect();
        assert_eq!(resident, view.pinned, "step {step}");
        assert_eq!(resident.values().sum::<u64>(), policy.pinned_bytes());
    }
    assert!(
        hits > 0 && evictions > 0 && refused > 0,
        "{hits} {evictions} {refused}"
    );
}

#[test]
fn lru_never_exceeds_budget_and_reports_every_change() {
    for seed in 0..20 {
        let budget = 256 * KIB + XorShift64::new(seed).below(2048 * KIB);
        check_random_ops(&mut LruPolicy::new(budget), seed, 3000);
    }
}

#[test]
fn shared_aware_never_exceeds_budget_and_reports_every_change() {
    for seed in 0..20 {
        let budget = 256 * KIB + XorShift64::new(seed).below(2048 * KIB);
        check_random_ops(&mut SharedAwarePolicy::new(budget), seed, 3000);
        // The shortest half-life: the clock is rebased every 64 MiB of
        // traffic, many times in a run.
        check_random_ops(
            &mut SharedAwarePolicy::with_half_life(budget, MIN_HALF_LIFE),
            seed,
            3000,
        );
    }
}

#[test]
fn zero_budget_admits_nothing() {
    for policy in [
        &mut LruPolicy::new(0) as &mut dyn Policy,
        &mut SharedAwarePolicy::new(0),
    ] {
        let mut evicted = Vec::new();
        let outcome = policy.access(BlockId::new(1, 0), 1, 3, &mut evicted);
        assert_eq!(outcome, Access::Miss { admitted: false });
        assert_eq!(policy.pinned_bytes(), 0);
    }
}

/// LRU by the book: a queue, most recent at the back, evict from the front.
struct ReferenceLru {
    budget: u64,
    queue: VecDeque<(BlockId, u64)>,
}

impl ReferenceLru {
    fn access(&mut self, block: BlockId, size: u64) -> (bool, Vec<BlockId>) {
        if let Some(i) = self.queue.iter().position(|&(b, _)| b == block) {
            let entry = self.queue.remove(i).unwrap();
            self.queue.push_back(entry);
            return (true, Vec::new());
        }
        let mut evicted = Vec::new();
        if size <= self.budget {
            while self.queue.iter().map(|e| e.1).sum::<u64>() + size > self.budget {
                evicted.push(self.queue.pop_front().unwrap().0);
            }
            self.queue.push_back((block, size));
        }
        (false, evicted)
    }
}

#[test]
fn lru_policy_behaves_as_lru() {
    for seed in 0..10 {
        let mut rng = XorShift64::new(seed);
        let sizes: Vec<u64> = (0..60).map(|_| 1 + rng.below(100)).collect();
        let mut lru = LruPolicy::new(500);
        let mut reference = ReferenceLru {
            budget: 500,
            queue: VecDeque::new(),
        };
        let mut evicted = Vec::new();
        for _ in 0..5000 {
            // Skewed, so there are hits as well as misses.
            let n = (rng.below(60) * rng.below(60) / 60) as usize;
            let block = BlockId::new(0, n as u64);
            let (hit, expected_evictions) = reference.access(block, sizes[n]);
            let outcome = lru.access(block, sizes[n], 1, &mut evicted);
            assert_eq!(outcome.is_hit(), hit);
            let got: Vec<BlockId> = evicted.drain(..).map(|r| r.block).collect();
            assert_eq!(got, expected_evictions);
        }
    }
}
