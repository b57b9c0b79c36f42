//! Pinning: keep the chunks that many models share resident, within a
//! memory budget, by `mlock`ing their ranges of the store objects.
//!
//! Why mlock: this VM (like many) reclaims idle page cache within minutes,
//! so "recently used" bytes do not stay warm on their own; locked pages are
//! never reclaimed. Because passthrough reads use the store object's own
//! page-cache pages, pinning an object range helps passthrough readers and
//! copy-mode reads alike. Which ranges to keep is decided by the
//! `modelfs-cache` policy (shared-aware: value grows with the number of
//! models referencing a chunk and with recent use, falls with size).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};

use modelfs_cache::{Access, BlockId, Policy, Resident, SharedAwarePolicy};
use modelfs_store::{ContentInfo, MappedObject, ObjectId};
use tracing::warn;

use crate::vfs::Vfs;

/// Counters for stats.json and metrics.
#[derive(Debug, Default)]
pub struct PinStats {
    /// Chunk accesses (a copy-mode read of the chunk, or the chunk offered
    /// when its file was opened by passthrough) that found it pinned. Not
    /// counted while the budget is 0.
    pub hits: AtomicU64,
    /// Chunk accesses that did not find it pinned, whether or not the
    /// policy pinned it then.
    pub misses: AtomicU64,
    /// Bytes locked in memory now, each chunk once.
    pub pinned_bytes: AtomicU64,
    /// Chunks the policy admitted but `mlock` refused (typically over
    /// `RLIMIT_MEMLOCK`), so they were left unpinned.
    /// Counted only: stats.json and the metrics do not report it.
    pub lock_failures: AtomicU64,
}

struct Locked {
    object: Arc<MappedObject>,
    len: u64,
}

/// The mount's pinned chunks: the [`SharedAwarePolicy`] deciding which
/// ranges to keep, and the `mlock`s that keep them, under one byte budget
/// that can change while mounted.
pub struct Pinner {
    inner: Mutex<Inner>,
    /// What pinning has done since the mount started.
    pub stats: PinStats,
    budget: AtomicU64,
}

struct Inner {
    policy: Box<dyn Policy + Send>,
    locked: HashMap<BlockId, Locked>,
    evicted: Vec<Resident>,
}

impl Pinner {
    /// `budget` 0 disables pinning.
    pub fn new(budget: u64) -> Pinner {
        Pinner {
            inner: Mutex::new(Inner {
                policy: Box::new(SharedAwarePolicy::new(budget)),
                locked: HashMap::new(),
                evicted: Vec::new(),
            }),
            stats: PinStats::default(),
            budget: AtomicU64::new(budget),
        }
    }

    /// Bytes that may be pinned now (0: pinning is off).
    pub fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    /// Change the budget (SIGHUP): everything pinned is released and the
    /// policy starts afresh under the new budget.
    pub fn set_budget(&self, budget: u64) {
        let mut inner = self.inner.lock().expect("pin lock");
        for (b, l) in inner.locked.drain() {
            l.object.unlock_range(b.offset, l.len);
            self.stats.pinned_bytes.fetch_sub(l.len, Ordering::Relaxed);
        }
        inner.policy = Box::new(SharedAwarePolicy::new(budget));
        self.budget.store(budget, Ordering::Relaxed);
    }

    /// A chunk at `object`+`offset` (`len` bytes, referenced by `refs`
    /// models) is being read: tell the policy, lock what it admits, unlock
    /// what it evicts. Returns whether the chunk is pinned now.
    pub fn access(
        &self,
        object: &Arc<MappedObject>,
        object_id: ObjectId,
        offset: u64,
        len: u64,
        refs: u32,
    ) -> bool {
        if self.budget() == 0 {
            return false;
        }
        let block = BlockId::new(object_id.0, offset);
        let mut inner = self.inner.lock().expect("pin lock");
        let Inner {
            policy,
            locked,
            evicted,
        } = &mut *inner;
        evicted.clear();
        match policy.access(block, len, refs.max(1), evicted) {
            Access::Hit => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
            }
            Access::Miss { admitted } => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                if admitted {
                    let locked_now = object.lock_range(offset, len);
                    if let Err(e) = &locked_now {
                        warn_lock_failure(e);
                    }
                    if locked_now.is_ok() {
                        locked.insert(
                            block,
                            Locked {
                                object: object.clone(),
                                len,
                            },
                        );
                        self.stats.pinned_bytes.fetch_add(len, Ordering::Relaxed);
                    } else {
                        // Over RLIMIT_MEMLOCK: give the slot back.
                        self.stats.lock_failures.fetch_add(1, Ordering::Relaxed);
                        policy.remove(block);
                    }
                }
            }
        }
        for r in evicted.drain(..) {
            if let Some(l) = locked.remove(&r.block) {
                l.object.unlock_range(r.block.offset, l.len);
                self.stats.pinned_bytes.fetch_sub(l.len, Ordering::Relaxed);
            }
        }
        locked.contains_key(&block)
    }

    /// Every pinned block: (object, offset) -> bytes locked.
    pub fn pinned_blocks(&self) -> HashMap<(ObjectId, u64), u64> {
        let inner = self.inner.lock().expect("pin lock");
        inner
            .locked
            .iter()
            .map(|(b, l)| ((ObjectId(b.object), b.offset), l.len))
            .collect()
    }

    /// Release every pinned block for which `keep` says no (its models
    /// were removed).
    pub fn release_unless(&self, keep: impl Fn(BlockId) -> bool) {
        let mut inner = self.inner.lock().expect("pin lock");
        let Inner { policy, locked, .. } = &mut *inner;
        let gone: Vec<BlockId> = locked.keys().copied().filter(|b| !keep(*b)).collect();
        for b in gone {
            policy.remove(b);
            if let Some(l) = locked.remove(&b) {
                l.object.unlock_range(b.offset, l.len);
                self.stats.pinned_bytes.fetch_sub(l.len, Ordering::Relaxed);
            }
        }
    }
}

/// Warn once if locking fails for lack of RLIMIT_MEMLOCK.
fn warn_lock_failure(err: &std::io::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        warn!("cannot lock pinned chunks in memory ({err}); raise RLIMIT_MEMLOCK (LimitMEMLOCK= under systemd) or lower --pin-budget");
    });
}

/// Start the worker that pins the chunks of files opened by passthrough:
/// the daemon never sees their reads, so it considers them at open, in file
/// order, off the request path (locking faults pages in from disk). Returns
/// the queue opens are sent to; the worker ends with the mount.
pub(crate) fn spawn_worker(vfs: Weak<Vfs>) -> mpsc::Sender<Arc<ContentInfo>> {
    let (tx, rx) = mpsc::channel::<Arc<ContentInfo>>();
    std::thread::Builder::new()
        .name("pin-worker".into())
        .spawn(move || {
            for content in rx {
                let Some(vfs) = vfs.upgrade() else { break };
                vfs.pin_content(&content);
            }
        })
        .expect("spawn pin worker");
    tx
}
