//! GGUF v2/v3 (little-endian): magic, version, tensor and metadata counts,
//! metadata key/value pairs, tensor infos, then aligned tensor data.
//!
//! Only two things are needed from the metadata: `general.alignment` and
//! where it ends. Everything else, including tokenizer vocabularies that
//! run to tens of MiB, is skipped without being materialised.

use crate::reader::ByteReader;
use crate::{Format, ParseError, Source, TensorSpan};

pub(crate) const MAGIC: &[u8; 4] = b"GGUF";

const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &[u8] = b"general.alignment";

/// ggml's GGML_MAX_DIMS; llama.cpp rejects tensors with more dimensions.
const MAX_DIMS: u32 = 4;

/// Arrays of arrays are legal; real files nest at most once. The limit
/// keeps hostile nesting from exhausting the stack.
const MAX_ARRAY_NESTING: u32 = 8;

/// Smallest possible encodings, used to reject counts that cannot fit in
/// the rest of the file before looping over them.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // empty key, value type, 1-byte value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8; // empty name, n_dims=0, type, offset
const STRING_LEN_BYTES: u64 = 8;
const ARRAY_HEADER_BYTES: u64 = 4 + 8;

const TYPE_U32: u32 = 4;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// (elements per block, bytes per block) of ggml tensor types, matching
/// gguf-py's `GGML_QUANT_SIZES` except where noted. Types missing here
/// (removed or not yet known) get a span reaching to the next tensor.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),   // F32
        1 => (1, 2),   // F16
        2 => (32, 18), // Q4_0
        3 => (32, 20), // Q4_1
        6 => (32, 22), // Q5_0
        7 => (32, 24), // Q5_1
        8 => (32, 34), // Q8_0
        // Q8_1: gguf-py 0.19 still says 40 (from when d and s were f32);
        // ggml's block_q8_1 is two f16 + 32 int8 and static_asserts 36.
        9 => (32, 36),
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        40 => (64, 36),   // NVFP4
        41 => (128, 18),  // Q1_0
        _ => return None,
    })
}

struct TensorInfo {
    /// Relative to the start of the data section.
    offset: u64,
    /// `None` for ggml types this crate does not know.
    byte_len: Option<u64>,
}

pub(crate) fn tensor_spans(src: &dyn Source) -> Result<Vec<TensorSpan>, ParseError> {
    let mut reader = ByteReader::new(src, Format::Gguf);
    let mut magic = [0u8; 4];
    reader.read_exact("magic", &mut magic)?;
    if &magic != MAGIC {
        return Err(malformed(format!(
            "bad magic {magic:02x?}, expected \"GGUF\""
        )));
    }
    let version = reader.read_u32("version")?;
    if version != 2 && version != 3 {
        // Version 1 used 32-bit counts; a byte-swapped number is a
        // big-endian file. Neither is laid out as parsed below.
        return Err(malformed(format!(
            "unsupported version {version} (only 2 and 3)"
        )));
    }
    let tensor_count = reader.read_u64("tensor count")?;
    let kv_count = reader.read_u64("metadata count")?;
    check_count_fits(&reader, "metadata key/value pairs", kv_count, MIN_KV_BYTES)?;

    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..kv_count {
        let key_len = reader.read_u64("metadata key length")?;
        let is_alignment_key = if key_len == ALIGNMENT_KEY.len() as u64 {
            let mut key = [0u8; ALIGNMENT_KEY.len()];
            reader.read_exact("metadata key", &mut key)?;
            key == ALIGNMENT_KEY
        } else {
            reader.skip("metadata key", key_len)?;
            false
        };
        let value_type = reader.read_u32("metadata value type")?;
        if is_alignment_key {
            if value_type != TYPE_U32 {
                return Err(malformed(format!(
                    "general.alignment has value type {value_type}, expected u32 ({TYPE_U32})"
                )));
            }
            alignment = u64::from(reader.read_u32("general.alignment")?);
            if !alignment.is_power_of_two() {
                return Err(malformed(format!(
                    "general.alignment {alignment} is not a power of two"
                )));
            }
        } else {
            skip_value(&mut reader, value_type, 0)?;
        }
    }

    check_count_fits(&reader, "tensor infos", tensor_count, MIN_TENSOR_INFO_BYTES)?;
    // Each info read below consumes real bytes, so the list cannot outgrow
    // the file; the capacity hint is capped for the same reason.
    let mut infos = Vec::with_capacity(usize::try_from(tensor_count.min(4096)).unwrap_or(0));
    for _ in 0..tensor_count {
        infos.push(read_tensor_info(&mut reader, alignment)?);
    }

    let data_start = align_up(reader.position(), alignment)
        .ok_or_else(|| malformed("data section start overflows".to_string()))?;
    spans_from_infos(infos, data_start, reader.file_len())
}

