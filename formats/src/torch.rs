//! `torch.save` checkpoints: a zip archive (ZIP64 once past 4 GiB) whose
//! `<archive>/data/<n>` entries each hold one tensor storage, STORED
//! (uncompressed) and 64-byte aligned, next to the `data.pkl` pickle that
//! describes them.
//!
//! A storage can back several tensors (views), so the span is the storage,
//! which is also the unit another checkpoint of the same weights would hold.

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use zip::read::{ArchiveOffset, Config};
use zip::{CompressionMethod, ZipArchive};

use crate::{Format, ParseError, Source, TensorSpan};

pub(crate) const LOCAL_HEADER_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// Enough to take the central directory in a few reads; the zip crate's own
/// reads are small and frequent.
const READ_BUFFER_BYTES: usize = 16 * 1024;

pub(crate) type Archive<'a> = ZipArchive<BufReader<SourceReader<'a>>>;

/// Far more storages than any real checkpoint holds (one per distinct
/// tensor storage; large models have thousands), yet small enough that the
/// zip crate's per-entry bookkeeping stays in the hundreds of MiB.
const MAX_ENTRIES: u64 = 1 << 20;

/// Smallest central directory header: signature plus fixed fields.
const MIN_CENTRAL_HEADER_BYTES: u64 = 46;

/// Longest zip comment, which bounds how far before the end the end record
/// can sit.
const MAX_COMMENT_BYTES: u64 = 0xffff;
const END_RECORD_BYTES: u64 = 22;
const ZIP64_LOCATOR_BYTES: u64 = 20;
const ZIP64_END_RECORD_BYTES: u64 = 56;

/// Open the archive's central directory.
///
/// The archive offset is pinned to 0 because `torch.save` never prepends
/// anything, and "detect" mode would scan the whole file for signatures on
/// a damaged multi-GiB checkpoint.
pub(crate) fn open(src: &dyn Source) -> Result<Archive<'_>, ParseError> {
    check_declared_entry_count(src)?;
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, SourceReader::new(src));
    Ok(ZipArchive::with_config(config, reader)?)
}

/// Reject a ZIP64 end record whose entry count is absurd, before the zip
/// crate sees it.
///
/// The zip crate (9.8.1, checked in its source) pre-allocates its entry
/// table from the declared count, capped only by "46 bytes per entry must
/// fit before the end record". At a few hundred bytes of bookkeeping per
/// entry, a hostile multi-GiB file could thus make it allocate several
/// times the file size. Only ZIP64 counts are checked: a 32-bit count is at
/// most 65535 and harmless, and checking stray 32-bit end-record signatures
/// in trailing tensor data could reject valid files. A ZIP64 record is
/// only considered where both its locator and its own signature are in
/// place, which stray bytes essentially never achieve.
fn check_declared_entry_count(src: &dyn Source) -> Result<(), ParseError> {
    let file_len = src.len();
    let tail_len = file_len.min(END_RECORD_BYTES + MAX_COMMENT_BYTES);
    let tail_start = file_len - tail_len;
    // Bounded by the constant above.
    let mut tail = vec![0u8; tail_len as usize];
    src.read_at(tail_start, &mut tail)?;
    for (index, _) in tail
        .windows(4)
        .enumerate()
        .filter(|(_, window)| window == b"PK\x05\x06")
    {
        let end_record_offset = tail_start + index as u64;
        let Some(locator_offset) = end_record_offset.checked_sub(ZIP64_LOCATOR_BYTES) else {
            continue;
        };
        let mut locator = [0u8; ZIP64_LOCATOR_BYTES as usize];
        src.read_at(locator_offset, &mut locator)?;
        if &locator[..4] != b"PK\x06\x07" {
            continue;
        }
        let zip64_end_offset = u64::from_le_bytes(le_array(&locator[8..16]));
        let fits = zip64_end_offset
            .checked_add(ZIP64_END_RECORD_BYTES)
            .is_some_and(|end| end <= locator_offset);
        if !fits {
            continue;
        }
        let mut record = [0u8; ZIP64_END_RECORD_BYTES as usize];
        src.read_at(zip64_end_offset, &mut record)?;
        if &record[..4] != b"PK\x06\x06" {
            continue;
        }
        let on_this_disk = u64::from_le_bytes(le_array(&record[24..32]));
        let total = u64::from_le_bytes(le_array(&record[32..40]));
        let declared = on_this_disk.max(total);
        let limit = MAX_ENTRIES.min(file_len / MIN_CENTRAL_HEADER_BYTES);
        if declared > limit {
            return Err(ParseError::malformed(
                Format::Torch,
                format!(
                    "zip declares {declared} entries; a {file_len}-byte checkpoint can hold at most {limit}"
                ),
            ));
        }
    }
    Ok(())
}

