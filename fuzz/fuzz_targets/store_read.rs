//! Fuzz target: the store's metadata decoding (recipe blobs, `contents`
//! rows) and its reader, against a small real store. A fuzzed `contents` row (hash, size, recipe) is written into
//! the catalog of a store made by real imports, then the file is opened
//! with `Store::open_file` and read with `read_at`, `copy_to` and `verify`:
//! the path `modelfs cat` and `modelfs verify` take through a damaged or
//! hostile catalog.
//!
//! Checks, besides no panic, hang or unbounded allocation (a recipe record
//! may claim a 4 GiB chunk):
//! * `recipe::decode` (the `contents.recipe` decoder, store-format §5.1)
//!   refuses exactly the blobs that are not whole 52-byte records, decodes
//!   the others field by field, and `recipe::encode` gives the blob back;
//! * `open_file` succeeds exactly when the row is well-formed (32-byte hash,
//!   size >= 0, recipe of whole 52-byte records), every object it names
//!   exists, and the record lengths add up to the size;
//! * a read never returns bytes other than the chunks the recipe names (by
//!   hash), and returns exactly `min(len, size - offset)` of them; a read
//!   touching only chunks at their true locations succeeds;
//! * `copy_to` and `verify` agree, succeed only with every chunk intact and
//!   the content key right (store-format §3: the key over the recipe's chunk
//!   list, or the key derived from the bytes), and do succeed when that is
//!   so; `copy_to`
//!   then writes exactly the file.
//!
//! Input (missing bytes read as 0):
//! * byte 0, flags: 0x01 the recipe is raw bytes (u16 length, then that
//!   many bytes; need not be whole records); 0x02 the size is an explicit
//!   i64 (else the sum of the record lengths); 0x04 the hash is explicit
//!   (1 byte length mod 48, then the bytes; else the content key of the
//!   recipe's chunk list);
//! * unless raw: a segment count (mod 32), then per segment a selector byte
//!   s: stored chunk `s & 0x0f` gives hash, object, offset and length, then
//!   0x10 object = next byte, 0x20 offset = next u64, 0x40 length = next u32,
//!   0x80 hash = that of stored chunk (next byte);
//! * the rest: reads of (u32 offset, u16 length), at most 8.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use modelfs_store::recipe::{self, content_key, Segment, SEGMENT_BYTES};
use modelfs_store::{
    canonical_key_of_bytes, ChunkHash, ContentId, ImportOptions, NoProgress, ObjectId, Store,
};
use rusqlite::{params, Connection};

/// One chunk as the import stored it, with its bytes.
struct Chunk {
    hash: ChunkHash,
    object: ObjectId,
    offset: u64,
    bytes: Vec<u8>,
}

struct Fixture {
    store: Store,
    /// A second connection to the catalog, to write the fuzzed row.
    conn: Connection,
    content_id: ContentId,
    pool: Vec<Chunk>,
    by_hash: HashMap<ChunkHash, usize>,
    objects: HashSet<ObjectId>,
    /// Hash of no bytes: what a zero-length record must name to pass.
    empty_hash: ChunkHash,
}

static FIXTURE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// libFuzzer ends with `exit()`, which runs no destructors; remove the store
/// through `atexit` instead. (A crash leaves it in $TMPDIR, which
/// scripts/fuzz.sh points at its scratch directory.)
extern "C" fn remove_fixture_dir() {
    if let Some(dir) = FIXTURE_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// xorshift64*, so the store's bytes (and chunk hashes) are the same in
/// every run and a crash reproduces.
struct Rng(u64);

impl Rng {
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }
}

/// A safetensors file of U8 tensors, so the importer cuts chunks at tensor
/// edges.
fn safetensors(tensors: &[(&str, &[u8])]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut offset = 0;
    for (name, data) in tensors {
        let end = offset + data.len();
        entries.push(format!(
            "\"{name}\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            data.len()
        ));
        offset = end;
    }
    let header = format!("{{{}}}", entries.join(","));
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    for (_, data) in tensors {
        file.extend_from_slice(data);
    }
    file
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write fixture file");
}

