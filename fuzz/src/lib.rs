//! Checks shared by the fuzz targets in `fuzz_targets/`.

use modelfs_formats::{parse, Format, Layout};

/// The [`Layout`] invariants every consumer relies on, as
/// `formats/tests/hostile_mutations.rs` checks them: each tensor span is
/// non-empty, spans are sorted and do not overlap, every span lies within the
/// file, and every external span is non-empty.
pub fn check_layout(layout: &Layout, file_len: u64) {
    let mut previous_end = 0u64;
    for span in &layout.tensors {
        assert!(span.len > 0, "empty span {span:?}");
        assert!(
            span.offset >= previous_end,
            "span {span:?} is unsorted or overlaps the previous one (ending at {previous_end})"
        );
        previous_end = span
            .offset
            .checked_add(span.len)
            .unwrap_or_else(|| panic!("span {span:?} overflows u64"));
        assert!(
            previous_end <= file_len,
            "span {span:?} ends past the {file_len}-byte file"
        );
    }
    for span in &layout.external {
        assert!(span.len > 0, "empty external span {span:?}");
    }
}

/// Parse `data` as `format`: an error is fine, a panic is not, and a layout
/// must be of that format and keep the invariants of [`check_layout`].
/// Parsing is also deterministic: a second parse gives the same result.
pub fn parse_and_check(format: Format, data: &[u8]) {
    let first = parse(format, &data);
    if let Ok(layout) = &first {
        assert_eq!(layout.format, format);
        check_layout(layout, data.len() as u64);
    }
    let second = parse(format, &data);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "two parses of the same bytes differ"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("two parses of the same bytes disagree: {first:?} then {second:?}"),
    }
}
