"""The Python loader hook (python/modelfs, switched on by MODELFS_SHARE=1 through the
modelfs-share.pth line in the environment's site-packages): tensors loaded from files on
a modelfs mount live on private mappings of the store's object files, so processes that
load models sharing tensors share those tensors' page-cache pages.

* Protocol and header parsing: hostile replies and headers are refused (in-process).
* A fake layout daemon (a thread of this process, found through MODELFS_RUNTIME_DIR)
  serves files on ext4: valid layouts are used, every kind of bad reply falls back
  silently to the original loader with identical bytes.
* A real mount of a generated family (a ~64 MiB bf16 base, a head fine-tune, and a
  SHIFTED variant whose data offsets differ by a non-multiple of 4096): the bytes of
  every load API equal the ext4 originals; /proc/PID/smaps of one process per model
  shows the tensors on object mappings, the base object's pages shared by all three
  (Pss < Rss/2), and no object mappings with the feature off; in-place writes stay in
  the writing process.
* transformers AutoModel.from_pretrained of a tiny GPT-2 and a fine-tune of it.

Loads run in worker subprocesses (this file run as a script), so the hook is activated
exactly as users get it: by the environment variable and the .pth line, with no change
to the loading code. The real-mount tests fail (never skip) if the mount serves no
layout socket.
"""

from __future__ import annotations

import array
import errno
import hashlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
PYDIR = REPO / "python"
if str(PYDIR) not in sys.path:
    sys.path.insert(0, str(PYDIR))
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

MiB = 1 << 20
WORKER_TIMEOUT = 300.0


# ==========================================================================================
# the worker (this file run as a script): plain user code, no modelfs import needed


