//! Load traces: the order in which a loader first read each byte range of a
//! file, kept so the next load can be prefetched in that order.
//!
//! Why in the store: a trace belongs to a file's *content* (identical files
//! are one content, and any mount of the store may replay it), so it is keyed
//! by the content key and lives beside the objects, under
//! `traces/`. Why outside the catalog: the mount daemon records traces while
//! it serves reads, and it must never take the store's writer lock or write
//! the catalog. A trace is only a hint: it is written with write-then-rename
//! and no fsync, a missing or damaged one is ignored (the file is simply read
//! without prefetch), and `gc` deletes traces whose content is gone.
//! The byte format is in docs/store-format.md section 4a.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::ids::ContentKey;
use crate::Store;

/// Directory of trace files inside a store directory.
pub const TRACES_DIR: &str = "traces";
const MAGIC: &[u8; 8] = b"MFSTRACE";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8;
const RANGE_BYTES: usize = 16;
/// At most this many ranges are kept: a loader that reads a file in more
/// scattered pieces than this gets its first ranges prefetched, the rest read
/// on demand, and a trace file never exceeds 1 MiB.
pub const MAX_RANGES: usize = 65_536;

/// First-touch order of a file's bytes: `(offset, len)` ranges, disjoint,
/// in the order they were first read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadTrace {
    /// Size of the file the trace was recorded on.
    pub file_size: u64,
    /// `(offset, len)` in bytes, in first-touch order; disjoint, each
    /// non-empty and inside the file, at most [`MAX_RANGES`].
    pub ranges: Vec<(u64, u64)>,
}

impl LoadTrace {
    /// Bytes the trace covers.
    pub fn covered(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The trace file's bytes (docs/store-format.md section 4a): header,
    /// ranges, then a BLAKE3 of everything before it.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.ranges.len() * RANGE_BYTES + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.file_size.to_le_bytes());
        for &(offset, len) in &self.ranges {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        let check = blake3::hash(&out);
        out.extend_from_slice(check.as_bytes());
        out
    }

    /// Decode and validate a trace of a file of `file_size` bytes: `None`
    /// for anything torn, damaged, from another version, recorded on a file
    /// of a different size, or whose ranges overlap or leave the file.
    pub fn decode(bytes: &[u8], file_size: u64) -> Option<LoadTrace> {
        let body_len = bytes.len().checked_sub(32)?;
        let (body, check) = bytes.split_at(body_len);
        if body.len() < HEADER_BYTES || blake3::hash(body).as_bytes() != check {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        if &body[..8] != MAGIC || u32_at(8) != VERSION {
            return None;
        }
        let count = u32_at(12) as usize;
        if count > MAX_RANGES
            || u64_at(16) != file_size
            || body.len() != HEADER_BYTES + count * RANGE_BYTES
        {
            return None;
        }
        let mut ranges: Vec<(u64, u64)> = (0..count)
            .map(|i| {
                let at = HEADER_BYTES + i * RANGE_BYTES;
                (u64_at(at), u64_at(at + 8))
            })
            .collect();
        // Disjoint and inside the file, checked on a sorted copy.
        let mut sorted = ranges.clone();
        sorted.sort_unstable();
        let mut end = 0u64;
        for &(offset, len) in &sorted {
            let stop = offset.checked_add(len)?;
            if len == 0 || offset < end || stop > file_size {
                return None;
            }
            end = stop;
        }
        ranges.shrink_to_fit();
        Some(LoadTrace { file_size, ranges })
    }
}

/// Records first-touch order as reads arrive: bytes already recorded are
/// skipped, a read continuing the previous range extends it.
#[derive(Debug, Default)]
pub struct TraceRecorder {
    trace: LoadTrace,
    /// Recorded ranges by start offset, merged, for the "already seen" test.
    seen: std::collections::BTreeMap<u64, u64>,
    covered: u64,
}

impl TraceRecorder {
    /// An empty recorder for a file of `file_size` bytes; reads past that
    /// size are not recorded.
    pub fn new(file_size: u64) -> TraceRecorder {
        TraceRecorder {
            trace: LoadTrace {
                file_size,
                ranges: Vec::new(),
            },
            ..TraceRecorder::default()
        }
    }

    /// Bytes recorded so far.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// True once every byte is recorded or the range limit is reached.
    pub fn full(&self) -> bool {
        self.covered >= self.trace.file_size || self.trace.ranges.len() >= MAX_RANGES
    }

    /// The trace recorded so far.
    pub fn trace(&self) -> &LoadTrace {
        &self.trace
    }

    /// Note a read of `[offset, offset + len)`.
    pub fn record(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.trace.file_size);
        let mut at = offset;
        while at < end && !self.full() {
            // The recorded range that starts at or before `at`, if it covers it.
            if let Some((_, &stop)) = self.seen.range(..=at).next_back() {
                if stop > at {
                    at = stop;
                    continue;
                }
            }
            // New bytes run until `end` or the next recorded range.
            let next = self
                .seen
                .range(at..)
                .next()
                .map_or(end, |(&start, _)| start.min(end));
            self.push(at, next - at);
            at = next;
        }
    }

    fn push(&mut self, offset: u64, len: u64) {
        self.covered += len;
        match self.trace.ranges.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += len,
            _ => self.trace.ranges.push((offset, len)),
        }
        // Merge into `seen` with the neighbours it touches.
        let mut start = offset;
        let mut stop = offset + len;
        if let Some((&s, &e)) = self.seen.range(..=start).next_back() {
            if e == start {
                start = s;
                self.seen.remove(&s);
            }
        }
        if let Some(e) = self.seen.remove(&stop) {
            stop = e;
        }
        self.seen.insert(start, stop);
    }
}

