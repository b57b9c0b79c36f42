//! The models the simulator loads: a family generated from a [`FamilySpec`],
//! cut into blocks the way the store cuts real files, with each block's
//! reference count. Sharing between models is the one thing the cost model
//! can exploit that LRU cannot, so the generator controls exactly what is
//! shared ([`Sharing`]).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::XorShift64;
use crate::BlockId;

const MIB: u64 = 1 << 20;
/// The store cuts tensors into pieces of this size, anchored at the tensor's
/// start (docs/store-format.md §8).
const TENSOR_PIECE: u64 = MIB;
/// Non-tensor bytes (headers) are cut by CDC into chunks of at most this.
const CDC_MAX: u64 = 256 * 1024;

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
    /// Whether models share blocks, or the same shapes get fresh blocks (the
    /// control).
    pub sharing: Sharing,
    /// Seed of every random choice in generating the family and its loads,
    /// so a spec always yields the same experiment.
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
    /// The chunk: its object and offset there.
    pub block: BlockId,
    /// Bytes of the chunk.
    pub size: u64,
}

/// One generated model: the blocks a load of it reads.
#[derive(Clone, Debug)]
pub struct Model {
    /// Name in reports (`base`, `finetune-3`, `base-resaved`, `standalone-1`).
    pub name: String,
    /// The model's blocks in file order (a block occurs at most once).
    pub blocks: Vec<ModelBlock>,
}

impl Model {
    /// Bytes a load of the model reads: the sum of its block sizes.
    pub fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.size).sum()
    }
}

/// A generated model family and each block's reference count.
#[derive(Clone, Debug)]
pub struct Family {
    /// The base first, then fine-tunes, re-saved copies and standalone
    /// models; a load order indexes into this.
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

#[cfg(test)]
impl FamilySpec {
    /// The default family with a 128 MiB base of 8 layers: the same shape,
    /// small enough for unit tests.
    pub(super) fn small(sharing: Sharing) -> FamilySpec {
        FamilySpec {
            base_mib: 128,
            layers: 8,
            sharing,
            ..FamilySpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_shares_what_it_should() {
        let shared = Family::generate(&FamilySpec::small(Sharing::Shared));
        let disjoint = Family::generate(&FamilySpec::small(Sharing::Disjoint));
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
}