def _tbytes(x):
    """The raw bytes of a torch tensor or numpy array, as a flat uint8 numpy array."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    import torch

    return x.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(x) -> list:
    return [str(x.dtype), list(x.shape), hashlib.sha256(_tbytes(x)).hexdigest()]


def _partial(x):
    """A slice of x to check get_slice with partial indexing (None if x is too small)."""
    if len(x.shape) >= 1 and x.shape[0] >= 3:
        return (slice(1, 3),)
    return None


def _load(files, api, fw):
    """{name: tensor} and {name: partial-slice digest} of `files`, loaded with `api`."""
    import ml_dtypes  # noqa: F401 - numpy bfloat16, as safetensors framework="np" needs
    from safetensors import safe_open

    out, parts = {}, {}
    for f in files:
        if api == "load_file":
            if fw == "pt":
                from safetensors.torch import load_file
            else:
                from safetensors.numpy import load_file
            out.update(load_file(f))
        elif api == "safe_open":
            with safe_open(f, framework=fw) as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        elif api == "slice":
            with safe_open(f, framework=fw) as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    out[k] = s[...]
                    idx = _partial(out[k])
                    if idx is not None:
                        parts[k] = _digest(s[idx])
        elif api == "torch_load":  # a torch zip checkpoint, as transformers loads .bin files
            import torch

            out.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        else:
            raise ValueError(api)
    return out, parts


def _maps():
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split(None, 5)
            lo, hi = (int(v, 16) for v in p[0].split("-"))
            rows.append((lo, hi, p[5].strip() if len(p) > 5 else ""))
    return rows


def _where(tensors: dict) -> dict:
    """name -> [path of the mapping its data lies in ("" = anonymous), nbytes]."""
    rows = _maps()
    out = {}
    for k, t in tensors.items():
        if hasattr(t, "data_ptr"):
            ptr, n = t.data_ptr(), t.numel() * t.element_size()
        else:
            ptr, n = t.__array_interface__["data"][0], t.nbytes
        path = ""
        for lo, hi, p in rows:
            if lo <= ptr < hi:
                path = p if ptr + n <= hi else f"{p} (partly)"
                break
        out[k] = [path, n]
    return out


def _hook_state():
    m = sys.modules.get("modelfs.hook")
    st = sys.modules.get("modelfs.share")
    return {"installed": bool(m and m.installed()), "stats": st.stats() if st else None}


def worker() -> int:
    reg = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "load":
                t, parts = _load(cmd["files"], cmd["api"], cmd["fw"])
                reg[cmd["id"]] = t
                res = {"digests": {k: _digest(v) for k, v in t.items()}, "parts": parts}
            elif op == "hash":
                res = {"digests": {k: _digest(v) for k, v in reg[cmd["id"]].items()}}
            elif op == "write":  # flip the first bytes of a tensor in place
                t = reg[cmd["id"]][cmd["name"]]
                b = t.view(-1).view(__import__("torch").uint8) if hasattr(t, "data_ptr") else t.reshape(-1).view("u1")
                b[: cmd.get("n", 4096)] ^= 0xFF
                res = {"digest": _digest(t)}
            elif op == "where":
                res = {"where": _where(reg[cmd["id"]])}
            elif op == "tf_load":
                import torch
                from transformers import AutoModel

                m = AutoModel.from_pretrained(cmd["path"])
                m.eval()
                ids = torch.arange(cmd.get("seq", 16)).remainder(m.config.vocab_size).unsqueeze(0)
                with torch.no_grad():
                    y = m(input_ids=ids).last_hidden_state
                params = dict(m.named_parameters())
                reg[cmd["id"]] = params
                reg[cmd["id"] + "/model"] = m
                res = {"digests": {k: _digest(v) for k, v in params.items()},
                       "output": _digest(y.float()), "where": _where(params),
                       "dtype": str(next(iter(params.values())).dtype)}
            elif op == "drop":
                reg.pop(cmd["id"], None)
                reg.pop(cmd["id"] + "/model", None)
                import gc

                gc.collect()
                res = {}
            elif op == "exit":
                print(json.dumps({"ok": True, **_hook_state()}), flush=True)
                return 0
            else:
                raise ValueError(op)
            print(json.dumps({"ok": True, **res, **_hook_state()}), flush=True)
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
from modelfs import _safetensors as mfs_st  # noqa: E402 - the checkout's package
from modelfs import share  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def _no_mount_left_behind():
    yield
    mountlib.cleanup_all()


@pytest.fixture(scope="module", autouse=True)
def _pristine_parent():
    """The comparisons load the originals in this process: it must not run the hook."""
    import safetensors

    assert safetensors.safe_open is not mfs_st.safe_open, \
        "the hook is active in the pytest process itself (MODELFS_SHARE=1 set for pytest?)"


@pytest.fixture(scope="session")
def pth_installed():
    """The .pth line must be in this environment's site-packages: that is how the hook is
    switched on (scripts/common.sh installs it)."""
    from modelfs.__main__ import PTH_LINE, PTH_NAME

    site = Path(sysconfig.get_paths()["purelib"])
    p = site / PTH_NAME
    if not p.is_file():
        pytest.fail(f"{p} is missing: install the hook with `{sys.executable} -m pip install -e "
                    f"{PYDIR} && {sys.executable} -m modelfs install-pth` "
                    "(scripts/common.sh does both)", pytrace=False)
    assert p.read_text() == PTH_LINE, f"{p} holds {p.read_text()!r}, expected {PTH_LINE!r}"
    return p


class Worker:
    """A subprocess running worker(): one JSON command per line, one JSON reply per line."""

    def __init__(self, share_on: bool, debug: bool = False, env=None):
        e = dict(os.environ)
        e.pop("MODELFS_SHARE", None)
        e.pop("MODELFS_SHARE_DEBUG", None)
        if share_on:
            e["MODELFS_SHARE"] = "1"
        if debug:
            e["MODELFS_SHARE_DEBUG"] = "1"
        e["PYTHONPATH"] = os.pathsep.join([str(PYDIR), *filter(None, [e.get("PYTHONPATH")])])
        e.setdefault("TOKENIZERS_PARALLELISM", "false")
        e["HF_HUB_OFFLINE"] = "1"
        e["TRANSFORMERS_VERBOSITY"] = "error"
        if env:
            e.update(env)
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=e, cwd=str(TESTS_DIR))
        self.buf = b""

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self) -> str:
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
                    raise AssertionError(f"worker died (exit {self.proc.wait()}) during {op}:\n"
                                         f"{self.stderr()[-5000:]}")
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


@pytest.fixture
def workers():
    made = []

    def make(share_on=True, debug=False, env=None):
        w = Worker(share_on, debug, env)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
        w.err.close()


def reference(files, api="load_file", fw="pt"):
    """Digests from the original safetensors (this process has no hook)."""
    t, parts = _load([str(f) for f in files], api, fw)
    return {k: _digest(v) for k, v in t.items()}, parts


def smaps(pid):
    """[{path, size, Rss, Pss, Private_Dirty, ...} in bytes] of every mapping of pid."""
    rows, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                p = line.split(None, 5)
                cur = {"path": p[5].strip() if len(p) > 5 else "", "range": p[0]}
                rows.append(cur)
            elif first.endswith(":") and cur is not None:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    cur[first[:-1]] = int(parts[1]) * 1024
    return rows


def sum_maps(rows, pred, field="Rss"):
    return sum(r.get(field, 0) for r in rows if pred(r["path"]))


# ------------------------------------------------------------------------------------------
# protocol and header parsing (no daemon)


def _sample_reply():
    return dict(status=0, flags=0, file_size=10_000, end=10_000, object_lens=[8192, 20_000],
                runs=[(100, 4000, 1, 100), (4100, 5900, 0, 0)])


def test_reply_decodes_and_hostile_replies_are_refused():
    good = share.encode_reply(**_sample_reply())
    r = share.decode_reply(good, 0)
    assert r.runs == [share.Run(100, 4000, 1, 100), share.Run(4100, 5900, 0, 0)]
    assert r.object_lens == [8192, 20_000] and r.file_size == 10_000 and r.end == 10_000
    for n in range(len(good)):  # every truncation fails
        with pytest.raises(share.LayoutError):
            share.decode_reply(good[:n], 0)
    with pytest.raises(share.LayoutError):
        share.decode_reply(good + b"\0", 0)

    def bad(**change):
        d = _sample_reply()
        d.update(change)
        with pytest.raises(share.LayoutError):
            share.decode_reply(share.encode_reply(**d), 0)

    bad(runs=[(100, 4000, 1, 100), (4100, 5900, 0, 3000)])  # past its object's end
    bad(runs=[(100, 4000, 1, 100), (4000, 5900, 0, 0)])  # overlapping
    bad(runs=[(4100, 5900, 0, 0), (100, 4000, 1, 100)])  # unsorted
    bad(runs=[(100, 4000, 2, 100)])  # a missing object
    bad(runs=[(100, 0, 0, 0)])  # empty run
    bad(runs=[(9000, 2000, 1, 0)])  # past `end`
    bad(end=20_000)  # end past the file
    bad(runs=[(100, 4000, 1, 2**64 - 10)])  # object offset + len overflows u64
    with pytest.raises(share.LayoutError):  # a run before `from`
        share.decode_reply(good, 200)
    huge = bytearray(good)
    huge[36:40] = struct.pack("<I", 2**32 - 1)
    with pytest.raises(share.LayoutError):
        share.decode_reply(bytes(huge), 0)
    huge = bytearray(good)
    huge[32:36] = struct.pack("<I", 251)
    with pytest.raises(share.LayoutError):
        share.decode_reply(bytes(huge), 0)
    magic = bytearray(good)
    magic[0] ^= 1
    with pytest.raises(share.LayoutError):
        share.decode_reply(bytes(magic), 0)
    # an error reply carries only its status
    e = share.decode_reply(share.encode_reply(status=errno.EXDEV), 0)
    assert e.status == errno.EXDEV and e.runs == []
    assert share.encode_request(77) == b"MFSLAY01" + struct.pack("<Q", 77)


def test_socket_name_and_runtime_dirs(monkeypatch):
    assert share.socket_name(os.makedev(0, 53)) == "share-0-53.sock"
    assert share.socket_name(os.makedev(259, 1 << 12)) == "share-259-4096.sock"
    monkeypatch.setenv("MODELFS_RUNTIME_DIR", "/x/rt")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert share.runtime_dirs() == ["/x/rt", "/run/modelfs", "/run/user/7/modelfs",
                                    f"/tmp/modelfs-{os.getuid()}"]
    monkeypatch.delenv("MODELFS_RUNTIME_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert share.runtime_dirs() == ["/run/modelfs", f"/tmp/modelfs-{os.getuid()}"]


def test_header_parser_refuses_hostile_headers(tmp_path):
    def hdr(obj, size_extra=64, raw=None):
        j = raw if raw is not None else json.dumps(obj).encode()
        p = tmp_path / "h.safetensors"
        p.write_bytes(struct.pack("<Q", len(j)) + j + b"\0" * size_extra)
        fd = os.open(p, os.O_RDONLY)
        try:
            return mfs_st.parse_header(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    ok = hdr({"a": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
              "__metadata__": {"x": "y"}})
    n = len(json.dumps({"a": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
                        "__metadata__": {"x": "y"}}))
    assert ok == {"a": ("BF16", (4, 8), 8 + n, 8 + n + 64)}
    for bad in ({"a": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 65]}},  # past the end
                {"a": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [10, 2]}},
                {"a": {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 2]}},
                {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0]}},
                {"a": {"dtype": 3, "shape": [2], "data_offsets": [0, 4]}},
                {"a": [1, 2]}, [1, 2]):
        with pytest.raises(ValueError):
            hdr(bad)
    with pytest.raises(ValueError):
        hdr(None, raw=b"{" + b" " * 100)  # not JSON
    p = tmp_path / "short"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            mfs_st.parse_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# a fake layout daemon for files on ext4


class FakeDaemon:
    """A layout server at MODELFS_RUNTIME_DIR/share-M-m.sock for device `dev`.
    `handler(fd, from_) -> (reply bytes or None to hang up, [object fds to send])`."""

    def __init__(self, rundir: Path, dev: int, handler):
        self.path = str(rundir / share.socket_name(dev))
        self.handler = handler
        self.requests = []
        self.errors = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            while True:
                try:
                    data, anc, _fl, _ = c.recvmsg(64, socket.CMSG_SPACE(4 * 4))
                except OSError:
                    return
                if not data:
                    return
                fds = []
                for _l, _t, p in anc:
                    a = array.array("i")
                    a.frombytes(p[: len(p) - len(p) % 4])
                    fds += list(a)
                try:
                    assert len(data) == 16 and data[:8] == b"MFSLAY01" and len(fds) == 1, (data, fds)
                    from_ = struct.unpack("<Q", data[8:])[0]
                    self.requests.append(from_)
                    rep, ofds = self.handler(fds[0], from_)
                    if rep is None:
                        return
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", ofds))] if ofds else []
                    c.sendmsg([rep], anc)
                    for f in ofds:
                        os.close(f)
                except Exception as e:  # noqa: BLE001
                    self.errors.append(repr(e))
                    return
                finally:
                    for f in fds:
                        os.close(f)


def _write_model(path: Path, seed: int, spec, metadata=None):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import modelfamily

    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape, dt in spec:
        if dt == "bf16":
            sd[name] = modelfamily.random_bf16(rng, shape)
        else:
            sd[name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata or {"format": "pt"})
    return sd


FAKE_SPEC = [("w1", (512, 1024), "bf16"), ("w2", (1024, 1024), "bf16"), ("b1", (1024,), "f32"),
             ("norm", (7,), "bf16"), ("w3", (300, 333), "bf16")]


@pytest.fixture(scope="module")
def fake_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake-model")
    p = d / "model.safetensors"
    _write_model(p, 11, FAKE_SPEC)
    return p


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _fake_setup(tmp_path, fake_file, lead: int):
    """An object file holding the file's data section after `lead` junk bytes."""
    data = fake_file.read_bytes()
    ds = _data_start(fake_file)
    obj = tmp_path / "objects" / "obj0"
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(b"J" * lead + data[ds:])
    return data, ds, obj


