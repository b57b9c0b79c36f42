"""Reliability and security suites, driving the real binary and real FUSE mounts.

Suites (see docs/reliability.md for what each injects and what it found):
  1. crash consistency of import / rm / gc under SIGKILL at random points
  2. corruption of objects and of catalog.db
  3. concurrency: readers (threads + processes) through the mount while import/rm/gc churn
  4. disk full (store on a small tmpfs)
  5. security (mount options, other users, store permissions, import never escapes)
  6. POSIX read-only behaviour and an fsx-style random read/seek/mmap cross-check

Bounded by default (the whole file runs in about 2 minutes); MODELFS_LONG=1 scales every
count and duration up (>= 100 SIGKILLs in suite 1, minutes of churn in suite 3, ...).
The test data is generated here (random tensors in hand-written safetensors files, small
JSON files, random blobs), so this file does not need the model-family fixture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import mountlib
from conftest import Modelfs
from mountlib import Mount, first_diff, is_mounted, mount_entries, mount_factory, pread_full  # noqa: F401 (fixture)

TESTS_DIR = Path(__file__).resolve().parent
IS_ROOT = os.geteuid() == 0
LONG = os.environ.get("MODELFS_LONG", "") not in ("", "0")
MiB = 1 << 20
PAGE = 4096


def scaled(ci, long):
    return long if LONG else ci


def report(capsys, msg: str):
    with capsys.disabled():
        print(f"\n[reliability] {msg}", flush=True)


@pytest.fixture(scope="module", autouse=True)
def _no_mount_left_behind():
    yield
    mountlib.cleanup_all()


def _need_root():
    if not IS_ROOT:
        pytest.fail("this suite needs root (real mounts, tmpfs, setpriv): run it as root", pytrace=False)


# ------------------------------------------------------------------------------------------
# test data


def write_safetensors(path: Path, tensors: list[tuple[str, bytes]]) -> None:
    header, off = {}, 0
    for name, data in tensors:
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [off, off + len(data)]}
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for _name, data in tensors:
            f.write(data)


def make_model(root: Path, seed: int, tensor_mib: int = 8, n_small: int = 4, blob_kib: int = 0,
               share_from: list[tuple[str, bytes]] | None = None, keep: float = 0.75,
               extra_dirs: bool = False) -> dict:
    """A model directory: model.safetensors of 1 MiB tensors (or, with share_from, the same
    tensors with 1 - keep of them replaced, so it shares most chunks), config.json,
    n_small small random files, an optional CDC-chunked blob. Returns {"tensors": [...]}."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    if share_from is None:
        tensors = [(f"layer.{i}.weight", rng.randbytes(MiB)) for i in range(tensor_mib)]
    else:
        tensors = [(n, d if rng.random() < keep else rng.randbytes(len(d))) for n, d in share_from]
    write_safetensors(root / "model.safetensors", tensors)
    (root / "config.json").write_text(json.dumps({"seed": seed, "hidden": 1024}, indent=1) + "\n")
    if n_small:
        (root / "extra").mkdir(exist_ok=True)
        for i in range(n_small):
            (root / "extra" / f"s{i:04d}.bin").write_bytes(rng.randbytes(rng.randint(1500, 9000)))
    if blob_kib:
        (root / "blob.bin").write_bytes(rng.randbytes(blob_kib * 1024))
    if extra_dirs:
        (root / "empty-dir").mkdir(exist_ok=True)
        (root / "empty.txt").write_bytes(b"")
    return {"tensors": tensors}


def source_files(root: Path) -> dict[str, Path]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            p = Path(dirpath) / fn
            out[p.relative_to(root).as_posix()] = p
    return out


def is_panic(text: str) -> bool:
    return "panicked" in text or "RUST_BACKTRACE" in text


def assert_no_panic(r, what=""):
    assert r.returncode != 101 and not is_panic(r.stderr), f"{what} panicked:\n{r.describe()}"


def checkpoint(store: Path):
    """Fold the WAL into catalog.db so byte-level damage hits the real database file."""
    con = sqlite3.connect(str(store / "catalog.db"))
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        con.close()


def catalog_map(store: Path):
    """From catalog.db (store-format §5): {"model/path": set(object ids)} and
    {"model/path": [(file_off, obj, obj_off, len)]} for every file entry."""
    con = sqlite3.connect(f"file:{store / 'catalog.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT m.name, e.path, c.recipe FROM entries e JOIN models m ON m.id = e.model "
            "JOIN contents c ON c.id = e.content WHERE e.kind = 0").fetchall()
    finally:
        con.close()
    objs, recs = {}, {}
    for name, path, recipe in rows:
        key = f"{name}/{path}"
        recs[key] = []
        pos = 0
        for i in range(0, len(recipe), 52):
            obj, off, ln = struct.unpack_from("<QQI", recipe, i + 32)
            recs[key].append((pos, obj, off, ln))
            pos += ln
        objs[key] = {r[1] for r in recs[key]}
    return objs, recs


def object_path(store: Path, obj: int) -> Path:
    return store / "objects" / f"{obj & 0xff:02x}" / f"{obj:016x}"


# ------------------------------------------------------------------------------------------
# suite 1: crash consistency of import, rm and gc under SIGKILL


class Ref:
    """What a model must look like: file hashes from its first, fully checked import."""

    def __init__(self, mfs: Modelfs, name: str, src: Path):
        self.name, self.src = name, src
        self.files = source_files(src)
        listed = mfs.ls_files(name)
        assert sorted(listed) == sorted(self.files), (name, sorted(listed), sorted(self.files))
        for rel, p in self.files.items():
            got = mfs.cat(f"{name}/{rel}")
            assert got == p.read_bytes(), f"{name}/{rel}: first import not byte-exact"
        self.hashes = {p: f["hash"] for p, f in listed.items()}
        self.big = [rel for rel, p in self.files.items() if p.stat().st_size >= 256 * 1024]

    def check(self, mfs: Modelfs, ctx: str, cat_big=True):
        """Listed with exactly its files and the hashes of the first import (verify checks
        the bytes against those hashes), and its big files `cat` byte-exact."""
        listed = mfs.ls_files(self.name)
        assert sorted(listed) == sorted(self.files), (
            f"{ctx}: {self.name} listed with a different file set (partial model?): "
            f"missing {sorted(set(self.files) - set(listed))[:5]}, extra {sorted(set(listed) - set(self.files))[:5]}")
        bad = [p for p, f in listed.items() if f["hash"] != self.hashes[p]]
        assert not bad, f"{ctx}: {self.name} files changed hash: {bad[:5]}"
        if cat_big:
            for rel in self.big:
                got = mfs.cat(f"{self.name}/{rel}")
                want = self.files[rel].read_bytes()
                assert got == want, (f"{ctx}: `cat {self.name}/{rel}` differs from the original at "
                                     f"{first_diff(got, want)}")


def _kill_at(mfs: Modelfs, args, delay: float, errf: Path):
    with open(errf, "wb") as err:
        p = subprocess.Popen(mfs.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err)
        time.sleep(delay)
        killed = p.poll() is None
        if killed:
            p.kill()
        rc = p.wait()
    return killed, rc


def _timed(mfs, *args):
    t0 = time.monotonic()
    mfs.run(*args, ok=True)
    return time.monotonic() - t0


