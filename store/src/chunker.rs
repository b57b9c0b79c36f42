//! Where chunk boundaries go.
//!
//! Tensor bytes (located by `modelfs-formats`) are cut into fixed pieces
//! anchored at the tensor's first byte, so an identical tensor yields identical
//! chunks whatever its offset in the file and whatever the container format.
//! All other bytes (headers, pickles, JSON, files we cannot parse) are cut with
//! content-defined chunking (FastCDC), which survives insertions that shift the
//! following bytes.

use std::io::{self, Read};

use modelfs_formats::{Source, TensorSpan};
use rayon::prelude::*;

use crate::ids::{ChunkHash, ContentKey};
use crate::recipe::content_key;

/// Size of the pieces large tensors are cut into. 1 MiB matches the size of
/// the mount's read requests, so a copy-mode read verifies about one chunk.
pub const TENSOR_PIECE: u64 = 1 << 20;
/// FastCDC parameters for non-tensor bytes (64 KiB average, as the usual
/// baseline for content-defined chunking). Smallest chunk in bytes, except
/// the last of a region, which may be shorter.
pub const CDC_MIN: usize = 16 << 10;
/// Bytes FastCDC aims for on average in non-tensor bytes.
pub const CDC_AVG: usize = 64 << 10;
/// Largest content-defined chunk in bytes: FastCDC cuts here if it has
/// found no boundary yet.
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

/// The chunks `regions` cut `bytes` into, as (file offset, length), in file
/// order. Tensor regions give fixed pieces from the tensor's first byte,
/// other regions FastCDC chunks (the same cut points `StreamCDC` finds, see
/// [`canonical_key`], because both call the same `cut_gear` on at most
/// `CDC_MAX` bytes).
pub fn cut(bytes: &[u8], regions: &[Region]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for region in regions {
        match *region {
            Region::Tensor { offset, len } => out.extend(tensor_pieces(offset, len)),
            Region::Other { offset, len } => {
                let part = &bytes[offset as usize..(offset + len) as usize];
                for c in fastcdc::v2020::FastCDC::new(part, CDC_MIN, CDC_AVG, CDC_MAX) {
                    out.push((offset + c.offset as u64, c.length as u32));
                }
            }
        }
    }
    out
}

/// A tensor region's pieces: [`TENSOR_PIECE`] bytes each from its first
/// byte, the last one shorter.
fn tensor_pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    (0..len.div_ceil(TENSOR_PIECE)).map(move |k| {
        let at = k * TENSOR_PIECE;
        (offset + at, TENSOR_PIECE.min(len - at) as u32)
    })
}

/// The regions a content is cut into when nothing but its bytes is known:
/// the format detected from the bytes alone (no file name) and no ONNX
/// external-data spans. The content key is defined over this chunking, so
/// identical bytes get one key whatever they were called when imported.
pub fn canonical_regions(src: &dyn Source) -> Vec<Region> {
    let spans = match modelfs_formats::layout("", src) {
        Ok(Some(layout)) => layout.tensors,
        _ => Vec::new(),
    };
    regions(src.len(), &spans)
}

/// The content key of an in-memory (or mapped) content: its canonical
/// chunks hashed on all cores, then [`content_key`] over them.
pub fn canonical_key_of_bytes(bytes: &[u8]) -> ContentKey {
    let chunks = cut(bytes, &canonical_regions(&bytes));
    let hashes: Vec<(ChunkHash, u32)> = chunks
        .par_iter()
        .map(|&(off, len)| {
            let at = off as usize;
            (ChunkHash::of(&bytes[at..at + len as usize]), len)
        })
        .collect();
    content_key(hashes.iter().copied())
}

/// The content key of a content read through `src` piece by piece, for
/// checking a content whose stored recipe is not its canonical chunking
/// (see store-format §3) without holding it in memory.
pub fn canonical_key(src: &dyn Source) -> io::Result<ContentKey> {
    let mut hashes: Vec<(ChunkHash, u32)> = Vec::new();
    let mut buf = Vec::new();
    for region in canonical_regions(src) {
        match region {
            Region::Tensor { offset, len } => {
                for (at, l) in tensor_pieces(offset, len) {
                    buf.resize(l as usize, 0);
                    src.read_at(at, &mut buf)?;
                    hashes.push((ChunkHash::of(&buf), l));
                }
            }
            Region::Other { offset, len } => {
                let reader = SourceReader {
                    src,
                    pos: offset,
                    end: offset + len,
                };
                for c in fastcdc::v2020::StreamCDC::new(reader, CDC_MIN, CDC_AVG, CDC_MAX) {
                    let c = c.map_err(|e| match e {
                        fastcdc::v2020::Error::IoError(e) => e,
                        other => io::Error::other(other.to_string()),
                    })?;
                    hashes.push((ChunkHash::of(&c.data), c.length as u32));
                }
            }
        }
    }
    Ok(content_key(hashes.into_iter()))
}

/// `Read` over a byte range of a [`Source`].
struct SourceReader<'a> {
    src: &'a dyn Source,
    pos: u64,
    end: u64,
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64) as usize;
        self.src.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
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