def _fake_run(workers, tmp_path, fake_file, handler, debug=False, api="load_file", fw="pt"):
    rundir = tmp_path / "rt"
    rundir.mkdir(exist_ok=True)
    d = FakeDaemon(rundir, os.stat(fake_file).st_dev, handler)
    try:
        w = workers(share_on=True, debug=debug, env={"MODELFS_RUNTIME_DIR": str(rundir)})
        res = w.call("load", id="m", files=[str(fake_file)], api=api, fw=fw)
        where = w.call("where", id="m")["where"]
        w.close()
        return res, where, w.stderr(), d
    finally:
        d.close()


def test_fake_daemon_layout_is_used(pth_installed, workers, tmp_path, fake_file):
    """A valid layout whose object offsets differ from the file's by a non-multiple of
    4096: every tensor comes from the object mapping, bytes identical."""
    lead = 3 * 4096 + 8
    data, ds, obj = _fake_setup(tmp_path, fake_file, lead)
    size = len(data)

    def handler(fd, from_):
        o = os.open(obj, os.O_RDONLY)
        return share.encode_reply(0, 0, size, size, [os.fstat(o).st_size],
                                  [(ds, size - ds, 0, lead)]), [o]

    want, _ = reference([fake_file])
    for fw, api in (("pt", "load_file"), ("pt", "slice"), ("np", "safe_open")):
        res, where, err, d = _fake_run(workers, tmp_path, fake_file, handler, api=api, fw=fw)
        assert res["installed"], "MODELFS_SHARE=1 did not install the hook (the .pth line?)"
        if fw == "pt":
            assert res["digests"] == want
        assert not d.errors, d.errors
        st = res["stats"]
        assert st["files_shared"] == 1 and st["fallback_tensors"] == 0, st
        assert st["shared_tensors"] >= len(FAKE_SPEC), st
        for name, (path, n) in where.items():
            assert path == str(obj), f"{fw}/{api}: {name} lies in {path!r}, not in the object"
        assert err == "", err
    res_np, _ = reference([fake_file], api="safe_open", fw="np")
    res, _, _, _ = _fake_run(workers, tmp_path, fake_file, handler, api="load_file", fw="np")
    assert res["digests"] == res_np


