#!/usr/bin/env python3
"""Generate a realistic, deterministic family of model directories for modelfs tests.

Usage (CLI):

    python tests/modelfamily.py OUT_DIR [--base-mib 256] [--seed 0] [--formats all|core]

Every model is written with the real writer of its format (safetensors,
torch.save, gguf.GGUFWriter, onnx), laid out like a Hugging Face model
directory.  Models (sub-directories of OUT_DIR):

  base/          transformer-like bf16 state dict, ~--base-mib MiB, model.safetensors,
                 config.json, tokenizer.json, tokenizer_config.json, generation_config.json
  base-copy/     byte-identical copy of base/
  ft-head/       base tensors + a new `classifier.weight` (sorts first in the file, so every
                 data offset shifts) + a new lm_head
  ft-last/       the tensors of the last two layers replaced, the rest unchanged
  resharded/     the base tensors in 3 shards + model.safetensors.index.json
  torch-bin/     the base tensors saved with torch.save (zip) as pytorch_model.bin + config.json
  and with --formats all:
  gguf-model/    a small GGUF (F32/F16 tensors, kv entries incl. a tokenizer string array)
  onnx-model/    a small ONNX MLP, initializers as raw_data
  onnx-external/ the same MLP saved with external data in model.onnx.data
  nested/        diffusers-like tree (text_encoder/, unet/, scheduler/) sharing tensors with base
  hf-cache/models--org--tiny/   a Hugging Face hub cache (blobs/, snapshots/<rev>/ symlinks, refs/main)

OUT_DIR/manifest.json describes every model (its import path, expected default
name, files with size/sha256/tensor list) and the *ideal* stored size, i.e.
what a perfect tensor-level + whole-file deduplicating store would keep:

    ideal_bytes = sum of sizes of DISTINCT tensor byte-strings
                + sum over DISTINCT files (by whole-file sha256) of (file size - its tensor bytes)

The tensor byte ranges are not taken from the generator's own bookkeeping but
re-read from the written files by independent parsers (safetensors header, torch
zip records, GGUF reader, ONNX protobuf), so the yardstick reflects exactly what
the writers wrote.  `ideal_for(manifest, names)` computes it for any subset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

MiB = 1 << 20

CORE_MODELS = ["base", "base-copy", "ft-head", "ft-last", "resharded", "torch-bin"]
EXTRA_MODELS = ["gguf-model", "onnx-model", "onnx-external", "nested", "hf-cache"]
# The set of models the dedup yardstick in the CLI tests is computed over.
DEDUP_SET = CORE_MODELS


# ----------------------------------------------------------------------------------------
# helpers


def _torch():
    import torch  # imported lazily: `python modelfamily.py --help` should not need torch

    return torch


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def random_bf16(rng: np.random.Generator, shape):
    """A fresh bf16 tensor (its own storage) filled with random bit patterns."""
    torch = _torch()
    n = int(np.prod(shape))
    arr = rng.integers(-32768, 32768, size=n, dtype=np.int16)
    return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)


class Plan:
    """Shapes of the transformer-like base model for a target size."""

    def __init__(self, base_mib: float, n_layers: int = 8):
        elems = base_mib * MiB / 2  # bf16
        self.n_layers = L = n_layers
        # elems ~= L * (4 d^2 + 3 d ff) + 2 V d with V = 16 d and ff ~ 3 d  ->  (13 L + 32) d^2
        d = int(math.sqrt(elems / (13 * L + 32))) // 32 * 32
        self.hidden = d = max(64, d)
        self.vocab = V = min(32000, 16 * d)
        small = L * (2 * d + 3 * d) + d  # norms + q/k/v biases + final norm
        rest = elems - 2 * V * d - 4 * L * d * d - small
        self.ff = max(32, int(rest // (3 * L * d)) // 32 * 32)
        self.heads = max(1, d // 64)

    def tensors(self):
        """(name, shape) in the order a transformers state dict has them."""
        d, ff, V = self.hidden, self.ff, self.vocab
        out = [("model.embed_tokens.weight", (V, d))]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (d, d)),
                (p + "self_attn.q_proj.bias", (d,)),
                (p + "self_attn.k_proj.weight", (d, d)),
                (p + "self_attn.k_proj.bias", (d,)),
                (p + "self_attn.v_proj.weight", (d, d)),
                (p + "self_attn.v_proj.bias", (d,)),
                (p + "self_attn.o_proj.weight", (d, d)),
                (p + "mlp.gate_proj.weight", (ff, d)),
                (p + "mlp.up_proj.weight", (ff, d)),
                (p + "mlp.down_proj.weight", (d, ff)),
                (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,)),
            ]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (V, d))]
        return out

    def config(self, **extra):
        cfg = {
            "_name_or_path": "modelfs-test/base",
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.ff,
            "max_position_embeddings": 4096,
            "model_type": "qwen2",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.n_layers,
            "num_key_value_heads": self.heads,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.46.0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }
        cfg.update(extra)
        return cfg


def make_tokenizer(rng: np.random.Generator, vocab_size: int):
    """A fake but structurally realistic byte-level BPE tokenizer.json + tokenizer_config.json."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    n_words = max(0, vocab_size - len(specials) - len(byte_tokens))
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    probs = np.linspace(2.0, 0.2, len(letters))
    probs /= probs.sum()
    lengths = rng.integers(2, 11, size=n_words)
    pool = letters[rng.choice(len(letters), size=int(lengths.sum()), p=probs)].tobytes().decode()
    space = rng.random(n_words) < 0.6
    words, seen, pos = [], set(specials) | set(byte_tokens), 0
    for i in range(n_words):
        w = pool[pos:pos + lengths[i]]
        pos += lengths[i]
        if space[i]:
            w = "\u0120" + w  # "Ġ": GPT-2 style leading space
        if w in seen:
            w = f"{w}{i}"
        seen.add(w)
        words.append(w)
    tokens = specials + byte_tokens + words
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for w in words:
        cut = max(1, len(w) // 2)
        merges.append(f"{w[:cut]} {w[cut:]}")
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": True, "vocab": vocab, "merges": merges},
    }
    tok_cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(specials)
        },
        "bos_token": "<s>",
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 4096,
        "pad_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    return tok, tok_cfg, tokens


