//! The store's life cycle through its public API: import, replace, remove,
//! gc while a reader holds a file, verify naming damage, and removing
//! several models or a namespace, all or nothing.

use std::path::Path;

use modelfs_store::{Error, ImportOptions, NoProgress, RemoveOptions, Store};

/// Deterministic pseudo-random bytes (xorshift64*), so runs are repeatable.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write_model(dir: &Path, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn import(store: &mut Store, dir: &Path, name: &str, replace: bool) {
    let opts = ImportOptions {
        name: name.into(),
        replace,
        follow_symlinks: false,
        allow_malformed: false,
        revision: None,
    };
    store.import(dir, &opts, &NoProgress).unwrap();
}

fn read_all(store: &Store, model: &str, path: &str) -> Vec<u8> {
    let (_, info) = store.resolve(&format!("{model}/{path}")).unwrap();
    let mut out = Vec::new();
    store
        .open_file(info.content_id)
        .unwrap()
        .copy_to(&mut out)
        .unwrap();
    out
}

/// A base (all new: one whole-file object) and a variant sharing its first
/// 2 MiB (a recipe over the base's object plus a new one).
fn family(tmp: &Path) -> (Store, Vec<u8>, Vec<u8>) {
    let base = noise(1, 3 << 20);
    let mut variant = base[..2 << 20].to_vec();
    variant.extend_from_slice(&noise(2, 1 << 20));
    write_model(&tmp.join("a"), &[("w.bin", &base)]);
    write_model(&tmp.join("b"), &[("w.bin", &variant)]);
    let mut store = Store::init(&tmp.join("store")).unwrap();
    import(&mut store, &tmp.join("a"), "a", false);
    import(&mut store, &tmp.join("b"), "b", false);
    (store, base, variant)
}

#[test]
fn import_stores_shared_bytes_once_and_reads_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, base, variant) = family(tmp.path());
    let a = &store.files("a").unwrap()[0];
    let b = &store.files("b").unwrap()[0];
    assert!(
        a.whole_object.is_some(),
        "an all-new file is one whole object"
    );
    assert!(b.whole_object.is_none(), "a variant is a recipe");
    assert_ne!(a.hash, b.hash);
    assert_eq!(read_all(&store, "a", "w.bin"), base);
    assert_eq!(read_all(&store, "b", "w.bin"), variant);
    let usage = store.usage().unwrap();
    // The variant's 2 MiB shared prefix is stored once; allow for the CDC
    // chunk that straddles the boundary.
    assert!(
        usage.chunk_bytes < (4 << 20) + (256 << 10),
        "stored {} bytes for 4 MiB of unique data",
        usage.chunk_bytes
    );
}

#[test]
fn replace_swaps_the_model_and_gc_frees_the_old_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _, _) = family(tmp.path());
    let newer = noise(3, 1 << 20);
    write_model(&tmp.path().join("a2"), &[("w.bin", &newer)]);
    let err = store
        .import(
            &tmp.path().join("a2"),
            &ImportOptions {
                name: "a".into(),
                replace: false,
                follow_symlinks: false,
                allow_malformed: false,
                revision: None,
            },
            &NoProgress,
        )
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    import(&mut store, &tmp.path().join("a2"), "a", true);
    assert_eq!(read_all(&store, "a", "w.bin"), newer);
    let report = store.gc().unwrap();
    assert_eq!(report.contents_removed, 1, "{report:?}");
    // The old base's object still holds the variant's shared chunks: its
    // dead last MiB is punched, not the whole file removed.
    assert_eq!(report.objects_punched, 1, "{report:?}");
    assert!(report.bytes_freed >= 900 << 10, "{report:?}");
    assert!(store.verify(None).unwrap().is_clean());
}

