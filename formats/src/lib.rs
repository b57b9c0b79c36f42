//! Find where the tensor data lives inside model files.
//!
//! The store cuts files into content-defined chunks, but a chunker that only
//! sees bytes cannot know that a 40 MiB run in a safetensors file and the same
//! run inside a GGUF or `torch.save` archive are the same tensor: the headers
//! in front of it differ in length, so every chunk boundary shifts and nothing
//! deduplicates. This crate reads just enough of each supported format to
//! report the byte spans that hold tensor data, so the store can force chunk
//! boundaries at tensor edges and identical tensors hash identically whatever
//! file (and whatever offset) they sit in. It does no chunking itself.
//!
//! Model files come from untrusted sources and are fuzzed, so every parser
//! here treats the input as hostile: all reads go through a random-access
//! [`Source`] (multi-GiB files are never read whole), every length is checked
//! against the file size before anything is allocated or skipped, arithmetic
//! is overflow-checked, recursion is depth-limited, and any inconsistency is a
//! [`ParseError`] rather than a panic or a best guess.

mod gguf;
mod onnx;
mod reader;
mod safetensors;
mod torch;

use std::fmt;
use std::io;

/// Random-access byte source. Implemented for `[u8]`, `Vec<u8>` and `std::fs::File` (via
/// `std::os::unix::fs::FileExt::read_exact_at`), and for references to any source, so a
/// `&[u8]` can be passed as `&dyn Source` by reference.
///
/// Parsers only ever need a header and a few scattered structures, so they
/// ask for exactly the bytes they need instead of streaming the whole file.
pub trait Source {
    /// Total length of the source in bytes.
    fn len(&self) -> u64;

    /// Fill `buf` from `offset`; reading past the end is an error
    /// ([`io::ErrorKind::UnexpectedEof`]), never a short read, so callers
    /// cannot mistake a truncated file for a complete one.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Whether the source holds no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        // usize always fits in u64 on supported targets.
        <[u8]>::len(self) as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| past_end_io())?;
        let end = start.checked_add(buf.len()).ok_or_else(past_end_io)?;
        let bytes = self.get(start..end).ok_or_else(past_end_io)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> u64 {
        Source::len(self.as_slice())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Source::read_at(self.as_slice(), offset, buf)
    }
}

#[cfg(unix)]
impl Source for std::fs::File {
    /// A file whose metadata cannot be read reports length 0, which makes
    /// every parser fail cleanly with a "file too short" error.
    fn len(&self) -> u64 {
        self.metadata().map(|meta| meta.len()).unwrap_or(0)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl<S: Source + ?Sized> Source for &S {
    fn len(&self) -> u64 {
        (**self).len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
}

fn past_end_io() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of source")
}

/// A tensor container format this crate can parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Hugging Face safetensors: JSON header followed by raw tensor data.
    Safetensors,
    /// `torch.save` zip archive (`.bin`, `.pt`, `.pth`).
    Torch,
    /// llama.cpp GGUF, versions 2 and 3.
    Gguf,
    /// ONNX `ModelProto`, including references to external data files.
    Onnx,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::Torch => "torch",
            Format::Gguf => "gguf",
            Format::Onnx => "onnx",
        })
    }
}

/// Bytes of one tensor's data within the parsed file.
///
/// The span covers exactly the tensor's bytes (no header or alignment
/// padding), so the same tensor stored in two files yields byte-identical
/// spans and deduplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpan {
    /// Absolute offset of the first data byte within the file.
    pub offset: u64,
    /// Number of data bytes; always > 0 in a [`Layout`].
    pub len: u64,
}

/// ONNX external-data reference: tensor bytes living in another file of the same model directory.
///
/// `location` is copied verbatim from the untrusted model file: it is not
/// checked to be relative or free of `..`, and `offset`/`len` are not checked
/// against the referenced file (this crate never opens it). Whoever resolves
/// it must do both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSpan {
    /// Path of the data file, relative to the directory of the `.onnx` file.
    pub location: String,
    /// Offset of the tensor's bytes within that file.
    pub offset: u64,
    /// Number of bytes; always > 0.
    pub len: u64,
}

/// Where the tensor data lives in one model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Format the file was parsed as.
    pub format: Format,
    /// Tensor data inside this file: sorted by offset, non-overlapping, each
    /// span non-empty and within the file.
    pub tensors: Vec<TensorSpan>,
    /// Tensor data stored in sibling files (ONNX external data only), in the
    /// order the model lists it.
    pub external: Vec<ExternalSpan>,
}

