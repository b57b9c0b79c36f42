//! Fuzz target: `parse(Format::Onnx, ..)` on arbitrary bytes, for
//! ONNX protobuf (varints, nested graph/node/attribute messages, external data).
//!
//! Checks: parsing never panics; it never hangs or allocates without bound
//! (scripts/fuzz.sh runs libFuzzer with -timeout and -malloc_limit_mb, so
//! either is a failure); an Ok layout is of this format and keeps the
//! invariants formats/tests/hostile_mutations.rs checks (spans non-empty,
//! sorted, non-overlapping, within the file); parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelfs_formats::Format;

fuzz_target!(|data: &[u8]| modelfs_fuzz::parse_and_check(Format::Onnx, data));
