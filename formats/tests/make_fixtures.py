#!/usr/bin/env python3
"""Write the real-writer fixtures for formats/tests/real_files.rs.

Hand-built test inputs only prove the parsers agree with their author's
reading of each format. These files come from the libraries that write
models in the wild (safetensors, gguf-py's GGUFWriter, onnx, torch.save), so
the Rust test checks the parsers against what those writers actually emit.

The expected spans in data/expected.json are computed here independently of
the Rust code: from each library's own reader (GGUFReader offsets,
external_data entries), from zip local headers, or by locating the tensor's
bytes in the file, and every span is checked to hold exactly the bytes of
the tensor written. Every format also stores the same SHARED tensor, whose
bytes the Rust test compares across files: identical tensors must produce
identical spans whatever the container.

Run with the probe venv (numpy, safetensors, gguf, onnx, ml_dtypes, torch):
    /root/.cache/modelfs/venv-probe/bin/python formats/tests/make_fixtures.py
expected.json is deterministic for a given set of library versions; a few
bytes outside tensor data are not (the legacy pickle's random key, the
order of safetensors metadata). The output is checked in, so tests never
need Python or the network.
"""

import hashlib
import json
import os
import re
import struct
import zipfile

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# Stored by every format; 256 bytes of float32.
SHARED = (np.arange(64, dtype=np.float32) * 0.5 - 3.0).reshape(8, 8)

LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes


def path(name):
    return os.path.join(DATA, name)


def read(name):
    with open(path(name), "rb") as f:
        return f.read()


def span_entry(blob, offset, length):
    assert 0 < length and offset + length <= len(blob)
    return {
        "offset": offset,
        "len": length,
        "sha256": hashlib.sha256(blob[offset : offset + length]).hexdigest(),
    }


def locate_unique(blob, needle):
    """Offset of the only occurrence of needle in blob."""
    first = blob.find(needle)
    assert first >= 0, "tensor bytes not found"
    assert blob.find(needle, first + 1) < 0, "tensor bytes not unique; pick other values"
    return first


def varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def locate_raw_data(blob, tensor):
    """Offset of a TensorProto's raw_data bytes within a serialized model.

    Tiny tensors (a bool condition) are not unique byte strings, so find the
    whole serialized TensorProto first, then its raw_data field (tag 9,
    wire type 2 = 0x4a) inside it.
    """
    message = tensor.SerializeToString()
    field = b"\x4a" + varint(len(tensor.raw_data)) + tensor.raw_data
    inner = message.find(field)
    assert inner >= 0 and message.find(field, inner + 1) < 0
    return locate_unique(blob, message) + inner + len(field) - len(tensor.raw_data)


def shared_span(blob, spans):
    shared = SHARED.tobytes()
    hits = [s for s in spans if blob[s["offset"] : s["offset"] + s["len"]] == shared]
    assert len(hits) == 1, hits
    return {"offset": hits[0]["offset"], "len": hits[0]["len"]}


def record(fmt, blob, spans, external=(), has_shared=True):
    spans = sorted(spans, key=lambda s: s["offset"])
    for a, b in zip(spans, spans[1:]):
        assert a["offset"] + a["len"] <= b["offset"], "overlap"
    return {
        "format": fmt,
        "tensors": spans,
        "external": list(external),
        "shared": shared_span(blob, spans) if has_shared else None,
    }


def make_safetensors():
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors = {
        "shared": SHARED,
        "bias": np.arange(1000, 1005, dtype=np.int64),
        "half": np.linspace(-1, 1, 12, dtype=np.float16).reshape(3, 4),
        "bf16": np.array([1.5, -2.25, 3.0, 1e3], dtype=ml_dtypes.bfloat16),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    name = "model.safetensors"
    save_file(tensors, path(name), metadata={"format": "np", "note": "fixture"})
    blob = read(name)
    header_len = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8 : 8 + header_len])
    spans = []
    with safe_open(path(name), framework="np") as f:
        for key in f.keys():
            raw = f.get_tensor(key).tobytes()
            assert raw == tensors[key].tobytes()
            begin, end = header[key]["data_offsets"]
            if end == begin:
                continue
            offset = 8 + header_len + begin
            assert blob[offset : offset + len(raw)] == raw
            spans.append(span_entry(blob, offset, len(raw)))
    return {name: record("safetensors", blob, spans)}


