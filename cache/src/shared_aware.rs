//! The cost model: a block's value is its reference count times its decayed
//! access frequency times the cost of missing it per byte kept (formula and
//! reasoning in the crate documentation).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use crate::{Access, BlockId, Policy, Resident};

/// The fixed part of a miss's cost, in bytes of transfer it is worth: one
/// disk request's latency (~100 µs) at ~1.3 GB/s. It makes small blocks worth
/// more per byte (their miss is mostly latency) while blocks of 1 MiB and up
/// are valued almost purely by bytes.
pub const MISS_OVERHEAD_BYTES: u64 = 128 * 1024;

/// The default half-life of an access, in budgets' worth of traffic: an
/// access counts half as much once four times the budget has been read
/// through the cache since. Long enough that reads over several model loads
/// are remembered (a model's popularity is a long-run property), short
/// enough that blocks of a family nobody loads any more give way after a
/// few half-lives of other traffic. On the simulator's traces, which never
/// change popularity, longer is slightly better (`--half-life 16`: 1 to 3
/// points of hit ratio) and 1 slightly worse; 4 keeps the policy adaptive.
pub const DEFAULT_HALF_LIFE_BUDGETS: u64 = 4;

/// The shortest half-life, in bytes: shorter ones would rebase the clock (an
/// O(resident blocks) step) every few accesses.
pub const MIN_HALF_LIFE: u64 = 1 << 20;

/// The frequency a block is credited with when first seen, in accesses:
/// multiplied by its reference count, this is what a block that has never
/// been read competes with for admission (see `access`).
const FIRST_SIGHT_PRIOR: f64 = 1.0;

/// When the clock has run this many half-lives it is rebased (wound back by
/// its whole half-lives, every frequency divided by as many powers of two),
/// so weights stay far from f64's range limit.
const REBASE_HALF_LIVES: f64 = 64.0;
/// At a rebase, forget non-resident blocks whose frequency is below this
/// (no access in the last ~20 half-lives): bounds the history's memory.
const FORGET_BELOW: f64 = 1.0 / (1u64 << 20) as f64;

/// Reference-count-aware, decayed-frequency policy with value-based
/// admission. See the crate documentation for the formula.
pub struct SharedAwarePolicy {
    budget: u64,
    pinned: u64,
    /// Bytes of traffic that halve an access's weight.
    half_life: f64,
    /// Bytes accessed since the last rebase: the clock. An access made now
    /// adds `2^(traffic / half_life)` to its block's frequency, so older
    /// accesses count for exponentially less, without ever touching them.
    traffic: u64,
    /// Access counter, for ties: among equal values the block used least
    /// recently goes first.
    accesses: u64,
    resident: HashMap<BlockId, Entry>,
    /// Resident blocks, lowest value first: the eviction order.
    by_value: BTreeSet<(Value, u64, BlockId)>,
    /// Decayed frequency of blocks seen but not resident, so a block that
    /// was evicted or never admitted is judged on its record, not as new.
    history: HashMap<BlockId, f64>,
}

struct Entry {
    size: u64,
    refs: u32,
    /// Decayed access frequency in clock units (see `traffic`).
    frequency: f64,
    /// Access counter at the last access (the tie-breaker).
    last_use: u64,
}

impl Entry {
    fn key(&self, block: BlockId) -> (Value, u64, BlockId) {
        (
            value(self.refs, self.frequency, self.size),
            self.last_use,
            block,
        )
    }
}

/// `H = refs · frequency · (size + C) / size`.
fn value(refs: u32, frequency: f64, size: u64) -> Value {
    let cost_per_byte = (size + MISS_OVERHEAD_BYTES) as f64 / size.max(1) as f64;
    Value(f64::from(refs) * frequency * cost_per_byte)
}

