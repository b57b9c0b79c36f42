"""Self-tests of the model-family generator (they do not need the modelfs binary).

The dedup tests judge the store against the generator's `ideal_bytes`, so the
generator's accounting is checked here against the real readers of each format
and against the shapes it was asked to produce.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import blake3
import numpy as np

import modelfamily


def _st_header(path: Path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _int_view(t):
    import torch

    return t.contiguous().view(torch.uint8)


def test_blake3_package_matches_rust_content_key():
    # The tests compute content keys (store-format §3) with the `blake3` package:
    # derive_key mode over (chunk hash, u32 LE length) per chunk. The expected
    # values are what `modelfs import` + `ls --json` report for these files (the
    # store's Rust content_key): a one-chunk file and an empty file.
    ctx = "modelfs 2026-11 content key v1"
    data = bytes(i % 251 for i in range(3073))
    chunk_hash = blake3.blake3(data).digest()
    # the chunk hash alone: blake3::hash(&data) with the Rust blake3 crate
    assert chunk_hash.hex() == "7124b49501012f81cc7f11ca069ec9226cecb8a2c850cfe644e327d22d3e1cd3"
    key = blake3.blake3(chunk_hash + len(data).to_bytes(4, "little"), derive_key_context=ctx).hexdigest()
    assert key == "63cafdc2922785c53c22d7ff5b5f283e7bbd9dff5153738af1b3dc160ae74ebc"
    empty = blake3.blake3(b"", derive_key_context=ctx).hexdigest()
    assert empty == "d08865564f4a1e37bcab0390cf803f58d978c44b4d4bbd337135b0e5bfbec1b9"


def test_family_files_and_sizes(family):
    for key, m in family.models.items():
        root = family.path(key)
        assert root.is_dir(), key
        listed = sorted(f["path"] for f in m["files"])
        assert listed == modelfamily.list_files(root), key
        assert m["logical_bytes"] == sum((root / p).stat().st_size for p in listed)
        for f in m["files"]:
            assert 0 <= f["tensor_bytes"] <= f["size"]
            assert f["tensor_bytes"] == sum(t[1] for t in f["tensors"])


def test_expected_models_present(family):
    assert set(family.models) == set(modelfamily.CORE_MODELS + modelfamily.EXTRA_MODELS)
    assert family.name("hf-cache") == "org/tiny"
    names = {k: sorted(f["path"] for f in family.files(k)) for k in family.models}
    assert names["base"] == ["config.json", "generation_config.json", "model.safetensors",
                             "tokenizer.json", "tokenizer_config.json"]
    assert {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)} <= set(names["resharded"])
    assert "model.safetensors.index.json" in names["resharded"]
    assert names["torch-bin"] == ["config.json", "pytorch_model.bin"]
    assert names["onnx-external"] == ["model.onnx", "model.onnx.data"]
    assert {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(names["nested"])
    assert "onnx/model.onnx" in names["hf-cache"]
    # base is about --base-mib MiB
    base = family.manifest["base_mib"] * modelfamily.MiB
    st = family.path("base") / "model.safetensors"
    assert 0.9 * base <= st.stat().st_size <= 1.02 * base


def test_copy_is_identical(family):
    a = {f["path"]: f["sha256"] for f in family.files("base")}
    b = {f["path"]: f["sha256"] for f in family.files("base-copy")}
    assert a == b


def test_safetensors_accounting_matches_reader(family):
    from safetensors import safe_open

    for key in family.models:
        for f in family.files(key):
            if f["format"] != "safetensors":
                continue
            p = family.path(key) / f["path"]
            with safe_open(str(p), "pt") as sf:
                meta = sf.metadata()
                sizes = {n: sf.get_slice(n).get_shape() for n in sf.keys()}
                nbytes = {n: sf.get_tensor(n).nbytes for n in sf.keys()}
            assert meta == {"format": "pt"}, (key, f["path"])
            assert sorted(nbytes) == sorted(t[2] for t in f["tensors"] if t[1] > 0)
            assert sum(nbytes.values()) == f["tensor_bytes"]
            assert sizes


def test_tensor_sharing_is_as_designed(family):
    """Which tensors of each fine-tune equal base's, by content hash."""
    def tensors(key, fname="model.safetensors"):
        f = next(f for f in family.files(key) if f["path"] == fname)
        return {t[2]: t[0] for t in f["tensors"]}

    base, head, last = tensors("base"), tensors("ft-head"), tensors("ft-last")
    n_layers = family.manifest["plan"]["n_layers"]
    assert set(head) == set(base) | {"classifier.weight"}
    assert {n for n in base if head[n] != base[n]} == {"lm_head.weight"}
    changed = {n for n in base if last[n] != base[n]}
    want = {n for n in base if n.startswith((f"model.layers.{n_layers - 2}.",
                                             f"model.layers.{n_layers - 1}."))}
    assert changed == want and len(want) == 24
    # resharded: the same tensor contents spread over 3 files
    resh = {}
    for i in (1, 2, 3):
        resh.update(tensors("resharded", f"model-0000{i}-of-00003.safetensors"))
    assert resh == base
    # torch-bin: the same byte strings (as storages)
    tb = next(f for f in family.files("torch-bin") if f["path"] == "pytorch_model.bin")
    assert sorted(t[0] for t in tb["tensors"]) == sorted(base.values())
    # nested text encoder only reuses base tensors
    te = tensors("nested", "text_encoder/model.safetensors")
    assert set(te.values()) <= set(base.values())
    unet = tensors("nested", "unet/diffusion_pytorch_model.safetensors")
    assert set(unet.values()) & set(base.values())
    assert set(unet.values()) - set(base.values())