/// Why a file that claims to be a model format could not be parsed.
///
/// A variant that wraps another error says it in its message and does not
/// also return it from `source()`, so printing the chain (anyhow's `{:#}`)
/// shows it once.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The source itself failed (not a format problem).
    #[error("I/O error while reading the model file: {0}")]
    Io(io::Error),

    /// A structure claims more bytes than the file has (truncated file or a
    /// hostile length field).
    #[error("{format} file too short: {what} at offset {offset} needs {len} bytes, but the file is {file_len} bytes")]
    PastEnd {
        /// Format the file was being parsed as.
        format: Format,
        /// The structure that did not fit, e.g. `"header length"`.
        what: &'static str,
        /// Byte offset in the file where the structure starts.
        offset: u64,
        /// Bytes the structure needs from `offset`.
        len: u64,
        /// Bytes the file actually has.
        file_len: u64,
    },

    /// The safetensors header length prefix is larger than the file.
    #[error("safetensors header length {header_len} exceeds file size {file_len}")]
    SafetensorsHeaderTooLong {
        /// Header length in bytes, as the 8-byte prefix states it.
        header_len: u64,
        /// Bytes the file actually has.
        file_len: u64,
    },

    /// The safetensors header is larger than any real header, so reading it
    /// would be an attacker-controlled allocation.
    #[error("safetensors header length {header_len} exceeds the {limit}-byte limit")]
    SafetensorsHeaderOverLimit {
        /// Header length in bytes, as the 8-byte prefix states it.
        header_len: u64,
        /// Largest header length in bytes the parser accepts.
        limit: u64,
    },

    /// The safetensors header is not the expected JSON.
    #[error("safetensors header is not valid: {0}")]
    SafetensorsJson(serde_json::Error),

    /// The `torch.save` archive's zip structure is unreadable.
    #[error("torch checkpoint is not a readable zip archive: {0}")]
    Zip(zip::result::ZipError),

    /// Nesting exceeds what any real model uses; refusing protects the stack.
    #[error("{format} structures nested deeper than {limit} levels")]
    TooDeep {
        /// Format the file was being parsed as.
        format: Format,
        /// Deepest nesting the parser accepts for this format (GGUF arrays
        /// within arrays, ONNX messages within messages).
        limit: u32,
    },

    /// Two tensors claim the same bytes, so the header cannot be trusted.
    #[error("{format} tensor data at {first_offset}..{first_end} overlaps tensor data at {second_offset}..{second_end}")]
    OverlappingTensors {
        /// Format the file was parsed as.
        format: Format,
        /// File offset of the first byte of the lower-placed tensor.
        first_offset: u64,
        /// File offset one past the last byte of the lower-placed tensor.
        first_end: u64,
        /// File offset of the first byte of the tensor that starts inside it.
        second_offset: u64,
        /// File offset one past the last byte of that tensor.
        second_end: u64,
    },

    /// Any other inconsistency in the file's structure.
    #[error("malformed {format} file: {reason}")]
    Malformed {
        /// Format the file was being parsed as.
        format: Format,
        /// What is inconsistent, for the operator reading the error.
        reason: String,
    },
}

impl From<io::Error> for ParseError {
    fn from(e: io::Error) -> ParseError {
        ParseError::Io(e)
    }
}

impl From<zip::result::ZipError> for ParseError {
    fn from(e: zip::result::ZipError) -> ParseError {
        ParseError::Zip(e)
    }
}

impl ParseError {
    pub(crate) fn malformed(format: Format, reason: impl Into<String>) -> Self {
        ParseError::Malformed {
            format,
            reason: reason.into(),
        }
    }
}

/// Guess the format from the file name (extension) and magic bytes. None = not a tensor format we parse.
///
/// An explicit `.safetensors`, `.gguf` or `.onnx` extension wins, so that a
/// damaged file of that kind is reported by [`layout`] as an error instead of
/// silently being stored without tensor boundaries. Otherwise the content
/// decides: `GGUF` magic, a zip archive containing a `data.pkl` entry (a
/// `torch.save` checkpoint; plain zips and legacy non-zip torch pickles are
/// `None`), or a plausible safetensors header. I/O errors count as "not
/// recognised" here; [`layout`] reports them instead.
pub fn detect(file_name: &str, src: &dyn Source) -> Option<Format> {
    detect_with_archive(file_name, src)
        .ok()
        .flatten()
        .map(|detected| detected.format())
}

