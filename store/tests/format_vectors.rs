//! docs/store-format.md, checked against the code and against itself.
//!
//! The test vectors (§10), the chunking constants (§8), the GGUF type table
//! (§8.3) and the column tables (§5) are parsed out of the document, so the
//! document and this test cannot drift apart. Each vector is checked twice:
//! against what the store does (import into a new store, then the public
//! API and the catalog rows), and against an independent computation that
//! follows only the document's text (its detection rule, regions, tensor
//! pieces, its FastCDC pseudo-code, BLAKE3 of each chunk, `derive_key` over
//! the documented encoding, xxh3 over the documented fingerprint input).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use modelfs_formats::Format;
use modelfs_store::{
    canonical_key_of_bytes, recipe, ImportOptions, NoProgress, Store, CATALOG_FILE, CDC_AVG,
    CDC_MAX, CDC_MIN, TENSOR_PIECE,
};

const DOC: &str = include_str!("../../docs/store-format.md");

// ---------------------------------------------------------------------------
// Reading the document

/// The body of every fenced block that directly follows a line `marker`.
fn blocks_after(marker: &str) -> Vec<Vec<&'static str>> {
    let lines: Vec<&str> = DOC.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != marker {
            continue;
        }
        let fence = lines.get(i + 1).expect("a fenced block after the marker");
        assert!(
            fence.starts_with("```"),
            "{marker} must be followed by a fence"
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| !l.starts_with("```"))
            .copied()
            .collect();
        out.push(body);
    }
    assert!(!out.is_empty(), "no {marker} in docs/store-format.md");
    out
}

/// The `<!-- chunking-constants -->` block: name, then value.
fn constants() -> HashMap<&'static str, &'static str> {
    blocks_after("<!-- chunking-constants -->")[0]
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.split_once(char::is_whitespace).expect("name value");
            (name, value.trim())
        })
        .collect()
}

fn constant_u64(name: &str) -> u64 {
    let v = constants()[name];
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).expect("hex constant"),
        None => v.parse().expect("decimal constant"),
    }
}

fn key_context() -> &'static str {
    constants()["KEY_CONTEXT"]
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    assert!(s.len() % 2 == 0, "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash32(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32 bytes")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    offset: u64,
    len: u32,
    hash: [u8; 32],
    fast: i64,
}

#[derive(Debug)]
struct Vector {
    file: String,
    bytes: Vec<u8>,
    size: u64,
    format: Option<String>,
    chunks: Vec<Chunk>,
    /// (size, whole) of the object written, if any.
    object: Option<(u64, bool)>,
    /// `recipe` lines, concatenated; None if the block has none.
    recipe: Option<Vec<u8>>,
    key: [u8; 32],
    recipe_key: Option<[u8; 32]>,
}

