//! Bounds-checked little-endian reading through a [`Source`].
//!
//! GGUF metadata and ONNX protobuf are long sequences of tiny fields; one
//! `read_at` per field would be one syscall per byte on a `File`. A small
//! window buffer turns that into one read per window, while large skipped
//! regions (tensor data, vocabularies) are stepped over without being read.

use crate::{Format, ParseError, Source};

/// Bytes fetched per refill. Big enough to hold a typical run of metadata,
/// small enough that refilling after every skip costs little.
const WINDOW_BYTES: usize = 64 * 1024;

pub(crate) struct ByteReader<'a> {
    src: &'a dyn Source,
    format: Format,
    file_len: u64,
    pos: u64,
    window: Vec<u8>,
    window_start: u64,
}

impl<'a> ByteReader<'a> {
    pub(crate) fn new(src: &'a dyn Source, format: Format) -> Self {
        ByteReader {
            src,
            format,
            file_len: src.len(),
            pos: 0,
            window: Vec::new(),
            window_start: 0,
        }
    }

    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes between the current position and the end of the file.
    pub(crate) fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos)
    }

    pub(crate) fn past_end(&self, what: &'static str, offset: u64, len: u64) -> ParseError {
        ParseError::PastEnd {
            format: self.format,
            what,
            offset,
            len,
            file_len: self.file_len,
        }
    }

    /// End offset of `len` bytes starting at the current position, or an
    /// error naming `what` if they do not fit in the file.
    pub(crate) fn checked_end(&self, what: &'static str, len: u64) -> Result<u64, ParseError> {
        self.pos
            .checked_add(len)
            .filter(|&end| end <= self.file_len)
            .ok_or_else(|| self.past_end(what, self.pos, len))
    }

    /// Advance without reading; the skipped bytes must exist.
    pub(crate) fn skip(&mut self, what: &'static str, len: u64) -> Result<(), ParseError> {
        self.pos = self.checked_end(what, len)?;
        Ok(())
    }

    pub(crate) fn read_exact(
        &mut self,
        what: &'static str,
        out: &mut [u8],
    ) -> Result<(), ParseError> {
        let len = out.len() as u64;
        let end = self.checked_end(what, len)?;
        if out.len() > WINDOW_BYTES {
            self.src.read_at(self.pos, out)?;
            self.pos = end;
            return Ok(());
        }
        let window_end = self.window_start + self.window.len() as u64;
        if self.pos < self.window_start || end > window_end {
            // `end <= file_len` was checked, so the refill is at least `len`.
            let refill_len =
                WINDOW_BYTES.min(usize::try_from(self.file_len - self.pos).unwrap_or(WINDOW_BYTES));
            self.window.resize(refill_len, 0);
            self.src.read_at(self.pos, &mut self.window)?;
            self.window_start = self.pos;
        }
        // Both are within the window: pos >= window_start and end <= window_end.
        let from = (self.pos - self.window_start) as usize;
        out.copy_from_slice(&self.window[from..from + out.len()]);
        self.pos = end;
        Ok(())
    }

    pub(crate) fn read_u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        let mut bytes = [0u8; 1];
        self.read_exact(what, &mut bytes)?;
        Ok(bytes[0])
    }

    pub(crate) fn read_u32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        let mut bytes = [0u8; 4];
        self.read_exact(what, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    pub(crate) fn read_u64(&mut self, what: &'static str) -> Result<u64, ParseError> {
        let mut bytes = [0u8; 8];
        self.read_exact(what, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_across_window_refills() {
        let data: Vec<u8> = (0..(3 * WINDOW_BYTES + 7))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut reader = ByteReader::new(&data, Format::Gguf);
        reader
            .skip("gap", (WINDOW_BYTES - 2) as u64)
            .expect("in bounds");
        let mut four = [0u8; 4];
        reader.read_exact("straddle", &mut four).expect("in bounds");
        let start = WINDOW_BYTES - 2;
        assert_eq!(&four[..], &data[start..start + 4]);

        let mut big = vec![0u8; WINDOW_BYTES + 1];
        reader.read_exact("big", &mut big).expect("in bounds");
        assert_eq!(&big[..], &data[start + 4..start + 4 + big.len()]);

        assert!(reader.skip("too far", u64::MAX).is_err());
        let rest = reader.remaining();
        reader.skip("rest", rest).expect("exactly to end");
        assert!(reader.read_u8("one more").is_err());
    }
}