def test_ft_head_new_tensor_first_and_offsets_shift(family):
    hb = _st_header(family.path("base") / "model.safetensors")
    hh = _st_header(family.path("ft-head") / "model.safetensors")
    assert hh["classifier.weight"]["data_offsets"][0] == 0
    for name, meta in hb.items():
        if name == "__metadata__":
            continue
        assert hh[name]["data_offsets"] != meta["data_offsets"], name
    # the shift is not a multiple of 4 KiB (so naive fixed-size block dedup would fail)
    assert hh["lm_head.weight"]["data_offsets"][0] % 4096 != hb["lm_head.weight"]["data_offsets"][0] % 4096


def test_ideal_matches_plan(family):
    plan = modelfamily.Plan(family.manifest["base_mib"], family.manifest["plan"]["n_layers"])
    shapes = dict(plan.tensors())
    nb = {n: int(np.prod(s)) * 2 for n, s in shapes.items()}
    L = plan.n_layers
    base_t = sum(nb.values())
    last2 = sum(v for n, v in nb.items()
                if n.startswith((f"model.layers.{L - 2}.", f"model.layers.{L - 1}.")))
    expect_t = base_t + 5 * plan.hidden * 2 + nb["lm_head.weight"] + last2
    got = family.manifest["dedup_set_ideal"]
    assert got["tensor_bytes_unique"] == expect_t
    # non-tensor: distinct small files + safetensors headers + torch zip overhead; small
    assert 0 < got["nontensor_bytes_unique"] < 0.05 * got["ideal_bytes"] + 2 * 1024 * 1024
    assert got["ideal_bytes"] == got["tensor_bytes_unique"] + got["nontensor_bytes_unique"]
    logical = sum(family.models[k]["logical_bytes"] for k in modelfamily.DEDUP_SET)
    assert got["logical_bytes"] == logical
    assert got["ideal_bytes"] < 0.3 * logical


def test_torch_bin_loads_and_equals_base(family):
    import torch
    from safetensors.torch import load_file

    sd = torch.load(family.path("torch-bin") / "pytorch_model.bin", weights_only=True)
    base = load_file(str(family.path("base") / "model.safetensors"))
    assert sorted(sd) == sorted(base)
    for n in base:
        assert sd[n].dtype == torch.bfloat16
        assert torch.equal(_int_view(sd[n]), _int_view(base[n])), n


