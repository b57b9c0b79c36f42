//! Validation of model names and of file paths inside a model.
//!
//! Names become directories under the mount point and keys in the catalog, so
//! anything that could escape the mount (`..`, a leading `/`) or confuse a
//! shell or a terminal (control characters) is refused up front.

use crate::error::{Error, Result};

const MAX_COMPONENT: usize = 255;
/// Top-level name the mount uses for its statistics directory.
pub const RESERVED: &str = ".modelfs";
const MAX_TOTAL: usize = 4096;

/// Check a model name such as `bert-base` or `org/llama-3-8b-ft1`.
pub fn validate_model_name(name: &str) -> Result<()> {
    let invalid = |reason: String| Error::InvalidName {
        name: name.to_string(),
        reason,
    };
    check_relative_path(name).map_err(invalid)?;
    if name.split('/').next() == Some(RESERVED) {
        return Err(invalid(format!(
            "{RESERVED:?} is reserved for the mount's own files"
        )));
    }
    Ok(())
}

/// Check a path of a file inside a model (relative, `/`-separated).
///
/// Public (re-exported at the crate root) only so that the fuzz target
/// `fuzz/fuzz_targets/names.rs` can check that no path it accepts can leave
/// a model's directory; within the workspace only this crate calls it (the
/// importer and [`validate_model_name`]).
pub fn check_relative_path(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("it is empty".into());
    }
    if path.len() > MAX_TOTAL {
        return Err(format!("it is longer than {MAX_TOTAL} bytes"));
    }
    if path.starts_with('/') {
        return Err("it starts with '/' (names are relative)".into());
    }
    if let Some(c) = path.chars().find(|c| c.is_control()) {
        return Err(format!("it contains the control character {c:?}"));
    }
    for part in path.split('/') {
        match part {
            "" => return Err("it has an empty component ('//' or a trailing '/')".into()),
            "." | ".." => return Err(format!("it has a {part:?} component")),
            p if p.len() > MAX_COMPONENT => {
                return Err(format!("a component is longer than {MAX_COMPONENT} bytes"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// True if `ancestor` is a proper path-prefix of `name` (`org` of `org/llama`).
pub(crate) fn is_ancestor(ancestor: &str, name: &str) -> bool {
    name.len() > ancestor.len()
        && name.starts_with(ancestor)
        && name.as_bytes()[ancestor.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_nested_names() {
        for ok in ["bert-base", "org/llama-3-8b-ft1", "a/b/c", "x.y_z"] {
            validate_model_name(ok).unwrap();
        }
    }

    #[test]
    fn refuses_escaping_or_odd_names() {
        for bad in [
            "",
            "/abs",
            "a/../b",
            "..",
            ".",
            "a//b",
            "a/",
            "tab\there",
            "nl\nx",
            "nul\0x",
        ] {
            assert!(validate_model_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_model_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn ancestor_means_whole_components() {
        assert!(is_ancestor("org", "org/llama"));
        assert!(!is_ancestor("org", "organic"));
        assert!(!is_ancestor("org", "org"));
    }
}