/// A block's value: finite and non-negative, so ordering by `total_cmp` is
/// the numeric order.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Value(f64);

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl SharedAwarePolicy {
    /// A policy with `budget` bytes and the default half-life
    /// ([`DEFAULT_HALF_LIFE_BUDGETS`] budgets of traffic).
    pub fn new(budget: u64) -> Self {
        Self::with_half_life(budget, budget.saturating_mul(DEFAULT_HALF_LIFE_BUDGETS))
    }

    /// A policy whose accesses lose half their weight every `half_life_bytes`
    /// of traffic (at least [`MIN_HALF_LIFE`]). Short: close to LRU; long:
    /// close to LFU.
    pub fn with_half_life(budget: u64, half_life_bytes: u64) -> Self {
        SharedAwarePolicy {
            budget,
            pinned: 0,
            half_life: half_life_bytes.max(MIN_HALF_LIFE) as f64,
            traffic: 0,
            accesses: 0,
            resident: HashMap::new(),
            by_value: BTreeSet::new(),
            history: HashMap::new(),
        }
    }

    /// The weight of an access made now, then advance the clock by `size`.
    fn tick(&mut self, size: u64) -> f64 {
        if self.traffic as f64 >= REBASE_HALF_LIVES * self.half_life {
            self.rebase();
        }
        let weight = (self.traffic as f64 / self.half_life).exp2();
        self.traffic = self.traffic.saturating_add(size);
        self.accesses += 1;
        weight
    }

    /// Wind the clock back by the whole half-lives it has run and divide
    /// every frequency by as many powers of two: values keep their order,
    /// numbers stay small.
    fn rebase(&mut self) {
        let half_lives = (self.traffic as f64 / self.half_life).floor();
        let scale = (-half_lives).exp2();
        self.traffic = self
            .traffic
            .saturating_sub((half_lives * self.half_life) as u64);
        self.history.retain(|_, frequency| {
            *frequency *= scale;
            *frequency >= FORGET_BELOW
        });
        self.by_value.clear();
        for (&block, entry) in &mut self.resident {
            entry.frequency *= scale;
            self.by_value.insert(entry.key(block));
        }
    }

    fn evict(&mut self, key: (Value, u64, BlockId)) -> Resident {
        let block = key.2;
        self.by_value.remove(&key);
        let entry = self
            .resident
            .remove(&block)
            .expect("indexed block is resident");
        self.pinned -= entry.size;
        self.history.insert(block, entry.frequency);
        Resident {
            block,
            size: entry.size,
        }
    }

    /// The blocks to evict to make room for `size` bytes, if each of them is
    /// worth less than `candidate` (a block worth nothing always yields).
    fn victims_below(&self, candidate: Value, size: u64) -> Option<Vec<(Value, u64, BlockId)>> {
        let mut room = self.budget - self.pinned;
        let mut victims = Vec::new();
        for &key in &self.by_value {
            if room >= size {
                break;
            }
            if key.0 .0 > 0.0 && key.0 >= candidate {
                return None;
            }
            room += self.resident[&key.2].size;
            victims.push(key);
        }
        Some(victims)
    }
}

