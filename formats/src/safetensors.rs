//! safetensors: `u64` LE header length N, N bytes of JSON, then tensor data.
//!
//! Each tensor's `data_offsets` are relative to the end of the header, and
//! the bytes between them are exactly the tensor, so spans need no further
//! trimming.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::{Format, ParseError, Source, TensorSpan};

/// Real headers are at most a few MiB even for models with tens of
/// thousands of tensors; the header is read into memory whole, so an
/// attacker must not be able to pick its size.
pub(crate) const HEADER_LIMIT: u64 = 100 * 1024 * 1024;

const LENGTH_PREFIX: u64 = 8;

/// Whether the file starts like a safetensors file: a length prefix that
/// fits the file and the limit, followed by a JSON object.
pub(crate) fn looks_like_header(src: &dyn Source) -> Result<bool, ParseError> {
    let mut start = [0u8; 10];
    if src.len() < start.len() as u64 {
        return Ok(false);
    }
    src.read_at(0, &mut start)?;
    let header_len = u64::from_le_bytes([
        start[0], start[1], start[2], start[3], start[4], start[5], start[6], start[7],
    ]);
    // `{"` rather than just `{`: the smallest real header is `{}` and any
    // header with tensors starts with a key; requiring the quote makes an
    // accidental match on arbitrary binary data less likely.
    let plausible_json = start[8] == b'{' && (start[9] == b'"' || start[9] == b'}');
    Ok(plausible_json
        && (2..=HEADER_LIMIT).contains(&header_len)
        && header_len <= src.len() - LENGTH_PREFIX)
}

pub(crate) fn tensor_spans(src: &dyn Source) -> Result<Vec<TensorSpan>, ParseError> {
    let file_len = src.len();
    if file_len < LENGTH_PREFIX {
        return Err(ParseError::PastEnd {
            format: Format::Safetensors,
            what: "header length",
            offset: 0,
            len: LENGTH_PREFIX,
            file_len,
        });
    }
    let mut prefix = [0u8; 8];
    src.read_at(0, &mut prefix)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > file_len - LENGTH_PREFIX {
        return Err(ParseError::SafetensorsHeaderTooLong {
            header_len,
            file_len,
        });
    }
    if header_len > HEADER_LIMIT {
        return Err(ParseError::SafetensorsHeaderOverLimit {
            header_len,
            limit: HEADER_LIMIT,
        });
    }
    // Bounded by HEADER_LIMIT above, so this fits in usize.
    let mut header_json = vec![0u8; header_len as usize];
    src.read_at(LENGTH_PREFIX, &mut header_json)?;
    let header: Header =
        serde_json::from_slice(&header_json).map_err(ParseError::SafetensorsJson)?;

    let data_start = LENGTH_PREFIX + header_len;
    let data_len = file_len - data_start;
    let mut spans = Vec::with_capacity(header.tensors.len());
    for (name, info) in header.tensors {
        let [begin, end] = info.data_offsets;
        if begin > end {
            return Err(malformed(format!(
                "tensor {name:?} has data_offsets [{begin}, {end}] with begin after end"
            )));
        }
        if end > data_len {
            return Err(malformed(format!(
                "tensor {name:?} data ends at {end}, past the {data_len} bytes of data"
            )));
        }
        let len = end - begin;
        check_size_matches_shape(&name, &info, len)?;
        spans.push(TensorSpan {
            offset: data_start + begin,
            len,
        });
    }
    Ok(spans)
}

fn malformed(reason: String) -> ParseError {
    ParseError::malformed(Format::Safetensors, reason)
}

/// A shape/dtype that disagrees with the byte range means the header is
/// corrupt or hostile. Dtypes newer than this table are accepted unchecked
/// so that new formats still get tensor boundaries.
fn check_size_matches_shape(name: &str, info: &TensorInfo, len: u64) -> Result<(), ParseError> {
    let Some(bits) = dtype_bits(&info.dtype) else {
        return Ok(());
    };
    let bits_total = info
        .shape
        .iter()
        .try_fold(1u64, |acc, &dim| acc.checked_mul(dim))
        .and_then(|elements| elements.checked_mul(bits));
    let expected = bits_total.filter(|bits| bits % 8 == 0).map(|bits| bits / 8);
    if expected != Some(len) {
        return Err(malformed(format!(
            "tensor {name:?} ({} {:?}) should occupy {} bytes but data_offsets span {len}",
            info.dtype,
            info.shape,
            expected.map_or_else(|| "an impossible number of".to_string(), |n| n.to_string()),
        )));
    }
    Ok(())
}

