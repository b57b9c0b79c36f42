//! Encoding and decoding of requests and replies, byte for byte as in
//! docs/store-format.md §11. Decoders treat their input as hostile: every
//! count is bounded, every length checked before use, and a malformed
//! message is an error, never a panic or an out-of-bounds read.

/// First eight bytes of every request and reply.
pub const MAGIC: [u8; 8] = *b"MFSLAY01";
/// Most objects one reply carries (descriptors per `SCM_RIGHTS` message are
/// capped by the kernel at 253).
pub const MAX_OBJECTS: usize = 250;
/// Most runs one reply carries; a longer layout continues in another
/// request from the reply's `end`.
pub const MAX_RUNS: usize = 4096;
/// Bytes of a request.
pub const REQUEST_LEN: usize = 16;
/// Bytes of a reply's fixed part.
pub const REPLY_HEADER_LEN: usize = 40;
/// Bytes of one run.
pub const RUN_LEN: usize = 32;
/// Largest reply: what a receiver must be ready to read.
pub const MAX_REPLY_LEN: usize = REPLY_HEADER_LEN + MAX_OBJECTS * 8 + MAX_RUNS * RUN_LEN;
/// Reply flag: the file is served by kernel passthrough from its
/// whole-file object.
pub const FLAG_PASSTHROUGH: u32 = 1;

/// A request: "the layout of the file I send, from this offset on".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// File offset the answer starts at.
    pub from: u64,
}

/// Where `len` bytes of the file at `file_offset` lie in an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Offset in the file.
    pub file_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Index into the reply's objects.
    pub object: u32,
    /// Offset of the same bytes in that object.
    pub object_offset: u64,
}

/// A reply without its descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// 0, or the errno of §11's table.
    pub status: i32,
    /// [`FLAG_PASSTHROUGH`] or 0.
    pub flags: u32,
    /// Bytes of the file.
    pub file_size: u64,
    /// The runs describe `[from, end)`.
    pub end: u64,
    /// Length in bytes of each object, in descriptor order.
    pub object_lens: Vec<u64>,
    /// The runs, sorted by file offset.
    pub runs: Vec<Run>,
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed layout message: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..].copy_from_slice(&self.from.to_le_bytes());
        out
    }

    /// Parse a request.
    pub fn decode(b: &[u8]) -> Result<Request, Malformed> {
        if b.len() != REQUEST_LEN {
            return Err(Malformed("request is not 16 bytes"));
        }
        if b[..8] != MAGIC {
            return Err(Malformed("bad magic"));
        }
        Ok(Request { from: u64_at(b, 8) })
    }
}

impl Reply {
    /// An error reply.
    pub fn error(errno: i32) -> Reply {
        Reply {
            status: errno,
            ..Reply::default()
        }
    }