def save_safetensors(sd, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt"})


def torch_save_deterministic(sd, path: Path, rng: np.random.Generator) -> None:
    """torch.save (default zip format), then replace the random `.data/serialization_id`
    record with seed-derived digits (same length, CRCs patched) so output is reproducible."""
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if i.filename.endswith("/.data/serialization_id")]
    if not infos:
        return
    info = infos[0]
    new = "".join(str(int(x)) for x in rng.integers(0, 10, size=info.file_size)).encode()
    crc = zlib.crc32(new) & 0xFFFFFFFF
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        hdr = f.read(30)
        assert hdr[:4] == b"PK\x03\x04" and struct.unpack("<H", hdr[8:10])[0] == 0
        n, m = struct.unpack("<HH", hdr[26:30])
        f.seek(info.header_offset + 14)
        f.write(struct.pack("<I", crc))
        f.seek(info.header_offset + 30 + n + m)
        f.write(new)
        # central directory entry: find it by scanning for its header offset
        f.seek(0)
        data = f.read()
    name = info.filename.encode()
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0, "central directory entry of serialization_id not found"
        nlen = struct.unpack("<H", data[pos + 28:pos + 30])[0]
        if data[pos + 46:pos + 46 + nlen] == name:
            break
        pos += 4
    with open(path, "r+b") as f:
        f.seek(pos + 16)
        f.write(struct.pack("<I", crc))
    with zipfile.ZipFile(path) as z:  # CRC check of the patched record
        assert z.read(info.filename) == new


# ----------------------------------------------------------------------------------------
# independent scanners: which byte ranges of a written file are tensor data?


def _hash_ranges(path: Path, ranges):
    """[(offset, length, name)] -> [[sha256hex, length, name]]"""
    out = []
    if not ranges:
        return out
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else _NullMap() as mm:
            for off, length, name in ranges:
                assert 0 <= off and off + length <= size, (path, name, off, length, size)
                out.append([hashlib.sha256(mm[off:off + length]).hexdigest(), int(length), name])
    return out


class _NullMap:
    def __enter__(self):
        return b""

    def __exit__(self, *a):
        return False