fn le_array(bytes: &[u8]) -> [u8; 8] {
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    array
}

/// The archive if `src` is a readable zip with a `data.pkl` entry; `None`
/// for other zips (including unreadable ones: a broken zip carries no
/// tensor boundaries we could trust). I/O errors are still errors.
pub(crate) fn open_checkpoint(src: &dyn Source) -> Result<Option<Archive<'_>>, ParseError> {
    let archive = match open(src) {
        Ok(archive) => archive,
        Err(ParseError::Zip(zip::result::ZipError::Io(err))) => return Err(err.into()),
        Err(_) => return Ok(None),
    };
    Ok(is_checkpoint(&archive).then_some(archive))
}

/// A zip is a torch checkpoint if it has a `data.pkl` entry.
pub(crate) fn is_checkpoint(archive: &Archive<'_>) -> bool {
    archive
        .file_names_raw()
        .any(|name| last_component(name) == b"data.pkl")
}

pub(crate) fn tensor_spans(archive: &mut Archive<'_>) -> Result<Vec<TensorSpan>, ParseError> {
    // Pick storages from the central directory first: reading an entry's
    // local header (needed for its data offset) costs a seek and a read.
    let storage_indices: Vec<usize> = archive
        .file_names_raw()
        .enumerate()
        .filter(|(_, name)| is_storage_name(name))
        .map(|(index, _)| index)
        .collect();
    let mut spans = Vec::with_capacity(storage_indices.len());
    for index in storage_indices {
        let entry = archive.by_index_raw(index)?;
        // torch.save only ever STOREs storages; a compressed or encrypted
        // entry's bytes are not the tensor's bytes, so it gets no span.
        if entry.compression() != CompressionMethod::Stored
            || entry.encrypted()
            || entry.compressed_size() != entry.size()
        {
            continue;
        }
        let offset = entry.data_start().ok_or_else(|| {
            ParseError::malformed(
                Format::Torch,
                "zip entry data offset unknown after reading its header",
            )
        })?;
        spans.push(TensorSpan {
            offset,
            len: entry.compressed_size(),
        });
    }
    Ok(spans)
}

fn last_component(name: &[u8]) -> &[u8] {
    name.rsplit(|&byte| byte == b'/').next().unwrap_or(name)
}

/// `<anything>/data/<digits>`; `<archive>/.data/...` holds bookkeeping, not
/// storages.
fn is_storage_name(name: &[u8]) -> bool {
    let mut components = name.rsplit(|&byte| byte == b'/');
    let key = components.next().unwrap_or_default();
    let parent = components.next().unwrap_or_default();
    parent == b"data" && !key.is_empty() && key.iter().all(u8::is_ascii_digit)
}

/// `Read + Seek` over a [`Source`], which is what the zip crate consumes.
pub(crate) struct SourceReader<'a> {
    src: &'a dyn Source,
    len: u64,
    pos: u64,
}

impl<'a> SourceReader<'a> {
    fn new(src: &'a dyn Source) -> Self {
        SourceReader {
            src,
            len: src.len(),
            pos: 0,
        }
    }
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.len.saturating_sub(self.pos);
        let count = usize::try_from(available).map_or(buf.len(), |n| n.min(buf.len()));
        self.src.read_at(self.pos, &mut buf[..count])?;
        self.pos += count as u64;
        Ok(count)
    }
}

