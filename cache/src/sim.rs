//! Trace-driven simulator: replays model loads against each policy and counts
//! the bytes that would be read from disk.
//!
//! The workload is what a serving node sees: a *family* of models (a base,
//! fine-tunes that replaced some tensors, re-saved copies of those with
//! their tensors in another order), loaded one after another in a skewed
//! random order (Zipf over the models), each load reading all of its model's
//! blocks in file order, under a budget smaller than the family's distinct
//! bytes. The same family with nothing shared between models
//! ([`Sharing::Disjoint`]: same sizes, same order, fresh blocks) is the
//! control: there, the reference counts give the cost model nothing to use.
//!
//! Everything is deterministic for a given seed, so tests can assert results.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::{BlockId, LruPolicy, Policy, SharedAwarePolicy};

const MIB: u64 = 1 << 20;
/// The store cuts tensors into pieces of this size, anchored at the tensor's
/// start (docs/store-format.md §8).
const TENSOR_PIECE: u64 = MIB;
/// Non-tensor bytes (headers) are cut by CDC into chunks of at most this.
const CDC_MAX: u64 = 256 * 1024;

/// Mixed into the seed so the family, the Zipf load order and the rollout
/// order each draw from their own stream: changing one does not change the
/// others.
const LOAD_ORDER_STREAM: u64 = 0x10ad_0000;
const ROLLOUT_STREAM: u64 = 0x0110_0000;

/// A small, fast, seedable generator (xorshift64*): deterministic replays
/// without a dependency.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: any seed (0 included) gives a good state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift64((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); `n` > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// Whether the models of a family share blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// Fine-tunes share the base's unchanged tensors; re-saved copies share
    /// all tensors of their source.
    Shared,
    /// Same models, same sizes and order, but every model's blocks are its own.
    Disjoint,
}

/// The shape of a model family.
#[derive(Clone, Debug, Serialize)]
pub struct FamilySpec {
    /// Fine-tunes of the base.
    pub finetunes: usize,
    /// Re-saved copies (another format, re-sharded): the base and fine-tunes
    /// in turn, their tensors in name order and split into two shards.
    pub resaved: usize,
    /// Unrelated models the size of the base, sharing nothing with the family
    /// or each other: competition for the budget, to check that favouring
    /// shared blocks does not starve a popular unrelated model.
    pub standalone: usize,
    /// Size of the base model in MiB.
    pub base_mib: u64,
    /// Transformer layers of the base.
    pub layers: usize,
    /// Fraction of tensors each fine-tune replaces (chosen at random).
    pub finetune_fraction: f64,
    pub sharing: Sharing,
    pub seed: u64,
}

impl Default for FamilySpec {
    fn default() -> Self {
        FamilySpec {
            finetunes: 8,
            resaved: 3,
            standalone: 0,
            base_mib: 1024,
            layers: 32,
            finetune_fraction: 0.2,
            sharing: Sharing::Shared,
            seed: 1,
        }
    }
}

/// One block of a model's files, in the order a load reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelBlock {
    pub block: BlockId,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    /// The model's blocks in file order (a block occurs at most once).
    pub blocks: Vec<ModelBlock>,
}

impl Model {
    pub fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.size).sum()
    }
}

/// A generated model family and each block's reference count.
#[derive(Clone, Debug)]
pub struct Family {
    pub models: Vec<Model>,
    /// Number of models containing each block.
    pub refs: HashMap<BlockId, u32>,
}

/// A tensor: its name (re-saved copies order tensors by name), size, and the
/// blocks it was cut into.
#[derive(Clone)]
struct Tensor {
    name: String,
    size: u64,
    pieces: Vec<ModelBlock>,
}

/// Hands out block ids as (object, offset) of each model's own object, the
/// way the store appends a model's new chunks to one object.
struct Objects {
    next_offset: Vec<u64>,
}

impl Objects {
    /// A tensor of `size` bytes stored in `model`'s object: 1 MiB pieces, the
    /// last one shorter.
    fn store(&mut self, model: usize, size: u64) -> Vec<ModelBlock> {
        let mut pieces = Vec::new();
        let mut left = size;
        while left > 0 {
            let len = left.min(TENSOR_PIECE);
            let offset = &mut self.next_offset[model];
            pieces.push(ModelBlock {
                block: BlockId::new(model as u64, *offset),
                size: len,
            });
            *offset += len;
            left -= len;
        }
        pieces
    }