def scan_safetensors(path: Path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    ranges = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        if e > b:
            ranges.append((base + b, e - b, name))
    return ranges


def scan_torch_zip(path: Path):
    ranges = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit():
                assert info.compress_type == zipfile.ZIP_STORED
                f.seek(info.header_offset)
                hdr = f.read(30)
                n, m = struct.unpack("<HH", hdr[26:30])
                if info.file_size:
                    ranges.append((info.header_offset + 30 + n + m, info.file_size, info.filename))
    return ranges


def scan_gguf(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return [(int(t.data_offset), int(t.n_bytes), t.name) for t in r.tensors if int(t.n_bytes)]


def scan_onnx(path: Path):
    """-> (ranges-in-this-file, {external file name: [(offset, length, name)]})

    ONNX raw_data lives inside protobuf; the byte offset is found by locating the
    bytes in the file (they are written verbatim)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = list(model.graph.initializer)
    external = {}
    ranges = []
    with open(path, "rb") as f:
        data = f.read()
    for t in inits:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            external.setdefault(kv["location"], []).append(
                (int(kv.get("offset", 0)), int(kv["length"]), t.name))
        elif t.raw_data:
            off = data.find(t.raw_data)
            assert off >= 0
            ranges.append((off, len(t.raw_data), t.name))
    return ranges, external


def scan_model_dir(root: Path, files):
    """Tensor ranges for the given (relative) files of one model directory."""
    external = {}
    result = {}
    for rel in files:
        p = root / rel
        if rel.endswith(".onnx"):
            ranges, ext = scan_onnx(p)
            for loc, rs in ext.items():
                key = str(Path(rel).parent / loc) if Path(rel).parent != Path(".") else loc
                external.setdefault(key, []).extend(rs)
            result[rel] = ("onnx", ranges)
    for rel in files:
        p = root / rel
        if rel in result:
            continue
        if rel in external:
            result[rel] = ("onnx-external-data", external[rel])
        elif rel.endswith(".safetensors"):
            result[rel] = ("safetensors", scan_safetensors(p))
        elif rel.endswith((".bin", ".pt", ".pth")) and zipfile.is_zipfile(p):
            result[rel] = ("torch-zip", scan_torch_zip(p))
        elif rel.endswith(".gguf"):
            result[rel] = ("gguf", scan_gguf(p))
        else:
            result[rel] = ("other", [])
    return result


def list_files(root: Path):
    """Regular files under root, following symlinks (relative, '/'-separated, sorted)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fn in filenames:
            p = Path(dirpath) / fn
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def describe_model(out_dir: Path, key: str, import_path: str, name: str, cache: dict):
    root = out_dir / import_path
    files = list_files(root)
    scanned = scan_model_dir(root, files)
    entries = []
    for rel in files:
        p = root / rel
        st = p.stat()
        digest = sha256_file(p)
        fmt, ranges = scanned[rel]
        if digest not in cache:
            cache[digest] = _hash_ranges(p, ranges)
        tensors = cache[digest]
        e = {
            "path": rel,
            "size": st.st_size,
            "sha256": digest,
            "format": fmt,
            "tensor_bytes": sum(t[1] for t in tensors),
            "tensors": tensors,
        }
        if p.is_symlink() or os.path.islink(p):
            e["symlink"] = os.readlink(p)
        entries.append(e)
    model = {"key": key, "name": name, "import_path": import_path, "files": entries}
    model.update(_ideal([model]))
    return model


def _ideal(models):
    tensors = {}
    files = {}
    logical = 0
    for m in models:
        for f in m["files"]:
            logical += f["size"]
            files[f["sha256"]] = f["size"] - f["tensor_bytes"]
            for h, n, _name in f["tensors"]:
                tensors[h] = n
    t = sum(tensors.values())
    nt = sum(files.values())
    return {
        "logical_bytes": logical,
        "ideal_bytes": t + nt,
        "tensor_bytes_unique": t,
        "nontensor_bytes_unique": nt,
        "distinct_files": len(files),
        "distinct_tensors": len(tensors),
        "n_files": sum(len(m["files"]) for m in models),
    }


def ideal_for(manifest, keys):
    """Ideal stored size (and friends) for a subset of the manifest's models (by key)."""
    return _ideal([manifest["models"][k] for k in keys])


# ----------------------------------------------------------------------------------------
# the family


def generate(out_dir, base_mib: float = 256, seed: int = 0, formats: str = "all",
             n_layers: int = 8, quiet: bool = True):
    torch = _torch()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ss = np.random.SeedSequence(seed)
    # independent streams per purpose so that adding models does not change others
    (r_base, r_tok, r_head, r_last, r_misc, r_gguf, r_onnx, r_nested, r_hf) = [
        np.random.default_rng(s) for s in ss.spawn(9)]

    plan = Plan(base_mib, n_layers)
    sd = {name: random_bf16(r_base, shape) for name, shape in plan.tensors()}
    tok, tok_cfg, tok_list = make_tokenizer(r_tok, plan.vocab)
    gen_cfg = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
               "do_sample": True, "temperature": 0.7, "top_p": 0.8,
               "transformers_version": "4.46.0"}

    def hf_dir(d: Path, state, cfg, weights=True):
        if weights:
            save_safetensors(state, d / "model.safetensors")
        write_json(d / "config.json", cfg)
        write_json(d / "generation_config.json", gen_cfg)
        write_json(d / "tokenizer.json", tok)
        write_json(d / "tokenizer_config.json", tok_cfg)

    models = []  # (key, import_path, default name)

    # base
    hf_dir(out / "base", sd, plan.config())
    models.append(("base", "base", "base"))

    # base-copy: same bytes
    shutil.copytree(out / "base", out / "base-copy", dirs_exist_ok=True)
    models.append(("base-copy", "base-copy", "base-copy"))

    # ft-head: classifier sorts first ('c' < 'l' < 'm') and shifts every offset; new lm_head
    num_labels = 5
    sd_head = {"classifier.weight": random_bf16(r_head, (num_labels, plan.hidden))}
    sd_head.update(sd)
    sd_head["lm_head.weight"] = random_bf16(r_head, (plan.vocab, plan.hidden))
    hf_dir(out / "ft-head", sd_head, plan.config(
        _name_or_path="modelfs-test/base", num_labels=num_labels,
        id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
        label2id={f"LABEL_{i}": i for i in range(num_labels)}))
    models.append(("ft-head", "ft-head", "ft-head"))

    # ft-last: the last two layers replaced
    sd_last = dict(sd)
    last = {f"model.layers.{i}." for i in (plan.n_layers - 2, plan.n_layers - 1)}
    for name, shape in plan.tensors():
        if any(name.startswith(p) for p in last):
            sd_last[name] = random_bf16(r_last, shape)
    hf_dir(out / "ft-last", sd_last, plan.config(_name_or_path="modelfs-test/ft-last"))
    models.append(("ft-last", "ft-last", "ft-last"))

    # resharded: 3 shards, transformers-style index
    names = [n for n, _ in plan.tensors()]
    total = sum(sd[n].numel() * 2 for n in names)
    shards, cur, acc = [[] for _ in range(3)], 0, 0
    for n in names:
        if acc >= total * (cur + 1) / 3 and cur < 2:
            cur += 1
        shards[cur].append(n)
        acc += sd[n].numel() * 2
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-00003.safetensors"
        save_safetensors({n: sd[n] for n in shard}, out / "resharded" / fn)
        weight_map.update({n: fn for n in shard})
    write_json(out / "resharded" / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    hf_dir(out / "resharded", None, plan.config(), weights=False)
    models.append(("resharded", "resharded", "resharded"))

    # torch-bin
    torch_save_deterministic(sd, out / "torch-bin" / "pytorch_model.bin", r_misc)
    write_json(out / "torch-bin" / "config.json", plan.config())
    models.append(("torch-bin", "torch-bin", "torch-bin"))

    if formats == "all":
        models.append(("gguf-model", "gguf-model", "gguf-model"))
        write_gguf(out / "gguf-model" / "model.gguf", r_gguf, tok_list[:2000])

        w = onnx_weights(r_onnx)
        write_onnx(out / "onnx-model" / "model.onnx", w, external=False)
        models.append(("onnx-model", "onnx-model", "onnx-model"))
        write_onnx(out / "onnx-external" / "model.onnx", w, external=True)
        models.append(("onnx-external", "onnx-external", "onnx-external"))

        write_nested(out / "nested", sd, plan, r_nested, base_mib)
        models.append(("nested", "nested", "nested"))

        snap = write_hf_cache(out / "hf-cache", r_hf, tok, tok_cfg, gen_cfg)
        models.append(("hf-cache", snap.relative_to(out).as_posix(), "org/tiny"))

    t_write = time.monotonic() - t0
    cache = {}
    manifest = {
        "generator": "tests/modelfamily.py",
        "seed": seed,
        "base_mib": base_mib,
        "formats": formats,
        "plan": {"hidden": plan.hidden, "ff": plan.ff, "vocab": plan.vocab,
                 "n_layers": plan.n_layers},
        "models": {},
    }
    for key, path, name in models:
        manifest["models"][key] = describe_model(out, key, path, name, cache)
    manifest["dedup_set"] = list(DEDUP_SET)
    manifest["dedup_set_ideal"] = ideal_for(manifest, DEDUP_SET)
    manifest["all"] = ideal_for(manifest, list(manifest["models"]))
    write_json(out / "manifest.json", manifest)
    t_all = time.monotonic() - t0
    if not quiet:
        print(f"wrote {len(models)} models to {out} in {t_write:.1f}s "
              f"(+{t_all - t_write:.1f}s scanning/hashing)", file=sys.stderr)
    return manifest


def write_single_model(out_dir, base_mib: float = 32, seed: int = 1, with_torch_bin: bool = True,
                       n_layers: int = 8):
    """One stand-alone base-like HF model directory (model.safetensors [+ the same tensors as
    pytorch_model.bin] + configs + tokenizer), independent of the family's tensors.
    Returns describe_dir() of it."""
    out = Path(out_dir)
    rng_w, rng_t, rng_m = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    plan = Plan(base_mib, n_layers)
    sd = {name: random_bf16(rng_w, shape) for name, shape in plan.tensors()}
    tok, tok_cfg, _ = make_tokenizer(rng_t, plan.vocab)
    save_safetensors(sd, out / "model.safetensors")
    if with_torch_bin:
        torch_save_deterministic(sd, out / "pytorch_model.bin", rng_m)
    write_json(out / "config.json", plan.config(_name_or_path=f"modelfs-test/single-{seed}"))
    write_json(out / "tokenizer.json", tok)
    write_json(out / "tokenizer_config.json", tok_cfg)
    return describe_dir(out)


def describe_dir(root, name=None):
    """Manifest-style description (files, tensors, ideal/logical bytes) of any directory."""
    root = Path(root)
    return describe_model(root.parent, root.name, root.name, name or root.name, {})


def write_gguf(path: Path, rng, tokens):
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("modelfs-test-tiny")
    w.add_context_length(2048)
    w.add_embedding_length(128)
    w.add_block_count(2)
    w.add_head_count(2)
    w.add_uint32("llama.feed_forward_length", 384)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores([float(-i) for i in range(len(tokens))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    n_vocab, d, ff = len(tokens), 128, 384
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, d)).astype(np.float16))
    for b in range(2):
        w.add_tensor(f"blk.{b}.attn_norm.weight", rng.standard_normal(d).astype(np.float32))
        for nm in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{b}.{nm}.weight", rng.standard_normal((d, d)).astype(np.float16))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", rng.standard_normal(d).astype(np.float32))
        w.add_tensor(f"blk.{b}.ffn_up.weight", rng.standard_normal((ff, d)).astype(np.float16))
        w.add_tensor(f"blk.{b}.ffn_down.weight", rng.standard_normal((d, ff)).astype(np.float16))
    w.add_tensor("output_norm.weight", rng.standard_normal(d).astype(np.float32))
    w.add_tensor("output.weight", rng.standard_normal((n_vocab, d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def onnx_weights(rng, d_in=256, h=512, d_out=64):
    return {
        "fc1.weight": rng.standard_normal((d_in, h)).astype(np.float32),
        "fc1.bias": rng.standard_normal(h).astype(np.float32),
        "fc2.weight": rng.standard_normal((h, h)).astype(np.float32),
        "fc2.bias": rng.standard_normal(h).astype(np.float32),
        "fc3.weight": rng.standard_normal((h, d_out)).astype(np.float32),
        "fc3.bias": rng.standard_normal(d_out).astype(np.float32),
    }


def write_onnx(path: Path, w, external: bool):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path.parent.mkdir(parents=True, exist_ok=True)
    d_in = w["fc1.weight"].shape[0]
    d_out = w["fc3.weight"].shape[1]
    nodes, prev = [], "input"
    for i in (1, 2, 3):
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"add{i}"]))
        if i < 3:
            nodes.append(helper.make_node("Relu", [f"add{i}"], [f"relu{i}"]))
            prev = f"relu{i}"
    nodes.append(helper.make_node("Identity", ["add3"], ["output"]))
    inits = [numpy_helper.from_array(v, name=k) for k, v in w.items()]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", d_out])],
        initializer=inits)
    model = helper.make_model(graph, producer_name="modelfs-tests",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))


