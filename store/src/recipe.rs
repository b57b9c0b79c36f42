//! How a stored file is reassembled: a list of chunk references.
//!
//! Every content (distinct file) has a recipe, also a whole-file object: the
//! recipe is what copy-mode reads and `verify` use to check bytes chunk by
//! chunk, and what `du` uses to tell shared bytes from unique ones.

use crate::ids::{ChunkHash, ContentKey, ObjectId};

/// BLAKE3 key-derivation context of content keys (store-format §3).
pub const CONTENT_KEY_CONTEXT: &str = "modelfs 2026-11 content key v1";

/// The key a content (distinct file) is stored under: BLAKE3 in key-derivation
/// mode over its chunk list, each chunk as its hash then its length (u32
/// little-endian). It commits to every byte as a whole-file hash does, but
/// costs a pass over 36 bytes per chunk instead of one over the content, so
/// an import hashes each byte once. Which chunk list: store-format §3.
pub fn content_key(chunks: impl Iterator<Item = (ChunkHash, u32)>) -> ContentKey {
    let mut h = blake3::Hasher::new_derive_key(CONTENT_KEY_CONTEXT);
    for (hash, len) in chunks {
        h.update(&hash.0);
        h.update(&len.to_le_bytes());
    }
    ContentKey::from(h.finalize())
}

/// Bytes from each end of a chunk that [`fingerprint`] reads.
pub const FINGERPRINT_EDGE: usize = 4096;

/// The chunk index's cheap, non-cryptographic fingerprint (`chunks.fast`):
/// xxh3-64 of the chunk's first and last [`FINGERPRINT_EDGE`] bytes (of the
/// whole chunk when it is at most twice that). It only finds *candidates*:
/// an import takes a known chunk for a new one only after comparing every
/// byte, so a collision (or a chunk differing only in its middle) costs a
/// comparison and a BLAKE3, never a wrong chunk. Reading 8 KiB of a 1 MiB
/// chunk instead of all of it is what makes recognising a known chunk much
/// cheaper than hashing it.
pub fn fingerprint(chunk: &[u8]) -> u64 {
    if chunk.len() <= 2 * FINGERPRINT_EDGE {
        return xxhash_rust::xxh3::xxh3_64(chunk);
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&chunk[..FINGERPRINT_EDGE]);
    h.update(&chunk[chunk.len() - FINGERPRINT_EDGE..]);
    h.digest()
}

/// One chunk of a file: its hash and where its bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// BLAKE3 of the chunk's bytes.
    pub hash: ChunkHash,
    /// The object file holding the bytes.
    pub object: ObjectId,
    /// Byte offset of the chunk inside that object.
    pub object_offset: u64,
    /// Bytes of the chunk; never 0.
    pub len: u32,
}

/// Size in bytes of one encoded segment: hash, object id, offset, length.
pub const SEGMENT_BYTES: usize = 32 + 8 + 8 + 4;

/// Encode segments as the catalog's `contents.recipe` blob (see docs/store-format.md).
pub fn encode(segments: &[Segment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(segments.len() * SEGMENT_BYTES);
    for s in segments {
        out.extend_from_slice(&s.hash.0);
        out.extend_from_slice(&s.object.0.to_le_bytes());
        out.extend_from_slice(&s.object_offset.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
    }
    out
}

/// Decode a recipe blob; `None` if its length is not a whole number of segments.
pub fn decode(blob: &[u8]) -> Option<Vec<Segment>> {
    if blob.len() % SEGMENT_BYTES != 0 {
        return None;
    }
    let segments = blob
        .chunks_exact(SEGMENT_BYTES)
        .map(|r| Segment {
            hash: ChunkHash(r[0..32].try_into().expect("32 bytes")),
            object: ObjectId(u64::from_le_bytes(r[32..40].try_into().expect("8 bytes"))),
            object_offset: u64::from_le_bytes(r[40..48].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(r[48..52].try_into().expect("4 bytes")),
        })
        .collect();
    Some(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_round_trips() {
        let segs = vec![
            Segment {
                hash: ChunkHash::of(b"a"),
                object: ObjectId(7),
                object_offset: 0,
                len: 10,
            },
            Segment {
                hash: ChunkHash::of(b"b"),
                object: ObjectId(u64::MAX),
                object_offset: 1 << 40,
                len: u32::MAX,
            },
        ];
        let blob = encode(&segs);
        assert_eq!(blob.len(), 2 * SEGMENT_BYTES);
        assert_eq!(decode(&blob).unwrap(), segs);
        assert!(decode(&blob[..blob.len() - 1]).is_none());
    }
}