/// The format a file's name or magic bytes commit it to, if they do.
///
/// [`detect`] also recognises safetensors by a plausible header alone, which
/// arbitrary data matches now and then; this answers whether the file
/// declares itself a model file: the extension `.safetensors`, `.gguf` or
/// `.onnx`; `GGUF` magic; or a zip archive that is named `.pt`, `.pth`,
/// `.bin` or `.ckpt` or holds a `data.pkl` entry (a `torch.save`
/// checkpoint). Such a file that fails to parse is damaged (typically a
/// truncated download), not a file of another kind. I/O errors count as "not
/// committed".
pub fn committed_format(file_name: &str, src: &dyn Source) -> Option<Format> {
    match extension(file_name).as_deref() {
        Some("safetensors") => return Some(Format::Safetensors),
        Some("gguf") => return Some(Format::Gguf),
        Some("onnx") => return Some(Format::Onnx),
        _ => {}
    }
    let mut magic = [0u8; 4];
    if src.len() < magic.len() as u64 || src.read_at(0, &mut magic).is_err() {
        return None;
    }
    if &magic == gguf::MAGIC {
        return Some(Format::Gguf);
    }
    if &magic != torch::LOCAL_HEADER_MAGIC {
        return None;
    }
    if matches!(
        extension(file_name).as_deref(),
        Some("pt" | "pth" | "bin" | "ckpt")
    ) {
        return Some(Format::Torch);
    }
    matches!(torch::open_checkpoint(src), Ok(Some(_))).then_some(Format::Torch)
}

/// Parse a file of a known format.
///
/// For [`Format::Torch`] any zip is accepted; only `*/data/<n>` entries
/// become spans, so a zip that is not a checkpoint yields no spans.
pub fn parse(format: Format, src: &dyn Source) -> Result<Layout, ParseError> {
    let (tensors, external) = match format {
        Format::Safetensors => (safetensors::tensor_spans(src)?, Vec::new()),
        Format::Torch => (torch::tensor_spans(&mut torch::open(src)?)?, Vec::new()),
        Format::Gguf => (gguf::tensor_spans(src)?, Vec::new()),
        Format::Onnx => onnx::tensor_spans(src)?,
    };
    finish(format, src.len(), tensors, external)
}

/// detect + parse. Ok(None) if not a recognised format; Err if it looked like one but is malformed.
pub fn layout(file_name: &str, src: &dyn Source) -> Result<Option<Layout>, ParseError> {
    match detect_with_archive(file_name, src)? {
        None => Ok(None),
        // Detection already read the zip central directory; reuse it rather
        // than reading it a second time.
        Some(Detected::Torch(mut archive)) => {
            let tensors = torch::tensor_spans(&mut archive)?;
            finish(Format::Torch, src.len(), tensors, Vec::new()).map(Some)
        }
        Some(Detected::Other(format)) => parse(format, src).map(Some),
    }
}

enum Detected<'a> {
    Torch(torch::Archive<'a>),
    Other(Format),
}

impl Detected<'_> {
    fn format(&self) -> Format {
        match self {
            Detected::Torch(_) => Format::Torch,
            Detected::Other(format) => *format,
        }
    }
}

fn detect_with_archive<'a>(
    file_name: &str,
    src: &'a dyn Source,
) -> Result<Option<Detected<'a>>, ParseError> {
    match extension(file_name).as_deref() {
        Some("safetensors") => return Ok(Some(Detected::Other(Format::Safetensors))),
        Some("gguf") => return Ok(Some(Detected::Other(Format::Gguf))),
        // ONNX has no magic number, so the extension is the only signal.
        Some("onnx") => return Ok(Some(Detected::Other(Format::Onnx))),
        _ => {}
    }
    let mut magic = [0u8; 4];
    if src.len() >= magic.len() as u64 {
        src.read_at(0, &mut magic)?;
        if &magic == gguf::MAGIC {
            return Ok(Some(Detected::Other(Format::Gguf)));
        }
        if &magic == torch::LOCAL_HEADER_MAGIC {
            // A zip named like a torch checkpoint is held to being one: if its
            // directory does not parse (say, a truncated download) that is an
            // error the importer reports, not a silent "unknown format".
            if matches!(
                extension(file_name).as_deref(),
                Some("pt" | "pth" | "bin" | "ckpt")
            ) {
                let archive = torch::open(src)?;
                return Ok(torch::is_checkpoint(&archive).then_some(Detected::Torch(archive)));
            }
            return Ok(torch::open_checkpoint(src)?.map(Detected::Torch));
        }
    }
    if safetensors::looks_like_header(src)? {
        return Ok(Some(Detected::Other(Format::Safetensors)));
    }
    Ok(None)
}