def write_nested(root: Path, sd, plan, rng, base_mib):
    """diffusers-like tree. text_encoder shares (renamed, reordered) tensors with base."""
    torch = _torch()
    write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    })
    te = {"text_model.embeddings.token_embedding.weight": sd["model.embed_tokens.weight"]}
    for i in range(min(2, plan.n_layers)):
        src = f"model.layers.{i}."
        dst = f"text_model.encoder.layers.{i}."
        te[dst + "self_attn.q_proj.weight"] = sd[src + "self_attn.q_proj.weight"]
        te[dst + "self_attn.k_proj.weight"] = sd[src + "self_attn.k_proj.weight"]
        te[dst + "self_attn.v_proj.weight"] = sd[src + "self_attn.v_proj.weight"]
        te[dst + "self_attn.out_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        te[dst + "mlp.fc1.weight"] = sd[src + "mlp.up_proj.weight"]
        te[dst + "mlp.fc2.weight"] = sd[src + "mlp.down_proj.weight"]
        te[dst + "layer_norm1.weight"] = sd[src + "input_layernorm.weight"]
    te["text_model.final_layer_norm.weight"] = sd["model.norm.weight"]
    save_safetensors(te, root / "text_encoder" / "model.safetensors")
    write_json(root / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"], "hidden_size": plan.hidden,
        "intermediate_size": plan.ff, "num_hidden_layers": 2, "vocab_size": plan.vocab,
        "torch_dtype": "bfloat16"})
    # unet: new fp16 conv/attn weights + f32 norms (mixed dtypes) + one tensor shared with base
    unet = {}
    budget = max(1, int(base_mib * MiB / 16))
    c = 64
    i = 0
    while budget > 0:
        n_el = min(budget // 2, c * c * 9 * 4)
        if n_el <= 0:
            break
        arr = rng.integers(-32768, 32768, size=n_el, dtype=np.int16)
        unet[f"down_blocks.{i}.resnets.0.conv1.weight"] = torch.from_numpy(arr).view(torch.float16)
        unet[f"down_blocks.{i}.resnets.0.norm1.weight"] = torch.from_numpy(
            rng.standard_normal(c).astype(np.float32))
        budget -= n_el * 2
        i += 1
    unet["mid_block.attentions.0.proj_in.weight"] = sd["model.layers.0.mlp.gate_proj.weight"]
    save_safetensors(unet, root / "unet" / "diffusion_pytorch_model.safetensors")
    write_json(root / "unet" / "config.json", {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.31.0",
        "block_out_channels": [64, 128], "in_channels": 4, "out_channels": 4})
    write_json(root / "scheduler" / "scheduler_config.json", {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.31.0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "prediction_type": "epsilon"})


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hf_cache(cache_root: Path, rng, tok, tok_cfg, gen_cfg) -> Path:
    """hf-cache/models--org--tiny/{blobs,snapshots/<rev>,refs/main}. Returns the snapshot dir."""
    torch = _torch()
    repo = cache_root / "models--org--tiny"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    rev = rng.bytes(20).hex()
    old_rev = rng.bytes(20).hex()
    tmp = repo / ".tmp-build"
    tmp.mkdir(exist_ok=True)
    d, V = 64, 512
    st = {
        "embed.weight": torch.from_numpy(rng.standard_normal((V, d)).astype(np.float32)),
        "layers.0.weight": torch.from_numpy(rng.standard_normal((d, d)).astype(np.float32)),
        "head.weight": torch.from_numpy(rng.standard_normal((V, d)).astype(np.float32)),
    }
    save_safetensors(st, tmp / "model.safetensors")
    write_json(tmp / "config.json", {"architectures": ["TinyModel"], "hidden_size": d,
                                     "vocab_size": V, "model_type": "tiny"})
    write_json(tmp / "generation_config.json", gen_cfg)
    small_tok = dict(tok)
    small_tok["model"] = dict(tok["model"])
    small_tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < V}
    small_tok["model"]["merges"] = tok["model"]["merges"][:V]
    write_json(tmp / "tokenizer.json", small_tok)
    write_json(tmp / "tokenizer_config.json", tok_cfg)
    w = onnx_weights(rng, d_in=32, h=16, d_out=8)
    write_onnx(tmp / "onnx" / "model.onnx", w, external=False)
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "onnx/model.onnx"]
    snap = repo / "snapshots" / rev
    for rel in files:
        data = (tmp / rel).read_bytes()
        # hub convention: LFS files are named by sha256, regular git files by git blob sha1
        big = rel.endswith((".safetensors", ".onnx"))
        blob = hashlib.sha256(data).hexdigest() if big else _git_blob_sha1(data)
        (blobs / blob).write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = len(Path(rel).parts) + 1  # snapshots/<rev>/<rel>
        target = "/".join([".."] * depth) + f"/blobs/{blob}"
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link)
        if rel == "config.json":
            # an older revision that shares the config blob
            old = repo / "snapshots" / old_rev / rel
            old.parent.mkdir(parents=True, exist_ok=True)
            if old.is_symlink():
                old.unlink()
            os.symlink(target, old)
    shutil.rmtree(tmp)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / ".no_exist" / rev).mkdir(parents=True, exist_ok=True)
    (repo / ".no_exist" / rev / "added_tokens.json").write_bytes(b"")
    return snap



