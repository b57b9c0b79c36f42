"""End-to-end tests of the `modelfs` CLI, driving the real binary (MODELFS_BIN).

Every test uses a fresh store in its tmp_path (`--store DIR`). Model files are
generated locally with the real writers (tests/modelfamily.py); nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import struct
import subprocess
import time
from pathlib import Path

import blake3
import pytest

import modelfamily
from conftest import SLACK_PER_FILE, Modelfs
from mountlib import evict_page_cache

IS_ROOT = os.geteuid() == 0
ONE_CHUNK_MAX = 16 * 1024  # = CDC_MIN: such a file, if no model format, is one chunk
CONTENT_KEY_CONTEXT = "modelfs 2026-11 content key v1"  # docs/store-format.md §3
MODEL_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".bin", ".pt", ".pth", ".ckpt")


def one_chunk_content_key(data: bytes) -> str | None:
    """The content key of a file the store cuts into one chunk (or none), computed
    independently (the `blake3` package): derive_key over (chunk hash, u32 LE length).
    None when the file could be a model format, whose chunking needs its parser."""
    if len(data) > ONE_CHUNK_MAX or data[:4] in (b"GGUF", b"PK\x03\x04") or data[8:10] in (b'{"', b"{}"):
        return None
    chunks = [blake3.blake3(data).digest() + len(data).to_bytes(4, "little")] if data else []
    return blake3.blake3(b"".join(chunks), derive_key_context=CONTENT_KEY_CONTEXT).hexdigest()


# ------------------------------------------------------------------------------------------
# helpers


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


def expected_files(root: Path):
    """{relative path: bytes} of a model directory (following symlinks) or a single file."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {rel: (root / rel).read_bytes() for rel in modelfamily.list_files(root)}


def check_model(mfs: Modelfs, name: str, expect: dict, check_hash: bool = True):
    """`ls NAME --json` lists exactly the expected files with the right sizes and hashes,
    and `cat` returns every file byte-exact."""
    listed = mfs.ls_files(name)
    assert sorted(listed) == sorted(expect), (
        f"`ls {name} --json` paths differ from the imported tree:\n"
        f"  missing: {sorted(set(expect) - set(listed))}\n  extra: {sorted(set(listed) - set(expect))}")
    objects = (mfs.store / "objects").resolve()
    for rel, data in expect.items():
        f = listed[rel]
        assert f["size"] == len(data), (name, rel, f, len(data))
        assert isinstance(f["hash"], str) and len(f["hash"]) == 64 and int(f["hash"], 16) >= 0, f
        key = one_chunk_content_key(data)
        if check_hash and key is not None and not rel.endswith(MODEL_SUFFIXES):
            assert f["hash"] == key, f"{name}/{rel}: `hash` is not the content key of the file"
        assert f["storage"] in ("whole", "recipe"), f
        if f["storage"] == "whole":
            obj = f["object"]
            assert isinstance(obj, str) and os.path.isabs(obj), f
            assert Path(obj).is_file(), f"{name}/{rel}: object {obj} does not exist"
            assert objects in Path(obj).resolve().parents, f"{obj} is not under {objects}"
        else:
            assert f["object"] is None, f
        got = mfs.cat(f"{name}/{rel}")
        assert got == data, (
            f"`cat {name}/{rel}` returned {len(got)} bytes that differ from the original "
            f"({len(data)} bytes); first difference at {_first_diff(got, data)}")


def _first_diff(a: bytes, b: bytes):
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            for j in range(i, min(n, i + 4096)):
                if a[j] != b[j]:
                    return j
    return n


def assert_unchanged(mfs: Modelfs, before: dict, what: str):
    after = mfs.snapshot()
    for k in ("ls", "du", "objects"):
        assert after[k] == before[k], (
            f"store changed after a failed `{what}` ({k} differs):\nbefore: "
            f"{json.dumps(before[k])[:1500]}\nafter:  {json.dumps(after[k])[:1500]}")


def slack(n_files: int) -> int:
    return SLACK_PER_FILE * n_files


# ------------------------------------------------------------------------------------------
# help / basics


COMMANDS = {
    "init": ("creat", "initiali", "new store"),
    "import": ("import",),
    "ls": ("list",),
    "rm": ("remov", "delet"),
    "gc": ("garbage", "unreferenced", "reclaim", "collect"),
    "verify": ("verif", "integrity", "re-hash", "rehash", "check"),
    "cat": ("stdout", "standard output", "print", "contents", "content"),
    "du": ("disk", "usage", "space"),
}


