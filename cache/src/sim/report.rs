//! What an experiment reports: per budget, each policy's [`Outcome`], and a
//! markdown rendering of it for the docs (the simulator binary prints this,
//! or the same data as JSON).

use serde::Serialize;

use super::{Outcome, Sharing, SimPolicy, SimSpec};

/// The result of [`run`](super::run): the workload's figures and one
/// [`BudgetRun`] per budget.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The experiment that was run.
    pub spec: SimSpec,
    /// Models in the family, standalone ones included.
    pub models: usize,
    /// Mean size of one model.
    pub model_bytes: u64,
    /// Distinct bytes of all the family's models (shared blocks once):
    /// what budgets are fractions of.
    pub working_set_bytes: u64,
    /// Bytes the loads read in total.
    pub accessed_bytes: u64,
    /// Distinct bytes the trace touches: misses no policy can avoid.
    pub cold_bytes: u64,
    /// One entry per budget, in the order the spec lists them.
    pub runs: Vec<BudgetRun>,
}

/// Every compared policy's outcome at one budget.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetRun {
    /// The budget as a fraction of the working set, as the spec gave it.
    pub budget_fraction: f64,
    /// The same budget in bytes.
    pub budget_bytes: u64,
    /// One entry per compared policy, in the order they were asked for.
    pub outcomes: Vec<Outcome>,
}

impl BudgetRun {
    /// The outcome of `policy`, if it was among those compared.
    pub fn outcome(&self, policy: SimPolicy) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.policy == policy.label())
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl Report {
    /// The report as a markdown summary line and table.
    pub fn to_markdown(&self) -> String {
        let f = &self.spec.family;
        let mut out = format!(
            "Workload: {sharing}, {models} models ({finetunes} fine-tunes replacing {pct:.0}% of tensors, {resaved} re-saved copies, {standalone} standalone), \
             model {model}, working set {ws}; {loads}, seed {seed}; \
             {accessed} read in total, of which {cold} cold (unavoidable).\n\n",
            sharing = match f.sharing {
                Sharing::Shared => "shared base",
                Sharing::Disjoint => "no sharing",
            },
            models = self.models,
            finetunes = f.finetunes,
            pct = f.finetune_fraction * 100.0,
            resaved = f.resaved,
            standalone = f.standalone,
            model = gib(self.model_bytes),
            ws = gib(self.working_set_bytes),
            loads = if self.spec.rollout {
                "each model loaded once (rollout)".to_string()
            } else {
                format!("{} loads, Zipf s={}", self.spec.loads, self.spec.zipf_s)
            },
            seed = f.seed,
            accessed = gib(self.accessed_bytes),
            cold = gib(self.cold_bytes),
        );
        out.push_str(
            "| budget (of working set) | policy | byte hit ratio | read from disk | disk reads | disk bytes vs LRU |\n",
        );
        out.push_str("|---|---|---:|---:|---:|---:|\n");
        for run in &self.runs {
            for o in &run.outcomes {
                out.push_str(&format!(
                    "| {:.0}% ({}) | {} | {:.1}% | {} | {} | {:+.1}% |\n",
                    run.budget_fraction * 100.0,
                    gib(run.budget_bytes),
                    o.policy,
                    o.byte_hit_ratio * 100.0,
                    gib(o.disk_bytes),
                    o.disk_reads,
                    o.disk_bytes_vs_lru * 100.0,
                ));
            }
        }
        out
    }
}
