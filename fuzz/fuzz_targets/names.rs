//! Fuzz target: model-name and in-model path validation
//! (`validate_model_name`, `check_relative_path`), which stand between
//! untrusted names and directories under the mount point and keys in the
//! catalog.
//!
//! Checks the property, not just "no panic":
//! * a path is accepted exactly when it is non-empty, at most 4096 bytes,
//!   not absolute, free of control characters, and made of non-empty
//!   components that are neither `.` nor `..` and at most 255 bytes; so
//!   `..`, a leading `/`, `//`, a trailing `/` and control characters are
//!   always refused;
//! * anything accepted, joined under a directory, stays strictly inside it:
//!   every `std::path` component is a normal name;
//! * a model name is accepted exactly when it is an accepted path whose
//!   first component is not the reserved `.modelfs`.
//!
//! Input: the bytes as UTF-8 (invalid sequences become U+FFFD).
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use modelfs_store::{check_relative_path, validate_model_name, RESERVED_NAME};

fn acceptable(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 4096
        && !path.starts_with('/')
        && !path.chars().any(char::is_control)
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != ".." && part.len() <= 255)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path: &str = &text;

    let accepted = check_relative_path(path).is_ok();
    assert_eq!(
        accepted,
        acceptable(path),
        "check_relative_path({path:?}) = {:?}",
        check_relative_path(path)
    );
    if accepted {
        assert!(Path::new(path)
            .components()
            .all(|part| matches!(part, Component::Normal(_))));
        let base = Path::new("/models/m");
        let joined = base.join(path);
        assert!(
            joined.starts_with(base) && joined != base,
            "{path:?} escapes"
        );
    }

    let reserved = path.split('/').next() == Some(RESERVED_NAME);
    assert_eq!(
        validate_model_name(path).is_ok(),
        accepted && !reserved,
        "validate_model_name({path:?})"
    );
});
