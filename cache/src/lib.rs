//! Which chunks of the store stay in memory: the pinning policy, and a
//! trace-driven simulator that measures it against plain LRU.
//!
//! # Why this crate exists
//!
//! Models on one machine share most of their bytes (a base and its
//! fine-tunes, re-saved copies). The store keeps each shared chunk once, and
//! since passthrough pages *are* the store object's pages, one resident chunk
//! serves every model that contains it. But this VM's kernel reclaims idle
//! page cache within minutes, so the next cold start of a variant reads the
//! shared base from disk again. The mount therefore pins (mlocks) chosen
//! object ranges under a byte budget. This crate decides *which*: it knows
//! nothing about FUSE or mlock, only blocks, sizes and reference counts, so
//! it can be unit-tested and replayed on synthetic traces (the `sim` module)
//! without a mount. It also owns the pin budget's units and default
//! ([`parse_size`], [`DEFAULT_BUDGET_PERCENT`]), so that the mount, the
//! configuration file and the command line read a budget the same way.
//!
//! # The `sim` feature
//!
//! The mount links only the policy it runs ([`SharedAwarePolicy`]) and the
//! budget. Everything that exists to *evaluate* that policy is behind the
//! `sim` feature, off by default, with the dependencies only it needs
//! (`lru`, `clap`, `serde`, `serde_json`):
//!
//! * `LruPolicy`, the baseline the policy is measured against, and
//!   `PolicyKind`, which picks between the two by name;
//! * the `sim` module: a generated model family, Zipf and rollout load
//!   orders, replays through each policy and a Belady oracle, and reports;
//! * the `modelfs-cache-sim` binary, the simulator's command line.
//!
//! CI builds, lints and tests the crate with `--all-features`, so the
//! simulator and its assertions keep up with the policy.
//!
//! # The interface the mount uses
//!
//! A *block* is a chunk (a byte range of a store object), named by
//! [`BlockId`] (object, offset) so that an eviction tells the mount exactly
//! which range to munlock. The mount calls [`Policy::access`] on each read
//! of a block, passing the block's *reference count*: the number of models
//! (plus running mounts' open files) that contain it. An access either hits
//! a resident block or misses; a miss admits the block if it fits, evicting
//! others, and every evicted block is reported so the mount can munlock it.
//! [`Policy::set_refs`] follows imports and removals, [`Policy::remove`]
//! releases a block whose last model went away. Whatever the call sequence,
//! [`Policy::pinned_bytes`] never exceeds [`Policy::budget`].
//!
//! # The cost model ([`SharedAwarePolicy`])
//!
//! Each block `b` the cache has seen has a value per byte kept,
//!
//! ```text
//! value(b) = refs(b) · F(b) · (size(b) + C) / size(b)
//! F(b)     = 1·2^(−(T − T₀)/h) + Σ over past reads i of b: 2^(−(T − Tᵢ)/h)
//! ```
//!
//! where `T` is the clock (bytes read through the cache so far), `T₀` the
//! time `b` was first seen and `Tᵢ` the times it was read. The policy evicts
//! the resident block of lowest value, and admits a missed block only into
//! free room or if its value *before this read* exceeds that of every block
//! it would displace (a block worth nothing, `refs = 0`, always yields).
//!
//! * `refs(b)`: models (plus open files) that contain the block. A load of
//!   any of them reads it, so it scales the expected reads; it is also all
//!   the policy knows about a block never read before, which is why `F`
//!   starts at one access' worth when a block is first seen (so a first read
//!   of a block of three models displaces a single-model block read once).
//! * `F(b)`: reads, each counting half as much per half-life `h` of traffic
//!   (4 × the budget, [`DEFAULT_HALF_LIFE_BUDGETS`]): frequency and recency in
//!   one number (LRFU, Lee et al. 2001). It is kept for evicted blocks too
//!   (bounded: a record that has decayed below 2⁻²⁰ is dropped), so a block
//!   that comes back is judged on its record. Unlike the inflation clock of
//!   GreedyDual-Size-Frequency (Cherkasova 1998), which advances on every
//!   eviction, this clock advances with traffic: a load streaming through the
//!   cache cannot inflate it. That matters here: a GDSF variant of this
//!   policy (`L + refs · hits · (size + C) / size`, always admitting) read
//!   only 2% (13%) fewer bytes than LRU at a budget of 10% (20%) of the
//!   working set, against 20% (45%) for this one, and 5% more than LRU on
//!   the no-sharing control at 50%.
//! * `(size + C) / size`: what a miss costs per byte kept. A miss is one disk
//!   request, a fixed latency plus transfer; in bytes, `size + C` with `C` =
//!   [`MISS_OVERHEAD_BYTES`] (128 KiB, about one request's latency at NVMe
//!   bandwidth). Value falls with size, but 1 MiB and 4 MiB pieces are worth
//!   nearly the same per byte, which is right when the goal is fewer bytes
//!   read, while small chunks (headers, norms) are cheap to keep.
//! * Admission by the record before this read: loading a model reads all its
//!   blocks in order, again and again. When a model is larger than the
//!   budget, the resident block read longest ago is exactly the next one the
//!   load needs, so any policy that lets each missed block displace it
//!   (LRU does, and so would this one if the current read counted) evicts
//!   every block just before it is read and never hits. Comparing records
//!   keeps a stable subset instead, which is what the optimal (Belady) policy
//!   does on a loop. It is TinyLFU's admission rule (Einziger et al. 2017).
//!
//! `LruPolicy` (feature `sim`) is the baseline: byte-budgeted LRU that
//! ignores sizes and reference counts.
//!
//! # Evidence
//!
//! `modelfs-cache-sim` (the `sim` module) replays a family (a 1 GiB base,
//! 8 fine-tunes replacing 20% of tensors, 3 re-saved copies) loaded 200 times
//! in Zipf order (seed 1). At a budget of 30% of the family's distinct bytes
//! the cost model reads 66% fewer bytes from disk than LRU (Belady oracle:
//! 69%); over budgets of 10% to 70%, 9% to 66% fewer. Two caveats, both
//! measured by the simulator: most of that gain comes from the admission rule
//! and the decayed frequency, which also beat LRU when models share nothing
//! (15% to 32% fewer bytes; LRU's failure on loops is not specific to
//! sharing).
//! Reference counts add a few points on top: 0.1 to 3 points of hit ratio
//! on the Zipf trace, 1 to 6 on a rollout (every model loaded once, no
//! history to go on), and they cost up to 0.6 points when a shared family
//! competes with popular unrelated models at generous budgets.
//!
//! ```text
//! cargo run --release -p modelfs-cache --features sim --bin modelfs-cache-sim -- --budget 0.1,0.2,0.3,0.5,0.7
//! cargo run --release -p modelfs-cache --features sim --bin modelfs-cache-sim -- --workload disjoint --budget 0.3
//! ```