fn read_tensor_info(reader: &mut ByteReader<'_>, alignment: u64) -> Result<TensorInfo, ParseError> {
    // The name is not needed: spans are identified by position only.
    let name_len = reader.read_u64("tensor name length")?;
    reader.skip("tensor name", name_len)?;
    let n_dims = reader.read_u32("tensor dimension count")?;
    if n_dims > MAX_DIMS {
        return Err(malformed(format!(
            "tensor has {n_dims} dimensions, more than ggml's {MAX_DIMS}"
        )));
    }
    let mut first_dim = 1u64;
    let mut elements = 1u64;
    for dim_index in 0..n_dims {
        let dim = reader.read_u64("tensor dimension")?;
        if dim_index == 0 {
            first_dim = dim;
        }
        elements = elements.checked_mul(dim).ok_or_else(|| {
            malformed(format!("tensor element count overflows (dimension {dim})"))
        })?;
    }
    let ggml_type = reader.read_u32("tensor type")?;
    let offset = reader.read_u64("tensor offset")?;
    if offset % alignment != 0 {
        return Err(malformed(format!(
            "tensor offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    let byte_len = match block_layout(ggml_type) {
        None => None,
        Some((block_elements, block_bytes)) => {
            // Rows are made of whole blocks (ggml quantizes along dim 0).
            if first_dim % block_elements != 0 {
                return Err(malformed(format!(
                    "tensor of ggml type {ggml_type} has first dimension {first_dim}, not a multiple of its block size {block_elements}"
                )));
            }
            let byte_len = (elements / block_elements)
                .checked_mul(block_bytes)
                .ok_or_else(|| malformed("tensor byte size overflows".to_string()))?;
            Some(byte_len)
        }
    };
    Ok(TensorInfo { offset, byte_len })
}

fn spans_from_infos(
    mut infos: Vec<TensorInfo>,
    data_start: u64,
    file_len: u64,
) -> Result<Vec<TensorSpan>, ParseError> {
    infos.sort_by_key(|info| info.offset);
    let mut spans = Vec::with_capacity(infos.len());
    for (index, info) in infos.iter().enumerate() {
        let offset = data_start
            .checked_add(info.offset)
            .filter(|&offset| offset <= file_len)
            .ok_or_else(|| {
                malformed(format!(
                    "tensor data offset {} (+ data start {data_start}) is past the end of the {file_len}-byte file",
                    info.offset
                ))
            })?;
        let len = match info.byte_len {
            Some(len) => len,
            // Unknown type: all we know is that its data runs until the
            // next tensor's data (or the end of the file). This may include
            // alignment padding, which only costs dedup for this tensor.
            None => {
                let next_offset = infos[index + 1..]
                    .iter()
                    .map(|next| next.offset)
                    .find(|&next| next > info.offset)
                    .map_or(Some(file_len), |next| data_start.checked_add(next));
                next_offset
                    .map(|end| end.min(file_len))
                    .and_then(|end| end.checked_sub(offset))
                    .unwrap_or(0)
            }
        };
        spans.push(TensorSpan { offset, len });
    }
    Ok(spans)
}

/// Skip one metadata value of `value_type` without materialising it.
fn skip_value(
    reader: &mut ByteReader<'_>,
    value_type: u32,
    nesting: u32,
) -> Result<(), ParseError> {
    if let Some(size) = fixed_value_size(value_type) {
        return reader.skip("metadata value", size);
    }
    match value_type {
        TYPE_STRING => {
            let len = reader.read_u64("metadata string length")?;
            reader.skip("metadata string", len)
        }
        TYPE_ARRAY => {
            if nesting >= MAX_ARRAY_NESTING {
                return Err(ParseError::TooDeep {
                    format: Format::Gguf,
                    limit: MAX_ARRAY_NESTING,
                });
            }
            let element_type = reader.read_u32("metadata array element type")?;
            let count = reader.read_u64("metadata array length")?;
            if let Some(size) = fixed_value_size(element_type) {
                let total = count.checked_mul(size).ok_or_else(|| {
                    reader.past_end("metadata array", reader.position(), u64::MAX)
                })?;
                return reader.skip("metadata array", total);
            }
            let min_element_bytes = match element_type {
                TYPE_STRING => STRING_LEN_BYTES,
                TYPE_ARRAY => ARRAY_HEADER_BYTES,
                other => return Err(unknown_value_type(other)),
            };
            check_count_fits(reader, "metadata array", count, min_element_bytes)?;
            for _ in 0..count {
                skip_value(reader, element_type, nesting + 1)?;
            }
            Ok(())
        }
        other => Err(unknown_value_type(other)),
    }
}

fn fixed_value_size(value_type: u32) -> Option<u64> {
    Some(match value_type {
        0 | 1 | 7 => 1, // u8, i8, bool
        2 | 3 => 2,     // u16, i16
        4..=6 => 4,     // u32, i32, f32
        10..=12 => 8,   // u64, i64, f64
        _ => return None,
    })
}

fn unknown_value_type(value_type: u32) -> ParseError {
    malformed(format!("unknown metadata value type {value_type}"))
}

/// Reject a declared count whose smallest possible encoding would not fit
/// in the rest of the file, before looping (or allocating) on it.
fn check_count_fits(
    reader: &ByteReader<'_>,
    what: &'static str,
    count: u64,
    min_bytes_each: u64,
) -> Result<(), ParseError> {
    match count.checked_mul(min_bytes_each) {
        Some(min_total) if min_total <= reader.remaining() => Ok(()),
        _ => Err(malformed(format!(
            "{count} {what} cannot fit in the remaining {} bytes",
            reader.remaining()
        ))),
    }
}

fn align_up(position: u64, alignment: u64) -> Option<u64> {
    position.checked_next_multiple_of(alignment)
}

fn malformed(reason: String) -> ParseError {
    ParseError::malformed(Format::Gguf, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect, layout, parse};

    /// Builds GGUF files for tests.
    struct Builder {
        version: u32,
        kvs: Vec<u8>,
        kv_count: u64,
        infos: Vec<u8>,
        tensor_count: u64,
        alignment: u64,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                version: 3,
                kvs: Vec::new(),
                kv_count: 0,
                infos: Vec::new(),
                tensor_count: 0,
                alignment: 32,
            }
        }

        fn string(out: &mut Vec<u8>, text: &str) {
            out.extend_from_slice(&(text.len() as u64).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }

        fn kv(mut self, key: &str, value_type: u32, value: &[u8]) -> Self {
            Self::string(&mut self.kvs, key);
            self.kvs.extend_from_slice(&value_type.to_le_bytes());
            self.kvs.extend_from_slice(value);
            self.kv_count += 1;
            self
        }

        fn alignment(mut self, alignment: u32) -> Self {
            // Invalid alignments are for rejection tests; lay the file out
            // with the default so building it cannot fail.
            if alignment.is_power_of_two() {
                self.alignment = u64::from(alignment);
            }
            self.kv("general.alignment", TYPE_U32, &alignment.to_le_bytes())
        }

        fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Self {
            Self::string(&mut self.infos, name);
            self.infos
                .extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for dim in dims {
                self.infos.extend_from_slice(&dim.to_le_bytes());
            }
            self.infos.extend_from_slice(&ggml_type.to_le_bytes());
            self.infos.extend_from_slice(&offset.to_le_bytes());
            self.tensor_count += 1;
            self
        }

        /// The file and its data section start.
        fn build(&self, data_len: usize) -> (Vec<u8>, u64) {
            let mut file = b"GGUF".to_vec();
            file.extend_from_slice(&self.version.to_le_bytes());
            file.extend_from_slice(&self.tensor_count.to_le_bytes());
            file.extend_from_slice(&self.kv_count.to_le_bytes());
            file.extend_from_slice(&self.kvs);
            file.extend_from_slice(&self.infos);
            let data_start = (file.len() as u64).next_multiple_of(self.alignment);
            file.resize(data_start as usize + data_len, 0xab);
            (file, data_start)
        }
    }

    fn string_array(strings: &[&str]) -> Vec<u8> {
        let mut value = TYPE_STRING.to_le_bytes().to_vec();
        value.extend_from_slice(&(strings.len() as u64).to_le_bytes());
        for text in strings {
            Builder::string(&mut value, text);
        }
        value
    }

    #[test]
    fn spans_follow_type_sizes_and_alignment() {
        let builder = Builder::new()
            .kv("general.architecture", TYPE_STRING, &{
                let mut value = Vec::new();
                Builder::string(&mut value, "llama");
                value
            })
            .kv(
                "tokenizer.ggml.tokens",
                TYPE_ARRAY,
                &string_array(&["a", "bb", ""]),
            )
            .kv("x.scores", TYPE_ARRAY, &{
                let mut value = 6u32.to_le_bytes().to_vec();
                value.extend_from_slice(&3u64.to_le_bytes());
                value.extend_from_slice(&[0; 12]);
                value
            })
            .alignment(64)
            .tensor("f32", &[3, 2], 0, 0)
            .tensor("q8_0", &[64], 8, 64)
            .tensor("empty", &[0, 5], 0, 192)
            .tensor("q4_k", &[256, 2], 12, 128 + 64);
        let (file, data_start) = builder.build(192 + 288);
        assert_eq!(data_start % 64, 0);
        assert_eq!(detect("model.bin", &file), Some(Format::Gguf));
        let layout = layout("model.gguf", &file).expect("valid").expect("gguf");
        assert_eq!(
            layout.tensors,
            vec![
                TensorSpan {
                    offset: data_start,
                    len: 24
                },
                TensorSpan {
                    offset: data_start + 64,
                    len: 68
                },
                TensorSpan {
                    offset: data_start + 192,
                    len: 288
                },
            ]
        );
    }

    #[test]
    fn unknown_type_extends_to_next_tensor_or_eof() {
        let (file, data_start) = Builder::new()
            .tensor("mystery", &[10], 99, 0)
            .tensor("f16", &[16], 1, 64)
            .tensor("mystery2", &[1], 31, 96)
            .build(100);
        let layout = parse(Format::Gguf, &file).expect("valid");
        assert_eq!(
            layout.tensors,
            vec![
                TensorSpan {
                    offset: data_start,
                    len: 64
                },
                TensorSpan {
                    offset: data_start + 64,
                    len: 32
                },
                TensorSpan {
                    offset: data_start + 96,
                    len: 4
                },
            ]
        );
    }

    #[test]
    fn hostile_counts_and_lengths_are_rejected() {
        let base = Builder::new().tensor("t", &[4], 0, 0);
        let (good, _) = base.build(16);
        assert!(parse(Format::Gguf, &good).is_ok());

        let mut huge_tensor_count = good.clone();
        huge_tensor_count[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(Format::Gguf, &huge_tensor_count).is_err());

        let mut huge_kv_count = good.clone();
        huge_kv_count[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(Format::Gguf, &huge_kv_count).is_err());

        let mut huge_name = good.clone();
        huge_name[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(parse(Format::Gguf, &huge_name).is_err());

        let mut huge_string = Vec::new();
        huge_string.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let (file, _) = Builder::new().kv("k", TYPE_STRING, &huge_string).build(0);
        assert!(parse(Format::Gguf, &file).is_err());

        let mut huge_array = 0u32.to_le_bytes().to_vec();
        huge_array.extend_from_slice(&u64::MAX.to_le_bytes());
        let (file, _) = Builder::new().kv("k", TYPE_ARRAY, &huge_array).build(0);
        assert!(parse(Format::Gguf, &file).is_err());

        let mut huge_string_array = TYPE_STRING.to_le_bytes().to_vec();
        huge_string_array.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let (file, _) = Builder::new()
            .kv("k", TYPE_ARRAY, &huge_string_array)
            .build(0);
        assert!(parse(Format::Gguf, &file).is_err());
    }

    #[test]
    fn inconsistent_tensor_infos_are_rejected() {
        let cases = [
            (
                "offset past EOF",
                Builder::new().tensor("t", &[4], 0, 1 << 40).build(16).0,
            ),
            (
                "data past EOF",
                Builder::new().tensor("t", &[5], 0, 0).build(16).0,
            ),
            (
                "unaligned",
                Builder::new().tensor("t", &[4], 0, 4).build(64).0,
            ),
            (
                "overflow",
                Builder::new()
                    .tensor("t", &[1 << 40, 1 << 40], 0, 0)
                    .build(16)
                    .0,
            ),
            (
                "partial block",
                Builder::new().tensor("t", &[33], 8, 0).build(64).0,
            ),
            (
                "too many dims",
                Builder::new()
                    .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
                    .build(16)
                    .0,
            ),
            (
                "overlap",
                Builder::new()
                    .tensor("a", &[16], 0, 0)
                    .tensor("b", &[16], 0, 32)
                    .build(96)
                    .0,
            ),
            ("bad alignment", Builder::new().alignment(48).build(0).0),
            ("zero alignment", Builder::new().alignment(0).build(0).0),
            (
                "alignment type",
                Builder::new()
                    .kv("general.alignment", 10, &[0; 8])
                    .build(0)
                    .0,
            ),
            (
                "unknown kv type",
                Builder::new().kv("k", 13, &[0; 8]).build(0).0,
            ),
        ];
        for (case, file) in cases {
            assert!(
                parse(Format::Gguf, &file).is_err(),
                "{case} should be rejected"
            );
        }

        let mut version_one = Builder::new().build(0).0;
        version_one[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse(Format::Gguf, &version_one).is_err());
    }

    #[test]
    fn nested_arrays_hit_the_depth_limit() {
        let mut value = Vec::new();
        for _ in 0..1000 {
            value.extend_from_slice(&TYPE_ARRAY.to_le_bytes());
            value.extend_from_slice(&1u64.to_le_bytes());
        }
        value.extend_from_slice(&0u32.to_le_bytes());
        value.extend_from_slice(&0u64.to_le_bytes());
        let (file, _) = Builder::new().kv("k", TYPE_ARRAY, &value).build(0);
        assert!(matches!(
            parse(Format::Gguf, &file),
            Err(ParseError::TooDeep { .. })
        ));
    }

    /// The table against gguf-py's `GGML_QUANT_SIZES`, captured into
    /// expected.json by make_fixtures.py.
    #[test]
    fn type_table_matches_gguf_py() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/expected.json");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let sizes = expected["ggml_quant_sizes"].as_object().expect("table");
        assert!(sizes.len() >= 30);
        for (ggml_type, size) in sizes {
            let ggml_type: u32 = ggml_type.parse().expect("numeric type");
            let oracle = (
                size[0].as_u64().expect("block"),
                size[1].as_u64().expect("bytes"),
            );
            if ggml_type == 9 {
                // Known stale entry in gguf-py; see block_layout.
                assert_eq!(oracle, (32, 40));
                assert_eq!(block_layout(9), Some((32, 36)));
            } else {
                assert_eq!(
                    block_layout(ggml_type),
                    Some(oracle),
                    "ggml type {ggml_type}"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (file, _) = Builder::new()
            .kv(
                "tokenizer.ggml.tokens",
                TYPE_ARRAY,
                &string_array(&["a", "bb"]),
            )
            .tensor("t", &[8], 0, 0)
            .build(32);
        for cut in 0..file.len() {
            assert!(
                parse(Format::Gguf, &file[..cut].to_vec()).is_err(),
                "cut at {cut}"
            );
        }
    }
}