@pytest.mark.crash
def test_sigkill_import_rm_gc(mfs, tmp_path, capsys):
    """Each round: SIGKILL `import V` at a random point (V's tensors are whole objects),
    import W (shares ~75 % of V's chunks: a recipe into V's object), SIGKILL `rm V`, then
    SIGKILL `gc` (which must punch V's dead ranges out of the object W still uses, and
    unlink V's small-file objects). After every kill: verify exits 0, K and W are
    unchanged and byte-exact, V is either listed complete or not at all, and repeating the
    killed command succeeds."""
    rounds = scaled(10, 40)  # 3 kills per round: 30 in CI, 120 long
    n_small = scaled(120, 300)
    k_src, v_src, w_src = tmp_path / "src" / "K", tmp_path / "src" / "V", tmp_path / "src" / "W"
    make_model(k_src, seed=1, tensor_mib=6, n_small=3, blob_kib=1024)
    v = make_model(v_src, seed=2, tensor_mib=scaled(16, 24), n_small=n_small)
    make_model(w_src, seed=3, share_from=v["tensors"], n_small=2)
    mfs.import_(k_src, "--name", "K", ok=True)
    K = Ref(mfs, "K", k_src)

    # one uncounted round to measure each command (and check the set-up does what we want)
    t_import = _timed(mfs, "import", v_src, "--name", "V")
    Vref = Ref(mfs, "V", v_src)
    mfs.import_(w_src, "--name", "W", ok=True)
    W = Ref(mfs, "W", w_src)
    assert mfs.ls_files("W")["model.safetensors"]["storage"] == "recipe"
    t_rm = _timed(mfs, "rm", "V")
    t0 = time.monotonic()
    g = mfs.json("gc")
    t_gc = time.monotonic() - t0
    assert g["objects_punched"] >= 1 and g["objects_removed"] >= n_small, (
        f"test set-up: gc after rm V should punch V's tensor object and unlink its small objects: {g}")
    mfs.run("rm", "W", ok=True)
    mfs.run("gc", ok=True)

    rng = random.Random(6006)

    def delays(duration):
        d = [(i + rng.random()) / rounds * duration * 1.2 for i in range(rounds)]
        rng.shuffle(d)
        return d

    d_imp, d_rm, d_gc = delays(t_import), delays(t_rm), delays(t_gc)
    outcomes = {"import": [0, 0], "rm": [0, 0], "gc": [0, 0]}  # [killed mid-way, finished]

    def consistent(ctx, v_state, w_present):
        r = mfs.run("verify")
        assert r.returncode == 0, f"{ctx}: verify after SIGKILL failed:\n{r.describe()}"
        models = mfs.ls_models()
        want = {"K"} | ({"W"} if w_present else set())
        assert want <= set(models), f"{ctx}: models lost: {sorted(want - set(models))}"
        assert set(models) <= {"K", "V", "W"}, f"{ctx}: unexpected models {sorted(models)}"
        K.check(mfs, ctx, cat_big=False)
        if w_present:
            W.check(mfs, ctx)
        if "V" in models:
            Vref.check(mfs, ctx, cat_big=False)
        if v_state is not None:
            assert ("V" in models) == v_state, f"{ctx}: V listed={('V' in models)}, expected {v_state}"
        return "V" in models

    for n in range(rounds):
        # -- import V, killed
        ctx = f"round {n}: import V killed at {d_imp[n]:.3f}s of ~{t_import:.3f}s"
        killed, rc = _kill_at(mfs, ["import", v_src, "--name", "V"], d_imp[n], tmp_path / "err")
        assert killed or rc == 0, f"{ctx}: import failed on its own: {(tmp_path / 'err').read_text()}"
        outcomes["import"][0 if killed else 1] += 1
        listed = consistent(ctx, None if killed else True, False)
        if not listed:
            mfs.import_(v_src, "--name", "V", ok=True)  # the repeated import succeeds
        Vref.check(mfs, ctx)
        mfs.import_(w_src, "--name", "W", ok=True)
        # -- rm V, killed
        ctx = f"round {n}: rm V killed at {d_rm[n]:.3f}s of ~{t_rm:.3f}s"
        killed, rc = _kill_at(mfs, ["rm", "V"], d_rm[n], tmp_path / "err")
        assert killed or rc == 0, f"{ctx}: rm failed on its own: {(tmp_path / 'err').read_text()}"
        listed = consistent(ctx, None if killed else False, True)
        outcomes["rm"][1 if not listed else 0] += 1
        if listed:
            mfs.run("rm", "V", ok=True)
        # -- gc, killed
        ctx = f"round {n}: gc killed at {d_gc[n]:.3f}s of ~{t_gc:.3f}s"
        killed, rc = _kill_at(mfs, ["gc"], d_gc[n], tmp_path / "err")
        assert killed or rc == 0, f"{ctx}: gc failed on its own: {(tmp_path / 'err').read_text()}"
        outcomes["gc"][0 if killed else 1] += 1
        consistent(ctx, False, True)
        g = mfs.json("gc")  # the repeated gc succeeds
        consistent(ctx + " (after the repeated gc)", False, True)
        W.check(mfs, ctx + " (after the repeated gc)")
        # back to K only, for the next round
        mfs.run("rm", "W", ok=True)
        mfs.run("gc", ok=True)

    report(capsys, f"crash: {3 * rounds} SIGKILLs (import ~{t_import:.2f}s, rm ~{t_rm:.3f}s, "
                   f"gc ~{t_gc:.3f}s); [killed before exit, finished first]: {outcomes}")
    mfs.run("verify", ok=True)
    K.check(mfs, "end")
    # nothing left but K's objects after all the crashes
    objs, _ = catalog_map(mfs.store)
    live = set().union(*objs.values())
    files = {int(p.name, 16) for p in (mfs.store / "objects").rglob("*") if p.is_file()}
    assert files == live, f"object files not referenced after the final gc: {sorted(files - live)[:10]}"


# ------------------------------------------------------------------------------------------
# suite 2: corruption


@pytest.fixture
def corrupt_store(mfs, tmp_path):
    """Four models: A and B share most tensors (B is a recipe into A's object), C and D
    independent. Returns (mfs, {name: src})."""
    srcs = {n: tmp_path / "src" / n for n in "ABCD"}
    a = make_model(srcs["A"], seed=11, tensor_mib=6, n_small=3, blob_kib=600)
    make_model(srcs["B"], seed=12, share_from=a["tensors"], keep=0.7, n_small=2)
    make_model(srcs["C"], seed=13, tensor_mib=4, n_small=3, blob_kib=300)
    make_model(srcs["D"], seed=14, tensor_mib=3, n_small=2)
    for n, s in srcs.items():
        mfs.import_(s, "--name", n, ok=True)
    mfs.run("verify", ok=True)
    checkpoint(mfs.store)
    return mfs, srcs


def _damaged_by_objects(objs_of: dict, damaged_objs: set) -> set:
    return {k for k, objs in objs_of.items() if objs & damaged_objs}