#[test]
fn gc_leaves_objects_a_reader_holds_and_frees_them_after() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, base, _) = family(tmp.path());
    let (_, a) = store.resolve("a/w.bin").unwrap();
    let reader = store.open_file(a.content_id).unwrap();
    store.remove("a").unwrap();
    let busy = store.gc().unwrap();
    assert_eq!(busy.objects_busy, 1, "{busy:?}");
    assert_eq!(busy.objects_punched, 0, "{busy:?}");
    // Collected: a new open says the file was removed...
    assert!(matches!(
        store.open_file(a.content_id),
        Err(modelfs_store::Error::ContentRemoved)
    ));
    // ...while the open reader keeps every byte, each chunk checked.
    let mut out = Vec::new();
    reader.copy_to(&mut out).unwrap();
    assert!(out == base, "bytes changed under a reader");
    drop(reader);
    let freed = store.gc().unwrap();
    assert_eq!(freed.objects_punched, 1, "{freed:?}");
    assert!(store.verify(None).unwrap().is_clean());
}

#[test]
fn verify_names_the_damaged_file_and_only_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _) = family(tmp.path());
    assert!(store.verify(None).unwrap().is_clean());
    // Flip a byte in the variant's own object (its last MiB).
    let (_, b) = store.resolve("b/w.bin").unwrap();
    let reader = store.open_file(b.content_id).unwrap();
    let last = reader.segments().len() - 1;
    let object = reader.object_of(last).path().to_path_buf();
    let at = reader.segments()[last].object_offset;
    drop(reader);
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&object, bytes).unwrap();
    let report = store.verify(None).unwrap();
    let damaged: Vec<_> = report
        .damaged
        .iter()
        .map(|d| format!("{}/{}", d.model, d.path))
        .collect();
    assert_eq!(damaged, ["b/w.bin"], "{report:?}");
    assert!(report.damaged[0].reason.contains("does not match its hash"));
    // The damaged chunk is an error on read; the shared prefix still reads.
    let reader = store.open_file(b.content_id).unwrap();
    assert!(reader.checked_segment(last).is_err());
    assert!(reader.checked_segment(0).is_ok());
}

/// A store holding `a`, `org/x`, `org/y` and `org2/z` (small, distinct files).
fn named_models(tmp: &Path) -> Store {
    let mut store = Store::init(&tmp.join("store")).unwrap();
    for (i, name) in ["a", "org/x", "org/y", "org2/z"].iter().enumerate() {
        let dir = tmp.join(format!("src{i}"));
        write_model(&dir, &[("w.bin", &noise(10 + i as u64, 40_000))]);
        import(&mut store, &dir, name, false);
    }
    store
}

fn names(store: &Store) -> Vec<String> {
    store
        .models()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect()
}

fn removed_names(removed: &[modelfs_store::ModelInfo]) -> Vec<&str> {
    removed.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn remove_is_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = named_models(tmp.path());
    let all = names(&store);
    // Another connection notices any commit, as a mount would.
    let observer = Store::open(store.root()).unwrap();
    let version = observer.data_version().unwrap();
    let err = store
        .remove_models(&["a", "no-such", "org/x", "org"], RemoveOptions::default())
        .unwrap_err();
    let Error::NothingRemoved(why) = &err else {
        panic!("expected NothingRemoved, got {err}");
    };
    assert!(
        matches!(&why[0], Error::NoSuchModel(n) if n == "no-such"),
        "{err}"
    );
    assert!(
        matches!(&why[1], Error::IsNamespace { name, count: 2, .. } if name == "org"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("no-such")
            && msg.contains("--recursive")
            && msg.contains("nothing was removed"),
        "{msg}"
    );
    assert_eq!(names(&store), all);
    assert_eq!(
        observer.data_version().unwrap(),
        version,
        "the catalog was written"
    );

    // One bad name alone is reported as itself.
    let err = store
        .remove_models(&["gone"], RemoveOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, Error::NoSuchModel(n) if n == "gone"),
        "{err}"
    );

    // All good: all removed, each once, by name.
    let removed = store
        .remove_models(&["org/y", "a", "org/y"], RemoveOptions::default())
        .unwrap();
    assert_eq!(removed_names(&removed), ["a", "org/y"]);
    assert_eq!(names(&store), ["org/x", "org2/z"]);
    assert!(store.verify(None).unwrap().is_clean());
}

