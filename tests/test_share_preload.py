"""The preload library (libmodelfs_preload.so in LD_PRELOAD, or `modelfs exec`): a process
that mmaps a file on a modelfs mount gets the pages that an object holds at a congruent
offset mapped from the store's object files, and the file's own pages for the rest.

Everything runs against a real mount of a generated family (a bf16 safetensors base, a
head fine-tune, a SHIFTED variant whose data offsets differ by a non-multiple of 4096, a
torch zip checkpoint of the base's tensors, a GGUF base and a GGUF fine-tune), in worker
subprocesses started with LD_PRELOAD, as users get it:

* every page of every mapping equals the original file (whole files, offsets, lengths
  that end mid-page and past the end of the file), private and shared read-only;
* fork, partial munmap, mremap (grow, shrink, move), MAP_SHARED with PROT_WRITE (refused
  just as without the library), writes into private mappings stay private;
* files not on modelfs are left alone; MODELFS_SHARE=0 gives today's plain mappings;
* shared pages measured in /proc/PID/smaps: processes mapping different models of the
  family map the base object's pages, with Pss well below Rss;
* real loaders through the library alone (no Python hook): safetensors (memmap2),
  torch.load(mmap=True), numpy.memmap, gguf's GGUFReader;
* security and failure: a user without access to the mount gets nothing (not the file,
  not a layout for a descriptor of another file, not one for an O_PATH descriptor); the
  daemon killed while mappings exist, and restarted; rm + gc while mapped (pages refault
  from the objects, no zeros); a corrupted chunk is left out of the layout and reads EIO.

A mount that serves no layout socket, or a missing preload library, fails the tests
loudly (never skips).
"""

from __future__ import annotations

import array
import ctypes
import errno
import hashlib
import json
import mmap
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
PYDIR = REPO / "python"
for d in (PYDIR, TESTS_DIR):
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))

PAGE = 4096
MiB = 1 << 20
WORKER_TIMEOUT = 300.0

# ==========================================================================================
# the worker (this file run as a script, with LD_PRELOAD set by the test)

_libc = ctypes.CDLL(None, use_errno=True)  # global lookup: finds the preloaded mmap first
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4


def _maps():
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split(None, 5)
            lo, hi = (int(v, 16) for v in p[0].split("-"))
            rows.append((lo, hi, int(p[2], 16), p[5].strip() if len(p) > 5 else ""))
    return rows


def _regions(addr, length):
    """[lo, hi, file offset, path] of every kernel mapping inside [addr, addr+length)."""
    out = []
    for lo, hi, off, path in _maps():
        if hi > addr and lo < addr + length:
            out.append([max(lo, addr), min(hi, addr + length), off, path])
    return out


def _where(ptr, n):
    """{path of a mapping ("" = anonymous): bytes of [ptr, ptr+n) it holds}."""
    out = {}
    for lo, hi, _off, path in _maps():
        if hi > ptr and lo < ptr + n:
            out[path] = out.get(path, 0) + min(hi, ptr + n) - max(lo, ptr)
    return out


