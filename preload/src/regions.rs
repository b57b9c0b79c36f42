//! The composed mappings this process holds, so that `mremap` can rebuild
//! one (the kernel cannot grow or move a range made of several mappings).
//!
//! A fixed table behind a spin lock, because its users run inside `mmap`
//! and `munmap`, which the allocator itself calls: nothing here allocates or
//! blocks in the kernel. `fork` takes the lock in its prepare handler and
//! releases it in both processes, so a child never inherits it held by a
//! thread that does not exist there.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// One composed mapping: enough to compose it again at another size.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// First byte of the mapping.
    pub start: usize,
    /// Bytes mapped.
    pub len: usize,
    /// A duplicate of the file's descriptor, owned by the table.
    pub fd: i32,
    /// File offset of `start`.
    pub offset: i64,
    /// The caller's protection and flags.
    pub prot: i32,
    /// The caller's flags.
    pub flags: i32,
}

const SLOTS: usize = 4096;

struct Table {
    lock: AtomicBool,
    slots: UnsafeCell<[Option<Region>; SLOTS]>,
}

// SAFETY: `slots` is only touched between `acquire` and `release`.
unsafe impl Sync for Table {}

static TABLE: Table = Table {
    lock: AtomicBool::new(false),
    slots: UnsafeCell::new([None; SLOTS]),
};
static USED: AtomicUsize = AtomicUsize::new(0);
static AT_FORK: Once = Once::new();

fn acquire() {
    while TABLE
        .lock
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
}

fn release() {
    TABLE.lock.store(false, Ordering::Release);
}

extern "C" fn fork_prepare() {
    acquire();
}

extern "C" fn fork_release() {
    release();
}

fn with_slots<T>(f: impl FnOnce(&mut [Option<Region>; SLOTS]) -> T) -> T {
    acquire();
    // SAFETY: the lock is held, so no other reference to the slots exists.
    let out = f(unsafe { &mut *TABLE.slots.get() });
    release();
    out
}

fn overlaps(r: &Region, addr: usize, len: usize) -> bool {
    addr < r.start + r.len && r.start < addr.saturating_add(len)
}

fn close(fd: i32) {
    // SAFETY: the table owns the descriptor.
    unsafe { libc::close(fd) };
}

/// Remember a composed mapping. Entries it overlaps are stale (their pages
/// were replaced by a MAP_FIXED mapping) and are dropped. False if the
/// table is full: the caller then closes `r.fd`, and the mapping simply
/// cannot be grown.
pub fn remember(r: Region) -> bool {
    // SAFETY: registering fork handlers with valid function pointers.
    AT_FORK.call_once(|| unsafe {
        libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release));
    });
    let mut stale = [-1i32; 8];
    let mut n_stale = 0;
    let stored = with_slots(|slots| {
        for slot in slots.iter_mut() {
            if let Some(old) = slot {
                if overlaps(old, r.start, r.len) && n_stale < stale.len() {
                    stale[n_stale] = old.fd;
                    n_stale += 1;
                    *slot = None;
                    USED.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        match slots.iter_mut().find(|s| s.is_none()) {
            Some(free) => {
                *free = Some(r);
                USED.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    });
    stale[..n_stale].iter().for_each(|&fd| close(fd));
    stored
}

/// Remove and return the composed mapping starting at `start`.
pub fn take(start: usize) -> Option<Region> {
    if USED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    with_slots(|slots| {
        let slot = slots
            .iter_mut()
            .find(|s| s.is_some_and(|r| r.start == start))?;
        USED.fetch_sub(1, Ordering::Relaxed);
        slot.take()
    })
}

/// `[addr, addr+len)` is being unmapped: a composed mapping losing its tail
/// is shortened, one losing anything else is forgotten (it can no longer be
/// grown, but it stays correct).
pub fn forget(addr: usize, len: usize) {
    if USED.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut closing = [-1i32; 8];
    let mut n = 0;
    with_slots(|slots| {
        for slot in slots.iter_mut() {
            let Some(r) = slot else { continue };
            if !overlaps(r, addr, len) {
                continue;
            }
            if addr > r.start && addr.saturating_add(len) >= r.start + r.len {
                r.len = addr - r.start;
            } else if n < closing.len() {
                closing[n] = r.fd;
                n += 1;
                *slot = None;
                USED.fetch_sub(1, Ordering::Relaxed);
            }
        }
    });
    closing[..n].iter().for_each(|&fd| close(fd));
}
