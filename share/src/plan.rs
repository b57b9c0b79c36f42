//! Which pages of a file mapping may come from an object, by §11's rule:
//! a page wholly inside one run whose file and object offsets agree modulo
//! the page size (the file's last partial page too, when the object ends
//! where the file does). Pure arithmetic, so it is tested here rather than
//! through a mount.

use crate::wire::Run;
use crate::PAGE;

/// Part of a mapping to take from an object instead of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset from the start of the mapping (page aligned).
    pub map_offset: u64,
    /// Bytes (a page multiple).
    pub len: u64,
    /// Index of the object in the layout.
    pub object: u32,
    /// Offset in the object (page aligned).
    pub object_offset: u64,
}

fn round_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

fn round_down(x: u64) -> u64 {
    x / PAGE * PAGE
}

/// The pieces of a mapping of file bytes `[offset, offset + len)` (offset
/// page aligned, as mmap requires) that can come from objects, given the
/// file's runs (sorted, disjoint), its size and the objects' lengths.
pub fn plan_pieces(
    runs: &[Run],
    object_lens: &[u64],
    file_size: u64,
    offset: u64,
    len: u64,
) -> Vec<Piece> {
    let Some(range_end) = offset.checked_add(len).map(round_up) else {
        return Vec::new();
    };
    let mut pieces: Vec<Piece> = Vec::new();
    for run in runs {
        if run.file_offset % PAGE != run.object_offset % PAGE {
            continue;
        }
        let Some(&object_len) = object_lens.get(run.object as usize) else {
            continue;
        };
        let run_end = run.file_offset + run.len;
        let start = round_up(run.file_offset.max(offset));
        let tail_ends_together = run_end == file_size && run.object_offset + run.len == object_len;
        let end = if tail_ends_together {
            round_up(run_end)
        } else {
            round_down(run_end)
        }
        .min(range_end);
        if end <= start {
            continue;
        }
        let piece = Piece {
            map_offset: start - offset,
            len: end - start,
            object: run.object,
            object_offset: run.object_offset + (start - run.file_offset),
        };
        match pieces.last_mut() {
            Some(last)
                if last.object == piece.object
                    && last.map_offset + last.len == piece.map_offset
                    && last.object_offset + last.len == piece.object_offset =>
            {
                last.len += piece.len
            }
            _ => pieces.push(piece),
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(file_offset: u64, len: u64, object: u32, object_offset: u64) -> Run {
        Run {
            file_offset,
            len,
            object,
            object_offset,
        }
    }

    #[test]
    fn whole_file_object_maps_every_page_including_the_tail() {
        let runs = [run(0, 10_000, 0, 0)];
        let p = plan_pieces(&runs, &[10_000], 10_000, 0, 10_000);
        assert_eq!(
            p,
            vec![Piece {
                map_offset: 0,
                len: 12_288,
                object: 0,
                object_offset: 0
            }]
        );
    }

    #[test]
    fn tail_page_stays_with_the_file_when_the_object_goes_on() {
        let runs = [run(0, 10_000, 0, 0)];
        let p = plan_pieces(&runs, &[50_000], 10_000, 0, 10_000);
        assert_eq!(
            p,
            vec![Piece {
                map_offset: 0,
                len: 8192,
                object: 0,
                object_offset: 0
            }]
        );
    }

    #[test]
    fn incongruent_runs_and_edge_pages_are_left_to_the_file() {
        // Header page from the file; a run shifted by 100 bytes cannot share.
        let runs = [run(100, 9000, 0, 0), run(9100, 20_000, 1, 9100 + 4096)];
        let p = plan_pieces(&runs, &[9000, 40_000], 29_100, 0, 29_100);
        // Only run 1 is congruent: pages [12288, 28672) inside [9100, 29100).
        assert_eq!(
            p,
            vec![Piece {
                map_offset: 12_288,
                len: 16_384,
                object: 1,
                object_offset: 12_288 + 4096
            }]
        );
    }

    #[test]
    fn a_window_of_the_file_maps_relative_to_its_start() {
        let runs = [run(0, 1 << 20, 0, 0)];
        let p = plan_pieces(&runs, &[1 << 20], 1 << 20, 8192, 3 * 4096);
        assert_eq!(
            p,
            vec![Piece {
                map_offset: 0,
                len: 12_288,
                object: 0,
                object_offset: 8192
            }]
        );
    }

    #[test]
    fn adjacent_runs_of_one_object_merge() {
        let runs = [
            run(0, 4096, 0, 0),
            run(4096, 4096, 0, 4096),
            run(8192, 4096, 1, 0),
        ];
        let p = plan_pieces(&runs, &[8192, 4096], 12_288, 0, 12_288);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].len, 8192);
    }
}