def zip_storage_spans(blob, names_to_check=None):
    """Spans of */data/<n> entries, from each entry's local header."""
    spans = []
    with zipfile.ZipFile(path(names_to_check)) as archive:
        for info in archive.infolist():
            if not re.fullmatch(r"(.*/)?data/\d+", info.filename):
                continue
            assert info.compress_type == zipfile.ZIP_STORED
            sig, _, _, _, _, _, _, csize, _, name_len, extra_len = LOCAL_HEADER.unpack_from(
                blob, info.header_offset
            )
            assert sig == b"PK\x03\x04"
            offset = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
            assert blob[offset : offset + info.file_size] == archive.read(info)
            if info.file_size:
                spans.append(span_entry(blob, offset, info.file_size))
    return spans


def make_torch():
    import torch

    weight = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 7 + 100
    state = {
        "shared": torch.from_numpy(SHARED.copy()),
        "weight": weight,
        # A view shares its base's storage: no extra storage entry.
        "weight_rows": weight[1:3],
        "steps": torch.arange(6, dtype=torch.int16) * 1111,
        "half": torch.tensor([0.25, -8.5, 3.75], dtype=torch.bfloat16),
        "empty": torch.zeros(0),
    }
    out = {}
    name = "model.pt"
    torch.save(state, path(name))
    blob = read(name)
    spans = zip_storage_spans(blob, name)
    assert all(s["offset"] % 64 == 0 for s in spans), "torch.save aligns storages"
    out[name] = record("torch", blob, spans)

    # Re-pack the same entries with ZIP64 extra fields (as torch.save does
    # for files past 4 GiB) to cover that path with a small file.
    name64 = "model_zip64.pt"
    with zipfile.ZipFile(path(name)) as src, zipfile.ZipFile(path(name64), "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            with dst.open(zipfile.ZipInfo(info.filename, date_time=(2024, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                f.write(src.read(info))
    blob64 = read(name64)
    out[name64] = record("torch", blob64, zip_storage_spans(blob64, name64))

    # The pre-1.6 format is a bare pickle stream, not a zip: not parsed.
    legacy = "legacy.pt"
    torch.save({"w": torch.ones(3)}, path(legacy), _use_new_zipfile_serialization=False)
    out[legacy] = {"format": None}
    return out


def make_gguf():
    import gguf
    from gguf.quants import quantize

    name = "model.gguf"
    writer = gguf.GGUFWriter(path(name), "llama")
    writer.add_custom_alignment(64)
    writer.add_block_count(1)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "wörld"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.5, -3.5])
    writer.add_array("x.nested", [[1, 2], [3]])
    writer.add_string("general.name", "fixture")

    rng = np.random.default_rng(7)
    q8_source = rng.standard_normal((2, 64)).astype(np.float32)
    tensors = {
        "shared": (SHARED, None),
        "norm": (np.linspace(0.5, 1.5, 8, dtype=np.float32), None),
        "half": (np.linspace(-4, 4, 16, dtype=np.float16).reshape(2, 8), None),
        "q8": (quantize(q8_source, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0),
        "bf16": (quantize(rng.standard_normal(32).astype(np.float32), gguf.GGMLQuantizationType.BF16),
                 gguf.GGMLQuantizationType.BF16),
    }
    for tensor_name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    blob = read(name)
    reader = gguf.GGUFReader(path(name))
    assert reader.alignment == 64
    spans = []
    for tensor in reader.tensors:
        raw = tensors[tensor.name][0].tobytes()
        assert tensor.n_bytes == len(raw)
        assert blob[tensor.data_offset : tensor.data_offset + tensor.n_bytes] == raw
        spans.append(span_entry(blob, int(tensor.data_offset), int(tensor.n_bytes)))
    return {name: record("gguf", blob, spans)}


def build_onnx_model():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def constant(output, array, name):
        return helper.make_node(
            "Constant", [], [output], value=numpy_helper.from_array(array, name=name)
        )

    branch_value = lambda v: np.full((2, 3), v, dtype=np.float32)  # noqa: E731
    then_graph = helper.make_graph(
        [constant("then_out", branch_value(11.0), "then_const")],
        "then_branch",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, 3])],
    )
    else_graph = helper.make_graph(
        [constant("else_out", branch_value(-22.0), "else_const")],
        "else_branch",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, 3])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "shared"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
        constant("cond", np.array(True), "cond_const"),
        constant("offset", np.arange(7, 10, dtype=np.int64), "offset_const"),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_graph, else_branch=else_graph),
    ]
    initializers = [
        numpy_helper.from_array(SHARED, name="shared"),
        numpy_helper.from_array(np.linspace(100, 101, 8, dtype=np.float32), name="bias"),
        numpy_helper.from_array(np.arange(-40, -30, dtype=np.int32), name="ids"),
        numpy_helper.from_array(np.zeros((0,), dtype=np.float32), name="empty"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixture",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, producer_name="modelfs-fixture", opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def all_tensors(graph):
    """Every TensorProto in a graph: initializers and node attributes, recursively."""
    for tensor in graph.initializer:
        yield tensor
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_tensors(subgraph)


def make_onnx():
    import onnx

    out = {}
    name = "model.onnx"
    model = build_onnx_model()
    onnx.save_model(model, path(name))
    blob = read(name)
    spans = []
    for tensor in all_tensors(model.graph):
        if tensor.raw_data:
            spans.append(span_entry(blob, locate_raw_data(blob, tensor), len(tensor.raw_data)))
    assert len(spans) == 7, len(spans)
    out[name] = record("onnx", blob, spans)

    ext_name = "model_ext.onnx"
    data_name = "model_ext.onnx.data"
    # onnx refuses to overwrite external data, and checks for it relative
    # to the working directory, which main() sets to DATA.
    if os.path.exists(path(data_name)):
        os.remove(path(data_name))
    onnx.save_model(
        build_onnx_model(),
        path(ext_name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=0,
    )
    ext_blob = read(ext_name)
    data_blob = read(data_name)
    # Load without pulling the external bytes in, to see the references.
    ext_model = onnx.load(path(ext_name), load_external_data=False)
    spans = []
    external = []
    for tensor in all_tensors(ext_model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            if length:
                entry = span_entry(data_blob, offset, length)
                entry["location"] = info["location"]
                external.append(entry)
        elif tensor.raw_data:
            # Constant attributes stay embedded (convert_attribute=False).
            spans.append(span_entry(ext_blob, locate_raw_data(ext_blob, tensor), len(tensor.raw_data)))
    assert external and spans
    shared = [e for e in external if data_blob[e["offset"] : e["offset"] + e["len"]] == SHARED.tobytes()]
    assert len(shared) == 1
    ext_record = record("onnx", ext_blob, spans, external, has_shared=False)
    ext_record["shared_external"] = {"location": data_name, "offset": shared[0]["offset"], "len": shared[0]["len"]}
    out[ext_name] = ext_record
    # Raw external data has no header: not a recognised format.
    out[data_name] = {"format": None}
    return out


def main():
    os.makedirs(DATA, exist_ok=True)
    os.chdir(DATA)
    files = {}
    files.update(make_safetensors())
    files.update(make_gguf())
    files.update(make_onnx())
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("torch is required for the torch.save fixtures")
    files.update(make_torch())
    for name in files:
        size = os.path.getsize(path(name))
        assert size < 50 * 1024, f"{name} is {size} bytes; keep fixtures small"
    from gguf.constants import GGML_QUANT_SIZES

    expected = {
        "shared_hex": SHARED.tobytes().hex(),
        "files": dict(sorted(files.items())),
        # Oracle for the Rust ggml type table (gguf.rs unit test).
        "ggml_quant_sizes": {str(int(t)): list(size) for t, size in GGML_QUANT_SIZES.items()},
    }
    with open(path("expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
