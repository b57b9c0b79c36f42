//! Import of model files that do not parse: a file whose name or magic
//! bytes declare a model format is refused before anything is written
//! (store-format §8.1) unless malformed files are allowed; files that only
//! look like a format, and files of no format, are stored as before. The
//! model files are the ones the real writers produced for the formats
//! crate's tests (formats/tests/make_fixtures.py), cut short or overwritten.

use std::path::{Path, PathBuf};

use modelfs_store::{Error, ImportOptions, ImportSummary, NoProgress, Store};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../formats/tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Deterministic pseudo-random bytes (xorshift64*).
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

/// A model directory of `files` next to the ordinary files every model has.
/// `a-weights.bin` sorts first and is large, so a refusal that came only when
/// the importer reached the broken file would have written its object.
fn model_dir(root: &Path, dir: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a-weights.bin"), noise(7, 2 << 20)).unwrap();
    std::fs::write(d.join("config.json"), b"{\"model_type\": \"llama\"}\n").unwrap();
    std::fs::write(d.join("tokenizer.json"), b"{\"version\": \"1.0\"}\n").unwrap();
    std::fs::write(d.join("README.txt"), b"a model\n").unwrap();
    for (name, bytes) in files {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    d
}

fn import(store: &mut Store, dir: &Path, allow_malformed: bool) -> Result<ImportSummary, Error> {
    let opts = ImportOptions {
        name: "m".into(),
        replace: false,
        follow_symlinks: false,
        allow_malformed,
        revision: None,
    };
    store.import(dir, &opts, &NoProgress)
}

/// Every file under the store's objects directory.
fn object_files(store: &Store) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![store.root().join(modelfs_store::OBJECTS_DIR)];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn read_back(store: &Store, path: &str) -> Vec<u8> {
    let (_, info) = store.resolve(&format!("m/{path}")).unwrap();
    let mut out = Vec::new();
    store
        .open_file(info.content_id)
        .unwrap()
        .copy_to(&mut out)
        .unwrap();
    out
}

/// Each writer's file cut to 60 %, under its own name, and GGUF bytes
/// under a name that says nothing: (file name, fixture, declared format).
fn truncated_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let cut = |b: Vec<u8>| b[..b.len() * 6 / 10].to_vec();
    vec![
        (
            "model.safetensors",
            cut(fixture("model.safetensors")),
            "safetensors",
        ),
        ("model.gguf", cut(fixture("model.gguf")), "gguf"),
        ("model.onnx", cut(fixture("model.onnx")), "onnx"),
        ("pytorch_model.bin", cut(fixture("model.pt")), "torch"),
        ("model.pt", cut(fixture("model.pt")), "torch"),
        ("weights.bin", cut(fixture("model.gguf")), "gguf"),
    ]
}

#[test]
fn a_truncated_model_file_refuses_the_import_before_anything_is_written() {
    for (name, bytes, format) in truncated_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = model_dir(tmp.path(), "src", &[(name, bytes.clone())]);
        let mut store = Store::init(&tmp.path().join("store")).unwrap();
        let err = import(&mut store, &dir, false).unwrap_err();
        let Error::MalformedModelFiles(files) = &err else {
            panic!("{name}: expected a refusal, got {err}");
        };
        assert_eq!(files.len(), 1, "{name}: {files:?}");
        assert_eq!(files[0].path, dir.join(name), "{name}");
        assert_eq!(files[0].format, format, "{name}");
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains("--allow-malformed"),
            "{msg}"
        );
        assert!(store.models().unwrap().is_empty(), "{name}");
        assert_eq!(object_files(&store), Vec::<PathBuf>::new(), "{name}");
        assert!(store.verify(None).unwrap().is_clean());

        // Allowed: stored by content alone, byte-exact, with a warning.
        let summary = import(&mut store, &dir, true).unwrap();
        assert_eq!(summary.warnings.len(), 1, "{name}: {:?}", summary.warnings);
        assert!(summary.warnings[0].contains(name), "{:?}", summary.warnings);
        let file = store
            .files("m")
            .unwrap()
            .into_iter()
            .find(|f| f.path == name)
            .unwrap();
        assert_eq!(file.format, None, "{name}");
        assert_eq!(read_back(&store, name), bytes, "{name}");
        assert!(store.verify(None).unwrap().is_clean());
    }
}

#[test]
fn every_broken_model_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut garbage_header = fixture("model.safetensors");
    garbage_header[8..40].copy_from_slice(&noise(3, 32));
    let dir = model_dir(
        tmp.path(),
        "src",
        &[
            ("model-00001-of-00002.safetensors", garbage_header),
            ("model-00002-of-00002.safetensors", Vec::new()),
            ("good.safetensors", fixture("model.safetensors")),
        ],
    );
    let mut store = Store::init(&tmp.path().join("store")).unwrap();
    let err = import(&mut store, &dir, false).unwrap_err();
    let Error::MalformedModelFiles(files) = &err else {
        panic!("expected a refusal, got {err}");
    };
    let named: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(
        named,
        [
            dir.join("model-00001-of-00002.safetensors"),
            dir.join("model-00002-of-00002.safetensors")
        ],
        "{err}"
    );
    assert!(store.models().unwrap().is_empty());
}

#[test]
fn files_that_only_look_like_a_format_are_stored_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let st = fixture("model.safetensors");
    let pt = fixture("model.pt");
    let files = [
        // A plausible safetensors header without the name: a guess, so a
        // failed parse is a warning.
        ("weights", st[..st.len() - 1].to_vec()),
        // Neither name nor magic declares a format.
        ("random.bin", noise(5, 100_000)),
        ("legacy.pt", fixture("legacy.pt")),
        ("archive.zip", pt[..pt.len() / 2].to_vec()),
        ("empty.bin", Vec::new()),
    ];
    let dir = model_dir(tmp.path(), "src", &files);
    let mut store = Store::init(&tmp.path().join("store")).unwrap();
    let summary = import(&mut store, &dir, false).unwrap();
    assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
    assert!(
        summary.warnings[0].contains("weights"),
        "{:?}",
        summary.warnings
    );
    for (name, bytes) in &files {
        assert_eq!(&read_back(&store, name), bytes, "{name}");
    }
    assert_eq!(
        read_back(&store, "config.json"),
        b"{\"model_type\": \"llama\"}\n"
    );
}

#[test]
fn an_import_of_nothing_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::init(&tmp.path().join("store")).unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let only_dirs = tmp.path().join("only-dirs");
    std::fs::create_dir_all(only_dirs.join("a/b")).unwrap();
    for dir in [empty, only_dirs] {
        let err = import(&mut store, &dir, false).unwrap_err();
        assert!(
            matches!(&err, Error::NothingToImport(p) if *p == dir),
            "{err}"
        );
        assert!(err.to_string().contains("nothing to import in"), "{err}");
    }
    assert!(store.models().unwrap().is_empty());
}