def test_fake_daemon_multi_reply_layout(pth_installed, workers, tmp_path, fake_file):
    """A layout in two replies (end < file_size, then from=end), objects indexed per reply;
    a gap between runs (not in any run) is served by the original."""
    data, ds, obj = _fake_setup(tmp_path, fake_file, 0)
    size = len(data)
    order = sorted(_hdr(fake_file).items(), key=lambda kv: kv[1][2])
    gap, (_, _, w2_begin, w2_end) = order[2]
    before = [n for n, _ in order[:2]]
    after = [n for n, _ in order[3:]]
    obj2 = tmp_path / "objects" / "obj1"
    obj2.write_bytes(b"\0" * 100 + data[w2_end:])
    split = w2_end

    def handler(fd, from_):
        if from_ == 0:  # the middle tensor is the gap: [w2_begin, w2_end)
            o = os.open(obj, os.O_RDONLY)
            return share.encode_reply(0, 0, size, split, [os.fstat(o).st_size],
                                      [(ds, w2_begin - ds, 0, 0)]), [o]
        assert from_ == split
        o = os.open(obj2, os.O_RDONLY)
        return share.encode_reply(0, 0, size, size, [os.fstat(o).st_size],
                                  [(split, size - split, 0, 100)]), [o]

    want, _ = reference([fake_file])
    res, where, err, d = _fake_run(workers, tmp_path, fake_file, handler)
    assert d.requests == [0, split] and not d.errors, (d.requests, d.errors)
    assert res["digests"] == want
    st = res["stats"]
    assert st["fallback_tensors"] == 1 and st["fallback_bytes"] == w2_end - w2_begin, st
    assert all(where[n][0] == str(obj) for n in before), where
    assert all(where[n][0] == str(obj2) for n in after), where
    assert not where[gap][0].startswith(str(tmp_path / "objects")), where


@pytest.mark.parametrize("case", ["object-shorter-than-declared", "run-past-object", "no-fds",
                                  "eio", "garbage", "hang-up", "wrong-file-size", "no-progress",
                                  "truncated-runs", "too-many-fds"])
def test_fake_daemon_bad_replies_fall_back_silently(pth_installed, workers, tmp_path, fake_file,
                                                    case):
    data, ds, obj = _fake_setup(tmp_path, fake_file, 0)
    size = len(data)
    olen = size - ds

    def handler(fd, from_):
        o = os.open(obj, os.O_RDONLY)
        runs = [(ds, size - ds, 0, 0)]
        if case == "object-shorter-than-declared":  # mapping it would SIGBUS past its end
            return share.encode_reply(0, 0, size, size, [olen + (1 << 20)],
                                      [(ds, size - ds, 0, 1 << 20)]), [o]
        if case == "run-past-object":
            return share.encode_reply(0, 0, size, size, [olen], [(ds, size - ds, 0, 8)]), [o]
        if case == "no-fds":
            os.close(o)
            return share.encode_reply(0, 0, size, size, [olen], runs), []
        if case == "too-many-fds":
            return share.encode_reply(0, 0, size, size, [olen], runs), [o, os.dup(o)]
        if case == "eio":
            os.close(o)
            return share.encode_reply(status=errno.EIO), []
        if case == "garbage":
            return os.urandom(40 + 8 + 32), [o]
        if case == "hang-up":
            os.close(o)
            return None, []
        if case == "wrong-file-size":
            return share.encode_reply(0, 0, size + 4096, size + 4096, [olen], runs), [o]
        if case == "no-progress":
            return share.encode_reply(0, 0, size, 0, [olen], []), [o]
        if case == "truncated-runs":
            return share.encode_reply(0, 0, size, size, [olen], runs)[:-5], [o]
        raise AssertionError(case)

    want, _ = reference([fake_file])
    res, where, err, d = _fake_run(workers, tmp_path, fake_file, handler)
    assert not d.errors, d.errors
    assert d.requests, "the worker never asked the fake daemon"
    assert res["digests"] == want
    st = res["stats"]
    assert st["files_fallback"] == 1 and st["files_shared"] == 0 and st["shared_bytes"] == 0, st
    assert st["fallback_tensors"] == len(FAKE_SPEC), st
    assert all(not p.startswith(str(tmp_path / "objects")) for p, _ in where.values()), where
    assert err == "", f"fallback was not silent:\n{err}"
    # with MODELFS_SHARE_DEBUG=1 the reason is logged once
    res, _, err, _ = _fake_run(workers, tmp_path, fake_file, handler, debug=True)
    assert res["digests"] == want
    assert "modelfs.share:" in err and "original loader" in err, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("lead,shared", [(2 * 4096 + 64, True), (4096 + 4, False)],
                         ids=["aligned", "misaligned"])
