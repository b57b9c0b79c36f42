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
//!
//! One file per step of an experiment ([`run`]), in the order it takes them:
//! `family.rs` generates the models and the blocks each load reads
//! ([`Family`]); `order.rs` decides which model is loaded when
//! ([`load_order`], [`rollout_order`]); `replay.rs` plays that trace through
//! one [`Policy`](crate::Policy) ([`replay`]) and `belady.rs` through the
//! oracle that knows the future ([`replay_oracle`]); `experiment.rs` does so
//! for every policy at every budget; `report.rs` is the result and its
//! markdown table ([`Report`]). `rng.rs` is the seeded generator behind every
//! random choice ([`XorShift64`]).

mod belady;
mod experiment;
mod family;
mod order;
mod replay;
mod report;
mod rng;

pub use belady::replay_oracle;
pub use experiment::{run, SimPolicy, SimSpec};
pub use family::{Family, FamilySpec, Model, ModelBlock, Sharing};
pub use order::{load_order, rollout_order};
pub use replay::{replay, Outcome};
pub use report::{BudgetRun, Report};
pub use rng::XorShift64;