# ----------------------------------------------------------------------------------------
# TensorFlow / Keras models (not part of the family: only the loader tests use them, and
# importing TensorFlow is slow, so they are separate functions that import it lazily).

TF_IN, TF_HIDDEN, TF_OUT = 16, 32, 4


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def write_tf_savedmodel(out_dir, seed: int = 0) -> Path:
    """A tiny TensorFlow SavedModel written by `tf.saved_model.save`: a `tf.Module` with
    float32 weights, an int64 step counter, and a `serving_default` signature
    (input `x`: float32 [batch, TF_IN] -> {"logits": [batch, TF_OUT], "hidden_sum": [batch]}).
    Layout: saved_model.pb, fingerprint.pb, variables/variables.{index,data-00000-of-00001},
    assets/ (empty). Returns out_dir."""
    tf = _tf()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    class TinyMLP(tf.Module):
        def __init__(self):
            super().__init__(name="tiny_mlp")
            self.w1 = tf.Variable(rng.standard_normal((TF_IN, TF_HIDDEN)).astype(np.float32), name="w1")
            self.b1 = tf.Variable(rng.standard_normal(TF_HIDDEN).astype(np.float32), name="b1")
            self.w2 = tf.Variable(rng.standard_normal((TF_HIDDEN, TF_OUT)).astype(np.float32), name="w2")
            self.step = tf.Variable(np.int64(1234567), name="step", trainable=False)

        @tf.function(input_signature=[tf.TensorSpec([None, TF_IN], tf.float32, name="x")])
        def __call__(self, x):
            h = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
            return {"logits": tf.matmul(h, self.w2), "hidden_sum": tf.reduce_sum(h, axis=1)}

    m = TinyMLP()
    tf.saved_model.save(m, str(out), signatures={"serving_default": m.__call__})
    return out


