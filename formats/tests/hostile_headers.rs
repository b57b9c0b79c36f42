//! The hand-made hostile seeds of the fuzz corpus (`fuzz/corpus/*/hostile-*`,
//! written by fuzz/make_seeds.py): a safetensors header length of 2^60, zips
//! whose end-of-central-directory records claim 65535 and (ZIP64) 2^60
//! entries, an ONNX model nested 300 messages deep, and GGUF files claiming
//! 2^60 tensors or metadata pairs. Each must be an error, through `parse`
//! and through `layout` as the importer calls it, within a second: nothing
//! may be allocated or looped over by the claimed size, or recursed into as
//! deep as the nesting.
//!
//! The unit tests beside each parser check in-memory variants of these
//! inputs; this checks the committed seeds themselves, with a time bound,
//! and that they still claim what they are named for, so the corpus cannot
//! drift into harmless inputs.

use std::path::Path;
use std::time::{Duration, Instant};

use modelfs_formats::{layout, parse, Format, ParseError};

const LIMIT: Duration = Duration::from_secs(1);

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// `parse(format)` and `layout(file_name)` both fail, each within [`LIMIT`];
/// returns the parse error.
fn rejected_quickly(format: Format, file_name: &str, bytes: &[u8]) -> ParseError {
    let started = Instant::now();
    let err = parse(format, &bytes).expect_err("hostile input accepted by parse");
    let parsed_in = started.elapsed();
    let started = Instant::now();
    let found = layout(file_name, &bytes);
    let detected_in = started.elapsed();
    assert!(found.is_err(), "layout({file_name:?}) gave {found:?}");
    assert!(
        parsed_in < LIMIT && detected_in < LIMIT,
        "{file_name}: parse took {parsed_in:?}, layout {detected_in:?}"
    );
    err
}

#[test]
fn safetensors_header_claiming_2_pow_60_bytes() {
    let bytes = seed("safetensors", "hostile-header-len-2pow60");
    assert_eq!(u64_at(&bytes, 0), 1 << 60);
    let err = rejected_quickly(Format::Safetensors, "model.safetensors", &bytes);
    assert!(
        matches!(err, ParseError::SafetensorsHeaderTooLong { .. }),
        "{err}"
    );
}

#[test]
fn zip_end_records_claiming_huge_entry_counts() {
    // 32-bit end record: 65535 entries for a directory of 2.
    let bytes = seed("torch_zip", "hostile-eocd-65535-entries");
    let end = &bytes[bytes.len() - 22..];
    assert_eq!(&end[..4], b"PK\x05\x06");
    assert_eq!(&end[8..12], &[0xff; 4]);
    assert_eq!(bytes.windows(4).filter(|w| w == b"PK\x01\x02").count(), 2);
    rejected_quickly(Format::Torch, "pytorch_model.bin", &bytes);

    // ZIP64 end record: 2^60 entries.
    let bytes = seed("torch_zip", "hostile-zip64-eocd-2pow60-entries");
    let zip64 = bytes
        .windows(4)
        .position(|w| w == b"PK\x06\x06")
        .expect("ZIP64 end record");
    assert_eq!(u64_at(&bytes, zip64 + 24), 1 << 60);
    assert_eq!(u64_at(&bytes, zip64 + 32), 1 << 60);
    let err = rejected_quickly(Format::Torch, "model.pt", &bytes);
    assert!(matches!(err, ParseError::Malformed { .. }), "{err}");
}

#[test]
fn onnx_nested_far_past_the_depth_limit() {
    let bytes = seed("onnx", "hostile-nesting-300-levels");
    let err = rejected_quickly(Format::Onnx, "model.onnx", &bytes);
    assert!(matches!(err, ParseError::TooDeep { .. }), "{err}");
}

#[test]
fn gguf_claiming_2_pow_60_tensors_or_metadata_pairs() {
    for (name, count_at) in [
        ("hostile-tensor-count-2pow60", 8),
        ("hostile-kv-count-2pow60", 16),
    ] {
        let bytes = seed("gguf", name);
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u64_at(&bytes, count_at), 1 << 60, "{name}");
        rejected_quickly(Format::Gguf, "model.gguf", &bytes);
    }
}