    /// A header of `size` bytes: non-tensor data, cut into CDC-sized chunks.
    fn header(&mut self, model: usize, size: u64) -> Vec<ModelBlock> {
        let mut chunks = Vec::new();
        let mut left = size;
        while left > 0 {
            let len = left.min(CDC_MAX);
            chunks.extend(self.store(model, len));
            left -= len;
        }
        chunks
    }
}

impl Family {
    /// Generate the family. Tensor sizes follow a decoder-only transformer in
    /// fp16: per layer four attention matrices (`a` bytes each), three MLP
    /// matrices (`8a/3`), two norm vectors (`2·hidden` bytes); an embedding
    /// and an output head the size of a layer. So most bytes are full 1 MiB
    /// pieces, each large tensor ends in a shorter piece, and there are many
    /// tiny blocks (norms, headers).
    pub fn generate(spec: &FamilySpec) -> Family {
        let mut rng = XorShift64::new(spec.seed);
        let model_count = 1 + spec.finetunes + spec.resaved + spec.standalone;
        let mut objects = Objects {
            next_offset: vec![0; model_count],
        };
        let layers = spec.layers.max(1) as u64;
        let layer_bytes = spec.base_mib * MIB / (layers + 2);
        let attention = (layer_bytes * 3 / 36).max(2) & !1;
        let hidden = ((attention / 2) as f64).sqrt() as u64;
        let mut shapes: Vec<(String, u64)> = vec![("model.embed_tokens".into(), layer_bytes)];
        for layer in 0..layers {
            let prefix = format!("model.layers.{layer}");
            for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                shapes.push((format!("{prefix}.self_attn.{m}"), attention));
            }
            shapes.push((format!("{prefix}.input_layernorm"), 2 * hidden));
            for m in ["gate_proj", "up_proj", "down_proj"] {
                shapes.push((format!("{prefix}.mlp.{m}"), attention * 8 / 3));
            }
            shapes.push((format!("{prefix}.post_attention_layernorm"), 2 * hidden));
        }
        shapes.push(("lm_head".into(), layer_bytes));
        // A safetensors header is ~100 bytes of JSON per tensor.
        let header_bytes = 100 * shapes.len() as u64;

        let base: Vec<Tensor> = shapes
            .into_iter()
            .map(|(name, size)| Tensor {
                pieces: objects.store(0, size),
                name,
                size,
            })
            .collect();
        let mut sources: Vec<Vec<Tensor>> = vec![base.clone()];
        let mut models = vec![Model {
            name: "base".into(),
            blocks: assemble(objects.header(0, header_bytes), &base),
        }];
        for i in 1..=spec.finetunes {
            let tensors: Vec<Tensor> = base
                .iter()
                .map(|t| {
                    if rng.next_f64() < spec.finetune_fraction {
                        Tensor {
                            pieces: objects.store(i, t.size),
                            ..t.clone()
                        }
                    } else {
                        t.clone()
                    }
                })
                .collect();
            models.push(Model {
                name: format!("finetune-{i}"),
                blocks: assemble(objects.header(i, header_bytes), &tensors),
            });
            sources.push(tensors);
        }
        for r in 0..spec.resaved {
            let index = 1 + spec.finetunes + r;
            let source = r % sources.len();
            // Another writer orders tensors by name ("layers.10" before
            // "layers.2") and shards the model in two, each with a header.
            let mut tensors = sources[source].clone();
            tensors.sort_by(|a, b| a.name.cmp(&b.name));
            let (first, second) = tensors.split_at(tensors.len() / 2);
            let mut blocks = assemble(objects.header(index, header_bytes / 2), first);
            blocks.extend(assemble(objects.header(index, header_bytes / 2), second));
            models.push(Model {
                name: format!("{}-resaved", models[source].name),
                blocks,
            });
        }
        for n in 0..spec.standalone {
            let index = 1 + spec.finetunes + spec.resaved + n;
            let blocks = models[0]
                .blocks
                .iter()
                .flat_map(|b| objects.store(index, b.size))
                .collect();
            models.push(Model {
                name: format!("standalone-{}", n + 1),
                blocks,
            });
        }
        if spec.sharing == Sharing::Disjoint {
            for (index, model) in models.iter_mut().enumerate() {
                let mut offset = 0;
                for b in &mut model.blocks {
                    b.block = BlockId::new(index as u64, offset);
                    offset += b.size;
                }
            }
        }
        let mut refs = HashMap::new();
        for model in &models {
            for b in &model.blocks {
                *refs.entry(b.block).or_insert(0) += 1;
            }
        }
        Family { models, refs }
    }

    /// Distinct bytes over all models: what a cache holding the whole
    /// family would need.
    pub fn working_set_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.models
            .iter()
            .flat_map(|m| &m.blocks)
            .filter(|b| seen.insert(b.block))
            .map(|b| b.size)
            .sum()
    }
}

