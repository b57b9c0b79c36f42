use std::io;
use std::path::PathBuf;

/// Every failure the store reports. Each variant names the thing it failed on,
/// because a message like "No such file or directory" without a path is useless
/// to someone importing a tree of hundreds of files.
///
/// A variant that wraps a lower-level error says it in its message and does
/// not also return it from `source()`: a chain printer (anyhow's `{:#}`, the
/// CLI's error line) would otherwise print the cause twice, and the many
/// places that log an error with `{e}` would lose it if only `source()` had
/// it. Callers that need the cause match the variant's `cause` field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a file or directory failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory it failed on (`<output>` for the writer a
        /// file was being copied to).
        path: PathBuf,
        /// What the system call reported.
        cause: io::Error,
    },
    /// SQLite failed on the catalog.
    #[error("catalog {path}: {cause}")]
    Catalog {
        /// Path of the catalog database.
        path: PathBuf,
        /// What SQLite reported.
        cause: rusqlite::Error,
    },
    /// A model name breaks the naming rules (see [`crate::validate_model_name`]).
    #[error("invalid model name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A path given to the store (an import source, a file inside it, or a
    /// `MODEL/PATH` argument) cannot be used.
    #[error("{path}: {reason}")]
    InvalidInput {
        /// The path as given or found.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// An import would replace a model of the same name without being asked
    /// to; holds the name.
    #[error("model {0:?} already exists (use --replace to overwrite it)")]
    ModelExists(String),
    /// A model cannot be renamed to a name another model already has; holds
    /// the name.
    #[error("model {0:?} already exists (remove it first or choose another name)")]
    NameTaken(String),
    /// No model has this name; holds the name.
    #[error("no model named {0:?}")]
    NoSuchModel(String),
    /// A name given to remove is no model but the namespace of some (`org`
    /// of `org/a`), and removing namespaces was not asked for.
    #[error("{name:?} is not a model but the namespace of {}; pass --recursive to remove every model under {name}/", namespace_models(*.count, .example))]
    IsNamespace {
        /// The name as given.
        name: String,
        /// How many models are under it.
        count: usize,
        /// One of them, to show what is meant.
        example: String,
    },
    /// Some of the names given to remove name nothing removable, so nothing
    /// was removed; holds why, for each such name.
    #[error("{}; nothing was removed", join_errors(.0))]
    NothingRemoved(Vec<Error>),
    /// The import source holds no files (an empty directory, or only empty
    /// directories); holds the source.
    #[error("nothing to import in {} (it holds no files)", .0.display())]
    NothingToImport(PathBuf),
    /// Files whose name or magic bytes say they are model files do not parse,
    /// which almost always means a broken download; the import stored nothing.
    #[error("{}", malformed_message(.0))]
    MalformedModelFiles(Vec<MalformedFile>),
    /// The model exists but has no file at this path.
    #[error("no file {path:?} in model {model:?}")]
    NoSuchFile {
        /// Name of the model.
        model: String,
        /// Path inside the model that was asked for.
        path: String,
    },
    /// Stored data contradicts itself (a chunk not matching its hash, a
    /// truncated object, a malformed recipe); the message says where.
    #[error("{0}")]
    Corrupt(String),
    /// An object file the catalog refers to does not exist: damage, unless
    /// the content that used it was removed and collected meanwhile.
    #[error("object {} is missing", path.display())]
    ObjectMissing {
        /// Where the object file should be.
        path: PathBuf,
    },
    /// The content was removed (and may have been collected) while it was
    /// being opened.
    #[error("the file was removed from the store")]
    ContentRemoved,
    /// The directory is not a store this modelfs can open: no catalog, or a
    /// catalog of another schema version.
    #[error("{path}: not a modelfs store ({reason})")]
    NotAStore {
        /// The directory (or catalog file) that was opened.
        path: PathBuf,
        /// What is missing or which version was found.
        reason: String,
    },
}

