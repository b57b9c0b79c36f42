//! The parsers against files written by the real libraries.
//!
//! `tests/data/` is produced by `make_fixtures.py` with safetensors,
//! gguf-py's GGUFWriter, onnx and torch.save; `expected.json` holds the
//! spans that script computed independently (library readers, zip local
//! headers, locating the tensor bytes). Hand-built inputs in the unit tests
//! only show the parsers agree with our own reading of each format; these
//! show they agree with the writers people actually use.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use modelfs_formats::{
    committed_format, detect, layout, ExternalSpan, Format, Layout, Source, TensorSpan,
};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn expected() -> Value {
    let text = fs::read_to_string(data_dir().join("expected.json")).expect("expected.json exists");
    serde_json::from_str(&text).expect("expected.json is JSON")
}

fn files(expected: &Value) -> Vec<(String, Value)> {
    let files = expected["files"].as_object().expect("files object");
    assert!(files.len() >= 8, "fixtures missing: {files:?}");
    files
        .iter()
        .map(|(name, entry)| (name.clone(), entry.clone()))
        .collect()
}

fn u64_field(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {value}"))
}

fn expected_tensors(entry: &Value) -> Vec<TensorSpan> {
    entry["tensors"]
        .as_array()
        .expect("tensors array")
        .iter()
        .map(|span| TensorSpan {
            offset: u64_field(span, "offset"),
            len: u64_field(span, "len"),
        })
        .collect()
}

fn expected_external(entry: &Value) -> Vec<ExternalSpan> {
    entry["external"]
        .as_array()
        .expect("external array")
        .iter()
        .map(|span| ExternalSpan {
            location: span["location"].as_str().expect("location").to_string(),
            offset: u64_field(span, "offset"),
            len: u64_field(span, "len"),
        })
        .collect()
}

fn parse_file(name: &str) -> Option<Layout> {
    let file = File::open(data_dir().join(name)).expect("fixture exists");
    layout(name, &file).unwrap_or_else(|err| panic!("{name}: {err}"))
}

fn read_span(name: &str, offset: u64, len: u64) -> Vec<u8> {
    let file = File::open(data_dir().join(name)).expect("fixture exists");
    let mut bytes = vec![0u8; usize::try_from(len).expect("small span")];
    file.read_at(offset, &mut bytes).expect("span within file");
    bytes
}

#[test]
fn spans_match_what_the_writers_wrote() {
    for (name, entry) in files(&expected()) {
        let parsed = parse_file(&name);
        let Some(format) = entry["format"].as_str() else {
            assert_eq!(parsed, None, "{name} should not be recognised");
            continue;
        };
        let parsed = parsed.unwrap_or_else(|| panic!("{name} should be recognised as {format}"));
        assert_eq!(
            serde_json::to_value(parsed.format).expect("serializable"),
            format,
            "{name}"
        );
        assert_eq!(parsed.tensors, expected_tensors(&entry), "{name} tensors");
        assert_eq!(
            parsed.external,
            expected_external(&entry),
            "{name} external"
        );
        assert!(
            !parsed.tensors.is_empty() || !parsed.external.is_empty(),
            "{name}"
        );
    }
}

#[test]
fn file_and_in_memory_sources_agree() {
    for (name, _) in files(&expected()) {
        let bytes = fs::read(data_dir().join(&name)).expect("fixture exists");
        assert_eq!(
            layout(&name, &bytes).ok(),
            Some(parse_file(&name)),
            "{name}"
        );
        let file = File::open(data_dir().join(&name)).expect("fixture exists");
        assert_eq!(detect(&name, &file), detect(&name, &bytes), "{name}");
    }
}

/// The point of the crate: one tensor, stored by every writer, must come out
/// as byte-identical spans so the store deduplicates it across formats.
#[test]
fn the_shared_tensor_has_identical_spans_in_every_format() {
    let expected = expected();
    let shared_hex = expected["shared_hex"].as_str().expect("shared_hex");
    let shared: Vec<u8> = (0..shared_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&shared_hex[i..i + 2], 16).expect("hex"))
        .collect();
    let mut formats_seen = Vec::new();
    for (name, entry) in files(&expected) {
        let Some(parsed) = parse_file(&name) else {
            continue;
        };
        if let Some(span) = entry.get("shared").filter(|span| !span.is_null()) {
            let span = TensorSpan {
                offset: u64_field(span, "offset"),
                len: u64_field(span, "len"),
            };
            assert!(parsed.tensors.contains(&span), "{name} lacks {span:?}");
            assert_eq!(read_span(&name, span.offset, span.len), shared, "{name}");
            formats_seen.push(parsed.format);
        }
        if let Some(span) = entry.get("shared_external") {
            let span = ExternalSpan {
                location: span["location"].as_str().expect("location").to_string(),
                offset: u64_field(span, "offset"),
                len: u64_field(span, "len"),
            };
            assert!(parsed.external.contains(&span), "{name} lacks {span:?}");
            assert_eq!(
                read_span(&span.location, span.offset, span.len),
                shared,
                "{name}"
            );
            formats_seen.push(parsed.format);
        }
    }
    formats_seen.sort_by_key(|format| format.to_string());
    formats_seen.dedup();
    assert_eq!(
        formats_seen.len(),
        4,
        "shared tensor seen in {formats_seen:?}"
    );
}

/// A truncated download of each writer's file still declares its format by
/// name or magic, so the importer can tell it is damaged; the same bytes
/// under a name that commits to nothing are a guess at most.
#[test]
fn truncated_files_stay_committed_to_their_format() {
    let cases = [
        ("model.safetensors", Format::Safetensors),
        ("model.gguf", Format::Gguf),
        ("model.onnx", Format::Onnx),
        ("model.pt", Format::Torch),
    ];
    for (name, format) in cases {
        let bytes = fs::read(data_dir().join(name)).expect("fixture exists");
        assert_eq!(committed_format(name, &bytes), Some(format), "{name} whole");
        let cut = bytes[..bytes.len() * 6 / 10].to_vec();
        assert!(layout(name, &cut).is_err(), "{name} cut to 60% parses");
        assert_eq!(committed_format(name, &cut), Some(format), "{name} cut");
    }

    // torch.save output under a name that says nothing: the zip's data.pkl
    // entry commits it while its directory is readable.
    let pt = fs::read(data_dir().join("model.pt")).expect("fixture exists");
    assert_eq!(committed_format("weights", &pt), Some(Format::Torch));
    assert_eq!(committed_format("weights.zip", &&pt[..pt.len() / 2]), None);

    // A safetensors file recognised by its header alone is only a guess.
    let st = fs::read(data_dir().join("model.safetensors")).expect("fixture exists");
    let cut = &st[..st.len() - 1];
    assert_eq!(detect("weights", &cut.to_vec()), Some(Format::Safetensors));
    assert!(layout("weights", &cut.to_vec()).is_err());
    assert_eq!(committed_format("weights", &cut.to_vec()), None);

    // GGUF magic commits whatever the name.
    let gguf = fs::read(data_dir().join("model.gguf")).expect("fixture exists");
    assert_eq!(
        committed_format("weights.bin", &gguf[..100].to_vec()),
        Some(Format::Gguf)
    );

    // Neither a legacy (non-zip) pickle nor text is committed.
    let legacy = fs::read(data_dir().join("legacy.pt")).expect("fixture exists");
    assert_eq!(committed_format("legacy.pt", &legacy), None);
    assert_eq!(
        committed_format("config.json", &b"{\"a\": 1}".to_vec()),
        None
    );
    assert_eq!(
        committed_format("model.safetensors", &Vec::new()),
        Some(Format::Safetensors)
    );
}
