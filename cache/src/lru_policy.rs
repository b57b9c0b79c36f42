//! The baseline: least-recently-used blocks go first, whatever their size or
//! how many models share them.

use lru::LruCache;

use crate::{Access, BlockId, Policy, Resident};

/// Byte-budgeted LRU over blocks (the `lru` crate's list, bounded by bytes
/// rather than entries because blocks differ in size). Reference counts are
/// ignored: that is what makes it the baseline.
pub struct LruPolicy {
    budget: u64,
    pinned: u64,
    /// Resident blocks and their sizes, most recently used first.
    blocks: LruCache<BlockId, u64>,
}

impl LruPolicy {
    /// An empty cache that keeps at most `budget` bytes resident.
    pub fn new(budget: u64) -> Self {
        LruPolicy {
            budget,
            pinned: 0,
            blocks: LruCache::unbounded(),
        }
    }
}

impl Policy for LruPolicy {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn access(
        &mut self,
        block: BlockId,
        size: u64,
        _refs: u32,
        evicted: &mut Vec<Resident>,
    ) -> Access {
        // `get` moves the block to the most-recently-used end.
        if self.blocks.get(&block).is_some() {
            return Access::Hit;
        }
        if size > self.budget {
            return Access::Miss { admitted: false };
        }
        while self.pinned + size > self.budget {
            let (victim, victim_size) = self
                .blocks
                .pop_lru()
                .expect("pinned bytes > 0 implies a resident block");
            self.pinned -= victim_size;
            evicted.push(Resident {
                block: victim,
                size: victim_size,
            });
        }
        self.blocks.put(block, size);
        self.pinned += size;
        Access::Miss { admitted: true }
    }

    fn set_refs(&mut self, _block: BlockId, _refs: u32) {}

    fn remove(&mut self, block: BlockId) -> Option<Resident> {
        let size = self.blocks.pop(&block)?;
        self.pinned -= size;
        Some(Resident { block, size })
    }

    fn contains(&self, block: BlockId) -> bool {
        self.blocks.contains(&block)
    }

    fn pinned_bytes(&self) -> u64 {
        self.pinned
    }

    fn budget(&self) -> u64 {
        self.budget
    }

    fn resident(&self) -> Box<dyn Iterator<Item = Resident> + '_> {
        Box::new(
            self.blocks
                .iter()
                .map(|(&block, &size)| Resident { block, size }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> BlockId {
        BlockId::new(0, n)
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut lru = LruPolicy::new(300);
        let mut evicted = Vec::new();
        for n in 0..3 {
            assert_eq!(
                lru.access(id(n), 100, 1, &mut evicted),
                Access::Miss { admitted: true }
            );
        }
        // Touch 0, so 1 is now the least recently used.
        assert_eq!(lru.access(id(0), 100, 1, &mut evicted), Access::Hit);
        lru.access(id(3), 100, 1, &mut evicted);
        assert_eq!(
            evicted,
            vec![Resident {
                block: id(1),
                size: 100
            }]
        );
        assert!(lru.contains(id(0)) && lru.contains(id(2)) && lru.contains(id(3)));
        assert_eq!(lru.pinned_bytes(), 300);
    }

    #[test]
    fn ignores_reference_counts() {
        // A block shared by 100 models goes first if it is the oldest.
        let mut lru = LruPolicy::new(200);
        let mut evicted = Vec::new();
        lru.access(id(0), 100, 100, &mut evicted);
        lru.access(id(1), 100, 1, &mut evicted);
        lru.set_refs(id(0), 1000);
        lru.access(id(2), 100, 1, &mut evicted);
        assert_eq!(evicted[0].block, id(0));
    }

    #[test]
    fn large_block_evicts_several_and_oversized_is_not_admitted() {
        let mut lru = LruPolicy::new(300);
        let mut evicted = Vec::new();
        for n in 0..3 {
            lru.access(id(n), 100, 1, &mut evicted);
        }
        lru.access(id(9), 250, 1, &mut evicted);
        assert_eq!(evicted.len(), 3);
        assert_eq!(lru.pinned_bytes(), 250);
        assert_eq!(
            lru.access(id(10), 301, 1, &mut evicted),
            Access::Miss { admitted: false }
        );
        assert_eq!(lru.pinned_bytes(), 250);
    }
}