#[test]
fn dry_run_removes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = named_models(tmp.path());
    let all = names(&store);
    let dry = RemoveOptions {
        recursive: true,
        dry_run: true,
    };
    let would = store.remove_models(&["org/", "a"], dry).unwrap();
    assert_eq!(removed_names(&would), ["a", "org/x", "org/y"]);
    assert_eq!(names(&store), all);
    // A dry run checks the names like a real one.
    assert!(matches!(
        store.remove_models(&["nope"], dry),
        Err(Error::NoSuchModel(_))
    ));
}

#[test]
fn a_namespace_is_removed_only_recursively() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = named_models(tmp.path());
    for name in ["org", "org/"] {
        let err = store
            .remove_models(&[name], RemoveOptions::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::IsNamespace { name, count: 2, .. } if name == "org"),
            "{err}"
        );
        assert!(err.to_string().contains("--recursive"), "{err}");
    }
    // Not a namespace of whole components: `or` is nothing.
    let recursive = RemoveOptions {
        recursive: true,
        dry_run: false,
    };
    assert!(matches!(
        store.remove_models(&["or"], recursive),
        Err(Error::NoSuchModel(_))
    ));
    // Never everything at once.
    assert!(matches!(
        store.remove_models(&["/"], recursive),
        Err(Error::InvalidName { .. })
    ));
    let removed = store.remove_models(&["org/"], recursive).unwrap();
    assert_eq!(removed_names(&removed), ["org/x", "org/y"]);
    assert_eq!(names(&store), ["a", "org2/z"]);
    // A model named exactly is removed with or without --recursive.
    let removed = store.remove_models(&["a"], recursive).unwrap();
    assert_eq!(removed_names(&removed), ["a"]);
    store.gc().unwrap();
    assert!(store.verify(None).unwrap().is_clean());
}

#[test]
fn resolving_a_model_name_alone_says_to_name_one_of_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(
        &tmp.path().join("m"),
        &[("a.bin", b"a"), ("config.json", b"{}")],
    );
    let mut store = Store::init(&tmp.path().join("store")).unwrap();
    import(&mut store, &tmp.path().join("m"), "org/m", false);
    for asked in ["org/m", "org/m/"] {
        let err = store.resolve(asked).unwrap_err().to_string();
        assert!(err.contains("org/m: is a model, not a file"), "{err}");
        assert!(err.contains("e.g. org/m/config.json"), "{err}");
        assert!(err.contains("`modelfs ls org/m`"), "{err}");
    }
    // A name that is no model keeps the general message.
    let err = store.resolve("org").unwrap_err().to_string();
    assert!(err.contains("no model name is a prefix"), "{err}");
}

#[test]
fn rename_moves_the_name_only_and_follows_the_import_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, base, _) = family(tmp.path());
    store.rename_model("a", "org/a").unwrap();
    let renamed = store.rename_model("org/a", "org2/a").unwrap();
    assert_eq!(renamed.name, "org2/a");
    let names: Vec<String> = store
        .models()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["b", "org2/a"]);
    assert_eq!(read_all(&store, "org2/a", "w.bin"), base);
    assert!(matches!(
        store.rename_model("org2/a", "b"),
        Err(Error::NameTaken(n)) if n == "b"
    ));
    assert!(matches!(
        store.rename_model("gone", "c"),
        Err(Error::NoSuchModel(n)) if n == "gone"
    ));
    for nested in ["b/inner", "org2/a/x"] {
        let from = if nested.starts_with('b') {
            "org2/a"
        } else {
            "b"
        };
        assert!(
            matches!(
                store.rename_model(from, nested),
                Err(Error::InvalidName { .. })
            ),
            "{from} -> {nested} accepted"
        );
    }
    assert!(matches!(
        store.rename_model("org2", "c"),
        Err(Error::InvalidName { .. })
    ));
    assert!(store.rename_model("b", "../c").is_err());
    let names: Vec<String> = store
        .models()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["b", "org2/a"], "a refused rename changed nothing");
}