impl Fixture {
    /// Two models sharing tensors: A's files are whole objects (one of them
    /// cut into several CDC chunks), B is a recipe into A's object plus an
    /// object of its own. Then every content row is dropped and one row is
    /// left for the fuzzer to overwrite.
    fn new() -> Fixture {
        // One directory per process, removed at exit (see
        // `remove_fixture_dir`).
        let dir = std::env::temp_dir().join(format!("modelfs-fuzz-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fixture dir");
        FIXTURE_DIR.set(dir.clone()).expect("set once");
        // SAFETY: registers a plain extern "C" function; nothing else.
        unsafe { libc::atexit(remove_fixture_dir) };

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (a, b, c, d) = (
            rng.bytes(3000),
            rng.bytes(5000),
            rng.bytes(700),
            rng.bytes(2000),
        );
        let src = dir.join("src");
        write(
            &src.join("A/model.safetensors"),
            &safetensors(&[("a", &a), ("b", &b), ("c", &c)]),
        );
        write(&src.join("A/config.json"), b"{\"fuzz\": true}\n");
        write(&src.join("A/tokenizer.bin"), &rng.bytes(150_000));
        write(
            &src.join("B/model.safetensors"),
            &safetensors(&[("b", &b), ("d", &d), ("c", &c)]),
        );

        let root = dir.join("store");
        let mut store = Store::init(&root).expect("init store");
        for name in ["A", "B"] {
            let opts = ImportOptions {
                name: name.to_string(),
                replace: false,
                follow_symlinks: false,
                allow_malformed: false,
                revision: None,
            };
            store
                .import(&src.join(name), &opts, &NoProgress)
                .expect("import");
        }

        let conn = Connection::open(root.join(modelfs_store::CATALOG_FILE)).expect("catalog");
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA busy_timeout = 10000;")
            .expect("pragmas");
        let mut pool = Vec::new();
        {
            let mut st = conn
                .prepare("SELECT hash, object, offset, length FROM chunks ORDER BY object, offset")
                .expect("query chunks");
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .expect("chunks");
            for row in rows {
                let (hash, object, offset, len) = row.expect("chunk row");
                let (object, offset) = (ObjectId(object as u64), offset as u64);
                let data = std::fs::read(store.object_path(object)).expect("object");
                let bytes = data[offset as usize..][..len as usize].to_vec();
                let hash = ChunkHash::from_slice(&hash).expect("32-byte hash");
                assert_eq!(ChunkHash::of(&bytes), hash, "fixture chunk");
                pool.push(Chunk {
                    hash,
                    object,
                    offset,
                    bytes,
                });
            }
        }
        assert!(pool.len() >= 8, "the fixture should have several chunks");
        let by_hash = pool.iter().enumerate().map(|(i, c)| (c.hash, i)).collect();
        let objects = {
            let mut st = conn.prepare("SELECT id FROM objects").expect("objects");
            let ids = st
                .query_map([], |r| r.get::<_, i64>(0))
                .expect("objects")
                .map(|id| ObjectId(id.expect("object id") as u64))
                .collect();
            ids
        };
        conn.execute_batch(
            "DELETE FROM entries; DELETE FROM models; DELETE FROM contents;
             INSERT INTO contents(hash, size, whole_object, format, recipe)
             VALUES (zeroblob(32), 0, NULL, NULL, x'');",
        )
        .expect("reset contents");
        let content_id = ContentId(conn.last_insert_rowid());
        Fixture {
            store,
            conn,
            content_id,
            pool,
            by_hash,
            objects,
            empty_hash: ChunkHash::of(&[]),
        }
    }
}

/// Input bytes, read front to back; reading past the end gives zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                self.0 = rest;
                byte
            }
            None => 0,
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for byte in &mut out {
            *byte = self.u8();
        }
        out
    }

    fn take(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// What a fuzzed row should decode to, worked out independently of the store.
struct Row {
    hash: Vec<u8>,
    size: i64,
    recipe: Vec<u8>,
    /// `None` when the recipe is not whole records.
    segments: Option<Vec<Segment>>,
    reads: Vec<(u64, usize)>,
}

impl Fixture {
    fn row(&self, data: &[u8]) -> Row {
        let mut input = Input(data);
        let flags = input.u8();
        let (recipe, segments) = if flags & 0x01 != 0 {
            let len = usize::from(u16::from_le_bytes(input.array()));
            let raw = input.take(len).to_vec();
            let segments: Option<Vec<Segment>> = (raw.len() % SEGMENT_BYTES == 0).then(|| {
                raw.chunks_exact(SEGMENT_BYTES)
                    .map(|r| Segment {
                        hash: ChunkHash::from_slice(&r[..32]).expect("32 bytes"),
                        object: ObjectId(u64::from_le_bytes(r[32..40].try_into().expect("8"))),
                        object_offset: u64::from_le_bytes(r[40..48].try_into().expect("8")),
                        len: u32::from_le_bytes(r[48..52].try_into().expect("4")),
                    })
                    .collect()
            });
            // recipe::decode refuses exactly the blobs that are not whole
            // records, decodes the rest as above, and encode inverts it.
            let decoded = recipe::decode(&raw);
            assert_eq!(decoded, segments, "recipe::decode of {} bytes", raw.len());
            if let Some(decoded) = &decoded {
                assert_eq!(recipe::encode(decoded), raw, "decode/encode round trip");
            }
            (raw, segments)
        } else {
            let count = input.u8() % 32;
            let mut segments = Vec::new();
            for _ in 0..count {
                let selector = input.u8();
                let chunk = &self.pool[usize::from(selector & 0x0f) % self.pool.len()];
                let mut segment = Segment {
                    hash: chunk.hash,
                    object: chunk.object,
                    object_offset: chunk.offset,
                    len: chunk.bytes.len() as u32,
                };
                if selector & 0x10 != 0 {
                    segment.object = ObjectId(u64::from(input.u8()));
                }
                if selector & 0x20 != 0 {
                    segment.object_offset = u64::from_le_bytes(input.array());
                }
                if selector & 0x40 != 0 {
                    segment.len = u32::from_le_bytes(input.array());
                }
                if selector & 0x80 != 0 {
                    segment.hash = self.pool[usize::from(input.u8()) % self.pool.len()].hash;
                }
                segments.push(segment);
            }
            (recipe::encode(&segments), Some(segments))
        };
        let size = if flags & 0x02 != 0 {
            i64::from_le_bytes(input.array())
        } else {
            let sum: u64 = segments.iter().flatten().map(|s| u64::from(s.len)).sum();
            sum as i64
        };
        let hash = if flags & 0x04 != 0 {
            let len = usize::from(input.u8() % 48);
            input.take(len).to_vec()
        } else {
            segments.as_deref().map_or_else(
                || vec![0; 32],
                |s| content_key(s.iter().map(|s| (s.hash, s.len))).0.to_vec(),
            )
        };
        let mut reads = Vec::new();
        while !input.0.is_empty() && reads.len() < 8 {
            let offset = u64::from(u32::from_le_bytes(input.array()));
            let len = usize::from(u16::from_le_bytes(input.array()));
            reads.push((offset, len));
        }
        Row {
            hash,
            size,
            recipe,
            segments,
            reads,
        }
    }

    /// The bytes a segment stands for: those of the stored chunk with its
    /// hash and length (a hash check cannot pass on anything else).
    fn expected<'s>(&'s self, segment: &Segment) -> Option<&'s [u8]> {
        if segment.len == 0 && segment.hash == self.empty_hash {
            return Some(&[]);
        }
        let chunk = &self.pool[*self.by_hash.get(&segment.hash)?];
        (chunk.bytes.len() == segment.len as usize).then_some(&chunk.bytes[..])
    }

    /// Whether reading the segment must succeed: it names a stored chunk at
    /// the place the import put it.
    fn intact(&self, segment: &Segment) -> bool {
        if segment.len == 0 {
            return segment.hash == self.empty_hash;
        }
        self.by_hash.get(&segment.hash).is_some_and(|&i| {
            let chunk = &self.pool[i];
            chunk.bytes.len() == segment.len as usize
                && chunk.object == segment.object
                && chunk.offset == segment.object_offset
        })
    }

    fn expected_file(&self, segments: &[Segment]) -> Option<Vec<u8>> {
        let mut file = Vec::new();
        for segment in segments {
            file.extend_from_slice(self.expected(segment)?);
        }
        Some(file)
    }

    fn run(&self, data: &[u8]) {
        let row = self.row(data);
        self.conn
            .execute(
                "UPDATE contents SET hash = ?1, size = ?2, recipe = ?3 WHERE id = ?4",
                params![row.hash, row.size, row.recipe, self.content_id],
            )
            .expect("write fuzzed row");

        let opened = self.store.open_file(self.content_id);
        let should_open = row.hash.len() == 32
            && row.size >= 0
            && row.segments.as_ref().is_some_and(|segments| {
                segments.iter().all(|s| self.objects.contains(&s.object))
                    && segments.iter().map(|s| u128::from(s.len)).sum::<u128>() == row.size as u128
            });
        let reader = match opened {
            Ok(reader) => reader,
            Err(err) => {
                assert!(!should_open, "open_file refused a valid row: {err}");
                return;
            }
        };
        assert!(should_open, "open_file accepted a malformed row");
        let segments = row.segments.expect("opened, so decoded");
        let size = row.size as u64;
        assert_eq!(reader.size(), size);

        let mut starts = Vec::with_capacity(segments.len());
        let mut pos = 0u64;
        for s in &segments {
            starts.push(pos);
            pos += u64::from(s.len);
        }

        for &(offset, len) in &row.reads {
            let mut buf = vec![0u8; len];
            let result = reader.read_at(offset, &mut buf);
            if offset >= size || len == 0 {
                assert_eq!(result.ok(), Some(0), "empty read at {offset}");
                continue;
            }
            let end = size.min(offset + len as u64);
            // Every segment the read may touch (zero-length ones at the
            // edges included, so this errs on the side of "may fail").
            let may_touch =
                |i: usize| starts[i] <= end && starts[i] + u64::from(segments[i].len) >= offset;
            match result {
                Ok(n) => {
                    assert_eq!(n as u64, end - offset, "short read at {offset}");
                    for (i, s) in segments.iter().enumerate() {
                        let (from, to) = (starts[i], starts[i] + u64::from(s.len));
                        if to <= offset || from >= end {
                            continue;
                        }
                        let bytes = self
                            .expected(s)
                            .unwrap_or_else(|| panic!("read returned unverifiable segment {i}"));
                        let lo = from.max(offset);
                        let hi = to.min(end);
                        assert_eq!(
                            &buf[(lo - offset) as usize..(hi - offset) as usize],
                            &bytes[(lo - from) as usize..(hi - from) as usize],
                            "wrong bytes from segment {i}"
                        );
                    }
                }
                Err(err) => {
                    let all_intact = (0..segments.len())
                        .filter(|&i| may_touch(i))
                        .all(|i| self.intact(&segments[i]));
                    assert!(!all_intact, "read of intact chunks failed: {err}");
                }
            }
        }

        let mut out = Vec::new();
        let copied = reader.copy_to(&mut out);
        let verified = reader.verify();
        assert_eq!(
            copied.is_ok(),
            verified.is_ok(),
            "copy_to and verify disagree"
        );
        let file = self.expected_file(&segments);
        let listed = content_key(segments.iter().map(|s| (s.hash, s.len)));
        let hash_right = file.as_ref().is_some_and(|file| {
            listed.0[..] == row.hash[..] || canonical_key_of_bytes(file).0[..] == row.hash[..]
        });
        match copied {
            Ok(n) => {
                assert_eq!(n, size);
                assert!(hash_right, "copy_to passed a file with the wrong hash");
                assert!(Some(&out) == file.as_ref(), "copy_to wrote the wrong bytes");
            }
            Err(err) => assert!(
                !(hash_right && segments.iter().all(|s| self.intact(s))),
                "copy_to of an intact file failed: {err}"
            ),
        }
    }
}

thread_local! {
    static FIXTURE: Fixture = Fixture::new();
}

fuzz_target!(|data: &[u8]| FIXTURE.with(|fixture| fixture.run(data)));
