//! Baseline for the dedup benchmark: what plain content-defined chunking
//! (FastCDC, 64 KiB average, the same parameters the store uses for
//! non-tensor bytes) would store for the given files, with no knowledge of
//! tensor boundaries. Prints JSON: logical bytes, distinct chunk bytes, chunks.
//!
//! usage: cargo run --release -p modelfs-store --example cdc_baseline -- FILE...

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;

use modelfs_store::{ChunkHash, CDC_AVG, CDC_MAX, CDC_MIN};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut seen: HashSet<ChunkHash> = HashSet::new();
    let (mut logical, mut stored, mut chunks) = (0u64, 0u64, 0u64);
    for path in std::env::args().skip(1) {
        let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        let reader = BufReader::with_capacity(8 << 20, file);
        for chunk in fastcdc::v2020::StreamCDC::new(reader, CDC_MIN, CDC_AVG, CDC_MAX) {
            let chunk = chunk.map_err(|e| format!("{path}: {e}"))?;
            logical += chunk.length as u64;
            chunks += 1;
            if seen.insert(ChunkHash::of(&chunk.data)) {
                stored += chunk.length as u64;
            }
        }
    }
    println!(
        "{{\"logical_bytes\": {logical}, \"stored_bytes\": {stored}, \"chunks\": {chunks}, \"distinct_chunks\": {}}}",
        seen.len()
    );
    Ok(())
}
