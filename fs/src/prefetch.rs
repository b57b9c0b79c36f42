//! Trace replay: read a file's chunks in the order its last load read
//! them, ahead of the reader.
//!
//! Why: a copy-mode read that misses the page cache waits for the store
//! disk in the middle of a FUSE request, and loaders do not read in file
//! order (safetensors and torch loaders walk tensors in their own order), so
//! the kernel's sequential readahead does not help them. The replay issues
//! large `MADV_WILLNEED` reads in the recorded order, so when the request
//! arrives its bytes are resident, or on their way.
//!
//! It only reads; hashing stays with the requests. Hashing ahead of the
//! reader as well would funnel a cold file's hashing through this one thread
//! while the FUSE workers wait for it: measured, cold copy-mode reads in a
//! fresh mount then ran at half their speed (scripts/bench-mount.sh).
//!
//! It stays at most `window` bytes (plus one 8 MiB step) ahead of what the
//! reader has consumed, so a replay of a huge file never floods memory, and
//! it stops when the last handle of the file is closed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use modelfs_store::LoadTrace;

use crate::open_content::OpenContent;

/// Bytes of chunks per read-ahead step: large enough for efficient disk
/// requests, small enough that hashing a step keeps up with the reader.
const STEP_BYTES: u64 = 8 << 20;

/// The chunks (segment indices) to bring in, grouped into steps, in trace order.
fn plan(open: &OpenContent, trace: &LoadTrace) -> Vec<Vec<usize>> {
    let reader = &open.reader;
    let segments = reader.segments();
    let mut planned = vec![false; segments.len()];
    let mut steps: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0u64;
    for &(offset, len) in &trace.ranges {
        for i in reader.segments_in(offset, offset.saturating_add(len)) {
            if !planned[i] {
                planned[i] = true;
                current.push(i);
                current_bytes += u64::from(segments[i].len);
                if current_bytes >= STEP_BYTES {
                    steps.push(std::mem::take(&mut current));
                    current_bytes = 0;
                }
            }
        }
    }
    if !current.is_empty() {
        steps.push(current);
    }
    steps
}

/// Ask the kernel to read a step's chunks; returns the bytes that were not
/// resident (what this prefetch brings in).
fn issue(open: &OpenContent, step: &[usize]) -> u64 {
    let mut missing = 0;
    for &i in step {
        let s = &open.reader.segments()[i];
        let obj = open.reader.object_of(i);
        let len = u64::from(s.len);
        let resident = obj.resident_bytes(s.object_offset, len);
        if resident < len {
            missing += len - resident;
            obj.will_need(s.object_offset, len);
        }
    }
    missing
}

pub(crate) fn spawn_replay(open: Arc<OpenContent>, trace: LoadTrace, window: u64) {
    let spawned = std::thread::Builder::new()
        .name("trace-replay".into())
        .spawn(move || {
            replay(&open, &trace, window);
            open.state.end_replay();
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a trace replay: {e}");
    }
}

fn replay(open: &OpenContent, trace: &LoadTrace, window: u64) {
    let counters = &open.state.counters;
    let consumed_at_start = counters.read_bytes.load(Ordering::Relaxed);
    let consumed = || counters.read_bytes.load(Ordering::Relaxed) - consumed_at_start;
    let mut issued = 0u64;
    for step in plan(open, trace) {
        // Stay within the window of what the reader consumed (the first
        // step always goes); give up when the reader is gone.
        loop {
            if !open.still_open() {
                return;
            }
            if issued == 0 || issued <= consumed().saturating_add(window) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let fetched = issue(open, &step);
        counters
            .prefetched_bytes
            .fetch_add(fetched, Ordering::Relaxed);
        issued += step
            .iter()
            .map(|&i| u64::from(open.reader.segments()[i].len))
            .sum::<u64>();
    }
}
