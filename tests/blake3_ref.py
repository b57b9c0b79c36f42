"""A small pure-Python BLAKE3 (hash and derive_key modes, 32-byte output).

Only used by the test-suite to check the `hash` field printed by
`modelfs ls NAME --json` (the content key of docs/store-format.md §3) against
an independent implementation, so it favours clarity over speed (a few
hundred KiB/s): call it on small files only.
"""

from __future__ import annotations

import struct

_IV = (
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
    0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
)
_PERM = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_CHUNK_START, _CHUNK_END, _PARENT, _ROOT = 1, 2, 4, 8
_DERIVE_KEY_CONTEXT, _DERIVE_KEY_MATERIAL = 32, 64
_CHUNK_LEN = 1024
_BLOCK_LEN = 64
_M = 0xFFFFFFFF


def _g(s, a, b, c, d, x, y):
    s[a] = (s[a] + s[b] + x) & _M
    t = s[d] ^ s[a]
    s[d] = ((t >> 16) | (t << 16)) & _M
    s[c] = (s[c] + s[d]) & _M
    t = s[b] ^ s[c]
    s[b] = ((t >> 12) | (t << 20)) & _M
    s[a] = (s[a] + s[b] + y) & _M
    t = s[d] ^ s[a]
    s[d] = ((t >> 8) | (t << 24)) & _M
    s[c] = (s[c] + s[d]) & _M
    t = s[b] ^ s[c]
    s[b] = ((t >> 7) | (t << 25)) & _M


def _compress(cv, block: bytes, counter: int, block_len: int, flags: int):
    m = list(struct.unpack("<16I", block))
    s = list(cv) + list(_IV[:4]) + [counter & _M, (counter >> 32) & _M, block_len, flags]
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[i] for i in _PERM]
    for i in range(8):
        s[i] ^= s[i + 8]
        s[i + 8] ^= cv[i]
    return s


def _chunk_output(chunk: bytes, counter: int, key, mode: int):
    """Return (cv, block, counter, block_len, flags) of the chunk's last block."""
    cv = key
    blocks = [chunk[i:i + _BLOCK_LEN] for i in range(0, len(chunk), _BLOCK_LEN)] or [b""]
    for i, blk in enumerate(blocks):
        flags = mode | (_CHUNK_START if i == 0 else 0)
        if i == len(blocks) - 1:
            return (cv, blk.ljust(_BLOCK_LEN, b"\0"), counter, len(blk), flags | _CHUNK_END)
        cv = tuple(_compress(cv, blk, counter, _BLOCK_LEN, flags)[:8])
    raise AssertionError("unreachable")


def _cv(out):
    cv, block, counter, block_len, flags = out
    return tuple(_compress(cv, block, counter, block_len, flags)[:8])


def _subtree(data: bytes, first_chunk: int, key=_IV, mode: int = 0):
    n_chunks = max(1, (len(data) + _CHUNK_LEN - 1) // _CHUNK_LEN)
    if n_chunks == 1:
        return _chunk_output(data, first_chunk, key, mode)
    left_chunks = 1 << ((n_chunks - 1).bit_length() - 1)
    split = left_chunks * _CHUNK_LEN
    left = _cv(_subtree(data[:split], first_chunk, key, mode))
    right = _cv(_subtree(data[split:], first_chunk + left_chunks, key, mode))
    block = struct.pack("<16I", *(left + right))
    return (key, block, 0, _BLOCK_LEN, _PARENT | mode)


def _root_words(data: bytes, key=_IV, mode: int = 0):
    cv, block, counter, block_len, flags = _subtree(bytes(data), 0, key, mode)
    return _compress(cv, block, counter, block_len, flags | _ROOT)[:8]


def blake3_digest(data: bytes) -> bytes:
    return struct.pack("<8I", *_root_words(data))


def blake3_hex(data: bytes) -> str:
    return blake3_digest(data).hex()


def derive_key_hex(context: str, material: bytes) -> str:
    """BLAKE3 in key-derivation mode: the context string keys the hash of the material."""
    context_key = tuple(_root_words(context.encode(), _IV, _DERIVE_KEY_CONTEXT))
    return struct.pack("<8I", *_root_words(material, context_key, _DERIVE_KEY_MATERIAL)).hex()


if __name__ == "__main__":
    import sys

    for p in sys.argv[1:]:
        with open(p, "rb") as f:
            print(blake3_hex(f.read()), p)