def test_top_level_help_lists_commands(modelfs_bin):
    r = subprocess.run([str(modelfs_bin), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for cmd in COMMANDS:
        assert cmd in r.stdout, f"`modelfs --help` does not mention `{cmd}`:\n{r.stdout}"
    assert "--store" in r.stdout


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_command_help(modelfs_bin, cmd):
    r = subprocess.run([str(modelfs_bin), cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"`modelfs {cmd} --help` exited {r.returncode}: {r.stderr}"
    text = r.stdout.lower()
    assert any(k in text for k in COMMANDS[cmd]), (
        f"`modelfs {cmd} --help` does not describe its purpose (looked for {COMMANDS[cmd]}):\n{r.stdout}")


def test_unknown_command_fails(mfs):
    mfs.run("frobnicate", ok=False)


def test_store_from_env(modelfs_bin, family, tmp_path):
    store = tmp_path / "envstore"
    env = dict(os.environ, MODELFS_STORE=str(store))

    def run(*args):
        return subprocess.run([str(modelfs_bin), *map(str, args)], capture_output=True, env=env,
                              timeout=300)

    r = run("init")
    assert r.returncode == 0, r.stderr
    assert store.is_dir()
    r = run("import", family.path("base"))
    assert r.returncode == 0, r.stderr
    r = run("ls", "--json")
    assert r.returncode == 0, r.stderr
    assert [m["name"] for m in json.loads(r.stdout)] == ["base"]
    r = run("cat", "base/config.json")
    assert r.returncode == 0 and r.stdout == family.bytes_of("base", "config.json")
    # --store takes precedence over / is equivalent to the env var: explicit store sees it too
    assert Modelfs(modelfs_bin, store).ls_models().keys() == {"base"}


# ------------------------------------------------------------------------------------------
# round trip


def test_round_trip_every_model(mfs, family):
    for key in family.models:
        r = mfs.import_(family.path(key), ok=True)
        lines = [l for l in r.stdout.splitlines() if l.strip()]
        assert len(lines) == 1, f"import should print a one-line summary, got:\n{r.stdout}"
    models = mfs.ls_models()
    assert set(models) == {family.name(k) for k in family.models}, sorted(models)
    for key in family.models:
        name = family.name(key)
        expect = {f["path"]: family.bytes_of(key, f["path"]) for f in family.files(key)}
        m = models[name]
        assert m["files"] == len(expect), m
        assert m["logical_bytes"] == family.models[key]["logical_bytes"], m
        assert m["imported_at"], m
        check_model(mfs, name, expect)
    r = mfs.json("verify")
    assert r["damaged"] == []
    assert r["files_checked"] == sum(len(m["files"]) for m in family.models.values())


def test_hf_snapshot_import(mfs, family):
    snap = family.path("hf-cache")
    r = mfs.import_(snap, "--json").json()
    assert r["name"] == "org/tiny"
    assert r["files"] == len(family.files("hf-cache"))
    # bytes are those of the blobs the snapshot symlinks point to
    expect = {}
    for f in family.files("hf-cache"):
        target = (snap / f["path"]).resolve()
        assert target.parent.name == "blobs"
        expect[f["path"]] = target.read_bytes()
    check_model(mfs, "org/tiny", expect)
    assert not any("blobs" in p or p.startswith("..") for p in mfs.ls_files("org/tiny"))


def test_import_hf_repo_dir_means_refs_main(mfs, family):
    """`import models--org--tiny` (the repo dir itself) imports its refs/main snapshot."""
    snap = family.path("hf-cache")
    r = mfs.import_(snap.parent.parent, "--json").json()
    assert r["name"] == "org/tiny"
    check_model(mfs, "org/tiny", expected_files(snap))


def test_symlink_outside_tree(mfs, family, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(family.path("base") / "generation_config.json", d / "generation_config.json")
    os.symlink(family.path("base") / "config.json", d / "config.json")
    os.symlink("generation_config.json", d / "alias.json")  # inside the tree: fine
    before = mfs.snapshot()
    r = mfs.import_(d, ok=False)
    assert "config.json" in r.stderr, r.describe()
    assert_unchanged(mfs, before, "import with a symlink leaving the tree")
    mfs.import_(d, "--follow-symlinks", ok=True)
    check_model(mfs, "m", expected_files(d))


def test_object_paths_absolute_with_relative_store(modelfs_bin, family, tmp_path):
    m = Modelfs(modelfs_bin, Path("relstore"))
    m.run("import", family.path("base"), ok=True, cwd=tmp_path)
    r = m.run("ls", "base", "--json", ok=True, cwd=tmp_path).json()
    for f in r:
        if f["storage"] == "whole":
            assert os.path.isabs(f["object"]), f"`object` must be an absolute path, got {f['object']!r}"


def test_import_single_file(mfs, family):
    src = family.path("base") / "model.safetensors"
    mfs.import_(src, "--name", "single", ok=True)
    check_model(mfs, "single", {"model.safetensors": src.read_bytes()})


def test_import_json_summary(mfs, family):
    r = mfs.import_(family.path("base"), "--json").json()
    assert set(r) >= {"name", "files", "logical_bytes", "new_bytes", "seconds"}, r
    m = family.models["base"]
    assert r["name"] == "base"
    assert r["files"] == len(m["files"])
    assert r["logical_bytes"] == m["logical_bytes"]
    assert 0 < r["new_bytes"] <= m["ideal_bytes"] * 1.005 + slack(len(m["files"])), (r, m["ideal_bytes"])
    assert isinstance(r["seconds"], (int, float)) and r["seconds"] >= 0
    r2 = mfs.import_(family.path("base-copy"), "--json").json()
    assert r2["name"] == "base-copy" and r2["logical_bytes"] == m["logical_bytes"]
    assert r2["new_bytes"] <= slack(len(m["files"])), f"importing an identical copy stored {r2}"


def test_names_with_slashes(mfs, family):
    mfs.import_(family.path("base"), "--name", "org/sub/model", ok=True)
    assert "org/sub/model" in mfs.ls_models()
    assert mfs.cat("org/sub/model/config.json") == family.bytes_of("base", "config.json")
    mfs.run("rm", "org/sub/model", ok=True)
    assert mfs.ls_models() == {}


def test_cat_errors(mfs, family):
    mfs.import_(family.path("base"), ok=True)
    r = mfs.run("cat", "base/no-such-file.json", ok=False)
    assert "no-such-file.json" in r.stderr
    r = mfs.run("cat", "nomodel/config.json", ok=False)
    assert "nomodel" in r.stderr


# ------------------------------------------------------------------------------------------
# dedup


def test_dedup_family_close_to_ideal(mfs, dedup_family, capsys):
    """stored_bytes must be within 0.5 % of the ideal (distinct tensors + distinct non-tensor
    bytes), plus SLACK_PER_FILE (64 KiB) per distinct imported file for filesystem block
    rounding / per-object overhead."""
    fam = dedup_family
    keys = modelfamily.DEDUP_SET
    t0 = time.monotonic()
    for key in keys:
        mfs.import_(fam.path(key), ok=True)
    dt = time.monotonic() - t0
    ideal = fam.ideal(keys)
    du = mfs.du()
    assert set(du) >= {"logical_bytes", "stored_bytes", "models"}, du
    assert du["logical_bytes"] == ideal["logical_bytes"], (du, ideal)
    limit = ideal["ideal_bytes"] * 1.005 + slack(ideal["distinct_files"])
    with capsys.disabled():
        print(f"\n[dedup] logical {ideal['logical_bytes']} ideal {ideal['ideal_bytes']} "
              f"stored {du['stored_bytes']} (stored/ideal {du['stored_bytes'] / ideal['ideal_bytes']:.4f}, "
              f"limit {limit:.0f}); {len(keys)} imports in {dt:.1f}s")
    assert du["stored_bytes"] <= limit, (
        f"stored_bytes {du['stored_bytes']} exceeds ideal {ideal['ideal_bytes']} * 1.005 + "
        f"{slack(ideal['distinct_files'])} slack (ratio {du['stored_bytes'] / ideal['ideal_bytes']:.4f})")
    assert du["stored_bytes"] <= 0.4 * du["logical_bytes"]
    # per-model du entries
    per = {m["name"]: m for m in du["models"]}
    assert set(per) == set(keys)
    for key in keys:
        assert per[key]["logical_bytes"] == fam.models[key]["logical_bytes"], per[key]
        assert set(per[key]) >= {"name", "logical_bytes", "unique_bytes", "shared_bytes"}
    # identical copy: same hashes, nothing unique to either copy
    base, copy = mfs.ls_files("base"), mfs.ls_files("base-copy")
    assert {p: f["hash"] for p, f in base.items()} == {p: f["hash"] for p, f in copy.items()}
    for k in ("base", "base-copy"):
        assert per[k]["unique_bytes"] <= slack(len(base)), per[k]
    # the first import of a safetensors file is kept whole; a shifted fine-tune is a recipe
    assert base["model.safetensors"]["storage"] == "whole", base["model.safetensors"]
    head = mfs.ls_files("ft-head")
    assert head["model.safetensors"]["storage"] == "recipe", head["model.safetensors"]
    # and everything still reads back
    for key in ("ft-head", "ft-last", "torch-bin"):
        check_model(mfs, key, {f["path"]: fam.bytes_of(key, f["path"]) for f in fam.files(key)},
                    check_hash=False)
    assert mfs.run("verify", ok=True).returncode == 0


def test_identical_file_stored_once(mfs, family):
    mfs.import_(family.path("base"), ok=True)
    s1 = mfs.du()["stored_bytes"]
    mfs.import_(family.path("base-copy"), ok=True)
    s2 = mfs.du()["stored_bytes"]
    n = len(family.files("base"))
    assert s2 - s1 <= slack(n), f"importing an identical copy grew the store by {s2 - s1} bytes"
    a, b = mfs.ls_files("base"), mfs.ls_files("base-copy")
    for p in a:
        assert a[p]["hash"] == b[p]["hash"]
    # the identical config.json inside another, different model is stored once too
    one = Path(mfs.store).parent / "only-config"
    one.mkdir()
    shutil.copy(family.path("base") / "config.json", one / "config.json")
    mfs.import_(one, ok=True)
    assert mfs.du()["stored_bytes"] - s2 <= slack(1)
    assert mfs.ls_files("only-config")["config.json"]["hash"] == a["config.json"]["hash"]


def _import_json(mfs, path, name):
    return mfs.import_(path, "--name", name, "--json").json()


@pytest.mark.parametrize("order", ["onnx-first", "renamed-first"])
def test_identical_bytes_one_content_whatever_the_name(mfs, tmp_path, order):
    """The content key is defined over the chunking the bytes alone decide
    (store-format §3): an ONNX file is cut at its initializers only because of
    its .onnx name, yet the same bytes under another name (cut by CDC) must be
    the same stored content, in either import order."""
    import numpy as np  # noqa: PLC0415

    w = modelfamily.onnx_weights(np.random.default_rng(7))
    onnx_dir, renamed_dir = tmp_path / "as-onnx", tmp_path / "renamed"
    modelfamily.write_onnx(onnx_dir / "model.onnx", w, external=False)
    renamed_dir.mkdir()
    shutil.copy(onnx_dir / "model.onnx", renamed_dir / "weights.dat")
    # the two names really are chunked differently when imported alone
    alone = {}
    for d, f in ((onnx_dir, "model.onnx"), (renamed_dir, "weights.dat")):
        m = Modelfs(mfs.bin, tmp_path / f"alone-{d.name}")
        m.import_(d, "--name", "x", ok=True)
        alone[f] = m.ls_files("x")[f]
    assert alone["model.onnx"]["chunks"] != alone["weights.dat"]["chunks"], alone
    assert alone["model.onnx"]["hash"] == alone["weights.dat"]["hash"], alone

    first, second = [(onnx_dir, "a"), (renamed_dir, "b")][:: 1 if order == "onnx-first" else -1]
    _import_json(mfs, *first)
    r = _import_json(mfs, *second)
    assert r["identical_files"] == 1 and r["new_bytes"] == 0, r
    a, b = mfs.ls_files("a")["model.onnx"], mfs.ls_files("b")["weights.dat"]
    assert a["hash"] == b["hash"], (a, b)
    assert mfs.cat("a/model.onnx") == mfs.cat("b/weights.dat") == (onnx_dir / "model.onnx").read_bytes()
    assert mfs.json("verify")["damaged"] == []


def test_onnx_external_data_alone_is_the_same_content(mfs, tmp_path):
    """External data is cut at the tensors its .onnx names; imported without its
    .onnx the same bytes are cut by CDC, and still are one content."""
    import numpy as np  # noqa: PLC0415

    with_model, alone = tmp_path / "with-model", tmp_path / "data-alone"
    modelfamily.write_onnx(with_model / "model.onnx", modelfamily.onnx_weights(np.random.default_rng(8)),
                           external=True)
    alone.mkdir()
    shutil.copy(with_model / "model.onnx.data", alone / "model.onnx.data")
    _import_json(mfs, with_model, "m")
    r = _import_json(mfs, alone, "d")
    assert r["identical_files"] == 1 and r["new_bytes"] == 0, r
    assert mfs.ls_files("m")["model.onnx.data"]["hash"] == mfs.ls_files("d")["model.onnx.data"]["hash"]
    assert mfs.json("verify")["damaged"] == []


def _save_safetensors(path: Path, arrays) -> Path:
    from safetensors.numpy import save_file  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path))
    return path


def test_known_chunk_is_recognised_by_comparing_bytes(mfs, tmp_path):
    """A chunk is taken for a stored one only if every byte matches: a tensor
    piece that differs only in its middle has the same fingerprint (first and
    last 4 KiB, store-format §5) as the stored piece, and must still be stored."""
    import numpy as np  # noqa: PLC0415

    w = np.random.default_rng(3).integers(0, 256, size=4 << 20, dtype=np.uint8)  # 4 pieces of 1 MiB
    a = _save_safetensors(tmp_path / "a" / "model.safetensors", {"w": w})
    w2 = w.copy()
    w2[(1 << 20) + (1 << 19)] ^= 0xFF  # the middle byte of the second piece
    b = _save_safetensors(tmp_path / "b" / "model.safetensors", {"w": w2})
    _import_json(mfs, a.parent, "a")
    r = _import_json(mfs, b.parent, "b")
    assert r["new_bytes"] == 1 << 20, f"exactly the changed 1 MiB piece must be stored: {r}"
    assert r["recognised_bytes"] >= 3 << 20, f"the 3 unchanged pieces are resident and should be recognised: {r}"
    assert mfs.cat("b/model.safetensors") == b.read_bytes()
    assert mfs.cat("a/model.safetensors") == a.read_bytes()
    assert mfs.json("verify")["damaged"] == []


def test_known_chunks_are_hashed_when_the_store_is_not_in_memory(mfs, tmp_path):
    """With the stored copies evicted from the page cache, known chunks are found
    by BLAKE3 (no disk reads to compare) and deduplicate just the same."""
    import numpy as np  # noqa: PLC0415

    w = np.random.default_rng(4).integers(0, 256, size=3 << 20, dtype=np.uint8)
    a = _save_safetensors(tmp_path / "a" / "model.safetensors", {"w": w})
    b = _save_safetensors(tmp_path / "b" / "model.safetensors", {"renamed.w": w})  # other header
    _import_json(mfs, a.parent, "a")
    evict_page_cache(mfs.store / "objects")
    r = _import_json(mfs, b.parent, "b")
    assert r["identical_files"] == 0 and r["recognised_bytes"] == 0, r
    assert r["new_bytes"] < 64 << 10, f"only the new header should be stored: {r}"
    assert mfs.cat("b/model.safetensors") == b.read_bytes()
    assert mfs.json("verify")["damaged"] == []


def test_upgrade_from_schema_1(mfs, family):
    """A store written before content keys (schema 1: contents keyed by the
    BLAKE3 of the whole file) is refused with a pointer to `modelfs upgrade`,
    which re-keys it in place; files, dedup and load traces survive."""
    import sqlite3  # noqa: PLC0415

    for key in ("base", "ft-last"):
        mfs.import_(family.path(key), "--name", key, ok=True)
    before = {k: mfs.ls_files(k) for k in ("base", "ft-last")}
    du_before = mfs.du()
    # Turn it into the schema-1 store the previous modelfs wrote.
    v1 = {}
    for key, files in before.items():
        for rel, f in files.items():
            v1[f["hash"]] = blake3.blake3(mfs.cat(f"{key}/{rel}")).digest()
    a_key = next(iter(before["base"].values()))["hash"]
    old_trace = mfs.store / "traces" / v1[a_key].hex()[:2] / v1[a_key].hex()
    old_trace.parent.mkdir(parents=True)
    old_trace.write_bytes(b"a trace named by the old key")
    db = sqlite3.connect(mfs.store / "catalog.db")
    with db:
        for new, old in v1.items():
            db.execute("UPDATE contents SET hash = ? WHERE hash = ?", (old, bytes.fromhex(new)))
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.execute("DROP INDEX chunks_by_fast")
        db.execute("ALTER TABLE chunks DROP COLUMN fast")  # schema 1 had no fingerprints
    db.close()

    r = mfs.run("ls", ok=False)
    assert "schema version 1" in r.stderr and "modelfs upgrade" in r.stderr, r.describe()
    rep = mfs.json("upgrade")
    assert (rep["from_version"], rep["to_version"]) == (1, 2), rep
    assert rep["contents"] == len(v1) and rep["traces_renamed"] == 1, rep
    assert not old_trace.exists()
    assert (mfs.store / "traces" / a_key[:2] / a_key).read_bytes() == b"a trace named by the old key"
    assert {k: mfs.ls_files(k) for k in ("base", "ft-last")} == before
    without_catalog_size = lambda du: {k: v for k, v in du.items() if k != "metadata_bytes"}  # noqa: E731
    assert without_catalog_size(mfs.du()) == without_catalog_size(du_before)
    assert mfs.json("verify")["damaged"] == []
    for key in ("base", "ft-last"):
        check_model(mfs, key, expected_files(family.path(key)))
    again = mfs.json("upgrade")
    assert (again["from_version"], again["contents"]) == (2, 0), again
    # the fingerprints were filled in: a copy is recognised by comparing bytes
    r = _import_json(mfs, family.path("base-copy"), "base-copy")
    assert r["identical_files"] == len(before["base"]) and r["new_bytes"] == 0, r
    assert r["recognised_bytes"] > 0, r


# ------------------------------------------------------------------------------------------
# ls / rm / gc / replace


def test_ls(mfs, family):
    assert mfs.ls_models() == {}
    for key in ("base", "gguf-model"):
        mfs.import_(family.path(key), ok=True)
    models = mfs.ls_models()
    assert set(models) == {"base", "gguf-model"}
    for key in ("base", "gguf-model"):
        assert models[key]["files"] == len(family.files(key))
        assert models[key]["logical_bytes"] == family.models[key]["logical_bytes"]
    plain = mfs.run("ls", ok=True).stdout
    assert "base" in plain and "gguf-model" in plain
    files = mfs.ls_files("gguf-model")
    assert set(files) == {"model.gguf"}
    mfs.run("ls", "no-such-model", ok=False)
    mfs.run("verify", "no-such-model", ok=False)


def test_rm_keeps_other_models(mfs, family):
    for key in ("base", "ft-last", "ft-head"):
        mfs.import_(family.path(key), ok=True)
    mfs.run("rm", "base", ok=True)
    assert set(mfs.ls_models()) == {"ft-last", "ft-head"}
    mfs.run("cat", "base/config.json", ok=False)
    for key in ("ft-last", "ft-head"):
        check_model(mfs, key, {f["path"]: family.bytes_of(key, f["path"]) for f in family.files(key)},
                    check_hash=False)
    mfs.run("rm", "base", ok=False)  # already gone
    mfs.run("verify", ok=True)


def test_gc_after_removing_everything(mfs, family):
    for key in ("base", "ft-head", "nested"):
        mfs.import_(family.path(key), ok=True)
    assert mfs.du()["stored_bytes"] > family.models["base"]["logical_bytes"] * 0.9
    for key in ("base", "ft-head", "nested"):
        mfs.run("rm", key, ok=True)
    r = mfs.run("gc", "--json", ok=True)
    r.json()
    du = mfs.du()
    assert du["stored_bytes"] <= 256 * 1024, du
    assert du["logical_bytes"] == 0 and du["models"] == []
    left = sum(p.stat().st_size for p in (mfs.store / "objects").rglob("*") if p.is_file())
    assert left <= 256 * 1024, f"{left} bytes of object files remain under objects/ after rm all + gc"
    mfs.run("verify", ok=True)


def test_gc_keeps_shared_data(mfs, family):
    mfs.import_(family.path("base"), ok=True)
    mfs.import_(family.path("ft-last"), ok=True)
    before = mfs.du()["stored_bytes"]
    mfs.run("rm", "base", ok=True)
    mfs.run("gc", ok=True)
    after = mfs.du()["stored_bytes"]
    m = family.models["ft-last"]
    assert after < before, (before, after)
    assert after <= m["ideal_bytes"] * 1.005 + slack(len(m["files"])), (
        f"after rm base + gc the store keeps {after} bytes, but ft-last alone needs {m['ideal_bytes']}")
    assert mfs.json("verify")["damaged"] == []
    check_model(mfs, "ft-last", {f["path"]: family.bytes_of("ft-last", f["path"]) for f in m["files"]},
                check_hash=False)
    mfs.run("gc", ok=True)  # idempotent
    mfs.run("verify", "ft-last", ok=True)


def test_replace(mfs, family):
    mfs.import_(family.path("base"), "--name", "m", ok=True)
    before = mfs.snapshot()
    r = mfs.import_(family.path("ft-last"), "--name", "m", ok=False)
    assert "m" in r.stderr
    assert_unchanged(mfs, before, "import of an existing name without --replace")
    mfs.import_(family.path("ft-last"), "--name", "m", "--replace", ok=True)
    assert set(mfs.ls_models()) == {"m"}
    check_model(mfs, "m", expected_files(family.path("ft-last")), check_hash=False)
    mfs.run("gc", ok=True)
    mfs.run("verify", ok=True)
    check_model(mfs, "m", expected_files(family.path("ft-last")), check_hash=False)


# ------------------------------------------------------------------------------------------
# verify / corruption


@pytest.fixture
def damaged_store(mfs, family, tmp_path):
    """base (a private copy) and gguf-model imported; returns (mfs, whole-object files of base)."""
    src = copy_model(family.path("base"), tmp_path / "src" / "base")
    mfs.import_(src, ok=True)
    mfs.import_(copy_model(family.path("gguf-model"), tmp_path / "src" / "gguf-model"), ok=True)
    r = mfs.json("verify")
    assert r["damaged"] == [] and r["files_checked"] == len(family.files("base")) + 1
    whole = {p: f for p, f in mfs.ls_files("base").items() if f["storage"] == "whole"}
    assert "model.safetensors" in whole, "the first import of base/model.safetensors should be 'whole'"
    for p, f in whole.items():
        assert os.stat(f["object"]).st_ino != os.stat(src / p).st_ino, "object is the source file itself"
    return mfs, whole


def _pick(whole, *prefs):
    for p in prefs:
        if p in whole:
            return p, whole[p]["object"]
    p = sorted(whole)[0]
    return p, whole[p]["object"]


def _assert_damage_reported(mfs, path):
    r = mfs.run("verify")
    assert r.returncode == 1, f"verify of a damaged store should exit 1:\n{r.describe()}"
    assert f"base/{path}" in r.output, f"verify output does not name base/{path}:\n{r.describe()}"
    assert "gguf-model" not in r.output, f"undamaged gguf-model reported:\n{r.describe()}"
    line = next(l for l in r.output.splitlines() if f"base/{path}" in l)
    assert len(line.strip()) > len(f"base/{path}") + 8, f"no reason given for base/{path}: {line!r}"
    j = mfs.run("verify", "--json")
    assert j.returncode == 1, j.describe()
    d = j.json()
    assert {"model": "base", "path": path} in [{"model": x["model"], "path": x["path"]} for x in d["damaged"]], d
    assert all(x["model"] == "base" for x in d["damaged"]), d
    assert all(x.get("reason") for x in d["damaged"]), d
    assert mfs.run("verify", "gguf-model").returncode == 0
    assert mfs.run("verify", "base").returncode == 1
    c = mfs.run("cat", f"base/{path}")
    assert c.returncode != 0, f"`cat` of a damaged file must fail, not print bad bytes:\n{c.describe()}"


def _flip(obj: str):
    os.chmod(obj, 0o644)
    size = os.path.getsize(obj)
    with open(obj, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x40]))


def test_verify_detects_flipped_byte(damaged_store):
    mfs, whole = damaged_store
    path, obj = _pick(whole, "config.json", "tokenizer.json")
    _flip(obj)
    _assert_damage_reported(mfs, path)


def test_verify_detects_flipped_byte_in_tensor_object(damaged_store):
    mfs, whole = damaged_store
    _flip(whole["model.safetensors"]["object"])
    _assert_damage_reported(mfs, "model.safetensors")


def test_verify_detects_truncation(damaged_store):
    mfs, whole = damaged_store
    obj = whole["model.safetensors"]["object"]
    os.chmod(obj, 0o644)
    os.truncate(obj, os.path.getsize(obj) // 2)
    _assert_damage_reported(mfs, "model.safetensors")


def test_verify_detects_deleted_object(damaged_store):
    mfs, whole = damaged_store
    path, obj = _pick(whole, "tokenizer.json", "config.json")
    os.remove(obj)
    _assert_damage_reported(mfs, path)


def test_verify_detects_damaged_chunk_of_recipe(mfs, family, tmp_path):
    """Damage below a recipe file: delete/flip every object file not referenced as 'whole'
    by some model -> the recipe-stored model must be reported."""
    mfs.import_(copy_model(family.path("base"), tmp_path / "b"), "--name", "base", ok=True)
    mfs.import_(copy_model(family.path("ft-head"), tmp_path / "h"), "--name", "ft-head", ok=True)
    head = mfs.ls_files("ft-head")
    assert head["model.safetensors"]["storage"] == "recipe"
    whole_objs = {os.path.realpath(f["object"]) for n in ("base", "ft-head")
                  for f in mfs.ls_files(n).values() if f["storage"] == "whole"}
    others = [p for p in (mfs.store / "objects").rglob("*")
              if p.is_file() and os.path.realpath(p) not in whole_objs and p.stat().st_size > 0]
    assert others, "ft-head's new tensors should be in a packed object of their own"
    for p in others:
        _flip(str(p))
    r = mfs.run("verify")
    assert r.returncode == 1, r.describe()
    assert "ft-head/model.safetensors" in r.output, r.describe()


# ------------------------------------------------------------------------------------------
# bad input: clean failure, store unchanged


@pytest.fixture
def seeded(mfs, family):
    mfs.import_(family.path("gguf-model"), ok=True)
    return mfs


def _fails_cleanly(mfs, args, mention, what=None):
    before = mfs.snapshot()
    r = mfs.run(*args, ok=False, timeout=60)
    assert r.returncode == 1, "errors must exit with status 1:\n" + r.describe()
    mentions = [mention] if isinstance(mention, str) else list(mention)
    assert any(m.lower() in r.stderr.lower() for m in mentions), (
        f"error message should mention one of {mentions}:\n{r.describe()}")
    assert_unchanged(mfs, before, what or " ".join(map(str, args)))
    return r


def test_import_nonexistent_path(seeded, tmp_path):
    p = tmp_path / "does" / "not" / "exist"
    _fails_cleanly(seeded, ["import", p, "--name", "x"], str(p))


def test_import_dir_with_fifo(seeded, family, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(family.path("base") / "config.json", d / "config.json")
    os.mkfifo(d / "weights.bin")  # opening it for reading would block forever
    _fails_cleanly(seeded, ["import", d, "--name", "x"], "weights.bin")


def test_import_dir_with_dangling_symlink(seeded, family, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(family.path("base") / "config.json", d / "config.json")
    os.symlink("does-not-exist.safetensors", d / "model.safetensors")
    _fails_cleanly(seeded, ["import", d, "--name", "x"], "model.safetensors")


def test_import_dangling_symlink_file(seeded, tmp_path):
    link = tmp_path / "link.safetensors"
    os.symlink(tmp_path / "gone.safetensors", link)
    _fails_cleanly(seeded, ["import", link, "--name", "x"], ("link.safetensors", "gone.safetensors"))


def test_import_unreadable_file(modelfs_bin, family):
    """A file the importing user cannot read: clear error naming it, store unchanged.
    Root reads mode-000 files, so as root the import runs as user nobody (setpriv)."""
    prefix = []
    if IS_ROOT:
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    work = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="modelfs-unreadable-"))
    try:
        os.chmod(work, 0o755)
        store = work / "store"
        store.mkdir()
        d = work / "m"
        d.mkdir()
        shutil.copy(family.path("base") / "config.json", d / "config.json")
        shutil.copy(family.path("base") / "tokenizer.json", d / "tokenizer.json")
        os.chmod(d / "tokenizer.json", 0)
        if IS_ROOT:
            os.chown(store, 65534, 65534)
        user = Modelfs(modelfs_bin, store, prefix)
        shutil.copytree(family.path("gguf-model"), work / "seed")
        user.run("import", work / "seed", "--name", "seed", ok=True)
        _fails_cleanly(user, ["import", d, "--name", "x"], "tokenizer.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)


BAD_NAMES = ["..", "a/../b", "../escape", "a/..", "/abs", "/", "a//b", "", "a\x01b", "a\nb", "a\x7fb"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=[repr(b) for b in BAD_NAMES])
def test_import_invalid_name(seeded, family, bad):
    _fails_cleanly(seeded, ["import", family.path("base"), "--name", bad], "name")
    # nothing outside the store was created by a traversal name
    assert not (seeded.store.parent / "escape").exists()


def test_import_duplicate_name(seeded, family):
    _fails_cleanly(seeded, ["import", family.path("gguf-model")], "gguf-model",
                   "re-import of an existing name without --replace")


# ------------------------------------------------------------------------------------------
# malformed model files: a file whose extension or magic says it is a model (safetensors,
# GGUF, a torch zip, ONNX) and whose header does not parse is refused, naming it, with the
# store unchanged; --allow-malformed stores it by content-defined chunking. Files that only
# resemble a format, or are none, are stored as before (docs/store-format.md §8.1).


def _torch_pt(path: Path):
    """A checkpoint as people write one: torch.save of a small state dict."""
    import torch
    g = torch.Generator().manual_seed(3)
    torch.save({"w": torch.randn(256, 256, generator=g), "b": torch.randn(256, generator=g)},
               str(path))
    return path.read_bytes()


def _inside_one_entry(zip_bytes: bytes, garbage: bytes) -> bytes:
    """zip_bytes with its largest entry's data overwritten (headers and directory intact)."""
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as z:
        big = max(z.infolist(), key=lambda i: i.file_size)
        assert big.compress_type == zipfile.ZIP_STORED and big.file_size > 2 * 4096, big
        # the local header: 30 bytes, the name, the extra field; then the data
        name_len, extra_len = struct.unpack("<HH", zip_bytes[big.header_offset + 26:big.header_offset + 30])
        data = big.header_offset + 30 + name_len + extra_len
    n = min(len(garbage), big.file_size - 2048)
    return zip_bytes[:data + 1024] + garbage[:n] + zip_bytes[data + 1024 + n:]


def _garbage_cases(family, tmp_path, rng):
    st = (family.path("base") / "model.safetensors").read_bytes()
    tb = (family.path("torch-bin") / "pytorch_model.bin").read_bytes()
    gg = (family.path("gguf-model") / "model.gguf").read_bytes()
    ox = (family.path("onnx-model") / "model.onnx").read_bytes()
    pt = _torch_pt(tmp_path / "written.pt")
    rnd = rng.randbytes(1 << 20)
    good_hdr_len = struct.unpack("<Q", st[:8])[0]
    hdr = json.loads(st[8:8 + good_hdr_len])
    names = [n for n in hdr if n != "__metadata__"]
    # two tensors claiming the same byte range
    alias = dict(hdr)
    alias[names[1]] = dict(hdr[names[1]], data_offsets=hdr[names[0]]["data_offsets"])
    alias[names[1]]["shape"] = hdr[names[0]]["shape"]
    alias_hdr = json.dumps(alias).encode()
    alias_hdr += b" " * (-len(alias_hdr) % 8)

    def cut(b):
        return b[: len(b) * 6 // 10]

    return {
        # name: (file name, bytes, refused, warning required when stored)
        "truncated-safetensors": ("model.safetensors", cut(st), True, True),
        "truncated-in-header": ("model.safetensors", st[:100], True, True),
        "garbage-safetensors": ("model.safetensors", rnd, True, True),
        "huge-header-len": ("model.safetensors", struct.pack("<Q", 1 << 60) + b'{"x":1}' + rnd, True, True),
        "bad-json-header": ("model.safetensors", struct.pack("<Q", 64) + rnd[:64] + st[8 + good_hdr_len:][:1 << 20], True, True),
        "aliased-offsets": ("model.safetensors", struct.pack("<Q", len(alias_hdr)) + alias_hdr + st[8 + good_hdr_len:], True, True),
        "empty-safetensors": ("model.safetensors", b"", True, True),
        "truncated-torch-zip": ("pytorch_model.bin", cut(tb), True, True),
        "truncated-pt": ("model.pt", cut(pt), True, True),
        "truncated-pth": ("weights.pth", cut(pt), True, True),
        "truncated-gguf": ("model.gguf", cut(gg), True, True),
        "gguf-magic-as-bin": ("ggml-model.bin", cut(gg), True, True),
        "truncated-onnx": ("model.onnx", cut(ox), True, True),
        # the header parses, so the damage cannot be seen: stored, its tensors found
        "torch-zip-garbage-data": ("pytorch_model.bin", _inside_one_entry(tb, rnd), False, False),
        # no format declared: random bytes named .bin, a safetensors header without the name
        "garbage-bin": ("pytorch_model.bin", rnd, False, False),
        "safetensors-bytes-unnamed": ("weights", st[:-1], False, True),
        "garbage-json": ("config.json", b'{"model_type": ' + rnd[:5000], False, False),
        "garbage-txt": ("notes.txt", rnd[:20000], False, False),
    }


GARBAGE = ["truncated-safetensors", "truncated-in-header", "garbage-safetensors", "huge-header-len",
           "bad-json-header", "aliased-offsets", "empty-safetensors", "truncated-torch-zip",
           "truncated-pt", "truncated-pth", "truncated-gguf", "gguf-magic-as-bin", "truncated-onnx",
           "torch-zip-garbage-data", "garbage-bin", "safetensors-bytes-unnamed", "garbage-json",
           "garbage-txt"]


def _garbage_dir(family, tmp_path, case):
    fname, data, refused, warn = _garbage_cases(family, tmp_path, random.Random(case))[case]
    d = tmp_path / case
    d.mkdir()
    (d / fname).write_bytes(data)
    for extra in ("config.json", "tokenizer.json"):
        if extra != fname:
            shutil.copy(family.path("base") / extra, d / extra)
    return d, fname, data, refused, warn


@pytest.mark.parametrize("case", GARBAGE)
def test_malformed_model_files(seeded, family, tmp_path, case):
    mfs = seeded
    d, fname, data, refused, warn = _garbage_dir(family, tmp_path, case)
    expect = expected_files(d)
    if refused:
        before = mfs.snapshot()
        r = mfs.import_(d, ok=False, timeout=120)
        assert r.returncode == 1, r.describe()
        assert str(d / fname) in r.stderr, f"the error must name {d / fname} ({case}):\n{r.describe()}"
        assert "not a valid" in r.stderr and "--allow-malformed" in r.stderr, r.describe()
        assert_unchanged(mfs, before, f"import of a malformed {fname} ({case})")
        assert case not in mfs.ls_models()
        r = mfs.import_(d, "--allow-malformed", ok=True, timeout=120)
        assert fname in r.stderr, f"expected a warning on stderr naming {fname} ({case}):\n{r.describe()}"
        assert mfs.ls_files(case)[fname]["format"] is None, mfs.ls_files(case)[fname]
    else:
        r = mfs.import_(d, ok=None, timeout=120)
        assert r.returncode == 0, f"{fname} ({case}) declares no model format, so it must be stored:\n{r.describe()}"
        if warn:
            assert fname in r.stderr, f"expected a warning on stderr naming {fname} ({case}):\n{r.describe()}"
        else:
            assert "warning" not in r.stderr, r.describe()
    check_model(mfs, case, expect, check_hash=len(data) <= ONE_CHUNK_MAX)
    mfs.run("verify", ok=True)


def test_torch_zip_with_garbage_data_keeps_its_tensors(mfs, family, tmp_path):
    """A control for the refusals: damage the header cannot show is not a parse failure, and the
    file keeps its tensor-aligned chunking."""
    d, fname, _, _, _ = _garbage_dir(family, tmp_path, "torch-zip-garbage-data")
    mfs.import_(d, ok=True)
    assert mfs.ls_files("torch-zip-garbage-data")[fname]["format"] == "torch"


def test_every_broken_model_file_is_named(seeded, family, tmp_path):
    """A half-finished download of a sharded model: both broken shards are named, the good one
    and everything else is not stored either."""
    d = copy_model(family.path("resharded"), tmp_path / "sharded")
    shards = sorted(p for p in d.iterdir() if p.suffix == ".safetensors")
    assert len(shards) >= 3, shards
    os.truncate(shards[0], shards[0].stat().st_size // 3)
    shards[-1].write_bytes(b"")
    r = _fails_cleanly(seeded, ["import", d], shards[0].name)
    for p in (shards[0], shards[-1]):
        assert str(p) in r.stderr, f"{p} not named:\n{r.describe()}"
    assert str(shards[1]) not in r.stderr, r.describe()
    assert "2 model files" in r.stderr, r.describe()


def test_broken_file_in_hf_snapshot_is_named_by_its_snapshot_path(seeded, family, tmp_path):
    """The blobs of a Hugging Face cache are named by hash; the error names the file the user
    knows, under snapshots/."""
    repo = tmp_path / "hub" / family.path("hf-cache").parent.parent.name
    shutil.copytree(family.path("hf-cache").parent.parent, repo, symlinks=True)
    snap = repo / "snapshots" / family.path("hf-cache").name
    st = next(p for p in snap.iterdir() if p.name.endswith(".safetensors"))
    blob = st.resolve()
    os.truncate(blob, blob.stat().st_size // 2)
    r = _fails_cleanly(seeded, ["import", snap], str(st))
    assert blob.name not in r.stderr, r.describe()


@pytest.mark.parametrize("layout", ["empty", "only-dirs"])
def test_import_of_nothing_is_an_error(seeded, tmp_path, layout):
    d = tmp_path / layout
    d.mkdir()
    if layout == "only-dirs":
        (d / "a" / "b").mkdir(parents=True)
    r = _fails_cleanly(seeded, ["import", d, "--name", "x"], "nothing to import in")
    assert str(d) in r.stderr, r.describe()


def test_import_and_rm_help_mention_their_flags(modelfs_bin):
    for cmd, flags in (("import", ["--allow-malformed"]), ("rm", ["--recursive", "--dry-run", "--json"])):
        r = subprocess.run([str(modelfs_bin), cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for f in flags:
            assert f in r.stdout, f"`modelfs {cmd} --help` does not mention {f}:\n{r.stdout}"


# ------------------------------------------------------------------------------------------
# rm: all or nothing, --dry-run, namespaces


@pytest.fixture
def named(mfs, family):
    """base as org/a, gguf-model as org/b, onnx-model as org2/c (org2 is not under org/)."""
    for key, name in (("base", "org/a"), ("gguf-model", "org/b"), ("onnx-model", "org2/c")):
        mfs.import_(family.path(key), "--name", name, ok=True)
    return mfs


def test_rm_is_all_or_nothing(named):
    r = _fails_cleanly(named, ["rm", "org/a", "no-such-model", "org2/c"], "no-such-model")
    assert "nothing was removed" in r.stderr, r.describe()
    assert "org/a" not in r.stderr and "org2/c" not in r.stderr, r.describe()  # only the bad name is blamed
    r = named.run("rm", "org/a", "org2/c", ok=True)
    assert "org/a" in r.stdout and "org2/c" in r.stdout, r.describe()
    assert set(named.ls_models()) == {"org/b"}
    named.run("verify", ok=True)


def test_rm_dry_run_removes_nothing(named):
    before = named.snapshot()
    r = named.run("rm", "org/a", "org2/c", "--dry-run", ok=True)
    assert "would remove org/a" in r.stdout and "would remove org2/c" in r.stdout, r.describe()
    assert_unchanged(named, before, "rm --dry-run")
    j = named.run("rm", "org/", "--recursive", "--dry-run", "--json", ok=True).json()
    assert j["dry_run"] is True
    assert [m["name"] for m in j["removed"]] == ["org/a", "org/b"], j
    assert_unchanged(named, before, "rm --recursive --dry-run --json")
    # a dry run checks its names like a real one
    _fails_cleanly(named, ["rm", "org/a", "nope", "--dry-run"], "nope")


def test_rm_namespace(named, family):
    for arg in ("org", "org/"):
        r = _fails_cleanly(named, ["rm", arg], "--recursive")
        assert "namespace" in r.stderr and "2 models" in r.stderr, r.describe()
    _fails_cleanly(named, ["rm", "or", "--recursive"], 'no model named "or"')  # whole components only
    _fails_cleanly(named, ["rm", "/", "--recursive"], "invalid model name")  # never everything at once
    j = named.run("rm", "org/", "--recursive", "--json", ok=True).json()
    assert j["dry_run"] is False
    assert [(m["name"], m["files"]) for m in j["removed"]] == [
        ("org/a", len(family.files("base"))), ("org/b", len(family.files("gguf-model")))], j
    assert set(named.ls_models()) == {"org2/c"}
    named.run("cat", "org/a/config.json", ok=False)
    named.run("gc", ok=True)
    named.run("verify", ok=True)
    check_model(named, "org2/c", expected_files(family.path("onnx-model")))


# ------------------------------------------------------------------------------------------
# crash consistency


@pytest.mark.crash
def test_sigkill_during_import(modelfs_bin, family, tmp_path, new_store, capsys):
    crash_mib = float(os.environ.get("MODELFS_TEST_CRASH_MIB", "32"))
    kills = int(os.environ.get("MODELFS_TEST_KILLS", "24"))
    b_dir = tmp_path / "B"
    desc_b = modelfamily.write_single_model(b_dir, base_mib=crash_mib, seed=4242)
    b_bytes = expected_files(b_dir)
    a_dir = family.path("base")
    a_bytes = expected_files(a_dir)

    # how long does the import of B take (after A), in a scratch store?
    scratch = new_store()
    scratch.import_(a_dir, "--name", "A", ok=True)
    t0 = time.monotonic()
    scratch.import_(b_dir, "--name", "B", ok=True)
    duration = time.monotonic() - t0
    shutil.rmtree(scratch.store)

    mfs = new_store()
    mfs.import_(a_dir, "--name", "A", ok=True)
    rng = random.Random(20240607)
    delays = [(i + rng.random()) / kills * duration * 1.15 for i in range(kills)]
    rng.shuffle(delays)
    log = []
    for n, delay in enumerate(delays):
        errf = tmp_path / f"import-{n}.stderr"
        with open(errf, "wb") as err:
            p = subprocess.Popen(mfs.argv("import", b_dir, "--name", "B"), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err)
            time.sleep(delay)
            killed = p.poll() is None
            if killed:
                p.kill()  # SIGKILL
            rc = p.wait()
        ctx = f"kill #{n} at {delay:.3f}s of ~{duration:.3f}s (killed={killed}, rc={rc})"
        if not killed:
            assert rc == 0, f"{ctx}: import failed on its own:\n{errf.read_text()}"
        r = mfs.run("verify")
        assert r.returncode == 0, f"{ctx}: verify after SIGKILL failed:\n{r.describe()}"
        for rel, data in a_bytes.items():
            assert mfs.cat(f"A/{rel}") == data, f"{ctx}: A/{rel} changed"
        models = mfs.ls_models()
        assert "A" in models, ctx
        if "B" in models:
            # only acceptable if the import got past its commit point: B must be complete
            assert models["B"]["files"] == len(b_bytes), f"{ctx}: B listed incomplete: {models['B']}"
            files = mfs.ls_files("B")
            assert sorted(files) == sorted(b_bytes), ctx
            for rel, data in b_bytes.items():
                assert mfs.cat(f"B/{rel}") == data, f"{ctx}: listed B/{rel} is not byte-exact"
            mfs.run("rm", "B", ok=True)
            outcome = "committed"
        else:
            assert killed, f"{ctx}: import exited 0 but B is not listed"
            outcome = "rolled-back"
        r = mfs.run("gc")
        assert r.returncode == 0, f"{ctx}: gc after SIGKILL failed:\n{r.describe()}"
        log.append((round(delay, 3), outcome))

    with capsys.disabled():
        print(f"\n[crash] B import ~{duration:.2f}s; outcomes: "
              f"{sum(o == 'rolled-back' for _, o in log)} rolled back, "
              f"{sum(o == 'committed' for _, o in log)} committed")
    assert sum(o == "rolled-back" for _, o in log) >= min(5, kills // 2), (
        f"too few kills landed inside the import to test anything: {sorted(log)}")

    # after all that: B imports fine, everything verifies, and gc left no crash debris
    mfs.import_(b_dir, "--name", "B", ok=True)
    for rel, data in b_bytes.items():
        assert mfs.cat(f"B/{rel}") == data
    mfs.run("verify", ok=True)
    mfs.run("gc", ok=True)
    ideal = modelfamily._ideal([family.models["base"], desc_b])
    stored = mfs.du()["stored_bytes"]
    assert stored <= ideal["ideal_bytes"] * 1.005 + slack(ideal["distinct_files"]), (
        f"store holds {stored} bytes after crashes + gc; ideal for A+B is {ideal['ideal_bytes']}")


# ------------------------------------------------------------------------------------------
# concurrency: parallel imports and gc on one store


def test_parallel_imports_and_gc(mfs, family, tmp_path):
    """Imports of models sharing tensors, racing each other and a gc loop, must all end
    byte-exact (or, if the store refuses concurrent writers, fail cleanly naming the lock)."""
    keys = ["base", "ft-head", "ft-last", "resharded"]
    procs = {}
    for k in keys:
        procs[k] = subprocess.Popen(mfs.argv("import", family.path(k)), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gcs = []
    while any(p.poll() is None for p in procs.values()):
        gcs.append(mfs.run("gc").returncode)
    done = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        if p.returncode == 0:
            done[k] = True
        else:
            assert p.returncode == 1 and any(w in err.decode().lower() for w in ("lock", "busy", "running")), (
                f"concurrent import of {k} failed unexpectedly (rc {p.returncode}): {err.decode()}")
    assert all(rc == 0 or rc == 1 for rc in gcs), gcs
    assert done, "every concurrent import failed"
    assert set(mfs.ls_models()) == set(done)
    mfs.run("gc", ok=True)
    mfs.run("verify", ok=True)
    for k in done:
        check_model(mfs, k, {f["path"]: family.bytes_of(k, f["path"]) for f in family.files(k)},
                    check_hash=False)


# ------------------------------------------------------------------------------------------
# which store: created where, refused where


def test_new_store_is_announced_and_foreign_directories_refused(modelfs_bin, family, tmp_path):
    fresh = Modelfs(modelfs_bin, tmp_path / "fresh-store")
    r = fresh.import_(family.path("gguf-model"), ok=True)
    assert f"created a new store at {tmp_path / 'fresh-store'}" in r.stderr, r.describe()
    again = fresh.import_(family.path("onnx-model"), ok=True)
    assert "created a new store" not in again.stderr, again.describe()
    r = fresh.run("init", ok=True)
    assert "is a store already" in r.stdout, r.describe()

    # a mistyped --store naming a directory with other things in it
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    before = sorted(p.name for p in home.iterdir())
    for argv in (["init"], ["import", str(family.path("gguf-model"))]):
        r = Modelfs(modelfs_bin, home).run(*argv, ok=False)
        assert "is not empty" in r.stderr and "not a modelfs store" in r.stderr \
            and str(home) in r.stderr, r.describe()
        assert sorted(p.name for p in home.iterdir()) == before, \
            f"`{' '.join(argv)}` changed {home}: {sorted(p.name for p in home.iterdir())}"
        assert (home / "notes.txt").read_text() == "mine"


def test_daemon_mount_says_which_store_and_how_many_models(modelfs_bin, family, tmp_path):
    import mountlib

    full = Modelfs(modelfs_bin, tmp_path / "full")
    full.import_(family.path("gguf-model"), ok=True)
    full.import_(family.path("onnx-model"), ok=True)
    empty = Modelfs(modelfs_bin, tmp_path / "empty")
    empty.run("init", ok=True)
    for store, n in ((full, 2), (empty, 0)):
        mp = tmp_path / f"mnt-{n}"
        mp.mkdir()
        try:
            r = store.run("mount", mp, "--daemon", ok=True)
            assert f"mounted {store.store} at {mp}: {n} model" in r.stdout, r.describe()
            assert ("has no models" in r.stderr) == (n == 0), r.describe()
        finally:
            mountlib.force_unmount(mp)


# ------------------------------------------------------------------------------------------
# everyday errors and output: each cause said once, with what to do; pipes; empty variables


def _small_model(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "tiny"}')
    (d / "vocab.txt").write_text("a\nb\n")
    return d


def test_store_of_another_user_errors_once_with_a_hint(modelfs_bin):
    """A store the user may not write: the OS error appears once (not once per error
    layer) and a hint says whose store it is and what to do."""
    if not IS_ROOT:
        pytest.fail("this test switches to user nobody with setpriv: run the suite as root")
    work = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="modelfs-perm-"))
    try:
        os.chmod(work, 0o755)
        owner = Modelfs(modelfs_bin, work / "store")
        owner.run("import", _small_model(work / "m"), ok=True)
        subprocess.run(["chmod", "-R", "a+rX", str(work)], check=True)
        user = Modelfs(modelfs_bin, work / "store", ["setpriv", "--reuid=65534", "--regid=65534",
                                                    "--clear-groups"])
        for args in (["import", work / "m", "--name", "other"], ["rm", "m"], ["gc"]):
            r = user.run(*args, ok=False)
            err = r.stderr
            for cause in ("Operation not permitted", "Permission denied", "readonly database"):
                assert err.count(cause) <= 1, f"cause {cause!r} repeated:\n" + r.describe()
            assert "hint:" in err and "belongs to root" in err and "--store" in err, r.describe()
            assert str(work / "store") in err, r.describe()
        # Creating a store where the user cannot write.
        r = Modelfs(modelfs_bin, work / "new-store", user.prefix).run("init", ok=False)
        assert r.stderr.count("Permission denied") == 1, r.describe()
        assert "cannot create a store" in r.stderr and "--store" in r.stderr, r.describe()
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("var", ["MODELFS_STORE", "MODELFS_CONFIG"])
def test_empty_environment_variable_counts_as_unset(mfs, tmp_path, var):
    mfs.run("import", _small_model(tmp_path / "m"), ok=True)
    r = mfs.run("ls", "--json", ok=True, env={var: ""})
    assert [m["name"] for m in r.json()] == ["m"], r.describe()
    # Without --store, an empty MODELFS_STORE falls back to the default store.
    argv = [str(mfs.bin), "ls"]
    env = {**os.environ, var: "", "XDG_DATA_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    cp = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert "a value is required" not in cp.stderr, cp.stderr
    assert "--help" not in cp.stderr, cp.stderr


CLOSED_PIPE_COMMANDS = [["du"], ["du", "--json"], ["ls"], ["ls", "--json"], ["ls", "m"],
                        ["verify"], ["gc", "--json"], ["cat", "m/config.json"], ["--help"]]


@pytest.mark.parametrize("args", CLOSED_PIPE_COMMANDS, ids=" ".join)
def test_output_to_a_closed_pipe_ends_quietly(mfs, tmp_path, args):
    """`modelfs du | head -1`: the reader is gone before we write. Made deterministic by
    closing the read end first. Ends like any Unix tool (SIGPIPE or 0), with nothing on
    stderr: no panic, no backtrace, no "Broken pipe" error."""
    mfs.run("import", _small_model(tmp_path / "m"), ok=True)
    r, w = os.pipe()
    os.close(r)
    try:
        cp = subprocess.run(mfs.argv(*args), stdout=w, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, timeout=60)
    finally:
        os.close(w)
    assert cp.returncode in (0, -13), f"{args}: exit {cp.returncode}, stderr {cp.stderr!r}"
    assert cp.stderr == b"", f"{args}: stderr {cp.stderr!r}"


def test_pipe_to_head_shows_the_first_line(mfs, tmp_path):
    for i in range(30):
        mfs.run("import", _small_model(tmp_path / f"m{i}"), ok=True)
    cp = subprocess.run(f"{mfs.argv('du')[0]} --store {mfs.store} du | head -1", shell=True,
                        capture_output=True, text=True, timeout=60)
    assert cp.stdout.startswith("logical "), cp.stdout
    assert cp.stderr == "", cp.stderr


def test_counts_of_one_are_singular(mfs, tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = mfs.run("import", d, ok=True)
    assert "1 file," in r.stdout and "1 files" not in r.stdout, r.stdout
    r = mfs.run("verify", ok=True)
    assert "1 model, 1 file, 1 distinct content" in r.stdout and "0 damaged files" in r.stdout, r.stdout
    r = mfs.run("rm", "one", ok=True)
    assert "(1 file," in r.stdout, r.stdout


def test_cat_of_a_model_says_to_name_a_file(mfs, tmp_path):
    mfs.run("import", _small_model(tmp_path / "m"), "--name", "org/m", ok=True)
    for asked in ("org/m", "org/m/"):
        r = mfs.run("cat", asked, ok=False)
        assert "is a model, not a file" in r.stderr, r.describe()
        assert "org/m/config.json" in r.stderr and "modelfs ls org/m" in r.stderr, r.describe()
        assert "no model name is a prefix" not in r.stderr, r.describe()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_mount_helper_help_exits_0(modelfs_bin, tmp_path, flag):
    link = tmp_path / "mount.fuse.modelfs"
    os.symlink(Path(modelfs_bin).resolve(), link)
    for argv in ([str(link), flag], [str(link), "/store", "/mnt", flag]):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, f"{argv}: exit {cp.returncode}, stderr {cp.stderr!r}"
        assert cp.stdout.startswith("usage: mount.fuse.modelfs STORE MOUNTPOINT"), cp.stdout
        assert cp.stderr == "", cp.stderr


def test_du_matrix_shows_which_models_share_bytes(mfs, family):
    keys = ["base", "base-copy", "ft-head", "gguf-model"]
    for k in keys:
        mfs.import_(family.path(k), "--name", k, ok=True)
    m = mfs.json("du", "--matrix")
    assert m["models"] == sorted(keys), m
    idx = {n: i for i, n in enumerate(m["models"])}
    b = m["shared_bytes"]
    du = {x["name"]: x for x in mfs.du()["models"]}
    for n, i in idx.items():
        assert b[i][i] == du[n]["unique_bytes"] + du[n]["shared_bytes"], (n, b[i][i], du[n])
        for j in range(len(keys)):
            assert b[i][j] == b[j][i] and b[i][j] <= min(b[i][i], b[j][j])
    base, copy, ft, gguf = (idx[k] for k in keys)
    assert b[base][copy] == b[base][base], "a byte-identical copy shares everything"
    assert 0.5 * b[base][base] < b[base][ft] < b[base][base], "a fine-tune shares most of its base"
    assert b[gguf][base] == 0, "an unrelated GGUF model shares nothing with the base"
    text = mfs.run("du", "--matrix", ok=True).stdout
    assert all(k in text for k in keys) and "#4" in text, text


# ------------------------------------------------------------------------------------------
# mv, du MODEL, examples in every command's --help

def _subcommands(modelfs_bin) -> list[str]:
    r = subprocess.run([str(modelfs_bin), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds, in_list = [], False
    for line in r.stdout.splitlines():
        if line.strip() == "Commands:":
            in_list = True
        elif in_list and not line.strip():
            break
        elif in_list:
            cmds.append(line.split()[0])
    return [c for c in cmds if c != "help"]


def test_every_command_help_has_examples(modelfs_bin):
    cmds = _subcommands(modelfs_bin)
    assert {"mv", "du", "rm", "mount", "config"} <= set(cmds), cmds
    missing = []
    for cmd in cmds + ["config check"]:
        r = subprocess.run([str(modelfs_bin), *cmd.split(), "--help"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, f"`modelfs {cmd} --help` exited {r.returncode}: {r.stderr}"
        # import's definition is another change's; it is held to this once it has examples
        if cmd == "import" and "Examples:" not in r.stdout:
            continue
        if "Examples:\n  " not in r.stdout:
            missing.append(cmd)
        for line in r.stdout.split("Examples:\n", 1)[-1].splitlines():
            if line.strip():
                words = line.split()
                assert "modelfs" in words[:2], f"`modelfs {cmd} --help` example {line!r}"
    assert not missing, f"no Examples: section in --help of {missing}"


def test_mv_renames_in_catalog_only(mfs, family):
    mfs.import_(family.path("base"), "--name", "org/a", ok=True)
    mfs.import_(family.path("gguf-model"), "--name", "other", ok=True)
    before = {x["name"]: x for x in mfs.du()["models"]}["org/a"]
    objects = sorted(p.name for p in (mfs.store / "objects").rglob("*") if p.is_file())
    out = mfs.json("mv", "org/a", "org2/a")
    assert out["old"] == "org/a" and out["new"] == "org2/a", out
    assert out["files"] == before["files"] and out["logical_bytes"] == before["logical_bytes"], out
    assert sorted(mfs.ls_models()) == ["org2/a", "other"]
    assert sorted(p.name for p in (mfs.store / "objects").rglob("*") if p.is_file()) == objects
    src = family.path("base")
    for rel in modelfamily.list_files(src):
        assert mfs.cat(f"org2/a/{rel}") == (src / rel).read_bytes()
    r = mfs.run("mv", "org2/a", "plain", ok=True)
    assert "renamed org2/a to plain" in r.stdout, r.stdout
    assert sorted(mfs.ls_models()) == ["other", "plain"]


@pytest.mark.parametrize("old,new,says", [
    ("nope", "x", 'no model named "nope"'),
    ("plain", "other", 'model "other" already exists'),
    ("plain", "other/sub", 'would nest with model "other"'),
    ("plain", "a/../b", 'invalid model name "a/../b"'),
    ("plain", ".modelfs/x", "reserved"),
])
def test_mv_refuses_clearly(mfs, family, old, new, says):
    mfs.import_(family.path("gguf-model"), "--name", "plain", ok=True)
    mfs.import_(family.path("onnx-model"), "--name", "other", ok=True)
    r = mfs.run("mv", old, new, ok=False)
    assert says in r.stderr, r.stderr
    assert sorted(mfs.ls_models()) == ["other", "plain"]


def test_du_model_lists_who_it_shares_with(mfs, family):
    keys = ["base", "base-copy", "ft-head", "gguf-model"]
    for k in keys:
        mfs.import_(family.path(k), "--name", k, ok=True)
    m = mfs.json("du", "--matrix")
    b, idx = m["shared_bytes"], {n: i for i, n in enumerate(m["models"])}
    one = mfs.json("du", "base")
    du = {x["name"]: x for x in mfs.du()["models"]}["base"]
    for k in ("name", "files", "logical_bytes", "unique_bytes", "shared_bytes"):
        assert one[k] == du[k], (k, one, du)
    got = [(s["name"], s["shared_bytes"]) for s in one["shares_with"]]
    want = sorted(((n, b[idx["base"]][idx[n]]) for n in keys
                   if n != "base" and b[idx["base"]][idx[n]] > 0), key=lambda x: (-x[1], x[0]))
    assert got == want, (got, want)
    assert [n for n, _ in got] == ["base-copy", "ft-head"], got
    text = mfs.run("du", "base", ok=True).stdout
    assert "base-copy" in text and "ft-head" in text and "gguf-model" not in text, text
    r = mfs.run("du", "no-such", ok=False)
    assert 'no model named "no-such"' in r.stderr, r.stderr


# --- Hugging Face hub roots, --revision, several paths in one import ---------

def _hub_root(family, tmp_path) -> tuple[Path, Path, str]:
    """A hub root holding family's models--org--tiny (real layout, copied with
    its symlinks), a second repo models--org--other, a second commit of tiny
    tagged v1 (refs/v1) and a dataset repo; returns (root, tiny repo, main commit)."""
    snap = family.path("hf-cache")
    root = tmp_path / "hub"
    tiny = root / "models--org--tiny"
    shutil.copytree(snap.parent.parent, tiny, symlinks=True)
    main = (tiny / "refs" / "main").read_text().strip()
    old = "0" * 39 + "1"
    (tiny / "snapshots" / old).mkdir()
    blob = tiny / "blobs" / ("b" * 64)
    blob.write_bytes(b'{"old": true}\n')
    os.symlink(f"../../blobs/{blob.name}", tiny / "snapshots" / old / "config.json")
    (tiny / "refs" / "v1").write_text(old)
    shutil.copytree(tiny, root / "models--org--other", symlinks=True)
    (root / "datasets--org--data" / "snapshots").mkdir(parents=True)
    return root, tiny, main


def test_import_hub_root_imports_every_model_repo(mfs, family, tmp_path):
    root, tiny, main = _hub_root(family, tmp_path)
    r = mfs.import_(root, "--json")
    out = r.json()
    assert isinstance(out, list) and sorted(x["name"] for x in out) == ["org/other", "org/tiny"], out
    assert "datasets--org--data" in r.stderr and "skipping" in r.stderr, r.stderr
    models = mfs.ls_models()
    assert sorted(models) == ["org/other", "org/tiny"], models
    for n in models:
        assert models[n]["revision"] == "main" and models[n]["commit"] == main, models[n]
    check_model(mfs, "org/tiny", expected_files(family.path("hf-cache")))
    text = mfs.run("ls", ok=True).stdout
    assert "REVISION" in text and f"main@{main[:12]}" in text, text


def test_import_revision_tag_commit_prefix_and_missing(mfs, family, tmp_path):
    root, tiny, main = _hub_root(family, tmp_path)
    old = "0" * 39 + "1"
    r = mfs.import_(tiny, "--revision", "v1", "--name", "t/tag", "--json").json()
    assert (r["revision"], r["commit"]) == ("v1", old), r
    assert mfs.cat("t/tag/config.json") == b'{"old": true}\n'
    mfs.import_(tiny, "--revision", main[:7], "--name", "t/prefix", ok=True)
    m = mfs.ls_models()
    assert (m["t/prefix"]["revision"], m["t/prefix"]["commit"]) == (main[:7], main), m
    before = mfs.snapshot()
    r = mfs.import_(tiny, "--revision", "nope", "--name", "t/none", ok=False)
    assert "refs/nope" in r.stderr and main in r.stderr and old in r.stderr and "v1" in r.stderr, r.stderr
    (tiny / "refs" / "main").unlink()
    r = mfs.import_(tiny, "--name", "t/nomain", ok=False)
    assert "refs/main" in r.stderr and "v1" in r.stderr and main in r.stderr, r.stderr
    assert_unchanged(mfs, before, "a failed revision lookup")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("x")
    r = mfs.import_(plain, "--revision", "main", ok=False)
    assert "--revision" in r.stderr, r.stderr


def test_import_several_paths_per_model(mfs, family, tmp_path):
    a = copy_model(family.path("base"), tmp_path / "alpha")
    b = copy_model(family.path("gguf-model"), tmp_path / "beta")
    r = mfs.import_(a, b, "--name", "x", ok=False)
    assert "--name" in r.stderr, r.stderr
    mfs.import_(a, b, ok=True)
    assert sorted(mfs.ls_models()) == ["alpha", "beta"]
    assert mfs.ls_models()["alpha"]["revision"] is None and mfs.ls_models()["alpha"]["commit"] is None
    r = mfs.import_(tmp_path / "missing", a, "--replace", "--json", ok=False)
    out = r.json()
    assert [x.get("name") for x in out if "name" in x] == ["alpha"], out
    assert any(x.get("path", "").endswith("missing") for x in out), out
    assert "1 of 2 imports failed" in r.stderr and "missing" in r.stderr, r.stderr
    one = mfs.import_(b, "--replace", "--json").json()
    assert isinstance(one, dict) and one["name"] == "beta" and "revision" not in one, one
