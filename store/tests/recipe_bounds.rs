//! A damaged or hostile recipe record must not make the reader allocate the
//! chunk length it claims. Regression test for what the `store_read` fuzz
//! target found first (fuzz/corpus/store_read/regression-oom-huge-chunk): a
//! record claiming a 637,864,679-byte chunk inside an object of a few KiB,
//! with the content size raised to match so the recipe still adds up, made
//! `cat`/`verify` allocate and zero 608 MiB (up to 4 GiB per `verify`
//! thread for a `u32::MAX` length) before the read failed.
//!
//! This binary counts the largest single allocation to check it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use modelfs_store::{recipe, Error, ImportOptions, NoProgress, Store, CATALOG_FILE};

struct PeakAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only
// records the requested sizes.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

/// Nothing in these tests legitimately allocates more than this.
const ALLOCATION_LIMIT: usize = 64 << 20;

#[test]
fn huge_chunk_length_in_recipe_is_an_error_without_allocating_it() {
    // The fuzz input's length, then the largest a record can claim.
    for claimed in [0x2605_0ae7u32, u32::MAX] {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("model");
        std::fs::create_dir(&model).expect("mkdir");
        std::fs::write(model.join("weights.bin"), [7u8; 3000]).expect("write");
        let mut store = Store::init(&dir.path().join("store")).expect("init");
        let opts = ImportOptions {
            name: "m".into(),
            replace: false,
            follow_symlinks: false,
            allow_malformed: false,
            revision: None,
        };
        store.import(&model, &opts, &NoProgress).expect("import");
        let content_id = store.files("m").expect("files")[0].content_id;

        // Claim a huge first chunk and raise the size to match, so the
        // recipe still adds up and only the object bounds give it away.
        let catalog = rusqlite::Connection::open(store.root().join(CATALOG_FILE)).expect("open");
        let blob: Vec<u8> = catalog
            .query_row(
                "SELECT recipe FROM contents WHERE id = ?1",
                [content_id],
                |r| r.get(0),
            )
            .expect("recipe");
        let mut segments = recipe::decode(&blob).expect("valid recipe");
        segments[0].len = claimed;
        let size: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        catalog
            .execute(
                "UPDATE contents SET recipe = ?1, size = ?2 WHERE id = ?3",
                rusqlite::params![recipe::encode(&segments), size as i64, content_id],
            )
            .expect("damage the recipe");

        LARGEST.store(0, Ordering::Relaxed);
        let reader = store.open_file(content_id).expect("the recipe adds up");
        let err = reader.verify().expect_err("chunk past the object's end");
        assert!(
            matches!(&err, Error::Corrupt(msg) if msg.contains("truncated")),
            "{err}"
        );
        assert!(reader.read_at(0, &mut [0u8; 4096]).is_err());
        assert!(reader.copy_to(&mut Vec::new()).is_err());
        let report = store.verify(None).expect("verify runs");
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest < ALLOCATION_LIMIT,
            "a {claimed}-byte chunk claim led to a {largest}-byte allocation"
        );
    }
}