def _compare(addr, length, ref, ref_offset):
    """Compare the mapping with the reference file page by page; the first bad page or None.
    Bytes past the end of the file read as zeros in the last page, as mmap(2) says."""
    with open(ref, "rb") as f:
        f.seek(ref_offset)
        want = f.read(length)
    want += b"\0" * (min(length, -(-len(want) // PAGE) * PAGE) - len(want))
    got = ctypes.string_at(addr, len(want))
    if got == want:
        return None
    for p in range(0, len(want), PAGE):
        if got[p:p + PAGE] != want[p:p + PAGE]:
            return p
    return -1


def _digest(x):
    import numpy as np

    if hasattr(x, "data_ptr"):
        import torch

        b = x.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        ptr, n = x.data_ptr(), x.numel() * x.element_size()
    else:
        b = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        ptr, n = x.__array_interface__["data"][0], x.nbytes
    return [hashlib.sha256(b).hexdigest(), _where(ptr, n), n]


def worker() -> int:
    maps = {}  # id -> [addr, length]
    keep = {}  # loader results kept alive
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            res = {}
            if op == "map":
                fd = os.open(cmd["path"], os.O_RDWR if cmd.get("open_rw") else os.O_RDONLY)
                try:
                    prot = mmap.PROT_READ | (mmap.PROT_WRITE if "w" in cmd.get("prot", "r") else 0)
                    flags = mmap.MAP_SHARED if cmd.get("shared") else mmap.MAP_PRIVATE
                    length = cmd.get("length") or (os.fstat(fd).st_size - cmd.get("offset", 0))
                    addr = _libc.mmap(None, length, prot, flags, fd, cmd.get("offset", 0))
                    if addr == MAP_FAILED or addr is None:
                        res = {"errno": ctypes.get_errno()}
                    else:
                        maps[cmd["id"]] = [addr, length]
                        res = {"addr": addr, "length": length}
                finally:
                    os.close(fd)  # the mapping keeps the file; loaders close too
            elif op == "compare":  # the mapping, or [at, at+n) of it
                addr, length = maps[cmd["id"]]
                at = cmd.get("at", 0)
                n = cmd.get("n") or length - at
                bad = _compare(addr + at, n, cmd["ref"], cmd.get("ref_offset", 0) + at)
                res = {"bad_page": None if bad is None else bad + at}
            elif op == "regions":
                addr, length = maps[cmd["id"]]
                res = {"regions": _regions(addr, length)}
            elif op == "touch":  # fault in every page
                addr, length = maps[cmd["id"]]
                s = 0
                for p in range(0, length, PAGE):
                    s += ctypes.c_ubyte.from_address(addr + p).value
                res = {"sum": s}
            elif op == "write":
                addr, _ = maps[cmd["id"]]
                ctypes.memset(addr + cmd["at"], cmd.get("byte", 0x5A), cmd["n"])
            elif op == "munmap":
                addr, _ = maps[cmd["id"]]
                res = {"rc": _libc.munmap(addr + cmd["at"], cmd["n"]), "errno": ctypes.get_errno()}
            elif op == "forget":
                maps.pop(cmd["id"])
            elif op == "mremap":
                addr, length = maps[cmd["id"]]
                new = _libc.mremap(addr, length, cmd["new_len"], cmd.get("flags", MREMAP_MAYMOVE),
                                   None)
                if new == MAP_FAILED or new is None:
                    res = {"errno": ctypes.get_errno()}
                else:
                    maps[cmd["id"]] = [new, cmd["new_len"]]
                    res = {"addr": new, "moved": new != addr}
            elif op == "dontneed":  # drop this process's pages: the next access refaults
                addr, length = maps[cmd["id"]]
                at = cmd.get("at", 0)
                res = {"rc": _libc.madvise(addr + at, cmd.get("n", length - at), MADV_DONTNEED)}
            elif op == "fork":
                addr, length = maps[cmd["id"]]
                pid = os.fork()
                if pid == 0:
                    ok = _compare(addr, length, cmd["ref"], cmd.get("ref_offset", 0)) is None
                    if ok and cmd.get("child_writes"):
                        ctypes.memset(addr, 0xEE, length // 2)
                        ok = ctypes.string_at(addr, 16) == b"\xee" * 16
                    os._exit(0 if ok else 1)
                _, status = os.waitpid(pid, 0)
                res = {"child_ok": os.waitstatus_to_exitcode(status) == 0,
                       "parent_bad_page": _compare(addr, length, cmd["ref"], cmd.get("ref_offset", 0))}
            elif op == "numpy_memmap":
                import numpy as np

                a = np.memmap(cmd["path"], dtype=np.uint8, mode=cmd.get("mode", "r"))
                keep[cmd["id"]] = a
                want = np.fromfile(cmd["ref"], dtype=np.uint8)
                res = {"equal": bool(np.array_equal(a, want)),
                       "regions": _regions(a.__array_interface__["data"][0], a.nbytes)}
            elif op == "load":  # a real loader; digests and where every tensor's data lies
                api = cmd["api"]
                if api == "load_file":
                    from safetensors.torch import load_file

                    t = load_file(cmd["path"])
                elif api == "torch_load":
                    import torch

                    t = torch.load(cmd["path"], map_location="cpu", weights_only=True, mmap=True)
                elif api == "gguf":
                    from gguf import GGUFReader

                    r = GGUFReader(cmd["path"])
                    t = {x.name: x.data for x in r.tensors}
                    keep[cmd["id"] + "/reader"] = r
                else:
                    raise ValueError(api)
                keep[cmd["id"]] = t
                res = {"tensors": {k: _digest(v) for k, v in t.items()}}
            elif op == "drop":
                keep.pop(cmd["id"], None)
                keep.pop(cmd["id"] + "/reader", None)
                import gc

                gc.collect()
            elif op == "exit":
                print(json.dumps({"ok": True}), flush=True)
                return 0
            else:
                raise ValueError(op)
            print(json.dumps({"ok": True, **res}), flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test
            import traceback

            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}",
                              "trace": traceback.format_exc()}), flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    sys.exit(worker())


# ==========================================================================================
# the tests

import pytest  # noqa: E402

import mountlib  # noqa: E402
from conftest import Modelfs  # noqa: E402
from modelfs import share  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module", autouse=True)
def _no_mount_left_behind():
    yield
    mountlib.cleanup_all()


@pytest.fixture(scope="session")
def preload_lib(modelfs_bin):
    """The library `modelfs exec` would use (next to the binary in a cargo build)."""
    r = subprocess.run([modelfs_bin, "exec", "--print-env"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"`modelfs exec --print-env` failed: no preload library? {r.stderr}",
                    pytrace=False)
    env = dict(line.split("=", 1) for line in r.stdout.splitlines())
    lib = env["LD_PRELOAD"].split(":")[0]
    assert Path(lib).is_file(), lib
    assert env["MODELFS_SHARE"] == "1"
    return lib


class Worker:
    def __init__(self, lib, env=None, prefix=()):
        e = dict(os.environ)
        for k in ("MODELFS_SHARE", "MODELFS_SHARE_DEBUG", "LD_PRELOAD"):
            e.pop(k, None)
        if lib:
            e["LD_PRELOAD"] = lib  # the library alone: MODELFS_SHARE unset keeps the Python hook off
        e["PYTHONPATH"] = os.pathsep.join([str(PYDIR), *filter(None, [e.get("PYTHONPATH")])])
        e.update(env or {})
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*prefix, sys.executable, str(Path(__file__).resolve()),
                                      "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=e, cwd="/")
        self.buf = b""

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode("utf-8", "replace")

    def call(self, op, timeout=WORKER_TIMEOUT, **kw):
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"worker {op} took over {timeout}s\n{self.stderr()[-3000:]}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    code = self.proc.wait()
                    raise AssertionError(f"worker died ({code}) during {op}:\n{self.stderr()[-5000:]}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        res = json.loads(line)
        assert res["ok"], f"worker {op} failed: {res['error']}\n{res['trace']}\n{self.stderr()[-3000:]}"
        return res

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call("exit", timeout=30)
            except (AssertionError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


@pytest.fixture
def workers(preload_lib):
    made = []

    def make(lib=True, env=None, prefix=()):
        w = Worker(preload_lib if lib else None, env, prefix)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


# ------------------------------------------------------------------------------------------
# the family and its mount


def _rand_bf16(rng, shape):
    import torch

    return torch.from_numpy(rng.standard_normal(shape, dtype="float32")).to(torch.bfloat16)


def _write_gguf(path, tensors, note):
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", note)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Family:
    """base, ft-head (last tensor replaced), shifted (+ a 12-byte tensor and other header
    metadata), torch-ckpt (the base's tensors with torch.save), gguf-base, gguf-ft."""

    def __init__(self, root: Path):
        import numpy as np
        import torch
        from safetensors.torch import save_file

        self.root = root
        rng = np.random.default_rng(7)
        base = {f"layers.{i}.{p}": _rand_bf16(rng, (512, 1024)) for i in range(6) for p in ("a", "b")}
        base["lm_head.weight"] = _rand_bf16(rng, (1024, 1024))
        self.last = "lm_head.weight"
        ft = dict(base)
        ft[self.last] = _rand_bf16(rng, (1024, 1024))
        sh = dict(base)
        sh["aa.extra"] = torch.arange(3, dtype=torch.float32)
        for key, sd, meta in (("base", base, {"format": "pt"}), ("ft-head", ft, {"format": "pt"}),
                              ("shifted", sh, {"format": "pt", "note": "shifted" * 3})):
            (root / key).mkdir(parents=True)
            save_file(sd, str(root / key / "model.safetensors"), metadata=meta)
            (root / key / "config.json").write_text(json.dumps({"model": key}))
        (root / "torch-ckpt").mkdir()
        torch.save(base, root / "torch-ckpt" / "pytorch_model.bin")
        g = {f"blk.{i}.w": rng.standard_normal((256, 1024), dtype="float32") for i in range(6)}
        _write_gguf(root / "gguf-base" / "model.gguf", g, "base")
        g2 = dict(g)
        g2["blk.5.w"] = rng.standard_normal((256, 1024), dtype="float32")
        _write_gguf(root / "gguf-ft" / "model.gguf", g2, "base")  # same header length
        self.keys = ["base", "ft-head", "shifted", "torch-ckpt", "gguf-base", "gguf-ft"]
        self.files = {"base": "base/model.safetensors", "ft-head": "ft-head/model.safetensors",
                      "shifted": "shifted/model.safetensors",
                      "torch-ckpt": "torch-ckpt/pytorch_model.bin",
                      "gguf-base": "gguf-base/model.gguf", "gguf-ft": "gguf-ft/model.gguf"}
        self.unrelated = root / "unrelated.bin"
        self.unrelated.write_bytes(rng.bytes(2 * MiB))

    def orig(self, key) -> Path:
        return self.root / self.files[key]


@pytest.fixture(scope="module")
def fam(tmp_path_factory, required_libs):
    return Family(tmp_path_factory.mktemp("preload-family"))


def _store(modelfs_bin, fam, where: Path) -> Modelfs:
    mfs = Modelfs(modelfs_bin, where / "store")
    mfs.run("init", ok=True)
    for k in fam.keys:
        mfs.import_(fam.root / k, "--name", k, ok=True)
    return mfs


def _start(mfs, mp, *args) -> mountlib.Mount:
    m = mountlib.Mount(mfs, mp, *args)
    m.start_daemon()
    dev = os.stat(mp).st_dev
    if not share.socket_paths(dev):
        m.cleanup()
        pytest.fail(f"the mount serves no layout socket ({share.socket_name(dev)} in none of "
                    f"{share.runtime_dirs()})\n{m.describe()}", pytrace=False)
    m.objects_dir = os.path.realpath(mfs.store / "objects")
    return m


@pytest.fixture(scope="module")
def fmount(modelfs_bin, fam, tmp_path_factory):
    mfs = _store(modelfs_bin, fam, tmp_path_factory.mktemp("preload-store"))
    m = _start(mfs, tmp_path_factory.mktemp("preload-mnt"))
    try:
        yield m
    finally:
        m.cleanup()


def mounted(m, fam, key) -> str:
    return str(m.mountpoint / fam.files[key])


def object_bytes(m, regions) -> int:
    return sum(hi - lo for lo, hi, _o, p in regions if p.startswith(m.objects_dir + "/"))


def file_regions(regions, path) -> int:
    return sum(hi - lo for lo, hi, _o, p in regions if p == path)


def smaps(pid):
    rows, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                p = line.split(None, 5)
                cur = {"path": p[5].strip() if len(p) > 5 else ""}
                rows.append(cur)
            elif first.endswith(":") and cur is not None:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    cur[first[:-1]] = int(parts[1]) * 1024
    return rows


# ------------------------------------------------------------------------------------------
# bytes: every page equals the file


def test_every_page_of_every_file_equals_the_original(workers, fam, fmount):
    w = workers()
    total_obj = {}
    for key in fam.keys:
        path = mounted(fmount, fam, key)
        size = os.path.getsize(path)
        cases = [(0, None), (PAGE, None), (3 * PAGE, size - 3 * PAGE - 1234), (0, size + 3 * PAGE)]
        for i, (off, length) in enumerate(cases):
            mid = f"{key}-{i}"
            r = w.call("map", id=mid, path=path, offset=off, length=length)
            assert "addr" in r, f"mmap of {path} at {off} failed: {os.strerror(r['errno'])}"
            if length is None or off + length <= size:
                bad = w.call("compare", id=mid, ref=str(fam.orig(key)), ref_offset=off)["bad_page"]
                assert bad is None, f"{key} mapped at {off}: page at +{bad} differs from the original"
            else:  # past the end: only the file's pages are checked (the rest would SIGBUS)
                r2 = w.call("map", id=mid + "x", path=path, offset=off, length=size)
                assert w.call("compare", id=mid + "x", ref=str(fam.orig(key)))["bad_page"] is None
            regs = w.call("regions", id=mid)["regions"]
            if i == 0:
                total_obj[key] = object_bytes(fmount, regs)
    sizes = {k: os.path.getsize(fam.orig(k)) for k in fam.keys}
    print({k: f"{total_obj[k] / sizes[k]:.0%} of {sizes[k]} from objects" for k in fam.keys})
    # A base stored whole maps entirely from its object; a fine-tune that keeps the base's
    # offsets maps every byte it shares with it (its own tensors sit in a packed object at
    # offsets that do not agree with the file's). The shifted variant and the torch
    # checkpoint share bytes at other offsets mod 4096: the library cannot map those (the
    # Python hook does, per tensor).
    replaced = {"base": 0, "gguf-base": 0, "ft-head": 1024 * 1024 * 2, "gguf-ft": 256 * 1024 * 4}
    for key, new_bytes in replaced.items():
        want = sizes[key] - new_bytes
        assert total_obj[key] >= want - 2 * PAGE, (key, total_obj[key], want)


def test_shared_read_only_mapping_and_shared_writable_refused(workers, fam, fmount):
    w = workers()
    path = mounted(fmount, fam, "ft-head")
    r = w.call("map", id="s", path=path, shared=True)
    assert "addr" in r
    assert w.call("compare", id="s", ref=str(fam.orig("ft-head")))["bad_page"] is None
    assert object_bytes(fmount, w.call("regions", id="s")["regions"]) > 0
    # The mount is read-only: MAP_SHARED|PROT_WRITE needs a writable descriptor, which
    # open() refuses, and of a read-only one the kernel refuses the mapping (EACCES), with
    # the library as without it.
    with pytest.raises(AssertionError, match="Read-only file system"):
        w.call("map", id="sw", path=path, shared=True, prot="rw", open_rw=True)
    r = w.call("map", id="sw", path=path, shared=True, prot="rw")
    assert r.get("errno") == errno.EACCES, r
    plain = workers(lib=False)
    assert plain.call("map", id="sw", path=path, shared=True, prot="rw").get("errno") == errno.EACCES


def test_private_writes_stay_private(workers, fam, fmount):
    a, b = workers(), workers()
    path = mounted(fmount, fam, "base")
    for w in (a, b):
        w.call("map", id="m", path=path, prot="rw")
    # write over object pages (and the header page) in a
    a.call("write", id="m", at=0, n=64)
    a.call("write", id="m", at=8 * PAGE, n=3 * PAGE)
    assert a.call("compare", id="m", ref=str(fam.orig("base")))["bad_page"] == 0
    assert b.call("compare", id="m", ref=str(fam.orig("base")))["bad_page"] is None
    c = workers()
    c.call("map", id="m", path=path)
    assert c.call("compare", id="m", ref=str(fam.orig("base")))["bad_page"] is None
    with open(path, "rb") as f, open(fam.orig("base"), "rb") as o:
        assert f.read() == o.read(), "a private write reached the mount"


def test_fork_partial_munmap_and_mremap(workers, fam, fmount):
    w = workers()
    key = "ft-head"
    path, ref = mounted(fmount, fam, key), str(fam.orig(key))
    size = os.path.getsize(path)
    w.call("map", id="f", path=path, prot="rw")
    r = w.call("fork", id="f", ref=ref, child_writes=True)
    assert r["child_ok"], "the child of fork saw other bytes than the file"
    assert r["parent_bad_page"] is None, "a child's write into the private mapping reached the parent"

    # partial munmap in the middle: the rest stays mapped and correct
    w.call("map", id="p", path=path)
    regs = w.call("regions", id="p")["regions"]
    assert object_bytes(fmount, regs) > 0
    assert w.call("munmap", id="p", at=16 * PAGE, n=32 * PAGE)["rc"] == 0
    left = w.call("regions", id="p")["regions"]
    assert sum(hi - lo for lo, hi, _o, _p in left) == size - 32 * PAGE
    w.call("munmap", id="p", at=0, n=16 * PAGE)
    w.call("forget", id="p")

    # mremap: shrink in place, then grow (which must move and rebuild), then check the bytes
    w.call("map", id="r", path=path, length=size // 2 // PAGE * PAGE)
    r = w.call("mremap", id="r", new_len=size // 4 // PAGE * PAGE)
    assert "addr" in r and not r["moved"], r
    assert w.call("compare", id="r", ref=ref)["bad_page"] is None
    r = w.call("mremap", id="r", new_len=size)
    assert "addr" in r, f"mremap grow failed: {os.strerror(r.get('errno', 0))}"
    assert w.call("compare", id="r", ref=ref)["bad_page"] is None, "bytes differ after mremap grow"
    assert object_bytes(fmount, w.call("regions", id="r")["regions"]) > size // 2, \
        "the grown mapping is not built from the objects again"
    # a private writable mapping keeps its changes across a move
    w.call("map", id="rw", path=path, prot="rw", length=size // 2 // PAGE * PAGE)
    w.call("write", id="rw", at=5 * PAGE, n=10, byte=0x11)
    w.call("mremap", id="rw", new_len=size)
    bad = w.call("compare", id="rw", ref=ref)["bad_page"]
    assert bad == 5 * PAGE, f"the written page was not carried over by mremap (first bad {bad})"


def test_files_not_on_modelfs_and_feature_off_are_untouched(workers, fam, fmount):
    w = workers()
    r = w.call("map", id="u", path=str(fam.unrelated))
    regs = w.call("regions", id="u")["regions"]
    assert [p for _lo, _hi, _o, p in regs] == [str(fam.unrelated)], regs
    assert w.call("compare", id="u", ref=str(fam.unrelated))["bad_page"] is None
    # an ext4 copy of a model file: same bytes, not on the mount, so no objects
    w.call("map", id="o", path=str(fam.orig("base")))
    assert object_bytes(fmount, w.call("regions", id="o")["regions"]) == 0

    off = workers(env={"MODELFS_SHARE": "0"})
    path = mounted(fmount, fam, "base")
    off.call("map", id="b", path=path)
    regs = off.call("regions", id="b")["regions"]
    assert object_bytes(fmount, regs) == 0 and file_regions(regs, path) > 0, regs
    assert off.call("compare", id="b", ref=str(fam.orig("base")))["bad_page"] is None
    plain = workers(lib=False)
    plain.call("map", id="b", path=path)
    assert object_bytes(fmount, plain.call("regions", id="b")["regions"]) == 0


def test_modelfs_exec_switches_it_on(modelfs_bin, fam, fmount):
    path = mounted(fmount, fam, "ft-head")
    code = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, "
            "prot=mmap.PROT_READ); m[len(m)//2]; import os; "
            "print(sum(1 for l in open('/proc/self/maps') if sys.argv[2] in l))")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MODELFS_SHARE")}
    r = subprocess.run([modelfs_bin, "exec", "--", sys.executable, "-c", code, path,
                        fmount.objects_dir], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0, "python's mmap module under `modelfs exec` maps no store object"
    r = subprocess.run([modelfs_bin, "exec", "--", "/nonexistent-program"], capture_output=True,
                       text=True)
    assert r.returncode == 127 and "/nonexistent-program" in r.stderr, (r.returncode, r.stderr)


# ------------------------------------------------------------------------------------------
# pages shared between processes, measured


def test_processes_of_different_models_share_the_base_pages(workers, fam, fmount):
    """One process per model: two map the safetensors base and its fine-tune with plain
    mmap, two load the GGUF base and its fine-tune with gguf's GGUFReader (numpy.memmap,
    every tensor hashed). The pages each pair shares are one set: Pss well below Rss."""
    ws = {}
    for key in ("base", "ft-head"):
        w = workers()
        w.call("map", id="m", path=mounted(fmount, fam, key))
        w.call("touch", id="m")
        ws[key] = w
    for key in ("gguf-base", "gguf-ft"):
        w = workers()
        w.call("load", id="g", path=mounted(fmount, fam, key), api="gguf")
        ws[key] = w
    report = {}
    for key, w in ws.items():
        rows = [r for r in smaps(w.pid) if r["path"].startswith(fmount.objects_dir + "/")]
        rss, pss = sum(r.get("Rss", 0) for r in rows), sum(r.get("Pss", 0) for r in rows)
        report[key] = (rss, pss)
    print("object mappings Rss/Pss:", report)
    for key in ("base", "ft-head", "gguf-base", "gguf-ft"):
        rss, pss = report[key]
        size = os.path.getsize(fam.orig(key))
        assert rss >= 0.9 * size, (key, rss, size)
        # two processes map the same ~85% of the pages: Pss is about 60% of Rss
        assert pss < 0.7 * rss, f"{key}: Pss {pss} vs Rss {rss}: the base's pages are not shared"


def test_real_loaders_through_the_library(workers, fam, fmount):
    """safetensors load_file (memmap2), torch.load(mmap=True), numpy.memmap and gguf's
    GGUFReader, with the library alone: bytes equal the originals', tensors of the base
    and its same-offset fine-tune lie on object mappings."""
    w, plain = workers(), workers(lib=False)
    for key, api in (("base", "load_file"), ("ft-head", "load_file"), ("shifted", "load_file"),
                     ("torch-ckpt", "torch_load"), ("gguf-base", "gguf"), ("gguf-ft", "gguf")):
        got = w.call("load", id=key, path=mounted(fmount, fam, key), api=api)["tensors"]
        want = plain.call("load", id=key, path=str(fam.orig(key)), api=api)["tensors"]
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}, key
        on_obj = sum(b for _h, where, _n in got.values() for p, b in where.items()
                     if p.startswith(fmount.objects_dir + "/"))
        total = sum(n for _h, _w, n in got.values())
        print(f"{key} ({api}): {on_obj / total:.0%} of tensor bytes on object mappings")
        if key in ("base", "ft-head", "gguf-base", "gguf-ft"):
            assert on_obj >= 0.9 * total, (key, on_obj, total)
    r = w.call("numpy_memmap", id="np", path=mounted(fmount, fam, "base"), ref=str(fam.orig("base")))
    assert r["equal"] and object_bytes(fmount, r["regions"]) > 0
    r = w.call("numpy_memmap", id="npc", path=mounted(fmount, fam, "base"),
               ref=str(fam.orig("base")), mode="c")
    assert r["equal"] and object_bytes(fmount, r["regions"]) > 0


# ------------------------------------------------------------------------------------------
# security and failures


def _as_nobody(*argv, timeout=60):
    return subprocess.run([*mountlib.NOBODY, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


_NOBODY_PROBE = r"""
import array, json, os, socket, struct, sys
sys.path.insert(0, sys.argv[1])
from modelfs import share
path, other = sys.argv[2], sys.argv[3]
out = {}
try:
    os.open(path, os.O_RDONLY)
    out["open"] = "ok"
except OSError as e:
    out["open"] = e.errno
sockets = share.socket_paths(int(sys.argv[4]))
out["sockets"] = sockets
def ask(fd):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(sockets[0])
    except OSError as e:
        return ["connect", e.errno]
    s.sendmsg([share.encode_request(0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    data, anc, _f, _a = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
    return [struct.unpack_from("<i", data, 8)[0], sum(len(p) // 4 for _l, _t, p in anc)]
fd = os.open(other, os.O_RDONLY)
out["other_file"] = ask(fd) if sockets else None
try:
    pfd = os.open(path, os.O_PATH)
    out["o_path"] = ask(pfd)
except OSError as e:
    out["o_path"] = ["open", e.errno]
print(json.dumps(out))
"""


_NOBODY_MAP = ("import mmap,sys; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); "
               "m[len(m)//2]; print(sum(1 for l in open('/proc/self/maps') if sys.argv[2] in l))")


def test_a_user_without_access_gets_nothing(preload_lib, fam, fmount, modelfs_bin, tmp_path_factory):
    """The root-owned mount (no --allow-other) is closed to nobody: nobody cannot open its
    files, and the layout socket answers a descriptor of any other file (EXDEV) or an
    O_PATH descriptor (which needs no read access) with an error and no object. The same
    store mounted --allow-other is open to nobody, sharing included (the positive control)."""
    if not IS_ROOT:
        pytest.fail("this test switches to user nobody with setpriv: run the suite as root")
    path = mounted(fmount, fam, "base")
    dev = os.stat(path).st_dev
    work = Path(tempfile.mkdtemp(dir="/var/tmp"))
    work.chmod(0o755)
    other = work / "mine.bin"
    other.write_bytes(os.urandom(200_000))
    other.chmod(0o644)
    env = {**os.environ, "LD_PRELOAD": preload_lib}
    env.pop("MODELFS_SHARE", None)
    try:
        r = _as_nobody(sys.executable, "-c", _NOBODY_PROBE, PYDIR, path, other, dev)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["open"] == errno.EACCES, f"nobody opened a root-only mount's file: {out}"
        assert out["o_path"] == ["open", errno.EACCES], out  # not even a path descriptor
        assert out["sockets"], "the layout socket should be reachable (the refusal is the test)"
        assert out["other_file"] == [errno.EXDEV, 0], out
        # a descriptor that carries no read access (O_PATH, which needs none) is refused,
        # even from root
        r = subprocess.run([sys.executable, "-c", _NOBODY_PROBE, str(PYDIR), path, str(other),
                            str(dev)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["open"] == "ok" and out["o_path"] == [errno.EBADF, 0], out
        # nobody's own file, mapped through the library: untouched
        r = subprocess.run([*mountlib.NOBODY, sys.executable, "-c", _NOBODY_MAP, other,
                            fmount.objects_dir], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "0", (r.stdout, r.stderr)

        mp = work / "open-mnt"
        mp.mkdir()
        m2 = _start(fmount.mfs, mp, "--allow-other")
        try:
            r = subprocess.run([*mountlib.NOBODY, sys.executable, "-c", _NOBODY_MAP,
                                mp / fam.files["base"], fmount.objects_dir],
                               capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, r.stderr
            assert int(r.stdout) > 0, "nobody may read the --allow-other mount but got no sharing"
        finally:
            m2.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_daemon_killed_and_restarted_while_mapped(workers, fam, modelfs_bin, tmp_path_factory):
    mfs = _store(modelfs_bin, fam, tmp_path_factory.mktemp("kill-store"))
    mp = tmp_path_factory.mktemp("kill-mnt")
    m = _start(mfs, mp)
    try:
        w = workers()
        key = "ft-head"
        path, ref = mounted(m, fam, key), str(fam.orig(key))
        w.call("map", id="k", path=path)
        w.call("touch", id="k")
        regs = w.call("regions", id="k")["regions"]
        assert object_bytes(m, regs) > 0
        for pid in mountlib.modelfs_pids(modelfs_bin, mp):
            os.kill(pid, signal.SIGKILL)
        assert mountlib.wait_until(lambda: not mountlib.modelfs_pids(modelfs_bin, mp), 10)
        # every page was faulted in before: the whole mapping still reads right
        assert w.call("compare", id="k", ref=ref)["bad_page"] is None
        # object pages dropped from the process refault from the object files, which the
        # mapping holds open: no daemon needed
        addr = regs[0][0]
        for lo, hi, _off, p in regs:
            if p.startswith(m.objects_dir + "/"):
                assert w.call("dontneed", id="k", at=lo - addr, n=hi - lo)["rc"] == 0
        assert w.call("compare", id="k", ref=ref)["bad_page"] is None
        mountlib.force_unmount(mp)
        m.start_daemon()
        assert share.socket_paths(os.stat(mp).st_dev), "the restarted mount serves no layouts"
        w.call("map", id="k2", path=path)
        assert w.call("compare", id="k2", ref=ref)["bad_page"] is None
        assert object_bytes(m, w.call("regions", id="k2")["regions"]) > 0
    finally:
        m.cleanup()


def test_rm_and_gc_while_mapped(workers, fam, modelfs_bin, tmp_path_factory):
    """gc while a process maps a removed model: X replaced two of the base's tensors, Y
    reuses one of X's, so after `rm X` gc wants to punch X's other tensor out of X's
    object. The mapping holds the store's shared lock on that object (the mount's locked
    descriptor, passed with the layout): gc leaves it alone (objects_busy), and the pages,
    dropped from the process and from the page cache, refault from disk with the right
    bytes. Once the mapping is gone, gc punches."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path_factory.mktemp("gc-src")
    base = load_file(str(fam.orig("base")))
    x = dict(base)
    x["layers.0.a"] = torch.full_like(base["layers.0.a"], 1.5)
    x["layers.3.a"] = torch.full_like(base["layers.3.a"], -2.5)
    y = dict(base)
    y["layers.0.a"] = x["layers.0.a"]
    for k, sd in (("x", x), ("y", y)):
        (src / k).mkdir()
        save_file(sd, str(src / k / "model.safetensors"), metadata={"format": "pt"})
    where = tmp_path_factory.mktemp("gc-store")
    mfs = Modelfs(modelfs_bin, where / "store")
    mfs.run("init", ok=True)
    mfs.import_(fam.root / "base", "--name", "base", ok=True)
    mfs.import_(src / "x", "--name", "x", ok=True)
    mfs.import_(src / "y", "--name", "y", ok=True)
    # No pinning: the mount would otherwise keep the chunk x and y share locked in memory,
    # and with it x's object, which then no gc may punch (mapped or not).
    m = _start(mfs, tmp_path_factory.mktemp("gc-mnt"), "--pin-budget", "0")
    try:
        w = workers()
        path, ref = str(m.mountpoint / "x/model.safetensors"), str(src / "x/model.safetensors")
        w.call("map", id="g", path=path)
        w.call("touch", id="g")
        regs = w.call("regions", id="g")["regions"]
        objects = {p for _lo, _hi, _o, p in regs if p.startswith(m.objects_dir + "/")}
        assert len(objects) == 2, f"x should map the base's object and its own: {objects}"
        mfs.run("rm", "x", ok=True)
        first = mfs.json("gc")
        assert first["objects_busy"] >= 1 and first["objects_punched"] == 0, first
        assert mountlib.wait_until(lambda: not os.path.exists(path), 10)
        addr = regs[0][0]
        for lo, hi, _off, p in regs:
            if p.startswith(m.objects_dir + "/"):
                assert w.call("dontneed", id="g", at=lo - addr, n=hi - lo)["rc"] == 0
        for p in objects:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        assert w.call("compare", id="g", ref=ref)["bad_page"] is None, \
            "a removed model's mapping reads other bytes after gc"
        w.close()
        second = mfs.json("gc")
        print("gc while mapped:", first, "after:", second)
        assert second["objects_punched"] >= 1 and second["bytes_freed"] > 0, second
        with open(m.mountpoint / "y/model.safetensors", "rb") as f, \
                open(src / "y/model.safetensors", "rb") as o:
            assert f.read() == o.read(), "y changed after gc punched x's object"
    finally:
        m.cleanup()


def _largest_object(mfs) -> Path:
    files = [p for p in (mfs.store / "objects").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_corrupted_chunk_is_never_mapped(workers, fam, modelfs_bin, tmp_path_factory):
    """A flipped byte in the base's object: the layout leaves that chunk out (the mount
    checks every chunk before it answers), the mapping shows the file there, whose read
    fails with EIO, and everything else still maps from the objects with the right bytes."""
    from modelfs import _safetensors as mfs_st

    where = tmp_path_factory.mktemp("bad-store")
    mfs = Modelfs(modelfs_bin, where / "store")
    mfs.run("init", ok=True)
    for k in ("base", "ft-head"):
        mfs.import_(fam.root / k, "--name", k, ok=True)
    obj = _largest_object(mfs)
    size = os.path.getsize(fam.orig("base"))
    assert obj.stat().st_size == size, "the base should be stored as one whole-file object"
    fd = os.open(fam.orig("base"), os.O_RDONLY)
    try:
        hdr = mfs_st.parse_header(fd, size)
    finally:
        os.close(fd)
    _dt, _shape, begin, end = hdr["layers.2.a"]
    bad_at = begin + 12345
    with open(obj, "r+b") as f:
        f.seek(bad_at)
        b = f.read(1)
        f.seek(bad_at)
        f.write(bytes([b[0] ^ 0x01]))
    m = _start(mfs, tmp_path_factory.mktemp("bad-mnt"))
    try:
        path = mounted(m, fam, "base")
        lay = share.layout(path)
        assert lay.run_containing(bad_at, bad_at + 1) is None, "a corrupted chunk was handed out"
        assert lay.covered_bytes() >= size - (end - begin) - 2 * PAGE - 4096 * 4
        assert m.stats()["layout_gaps"] >= 1, m.stats()
        w = workers()
        w.call("map", id="b", path=path)
        regs = w.call("regions", id="b")["regions"]
        addr = regs[0][0]
        for lo, hi, _off, p in regs:
            if lo - addr <= bad_at < hi - addr:
                assert not p.startswith(m.objects_dir + "/"), "the bad page maps the object"
        lo_page, hi_page = begin // PAGE * PAGE, -(-end // PAGE) * PAGE
        assert w.call("compare", id="b", ref=str(fam.orig("base")), n=lo_page)["bad_page"] is None
        assert w.call("compare", id="b", ref=str(fam.orig("base")), at=hi_page)["bad_page"] is None
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, bad_at // PAGE * PAGE)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        # the fine-tune shares the damaged chunk: it is left out of its layout too
        ft = share.layout(mounted(m, fam, "ft-head"))
        assert ft.run_containing(bad_at, bad_at + 1) is None
    finally:
        m.cleanup()


# ------------------------------------------------------------------------------------------
# copy mode keeps one copy


def _resident(path) -> int:
    """Page-cache bytes of a file: mincore of a plain mapping (this process has no
    LD_PRELOAD, so of a mount file it is the mount file's own page cache)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, MAP_FAILED), os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    try:
        vec = (ctypes.c_ubyte * (-(-size // PAGE)))()
        assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        return sum(v & 1 for v in vec) * PAGE
    finally:
        _libc.munmap(addr, size)


def test_copy_mode_does_not_keep_object_pages_twice(fam, modelfs_bin, tmp_path_factory):
    """A recipe read in copy mode (the shifted variant: the base's chunks at other
    offsets) fills the FUSE file's page cache; the object pages it was copied from leave
    the page cache, unless pinning keeps them on purpose."""
    mfs = Modelfs(modelfs_bin, tmp_path_factory.mktemp("copy-store") / "store")
    mfs.run("init", ok=True)
    for k in ("base", "shifted"):
        mfs.import_(fam.root / k, "--name", k, ok=True)
    obj = _largest_object(mfs)
    size = os.path.getsize(fam.orig("shifted"))
    for budget in ("0", "1GiB"):
        m = _start(mfs, tmp_path_factory.mktemp("copy-mnt"), "--pin-budget", budget)
        try:
            path = m.mountpoint / fam.files["shifted"]
            Path("/proc/sys/vm/drop_caches").write_text("3")
            with open(path, "rb") as f, open(fam.orig("shifted"), "rb") as o:
                assert f.read() == o.read()
            time.sleep(0.5)  # let a pin worker settle
            in_file, in_obj = _resident(path), _resident(obj)
            pinned = m.stats()["pinned_bytes"]
            print(f"pin budget {budget}: FUSE file {in_file}, object {in_obj}, pinned {pinned}")
            assert in_file >= 0.95 * size, "the mount file's page cache should hold what was read"
            if budget == "0":
                assert pinned == 0
                # Not zero: a chunk's hash check, racing with the reads of the same chunk
                # on other daemon threads, can fault pages back in after they were
                # dropped; before this rule it was all of them.
                assert in_obj <= 0.2 * size, \
                    f"copy mode kept {in_obj} bytes of the object's pages besides the file's"
            else:
                assert pinned > 0.5 * size, m.stats()
                assert in_obj >= 0.95 * pinned - 8 * PAGE * 20, (in_obj, pinned)
        finally:
            m.cleanup()


def test_pages_left_to_the_file_read_no_more_than_they_fault(workers, fam, fmount):
    """A composed mapping's own file pages (the header, run edges) fault without the
    mount's megabytes of read-around: the FUSE file's page cache stays near empty while
    every byte of the mapping is read."""
    path = mounted(fmount, fam, "ft-head")
    Path("/proc/sys/vm/drop_caches").write_text("3")
    w = workers()
    w.call("map", id="q", path=path)
    w.call("touch", id="q")
    assert w.call("compare", id="q", ref=str(fam.orig("ft-head")))["bad_page"] is None
    in_fuse = _resident(path)
    size = os.path.getsize(path)
    print(f"FUSE page cache of {path} after reading all of a composed mapping: {in_fuse}")
    assert in_fuse <= 64 * PAGE, \
        f"{in_fuse} bytes of the mount file are cached although objects back all but its edges"