    /// The reply's bytes. Panics if it holds more objects or runs than
    /// the protocol allows (a bug in the sender).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.object_lens.len() <= MAX_OBJECTS && self.runs.len() <= MAX_RUNS);
        let mut out = Vec::with_capacity(
            REPLY_HEADER_LEN + self.object_lens.len() * 8 + self.runs.len() * RUN_LEN,
        );
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.file_size.to_le_bytes());
        out.extend_from_slice(&self.end.to_le_bytes());
        out.extend_from_slice(&(self.object_lens.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for len in &self.object_lens {
            out.extend_from_slice(&len.to_le_bytes());
        }
        for r in &self.runs {
            out.extend_from_slice(&r.file_offset.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            out.extend_from_slice(&r.object.to_le_bytes());
            out.extend_from_slice(&[0u8; 4]);
            out.extend_from_slice(&r.object_offset.to_le_bytes());
        }
        out
    }

    /// Parse a reply to a request from `from`, checking every rule of §11
    /// a client relies on: counts within bounds, runs sorted, disjoint,
    /// inside `[from, end)`, inside the file and inside their object.
    pub fn decode(b: &[u8], from: u64) -> Result<Reply, Malformed> {
        if b.len() < REPLY_HEADER_LEN {
            return Err(Malformed("reply shorter than its header"));
        }
        if b[..8] != MAGIC {
            return Err(Malformed("bad magic"));
        }
        let status = u32_at(b, 8) as i32;
        let flags = u32_at(b, 12);
        let file_size = u64_at(b, 16);
        let end = u64_at(b, 24);
        let n_objects = u32_at(b, 32) as usize;
        let n_runs = u32_at(b, 36) as usize;
        if n_objects > MAX_OBJECTS || n_runs > MAX_RUNS {
            return Err(Malformed("too many objects or runs"));
        }
        if b.len() != REPLY_HEADER_LEN + n_objects * 8 + n_runs * RUN_LEN {
            return Err(Malformed("length does not match the counts"));
        }
        if status != 0 {
            return Ok(Reply::error(status));
        }
        if end > file_size || (end < from && end != file_size) {
            return Err(Malformed("end outside the file"));
        }
        let object_lens: Vec<u64> = (0..n_objects)
            .map(|i| u64_at(b, REPLY_HEADER_LEN + i * 8))
            .collect();
        let runs_at = REPLY_HEADER_LEN + n_objects * 8;
        let mut runs = Vec::with_capacity(n_runs);
        let mut pos = from;
        for i in 0..n_runs {
            let at = runs_at + i * RUN_LEN;
            let run = Run {
                file_offset: u64_at(b, at),
                len: u64_at(b, at + 8),
                object: u32_at(b, at + 16),
                object_offset: u64_at(b, at + 24),
            };
            let file_end = run
                .file_offset
                .checked_add(run.len)
                .ok_or(Malformed("run overflows"))?;
            if run.len == 0 || run.file_offset < pos || file_end > end {
                return Err(Malformed(
                    "runs unsorted, overlapping or outside [from, end)",
                ));
            }
            let object_len = *object_lens
                .get(run.object as usize)
                .ok_or(Malformed("run names a missing object"))?;
            if run
                .object_offset
                .checked_add(run.len)
                .is_none_or(|e| e > object_len)
            {
                return Err(Malformed("run lies past its object's end"));
            }
            pos = file_end;
            runs.push(run);
        }
        Ok(Reply {
            status,
            flags,
            file_size,
            end,
            object_lens,
            runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Reply {
        Reply {
            status: 0,
            flags: 0,
            file_size: 10_000,
            end: 10_000,
            object_lens: vec![8192, 20_000],
            runs: vec![
                Run {
                    file_offset: 100,
                    len: 4000,
                    object: 1,
                    object_offset: 100,
                },
                Run {
                    file_offset: 4100,
                    len: 5900,
                    object: 0,
                    object_offset: 0,
                },
            ],
        }
    }

    #[test]
    fn reply_round_trips() {
        let r = sample();
        assert_eq!(Reply::decode(&r.encode(), 0).unwrap(), r);
        let q = Request { from: 77 };
        assert_eq!(Request::decode(&q.encode()).unwrap(), q);
    }

    #[test]
    fn hostile_replies_are_refused() {
        let good = sample().encode();
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(Reply::decode(&good[..n], 0).is_err(), "{n}");
        }
        // A run past its object's end.
        let mut bad = sample();
        bad.runs[1].object_offset = 3000;
        assert!(Reply::decode(&bad.encode(), 0).is_err());
        // Overlapping runs.
        let mut bad = sample();
        bad.runs[1].file_offset = 4000;
        assert!(Reply::decode(&bad.encode(), 0).is_err());
        // A run naming an object that was not sent.
        let mut bad = sample();
        bad.runs[0].object = 2;
        assert!(Reply::decode(&bad.encode(), 0).is_err());
        // A run before `from`.
        assert!(Reply::decode(&good, 200).is_err());
        // Huge counts.
        let mut huge = good.clone();
        huge[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Reply::decode(&huge, 0).is_err());
    }

    #[test]
    fn error_replies_carry_only_the_status() {
        let e = Reply::error(libc_enoent()).encode();
        assert_eq!(Reply::decode(&e, 0).unwrap().status, libc_enoent());
    }

    fn libc_enoent() -> i32 {
        2
    }
}