/// A model file an import refused: it declares a format (store-format §8.1)
/// that its bytes do not parse as.
#[derive(Debug, Clone)]
pub struct MalformedFile {
    /// The file, as found under the imported path.
    pub path: PathBuf,
    /// The format its name or magic bytes declare (`safetensors`, `torch`,
    /// `gguf`, `onnx`).
    pub format: String,
    /// What the parser found wrong.
    pub reason: String,
}

fn malformed_message(files: &[MalformedFile]) -> String {
    let not_valid = |f: &MalformedFile| {
        format!(
            "{}: not a valid {} file ({})",
            f.path.display(),
            f.format,
            f.reason
        )
    };
    match files {
        [f] => format!(
            "{}, probably a truncated or broken download; nothing was imported (if the file \
is complete, pass --allow-malformed to store it by content alone)",
            not_valid(f)
        ),
        _ => {
            let list: Vec<String> = files.iter().map(not_valid).collect();
            format!(
                "{} model files do not parse, probably truncated or broken downloads: {}; \
nothing was imported (if the files are complete, pass --allow-malformed to store them by content \
alone)",
                files.len(),
                list.join("; ")
            )
        }
    }
}

impl Error {
    /// The path this error was refused access to, when the failure is about
    /// permissions rather than content: a system call that got EACCES, EPERM
    /// or EROFS, or SQLite refusing to write the catalog (which it reports
    /// for a catalog or store directory the user cannot write). The CLI turns
    /// these into advice on which store to use and as whom.
    pub fn denied_path(&self) -> Option<&std::path::Path> {
        match self {
            Error::Io { path, cause } => matches!(
                cause.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            )
            .then_some(path.as_path()),
            Error::Catalog {
                path,
                cause: rusqlite::Error::SqliteFailure(e, _),
            } => matches!(
                e.code,
                rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::PermissionDenied
            )
            .then_some(path.as_path()),
            _ => None,
        }
    }
}

fn namespace_models(count: usize, example: &str) -> String {
    match count {
        1 => format!("1 model ({example:?})"),
        n => format!("{n} models (e.g. {example:?})"),
    }
}

fn join_errors(errors: &[Error]) -> String {
    let list: Vec<String> = errors.iter().map(Error::to_string).collect();
    list.join("; ")
}

/// The store's result type: [`Error`] unless another error is named.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an io::Error: `file.read(..).at(&path)?`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|cause| Error::Io {
            path: path.into(),
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What anyhow's `{:#}` prints: every message of the `source()` chain.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut next = e.source();
        while let Some(s) = next {
            out.push_str(": ");
            out.push_str(&s.to_string());
            next = s.source();
        }
        out
    }

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn a_wrapped_cause_is_printed_once() {
        let e = Error::Io {
            path: "/store/objects".into(),
            cause: os(libc::EPERM),
        };
        let text = chain(&e);
        assert_eq!(text.matches("Operation not permitted").count(), 1, "{text}");
        assert!(text.starts_with("/store/objects: "), "{text}");

        let e = Error::Catalog {
            path: "/store/catalog.db".into(),
            cause: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                Some("attempt to write a readonly database".into()),
            ),
        };
        let text = chain(&e);
        assert_eq!(text.matches("readonly database").count(), 1, "{text}");
    }

    #[test]
    fn permission_failures_name_the_path_they_were_denied() {
        for errno in [libc::EACCES, libc::EPERM, libc::EROFS] {
            let e = Error::Io {
                path: "/s/lock".into(),
                cause: os(errno),
            };
            assert_eq!(e.denied_path(), Some(std::path::Path::new("/s/lock")));
        }
        let e = Error::Io {
            path: "/s/lock".into(),
            cause: os(libc::ENOSPC),
        };
        assert_eq!(e.denied_path(), None);
        let readonly = Error::Catalog {
            path: "/s/catalog.db".into(),
            cause: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY_DIRECTORY),
                None,
            ),
        };
        assert_eq!(
            readonly.denied_path(),
            Some(std::path::Path::new("/s/catalog.db"))
        );
        assert_eq!(Error::NoSuchModel("m".into()).denied_path(), None);
    }
}
