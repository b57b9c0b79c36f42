//! The four kinds of names the store gives things, each its own type so that
//! one can never be passed where another is meant: a chunk's hash is not a
//! content's key (both are 32 BLAKE3 bytes, derived differently), and a
//! content id is not an object id (both are catalog integers).

use std::fmt;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Lower-case hex, 64 characters.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// From exactly 32 bytes (a catalog or recipe field).
            pub fn from_slice(bytes: &[u8]) -> Option<$name> {
                Some($name(bytes.try_into().ok()?))
            }

            /// From 64 hex digits.
            pub fn from_hex(hex: &str) -> Option<$name> {
                blake3::Hash::from_hex(hex).ok().map(|h| $name(*h.as_bytes()))
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> $name {
                $name(*h.as_bytes())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", &self.to_hex()[..16])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::Borrowed(ValueRef::Blob(&self.0)))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let blob = value.as_blob()?;
                $name::from_slice(blob).ok_or(FromSqlError::InvalidBlobSize {
                    expected_size: 32,
                    blob_size: blob.len(),
                })
            }
        }
    };
}

digest_type!(
    /// BLAKE3 of one chunk's bytes: the chunk's address in the chunk index.
    ChunkHash
);

digest_type!(
    /// The key a content (distinct file) is stored under: BLAKE3 in
    /// key-derivation mode over its canonical chunk list (store-format §3).
    /// Identical bytes have one key whatever their name.
    ContentKey
);

impl ChunkHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($int:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $int);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                // SQLite integers are i64; ids are allocated from 1 upwards
                // and never come near 2^63.
                Ok(ToSqlOutput::from(self.0 as i64))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                Ok($name(value.as_i64()? as $int))
            }
        }
    };
}

id_type!(
    /// Catalog id of a content (`contents.id`): one per distinct file. The
    /// mount derives a file's inode number from it, so identical files share
    /// one inode. Never reused after gc.
    ContentId(i64)
);

id_type!(
    /// Catalog id of an object file (`objects.id`), which also names the file:
    /// `objects/<id & 0xff as 2 hex digits>/<id as 16 hex digits>`.
    ObjectId(u64)
);
