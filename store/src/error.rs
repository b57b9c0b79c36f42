use std::io;
use std::path::PathBuf;

/// Every failure the store reports. Each variant names the thing it failed on,
/// because a message like "No such file or directory" without a path is useless
/// to someone importing a tree of hundreds of files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("catalog {path}: {source}")]
    Catalog {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("invalid model name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("{path}: {reason}")]
    InvalidInput { path: PathBuf, reason: String },
    #[error("model {0:?} already exists (use --replace to overwrite it)")]
    ModelExists(String),
    #[error("no model named {0:?}")]
    NoSuchModel(String),
    #[error("no file {path:?} in model {model:?}")]
    NoSuchFile { model: String, path: String },
    #[error("{0}")]
    Corrupt(String),
    /// An object file the catalog refers to does not exist: damage, unless
    /// the content that used it was removed and collected meanwhile.
    #[error("object {} is missing", path.display())]
    ObjectMissing { path: PathBuf },
    /// The content was removed (and may have been collected) while it was
    /// being opened.
    #[error("the file was removed from the store")]
    ContentRemoved,
    #[error("{path}: not a modelfs store ({reason})")]
    NotAStore { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an io::Error: `file.read(..).at(&path)?`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
