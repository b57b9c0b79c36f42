//! The oracle: Belady's rule replayed over a trace known in advance. No
//! policy that only sees the past can read fewer bytes from disk (for equal
//! block sizes), so it shows how much room a policy leaves for improvement.

use std::collections::{BTreeSet, HashMap};

use super::{Family, ModelBlock, Outcome};
use crate::BlockId;

/// Replay `order` with Belady's rule (see [`SimPolicy::Oracle`](super::SimPolicy::Oracle)).
pub fn replay_oracle(budget: u64, family: &Family, order: &[usize]) -> Outcome {
    let trace: Vec<ModelBlock> = order
        .iter()
        .flat_map(|&m| family.models[m].blocks.iter().copied())
        .collect();
    // next_use[i]: the position of the next access to trace[i]'s block.
    let mut next_use = vec![usize::MAX; trace.len()];
    let mut upcoming: HashMap<BlockId, usize> = HashMap::new();
    for (i, b) in trace.iter().enumerate().rev() {
        if let Some(next) = upcoming.insert(b.block, i) {
            next_use[i] = next;
        }
    }
    let mut outcome = Outcome::new("oracle");
    // Resident blocks: block -> (next use, size), and ordered by next use.
    let mut resident: HashMap<BlockId, (usize, u64)> = HashMap::new();
    let mut by_next_use: BTreeSet<(usize, BlockId)> = BTreeSet::new();
    let mut pinned = 0;
    for (i, b) in trace.iter().enumerate() {
        if let Some((next, _)) = resident.get_mut(&b.block) {
            by_next_use.remove(&(*next, b.block));
            *next = next_use[i];
            by_next_use.insert((next_use[i], b.block));
            outcome.count(b.size, true);
            continue;
        }
        outcome.count(b.size, false);
        if next_use[i] == usize::MAX || b.size > budget {
            continue;
        }
        // Admit only if the room can come from blocks needed later than this one.
        let mut room = budget - pinned;
        let mut victims = Vec::new();
        for &(next, victim) in by_next_use.iter().rev() {
            if room >= b.size || next <= next_use[i] {
                break;
            }
            room += resident[&victim].1;
            victims.push((next, victim));
        }
        if room < b.size {
            continue;
        }
        for key in victims {
            by_next_use.remove(&key);
            pinned -= resident.remove(&key.1).expect("resident victim").1;
        }
        resident.insert(b.block, (next_use[i], b.size));
        by_next_use.insert((next_use[i], b.block));
        pinned += b.size;
        assert!(pinned <= budget, "budget exceeded");
    }
    outcome.finish()
}
