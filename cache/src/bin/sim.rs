//! `modelfs-cache-sim`: replay model loads against LRU, the shared-aware cost
//! model and an oracle, and print bytes read from disk for each.

use clap::{Parser, ValueEnum};
use modelfs_cache::sim::{self, FamilySpec, Sharing, SimPolicy, SimSpec};

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    /// A base, fine-tunes and re-saved copies sharing its tensors.
    Shared,
    /// The same models with nothing in common (the control).
    Disjoint,
}

/// Replay a model family's loads under a memory budget and compare cache
/// policies by bytes read from disk. Deterministic for a given --seed.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Whether the models share blocks.
    #[arg(long, value_enum, default_value = "shared")]
    workload: Workload,
    /// Fine-tunes of the base.
    #[arg(long, default_value_t = 8)]
    finetunes: usize,
    /// Re-saved copies (tensors in name order, two shards) of the base and
    /// fine-tunes in turn.
    #[arg(long, default_value_t = 3)]
    resaved: usize,
    /// Unrelated models the size of the base (competition for the budget).
    #[arg(long, default_value_t = 0)]
    standalone: usize,
    /// Size of the base model in MiB.
    #[arg(long, default_value_t = 1024)]
    base_mib: u64,
    /// Transformer layers of the base.
    #[arg(long, default_value_t = 32)]
    layers: usize,
    /// Fraction of tensors each fine-tune replaces.
    #[arg(long, default_value_t = 0.2)]
    finetune_fraction: f64,
    /// Budget(s) as fractions of the working set (the family's distinct
    /// bytes), comma-separated for a sweep.
    #[arg(long, value_delimiter = ',', default_value = "0.3")]
    budget: Vec<f64>,
    /// Zipf exponent of model popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Model loads to replay.
    #[arg(long, default_value_t = 200)]
    loads: usize,
    /// Load every model exactly once, in a random order, instead of --loads
    /// Zipf draws (a rollout: each variant cold-started once).
    #[arg(long)]
    rollout: bool,
    /// The shared-aware policy's half-life, in budgets of traffic.
    #[arg(long, default_value_t = modelfs_cache::DEFAULT_HALF_LIFE_BUDGETS as f64)]
    half_life: f64,
    /// Seed of the family's generation and of the load order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Leave out the oracle (Belady) run.
    #[arg(long)]
    no_oracle: bool,
    /// Print the report as JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    if args.budget.iter().any(|&b| !(b > 0.0 && b <= 1.0)) {
        eprintln!("error: --budget fractions must be in (0, 1]");
        std::process::exit(2);
    }
    let spec = SimSpec {
        family: FamilySpec {
            finetunes: args.finetunes,
            resaved: args.resaved,
            standalone: args.standalone,
            base_mib: args.base_mib,
            layers: args.layers,
            finetune_fraction: args.finetune_fraction,
            sharing: match args.workload {
                Workload::Shared => Sharing::Shared,
                Workload::Disjoint => Sharing::Disjoint,
            },
            seed: args.seed,
        },
        loads: args.loads,
        zipf_s: args.zipf_s,
        rollout: args.rollout,
        budget_fractions: args.budget,
        half_life_budgets: args.half_life,
    };
    let policies: Vec<SimPolicy> = SimPolicy::ALL
        .into_iter()
        .filter(|&p| !(args.no_oracle && p == SimPolicy::Oracle))
        .collect();
    let report = sim::run(&spec, &policies);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print!("{}", report.to_markdown());
    }
}