fn assemble(header: Vec<ModelBlock>, tensors: &[Tensor]) -> Vec<ModelBlock> {
    let mut blocks = header;
    for t in tensors {
        blocks.extend_from_slice(&t.pieces);
    }
    blocks
}

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

/// Bytes and requests of one replay.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub policy: &'static str,
    /// Bytes read by all loads.
    pub accessed_bytes: u64,
    /// Bytes served from resident (pinned) blocks.
    pub hit_bytes: u64,
    /// Bytes read from disk (misses).
    pub disk_bytes: u64,
    /// Blocks read from disk (misses).
    pub disk_reads: u64,
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

/// Replay `order` with Belady's rule (see [`SimPolicy::Oracle`]).
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

impl Outcome {
    fn new(policy: &'static str) -> Self {
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

    fn count(&mut self, size: u64, hit: bool) {
        self.accessed_bytes += size;
        if hit {
            self.hit_bytes += size;
        } else {
            self.disk_bytes += size;
            self.disk_reads += 1;
        }
    }

    fn finish(mut self) -> Self {
        self.byte_hit_ratio = self.hit_bytes as f64 / self.accessed_bytes.max(1) as f64;
        self
    }
}

/// A whole experiment: one family, one trace, several budgets.
#[derive(Clone, Debug, Serialize)]
pub struct SimSpec {
    pub family: FamilySpec,
    /// Model loads, drawn from a Zipf distribution over the models.
    pub loads: usize,
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

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub spec: SimSpec,
    pub models: usize,
    /// Mean size of one model.
    pub model_bytes: u64,
    pub working_set_bytes: u64,
    /// Bytes the loads read in total.
    pub accessed_bytes: u64,
    /// Distinct bytes the trace touches: misses no policy can avoid.
    pub cold_bytes: u64,
    pub runs: Vec<BudgetRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BudgetRun {
    pub budget_fraction: f64,
    pub budget_bytes: u64,
    pub outcomes: Vec<Outcome>,
}

impl BudgetRun {
    pub fn outcome(&self, policy: SimPolicy) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.policy == policy.label())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn small_family(sharing: Sharing) -> FamilySpec {
        FamilySpec {
            base_mib: 128,
            layers: 8,
            sharing,
            ..FamilySpec::default()
        }
    }

    #[test]
    fn family_shares_what_it_should() {
        let shared = Family::generate(&small_family(Sharing::Shared));
        let disjoint = Family::generate(&small_family(Sharing::Disjoint));
        assert_eq!(shared.models.len(), 12);
        for (a, b) in shared.models.iter().zip(&disjoint.models) {
            assert_eq!(a.bytes(), b.bytes());
        }
        let model = shared.models[0].bytes();
        assert!(model > 127 * MIB && model < 130 * MIB, "{model}");
        // Base + 8 fine-tunes each replacing ~20%: about 2.6 models' worth.
        let ws = shared.working_set_bytes();
        assert!(ws > 2 * model && ws < 4 * model, "{ws}");
        assert_eq!(
            disjoint.working_set_bytes(),
            disjoint.models.iter().map(Model::bytes).sum::<u64>()
        );
        assert!(disjoint.refs.values().all(|&r| r == 1));
        assert!(shared.refs.values().any(|&r| r >= 10));
        // A re-saved copy holds exactly its source's tensor blocks.
        let resaved = &shared.models[9];
        assert_eq!(resaved.name, "base-resaved");
        // (Its own blocks, in object 9, are its headers; the base's tensor
        // blocks are exactly those with more than one referrer.)
        let borrowed: HashSet<BlockId> = resaved
            .blocks
            .iter()
            .filter(|b| b.block.object != 9)
            .map(|b| b.block)
            .collect();
        let base_tensors: HashSet<BlockId> = shared.models[0]
            .blocks
            .iter()
            .filter(|b| shared.refs[&b.block] > 1)
            .map(|b| b.block)
            .collect();
        assert_eq!(borrowed, base_tensors);
        assert!(resaved
            .blocks
            .iter()
            .filter(|b| b.block.object == 9)
            .all(|b| shared.refs[&b.block] == 1));
    }

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

    fn spec(sharing: Sharing, fraction: f64) -> SimSpec {
        SimSpec {
            family: small_family(sharing),
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
