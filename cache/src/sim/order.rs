//! Which model is loaded when: the trace's order of loads, kept apart from
//! the family so the same models can be replayed under a skewed popularity
//! (Zipf draws) or as a rollout (each model once).

use super::XorShift64;

/// Mixed into the seed so the family, the Zipf load order and the rollout
/// order each draw from their own stream: changing one does not change the
/// others.
const LOAD_ORDER_STREAM: u64 = 0x10ad_0000;
const ROLLOUT_STREAM: u64 = 0x0110_0000;

/// The order models are loaded in: `loads` draws from a Zipf(`s`)
/// distribution over the models, whose popularity ranks are a random
/// permutation (so the base is not always the most popular).
pub fn load_order(models: usize, loads: usize, zipf_s: f64, seed: u64) -> Vec<usize> {
    let mut rng = XorShift64::new(seed ^ LOAD_ORDER_STREAM);
    let mut by_rank: Vec<usize> = (0..models).collect();
    rng.shuffle(&mut by_rank);
    let weights: Vec<f64> = (1..=models).map(|k| (k as f64).powf(-zipf_s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(models);
    let mut sum = 0.0;
    for w in &weights {
        sum += w / total;
        cumulative.push(sum);
    }
    (0..loads)
        .map(|_| {
            let u = rng.next_f64();
            let rank = cumulative.partition_point(|&c| c <= u).min(models - 1);
            by_rank[rank]
        })
        .collect()
}

/// Every model once, in a random order.
pub fn rollout_order(models: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..models).collect();
    XorShift64::new(seed ^ ROLLOUT_STREAM).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_is_skewed_and_deterministic() {
        let order = load_order(10, 10_000, 1.0, 7);
        assert_eq!(order, load_order(10, 10_000, 1.0, 7));
        let mut counts = [0usize; 10];
        for &m in &order {
            counts[m] += 1;
        }
        counts.sort_unstable();
        // Zipf(1) over 10: the top model ~34%, the last ~3.4%.
        assert!(counts[9] > 3000 && counts[9] < 3900, "{counts:?}");
        assert!(counts[0] > 200 && counts[0] < 500, "{counts:?}");
    }
}