def test_corruption_verify_names_exactly_the_damaged_files(corrupt_store, capsys):
    """Flip a byte in one object, truncate another, delete a third (shared by two models
    through dedup): verify must exit 1 and name exactly the files whose recipes use them."""
    mfs, srcs = corrupt_store
    objs_of, recs = catalog_map(mfs.store)
    by_obj = {}
    for k, os_ in objs_of.items():
        for o in os_:
            by_obj.setdefault(o, set()).add(k)
    rng = random.Random(77)
    # A's tensor object is used by A/model.safetensors and B/model.safetensors
    shared = next(o for o, users in by_obj.items() if {"A/model.safetensors", "B/model.safetensors"} <= users)
    c_small = [k for k in objs_of if k.startswith("C/extra/")]
    d_cfg = next(iter(objs_of["D/config.json"]))
    c_obj = next(iter(objs_of[c_small[0]]))
    assert len({shared, c_obj, d_cfg}) == 3
    # flip a byte inside a chunk A and B both use
    file_off, obj, obj_off, ln = next(r for r in recs["B/model.safetensors"] if r[1] == shared)
    p = object_path(mfs.store, shared)
    with open(p, "r+b") as f:
        f.seek(obj_off + ln // 2)
        b = f.read(1)
        f.seek(obj_off + ln // 2)
        f.write(bytes([b[0] ^ 0x01]))
    os.truncate(object_path(mfs.store, c_obj), os.path.getsize(object_path(mfs.store, c_obj)) // 2)
    os.remove(object_path(mfs.store, d_cfg))
    # which files really use the flipped chunk / the other two objects
    expect = {k for k, rs in recs.items() if any(o == shared and oo == obj_off for _, o, oo, _ in rs)}
    expect |= _damaged_by_objects(objs_of, {c_obj, d_cfg})
    r = mfs.run("verify")
    assert_no_panic(r, "verify")
    assert r.returncode == 1, f"verify of a damaged store must exit 1:\n{r.describe()}"
    j = mfs.run("verify", "--json")
    assert j.returncode == 1, j.describe()
    named = {f"{d['model']}/{d['path']}" for d in j.json()["damaged"]}
    assert named == expect, (f"verify --json named {sorted(named)}, the damaged files are {sorted(expect)}")
    for k in expect:
        assert k in r.output, f"plain verify output does not name {k}:\n{r.describe()}"
    # per model: exit status follows the damage
    for n in "ABCD":
        rv = mfs.run("verify", n)
        assert_no_panic(rv, f"verify {n}")
        want = 1 if any(k.startswith(n + "/") for k in expect) else 0
        assert rv.returncode == want, f"verify {n}: exit {rv.returncode}, expected {want}\n{rv.describe()}"
    for k in sorted(expect):
        c = mfs.run("cat", k)
        assert_no_panic(c, f"cat {k}")
        assert c.returncode == 1, f"cat of damaged {k} must fail with exit 1:\n{c.describe()}"
    for k in sorted(set(objs_of) - expect)[:20]:
        name, rel = k.split("/", 1)
        assert mfs.cat(k) == (srcs[name] / rel).read_bytes(), f"undamaged {k} not byte-exact"
    report(capsys, f"corruption: flip+truncate+delete -> verify named {len(named)} files: {sorted(named)}")


def test_corruption_through_mount(corrupt_store, mount_factory, capsys):
    """Truncated and deleted objects through the mount (bit flips are in test_mount.py):
    reads of the lost ranges fail with EIO, never wrong bytes; the rest reads correctly."""
    _need_root()
    mfs, srcs = corrupt_store
    objs_of, recs = catalog_map(mfs.store)
    # truncate A's tensor object (whole object of A/model.safetensors, used by B too) to 60 %
    a_obj = next(iter(objs_of["A/model.safetensors"]))
    size = os.path.getsize(object_path(mfs.store, a_obj))
    cut = size * 6 // 10
    os.truncate(object_path(mfs.store, a_obj), cut)
    # delete C's blob object
    c_obj = next(iter(objs_of["C/blob.bin"]))
    os.remove(object_path(mfs.store, c_obj))
    checked = 0
    for mode in ("auto", "off"):
        m = mount_factory(mfs, "--passthrough", mode)
        for key in ("A/model.safetensors", "B/model.safetensors"):
            name, rel = key.split("/", 1)
            data = (srcs[name] / rel).read_bytes()
            fd = os.open(m / key, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                for file_off, obj, obj_off, ln in recs[key]:
                    # the first and the last whole page inside every chunk (the kernel reads
                    # whole pages: a page straddling a lost chunk is EIO, so the page
                    # before it would be a short read)
                    lo, hi = -(-file_off // PAGE) * PAGE, (file_off + ln) // PAGE * PAGE
                    if hi - lo < PAGE:
                        continue
                    for off in sorted({lo, hi - PAGE}):
                        n = PAGE
                        lost = obj == a_obj and obj_off + ln > cut
                        try:
                            got = os.pread(fd, n, off)
                        except OSError as e:
                            assert lost and e.errno == errno.EIO, (
                                f"[{mode}] {key} [{off}, +{n}) (object {obj} [{obj_off}, +{ln}), "
                                f"truncated at {cut}): {e!r}, expected "
                                f"{'EIO' if lost else 'the original bytes'}")
                        else:
                            assert not lost, (f"[{mode}] {key} [{off}, +{n}) lies in a chunk cut off by "
                                              f"truncation but the read returned {len(got)} bytes "
                                              f"({'original' if got == data[off:off + n] else 'WRONG'} bytes)")
                            assert got == data[off:off + n], f"[{mode}] {key} [{off}, +{n}): wrong bytes"
                        checked += 1
            finally:
                os.close(fd)
        # deleted object: open or read fails with EIO, never data; C's other files read fine
        try:
            with open(m / "C/blob.bin", "rb") as f:
                got = f.read()
            raise AssertionError(f"[{mode}] C/blob.bin whose object was deleted read {len(got)} bytes")
        except OSError as e:
            assert e.errno == errno.EIO, f"[{mode}] read of C/blob.bin (object deleted): {e!r}, expected EIO"
        assert (m / "C/model.safetensors").read_bytes() == (srcs["C"] / "model.safetensors").read_bytes()
        assert (m / "D/model.safetensors").read_bytes() == (srcs["D"] / "model.safetensors").read_bytes()
        assert m.stats()["eio"] >= 1
        m.umount()
    report(capsys, f"corruption through the mount: {checked} chunk-edge reads checked (2 modes)")


def _sqlite_pages(store: Path):
    con = sqlite3.connect(f"file:{store / 'catalog.db'}?mode=ro", uri=True)
    try:
        psize = con.execute("PRAGMA page_size").fetchone()[0]
        roots = dict(con.execute("SELECT name, rootpage FROM sqlite_master WHERE rootpage > 0").fetchall())
    finally:
        con.close()
    return psize, roots


def _damage_catalog(store: Path, how: str) -> str:
    db = store / "catalog.db"
    data = bytearray(db.read_bytes())
    psize, roots = _sqlite_pages(store)
    if how == "btree-page":  # flip the page-type byte of the models and entries root pages
        for t in ("models", "entries", "contents"):
            off = (roots[t] - 1) * psize
            data[off] ^= 0xFF
        db.write_bytes(bytes(data))
    elif how == "header":  # garbage over the 100-byte database header
        data[0:100] = random.Random(5).randbytes(100)
        db.write_bytes(bytes(data))
    elif how == "truncate-half":
        os.truncate(db, (len(data) // 2) // psize * psize)
    elif how == "truncate-partial-page":
        os.truncate(db, psize + 100)
    elif how == "empty":
        os.truncate(db, 0)
    else:
        raise ValueError(how)
    for ext in ("-wal", "-shm"):
        try:
            os.remove(str(db) + ext)
        except FileNotFoundError:
            pass
    return f"{how} (page size {psize}, roots {roots})"


CATALOG_DAMAGE = ["btree-page", "header", "truncate-half", "truncate-partial-page", "empty"]
# every reading command must fail with a clear message for these; for truncate-half a
# command whose queries happen to touch only surviving pages may still work
STRICT = {"btree-page", "header", "truncate-partial-page", "empty"}


@pytest.mark.parametrize("how", CATALOG_DAMAGE)
def test_damaged_catalog_clear_errors(corrupt_store, tmp_path, how):
    _need_root()
    mfs, srcs = corrupt_store
    desc = _damage_catalog(mfs.store, how)
    cmds = [("ls",), ("ls", "A"), ("du",), ("verify",), ("verify", "--json"), ("cat", "A/config.json"),
            ("gc",), ("rm", "D"), ("import", srcs["D"], "--name", "E")]
    problems = []
    for args in cmds:
        r = mfs.run(*args, timeout=60)
        label = " ".join(map(str, args))
        if r.returncode == 101 or is_panic(r.stderr):
            problems.append(f"`{label}` PANICKED (exit {r.returncode}): {r.stderr.strip()[-600:]}")
            continue
        if r.returncode == 0:
            if args[0] == "verify":
                problems.append(f"`{label}` exited 0 on a damaged catalog: {r.stdout.strip()[:300]}")
            elif how in STRICT:
                problems.append(f"`{label}` exited 0 on a damaged catalog ({how}): {r.stdout.strip()[:200]}")
            continue
        if r.returncode != 1:
            problems.append(f"`{label}` exited {r.returncode} (expected 1)")
        msg = r.stderr.lower()
        if not any(w in msg for w in ("catalog", "not a modelfs store", "malformed", "not a database",
                                      "corrupt")):
            problems.append(f"`{label}`: error does not say the catalog is damaged: {r.stderr.strip()[:300]}")
    # mount: must refuse to start (or at least not panic) and leave nothing mounted
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(mfs, mp)
    try:
        rc = m.start_daemon(check=False, timeout=30)
        log = m.log_text()
        if is_panic(log):
            problems.append(f"`mount` PANICKED: {log[-600:]}")
        elif rc == 0 and how in STRICT:
            ls = None
            try:
                ls = os.listdir(mp)
            except OSError as e:
                ls = repr(e)
            problems.append(f"`mount` started on a damaged catalog ({how}); root lists {ls}")
        elif rc != 0 and not any(w in log.lower() for w in ("catalog", "not a modelfs store",
                                                            "malformed", "not a database")):
            problems.append(f"`mount` failed without naming the catalog: {log[-400:]}")
    finally:
        m.cleanup()
    assert not problems, f"damaged catalog ({desc}):\n" + "\n".join(problems)


def test_damaged_recipe_in_catalog(corrupt_store):
    """A flipped byte inside a recipe record (the chunk hash) in catalog.db: verify names
    the file (exit 1), cat fails, other models are unaffected."""
    mfs, srcs = corrupt_store
    con = sqlite3.connect(f"file:{mfs.store / 'catalog.db'}?mode=ro", uri=True)
    try:
        (recipe,) = con.execute(
            "SELECT c.recipe FROM entries e JOIN models m ON m.id = e.model JOIN contents c "
            "ON c.id = e.content WHERE m.name = 'D' AND e.path = 'config.json'").fetchone()
    finally:
        con.close()
    db = mfs.store / "catalog.db"
    data = bytearray(db.read_bytes())
    rec = bytes(recipe[:52])
    pos = data.find(rec)
    assert pos >= 0 and data.find(rec, pos + 1) < 0, "test set-up: recipe record not found once in catalog.db"
    data[pos + 5] ^= 0x10  # inside the chunk hash
    db.write_bytes(bytes(data))
    r = mfs.run("verify", "--json")
    assert_no_panic(r, "verify")
    assert r.returncode == 1, f"verify must exit 1 for a damaged recipe:\n{r.describe()}"
    named = {f"{d['model']}/{d['path']}" for d in r.json()["damaged"]}
    assert named == {"D/config.json"}, f"verify named {named}, expected exactly D/config.json"
    c = mfs.run("cat", "D/config.json")
    assert_no_panic(c, "cat")
    assert c.returncode == 1, c.describe()
    assert mfs.cat("C/config.json") == (srcs["C"] / "config.json").read_bytes()




# ------------------------------------------------------------------------------------------
# suite 3: concurrency under load


def daemon_thread_stacks(m: Mount) -> str:
    out = []
    for pid in m.daemon_pids or mountlib.modelfs_pids(m.mfs.bin, m.mountpoint):
        for t in sorted(Path(f"/proc/{pid}/task").glob("*")):
            try:
                comm = (t / "comm").read_text().strip()
                state = (t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                stack = (t / "stack").read_text().strip().splitlines()[:4]
            except OSError:
                continue
            out.append(f"  {t.name} {comm} {state}: {' <- '.join(x.split()[-1] for x in stack)}")
    return "\n".join(out)


def abort_connection(m: Mount) -> str:
    """Abort the mount's FUSE connection through fusectl (mounting fusectl if needed)."""
    ents = [l.split() for l in open("/proc/self/mountinfo") if f" {os.path.realpath(m.mountpoint)} " in l]
    if not ents:
        return "not mounted"
    minor = ents[-1][2].split(":")[1]
    conn = Path("/sys/fs/fuse/connections")
    mounted_here = False
    if not (conn / minor).exists():
        mounted_here = subprocess.run(["mount", "-t", "fusectl", "none", str(conn)],
                                      capture_output=True).returncode == 0
    try:
        (conn / minor / "abort").write_text("1")
        return f"aborted FUSE connection {minor}"
    except OSError as e:
        return f"could not abort connection {minor}: {e}"
    finally:
        if mounted_here:
            subprocess.run(["umount", str(conn)], capture_output=True)


def _churn_reader(mp: Path, churn_srcs: dict, stop: threading.Event, stats: dict, errors: list, seed: int):
    """List the mount, open files of churning models, read them whole, compare. ENOENT at
    lookup/open (the model was removed in between) is fine; any data must be right."""
    rng = random.Random(seed)
    while not stop.is_set():
        name = rng.choice(sorted(churn_srcs))
        files = churn_srcs[name]
        rel = rng.choice(sorted(files))
        try:
            fd = os.open(mp / name / rel, os.O_RDONLY)
        except FileNotFoundError:
            stats["enoent"] += 1
            time.sleep(0.005)
            continue
        except OSError as e:
            # store-format §6: an object that disappeared means the file was removed; the
            # mount should say ENOENT. EIO here is recorded (asserted separately below).
            if e.errno == errno.EIO:
                stats["open_eio"].append(f"{name}/{rel}")
                continue
            errors.append(f"open {name}/{rel}: {e!r}")
            return
        try:
            want = files[rel]
            got = pread_full(fd, len(want) + 10, 0)
            if got != want:
                errors.append(f"{name}/{rel}: read {len(got)} bytes, want {len(want)}, first difference "
                              f"at {first_diff(got, want)}")
                return
            stats["reads"] += 1
            stats["bytes"] += len(got)
        except OSError as e:
            errors.append(f"read {name}/{rel} (opened fine): {e!r}")
            return
        finally:
            os.close(fd)


def _held_open_reader(mp: Path, name: str, files: dict, stop, stats, errors, seed):
    """Open every file of a churning model, keep them open while it is removed and gc'd,
    and keep re-reading them at random offsets."""
    rng = random.Random(seed)
    while not stop.is_set():
        fds = {}
        try:
            for rel in files:
                try:
                    fds[rel] = os.open(mp / name / rel, os.O_RDONLY)
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EIO:
                        stats["open_eio"].append(f"{name}/{rel}")
                        break
                    errors.append(f"held-open open {name}/{rel}: {e!r}")
                    return
            if not fds:
                time.sleep(0.01)
                continue
            deadline = time.monotonic() + rng.uniform(0.5, 2.0)  # spans several rm/gc cycles
            while time.monotonic() < deadline and not stop.is_set():
                rel = rng.choice(sorted(fds))
                want = files[rel]
                off = rng.randrange(0, len(want) + 1)
                n = rng.randint(1, 2 * MiB)
                try:
                    got = pread_full(fds[rel], n, off)
                except OSError as e:
                    errors.append(f"held-open {name}/{rel} [{off}, +{n}): {e!r}")
                    return
                if got != want[off:off + n]:
                    errors.append(f"held-open {name}/{rel} [{off}, +{n}): wrong bytes at "
                                  f"+{first_diff(got, want[off:off + n])}")
                    return
                stats["held_reads"] += 1
        finally:
            for fd in fds.values():
                os.close(fd)


@pytest.mark.parametrize("pmode", ["auto", "off"])
def test_concurrent_reads_during_import_rm_gc(mfs, tmp_path, mount_factory, pmode, capsys):
    _need_root()
    seconds = scaled(9, 120)
    srcs = tmp_path / "src"
    stable = {}
    base = make_model(srcs / "S0", seed=21, tensor_mib=8, n_small=3, blob_kib=512)
    stable["S0"] = srcs / "S0"
    make_model(srcs / "S1", seed=22, share_from=base["tensors"], keep=0.6, n_small=2)
    stable["S1"] = srcs / "S1"
    make_model(srcs / "S2", seed=23, tensor_mib=4, n_small=2, blob_kib=800)
    stable["org/S2"] = srcs / "S2"
    for name, s in stable.items():
        mfs.import_(s, "--name", name, ok=True)
    # churning models share chunks with S0 and with each other, so gc punches and unlinks
    churn_src = {}
    c0 = make_model(srcs / "C0", seed=31, share_from=base["tensors"], keep=0.5, n_small=4)
    churn_src["C0"] = srcs / "C0"
    make_model(srcs / "C1", seed=32, share_from=c0["tensors"], keep=0.5, n_small=4, blob_kib=300)
    churn_src["C1"] = srcs / "C1"
    make_model(srcs / "C2", seed=33, tensor_mib=3, n_small=6)
    churn_src["C2"] = srcs / "C2"
    churn_bytes = {n: {rel: p.read_bytes() for rel, p in source_files(s).items()} for n, s in churn_src.items()}

    # foreground daemon (our child), so a daemon that dies shows its exit status / signal
    m = mount_factory(mfs, "--passthrough", pmode, start=False)
    m.start_foreground()
    pairs = [(str(m / name / rel), str(p)) for name, s in stable.items() for rel, p in source_files(s).items()
             if p.stat().st_size > 0]
    stop = threading.Event()
    errors: list[str] = []
    stats = {"reads": 0, "bytes": 0, "enoent": 0, "held_reads": 0, "open_eio": []}
    counts = [0] * 4

    def stable_reader(i):
        try:
            counts[i] = mountlib.random_reads(pairs, seed=100 + i, n=0, use_mmap=i % 2 == 1, stop=stop)
        except BaseException as e:  # noqa: BLE001
            errors.append(f"stable reader {i}: {type(e).__name__}: {e}")

    procs = []
    for i in range(2):
        spec = json.dumps({"pairs": pairs, "seed": 900 + i, "n": 0, "mmap": i == 1, "seconds": seconds})
        procs.append(subprocess.Popen([sys.executable, str(TESTS_DIR / "mountlib.py"), spec],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=TESTS_DIR))
    threads = [threading.Thread(target=stable_reader, args=(i,), daemon=True) for i in range(4)]
    threads += [threading.Thread(target=_churn_reader, args=(m.mountpoint, churn_bytes, stop, stats, errors, 7 + i),
                                 daemon=True) for i in range(2)]
    threads += [threading.Thread(target=_held_open_reader, args=(m.mountpoint, n, churn_bytes[n], stop, stats,
                                                                 errors, 50 + i), daemon=True)
                for i, n in enumerate(("C0", "C1"))]
    for t in threads:
        t.start()
    ops = {"import": 0, "rm": 0, "gc": 0}
    writer_errors = []
    rng = random.Random(4)
    present = set()
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end and not errors:
            name = rng.choice(sorted(churn_src))
            if name in present:
                r = mfs.run("rm", name)
                ops["rm"] += 1
                present.discard(name)
            else:
                r = mfs.run("import", churn_src[name], "--name", name)
                ops["import"] += 1
                present.add(name)
            if r.returncode != 0:
                writer_errors.append(r.describe())
            if rng.random() < 0.5:
                r = mfs.run("gc")
                ops["gc"] += 1
                if r.returncode != 0:
                    writer_errors.append(r.describe())
    finally:
        stop.set()
        deadline = time.monotonic() + 30
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            # a hang: record where the daemon's threads are, then abort the FUSE connection
            # so the stuck readers (and this test) can finish
            errors.append(f"HANG: reader threads {hung} still blocked 30 s after stop; daemon threads:\n"
                          + daemon_thread_stacks(m) + "\n" + abort_connection(m))
            for t in threads:
                t.join(timeout=10)
        for i, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                errors.append(f"reader process {i} hung")
            if p.returncode != 0:
                errors.append(f"reader process {i} exited {p.returncode}: {out.decode(errors='replace')[-1500:]}")
            else:
                counts.append(int(out.split()[-1]))
    if m.proc.poll() is not None:
        log = m.log.read_text(errors="replace") if m.log.exists() else ""
        i = log.find("panicked")
        errors.insert(0, f"PRODUCT BUG: the mount daemon DIED during the run: exit status {m.proc.returncode}"
                         f" (negative = killed by that signal); "
                         + (f"it PANICKED: {log[max(0, i - 300):i + 1500]}" if i >= 0 else log[-1500:]))
    assert not writer_errors, "import/rm/gc failed while mounted:\n" + "\n".join(writer_errors[:3])
    assert not errors, (f"[{pmode}] readers under churn ({ops} writer ops):\n" + "\n".join(errors[:10]) + "\n"
                        + m.describe())
    s = m.stats()
    assert min(counts) > 0 and stats["reads"] > 0, (counts, stats)
    mfs.run("gc", ok=True)
    mfs.run("verify", ok=True)
    report(capsys, f"concurrency [{pmode}] {seconds}s: stable random reads per reader {counts}, churn "
                   f"whole-file reads {stats['reads']} ({stats['bytes'] >> 20} MiB, {stats['enoent']} ENOENT, "
                   f"{len(stats['open_eio'])} EIO at open), held-open reads {stats['held_reads']}; "
                   f"writer ops {ops}; wrong bytes 0; stats mode {s['mode']}, eio {s['eio']}")
    assert not stats["open_eio"], (
        f"PRODUCT BUG [{pmode}]: open() of a file whose model was just removed and gc'd returned EIO "
        f"{len(stats['open_eio'])} times (e.g. {stats['open_eio'][:3]}) instead of ENOENT: the daemon's "
        f"tree is up to 200 ms stale and a missing object is reported as damage (fs/src/vfs.rs "
        f"map_object / open_copy); store-format §6 says a vanished object means the file was removed")
    if pmode == "auto":
        assert s["mode"] == "passthrough", (
            f"PRODUCT BUG: after import/rm/gc churn the mount fell back to copy mode for good: {s} "
            f"(fs/src/fuse.rs open: a failed open_passthrough calls vfs.disable_passthrough())")
    assert s["eio"] == 0, f"[{pmode}] the mount counted EIO under churn: {s}"


# ------------------------------------------------------------------------------------------
# suite 4: disk full


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 40 MiB (remount with a bigger size=... to 'free space')."""
    _need_root()
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        for argv in (["umount", str(d)], ["umount", "-l", str(d)]):
            if not any(r[1] == os.path.realpath(d) for r in mountlib.proc_mounts()):
                break
            subprocess.run(argv, capture_output=True)


def _fs_free(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def test_disk_full(modelfs_bin, small_fs, tmp_path, capsys):
    mfs = Modelfs(modelfs_bin, small_fs / "store")
    mfs.run("init", ok=True)
    k_src, big_src = tmp_path / "src" / "K", tmp_path / "src" / "big"
    make_model(k_src, seed=41, tensor_mib=6, n_small=3, blob_kib=256)
    make_model(big_src, seed=42, tensor_mib=48, n_small=2)
    mfs.import_(k_src, "--name", "K", ok=True)
    K = Ref(mfs, "K", k_src)
    before = mfs.ls_models()

    def consistent(ctx):
        r = mfs.run("verify")
        assert_no_panic(r, "verify")
        assert r.returncode == 0, f"{ctx}: verify after ENOSPC:\n{r.describe()}"
        assert set(mfs.ls_models()) <= set(before) | {"big", "fits"}, ctx
        K.check(mfs, ctx)

    # 1. plainly too big
    r = mfs.import_(big_src, "--name", "big", ok=None)
    assert_no_panic(r, "import on a full disk")
    assert r.returncode == 1, f"import bigger than the filesystem must fail with exit 1:\n{r.describe()}"
    assert "no space left" in r.stderr.lower(), f"the error should say ENOSPC (No space left on device):\n{r.describe()}"
    assert "big" not in mfs.ls_models(), "a model whose import hit ENOSPC is listed"
    consistent("after ENOSPC")
    mfs.run("gc", ok=True)
    consistent("after ENOSPC + gc")
    free_after = _fs_free(small_fs)
    assert free_after > 25 * MiB, (f"after a failed import + gc only {free_after} bytes are free: the "
                                   f"partial object was not deleted")

    # 2. a sweep: the disk fills at different points of an import (objects, fsync, catalog
    #    commit / WAL). Whatever happens: exit 0 (model complete) or 1 naming ENOSPC.
    fits = tmp_path / "src" / "fits"
    make_model(fits, seed=43, tensor_mib=4, n_small=scaled(40, 120))
    need = sum(p.stat().st_size for p in source_files(fits).values())
    outcomes = []
    steps = scaled(8, 40)
    filler = small_fs / "filler"
    for i in range(steps):
        leave = int(need * (0.2 + 1.0 * i / steps)) + random.Random(i).randint(0, 64 << 10)
        free = _fs_free(small_fs)
        with open(filler, "wb") as f:
            if free > leave:
                os.posix_fallocate(f.fileno(), 0, free - leave)
        r = mfs.import_(fits, "--name", "fits", ok=None)
        filler.unlink()
        assert_no_panic(r, f"import with {leave} bytes free")
        ctx = f"sweep {i}: {leave} bytes free for a {need}-byte model"
        if r.returncode == 0:
            Ref(mfs, "fits", fits)
            mfs.run("rm", "fits", ok=True)
            outcomes.append("ok")
        else:
            assert r.returncode == 1, f"{ctx}:\n{r.describe()}"
            assert "no space left" in r.stderr.lower(), f"{ctx}: error does not mention ENOSPC:\n{r.describe()}"
            assert "fits" not in mfs.ls_models(), f"{ctx}: failed import is listed"
            outcomes.append("ENOSPC")
        consistent(ctx)
        mfs.run("gc", ok=True)
    assert "ENOSPC" in outcomes, outcomes

    # 3. more space: the big import now succeeds; K is still intact
    subprocess.run(["mount", "-o", "remount,size=160m", str(small_fs)], check=True)
    mfs.import_(big_src, "--name", "big", ok=True)
    Ref(mfs, "big", big_src)
    consistent("after growing the filesystem")
    report(capsys, f"disk full: 1 oversize import + {steps}-step fill sweep: {outcomes}")


# ------------------------------------------------------------------------------------------
# suite 5: security


def _opts(mp) -> set:
    ents = mount_entries(mp)
    assert ents, f"{mp} not mounted"
    return set(ents[-1][3].split(","))


def _as_nobody(*argv, timeout=60):
    return subprocess.run([*mountlib.NOBODY, *map(str, argv)], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _var_tmp_dir(prefix):
    work = Path(tempfile.mkdtemp(dir="/var/tmp", prefix=prefix))
    os.chmod(work, 0o755)
    return work


@pytest.fixture
def sec_store(mfs, tmp_path):
    src = tmp_path / "src" / "M"
    make_model(src, seed=51, tensor_mib=2, n_small=2, extra_dirs=True)
    mfs.import_(src, "--name", "M", ok=True)
    return mfs, src


def test_mount_options_and_other_users(sec_store, mount_factory):
    """ro, nosuid, nodev, default_permissions in /proc/mounts; statvfs says read-only; user
    nobody cannot read a root mount made without --allow-other, and can with it."""
    _need_root()
    mfs, src = sec_store
    work = _var_tmp_dir("modelfs-sec-")
    try:
        for args, other_can_read in (((), False), (("--allow-other",), True)):
            mp = work / f"mnt{len(args)}"
            mp.mkdir()
            m = mount_factory(mfs, *args, mountpoint=mp)
            o = _opts(mp)
            for want in ("ro", "nosuid", "nodev", "default_permissions"):
                assert want in o, f"mount {args}: option {want} missing from /proc/mounts: {sorted(o)}"
            assert "rw" not in o
            assert os.statvfs(mp).f_flag & os.ST_RDONLY, "statvfs does not report ST_RDONLY"
            r = _as_nobody("cat", mp / "M" / "config.json")
            if other_can_read:
                assert r.returncode == 0, f"--allow-other: nobody cannot read: {r.stderr!r}"
                assert r.stdout == (src / "config.json").read_bytes()
            else:
                assert r.returncode != 0 and b"Permission denied" in r.stderr, (
                    f"without --allow-other, user nobody could read a root mount: rc {r.returncode} "
                    f"{r.stdout[:100]!r} {r.stderr!r}")
                r = _as_nobody("ls", mp)
                assert r.returncode != 0, "without --allow-other nobody can list the root mount"
            m.umount()
    finally:
        mountlib.force_unmount(work / "mnt0")
        mountlib.force_unmount(work / "mnt1")
        shutil.rmtree(work, ignore_errors=True)


def test_user_mount_has_no_allow_other(modelfs_bin, mount_factory, tmp_path):
    """An ordinary user's mount without --allow-other carries no allow_other option."""
    _need_root()
    work = _var_tmp_dir("modelfs-usermnt-")
    try:
        store, mp, src = work / "store", work / "mnt", work / "src"
        for d in (store, mp):
            d.mkdir()
            os.chown(d, 65534, 65534)
        make_model(src, seed=52, tensor_mib=1, n_small=1)
        subprocess.run(["chmod", "-R", "a+rX", str(src)], check=True)
        user = Modelfs(modelfs_bin, store, mountlib.NOBODY)
        user.import_(src, "--name", "M", ok=True)
        m = mount_factory(user, mountpoint=mp, start=False)
        m.start_daemon()
        o = _opts(mp)
        assert "allow_other" not in o, f"user mount without --allow-other has allow_other: {sorted(o)}"
        assert {"ro", "default_permissions"} <= o, sorted(o)
        m.umount()
    finally:
        mountlib.force_unmount(work / "mnt")
        shutil.rmtree(work, ignore_errors=True)


def _bad_modes(store: Path):
    bad = []
    for dirpath, dirs, files in os.walk(store):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in files]:
            st = os.lstat(n)
            if st.st_mode & 0o002:
                bad.append(f"{n}: {stat.filemode(st.st_mode)} (world-writable)")
            elif st.st_mode & 0o020:
                bad.append(f"{n}: {stat.filemode(st.st_mode)} (group-writable)")
    return bad


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077], ids=["umask022", "umask000", "umask077"])
def test_store_files_not_world_writable(modelfs_bin, tmp_path, umask):
    """After init, import, a mount's reads and gc, nothing in the store is group- or
    world-writable, even when the importing process runs with umask 000 (the spec fixes
    the modes: directories 0755, files 0644)."""
    store = tmp_path / "store"
    src = tmp_path / "src" / "M"
    make_model(src, seed=53, tensor_mib=2, n_small=3)
    make_model(tmp_path / "src" / "N", seed=54, share_from=make_model(tmp_path / "src" / "X", seed=54)["tensors"])
    argv = lambda *a: [str(modelfs_bin), "--store", str(store), *map(str, a)]  # noqa: E731
    old = os.umask(umask)
    try:
        for a in (("init",), ("import", src, "--name", "M"), ("import", tmp_path / "src" / "X", "--name", "X"),
                  ("import", tmp_path / "src" / "N", "--name", "N"), ("rm", "X"), ("gc",), ("verify",)):
            r = subprocess.run(argv(*a), capture_output=True, timeout=120)
            assert r.returncode == 0, (a, r.stderr)
    finally:
        os.umask(old)
    bad = _bad_modes(store)
    assert not bad, (f"store files writable by group/others after commands run with umask "
                     f"{umask:03o}:\n" + "\n".join(bad[:20]))
    # Readers (a mount running as another user, `cat` by a non-owner) need the
    # objects readable whatever umask the importer had.
    objects = [p for p in (store / "objects").rglob("*") if p.is_file()]
    assert objects, "the imports wrote no objects"
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in objects}
    assert set(modes.values()) == {"0o644"}, f"object modes under umask {umask:03o}: {modes}"


def test_daemon_refuses_store_writable_by_others(sec_store, tmp_path):
    """Security: 'the daemon refuses a store directory writable by others'. A store dir
    with mode 0777 (anyone could swap objects/ or catalog.db under a root daemon) must
    make `modelfs mount` fail with an error naming the store, and mount nothing."""
    _need_root()
    mfs, _src = sec_store
    problems = []
    for target, mode in ((mfs.store, 0o777), (mfs.store / "objects", 0o777), (mfs.store / "catalog.db", 0o666)):
        old = stat.S_IMODE(os.stat(target).st_mode)
        os.chmod(target, mode)
        mp = tmp_path / f"mnt-{target.name}"
        mp.mkdir()
        m = Mount(mfs, mp)
        try:
            rc = m.start_daemon(check=False, timeout=30)
            if rc == 0 or is_mounted(mp):
                problems.append(f"{target} mode {mode:o}: `modelfs mount` accepted it (exit {rc}, "
                                f"mounted={is_mounted(mp)})")
            elif "writable" not in m.log_text().lower() and str(target) not in m.log_text():
                problems.append(f"{target} mode {mode:o}: refused without saying why: {m.log_text()[-300:]}")
        finally:
            m.cleanup()
            os.chmod(target, old)
    assert not problems, ("PRODUCT BUG: the mount daemon does not refuse a store writable by others "
                          "(the security requirement):\n" + "\n".join(problems))


def test_import_symlinks_escaping_the_tree(mfs, tmp_path):
    """test_cli.py covers a file symlink to an absolute path outside the tree. Here: a
    relative ../ link, a directory link to outside, and a chain inside -> inside -> outside.
    Each is refused without --follow-symlinks (store unchanged); links inside the tree are fine."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (outside / "d").mkdir()
    (outside / "d" / "x.bin").write_bytes(b"x" * 100)
    cases = {
        "relative": lambda d: os.symlink("../../outside/secret.txt", d / "secret.txt"),
        "dir": lambda d: os.symlink(str(outside / "d"), d / "sub"),
        "chain": lambda d: (os.symlink("hop2", d / "hop1"), os.symlink(str(outside / "secret.txt"), d / "hop2")),
        "dir-relative": lambda d: os.symlink("../../outside", d / "up"),
    }
    make_model(tmp_path / "seed", seed=55, tensor_mib=1, n_small=0)
    mfs.import_(tmp_path / "seed", "--name", "seed", ok=True)
    problems = []
    for label, mk in cases.items():
        d = tmp_path / "trees" / label
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}\n")
        os.symlink("config.json", d / "alias.json")  # inside: fine
        mk(d)
        before = mfs.snapshot()
        r = mfs.import_(d, "--name", label, ok=None)
        if r.returncode == 0:
            problems.append(f"{label}: import followed a link out of the tree: {sorted(mfs.ls_files(label))}")
            mfs.run("rm", label, ok=True)
            mfs.run("gc", ok=True)
        else:
            assert_no_panic(r, f"import {label}")
            after = mfs.snapshot()
            if after != before:
                problems.append(f"{label}: failed import changed the store")
        r = mfs.import_(d, "--name", label, "--follow-symlinks", ok=None)
        if r.returncode != 0:
            problems.append(f"{label}: --follow-symlinks import failed: {r.stderr.strip()[:200]}")
    assert not problems, "\n".join(problems)


def test_import_never_writes_outside_store(mfs, tmp_path, mount_factory):
    """File and model names that look like traversal (`..%2f`, backslashes, `..\\`) are
    ordinary names: stored and shown verbatim, and nothing appears outside the store."""
    src = tmp_path / "tricky"
    names = ["..%2f..%2fescape.txt", "a\\..\\..\\b.txt", "..\\evil.txt", "%2e%2e", "...", "..a", "-rf",
             "sub/..%2f.json", "sp ace.txt", "new\u00a0line\u2028.txt"]  # (control characters: test_cli)
    for n in names:
        p = src / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(n.encode() * 50)
    parent = tmp_path

    def outside_listing():
        out = set()
        for dirpath, dirs, files in os.walk(parent):
            rel = Path(dirpath).relative_to(parent)
            if rel.parts[:1] in (("store",), ("src",), ("tricky",)) or (rel.parts and rel.parts[0].startswith("mnt")):
                dirs[:] = []
                continue
            out |= {str(rel / f) for f in files} | {str(rel / d) for d in dirs}
        return out

    before_out = outside_listing()
    before_root = set(os.listdir("/"))
    problems = []
    for model_name in ("..%2f..%2fevil", "a\\..\\..\\b", "ok/..%2e"):
        r = mfs.import_(src, "--name", model_name, ok=None)
        assert_no_panic(r, f"import --name {model_name!r}")
        if r.returncode != 0:
            problems.append(f"name {model_name!r} refused ({r.stderr.strip()[:150]}); it has no '..' component")
            continue
        listed = mfs.ls_files(model_name)
        if sorted(listed) != sorted(names):
            problems.append(f"{model_name!r}: files listed as {sorted(listed)}")
        for n in names:
            if mfs.cat(f"{model_name}/{n}") != n.encode() * 50:
                problems.append(f"{model_name!r}/{n!r}: cat differs")
    assert outside_listing() == before_out, f"new files outside the store: {outside_listing() - before_out}"
    assert set(os.listdir("/")) == before_root
    # every file the store holds is an object or the catalog
    for dirpath, dirs, files in os.walk(mfs.store):
        rel = Path(dirpath).relative_to(mfs.store)
        for f in files:
            ok = (rel == Path(".") and (f in ("lock",) or f.startswith("catalog.db"))) or (
                len(rel.parts) == 2 and rel.parts[0] == "objects" and len(f) == 16)
            if not ok:
                problems.append(f"unexpected file in the store: {rel / f}")
    if IS_ROOT:
        m = mount_factory(mfs)
        for model_name in ("..%2f..%2fevil",):
            for n in names:
                if (m / model_name / n).read_bytes() != n.encode() * 50:
                    problems.append(f"mount: {model_name}/{n} differs")
        m.umount()
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------
# suite 6: POSIX read-only behaviour (pjdfstest is not packaged in Debian; see docs) and fsx


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_DNAME_OFF = 19  # glibc x86_64/aarch64 struct dirent64: d_ino 8, d_off 8, d_reclen 2, d_type 1


def _readdir_all(dp, limit=None):
    out = []
    while limit is None or len(out) < limit:
        ctypes.set_errno(0)
        ent = _libc.readdir(dp)
        if not ent:
            assert ctypes.get_errno() == 0, f"readdir: errno {ctypes.get_errno()}"
            break
        out.append(ctypes.string_at(ent + _DNAME_OFF).decode())
    return out


@pytest.fixture
def posix_mount(mfs, tmp_path, mount_factory, request):
    _need_root()
    src = tmp_path / "src"
    a = make_model(src / "A", seed=61, tensor_mib=6, n_small=40, blob_kib=700, extra_dirs=True)
    make_model(src / "B", seed=62, share_from=a["tensors"], keep=0.5, n_small=1)  # recipe
    mfs.import_(src / "A", "--name", "A", ok=True)
    mfs.import_(src / "B", "--name", "B", ok=True)
    assert mfs.ls_files("B")["model.safetensors"]["storage"] == "recipe"
    m = mount_factory(mfs, "--passthrough", request.param)
    return m, src


@pytest.mark.parametrize("posix_mount", ["auto", "off"], indirect=True)
def test_posix_read_only_subset(posix_mount):
    m, src = posix_mount
    mp = m.mountpoint
    f = mp / "A" / "model.safetensors"
    orig = (src / "A" / "model.safetensors").read_bytes()
    fails = []

    def expect_errno(label, want, fn):
        try:
            r = fn()
        except OSError as e:
            if e.errno != want:
                fails.append(f"{label}: errno {errno.errorcode.get(e.errno)} instead of {errno.errorcode[want]}")
            return
        if isinstance(r, int) and r >= 0 and label.startswith("open"):
            os.close(r)
        fails.append(f"{label}: succeeded, expected {errno.errorcode[want]}")

    # stat / fstat / lstat agree; sizes, types, modes, nlink
    st, lst = os.stat(f), os.lstat(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        fst = os.fstat(fd)
        for k in ("st_ino", "st_size", "st_mode", "st_nlink", "st_uid", "st_gid", "st_mtime_ns"):
            if not getattr(st, k) == getattr(lst, k) == getattr(fst, k):
                fails.append(f"stat/lstat/fstat disagree on {k}: {getattr(st, k)} {getattr(lst, k)} {getattr(fst, k)}")
        if st.st_size != len(orig) or not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o444:
            fails.append(f"stat of a file: size {st.st_size} mode {stat.filemode(st.st_mode)}")
        if st.st_blocks * 512 < min(len(orig), 1) or st.st_nlink < 1:
            fails.append(f"st_blocks {st.st_blocks} st_nlink {st.st_nlink}")
        # lseek: SET / CUR / END, past EOF, negative
        if os.lseek(fd, 0, os.SEEK_END) != len(orig):
            fails.append("lseek SEEK_END != size")
        if os.lseek(fd, 100, os.SEEK_SET) != 100 or os.lseek(fd, 10, os.SEEK_CUR) != 110:
            fails.append("lseek SET/CUR")
        if os.read(fd, 50) != orig[110:160] or os.lseek(fd, 0, os.SEEK_CUR) != 160:
            fails.append("read after lseek / file offset after read")
        if os.lseek(fd, len(orig) + 12345, os.SEEK_SET) != len(orig) + 12345 or os.read(fd, 10) != b"":
            fails.append("read past EOF must return 0 bytes")
        expect_errno("lseek to a negative offset", errno.EINVAL, lambda: os.lseek(fd, -1, os.SEEK_SET))
        if os.pread(fd, 7, len(orig) - 3) != orig[-3:]:
            fails.append("pread across EOF must be short")
        if os.pread(fd, 0, 5) != b"":
            fails.append("pread of 0 bytes")
        # SEEK_DATA / SEEK_HOLE: a file without holes is all data
        try:
            if os.lseek(fd, 0, os.SEEK_DATA) != 0 or os.lseek(fd, 0, os.SEEK_HOLE) != len(orig):
                fails.append("SEEK_DATA/SEEK_HOLE on a dense file")
        except OSError as e:
            fails.append(f"SEEK_DATA/SEEK_HOLE: {e!r}")
        expect_errno("write on an O_RDONLY descriptor", errno.EBADF, lambda: os.write(fd, b"x"))
        expect_errno("ftruncate on an O_RDONLY descriptor", errno.EINVAL, lambda: os.ftruncate(fd, 0))
    finally:
        os.close(fd)
    # directories
    d = mp / "A"
    dst = os.stat(d)
    if not stat.S_ISDIR(dst.st_mode) or stat.S_IMODE(dst.st_mode) != 0o555:
        fails.append(f"directory mode {stat.filemode(dst.st_mode)}")
    dfd = os.open(d, os.O_RDONLY)
    try:
        expect_errno("read() on a directory", errno.EISDIR, lambda: os.read(dfd, 1))
    finally:
        os.close(dfd)
    expect_errno("open O_DIRECTORY on a file", errno.ENOTDIR, lambda: os.open(f, os.O_RDONLY | os.O_DIRECTORY))
    expect_errno("stat through a file", errno.ENOTDIR, lambda: os.stat(f / "x"))
    expect_errno("stat of a missing name", errno.ENOENT, lambda: os.stat(d / "no-such"))
    dp = _libc.opendir(str(d).encode())
    assert dp
    try:
        first = _readdir_all(dp)
        _libc.rewinddir(dp)
        second = _readdir_all(dp)
        _libc.rewinddir(dp)
        head = _readdir_all(dp, 3)
        pos = _libc.telldir(dp)
        rest = _readdir_all(dp)
        _libc.seekdir(dp, pos)
        again = _readdir_all(dp)
    finally:
        _libc.closedir(dp)
    want = {".", ".."} | {p.name for p in (src / "A").iterdir()}
    if set(first) != want or len(first) != len(want):
        fails.append(f"readdir: {sorted(first)} != {sorted(want)}")
    if sorted(second) != sorted(first):
        fails.append("readdir after rewinddir differs")
    if head + rest != first or again != rest:
        fails.append("telldir/seekdir do not resume where they left off")
    big = mp / "A" / "extra"
    n_entries = len(os.listdir(big))
    if n_entries != 40:
        fails.append(f"directory with 40 files lists {n_entries}")
    # access(2)
    if not os.access(f, os.R_OK):
        fails.append("access R_OK")
    if os.access(f, os.W_OK):
        fails.append("access W_OK succeeded on a read-only mount")
    try:
        os.access(f, os.W_OK)
        r = _libc.access(str(f).encode(), os.W_OK)
        if r == 0 or ctypes.get_errno() != errno.EROFS:
            fails.append(f"access(W_OK): errno {errno.errorcode.get(ctypes.get_errno())} instead of EROFS")
    except OSError:
        pass
    if os.access(f, os.X_OK):
        fails.append("access X_OK succeeded on a 0444 file")
    if not os.access(d, os.X_OK):
        fails.append("access X_OK on a directory")
    # readlink on a non-link, the EROFS family
    expect_errno("readlink of a regular file", errno.EINVAL, lambda: os.readlink(f))
    expect_errno("readlink of a directory", errno.EINVAL, lambda: os.readlink(d))
    expect_errno("open O_CREAT new file", errno.EROFS, lambda: os.open(d / "new", os.O_CREAT | os.O_WRONLY, 0o644))
    expect_errno("open O_CREAT|O_EXCL existing", errno.EEXIST,
                 lambda: os.open(f, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o644))
    expect_errno("open O_WRONLY", errno.EROFS, lambda: os.open(f, os.O_WRONLY))
    expect_errno("open O_RDWR", errno.EROFS, lambda: os.open(f, os.O_RDWR))
    expect_errno("open O_RDONLY|O_TRUNC", errno.EROFS, lambda: os.open(f, os.O_RDONLY | os.O_TRUNC))
    expect_errno("utimensat(UTIME_NOW)", errno.EROFS, lambda: os.utime(f, None))
    expect_errno("utimensat(times)", errno.EROFS, lambda: os.utime(f, ns=(1, 1)))
    expect_errno("mknod", errno.EROFS, lambda: os.mknod(d / "node", 0o644 | stat.S_IFREG))
    if os.stat(f).st_size != len(orig) or f.read_bytes() != orig:
        fails.append("file changed")
    # O_CREAT on an existing file without O_EXCL/O_WRONLY opens it (nothing to create)
    try:
        os.close(os.open(f, os.O_CREAT | os.O_RDONLY, 0o644))
    except OSError as e:
        fails.append(f"open O_CREAT|O_RDONLY of an existing file: {e!r}")
    assert not fails, f"[{m.args}] POSIX read-only behaviour:\n" + "\n".join(fails)


@pytest.mark.parametrize("posix_mount", ["auto", "off"], indirect=True)
def test_fsx_read_only(posix_mount, capsys):
    """fsx in read-only mode: random lseek+read, pread, mmap slices, fstat, reopen, over a
    whole-file object (passthrough in auto), a recipe, a CDC blob and small files; every
    result compared with the original."""
    m, src = posix_mount
    n_ops = scaled(3000, 50000)
    keys = ["A/model.safetensors", "B/model.safetensors", "A/blob.bin", "A/config.json", "A/empty.txt",
            "A/extra/s0000.bin"]
    origs = {k: (src / k).read_bytes() for k in keys}
    rng = random.Random(99)
    handles = {}

    def handle(k):
        if k not in handles:
            fd = os.open(m / k, os.O_RDONLY)
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if origs[k] else None
            handles[k] = (fd, mm)
        return handles[k]

    counts = {}
    try:
        for i in range(n_ops):
            k = rng.choice(keys)
            want_all = origs[k]
            size = len(want_all)
            fd, mm = handle(k)
            op = rng.choice(["read", "pread", "mmap", "fstat", "reopen", "seek_end"])
            counts[op] = counts.get(op, 0) + 1
            off = rng.randrange(0, size + 2) if rng.random() < 0.9 else max(0, size - rng.randint(0, 8192))
            n = rng.choice([1, 7, 512, 4096, 4097, 65536, 131071, MiB + 3, rng.randint(1, 3 * MiB)])
            want = want_all[off:off + n]
            ctx = f"op {i} {op} {k} off {off} len {n}"
            if op == "read":
                os.lseek(fd, off, os.SEEK_SET)
                got = b""
                while len(got) < n:
                    b = os.read(fd, n - len(got))
                    if not b:
                        break
                    got += b
                assert got == want, f"{ctx}: differs at {first_diff(got, want)}"
                assert os.lseek(fd, 0, os.SEEK_CUR) == off + len(want), f"{ctx}: offset after read"
            elif op == "pread":
                got = pread_full(fd, n, off)
                assert got == want, f"{ctx}: differs at {first_diff(got, want)}"
            elif op == "mmap":
                if mm is not None:
                    got = mm[off:off + n]
                    assert got == want, f"{ctx}: differs at {first_diff(got, want)}"
            elif op == "fstat":
                assert os.fstat(fd).st_size == size, ctx
            elif op == "seek_end":
                assert os.lseek(fd, 0, os.SEEK_END) == size, ctx
            elif op == "reopen":
                fd, mm = handles.pop(k)
                if mm is not None:
                    mm.close()
                os.close(fd)
    finally:
        for fd, mm in handles.values():
            if mm is not None:
                mm.close()
            os.close(fd)
    assert m.stats()["eio"] == 0
    report(capsys, f"fsx read-only [{' '.join(m.args)}]: {n_ops} ops {counts}, 0 mismatches")