def test_gguf_readable(family):
    from gguf import GGUFReader

    r = GGUFReader(str(family.path("gguf-model") / "model.gguf"))
    names = {t.name for t in r.tensors}
    assert "token_embd.weight" in names and "output.weight" in names
    types = {t.tensor_type.name for t in r.tensors}
    assert {"F32", "F16"} <= types
    assert "tokenizer.ggml.tokens" in r.fields
    f = next(f for f in family.files("gguf-model"))
    assert f["tensor_bytes"] == sum(int(t.n_bytes) for t in r.tensors)


def test_onnx_models_valid_and_equal(family):
    import onnx
    from onnx import numpy_helper

    m1 = onnx.load(str(family.path("onnx-model") / "model.onnx"))
    m2 = onnx.load(str(family.path("onnx-external") / "model.onnx"))  # loads external data
    onnx.checker.check_model(m1)
    onnx.checker.check_model(str(family.path("onnx-external") / "model.onnx"))
    w1 = {t.name: numpy_helper.to_array(t) for t in m1.graph.initializer}
    w2 = {t.name: numpy_helper.to_array(t) for t in m2.graph.initializer}
    assert w1.keys() == w2.keys()
    for k in w1:
        assert np.array_equal(w1[k], w2[k])
    ext = {f["path"]: f for f in family.files("onnx-external")}
    assert ext["model.onnx"]["tensor_bytes"] == 0
    assert ext["model.onnx.data"]["tensor_bytes"] == sum(v.nbytes for v in w1.values())
    # same weights in both models -> same tensor hashes
    inl = next(iter(family.files("onnx-model")))
    assert sorted(t[0] for t in inl["tensors"]) == sorted(t[0] for t in ext["model.onnx.data"]["tensors"])


def test_resharded_index(family):
    idx = json.loads((family.path("resharded") / "model.safetensors.index.json").read_text())
    base = _st_header(family.path("base") / "model.safetensors")
    base.pop("__metadata__")
    assert set(idx["weight_map"]) == set(base)
    assert set(idx["weight_map"].values()) == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    assert idx["metadata"]["total_size"] == sum(e - b for b, e in (m["data_offsets"] for m in base.values()))


def test_hf_cache_layout(family):
    snap = family.path("hf-cache")
    repo = snap.parent.parent
    assert repo.name == "models--org--tiny"
    assert (repo / "refs" / "main").read_text() == snap.name
    assert len(snap.name) == 40 and all(c in "0123456789abcdef" for c in snap.name)
    blobs = (repo / "blobs").resolve()
    for f in family.files("hf-cache"):
        p = snap / f["path"]
        assert p.is_symlink(), f["path"]
        target = os.readlink(p)
        assert not os.path.isabs(target) and target.startswith("../")
        assert p.resolve().parent == blobs
        assert f["symlink"] == target
        assert p.resolve().stat().st_size == f["size"]


def test_deterministic(tmp_path):
    m1 = modelfamily.generate(tmp_path / "a", base_mib=1, seed=7)
    m2 = modelfamily.generate(tmp_path / "b", base_mib=1, seed=7)
    m3 = modelfamily.generate(tmp_path / "c", base_mib=1, seed=8, formats="core")
    assert m1 == m2
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for key, m in m1["models"].items():
        for f in m["files"]:
            a = (tmp_path / "a" / m["import_path"] / f["path"]).read_bytes()
            b = (tmp_path / "b" / m["import_path"] / f["path"]).read_bytes()
            assert a == b, (key, f["path"])
    s1 = {f["path"]: f["sha256"] for f in m1["models"]["base"]["files"]}
    s3 = {f["path"]: f["sha256"] for f in m3["models"]["base"]["files"]}
    assert s1["model.safetensors"] != s3["model.safetensors"]


def test_single_model_writer(tmp_path):
    d = modelfamily.write_single_model(tmp_path / "m", base_mib=2, seed=3)
    files = {f["path"]: f for f in d["files"]}
    assert set(files) == {"config.json", "model.safetensors", "pytorch_model.bin",
                          "tokenizer.json", "tokenizer_config.json"}
    a = sorted(t[0] for t in files["model.safetensors"]["tensors"])
    b = sorted(t[0] for t in files["pytorch_model.bin"]["tensors"])
    assert a == b
    assert d["tensor_bytes_unique"] == files["model.safetensors"]["tensor_bytes"]