fn xof(seed: &str, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

fn vectors() -> Vec<Vector> {
    blocks_after("<!-- vector -->")
        .into_iter()
        .map(|block| {
            let mut file = None;
            let mut bytes = Vec::new();
            let mut size = None;
            let mut format = None;
            let mut chunks = Vec::new();
            let mut object = None;
            let mut recipe: Option<Vec<u8>> = None;
            let mut key = None;
            let mut recipe_key = None;
            for line in block.iter().filter(|l| !l.trim().is_empty()) {
                let (what, rest) = line.split_once(char::is_whitespace).expect("item value");
                let rest = rest.trim();
                let words: Vec<&str> = rest.split_whitespace().collect();
                match what {
                    "file" => file = Some(rest.to_string()),
                    "bytes" => bytes.extend(unhex(rest)),
                    "xof" => {
                        let (n, seed) = rest.split_once(' ').expect("xof N SEED");
                        let seed = seed.trim().trim_matches('"');
                        bytes.extend(xof(seed, n.parse().expect("xof length")));
                    }
                    "zeros" => bytes.resize(bytes.len() + rest.parse::<usize>().expect("N"), 0),
                    "size" => size = Some(rest.parse().expect("size")),
                    "format" => format = Some((rest != "-").then(|| rest.to_string())),
                    "chunk" => {
                        assert_eq!(words.len(), 4, "{line}");
                        chunks.push(Chunk {
                            offset: words[0].parse().expect("offset"),
                            len: words[1].parse().expect("length"),
                            hash: hash32(words[2]),
                            fast: words[3].parse().expect("fast"),
                        });
                    }
                    "object" => {
                        object = Some(match words.as_slice() {
                            ["-"] => None,
                            [size, "whole"] => Some((size.parse().expect("size"), true)),
                            [size, "packed"] => Some((size.parse().expect("size"), false)),
                            _ => panic!("bad object line {line}"),
                        })
                    }
                    "recipe" => {
                        let record = unhex(rest);
                        assert_eq!(record.len(), 52, "{line}");
                        recipe.get_or_insert_with(Vec::new).extend(record);
                    }
                    "key" => key = Some(hash32(rest)),
                    "recipe-key" => recipe_key = Some(hash32(rest)),
                    other => panic!("unknown vector item {other:?}"),
                }
            }
            Vector {
                file: file.expect("file line"),
                bytes,
                size: size.expect("size line"),
                format: format.expect("format line"),
                chunks,
                object: object.expect("object line"),
                recipe,
                key: key.expect("key line"),
                recipe_key,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The document's rules, computed independently of the store's code

/// MD5 (RFC 1321), only to build the GEAR table as §8.6 defines it.
fn md5(message: &[u8]) -> [u8; 16] {
    const SHIFT: [u32; 16] = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
    let k: Vec<u32> = (1..=64)
        .map(|i: i32| (f64::from(i).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    let mut padded = message.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&(message.len() as u64 * 8).to_le_bytes());
    for block in padded.chunks_exact(64) {
        let w: Vec<u32> = block
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let [mut a, mut b, mut c, mut d] = state;
        for (i, &ki) in k.iter().enumerate() {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(ki).wrapping_add(w[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(SHIFT[(i / 16) * 4 + i % 4]));
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }
    let mut out = [0u8; 16];
    for (o, s) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// §8.6: GEAR[b] = the first 8 bytes, big-endian, of MD5 of 64 bytes `b`.
fn gear() -> Vec<u64> {
    (0..=255u8)
        .map(|b| u64::from_be_bytes(md5(&[b; 64])[..8].try_into().expect("8 bytes")))
        .collect()
}

/// §8.6 `next_chunk_length`, transcribed.
fn next_chunk_length(d: &[u8], gear: &[u64]) -> usize {
    let (min, avg, max) = (
        constant_u64("CDC_MIN") as usize,
        constant_u64("CDC_AVG") as usize,
        constant_u64("CDC_MAX") as usize,
    );
    let (mask_s, mask_l) = (constant_u64("MASK_S"), constant_u64("MASK_L"));
    let n = d.len();
    if n <= min {
        return n;
    }
    let end = n.min(max);
    let e = end - end % 2;
    let c = avg.min(e);
    let mut g = 0u64;
    for (i, &byte) in d.iter().enumerate().take(e).skip(min) {
        g = (g << 1).wrapping_add(gear[byte as usize]);
        let mask = if i < c { mask_s } else { mask_l };
        if g & mask == 0 {
            return i;
        }
    }
    end
}

/// §8.1 step 3: whether the bytes alone select the safetensors parser.
fn looks_like_safetensors(b: &[u8]) -> bool {
    if b.len() < 10 {
        return false;
    }
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    (2..=104_857_600).contains(&n)
        && n <= b.len() as u64 - 8
        && b[8] == b'{'
        && (b[9] == b'"' || b[9] == b'}')
}

/// §8.2 safetensors spans (for the well-formed files of the vectors).
fn safetensors_spans(b: &[u8]) -> Vec<(u64, u64)> {
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let header: serde_json::Value =
        serde_json::from_slice(&b[8..8 + n as usize]).expect("header JSON");
    header
        .as_object()
        .expect("JSON object")
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(_, t)| {
            let offsets = t["data_offsets"].as_array().expect("data_offsets");
            let (begin, end) = (
                offsets[0].as_u64().expect("begin"),
                offsets[1].as_u64().expect("end"),
            );
            (8 + n + begin, end - begin)
        })
        .collect()
}

/// §8.7: the canonical chunking, (offset, length) in file order. Only the
/// parts of §8.1/§8.2 the vectors use are implemented, and the vectors are
/// checked not to need the others.
fn canonical_chunks(b: &[u8]) -> Vec<(u64, u32)> {
    assert!(
        !(b.starts_with(b"GGUF") || b.starts_with(b"PK\x03\x04")),
        "vector needs a parser this test does not model"
    );
    let mut spans = if looks_like_safetensors(b) {
        safetensors_spans(b)
    } else {
        Vec::new()
    };
    // §8.4 regions.
    spans.sort();
    let mut regions = Vec::new(); // (offset, len, is_tensor)
    let mut pos = 0u64;
    for (offset, len) in spans {
        if len == 0 || offset < pos || offset + len > b.len() as u64 {
            continue;
        }
        if offset > pos {
            regions.push((pos, offset - pos, false));
        }
        regions.push((offset, len, true));
        pos = offset + len;
    }
    if pos < b.len() as u64 {
        regions.push((pos, b.len() as u64 - pos, false));
    }
    // §8.5 and §8.6.
    let piece = constant_u64("TENSOR_PIECE");
    let gear = gear();
    let mut out = Vec::new();
    for (offset, len, tensor) in regions {
        let mut at = 0u64;
        while at < len {
            let l = if tensor {
                piece.min(len - at)
            } else {
                let rest = &b[(offset + at) as usize..(offset + len) as usize];
                next_chunk_length(rest, &gear) as u64
            };
            out.push((offset + at, l as u32));
            at += l;
        }
    }
    out
}

/// §5 `chunks.fast`.
fn fingerprint(chunk: &[u8]) -> i64 {
    let edge = constant_u64("FINGERPRINT_EDGE") as usize;
    let input = if chunk.len() <= 2 * edge {
        chunk.to_vec()
    } else {
        [&chunk[..edge], &chunk[chunk.len() - edge..]].concat()
    };
    xxhash_rust::xxh3::xxh3_64(&input) as i64
}

/// §3: `derive_key(context, hash ‖ u32 LE length, ...)`.
fn key_over(chunks: impl IntoIterator<Item = ([u8; 32], u32)>) -> [u8; 32] {
    let mut encoding = Vec::new();
    for (hash, len) in chunks {
        encoding.extend_from_slice(&hash);
        encoding.extend_from_slice(&len.to_le_bytes());
    }
    blake3::derive_key(key_context(), &encoding)
}

/// §4 and §5.1 for a file imported into an empty store: its recipe (every
/// chunk in object 1, each distinct chunk once in order of first
/// occurrence, a repeated chunk naming its first location), the object's
/// size, and whether no chunk repeats (a whole object).
fn expected_recipe(chunks: &[Chunk]) -> (Vec<u8>, u64, bool) {
    let mut first_at: HashMap<[u8; 32], u64> = HashMap::new();
    let mut object_size = 0u64;
    let mut recipe = Vec::new();
    for c in chunks {
        let at = *first_at.entry(c.hash).or_insert_with(|| {
            object_size += u64::from(c.len);
            object_size - u64::from(c.len)
        });
        recipe.extend_from_slice(&c.hash);
        recipe.extend_from_slice(&1u64.to_le_bytes());
        recipe.extend_from_slice(&at.to_le_bytes());
        recipe.extend_from_slice(&c.len.to_le_bytes());
    }
    (recipe, object_size, first_at.len() == chunks.len())
}

#[test]
fn vectors_follow_the_documents_rules() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 7, "§10 has seven vectors");
    for v in &vectors {
        let name = &v.file;
        assert_eq!(v.bytes.len() as u64, v.size, "{name}: size");
        // The chunk lines tile the file, and each hash and fingerprint is
        // that of the bytes it names.
        let mut pos = 0u64;
        for c in &v.chunks {
            assert_eq!(c.offset, pos, "{name}: chunks tile the file");
            assert!(c.len > 0, "{name}: empty chunk");
            let bytes = &v.bytes[c.offset as usize..(c.offset + u64::from(c.len)) as usize];
            assert_eq!(
                hex(blake3::hash(bytes).as_bytes()),
                hex(&c.hash),
                "{name}@{pos}"
            );
            assert_eq!(fingerprint(bytes), c.fast, "{name}@{pos}: fast");
            pos += u64::from(c.len);
        }
        assert_eq!(pos, v.size, "{name}: chunks cover the file");

        // The key: over the canonical chunking of the bytes, recomputed here.
        let canonical = canonical_chunks(&v.bytes);
        let canonical_key = key_over(canonical.iter().map(|&(off, len)| {
            let bytes = &v.bytes[off as usize..off as usize + len as usize];
            (*blake3::hash(bytes).as_bytes(), len)
        }));
        assert_eq!(hex(&canonical_key), hex(&v.key), "{name}: key");
        let listed: Vec<(u64, u32)> = v.chunks.iter().map(|c| (c.offset, c.len)).collect();
        let listed_key = key_over(v.chunks.iter().map(|c| (c.hash, c.len)));
        match v.recipe_key {
            None => {
                assert_eq!(
                    listed, canonical,
                    "{name}: the recipe is the canonical chunking"
                );
                assert_eq!(
                    hex(&listed_key),
                    hex(&v.key),
                    "{name}: key over the chunk lines"
                );
            }
            Some(rk) => {
                assert_ne!(
                    listed, canonical,
                    "{name}: recipe-key given, chunking canonical"
                );
                assert_eq!(hex(&listed_key), hex(&rk), "{name}: recipe-key");
                assert_ne!(rk, v.key, "{name}");
            }
        }

        let (expected, object_size, distinct) = expected_recipe(&v.chunks);
        if let Some(recipe) = &v.recipe {
            assert_eq!(hex(recipe), hex(&expected), "{name}: recipe lines");
        }
        match v.object {
            None => assert!(v.chunks.is_empty(), "{name}: chunks but no object"),
            Some((size, whole)) => {
                assert_eq!(
                    size, object_size,
                    "{name}: object size = distinct chunk bytes"
                );
                assert_eq!(whole, distinct, "{name}: whole iff no chunk repeats");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The code

/// Import one file as model `v` into a new store under `dir`; the store and
/// the import's warnings. Malformed model files are allowed: what the store
/// writes for them is specified too (vector 7).
fn import_alone(dir: &Path, file: &str, bytes: &[u8]) -> (Store, Vec<String>) {
    let model = dir.join("model");
    std::fs::create_dir(&model).expect("mkdir");
    std::fs::write(model.join(file), bytes).expect("write");
    let mut store = Store::init(&dir.join("store")).expect("init");
    let mut opts = ImportOptions {
        name: "v".into(),
        replace: false,
        follow_symlinks: false,
        allow_malformed: false,
        revision: None,
    };
    // A file whose name commits it to a format it does not parse as is
    // refused unless allowed, before anything is stored.
    match store.import(&model, &opts, &NoProgress) {
        Err(modelfs_store::Error::MalformedModelFiles(files)) => {
            assert_eq!(files.len(), 1, "{file}: {files:?}");
            assert!(files[0].path.ends_with(file), "{file}: {files:?}");
            assert!(store.models().expect("models").is_empty(), "{file}");
            opts.allow_malformed = true;
        }
        Err(e) => panic!("{file}: {e}"),
        Ok(summary) => return (store, summary.warnings),
    }
    let summary = store.import(&model, &opts, &NoProgress).expect("import");
    assert!(
        !summary.warnings.is_empty(),
        "{file}: allowed without a warning"
    );
    (store, summary.warnings)
}

#[test]
fn vectors_are_what_the_store_writes() {
    for v in vectors() {
        let name = v.file.as_str();
        assert_eq!(
            canonical_key_of_bytes(&v.bytes).to_hex(),
            hex(&v.key),
            "{name}: canonical_key_of_bytes"
        );

        let dir = tempfile::tempdir().expect("temp dir");
        let (store, warnings) = import_alone(dir.path(), name, &v.bytes);
        // Vector 7's name picks a parser that fails on its bytes (§8.1).
        assert_eq!(
            warnings.len(),
            usize::from(v.recipe_key.is_some()),
            "{name}: {warnings:?}"
        );
        let files = store.files("v").expect("files");
        assert_eq!(files.len(), 1);
        let f = &files[0];
        assert_eq!(f.path, name);
        assert_eq!(f.size, v.size, "{name}: size");
        assert_eq!(f.hash.to_hex(), hex(&v.key), "{name}: content key");
        assert_eq!(f.format, v.format, "{name}: format");
        assert_eq!(f.chunks, v.chunks.len(), "{name}: chunk count");
        assert_eq!(
            f.whole_object.is_some(),
            matches!(v.object, Some((_, true))),
            "{name}: whole object"
        );

        let reader = store.open_file(f.content_id).expect("open");
        let segments = reader.segments();
        assert_eq!(segments.len(), v.chunks.len());
        for (i, (s, c)) in segments.iter().zip(&v.chunks).enumerate() {
            assert_eq!(
                reader.segment_start(i),
                c.offset,
                "{name}: chunk {i} offset"
            );
            assert_eq!(s.len, c.len, "{name}: chunk {i} length");
            assert_eq!(s.hash.to_hex(), hex(&c.hash), "{name}: chunk {i} hash");
        }
        assert!(store.verify(None).expect("verify").is_clean(), "{name}");

        // The catalog rows, read with SQL as a second reader would.
        let db = rusqlite::Connection::open(store.root().join(CATALOG_FILE)).expect("catalog");
        let meta: (String, String) = db
            .query_row(
                "SELECT value, typeof(value) FROM meta WHERE key = 'schema_version'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("schema_version");
        assert_eq!(meta, ("2".to_string(), "text".to_string()));
        assert_eq!(
            db.query_row("SELECT count(*) FROM meta", [], |r| r.get::<_, i64>(0))
                .expect("meta rows"),
            1
        );

        let objects: Vec<(i64, i64, i64)> = db
            .prepare("SELECT id, size, whole FROM objects")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .expect("objects");
        let expected_objects: Vec<(i64, i64, i64)> = v
            .object
            .iter()
            .map(|&(size, whole)| (1, size as i64, i64::from(whole)))
            .collect();
        assert_eq!(objects, expected_objects, "{name}: objects rows");

        let (hash, size, whole_object, format, blob): (
            Vec<u8>,
            i64,
            Option<i64>,
            Option<String>,
            Vec<u8>,
        ) = db
            .query_row(
                "SELECT hash, size, whole_object, format, recipe FROM contents",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .expect("one contents row");
        assert_eq!(hex(&hash), hex(&v.key), "{name}: contents.hash");
        assert_eq!(size as u64, v.size);
        assert_eq!(
            whole_object,
            matches!(v.object, Some((_, true))).then_some(1)
        );
        assert_eq!(format, v.format);
        assert_eq!(
            hex(&blob),
            hex(&expected_recipe(&v.chunks).0),
            "{name}: contents.recipe"
        );
        let decoded = recipe::decode(&blob).expect("recipe decodes");
        assert_eq!(decoded.len(), v.chunks.len());

        // One chunks row per distinct chunk, at the location the recipe
        // names, with the documented fingerprint.
        let rows: Vec<(Vec<u8>, i64, i64, i64, i64)> = db
            .prepare("SELECT hash, object, offset, length, fast FROM chunks")
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .expect("chunks");
        let distinct: BTreeSet<[u8; 32]> = v.chunks.iter().map(|c| c.hash).collect();
        assert_eq!(rows.len(), distinct.len(), "{name}: chunks rows");
        for (hash, object, offset, length, fast) in rows {
            let i = v
                .chunks
                .iter()
                .position(|c| c.hash[..] == hash[..])
                .expect("a chunk of the vector");
            let record = &blob[i * 52..(i + 1) * 52];
            assert_eq!(
                object as u64,
                u64::from_le_bytes(record[32..40].try_into().unwrap())
            );
            assert_eq!(
                offset as u64,
                u64::from_le_bytes(record[40..48].try_into().unwrap())
            );
            assert_eq!(length as u32, v.chunks[i].len);
            assert_eq!(fast, v.chunks[i].fast, "{name}: chunks.fast");
        }
    }
}

#[test]
fn chunking_constants_are_the_codes() {
    assert_eq!(constant_u64("TENSOR_PIECE"), TENSOR_PIECE);
    assert_eq!(constant_u64("CDC_MIN"), CDC_MIN as u64);
    assert_eq!(constant_u64("CDC_AVG"), CDC_AVG as u64);
    assert_eq!(constant_u64("CDC_MAX"), CDC_MAX as u64);
    let (mask_s, mask_l) =
        fastcdc::v2020::select_masks(CDC_AVG, fastcdc::v2020::Normalization::Level1);
    assert_eq!(constant_u64("MASK_S"), mask_s);
    assert_eq!(constant_u64("MASK_L"), mask_l);
    assert_eq!(fastcdc::v2020::MASKS[17], mask_s);
    assert_eq!(fastcdc::v2020::MASKS[15], mask_l);
    assert_eq!(hex(&md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    let gear = gear();
    assert_eq!(constant_u64("GEAR[0]"), gear[0]);
    assert_eq!(constant_u64("GEAR[255]"), gear[255]);
    assert_eq!(
        constant_u64("FINGERPRINT_EDGE"),
        recipe::FINGERPRINT_EDGE as u64
    );
    assert_eq!(key_context(), recipe::CONTENT_KEY_CONTEXT);
    assert!(DOC.contains(&format!("`{}`", recipe::CONTENT_KEY_CONTEXT)));

    // The pseudo-code of §8.6 finds the cut points of the fastcdc crate on
    // data that exercises both masks and the maximum.
    let mut data = xof("format_vectors cdc cross-check", 1 << 20);
    data.extend(vec![0u8; 600_001]);
    let crate_cuts: Vec<usize> = fastcdc::v2020::FastCDC::new(&data, CDC_MIN, CDC_AVG, CDC_MAX)
        .map(|c| c.length)
        .collect();
    let mut doc_cuts = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let l = next_chunk_length(&data[at..], &gear);
        doc_cuts.push(l);
        at += l;
    }
    assert_eq!(doc_cuts, crate_cuts);
}

/// A GGUF v3 file with one 1-dimensional tensor at data offset 0.
fn gguf(ggml_type: u32, first_dim: u64, data_len: usize) -> (Vec<u8>, u64) {
    let mut f = b"GGUF".to_vec();
    f.extend_from_slice(&3u32.to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes()); // tensors
    f.extend_from_slice(&0u64.to_le_bytes()); // metadata pairs
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(b't');
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&first_dim.to_le_bytes());
    f.extend_from_slice(&ggml_type.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.resize(f.len().next_multiple_of(32), 0);
    let data_start = f.len() as u64;
    f.resize(f.len() + data_len, 0x5a);
    (f, data_start)
}

#[test]
fn gguf_type_table_is_the_parsers() {
    let lines: Vec<&str> = DOC.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "<!-- gguf-types -->")
        .expect("gguf-types marker");
    let mut table: HashMap<u32, (u64, u64)> = HashMap::new();
    for row in lines[at + 3..].iter().take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let id = cells[0].parse().expect("type id");
        let block = (
            cells[2].parse().expect("elements"),
            cells[3].parse().expect("bytes"),
        );
        assert!(table.insert(id, block).is_none(), "type {id} listed twice");
    }
    assert!(table.len() > 30, "table not found");
    for id in 0..64u32 {
        let (file, data_start, expected) = match table.get(&id) {
            // Two blocks, then bytes no tensor owns.
            Some(&(elements, bytes)) => {
                let (f, start) = gguf(id, 2 * elements, 2 * bytes as usize + 64);
                (f, start, 2 * bytes)
            }
            // Unlisted: the span runs to the end of the file.
            None => {
                let (f, start) = gguf(id, 256, 100);
                (f, start, 100)
            }
        };
        let layout = modelfs_formats::layout("t.gguf", &file)
            .unwrap_or_else(|e| panic!("type {id}: {e}"))
            .expect("GGUF");
        assert_eq!(layout.format, Format::Gguf);
        let spans: Vec<(u64, u64)> = layout.tensors.iter().map(|s| (s.offset, s.len)).collect();
        assert_eq!(spans, vec![(data_start, expected)], "ggml type {id}");
    }
}

#[test]
fn detection_rules_are_the_parsers() {
    use modelfs_formats::detect;
    let st = |n: u64, rest: &[u8]| [&n.to_le_bytes()[..], rest].concat();
    // §8.1 step 3, at its edges.
    assert_eq!(detect("", &st(2, b"{}")), Some(Format::Safetensors));
    assert_eq!(detect("", &st(3, b"{\"}")), Some(Format::Safetensors));
    assert_eq!(detect("", &st(1, b"{}")), None, "N < 2");
    assert_eq!(detect("", &st(3, b"{}")), None, "N > size - 8");
    assert_eq!(detect("", &st(2, b"{ ")), None, "byte 9");
    assert_eq!(detect("", &st(2, b"{")), None, "shorter than 10 bytes");
    // N at the 100 MiB limit and just past it, in a file long enough.
    struct Big(Vec<u8>);
    impl modelfs_formats::Source for Big {
        fn len(&self) -> u64 {
            200 << 20
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(b' ');
            }
            Ok(())
        }
    }
    assert_eq!(
        detect("", &Big(st(104_857_600, b"{}"))),
        Some(Format::Safetensors)
    );
    assert_eq!(
        detect("", &Big(st(104_857_601, b"{}"))),
        None,
        "N > 100 MiB"
    );
    // Step 2.
    assert_eq!(detect("", &b"GGUF\x03\0\0\0".to_vec()), Some(Format::Gguf));
    assert_eq!(detect("", &b"PK\x03\x04{\"a\":1}".to_vec()), None);
    // Step 1: the extension wins, case-insensitively; a hidden file has none;
    // ONNX only by name.
    let junk = b"no format at all".to_vec();
    assert_eq!(detect("a/b.SafeTensors", &junk), Some(Format::Safetensors));
    assert_eq!(detect("x.gguf", &junk), Some(Format::Gguf));
    assert_eq!(detect("dir/m.onnx", &junk), Some(Format::Onnx));
    assert_eq!(detect(".gguf", &junk), None);
    assert_eq!(detect("", &junk), None);
    assert_eq!(detect("x.bin", &st(2, b"{}")), Some(Format::Safetensors));
}

#[test]
fn column_tables_are_the_catalogs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::init(&dir.path().join("store")).expect("init");
    let db = rusqlite::Connection::open(store.root().join(CATALOG_FILE)).expect("catalog");

    let lines: Vec<&str> = DOC.lines().collect();
    let mut documented = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("### `") else {
            continue;
        };
        let table = rest.split('`').next().expect("table name");
        documented.insert(table.to_string());
        let rows: Vec<(String, String)> = lines[i + 3..]
            .iter()
            .take_while(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                (cells[0].trim_matches('`').to_string(), cells[1].to_string())
            })
            .collect();
        let actual: Vec<(String, String, bool)> = db
            .prepare(&format!("PRAGMA table_info({table})"))
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? == 1)))?
                    .collect()
            })
            .expect("table_info");
        assert_eq!(
            rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            actual.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            "columns of {table}"
        );
        for ((column, doc_type), (_, sql_type, not_null)) in rows.iter().zip(&actual) {
            assert!(
                doc_type.starts_with(sql_type.as_str()),
                "{table}.{column}: documented {doc_type:?}, declared {sql_type}"
            );
            assert_eq!(
                doc_type.contains("NOT NULL"),
                *not_null,
                "{table}.{column}: NOT NULL"
            );
        }
    }
    let tables: BTreeSet<String> = db
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'sqlite_sequence'",
        )
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .expect("tables");
    assert_eq!(documented, tables);
}
