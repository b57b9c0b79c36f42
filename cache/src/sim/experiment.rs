//! One experiment: generate the family and its trace once, then replay it
//! through every compared policy at every budget, so the policies are judged
//! on identical loads.

use std::collections::HashSet;

use serde::Serialize;

use super::{
    load_order, replay, replay_oracle, rollout_order, BudgetRun, Family, FamilySpec, Model,
    Outcome, Report,
};
use crate::{LruPolicy, SharedAwarePolicy};

/// The policies the simulator compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimPolicy {
    /// The baseline ([`LruPolicy`]).
    Lru,
    /// The cost model ([`SharedAwarePolicy`]) with true reference counts.
    SharedAware,
    /// The cost model told every block has one reference (the ablation):
    /// shows how much of the gain is owed to reference counts rather than to
    /// decayed frequency and admission.
    SharedAwareNoRefs,
    /// Belady's rule with bypass: evict the block whose next use is furthest
    /// away, never admit a block needed later than all it would displace.
    /// Knows the future; optimal for equal sizes and close to it here (most
    /// blocks are 1 MiB), so it shows how much room is left.
    Oracle,
}

impl SimPolicy {
    /// Every policy, in the order reports list them.
    pub const ALL: [SimPolicy; 4] = [
        SimPolicy::Lru,
        SimPolicy::SharedAware,
        SimPolicy::SharedAwareNoRefs,
        SimPolicy::Oracle,
    ];

    /// The name in reports.
    pub fn label(self) -> &'static str {
        match self {
            SimPolicy::Lru => "lru",
            SimPolicy::SharedAware => "shared-aware",
            SimPolicy::SharedAwareNoRefs => "shared-aware (refs hidden)",
            SimPolicy::Oracle => "oracle",
        }
    }
}

/// A whole experiment: one family, one trace, several budgets.
#[derive(Clone, Debug, Serialize)]
pub struct SimSpec {
    /// The models to generate and what they share; its seed also drives the
    /// load order.
    pub family: FamilySpec,
    /// Model loads, drawn from a Zipf distribution over the models.
    pub loads: usize,
    /// Zipf exponent `s`: the model of popularity rank `k` (a random ranking)
    /// is drawn with weight `k^-s`; 0 is uniform, larger is more skewed.
    pub zipf_s: f64,
    /// Instead: load every model exactly once, in a random order (a rollout,
    /// every variant cold-started once: the case with no access history to
    /// go on, where reference counts are all the policy knows).
    pub rollout: bool,
    /// Budgets as fractions of the family's working set.
    pub budget_fractions: Vec<f64>,
    /// The shared-aware policy's half-life, in budgets of traffic.
    pub half_life_budgets: f64,
}