impl Policy for SharedAwarePolicy {
    fn name(&self) -> &'static str {
        "shared-aware"
    }

    fn access(
        &mut self,
        block: BlockId,
        size: u64,
        refs: u32,
        evicted: &mut Vec<Resident>,
    ) -> Access {
        let weight = self.tick(size);
        let now = self.accesses;
        if let Some(entry) = self.resident.get_mut(&block) {
            self.by_value.remove(&entry.key(block));
            entry.frequency += weight;
            entry.refs = refs;
            entry.last_use = now;
            self.by_value.insert(entry.key(block));
            return Access::Hit;
        }
        // A block never seen before starts with the prior: its reference
        // count is evidence that it will be read, worth one access.
        let previous = self
            .history
            .remove(&block)
            .unwrap_or(FIRST_SIGHT_PRIOR * weight);
        let frequency = previous + weight;
        if size > self.budget {
            self.history.insert(block, frequency);
            return Access::Miss { admitted: false };
        }
        if self.pinned + size > self.budget {
            // Admission: the candidate competes on its record *before* this
            // access, which is what the residents are valued on too. Counting
            // this access would let every missed block displace one that is
            // about to be read (a load is a loop over the model's blocks: the
            // least recently used resident is the next one the loop needs),
            // which is exactly LRU's failure on models larger than the budget.
            let Some(victims) = self.victims_below(value(refs, previous, size), size) else {
                self.history.insert(block, frequency);
                return Access::Miss { admitted: false };
            };
            for key in victims {
                evicted.push(self.evict(key));
            }
        }
        let entry = Entry {
            size,
            refs,
            frequency,
            last_use: now,
        };
        self.by_value.insert(entry.key(block));
        self.resident.insert(block, entry);
        self.pinned += size;
        Access::Miss { admitted: true }
    }

    fn set_refs(&mut self, block: BlockId, refs: u32) {
        if let Some(entry) = self.resident.get_mut(&block) {
            self.by_value.remove(&entry.key(block));
            entry.refs = refs;
            self.by_value.insert(entry.key(block));
        }
    }

    fn remove(&mut self, block: BlockId) -> Option<Resident> {
        // Its model is gone: forget its record too.
        self.history.remove(&block);
        let entry = self.resident.remove(&block)?;
        self.by_value.remove(&entry.key(block));
        self.pinned -= entry.size;
        Some(Resident {
            block,
            size: entry.size,
        })
    }

    fn contains(&self, block: BlockId) -> bool {
        self.resident.contains_key(&block)
    }

    fn pinned_bytes(&self) -> u64 {
        self.pinned
    }

    fn budget(&self) -> u64 {
        self.budget
    }

    fn resident(&self) -> Box<dyn Iterator<Item = Resident> + '_> {
        Box::new(self.resident.iter().map(|(&block, entry)| Resident {
            block,
            size: entry.size,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "sim")]
    use crate::LruPolicy;

    const MIB: u64 = 1 << 20;

    fn id(n: u64) -> BlockId {
        BlockId::new(0, n)
    }

    fn access(policy: &mut dyn Policy, n: u64, refs: u32) -> (Access, Vec<BlockId>) {
        let mut evicted = Vec::new();
        let outcome = policy.access(id(n), MIB, refs, &mut evicted);
        (outcome, evicted.iter().map(|r| r.block).collect())
    }

    /// Room for 4 blocks, filled with block 0 (shared by 5 models) and three
    /// single-model blocks; then eight more single-model blocks are each read
    /// twice (models loaded in turn). LRU evicts block 0 for the first of
    /// them; the cost model evicts only single-model blocks.
    fn shared_block_under_pressure(policy: &mut dyn Policy) -> Vec<BlockId> {
        let mut evicted = Vec::new();
        for (n, refs) in [(0, 5), (1, 1), (2, 1), (3, 1)] {
            access(policy, n, refs);
        }
        for n in 4..12 {
            for _ in 0..2 {
                evicted.extend(access(policy, n, 1).1);
            }
        }
        evicted
    }

    #[test]
    fn shared_block_outlives_single_model_blocks_under_pressure() {
        let mut policy = SharedAwarePolicy::new(4 * MIB);
        let evicted = shared_block_under_pressure(&mut policy);
        assert!(policy.contains(id(0)));
        assert!(!evicted.contains(&id(0)));
        // Blocks 1, 2, 3 went, and so did some of the newcomers.
        assert!(evicted.len() > 3, "{evicted:?}");
        assert!([1, 2, 3].iter().all(|&n| evicted.contains(&id(n))));
        assert_eq!(policy.pinned_bytes(), 4 * MIB);

        // LRU, by contrast, evicts the shared block first.
        #[cfg(feature = "sim")]
        {
            let mut lru = LruPolicy::new(4 * MIB);
            assert_eq!(shared_block_under_pressure(&mut lru)[0], id(0));
        }
    }

    #[test]
    fn unread_shared_block_ages_out_eventually() {
        // Aging: a shared block nobody reads any more must not stay forever.
        let mut policy = SharedAwarePolicy::new(4 * MIB);
        access(&mut policy, 0, 5);
        for n in 1..200 {
            for _ in 0..2 {
                access(&mut policy, n, 1);
            }
        }
        assert!(!policy.contains(id(0)));
    }

    #[test]
    fn model_larger_than_budget_keeps_hitting() {
        // Six blocks read in order, again and again, with room for four: LRU
        // evicts each block just before it is needed and never hits; the
        // cost model keeps four of them and hits on every pass.
        let mut policy = SharedAwarePolicy::new(4 * MIB);
        let mut hits = 0;
        for pass in 0..10 {
            for n in 0..6 {
                let hit = access(&mut policy, n, 1).0.is_hit();
                hits += usize::from(hit && pass > 0);
            }
        }
        assert_eq!(hits, 9 * 4);

        #[cfg(feature = "sim")]
        {
            let mut lru = LruPolicy::new(4 * MIB);
            let mut lru_hits = 0;
            for _pass in 0..10 {
                for n in 0..6 {
                    lru_hits += usize::from(access(&mut lru, n, 1).0.is_hit());
                }
            }
            assert_eq!(lru_hits, 0);
        }
    }

    #[test]
    fn set_refs_changes_priority() {
        let mut policy = SharedAwarePolicy::new(2 * MIB);
        access(&mut policy, 0, 1);
        access(&mut policy, 1, 1);
        // Equal records: the older block (0) would go first. Raising its refs
        // (a fine-tune of its model was imported) makes block 1 the victim of
        // a block read twice.
        policy.set_refs(id(0), 4);
        access(&mut policy, 2, 1);
        assert_eq!(access(&mut policy, 2, 1).1, vec![id(1)]);
        // With no models left referencing block 0 it is worth nothing, and
        // yields even to a block read for the first time.
        policy.set_refs(id(0), 0);
        assert_eq!(access(&mut policy, 3, 1).1, vec![id(0)]);
        // set_refs of a block that is not resident changes nothing.
        policy.set_refs(id(9), 100);
        assert!(!policy.contains(id(9)));
    }

    #[test]
    fn remove_releases_bytes() {
        let mut policy = SharedAwarePolicy::new(3 * MIB);
        let mut evicted = Vec::new();
        policy.access(id(0), MIB, 2, &mut evicted);
        policy.access(id(1), 2 * MIB, 1, &mut evicted);
        assert_eq!(
            policy.remove(id(1)),
            Some(Resident {
                block: id(1),
                size: 2 * MIB
            })
        );
        assert_eq!(policy.remove(id(1)), None);
        assert_eq!(policy.pinned_bytes(), MIB);
        assert_eq!(policy.resident().count(), 1);
        // The freed room is used without evicting block 0.
        policy.access(id(2), 2 * MIB, 1, &mut evicted);
        assert!(evicted.is_empty());
        assert_eq!(policy.pinned_bytes(), 3 * MIB);
    }

    #[test]
    fn block_read_twice_outlives_block_read_once() {
        let mut policy = SharedAwarePolicy::new(2 * MIB);
        access(&mut policy, 0, 1);
        access(&mut policy, 0, 1);
        access(&mut policy, 1, 1);
        access(&mut policy, 2, 1);
        assert_eq!(access(&mut policy, 2, 1).1, vec![id(1)]);
    }

    #[test]
    fn shared_block_read_first_time_displaces_single_model_block() {
        // The reference count is a prior: a block of three models, never read
        // before, is admitted over a single-model block read once; a
        // single-model block read for the first time is not.
        let mut policy = SharedAwarePolicy::new(2 * MIB);
        access(&mut policy, 0, 1);
        access(&mut policy, 1, 1);
        assert_eq!(
            access(&mut policy, 2, 1).0,
            Access::Miss { admitted: false }
        );
        let (outcome, evicted) = access(&mut policy, 3, 3);
        assert_eq!(outcome, Access::Miss { admitted: true });
        assert_eq!(evicted, vec![id(0)]);
    }

    #[test]
    fn small_block_is_worth_more_per_byte() {
        // Same refs, each read twice: the 64 KiB block (a miss is mostly
        // latency) outlives the 1 MiB block.
        let mut policy = SharedAwarePolicy::new(MIB + 64 * 1024);
        let mut evicted = Vec::new();
        for _ in 0..2 {
            policy.access(id(0), MIB, 1, &mut evicted);
            policy.access(id(1), 64 * 1024, 1, &mut evicted);
        }
        for _ in 0..2 {
            policy.access(id(2), 64 * 1024, 1, &mut evicted);
        }
        assert_eq!(evicted[0].block, id(0));
        assert!(policy.contains(id(1)) && policy.contains(id(2)));
    }

    #[test]
    fn oversized_block_is_not_admitted() {
        let mut policy = SharedAwarePolicy::new(MIB);
        let mut evicted = Vec::new();
        policy.access(id(0), MIB, 1, &mut evicted);
        let outcome = policy.access(id(1), MIB + 1, 100, &mut evicted);
        assert_eq!(outcome, Access::Miss { admitted: false });
        assert!(evicted.is_empty() && policy.contains(id(0)));
    }

    #[test]
    fn rebase_keeps_order_and_forgets_old_history() {
        // Half-life 1 MiB: a rebase every 64 MiB of traffic.
        let mut policy = SharedAwarePolicy::with_half_life(2 * MIB, MIB);
        for _ in 0..3 {
            access(&mut policy, 0, 1);
        }
        access(&mut policy, 1, 1);
        // Block 7 leaves a record, then 200 MiB of traffic on blocks 0 and 1
        // (three rebases) makes it negligible and forgotten.
        access(&mut policy, 7, 1);
        for _ in 0..100 {
            access(&mut policy, 0, 1);
            access(&mut policy, 1, 1);
        }
        assert!(policy.traffic < 64 * MIB);
        assert!(!policy.history.contains_key(&id(7)));
        assert!(policy.contains(id(0)) && policy.contains(id(1)));
        // Order survives the rebases: 1 was read last, so 0 goes first (with
        // this short half-life, to a block read for the first time).
        assert_eq!(access(&mut policy, 5, 1).1, vec![id(0)]);
    }
}
