#!/usr/bin/env python3
"""Write the committed seed corpus in fuzz/corpus/<target>/.

Seeds are the real-writer fixtures of formats/tests/data (copied; a few KiB
each) plus small hand-made inputs: hostile headers that must be refused
without a big allocation or a deep recursion, and inputs in the encodings the
layout, store_read and names targets read (see each target's comment).
Re-running this rewrites those files byte-identically; seeds that fuzzing
found (regression-*) are left alone. Standard library only.
"""

import shutil
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
CORPUS = FUZZ / "corpus"
FIXTURES = FUZZ.parent / "formats" / "tests" / "data"


def write(target: str, name: str, data: bytes) -> None:
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def copy(target: str, fixture: str) -> None:
    (CORPUS / target).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURES / fixture, CORPUS / target / fixture)


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


# --- hostile format headers (also checked by formats/tests/hostile_headers.rs)


def safetensors_header_2pow60() -> bytes:
    """A header length of 2^60 in front of a plausible JSON header."""
    header = b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'
    return u64(1 << 60) + header + b"\0\0\0\0"


def small_zip() -> tuple[bytes, bytes, int, int]:
    """A two-entry torch-like zip: (local part, central directory,
    central directory offset, entry count)."""
    local = bytearray()
    central = bytearray()
    entries = [(b"archive/data.pkl", b"\x80\x02}q\x00."), (b"archive/data/0", b"\0" * 16)]
    for name, data in entries:
        offset = len(local)
        fields = u16(0) + u32(0) + u32(0) + u32(len(data)) + u32(len(data)) + u16(len(name))
        local += b"PK\x03\x04" + u16(20) + u16(0) + fields + u16(0) + name + data
        central += (
            b"PK\x01\x02" + u16(20) + u16(20) + u16(0) + fields
            + u16(0) + u16(0) + u16(0) + u16(0) + u32(0) + u32(offset) + name
        )
    return bytes(local), bytes(central), len(local), len(entries)


def end_record(count: int, size: int, offset: int) -> bytes:
    return b"PK\x05\x06" + u16(0) + u16(0) + u16(count) + u16(count) + u32(size) + u32(offset) + u16(0)


def zip_eocd_65535_entries() -> bytes:
    """The 32-bit end-of-central-directory record claims 65535 entries
    (the most it can) for a two-entry directory."""
    local, central, offset, _ = small_zip()
    return local + central + end_record(0xFFFF, len(central), offset)


def zip64_eocd_2pow60_entries() -> bytes:
    """A ZIP64 end record (with its locator) claiming 2^60 entries."""
    local, central, offset, _ = small_zip()
    eocd64_at = len(local) + len(central)
    zip64 = (
        b"PK\x06\x06" + u64(44) + u16(45) + u16(45) + u32(0) + u32(0)
        + u64(1 << 60) + u64(1 << 60) + u64(len(central)) + u64(offset)
    )
    locator = b"PK\x06\x07" + u32(0) + u64(eocd64_at) + u32(1)
    return local + central + zip64 + locator + end_record(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)


def onnx_deep_nesting(levels: int = 300) -> bytes:
    """ModelProto.graph -> node -> attribute.g -> graph ... `levels` deep,
    far past the parser's depth limit of 32 messages."""
    graph = b""
    for _ in range(levels):
        attribute = field(6, graph)  # AttributeProto.g
        node = field(5, attribute)  # NodeProto.attribute
        graph = field(1, node)  # GraphProto.node
    return field(7, graph)  # ModelProto.graph


def gguf_with_count(at: int) -> bytes:
    """The real GGUF fixture with the u64 count at byte `at` set to 2^60
    (8: tensor count, 16: metadata key/value count)."""
    data = bytearray((FIXTURES / "model.gguf").read_bytes())
    data[at : at + 8] = u64(1 << 60)
    return bytes(data)


HOSTILE = {
    "safetensors": {"hostile-header-len-2pow60": safetensors_header_2pow60()},
    "torch_zip": {
        "hostile-eocd-65535-entries": zip_eocd_65535_entries(),
        "hostile-zip64-eocd-2pow60-entries": zip64_eocd_2pow60_entries(),
    },
    "onnx": {"hostile-nesting-300-levels": onnx_deep_nesting()},
    "gguf": {
        "hostile-tensor-count-2pow60": gguf_with_count(8),
        "hostile-kv-count-2pow60": gguf_with_count(16),
    },
}

