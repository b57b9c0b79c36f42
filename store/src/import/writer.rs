//! The I/O around the hashing of one file: how its chunks are grouped into
//! batches, the reader thread that faults the next batch in, and the writer
//! thread that appends new chunks to the file's object. Kept apart from the
//! hashing so that the two threads see only what they are given: the source
//! mapping, and messages over bounded channels.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::ids::ObjectId;

/// Bytes read per batch. Large enough that per-batch overheads (channel hops,
/// rayon joins, one write per run of new chunks) vanish next to hashing.
const BATCH_BYTES: usize = 16 << 20;
/// Start writeback of an object every this many bytes, so the fsync at the
/// end of a large file finds little left to write.
const WRITE_BEHIND: u64 = 16 << 20;

/// Read `bytes[from..to]` of a source mapping in now. Done for each batch
/// before any thread touches it, because MADV_POPULATE_READ reports a file
/// that shrank under the mapping as an error, where touching the missing
/// pages would kill the process with SIGBUS. (A truncation between this call
/// and the hashing still would: the import then dies like a `kill -9`, and
/// publishes nothing.)
pub(super) fn populate(bytes: &[u8], from: u64, to: u64) -> io::Result<()> {
    crate::pages::advise(&bytes[from as usize..to as usize], libc::MADV_POPULATE_READ).map_err(
        |e| match e.raw_os_error() {
            Some(libc::EFAULT) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being imported",
            ),
            _ => e,
        },
    )
}

/// Group `chunks` into batches of about BATCH_BYTES: (first chunk, end chunk).
pub(super) fn batches(chunks: &[(u64, u32)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut first = 0;
    let mut bytes = 0usize;
    for (i, &(_, len)) in chunks.iter().enumerate() {
        if bytes + len as usize > BATCH_BYTES && i > first {
            out.push((first, i));
            first = i;
            bytes = 0;
        }
        bytes += len as usize;
    }
    if first < chunks.len() {
        out.push((first, chunks.len()));
    }
    out
}

/// The reader thread: faults each batch in (from disk if it is cold) while
/// the previous one is hashed, and sends its index once it is resident. Stops
/// after the first failure, or when the hashing thread stops listening.
pub(super) fn read_ahead(
    chunks: &[(u64, u32)],
    batches: &[(usize, usize)],
    bytes: &[u8],
    ready: mpsc::SyncSender<io::Result<usize>>,
) {
    for (i, &(first, end)) in batches.iter().enumerate() {
        let from = chunks[first].0;
        let to = chunks[end - 1].0 + u64::from(chunks[end - 1].1);
        let batch = populate(bytes, from, to).map(|()| i);
        let failed = batch.is_err();
        if ready.send(batch).is_err() || failed {
            break;
        }
    }
}

/// The object file a file's new chunks are appended to. Offsets are handed
/// out by the hashing thread; bytes are written by the writer thread.
pub(super) struct ObjectWriter {
    pub(super) id: ObjectId,
    pub(super) path: PathBuf,
    pub(super) file: Arc<File>,
    /// End of the last assigned chunk: the object's size so far.
    pub(super) assigned: u64,
    /// Bytes of holes left before runs to keep them page-congruent.
    pub(super) padding: u64,
    /// File offset just past the last new chunk, where a run continues.
    pub(super) run_end: Option<u64>,
}

impl ObjectWriter {
    /// Where a new chunk at file offset `file_offset` goes. A chunk that
    /// starts a run of new chunks goes at the next object offset congruent
    /// to its file offset modulo the page size, leaving a hole of under a
    /// page: a process mapping the file can then map the run's pages from
    /// the object (docs/store-format.md §4, §11) instead of copies of them.
    /// A whole object (all chunks new, one run from 0) gets no hole.
    pub(super) fn assign(&mut self, file_offset: u64, len: u32) -> u64 {
        if self.run_end != Some(file_offset) {
            let hole = hole_before(self.assigned, file_offset);
            self.assigned += hole;
            self.padding += hole;
        }
        let at = self.assigned;
        self.assigned += u64::from(len);
        self.run_end = Some(file_offset + u64::from(len));
        at
    }
}

/// Bytes to skip from object offset `assigned` so that the next byte's
/// offset is congruent to `file_offset` modulo [`PAGE`].
fn hole_before(assigned: u64, file_offset: u64) -> u64 {
    (file_offset % PAGE + PAGE - assigned % PAGE) % PAGE
}

/// Page size the placement of runs is congruent to (the smallest one of
/// the architectures the store runs on; larger pages are multiples).
const PAGE: u64 = 4096;

/// Bytes of the source to append to an object: runs of (file offset, end,
/// object offset).
pub(super) struct WriteJob {
    pub(super) object: Option<(Arc<File>, PathBuf)>,
    pub(super) runs: Vec<(u64, u64, u64)>,
}

/// The writer thread: copies runs of new chunks from the source mapping into
/// their object and starts writeback early. Returns the bytes written.
pub(super) fn write_runs(jobs: mpsc::Receiver<WriteJob>, source: &[u8]) -> Result<u64> {
    let mut written = 0u64;
    let mut writeback_from = 0u64;
    for job in jobs {
        let Some((file, path)) = &job.object else {
            continue;
        };
        for &(start, end, at) in &job.runs {
            file.write_all_at(&source[start as usize..end as usize], at)
                .at(path)?;
            written += end - start;
            let upto = at + (end - start);
            if upto - writeback_from >= WRITE_BEHIND {
                // SAFETY: sync_file_range on our own descriptor; it only starts I/O.
                unsafe {
                    libc::sync_file_range(
                        file.as_raw_fd(),
                        writeback_from as i64,
                        (upto - writeback_from) as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                writeback_from = upto;
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_start_page_congruent_with_under_a_page_of_hole() {
        for (assigned, file_offset) in [(0, 0), (0, 100), (4095, 0), (5000, 5000), (123, 9999)] {
            let hole = hole_before(assigned, file_offset);
            assert!(hole < PAGE);
            assert_eq!((assigned + hole) % PAGE, file_offset % PAGE);
        }
        assert_eq!(hole_before(8192, 4096 * 7), 0);
    }
}
