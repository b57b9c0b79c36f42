//! Where chunk boundaries go.
//!
//! Tensor bytes (located by `modelfs-formats`) are cut into fixed pieces
//! anchored at the tensor's first byte, so an identical tensor yields identical
//! chunks whatever its offset in the file and whatever the container format.
//! All other bytes (headers, pickles, JSON, files we cannot parse) are cut with
//! content-defined chunking (FastCDC), which survives insertions that shift the
//! following bytes.

use modelfs_formats::TensorSpan;

/// Size of the pieces large tensors are cut into. 1 MiB matches the size of
/// the mount's read requests, so a copy-mode read verifies about one chunk.
pub const TENSOR_PIECE: u64 = 1 << 20;
/// FastCDC parameters for non-tensor bytes (64 KiB average, as the usual
/// baseline for content-defined chunking).
pub const CDC_MIN: usize = 16 << 10;
pub const CDC_AVG: usize = 64 << 10;
pub const CDC_MAX: usize = 256 << 10;

/// A run of bytes of a file and how to cut it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Tensor data: fixed pieces of [`TENSOR_PIECE`] from `offset`.
    Tensor { offset: u64, len: u64 },
    /// Anything else: content-defined chunks.
    Other { offset: u64, len: u64 },
}

/// Cover `0..file_len` with regions: the given tensor spans (sorted; any that
/// overlap an earlier one or run past the end are dropped, so a lying header
/// can cost dedup but never correctness) and `Other` regions between them.
pub fn regions(file_len: u64, spans: &[TensorSpan]) -> Vec<Region> {
    let mut sorted: Vec<&TensorSpan> = spans.iter().filter(|s| s.len > 0).collect();
    sorted.sort_by_key(|s| (s.offset, s.len));
    let mut out = Vec::with_capacity(sorted.len() * 2 + 1);
    let mut pos = 0u64;
    for s in sorted {
        let Some(end) = s.offset.checked_add(s.len) else {
            continue;
        };
        if s.offset < pos || end > file_len {
            continue;
        }
        if s.offset > pos {
            out.push(Region::Other {
                offset: pos,
                len: s.offset - pos,
            });
        }
        out.push(Region::Tensor {
            offset: s.offset,
            len: s.len,
        });
        pos = end;
    }
    if pos < file_len {
        out.push(Region::Other {
            offset: pos,
            len: file_len - pos,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(offset: u64, len: u64) -> TensorSpan {
        TensorSpan { offset, len }
    }

    #[test]
    fn regions_cover_the_file_exactly() {
        let r = regions(100, &[span(10, 20), span(40, 60)]);
        assert_eq!(
            r,
            vec![
                Region::Other { offset: 0, len: 10 },
                Region::Tensor {
                    offset: 10,
                    len: 20
                },
                Region::Other {
                    offset: 30,
                    len: 10
                },
                Region::Tensor {
                    offset: 40,
                    len: 60
                },
            ]
        );
    }

    #[test]
    fn overlapping_and_out_of_range_spans_are_dropped() {
        let r = regions(
            50,
            &[span(0, 30), span(20, 10), span(40, 100), span(u64::MAX, 2)],
        );
        assert_eq!(
            r,
            vec![
                Region::Tensor { offset: 0, len: 30 },
                Region::Other {
                    offset: 30,
                    len: 20
                },
            ]
        );
        assert_eq!(regions(0, &[]), vec![]);
    }
}