/// Lower-cased extension of the last path component, if any.
fn extension(file_name: &str) -> Option<String> {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    let (stem, ext) = base.rsplit_once('.')?;
    if stem.is_empty() {
        // ".safetensors" alone is a hidden file, not an extension.
        return None;
    }
    Some(ext.to_ascii_lowercase())
}

/// Enforce the [`Layout`] invariants every consumer relies on: non-empty,
/// sorted, in-bounds, non-overlapping tensor spans. Overlap means the header
/// lies about where data lives, which would make chunk boundaries (and dedup)
/// meaningless, so it is an error rather than something to paper over.
fn finish(
    format: Format,
    file_len: u64,
    mut tensors: Vec<TensorSpan>,
    mut external: Vec<ExternalSpan>,
) -> Result<Layout, ParseError> {
    tensors.retain(|span| span.len > 0);
    tensors.sort_by_key(|span| (span.offset, span.len));
    for span in &tensors {
        let in_bounds = span
            .offset
            .checked_add(span.len)
            .is_some_and(|end| end <= file_len);
        if !in_bounds {
            return Err(ParseError::PastEnd {
                format,
                what: "tensor data",
                offset: span.offset,
                len: span.len,
                file_len,
            });
        }
    }
    for pair in tensors.windows(2) {
        let (first, second) = (&pair[0], &pair[1]);
        // Both ends were checked against file_len above, so no overflow.
        let first_end = first.offset + first.len;
        if second.offset < first_end {
            return Err(ParseError::OverlappingTensors {
                format,
                first_offset: first.offset,
                first_end,
                second_offset: second.offset,
                second_end: second.offset + second.len,
            });
        }
    }
    external.retain(|span| span.len > 0);
    Ok(Layout {
        format,
        tensors,
        external,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_uses_last_component_case_insensitively() {
        assert_eq!(
            extension("a/b.c/Model.SafeTensors").as_deref(),
            Some("safetensors")
        );
        assert_eq!(extension("dir.onnx/model"), None);
        assert_eq!(extension(".gguf"), None);
        assert_eq!(extension("x.tar.gz").as_deref(), Some("gz"));
    }

    #[test]
    fn slice_source_rejects_reads_past_end() {
        let bytes: &[u8] = b"abcdef";
        let mut buf = [0u8; 3];
        assert!(bytes.read_at(3, &mut buf).is_ok());
        assert_eq!(&buf, b"def");
        assert!(bytes.read_at(4, &mut buf).is_err());
        assert!(bytes.read_at(u64::MAX, &mut buf).is_err());
        assert!(bytes.read_at(6, &mut []).is_ok());
    }

    #[test]
    fn finish_sorts_drops_empty_and_rejects_overlap() {
        let spans = vec![
            TensorSpan { offset: 20, len: 5 },
            TensorSpan { offset: 3, len: 0 },
            TensorSpan {
                offset: 10,
                len: 10,
            },
        ];
        let layout = finish(Format::Gguf, 25, spans, Vec::new()).expect("valid spans");
        assert_eq!(
            layout.tensors,
            vec![
                TensorSpan {
                    offset: 10,
                    len: 10
                },
                TensorSpan { offset: 20, len: 5 }
            ]
        );

        let overlapping = vec![
            TensorSpan { offset: 0, len: 10 },
            TensorSpan { offset: 9, len: 1 },
        ];
        assert!(matches!(
            finish(Format::Gguf, 100, overlapping, Vec::new()),
            Err(ParseError::OverlappingTensors { .. })
        ));

        let past_end = vec![TensorSpan {
            offset: u64::MAX,
            len: 2,
        }];
        assert!(matches!(
            finish(Format::Gguf, 100, past_end, Vec::new()),
            Err(ParseError::PastEnd { .. })
        ));
    }

    #[test]
    fn unknown_content_is_not_detected() {
        let text = b"hello world, definitely not a model".to_vec();
        assert_eq!(detect("notes.txt", &text), None);
        assert!(matches!(layout("notes.txt", &text), Ok(None)));
        let empty: Vec<u8> = Vec::new();
        assert_eq!(detect("empty.bin", &empty), None);
    }

    #[test]
    fn format_serializes_lowercase() {
        assert_eq!(
            serde_json::to_string(&Format::Safetensors).expect("serializable"),
            "\"safetensors\""
        );
        assert_eq!(Format::Gguf.to_string(), "gguf");
    }
}