#[cfg(feature = "sim")]
mod lru_policy;
mod shared_aware;
#[cfg(feature = "sim")]
pub mod sim;
mod size;

#[cfg(feature = "sim")]
pub use lru_policy::LruPolicy;
pub use shared_aware::{
    SharedAwarePolicy, DEFAULT_HALF_LIFE_BUDGETS, MIN_HALF_LIFE, MISS_OVERHEAD_BYTES,
};
pub use size::{
    default_budget, default_budget_for, parse_size, parse_size_of, total_ram, SizeError,
    DEFAULT_BUDGET_PERCENT,
};

/// A block: the byte range of a store object that holds one chunk. A chunk is
/// stored once, so (object, offset) names it uniquely and is also the range
/// the mount pins; its length never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId {
    /// The store object (`objects/xx/<object:016x>`) holding the chunk.
    pub object: u64,
    /// Byte offset of the chunk inside that object.
    pub offset: u64,
}

impl BlockId {
    /// The block at `offset` of `object`.
    pub const fn new(object: u64, offset: u64) -> Self {
        BlockId { object, offset }
    }
}

/// A resident block and its size: what the mount munlocks when the policy
/// evicts it (`[offset, offset + size)` of the object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resident {
    /// Which chunk: its object and the offset the range starts at.
    pub block: BlockId,
    /// Bytes of the range, as given to [`Policy::access`] when admitted.
    pub size: u64,
}

