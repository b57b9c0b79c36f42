//! Poor man's fuzzing: every truncation and thousands of corruptions of the
//! real fixtures, parsed as every format. Each must return Ok with a layout
//! that keeps the invariants, or Err; never panic, hang or blow up memory.
//!
//! Real files are the best seeds: corruptions of them get past the magic
//! numbers and exercise the deep parsing paths a random input never reaches.

use std::fs;
use std::path::Path;

use modelfs_formats::{layout, parse, Format, Layout};

const FORMATS: [Format; 4] = [
    Format::Safetensors,
    Format::Torch,
    Format::Gguf,
    Format::Onnx,
];

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut seeds: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_none_or(|ext| ext != "json"))
        .map(|path| {
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, fs::read(&path).expect("readable"))
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 8);
    seeds
}

fn check_invariants(layout: &Layout, file_len: u64, context: &str) {
    let mut previous_end = 0;
    for span in &layout.tensors {
        assert!(span.len > 0, "{context}: empty span");
        assert!(
            span.offset >= previous_end,
            "{context}: unsorted or overlapping"
        );
        previous_end = span.offset.checked_add(span.len).expect("no overflow");
        assert!(previous_end <= file_len, "{context}: span past EOF");
    }
    assert!(layout.external.iter().all(|span| span.len > 0), "{context}");
}

fn parse_every_way(name: &str, bytes: &[u8], context: &str) {
    let file_len = bytes.len() as u64;
    // `&&[u8]` is a sized `Source` (via the blanket impl for references).
    if let Ok(Some(found)) = layout(name, &bytes) {
        check_invariants(&found, file_len, context);
    }
    for format in FORMATS {
        if let Ok(found) = parse(format, &bytes) {
            check_invariants(&found, file_len, context);
        }
    }
}

#[test]
fn every_truncation() {
    for (name, bytes) in seeds() {
        for cut in 0..bytes.len() {
            parse_every_way(&name, &bytes[..cut], &format!("{name} cut at {cut}"));
        }
    }
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

#[test]
fn random_corruptions() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Values that tend to break length and count fields.
    let nasty: [u64; 6] = [0, 1, u64::MAX, 1 << 60, 0x7fff_ffff, 0xffff_ffff];
    // Enough for CI; set MODELFS_MUTATION_ROUNDS for a longer local hunt.
    let rounds: usize = std::env::var("MODELFS_MUTATION_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(1500);
    for (name, bytes) in seeds() {
        for round in 0..rounds {
            let mut mutant = bytes.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(mutant.len());
                match rng.below(3) {
                    0 => mutant[at] ^= 1 << rng.below(8),
                    1 => mutant[at] = rng.next() as u8,
                    _ => {
                        let value = nasty[rng.below(nasty.len())].to_le_bytes();
                        let end = (at + 8).min(mutant.len());
                        mutant[at..end].copy_from_slice(&value[..end - at]);
                    }
                }
            }
            parse_every_way(&name, &mutant, &format!("{name} mutation round {round}"));
        }
    }
}
