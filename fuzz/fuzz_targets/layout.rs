//! Fuzz target: format detection by file name and content, `detect(name, ..)`
//! and `layout(name, ..)`, as the importer calls them on every file.
//!
//! Input: the first byte picks a file name from `NAMES` (if it is below
//! `NAMES.len()`), or else says how many of the following bytes are a fuzzed
//! name; the rest is the file.
//!
//! Checks, besides no panic, hang or unbounded allocation:
//! * an Ok layout keeps the span invariants (non-empty, sorted,
//!   non-overlapping, within the file);
//! * `layout` agrees with `detect` (same format, or both "not recognised"),
//!   and with `parse` of the detected format (the same layout);
//! * an explicit `.safetensors`, `.gguf` or `.onnx` extension is never "not
//!   recognised": a damaged file of that kind is an error (lib.rs contract).
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelfs_formats::{detect, layout, parse, Format};

/// Names that steer detection down each path: explicit extensions (any
/// case, last component only), the torch extensions that hold a zip to
/// being a checkpoint, and names that leave it to the content.
const NAMES: &[&str] = &[
    "model.safetensors",
    "model.gguf",
    "model.onnx",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "model.ckpt",
    "notes.txt",
    "noext",
    ".gguf",
    "dir.onnx/model",
    "org/Model.SafeTensors",
    "x.GGUF",
    "a\\b.onnx",
];

fn split(data: &[u8]) -> (String, &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return (String::new(), data);
    };
    let first = usize::from(first);
    if first < NAMES.len() {
        return (NAMES[first].to_string(), rest);
    }
    let name_len = (first - NAMES.len()).min(rest.len());
    let (name, file) = rest.split_at(name_len);
    (String::from_utf8_lossy(name).into_owned(), file)
}

/// The format an explicit extension forces, per lib.rs: the last path
/// component's extension, lower-cased, with a non-empty stem.
fn forced_format(name: &str) -> Option<Format> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let (stem, ext) = base.rsplit_once('.')?;
    if stem.is_empty() {
        return None;
    }
    match ext.to_ascii_lowercase().as_str() {
        "safetensors" => Some(Format::Safetensors),
        "gguf" => Some(Format::Gguf),
        "onnx" => Some(Format::Onnx),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let (name, file) = split(data);
    let detected = detect(&name, &file);
    let found = layout(&name, &file);
    match &found {
        Ok(Some(found)) => {
            modelfs_fuzz::check_layout(found, file.len() as u64);
            assert_eq!(detected, Some(found.format), "detect disagrees with layout");
            let parsed = parse(found.format, &file).expect("layout succeeded, so parse must");
            assert_eq!(&parsed, found, "layout and parse of the same format differ");
        }
        Ok(None) => assert_eq!(detected, None, "detect recognised what layout did not"),
        // detect maps errors to "not recognised", so it may say either.
        Err(_) => {}
    }
    if let Some(forced) = forced_format(&name) {
        assert_eq!(
            detected,
            Some(forced),
            "explicit extension of {name:?} ignored"
        );
        assert!(
            !matches!(found, Ok(None)),
            "{name:?} has an explicit extension but layout says not recognised"
        );
    }
});