def test_fake_daemon_torch_load_mmap(pth_installed, workers, tmp_path, lead, shared):
    """torch.load(mmap=True) of a torch zip checkpoint: records come from the object
    mapping when 8-byte aligned there, else from the original mapping; same bytes."""
    import torch

    ck = tmp_path / "ck" / "model.pt"
    ck.parent.mkdir()
    torch.manual_seed(3)
    torch.save({"a": torch.randn(700, 300).to(torch.bfloat16), "b": torch.arange(77),
                "c": torch.randn(5)}, ck)
    data = ck.read_bytes()
    obj = tmp_path / "objects" / "obj0"
    obj.parent.mkdir()
    obj.write_bytes(b"Q" * lead + data)
    size = len(data)

    def handler(fd, from_):
        o = os.open(obj, os.O_RDONLY)
        return share.encode_reply(0, 0, size, size, [size + lead], [(0, size, 0, lead)]), [o]

    want, _ = reference([ck], api="torch_load")
    res, where, err, d = _fake_run(workers, tmp_path, ck, handler, api="torch_load")
    assert not d.errors, d.errors
    assert res["digests"] == want
    st = res["stats"]
    assert st["files_shared"] == 1, st
    on = {n for n, (p, _) in where.items() if p == str(obj)}
    if shared:
        assert on == set(want) and st["fallback_tensors"] == 0, (where, st)
    else:
        assert not on and st["shared_tensors"] == 0 and st["fallback_tensors"] == 3, (where, st)
    assert err == "", err


def test_not_on_modelfs_uses_the_original_loader(pth_installed, workers, fake_file, tmp_path,
                                                 monkeypatch):
    """A file on ext4 and no socket for its device: the original path, no error."""
    monkeypatch.setenv("MODELFS_RUNTIME_DIR", str(tmp_path / "empty-rt"))
    want, _ = reference([fake_file])
    w = workers(share_on=True, debug=True)
    res = w.call("load", id="m", files=[str(fake_file)], api="load_file", fw="pt")
    assert res["installed"]
    assert res["digests"] == want
    st = res["stats"]
    assert st == {**st, "files_fallback": 1, "files_shared": 0, "shared_bytes": 0,
                  "fallback_tensors": len(FAKE_SPEC)}, st
    where = w.call("where", id="m")["where"]
    assert all(p == str(fake_file) for p, _ in where.values()), where  # safetensors' own mmap
    w.close()
    err = w.stderr()
    assert "not on a modelfs mount" in err, err
    assert "Traceback" not in err and "rror" not in err, err


def test_feature_off_does_not_load_the_hook(pth_installed, workers, fake_file):
    w = workers(share_on=False)
    res = w.call("load", id="m", files=[str(fake_file)], api="load_file", fw="pt")
    assert res["installed"] is False and res["stats"] is None, res
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sorted(m for m in sys.modules "
                            "if m.startswith('modelfs')))"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "MODELFS_SHARE"})
    assert probe.stdout.strip() == "[]", probe


# ------------------------------------------------------------------------------------------
# a real mount


BASE_MIB = 64


def _family_spec():
    import modelfamily

    plan = modelfamily.Plan(BASE_MIB, n_layers=4)
    return [(n, s, "bf16") for n, s in plan.tensors()]


class ShareFamily:
    def __init__(self, root: Path):
        self.root = root
        spec = _family_spec()
        self.keys = ["base", "ft-head", "shifted"]
        self.last = spec[-1][0]
        _write_model(root / "base" / "model.safetensors", 1, spec)
        base = _load_sd(root / "base" / "model.safetensors")
        ft = dict(base)
        import numpy as np

        import modelfamily

        ft[self.last] = modelfamily.random_bf16(np.random.default_rng(2), tuple(base[self.last].shape))
        _save(ft, root / "ft-head" / "model.safetensors", {"format": "pt", "ft": "head"})
        sh = dict(base)
        import torch

        sh["zz_extra.scale"] = torch.arange(3, dtype=torch.float32)  # 12 bytes + header change
        _save(sh, root / "shifted" / "model.safetensors",
              {"format": "pt", "variant": "shifted-by-a-non-multiple-of-4096"})
        for k in self.keys:
            (root / k / "config.json").write_text(json.dumps({"model": k}))
        # the base's tensors in a torch zip checkpoint: its records dedup against the base
        self.torch_ckpt = root / "torch-ckpt" / "pytorch_model.bin"
        self.torch_ckpt.parent.mkdir()
        torch.save(base, self.torch_ckpt)
        self.base_tensors = {n for n, _, _ in spec}
        # the point of the shifted variant: its data offsets are not those of the base mod 4096
        hb = _hdr(self.path("base"))
        hs = _hdr(self.path("shifted"))
        shifts = {(hs[n][2] - hb[n][2]) % 4096 for n in self.base_tensors}
        assert 0 not in shifts, shifts
        self.headers = {k: _hdr(self.path(k)) for k in self.keys}

    def path(self, key) -> Path:
        return self.root / key / "model.safetensors"

    def tensor_bytes(self, key, names=None) -> int:
        h = self.headers[key]
        return sum(e - b for n, (_, _, b, e) in h.items() if names is None or n in names)