/// Generate the family and the trace, replay every policy at every budget.
pub fn run(spec: &SimSpec, policies: &[SimPolicy]) -> Report {
    let family = Family::generate(&spec.family);
    let order = if spec.rollout {
        rollout_order(family.models.len(), spec.family.seed)
    } else {
        load_order(
            family.models.len(),
            spec.loads,
            spec.zipf_s,
            spec.family.seed,
        )
    };
    let working_set_bytes = family.working_set_bytes();
    let mut touched = HashSet::new();
    let mut cold_bytes = 0;
    let mut accessed_bytes = 0;
    for &m in &order {
        for b in &family.models[m].blocks {
            accessed_bytes += b.size;
            if touched.insert(b.block) {
                cold_bytes += b.size;
            }
        }
    }
    let runs = spec
        .budget_fractions
        .iter()
        .map(|&fraction| {
            let budget = (working_set_bytes as f64 * fraction) as u64;
            let half_life = (budget as f64 * spec.half_life_budgets) as u64;
            let shared_aware = || SharedAwarePolicy::with_half_life(budget, half_life);
            let mut outcomes: Vec<Outcome> = policies
                .iter()
                .map(|&policy| {
                    let mut outcome = match policy {
                        SimPolicy::Lru => {
                            replay(&mut LruPolicy::new(budget), &family, &order, true)
                        }
                        SimPolicy::SharedAware => {
                            replay(&mut shared_aware(), &family, &order, true)
                        }
                        SimPolicy::SharedAwareNoRefs => {
                            replay(&mut shared_aware(), &family, &order, false)
                        }
                        SimPolicy::Oracle => replay_oracle(budget, &family, &order),
                    };
                    outcome.policy = policy.label();
                    outcome
                })
                .collect();
            let lru_disk = outcomes
                .iter()
                .find(|o| o.policy == SimPolicy::Lru.label())
                .map(|o| o.disk_bytes);
            for o in &mut outcomes {
                if let Some(lru_disk) = lru_disk {
                    o.disk_bytes_vs_lru = o.disk_bytes as f64 / lru_disk.max(1) as f64 - 1.0;
                }
            }
            BudgetRun {
                budget_fraction: fraction,
                budget_bytes: budget,
                outcomes,
            }
        })
        .collect();
    Report {
        spec: spec.clone(),
        models: family.models.len(),
        model_bytes: family.models.iter().map(Model::bytes).sum::<u64>()
            / family.models.len() as u64,
        working_set_bytes,
        accessed_bytes,
        cold_bytes,
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Sharing;

    fn spec(sharing: Sharing, fraction: f64) -> SimSpec {
        SimSpec {
            family: FamilySpec::small(sharing),
            loads: 100,
            zipf_s: 1.0,
            rollout: false,
            budget_fractions: vec![fraction],
            half_life_budgets: crate::shared_aware::DEFAULT_HALF_LIFE_BUDGETS as f64,
        }
    }

    #[test]
    fn shared_aware_reads_30_percent_fewer_bytes_on_a_shared_base() {
        let report = run(&spec(Sharing::Shared, 0.3), &SimPolicy::ALL);
        let run = &report.runs[0];
        let lru = run.outcome(SimPolicy::Lru).unwrap();
        let shared = run.outcome(SimPolicy::SharedAware).unwrap();
        let oracle = run.outcome(SimPolicy::Oracle).unwrap();
        assert!(
            shared.disk_bytes_vs_lru <= -0.30,
            "{}",
            report.to_markdown()
        );
        // Nothing beats knowing the future.
        assert!(oracle.disk_bytes <= shared.disk_bytes);
        assert!(lru.disk_bytes >= report.cold_bytes);
    }

    #[test]
    fn shared_aware_is_not_worse_without_sharing() {
        let report = run(&spec(Sharing::Disjoint, 0.3), &SimPolicy::ALL);
        let shared = report.runs[0].outcome(SimPolicy::SharedAware).unwrap();
        assert!(shared.disk_bytes_vs_lru <= 0.05, "{}", report.to_markdown());
    }

    #[test]
    fn reference_counts_help_a_rollout() {
        // Every model loaded once: no history, so the reference counts are
        // what tells shared blocks from single-model ones.
        let spec = SimSpec {
            rollout: true,
            ..spec(Sharing::Shared, 0.3)
        };
        let report = run(
            &spec,
            &[
                SimPolicy::Lru,
                SimPolicy::SharedAware,
                SimPolicy::SharedAwareNoRefs,
            ],
        );
        let run = &report.runs[0];
        let with_refs = run.outcome(SimPolicy::SharedAware).unwrap().disk_bytes;
        let without = run
            .outcome(SimPolicy::SharedAwareNoRefs)
            .unwrap()
            .disk_bytes;
        assert!(
            (with_refs as f64) < 0.95 * without as f64,
            "{}",
            report.to_markdown()
        );
    }

    #[test]
    fn replay_is_deterministic() {
        let a = run(&spec(Sharing::Shared, 0.2), &SimPolicy::ALL);
        let b = run(&spec(Sharing::Shared, 0.2), &SimPolicy::ALL);
        assert_eq!(a.to_markdown(), b.to_markdown());
    }
}