def write_keras(out_dir, seed: int = 0) -> Path:
    """A small Keras 3 model saved with `model.save(out_dir / "model.keras")` (the .keras zip:
    config.json, metadata.json, model.weights.h5), plus the same weights as a separate
    `model.weights.h5` (HDF5 via h5py). Dense(TF_HIDDEN, relu) -> Dense(TF_OUT); input
    float32 [batch, TF_IN]. Returns the path of model.keras."""
    _tf()
    import keras

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((TF_IN,), name="x"),
        keras.layers.Dense(TF_HIDDEN, activation="relu", name="dense_1"),
        keras.layers.Dense(TF_OUT, name="dense_2"),
    ], name="tiny_keras")
    rng = np.random.default_rng(seed + 1)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(str(out / "model.keras"))
    model.save_weights(str(out / "model.weights.h5"))
    return out / "model.keras"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--base-mib", type=float, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", choices=["all", "core"], default="all")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    m = generate(a.out_dir, a.base_mib, a.seed, a.formats, a.layers, quiet=False)
    dt = time.monotonic() - t0
    print(f"{'model':<16}{'files':>6}{'logical':>14}{'ideal(alone)':>14}")
    for k, mod in m["models"].items():
        print(f"{k:<16}{len(mod['files']):>6}{mod['logical_bytes']:>14}{mod['ideal_bytes']:>14}")
    for label, s in (("dedup set", m["dedup_set_ideal"]), ("all", m["all"])):
        print(f"{label}: logical {s['logical_bytes']} ideal {s['ideal_bytes']} "
              f"(tensor {s['tensor_bytes_unique']} + nontensor {s['nontensor_bytes_unique']}) "
              f"ratio {s['ideal_bytes'] / s['logical_bytes']:.3f}")
    print(f"total time {dt:.1f}s")


if __name__ == "__main__":
    main()