impl Store {
    /// Path of the trace of the content with key `hash`.
    pub fn trace_path(&self, hash: &ContentKey) -> PathBuf {
        trace_path(self.root(), hash)
    }

    /// The recorded load trace of a content, if a valid one exists.
    pub fn load_trace(&self, hash: &ContentKey, file_size: u64) -> Option<LoadTrace> {
        read_trace(self.root(), hash, file_size)
    }
}

/// Path of the trace of the content with key `hash` in the store at
/// `store_root`: `traces/<first two hex digits>/<hex key>`.
pub(crate) fn trace_path(store_root: &Path, hash: &ContentKey) -> PathBuf {
    let hex = hash.to_hex();
    store_root.join(TRACES_DIR).join(&hex[..2]).join(hex)
}

/// Read a trace straight from a store directory (the mount holds no `Store`
/// for this, and must not fail on a store made before traces existed).
pub fn read_trace(store_root: &Path, hash: &ContentKey, file_size: u64) -> Option<LoadTrace> {
    let bytes = std::fs::read(trace_path(store_root, hash)).ok()?;
    LoadTrace::decode(&bytes, file_size)
}

/// Write a trace atomically (temporary file, then rename over the old one).
/// Not fsync'd: after a crash the old trace, no trace, or a torn file that
/// [`LoadTrace::decode`] rejects are all acceptable.
pub fn write_trace(store_root: &Path, hash: &ContentKey, trace: &LoadTrace) -> Result<()> {
    let path = trace_path(store_root, hash);
    let dir = path.parent().expect("trace path has a parent");
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).at(dir)?;
        crate::set_mode(dir, 0o755)?;
        if let Some(top) = dir.parent() {
            crate::set_mode(top, 0o755)?;
        }
    }
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        &hash.to_hex()[..16]
    ));
    let mut file = std::fs::File::create(&tmp).at(&tmp)?;
    file.write_all(&trace.encode()).at(&tmp)?;
    drop(file);
    crate::set_mode(&tmp, 0o644)?;
    std::fs::rename(&tmp, &path).at(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_keeps_first_touch_order_and_skips_rereads() {
        let mut r = TraceRecorder::new(100);
        r.record(80, 10);
        r.record(0, 10);
        r.record(10, 10); // continues the previous range
        r.record(5, 30); // only 20..35 is new
        r.record(80, 20); // only 90..100 is new
        assert_eq!(r.trace().ranges, vec![(80, 10), (0, 35), (90, 10)]);
        assert_eq!(r.covered(), 55);
        r.record(30, 70); // fills 35..80 only
        assert_eq!(r.trace().ranges.last(), Some(&(35, 45)));
        assert!(r.full());
        r.record(0, 100);
        assert_eq!(r.covered(), 100);
    }

    #[test]
    fn recorder_clamps_to_the_file() {
        let mut r = TraceRecorder::new(10);
        r.record(5, 100);
        r.record(50, 10);
        assert_eq!(r.trace().ranges, vec![(5, 5)]);
    }

    #[test]
    fn traces_round_trip_and_reject_damage() {
        let t = LoadTrace {
            file_size: 1 << 40,
            ranges: vec![(1 << 30, 4096), (0, 1 << 20), (1 << 39, 1 << 39)],
        };
        let bytes = t.encode();
        assert_eq!(LoadTrace::decode(&bytes, 1 << 40), Some(t.clone()));
        assert_eq!(LoadTrace::decode(&bytes, 1 << 39), None, "other size");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(LoadTrace::decode(&bad, 1 << 40), None, "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert_eq!(LoadTrace::decode(&bytes[..n], 1 << 40), None);
        }
        let overlapping = LoadTrace {
            file_size: 100,
            ranges: vec![(0, 50), (40, 10)],
        };
        assert_eq!(LoadTrace::decode(&overlapping.encode(), 100), None);
        let outside = LoadTrace {
            file_size: 100,
            ranges: vec![(90, 20)],
        };
        assert_eq!(LoadTrace::decode(&outside.encode(), 100), None);
    }

    #[test]
    fn write_then_read() {
        let dir = std::env::temp_dir().join(format!("modelfs-trace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hash = ContentKey([7; 32]);
        assert_eq!(read_trace(&dir, &hash, 10), None);
        let t = LoadTrace {
            file_size: 10,
            ranges: vec![(5, 5), (0, 5)],
        };
        write_trace(&dir, &hash, &t).unwrap();
        assert_eq!(read_trace(&dir, &hash, 10), Some(t));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