def _load_sd(p):
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(p)).items()}


def _save(sd, p, meta):
    from safetensors.torch import save_file

    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(p), metadata=meta)


def _hdr(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        return mfs_st.parse_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def sfam(tmp_path_factory, required_libs):
    return ShareFamily(tmp_path_factory.mktemp("share-family"))


@pytest.fixture(scope="module")
def smount(modelfs_bin, sfam, tmp_path_factory):
    mfs = Modelfs(modelfs_bin, tmp_path_factory.mktemp("share-store") / "store")
    mfs.run("init", ok=True)
    for k in sfam.keys:
        mfs.import_(sfam.root / k, "--name", k, ok=True)
    mfs.import_(sfam.torch_ckpt.parent, "--name", "torch-ckpt", ok=True)
    mp = tmp_path_factory.mktemp("share-mnt")
    m = mountlib.Mount(mfs, mp)
    try:
        m.start_daemon()
        dev = os.stat(mp / "base" / "model.safetensors").st_dev
        if not share.socket_paths(dev):
            pytest.fail(f"the mount serves no layout socket: no {share.socket_name(dev)} in any "
                        f"of {share.runtime_dirs()} (a modelfs binary without the layout service? "
                        f"{modelfs_bin})\n{m.describe()}", pytrace=False)
        m.objects_dir = os.path.realpath(mfs.store / "objects")
        yield m
    finally:
        m.cleanup()


def _on_objects(m):
    return lambda p: p.startswith(m.objects_dir + "/")


def test_layouts_of_the_family(sfam, smount):
    """The base is one whole object; the fine-tune's unchanged tensors are in the base's
    object; the shifted variant's tensors are too, at file offsets not congruent mod 4096."""
    lays = {k: share.layout(smount / k / "model.safetensors") for k in sfam.keys}
    for k, lay in lays.items():
        assert lay.file_size == sfam.path(k).stat().st_size
        assert lay.covered_bytes() == lay.file_size, (k, lay)  # no gaps: nothing failed a check
        assert all(o.path.startswith(smount.objects_dir + "/") for o in lay.objects), lay.objects
    base_obj = lays["base"].objects[0]
    assert len(lays["base"].objects) == 1 and (base_obj.dev, base_obj.ino) == \
        (os.stat(base_obj.path).st_dev, os.stat(base_obj.path).st_ino)
    for k in ("ft-head", "shifted"):
        lay = lays[k]
        for n in sfam.base_tensors - ({sfam.last} if k == "ft-head" else set()):
            _, _, b, e = sfam.headers[k][n]
            r = lay.run_containing(b, e)
            assert r is not None, (k, n)
            o = lay.objects[r.object]
            assert (o.dev, o.ino) == (base_obj.dev, base_obj.ino), (k, n, o)
            oo = r.object_offset + b - r.file_offset
            assert oo == sfam.headers["base"][n][2], (k, n)  # where the base file has it
            if k == "shifted":
                assert (oo - b) % 4096 != 0


@pytest.mark.parametrize("api,fw", [("load_file", "pt"), ("safe_open", "pt"), ("slice", "pt"),
                                    ("load_file", "np"), ("safe_open", "np")])
def test_bytes_identical_to_the_originals(pth_installed, workers, sfam, smount, api, fw):
    w = workers(share_on=True)
    for k in sfam.keys:
        want, want_parts = reference([sfam.path(k)], api, fw)
        res = w.call("load", id=k, files=[str(smount / k / "model.safetensors")], api=api, fw=fw)
        assert res["installed"]
        assert res["digests"] == want, k
        assert res["parts"] == want_parts, k
        where = w.call("where", id=k)["where"]
        off = {n: p for n, (p, sz) in where.items() if not _on_objects(smount)(p)}
        assert not off, f"{k}: tensors not on object mappings: {off}"
    st = res["stats"]
    assert st["fallback_tensors"] == 0 and st["files_shared"] == 3, st
    assert st["shared_bytes"] >= sum(sfam.tensor_bytes(k) for k in sfam.keys), st


def _load_all(workers, sfam, smount, share_on):
    ws = {}
    for k in sfam.keys:
        w = workers(share_on=share_on)
        res = w.call("load", id=k, files=[str(smount / k / "model.safetensors")], api="load_file",
                     fw="pt")  # hashing the tensors touches every page
        assert res["installed"] is share_on
        ws[k] = w
    return ws


def _report(what, rows):
    print(f"\n{what}")
    for r in rows:
        print("  " + "  ".join(f"{k}={v / MiB:.2f}MiB" if isinstance(v, int) and k != "pid" else f"{k}={v}"
                               for k, v in r.items()))


def test_processes_share_the_tensors_pages(pth_installed, workers, sfam, smount):
    """One process per model: the tensors are on object mappings (Rss = the tensor bytes),
    the base object's pages are mapped by all three (Pss < Rss / 2), and the mount files'
    own mappings stay untouched. The shifted variant shares as well as the fine-tune."""
    base_obj = share.layout(smount / "base" / "model.safetensors").objects[0].path
    ws = _load_all(workers, sfam, smount, True)
    on_obj = _on_objects(smount)
    rows = []
    for k, w in ws.items():
        sm = smaps(w.pid)
        obj_rss = sum_maps(sm, on_obj)
        base_rss = sum_maps(sm, lambda p: p == base_obj)
        base_pss = sum_maps(sm, lambda p: p == base_obj, "Pss")
        mnt_rss = sum_maps(sm, lambda p: p.startswith(str(smount.mountpoint) + "/"))
        tb = sfam.tensor_bytes(k)
        from_base = sfam.tensor_bytes(k, sfam.base_tensors - ({sfam.last} if k == "ft-head" else set()))
        rows.append({"model": k, "pid": w.pid, "tensors": tb, "objects_rss": obj_rss,
                     "base_obj_rss": base_rss, "base_obj_pss": base_pss, "mount_file_rss": mnt_rss})
        assert tb * 0.99 <= obj_rss <= tb + 4 * MiB, rows[-1]
        assert from_base * 0.99 <= base_rss <= from_base + 4 * MiB, rows[-1]
        assert base_pss < base_rss / 2, rows[-1]
        assert mnt_rss < 1 * MiB, rows[-1]
    _report("MODELFS_SHARE=1, one process per model (smaps):", rows)


def test_feature_off_maps_no_objects(pth_installed, workers, sfam, smount):
    """MODELFS_SHARE unset: today's behaviour, safetensors maps the mount's files. Files that
    are not passthrough (the fine-tune, the shifted variant) have no object mappings and
    share nothing (Pss = Rss)."""
    ws = _load_all(workers, sfam, smount, False)
    on_obj = _on_objects(smount)
    rows = []
    for k, w in ws.items():
        lay = share.layout(smount / k / "model.safetensors")
        sm = smaps(w.pid)
        mine = lambda p, k=k: p == str(smount / k / "model.safetensors")  # noqa: E731
        row = {"model": k, "pid": w.pid, "passthrough": lay.passthrough,
               "objects_rss": sum_maps(sm, on_obj), "mount_file_rss": sum_maps(sm, mine),
               "mount_file_pss": sum_maps(sm, mine, "Pss")}
        rows.append(row)
        if not lay.passthrough:
            assert row["objects_rss"] == 0, row
            assert row["mount_file_rss"] >= sfam.tensor_bytes(k) * 0.99, row
            assert row["mount_file_pss"] >= row["mount_file_rss"] * 0.95, row
    assert any(not r["passthrough"] for r in rows)
    _report("MODELFS_SHARE unset (smaps):", rows)


def test_writes_stay_private(pth_installed, workers, sfam, smount):
    name = sfam.last if False else sorted(sfam.base_tensors)[0]
    mnt = str(smount / "base" / "model.safetensors")
    want, _ = reference([sfam.path("base")])
    b = workers()
    a = workers()
    assert b.call("load", id="m", files=[mnt], api="load_file", fw="pt")["digests"] == want
    a.call("load", id="m", files=[mnt], api="load_file", fw="pt")
    changed = a.call("write", id="m", name=name, n=8192)["digest"]
    assert changed != want[name]
    assert a.call("hash", id="m")["digests"][name] == changed
    assert b.call("hash", id="m")["digests"] == want  # the other process's tensor
    # a second load in the writing process gets the file's bytes, not its own copy
    assert a.call("load", id="m2", files=[mnt], api="safe_open", fw="pt")["digests"] == want
    # the file through the mount and the object file itself are unchanged
    _, _, beg, end = sfam.headers["base"][name]
    orig = sfam.path("base").read_bytes()[beg:end]
    with open(mnt, "rb") as f:
        f.seek(beg)
        assert f.read(end - beg) == orig
    lay = share.layout(mnt)
    r = lay.run_containing(beg, end)
    with open(lay.objects[r.object].path, "rb") as f:
        f.seek(r.object_offset + beg - r.file_offset)
        assert f.read(end - beg) == orig
    dirty = sum_maps(smaps(a.pid), _on_objects(smount), "Private_Dirty")
    assert 8192 <= dirty <= 64 * 1024, f"{dirty} private dirty bytes on the object mappings"
    assert sum_maps(smaps(b.pid), _on_objects(smount), "Private_Dirty") == 0


def test_torch_load_mmap_shares_with_safetensors(pth_installed, workers, sfam, smount):
    """torch.load(mmap=True) of the base's tensors saved by torch.save: the records are the
    base's chunks, so a process loading the torch checkpoint and one loading the base
    safetensors map the same object pages."""
    mnt_ck = str(smount / "torch-ckpt" / sfam.torch_ckpt.name)
    want, _ = reference([sfam.torch_ckpt], api="torch_load")
    base_obj = share.layout(smount / "base" / "model.safetensors").objects[0].path
    a = workers()
    res = a.call("load", id="m", files=[mnt_ck], api="torch_load", fw="pt")
    assert res["digests"] == want
    where = a.call("where", id="m")["where"]
    total = sum(n for _, n in where.values())
    on_base = sum(n for p, n in where.values() if p == base_obj)
    b = workers()
    b.call("load", id="m", files=[str(smount / "base" / "model.safetensors")], api="load_file",
           fw="pt")
    sm = smaps(a.pid)
    row = {"model": "torch-ckpt", "pid": a.pid, "record_bytes": total, "on_base_object": on_base,
           "base_obj_rss": sum_maps(sm, lambda p: p == base_obj),
           "base_obj_pss": sum_maps(sm, lambda p: p == base_obj, "Pss"), "stats": res["stats"]}
    _report("torch.load(mmap=True) next to a safetensors load of the base:", [row])
    assert on_base >= 0.95 * total, row
    assert row["base_obj_rss"] >= 0.95 * total and row["base_obj_pss"] < 0.6 * row["base_obj_rss"], row


# ------------------------------------------------------------------------------------------
# transformers


TF_SEQ = 16


_TF_MAKE = r"""
import sys
import torch
from transformers import GPT2Config, GPT2Model
root = sys.argv[1]
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=4096, n_positions=128, n_embd=256, n_layer=4, n_head=4)
m = GPT2Model(cfg).to(torch.bfloat16)
m.save_pretrained(root + "/gpt2-base", safe_serialization=True)
with torch.no_grad():
    m.h[3].mlp.c_fc.weight.add_(torch.randn_like(m.h[3].mlp.c_fc.weight) * 0.01)
m.save_pretrained(root + "/gpt2-ft", safe_serialization=True)
"""


@pytest.fixture(scope="module")
def tf_models(tmp_path_factory, required_libs):
    """A tiny GPT-2 and a fine-tune of its last MLP, written by transformers in a
    subprocess: importing transformers (and through torch._dynamo, triton's LLVM) into
    the test process, which already holds TensorFlow's, aborts it."""
    root = tmp_path_factory.mktemp("tf-models")
    r = subprocess.run([sys.executable, "-c", _TF_MAKE, str(root)], capture_output=True,
                       text=True, timeout=WORKER_TIMEOUT)
    if r.returncode != 0:
        pytest.fail(f"cannot write the GPT-2 models with transformers (is it installed? "
                    f"{sys.executable} -m pip install -r {TESTS_DIR / 'requirements.txt'}):\n"
                    f"{r.stderr[-3000:]}", pytrace=False)
    return root


@pytest.fixture(scope="module")
def tf_mount(modelfs_bin, tf_models, tmp_path_factory):
    mfs = Modelfs(modelfs_bin, tmp_path_factory.mktemp("tf-store") / "store")
    mfs.run("init", ok=True)
    for k in ("gpt2-base", "gpt2-ft"):
        mfs.import_(tf_models / k, "--name", k, ok=True)
    mp = tmp_path_factory.mktemp("tf-mnt")
    m = mountlib.Mount(mfs, mp)
    try:
        m.start_daemon()
        dev = os.stat(mp / "gpt2-base" / "model.safetensors").st_dev
        if not share.socket_paths(dev):
            pytest.fail(f"the mount serves no layout socket ({share.socket_name(dev)})\n"
                        f"{m.describe()}", pytrace=False)
        m.objects_dir = os.path.realpath(mfs.store / "objects")
        yield m
    finally:
        m.cleanup()


def test_transformers_from_pretrained(pth_installed, workers, tf_models, tf_mount):
    """AutoModel.from_pretrained from the mount, one process per model: same parameters and
    outputs as from the ext4 originals, and the parameters stay on the object mappings
    (transformers assigns the loaded tensors as parameters: no copy for a bf16 checkpoint
    loaded with its own dtype), the base object's pages mapped by both processes."""
    ref = workers(share_on=False)
    want = {k: ref.call("tf_load", id=k, path=str(tf_models / k), seq=TF_SEQ)
            for k in ("gpt2-base", "gpt2-ft")}
    ref.close()
    assert want["gpt2-base"]["digests"] != want["gpt2-ft"]["digests"]
    on_obj = _on_objects(tf_mount)
    base_obj = share.layout(tf_mount / "gpt2-base" / "model.safetensors").objects[0].path
    got, rows = {}, []
    ws = {}
    for k in ("gpt2-base", "gpt2-ft"):
        w = workers(share_on=True)
        got[k] = w.call("tf_load", id=k, path=str(tf_mount / k), seq=TF_SEQ)
        ws[k] = w
        assert got[k]["installed"]
        assert got[k]["digests"] == want[k]["digests"], k
        assert got[k]["output"] == want[k]["output"], k
    for k, w in ws.items():
        where = got[k]["where"]
        total = sum(n for _, n in where.values())
        mapped = sum(n for p, n in where.values() if on_obj(p))
        sm = smaps(w.pid)
        row = {"model": k, "pid": w.pid, "dtype": got[k]["dtype"], "param_bytes": total,
               "params_on_objects": mapped, "base_obj_rss": sum_maps(sm, lambda p: p == base_obj),
               "base_obj_pss": sum_maps(sm, lambda p: p == base_obj, "Pss"),
               "anon_params": sum(n for p, n in where.values() if p == "")}
        rows.append(row)
        assert mapped >= 0.95 * total, (row, {n: p for n, (p, _) in where.items() if not on_obj(p)})
        assert row["base_obj_pss"] < 0.6 * row["base_obj_rss"], row
    _report("transformers AutoModel.from_pretrained, MODELFS_SHARE=1:", rows)