impl Seek for SourceReader<'_> {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        let new_pos = match target {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = new_pos.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before start or past u64")
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{detect, layout, parse};

    /// One entry of a hand-built zip.
    pub(crate) struct Entry<'a> {
        pub name: &'a str,
        pub data: &'a [u8],
        pub method: u16,
        /// Overrides the uncompressed size recorded in the headers.
        pub declared_size: Option<u32>,
    }

    pub(crate) fn stored<'a>(name: &'a str, data: &'a [u8]) -> Entry<'a> {
        Entry {
            name,
            data,
            method: 0,
            declared_size: None,
        }
    }

    /// A minimal zip writer in the `torch.save` layout: STORED entries,
    /// data padded to 64-byte alignment with an extra field like PyTorch's.
    /// Returns the file and each entry's data offset.
    pub(crate) fn build_zip(entries: &[Entry<'_>]) -> (Vec<u8>, Vec<u64>) {
        let mut file = Vec::new();
        let mut central = Vec::new();
        let mut data_offsets = Vec::new();
        for entry in entries {
            let header_offset = file.len() as u32;
            let unpadded = file.len() + 30 + entry.name.len() + 4;
            let padding = (64 - unpadded % 64) % 64;
            let size = entry.data.len() as u32;
            let declared = entry.declared_size.unwrap_or(size);
            let fields = |out: &mut Vec<u8>| {
                out.extend_from_slice(&entry.method.to_le_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]); // time, date
                out.extend_from_slice(&0u32.to_le_bytes()); // crc (unchecked by raw reads)
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&declared.to_le_bytes());
                out.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
            };
            file.extend_from_slice(b"PK\x03\x04");
            file.extend_from_slice(&20u16.to_le_bytes()); // version needed
            file.extend_from_slice(&0u16.to_le_bytes()); // flags
            fields(&mut file);
            file.extend_from_slice(&((4 + padding) as u16).to_le_bytes());
            file.extend_from_slice(entry.name.as_bytes());
            file.extend_from_slice(b"FB");
            file.extend_from_slice(&(padding as u16).to_le_bytes());
            file.extend(std::iter::repeat_n(b'Z', padding));
            data_offsets.push(file.len() as u64);
            file.extend_from_slice(entry.data);

            central.extend_from_slice(b"PK\x01\x02");
            central.extend_from_slice(&20u16.to_le_bytes()); // made by
            central.extend_from_slice(&20u16.to_le_bytes()); // needed
            central.extend_from_slice(&0u16.to_le_bytes()); // flags
            fields(&mut central);
            central.extend_from_slice(&0u16.to_le_bytes()); // extra len
            central.extend_from_slice(&0u16.to_le_bytes()); // comment len
            central.extend_from_slice(&[0; 8]); // disk, internal attrs, external attrs
            central.extend_from_slice(&header_offset.to_le_bytes());
            central.extend_from_slice(entry.name.as_bytes());
        }
        let central_offset = file.len() as u32;
        file.extend_from_slice(&central);
        file.extend_from_slice(&end_of_central_directory(
            entries.len() as u16,
            central.len() as u32,
            central_offset,
        ));
        (file, data_offsets)
    }

    pub(crate) fn end_of_central_directory(count: u16, size: u32, offset: u32) -> Vec<u8> {
        let mut end = b"PK\x05\x06".to_vec();
        end.extend_from_slice(&[0; 4]); // disk numbers
        end.extend_from_slice(&count.to_le_bytes());
        end.extend_from_slice(&count.to_le_bytes());
        end.extend_from_slice(&size.to_le_bytes());
        end.extend_from_slice(&offset.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes()); // comment
        end
    }

    fn checkpoint_entries<'a>(first: &'a [u8], second: &'a [u8]) -> Vec<Entry<'a>> {
        vec![
            stored("archive/data.pkl", b"\x80\x02pickle"),
            stored("archive/byteorder", b"little"),
            stored("archive/data/0", first),
            stored("archive/data/1", second),
            stored("archive/data/2", b""),
            stored("archive/version", b"3\n"),
            stored("archive/.data/serialization_id", b"1234"),
        ]
    }

    #[test]
    fn storages_become_aligned_spans() {
        let first = [1u8; 40];
        let second = [2u8; 24];
        let (file, offsets) = build_zip(&checkpoint_entries(&first, &second));
        assert_eq!(detect("pytorch_model.bin", &file), Some(Format::Torch));
        let layout = layout("pytorch_model.bin", &file)
            .expect("valid")
            .expect("torch");
        assert_eq!(layout.format, Format::Torch);
        assert_eq!(
            layout.tensors,
            vec![
                TensorSpan {
                    offset: offsets[2],
                    len: 40
                },
                TensorSpan {
                    offset: offsets[3],
                    len: 24
                },
            ]
        );
        assert!(layout.tensors.iter().all(|span| span.offset % 64 == 0));
        assert_eq!(&file[offsets[2] as usize..][..40], &first[..]);
    }

    #[test]
    fn compressed_or_size_mismatched_storages_are_skipped() {
        let entries = vec![
            stored("a/data.pkl", b"p"),
            Entry {
                name: "a/data/0",
                data: b"deflated?",
                method: 8,
                declared_size: None,
            },
            Entry {
                name: "a/data/1",
                data: b"short",
                method: 0,
                declared_size: Some(500),
            },
            stored("a/data/2", b"good"),
            stored("a/data/x3", b"not a storage name"),
        ];
        let (file, offsets) = build_zip(&entries);
        let layout = parse(Format::Torch, &file).expect("valid");
        assert_eq!(
            layout.tensors,
            vec![TensorSpan {
                offset: offsets[3],
                len: 4
            }]
        );
    }

    #[test]
    fn plain_zip_and_legacy_pickle_are_not_detected() {
        let (plain, _) = build_zip(&[stored("readme.txt", b"hello"), stored("data/0", b"x")]);
        assert_eq!(detect("archive.bin", &plain), None);
        assert!(matches!(layout("archive.bin", &plain), Ok(None)));
        // parse() on an explicit Torch request takes any zip.
        assert_eq!(
            parse(Format::Torch, &plain)
                .expect("valid zip")
                .tensors
                .len(),
            1
        );

        let legacy_pickle =
            b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.".to_vec();
        assert_eq!(detect("old.pt", &legacy_pickle), None);
    }

    #[test]
    fn truncated_checkpoint_is_rejected() {
        let (file, offsets) = build_zip(&checkpoint_entries(&[1; 40], &[2; 24]));
        for cut in [4, 30, offsets[2] as usize, file.len() - 10, file.len() - 1] {
            let truncated = file[..cut].to_vec();
            assert!(parse(Format::Torch, &truncated).is_err(), "cut at {cut}");
            assert_eq!(detect("m.pt", &truncated), None, "cut at {cut}");
        }
    }

    #[test]
    fn absurd_entry_count_is_rejected_without_huge_allocation() {
        let (mut file, _) = build_zip(&[stored("a/data.pkl", b"p"), stored("a/data/0", b"xyz")]);
        // Claim 65535 entries in the 32-bit end record.
        let end = file.len() - 22;
        file[end + 8..end + 12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(parse(Format::Torch, &file).is_err());

        // A ZIP64 end record claiming 2^60 entries.
        let (mut file, _) = build_zip(&[stored("a/data.pkl", b"p"), stored("a/data/0", b"xyz")]);
        let end32 = file.split_off(file.len() - 22);
        let central_size = u64::from(u32::from_le_bytes([
            end32[12], end32[13], end32[14], end32[15],
        ]));
        let central_offset = u64::from(u32::from_le_bytes([
            end32[16], end32[17], end32[18], end32[19],
        ]));
        let eocd64_offset = file.len() as u64;
        file.extend_from_slice(&zip64_end_records(
            1 << 60,
            central_size,
            central_offset,
            eocd64_offset,
        ));
        file.extend_from_slice(&end_of_central_directory(0xffff, 0xffff_ffff, 0xffff_ffff));
        let err = parse(Format::Torch, &file).expect_err("absurd count");
        assert!(
            err.to_string().contains("1152921504606846976 entries"),
            "{err}"
        );
        // 1M + 1 entries is within u64 but not within the limit.
        let count_at = file.len() - 22 - 20 - 56 + 24;
        file[count_at..count_at + 16].copy_from_slice(
            &[
                &(MAX_ENTRIES + 1).to_le_bytes()[..],
                &(MAX_ENTRIES + 1).to_le_bytes()[..],
            ]
            .concat(),
        );
        assert!(matches!(
            parse(Format::Torch, &file),
            Err(ParseError::Malformed { .. })
        ));
    }

    /// ZIP64 end-of-central-directory record plus its locator.
    fn zip64_end_records(count: u64, central_size: u64, central_offset: u64, at: u64) -> Vec<u8> {
        let mut out = b"PK\x06\x06".to_vec();
        out.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&45u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]); // disk numbers
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&central_size.to_le_bytes());
        out.extend_from_slice(&central_offset.to_le_bytes());
        out.extend_from_slice(b"PK\x06\x07");
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out
    }

    /// A source that is zero everywhere except a few written pieces, so
    /// multi-GiB layouts can be tested without allocating them.
    struct SparseSource {
        len: u64,
        pieces: Vec<(u64, Vec<u8>)>,
    }

    impl Source for SparseSource {
        fn len(&self) -> u64 {
            self.len
        }

        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let end = offset
                .checked_add(buf.len() as u64)
                .filter(|&end| end <= self.len)
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past end"))?;
            buf.fill(0);
            for (start, bytes) in &self.pieces {
                let piece_end = start + bytes.len() as u64;
                let from = offset.max(*start);
                let to = end.min(piece_end);
                if from < to {
                    let dst = (from - offset) as usize..(to - offset) as usize;
                    let src = (from - start) as usize..(to - start) as usize;
                    buf[dst].copy_from_slice(&bytes[src]);
                }
            }
            Ok(())
        }
    }

    #[test]
    fn zip64_checkpoint_past_4_gib() {
        // Storage 0 is 4.5 GiB, so storage 1 starts past the 32-bit limit and
        // both sizes and offsets must come from ZIP64 extra fields.
        let big_len: u64 = 4_500_000_000;
        let small_len: u64 = 100;
        let mut head = Vec::new();
        let mut central = Vec::new();
        let mut pieces = Vec::new();
        let mut cursor = 0u64;
        let mut expected = Vec::new();
        for (name, len) in [
            ("ckpt/data.pkl", 8u64),
            ("ckpt/data/0", big_len),
            ("ckpt/data/1", small_len),
        ] {
            let header_offset = cursor;
            // Local header: ZIP64 extra with both sizes, then "FB" padding to 64.
            let zip64_extra_len = 4 + 16;
            let unpadded = cursor + 30 + name.len() as u64 + zip64_extra_len + 4;
            let padding = (64 - unpadded % 64) % 64;
            head.clear();
            head.extend_from_slice(b"PK\x03\x04");
            head.extend_from_slice(&45u16.to_le_bytes());
            head.extend_from_slice(&0u16.to_le_bytes());
            head.extend_from_slice(&0u16.to_le_bytes()); // stored
            head.extend_from_slice(&[0; 8]); // time, date, crc
            head.extend_from_slice(&u32::MAX.to_le_bytes());
            head.extend_from_slice(&u32::MAX.to_le_bytes());
            head.extend_from_slice(&(name.len() as u16).to_le_bytes());
            head.extend_from_slice(&((zip64_extra_len + 4 + padding) as u16).to_le_bytes());
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(&1u16.to_le_bytes());
            head.extend_from_slice(&16u16.to_le_bytes());
            head.extend_from_slice(&len.to_le_bytes());
            head.extend_from_slice(&len.to_le_bytes());
            head.extend_from_slice(b"FB");
            head.extend_from_slice(&(padding as u16).to_le_bytes());
            head.extend(std::iter::repeat_n(b'Z', padding as usize));
            pieces.push((cursor, head.clone()));
            cursor += head.len() as u64;
            expected.push(TensorSpan {
                offset: cursor,
                len,
            });
            cursor += len;

            central.extend_from_slice(b"PK\x01\x02");
            central.extend_from_slice(&45u16.to_le_bytes());
            central.extend_from_slice(&45u16.to_le_bytes());
            central.extend_from_slice(&0u16.to_le_bytes());
            central.extend_from_slice(&0u16.to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            central.extend_from_slice(&u32::MAX.to_le_bytes());
            central.extend_from_slice(&u32::MAX.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&28u16.to_le_bytes()); // extra: sizes + offset
            central.extend_from_slice(&[0; 10]); // comment len, disk, attrs
            central.extend_from_slice(&u32::MAX.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&1u16.to_le_bytes());
            central.extend_from_slice(&24u16.to_le_bytes());
            central.extend_from_slice(&len.to_le_bytes());
            central.extend_from_slice(&len.to_le_bytes());
            central.extend_from_slice(&header_offset.to_le_bytes());
        }
        let central_offset = cursor;
        let mut tail = central.clone();
        let eocd64_offset = central_offset + central.len() as u64;
        tail.extend_from_slice(&zip64_end_records(
            3,
            central.len() as u64,
            central_offset,
            eocd64_offset,
        ));
        tail.extend_from_slice(&end_of_central_directory(0xffff, 0xffff_ffff, 0xffff_ffff));
        let len = central_offset + tail.len() as u64;
        pieces.push((central_offset, tail));
        let src = SparseSource { len, pieces };

        assert_eq!(detect("big.bin", &src), Some(Format::Torch));
        let layout = layout("big.bin", &src).expect("valid").expect("torch");
        assert_eq!(layout.tensors, expected[1..].to_vec());
        assert!(layout.tensors[1].offset > u64::from(u32::MAX));
    }

    #[test]
    fn storage_names() {
        assert!(is_storage_name(b"archive/data/0"));
        assert!(is_storage_name(b"x/data/123"));
        assert!(!is_storage_name(b"archive/.data/serialization_id"));
        assert!(!is_storage_name(b"archive/data.pkl"));
        assert!(!is_storage_name(b"archive/data/"));
        assert!(!is_storage_name(b"archive/data/1a"));
        assert!(!is_storage_name(b"0"));
    }
}