/// The outcome of [`Policy::access`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The block was resident (pinned): the read is served from memory.
    Hit,
    /// The block was not resident: the read goes to disk. `admitted` says
    /// whether the policy now keeps it (the mount then pins it); a block larger
    /// than the whole budget is never admitted.
    Miss {
        /// Whether the block is now resident and should be pinned.
        admitted: bool,
    },
}

impl Access {
    /// Whether the block was already resident.
    pub fn is_hit(self) -> bool {
        self == Access::Hit
    }
}

/// A byte-budgeted set of resident blocks and the rule that chooses them.
///
/// Object safe, so the mount can hold a `Box<dyn Policy + Send>` chosen at
/// start-up. Evictions are returned through a caller-owned vector rather than
/// a callback: the mount must munlock each one, and a vector it drains after
/// every call makes that hard to forget and keeps the policy free of I/O.
pub trait Policy {
    /// Short name for reports ("lru", "shared-aware").
    fn name(&self) -> &'static str;

    /// Record a read of `block` (`size` bytes, referenced by `refs` models and
    /// open files). A hit refreshes the block's standing; a miss admits it if
    /// it fits in the budget, evicting lower-valued blocks into `evicted`
    /// (appended, not cleared). `size` of a block must be the same at every
    /// call; a resident block keeps the size it was admitted with.
    fn access(
        &mut self,
        block: BlockId,
        size: u64,
        refs: u32,
        evicted: &mut Vec<Resident>,
    ) -> Access;

    /// The block's reference count changed (a model containing it was
    /// imported or removed, a file was opened or closed). Changes its
    /// priority, not its recency; no effect if the block is not resident.
    fn set_refs(&mut self, block: BlockId, refs: u32);

    /// Release `block` (its last model was removed); returns it if it was
    /// resident so the mount can munlock it.
    fn remove(&mut self, block: BlockId) -> Option<Resident>;

    /// Whether `block` is resident, without counting an access.
    fn contains(&self, block: BlockId) -> bool;

    /// Bytes of all resident blocks; never more than [`Policy::budget`].
    fn pinned_bytes(&self) -> u64;

    /// The byte budget given at construction.
    fn budget(&self) -> u64;

    /// The resident blocks, in no particular order.
    fn resident(&self) -> Box<dyn Iterator<Item = Resident> + '_>;
}

/// The policies a mount (or the simulator) can be asked for by name. Behind
/// the `sim` feature with [`LruPolicy`], the only other choice.
#[cfg(feature = "sim")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// [`LruPolicy`], the baseline (`"lru"`).
    Lru,
    /// [`SharedAwarePolicy`], the cost model the mount runs
    /// (`"shared-aware"` or `"shared"`).
    SharedAware,
}

#[cfg(feature = "sim")]
impl PolicyKind {
    /// A new, empty policy of this kind with `budget` bytes.
    pub fn build(self, budget: u64) -> Box<dyn Policy + Send> {
        match self {
            PolicyKind::Lru => Box::new(LruPolicy::new(budget)),
            PolicyKind::SharedAware => Box::new(SharedAwarePolicy::new(budget)),
        }
    }
}

#[cfg(feature = "sim")]
impl std::str::FromStr for PolicyKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "lru" => Ok(PolicyKind::Lru),
            "shared-aware" | "shared" => Ok(PolicyKind::SharedAware),
            _ => Err(format!(
                "unknown cache policy {text:?} (expected lru or shared-aware)"
            )),
        }
    }
}