/// Bits per element, as defined by the safetensors `Dtype` enum.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

#[derive(Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's tensors, in header order. Deserialized with a map visitor
/// instead of via `serde_json::Value` so that a large header is never held
/// twice in memory as a generic tree, and `__metadata__` is skipped
/// without being materialised.
struct Header {
    tensors: Vec<(String, TensorInfo)>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(HeaderVisitor)
    }
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut tensors = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let info = map.next_value::<TensorInfo>()?;
            tensors.push((name, info));
        }
        Ok(Header { tensors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{detect, layout, parse};

    fn build(header: &str, data: &[u8]) -> Vec<u8> {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(data);
        file
    }

    #[test]
    fn spans_skip_header_and_zero_length_tensors() {
        let header = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"empty":{"dtype":"F16","shape":[0,3],"data_offsets":[12,12]}}  "#;
        let file = build(header, &[7u8; 12]);
        let data_start = 8 + header.len() as u64;
        assert_eq!(
            detect("model.safetensors", &file),
            Some(Format::Safetensors)
        );
        assert_eq!(detect("weights.bin", &file), Some(Format::Safetensors));
        let layout = layout("m.safetensors", &file)
            .expect("valid")
            .expect("recognised");
        assert_eq!(
            layout.tensors,
            vec![
                TensorSpan {
                    offset: data_start,
                    len: 4
                },
                TensorSpan {
                    offset: data_start + 4,
                    len: 8
                },
            ]
        );
        assert!(layout.external.is_empty());
    }

    #[test]
    fn huge_header_length_is_rejected_with_sizes_in_message() {
        let mut file = (1u64 << 60).to_le_bytes().to_vec();
        file.resize(1000, b' ');
        let err = parse(Format::Safetensors, &file).expect_err("header past EOF");
        assert_eq!(
            err.to_string(),
            "safetensors header length 1152921504606846976 exceeds file size 1000"
        );
        // Not plausible as a safetensors header, so content sniffing ignores it.
        assert_eq!(detect("x.bin", &file), None);
    }

    #[test]
    fn truncated_and_inconsistent_headers_are_errors() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short prefix", vec![1, 2, 3]),
            ("empty", Vec::new()),
            ("not json", build("{nope", &[])),
            ("not an object", build("[1,2]", &[])),
            (
                "offsets past data",
                build(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
                    &[0; 3],
                ),
            ),
            (
                "begin after end",
                build(
                    r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
                    &[0; 4],
                ),
            ),
            (
                "shape disagrees",
                build(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
            ),
            (
                "shape overflows",
                build(
                    r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
            ),
            (
                "missing field",
                build(r#"{"a":{"dtype":"F32","data_offsets":[0,4]}}"#, &[0; 4]),
            ),
            (
                "overlap",
                build(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
                    &[0; 5],
                ),
            ),
        ];
        for (case, file) in cases {
            assert!(
                parse(Format::Safetensors, &file).is_err(),
                "{case} should be rejected"
            );
        }
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        // serde_json skips ignored values iteratively, so deep metadata is
        // harmless; nesting inside a tensor entry hits its recursion limit.
        let deep_metadata = format!(
            "{{\"__metadata__\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(parse(Format::Safetensors, &build(&deep_metadata, &[])).is_ok());
        let deep_tensor = format!(
            "{{\"a\":{{\"dtype\":{}{}}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            parse(Format::Safetensors, &build(&deep_tensor, &[])),
            Err(ParseError::SafetensorsJson(_))
        ));
    }

    #[test]
    fn unknown_dtype_is_accepted_without_size_check() {
        let header = r#"{"a":{"dtype":"F3_FUTURE","shape":[7],"data_offsets":[0,3]}}"#;
        let file = build(header, &[1, 2, 3]);
        let layout = parse(Format::Safetensors, &file).expect("valid");
        assert_eq!(layout.tensors.len(), 1);
    }
}