# --- layout: first byte picks a name from fuzz_targets/layout.rs NAMES
NAME_INDEX = {
    "model.safetensors": 0,
    "model.gguf": 1,
    "model.onnx": 2,
    "pytorch_model.bin": 3,
    "model.pt": 4,
    "notes.txt": 7,
    "noext": 8,
}


def main() -> None:
    for target, fixtures in {
        "safetensors": ["model.safetensors"],
        "torch_zip": ["model.pt", "model_zip64.pt", "legacy.pt"],
        "gguf": ["model.gguf"],
        "onnx": ["model.onnx", "model_ext.onnx"],
    }.items():
        for fixture in fixtures:
            copy(target, fixture)
    for target, seeds in HOSTILE.items():
        for name, data in seeds.items():
            write(target, name, data)

    def named(name: str, data: bytes) -> bytes:
        return bytes([NAME_INDEX[name]]) + data

    fixture = lambda name: (FIXTURES / name).read_bytes()  # noqa: E731
    layout = {
        "safetensors-by-extension": named("model.safetensors", fixture("model.safetensors")),
        "safetensors-by-content": named("noext", fixture("model.safetensors")),
        "gguf-by-extension": named("model.gguf", fixture("model.gguf")),
        "gguf-by-content": named("notes.txt", fixture("model.gguf")),
        "onnx-by-extension": named("model.onnx", fixture("model.onnx")),
        "torch-bin": named("pytorch_model.bin", fixture("model.pt")),
        "torch-zip64-by-content": named("noext", fixture("model_zip64.pt")),
        "torch-legacy-pickle": named("model.pt", fixture("legacy.pt")),
        "hostile-torch-zip64-count": named("model.pt", zip64_eocd_2pow60_entries()),
        "hostile-safetensors-2pow60": named("model.safetensors", safetensors_header_2pow60()),
        # A fuzzed name: byte 14 + 9 = 23 says "the next 9 bytes are the name".
        "fuzzed-name": bytes([14 + 9]) + b"w.GGuF/x." + fixture("model.gguf"),
    }
    for name, data in layout.items():
        write("layout", name, data)

    # --- store_read: see fuzz_targets/store_read.rs for the encoding
    record = bytes(range(32)) + u64(7) + u64(4096) + u32(65536)
    store_read = {
        # Stored chunks 0, 1, 2 in storage order; a read across all three.
        "three-chunks": b"\x00\x03\x00\x01\x02" + u32(0) + u16(8192),
        # Every chunk of the first objects, read at a few offsets.
        "many-chunks": b"\x00\x0c" + bytes(range(12)) + u32(100) + u16(5000) + u32(9000) + u16(300),
        # Chunk 1 moved to object 200 (missing) and to offset 2^63.
        "missing-object": b"\x00\x01\x11\xc8",
        "offset-2pow63": b"\x00\x01\x21" + u64(1 << 63) + u32(0) + u16(10),
        # Chunk 0 claiming 4 GiB, size following: must fail without allocating it.
        "length-4gib": b"\x00\x01\x40" + u32(0xFFFFFFFF) + u32(0) + u16(4096),
        # Chunk 2 named by chunk 5's hash.
        "wrong-hash": b"\x00\x02\x00\x82\x05" + u32(0) + u16(1000),
        "negative-size": b"\x02\x01\x00" + u64((1 << 64) - 1),
        "short-hash": b"\x04\x01\x00\x10" + bytes(16),
        # Raw contents.recipe blobs (flag 0x01): whole records, a partial one.
        "raw-two-records": b"\x01" + u16(104) + record + record[::-1],
        "raw-partial-record": b"\x01" + u16(51) + record[:51],
        "raw-empty": b"\x01" + u16(0),
        "zero-length-chunk": b"\x00\x02\x40" + u32(0) + b"\x01" + u32(0) + u16(64),
    }
    for name, data in store_read.items():
        write("store_read", name, data)

    # --- names: UTF-8 text
    names = {
        "nested": "org/llama-3-8b-ft1",
        "dotdot": "a/../b",
        "absolute": "/etc/passwd",
        "empty-component": "a//b",
        "trailing-slash": "a/",
        "control": "tab\there",
        "nul": "nul\0x",
        "reserved": ".modelfs/stats",
        "dots": "...",
        "backslashes": "a\\..\\..\\b",
        "long-component": "a" * 256,
        "line-separator": "x\u2028y",
    }
    for name, text in names.items():
        write("names", name, text.encode())


if __name__ == "__main__":
    main()
