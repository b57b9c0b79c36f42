//! A content opened in copy mode, and what the mount remembers about each
//! content while it runs: which chunks have been checked, read counters,
//! and the load trace being recorded.
//!
//! Segment lookup and hashing are the store's ([`FileReader`]); this module
//! adds only what a long-lived, multi-threaded mount needs on top: each
//! chunk is hashed once per mount (not once per request), two workers never
//! hash the same chunk at the same time, and a bad chunk stays bad.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use modelfs_store::{ChunkHash, ContentInfo, FileReader, ObjectId, TraceRecorder};

use crate::stats::ContentCounters;

const UNCHECKED: u8 = 0;
const CHECKING: u8 = 1;
const CHECKED: u8 = 2;

/// Chunk locations (object, offset) checked against their hash in this
/// mount, whichever file they were read through: a chunk B shares with A
/// is not hashed again when B is read after A.
#[derive(Default)]
pub struct VerifiedChunks(Mutex<HashSet<(ObjectId, u64)>>);

impl VerifiedChunks {
    pub fn contains(&self, object: ObjectId, offset: u64) -> bool {
        self.0
            .lock()
            .expect("verified lock")
            .contains(&(object, offset))
    }

    pub fn insert(&self, object: ObjectId, offset: u64) {
        self.0
            .lock()
            .expect("verified lock")
            .insert((object, offset));
    }
}

/// What the mount knows about one content for as long as it runs.
pub struct ContentState {
    /// Per segment: UNCHECKED, CHECKING (a thread is hashing it) or CHECKED
    /// since the mount started. The middle state lets a request wait for
    /// another worker's hash of a chunk instead of hashing it again.
    checks: Vec<AtomicU8>,
    pub counters: ContentCounters,
    /// Copy-mode handles open now; a trace is saved when it drops to 0.
    pub(crate) opens: AtomicU32,
    /// First-touch order of this mount's reads.
    pub(crate) recorder: Mutex<TraceRecorder>,
    /// Bytes covered by the trace on disk (0: none). A recording replaces it
    /// only when it covers more, so a partial look (`head`, a header read)
    /// never overwrites the trace of a full load.
    pub(crate) saved_covered: AtomicU64,
    /// A replay of the trace is running.
    pub(crate) replaying: AtomicBool,
}

impl ContentState {
    pub(crate) fn new(content: &ContentInfo, saved_covered: u64) -> ContentState {
        ContentState {
            checks: (0..content.segments.len())
                .map(|_| AtomicU8::new(UNCHECKED))
                .collect(),
            counters: ContentCounters::default(),
            opens: AtomicU32::new(0),
            recorder: Mutex::new(TraceRecorder::new(content.size)),
            saved_covered: AtomicU64::new(saved_covered),
            replaying: AtomicBool::new(false),
        }
    }

    pub(crate) fn end_replay(&self) {
        self.replaying.store(false, Ordering::Release);
    }
}

/// A content opened in copy mode: the store's reader over the mapped
/// objects, this mount's state of the content, and the pinning weight of
/// each segment.
pub struct OpenContent {
    pub(crate) reader: FileReader,
    /// One `model/path` of the content, for log messages.
    pub(crate) label: String,
    pub(crate) state: Arc<ContentState>,
    /// Number of models referencing each segment's chunk (for pinning).
    pub(crate) refs: Vec<u32>,
}

impl OpenContent {
    pub fn content(&self) -> &Arc<ContentInfo> {
        self.reader.content()
    }

    /// Whether segment `i` is known good; checks it (hashing its bytes) if
    /// not. False: the bytes do not match the hash, or lie past the end of
    /// their object.
    pub(crate) fn check_segment(&self, i: usize, checked: &VerifiedChunks) -> bool {
        let state = &self.state.checks[i];
        let mut waited = 0u32;
        loop {
            match state.compare_exchange(UNCHECKED, CHECKING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(CHECKED) => return true,
                // Another worker is hashing it (two requests can share a
                // chunk): its answer arrives within a chunk's hash time, or
                // its disk read. Sleep rather than spin: two vCPUs are
                // shared with the thread doing the work.
                Err(_) => {
                    waited += 1;
                    if waited < 16 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                }
            }
        }
        let s = &self.reader.segments()[i];
        let good = checked.contains(s.object, s.object_offset)
            || self
                .reader
                .segment_bytes(i)
                .is_ok_and(|bytes| ChunkHash::of(bytes) == s.hash);
        if good {
            checked.insert(s.object, s.object_offset);
        }
        // A bad chunk goes back to unchecked, so every read of it fails.
        state.store(if good { CHECKED } else { UNCHECKED }, Ordering::Release);
        good
    }

    pub(crate) fn still_open(&self) -> bool {
        self.state.opens.load(Ordering::Relaxed) > 0
    }
}
