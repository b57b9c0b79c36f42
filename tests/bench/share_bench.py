"""Sharing benchmark: a family of a base and >= 7 fine-tunes, every model loaded in its own
process at once with unmodified loaders, from plain files on ext4, through the mount, through
the mount with the preload library, and through the mount under `modelfs exec` -- memory,
wall time and output bytes, all in one run.

Run it through scripts/bench-share.sh (builds the release binary and the preload library,
and the Python environment, first). Needs root (drop_caches, mount).

The family (--base-mib, default 1024, bf16, 24 layers: tests/modelfamily.py's Plan, a
Qwen2-like transformer) is written with the real `safetensors.torch.save_file`; each model is
a directory with model.safetensors and a transformers config.json (Qwen2ForCausalLM), so
`AutoModelForCausalLM.from_pretrained(dir)` loads it. Weights are random bf16 bit patterns
with the exponent fixed to 2^-7 (so a forward pass stays finite and its logits are a real
output check; tests/modelfamily.py's random_bf16 would give NaN and Inf). Variants, the first
--variants of (default 7, so 8 models):

  ft-head      lm_head replaced
  ft-last2     the tensors of the last 2 layers replaced
  ft-last4     the last 4 layers replaced
  lora-merged  q_proj and v_proj of every layer changed by a merged rank-8 update
  shifted      lm_head replaced, plus a 6-byte tensor `aa.shift_marker` that sorts first and
               other metadata: every data offset moves by a non-multiple of 4096
  shifted-ft   the marker (so shifted too) and the last layer replaced
  resave-meta  the same tensor list re-saved with longer __metadata__ (the header grows by a
               non-multiple of 4096, so every offset shifts) and layer L-3 replaced
  ft-embed     embed_tokens replaced

Each variant shares 70-99% of its tensor bytes with the others (printed, with the family's
unique tensor bytes: the sizes of its distinct tensor byte strings, by sha256). Everything is
imported into a fresh store, the base first (so it is a whole-file object, served by
passthrough; the variants are recipes over its chunks).

Setups (rotated across --rounds; median if more than one round):

  ext4           the generated directories
  mount          `modelfs mount` (MOUNT_ARGS: --pin-budget 0 --prefetch-window 0, so that
                 pinned pages survive no drop_caches and no trace replay reads ahead), plain
                 processes, no LD_PRELOAD
  mount+preload  the same mount, LD_PRELOAD=libmodelfs_preload.so and MODELFS_SHARE unset: the
                 library alone (route 1; the Python hook stays off)
  mount+exec     the same mount, workers started by `modelfs exec --` (route 2: the library
                 plus the Python loader hook)

Loaders: st_load = `safetensors.torch.load_file(dir/model.safetensors)`;
from_pretrained = `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16,
output_loading_info=True)` (missing, mismatched or unexpected keys other than the marker, or
error messages, fail the worker: nothing is silently initialised), then one forward pass on 16
fixed input ids.

One cell = (setup, loader, cold|warm), with a fresh mount per (setup, loader): cold = `sync;
echo 3 > drop_caches` first, warm = again at once. A cell starts one worker per model at once
(torch.set_num_threads(1)). Each worker imports everything its loader needs, reports its
baseline (/proc/self/smaps_rollup) and waits; when all are ready the parent says go, each
loads its model, hashes every tensor's bytes with sha256 (faults every page, and is the
bit-identity check against the generator's hashes), from_pretrained also hashes the logits,
reports where every tensor lies (/proc/self/maps: an object file of the store, the model
file, anonymous memory), and holds the tensors until the parent has measured. Wall time
("load s") is from go until the last worker is done; the spawn is left out because starting 8
Pythons with torch (and transformers) on 2 cores costs the same in every setup and would
hide the difference (spawn -> done is in the JSON).

Memory, measured by the parent while the workers hold their tensors:
  page cache   of the model files (ext4), or of the mount's files (the FUSE inodes) plus every
               store object file (the mount setups), by cachestat(2) on a descriptor of each
               file (mincore on a mapping would count a passthrough file's backing object
               pages twice). Before a cold load only the objects are measured: opening a
               mount file is a FUSE open, and the first open of a passthrough file in a
               mount's life reads its whole object (the check), which belongs to the load.
               (The daemon drops the object pages it copied into a FUSE inode, so the plain
               mount holds about what ext4 holds, not twice the bytes.)
  anon added   sum over the workers of smaps_rollup Anonymous minus their own baseline
  memory added page cache + anon added (the issue's definition); the daemon's Anonymous growth
               is shown apart (it is not in the definition and stays small)
  Pss          sum of the workers' Pss, for reference
  tensors anon tensor bytes that lie in anonymous memory: a loader that copies tensors into
               private memory (whatever the mapping) shows here and in anon added
A cell in which the kernel reclaimed pages (pgscan in /proc/vmstat grew) is flagged: its
memory figures would be low. Before generating, the benchmark checks that the machine can hold
the family's page cache plus the workers, and suggests a --base-mib that fits if not.

Sharing per route: for each worker of mount+preload (route 1) and mount+exec (route 2), the
bytes of its tensors that the model shares with another model of the family, and how many of
those lie on mappings of store object files.

A cell costs about a minute at any size (8 Pythons importing torch and transformers on 2
cores, after drop_caches); 16 cells per round.

The run also prints the machine (nproc, memory, kernel); "2 cores, machine otherwise idle" is
the operator's claim, not checked.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import errno
import hashlib
import json
import os
import platform
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
GiB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")

SETUPS = ["ext4", "mount", "mount+preload", "mount+exec"]
LOADERS = ["st_load", "from_pretrained"]
VARIANTS = ["ft-head", "ft-last2", "ft-last4", "lora-merged", "shifted", "shifted-ft",
            "resave-meta", "ft-embed"]
MARKER = "aa.shift_marker"  # the extra tensor of the shifted variants (sorts first)
MOUNT_ARGS = "--pin-budget 0 --prefetch-window 0"
N_LAYERS = 24
N_IDS = 16
WORKER_BASE_GUESS = 700 * MiB  # a worker with torch + transformers imported (fit check only)
READY_TIMEOUT = 900.0
DONE_TIMEOUT = 3600.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ==========================================================================================
# /proc and page-cache helpers (parent and worker)


def rollup(pid) -> dict:
    """/proc/PID/smaps_rollup fields in bytes (Rss, Pss, Anonymous, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            p = line.split()
            if len(p) >= 3 and p[0].endswith(":") and p[1].isdigit():
                out[p[0][:-1]] = int(p[1]) * 1024
    return out


def vmstat() -> dict:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k.startswith(("pgscan", "pgsteal")):
                out[k] = int(v)
    return out


def reclaimed(before: dict, after: dict) -> int:
    """Pages the kernel scanned for reclaim between the two samples."""
    return sum(after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("pgscan"))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_cachestat = 451  # the same number on every architecture (new syscall table)


class _CSRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CS(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_cachestat_ok = [True]
RESIDENCY_METHOD = ["cachestat"]


def _mincore_bytes(fd: int, size: int) -> int:
    """Resident bytes of a shared read-only mapping of the file, by mincore(2)."""
    if size == 0:
        return 0
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        vec = ctypes.create_string_buffer(-(-size // PAGE))
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec.raw) * PAGE
    finally:
        _libc.munmap(addr, size)


def resident_bytes(path) -> int:
    """Page-cache bytes of the file's own inode (cachestat(2); mincore if the kernel has none)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _cachestat_ok[0]:
            rng, cs = _CSRange(0, 0), _CS()
            r = _libc.syscall(ctypes.c_long(SYS_cachestat), ctypes.c_long(fd), ctypes.byref(rng),
                              ctypes.byref(cs), ctypes.c_long(0))
            if r == 0:
                return cs.nr_cache * PAGE
            e = ctypes.get_errno()
            if e not in (errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(e, f"cachestat {path}: {os.strerror(e)}")
            _cachestat_ok[0] = False
            RESIDENCY_METHOD[0] = "mincore (no cachestat: passthrough files count twice)"
        return _mincore_bytes(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in Path(d).rglob("*") if p.is_file() and not p.is_symlink())


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


# ==========================================================================================
# the worker (this file run with --worker SPEC)


def _maps_index():
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split(None, 5)
            lo, hi = (int(v, 16) for v in p[0].split("-"))
            rows.append((lo, hi, p[5].strip() if len(p) > 5 else ""))
    rows.sort()
    return rows, [r[0] for r in rows]


def _placement(idx, ptr: int, n: int, objects_dir: str | None) -> list[int]:
    """[bytes on store object mappings, on a *.safetensors mapping, anonymous, other]."""
    rows, starts = idx
    out = [0, 0, 0, 0]
    i = max(0, bisect.bisect_right(starts, ptr) - 1)
    end = ptr + n
    while i < len(rows) and rows[i][0] < end:
        lo, hi, path = rows[i]
        if hi > ptr:
            b = min(hi, end) - max(lo, ptr)
            if objects_dir and path.startswith(objects_dir + "/"):
                out[0] += b
            elif path.endswith(".safetensors"):
                out[1] += b
            elif path == "" or path.startswith("["):
                out[2] += b
            else:
                out[3] += b
        i += 1
    return out


def worker_main(spec: dict) -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to the log, not into the protocol

    def send(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    def wait_for(word):
        line = sys.stdin.readline()
        if line.strip() != word:
            raise SystemExit(f"worker: expected {word!r}, got {line!r}")

    loader, mdir = spec["loader"], Path(spec["dir"])
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load_file

    if loader == "from_pretrained":
        import transformers
        from transformers import AutoModelForCausalLM
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (imported before baseline)

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    hook = sys.modules.get("modelfs.hook")
    hook_on = bool(hook is not None and hook.installed())
    with open("/proc/self/maps") as f:
        preload_on = "libmodelfs_preload" in f.read()
    base = rollup("self")
    send(ev="ready", pid=os.getpid(), anon=base.get("Anonymous", 0), pss=base.get("Pss", 0),
         hook=hook_on, preload=preload_on)
    wait_for("go")
    t0 = time.monotonic()
    logits_digest = None
    if loader == "st_load":
        sd = load_file(str(mdir / "model.safetensors"))
        keep = sd
    else:
        model, info = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.bfloat16,
                                                           output_loading_info=True)
        bad = {k: sorted(map(str, v)) for k, v in info.items() if k != "unexpected_keys" and v}
        unexpected = sorted(set(map(str, info.get("unexpected_keys") or ())) - {MARKER})
        if bad or unexpected:
            raise SystemExit(f"from_pretrained({mdir}): {bad} unexpected {unexpected}")
        model.eval()
        sd = model.state_dict()
        keep = model
    digests = {}
    for name, t in sd.items():
        t = t.detach()
        digests[name] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()
    if loader == "from_pretrained":
        ids = (torch.arange(N_IDS, dtype=torch.long).reshape(1, N_IDS) * 7919 + 11) % spec["vocab"]
        with torch.inference_mode():
            logits = keep(ids).logits
        logits_digest = hashlib.sha256(logits.contiguous().view(torch.uint8).numpy()).hexdigest()
        del logits
    t1 = time.monotonic()
    idx = _maps_index()
    tensors = {}
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        tensors[name] = [digests[name], n, *_placement(idx, t.data_ptr(), n, spec.get("objects"))]
    hook_stats = None
    if hook_on:
        from modelfs import share

        hook_stats = share.stats()
    send(ev="done", t0=t0, t1=t1, tensors=tensors, logits=logits_digest, hook_stats=hook_stats)
    wait_for("exit")
    del sd, keep
    return 0


# ==========================================================================================
# the family


def _bits_bf16(rng, shape):
    """Random bf16 with exponent 2^-7: sign and mantissa random, |x| in [0.0078, 0.0156)."""
    import numpy as np
    import torch

    n = int(np.prod(shape))
    b = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    b &= 0x807F
    b |= 0x3C00
    return torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).reshape(shape)


def _lora(rng, w, rank=8):
    import numpy as np
    import torch

    d_out, d_in = w.shape
    a = torch.from_numpy(rng.standard_normal((rank, d_in), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((d_out, rank), dtype=np.float32))
    return (w.float() + (b @ a) * 2e-4).to(torch.bfloat16)


def _header(path: Path):
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in hdr.items() if k != "__metadata__"}


def make_family(root: Path, base_mib: float, variants: list[str], seed: int) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "tests"))
    from modelfamily import Plan

    plan = Plan(base_mib, N_LAYERS)
    d, L = plan.hidden, plan.n_layers
    head_dim = next(h for h in (128, 96, 64, 32) if d % h == 0)
    rng = np.random.default_rng(seed)
    base = {name: _bits_bf16(rng, shape) for name, shape in plan.tensors()}
    shapes = dict(plan.tensors())

    def layer_keys(i):
        return [k for k in base if k.startswith(f"model.layers.{i}.")]

    def replaced(keys):
        sd = dict(base)
        for k in keys:
            sd[k] = _bits_bf16(rng, shapes[k])
        return sd

    meta = {"format": "pt"}
    models = {"base": (base, meta)}
    for v in variants:
        if v == "ft-head":
            models[v] = (replaced(["lm_head.weight"]), meta)
        elif v == "ft-last2":
            models[v] = (replaced(layer_keys(L - 1) + layer_keys(L - 2)), meta)
        elif v == "ft-last4":
            models[v] = (replaced([k for i in range(L - 4, L) for k in layer_keys(i)]), meta)
        elif v == "lora-merged":
            sd = dict(base)
            for i in range(L):
                for p in ("q_proj", "v_proj"):
                    k = f"model.layers.{i}.self_attn.{p}.weight"
                    sd[k] = _lora(rng, base[k])
            models[v] = (sd, meta)
        elif v == "shifted":
            sd = replaced(["lm_head.weight"])
            sd[MARKER] = _bits_bf16(rng, (3,))
            models[v] = (sd, {"format": "pt", "note": "shifted"})
        elif v == "shifted-ft":
            sd = replaced(layer_keys(L - 1))
            sd[MARKER] = _bits_bf16(rng, (3,))
            models[v] = (sd, {"format": "pt", "note": "shifted and fine-tuned"})
        elif v == "resave-meta":
            models[v] = (replaced(layer_keys(L - 3)),
                         {"format": "pt", "saved_by": "a fine-tuning script", "run": "x" * 333})
        elif v == "ft-embed":
            models[v] = (replaced(["model.embed_tokens.weight"]), meta)
        else:
            raise ValueError(v)
    cfg = plan.config(num_attention_heads=d // head_dim, num_key_value_heads=d // head_dim,
                      head_dim=head_dim)
    sha = {}  # id(tensor) -> sha256 of its bytes

    def digest(t):
        h = sha.get(id(t))
        if h is None:
            h = sha[id(t)] = hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()
        return h

    man = {"base_mib": base_mib, "seed": seed, "n_layers": L, "hidden": d, "vocab": plan.vocab,
           "ff": plan.ff, "head_dim": head_dim, "models": {}}
    for name, (sd, md) in models.items():
        mdir = root / name
        mdir.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(mdir / "model.safetensors"), metadata=md)
        c = dict(cfg, _name_or_path=f"modelfs-bench/{name}")
        (mdir / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        offs = _header(mdir / "model.safetensors")
        man["models"][name] = {
            "dir": str(mdir),
            "file_bytes": sum(p.stat().st_size for p in files_under(mdir)),
            "tensors": {k: [digest(t), offs[k][1], offs[k][0]] for k, t in sd.items()},
        }
        log(f"  wrote {name}: {man['models'][name]['file_bytes'] / MiB:.1f} MiB")
    (root / "manifest.json").write_text(json.dumps(man))
    return man


def family_stats(man: dict) -> dict:
    """Unique tensor bytes, and per model: tensor bytes, shared bytes (a byte string another
    model of the family also has), bytes whose offset is congruent mod 4096 with the base's."""
    users: dict[str, set] = {}
    size: dict[str, int] = {}
    for m, mod in man["models"].items():
        for _k, (h, n, _o) in mod["tensors"].items():
            users.setdefault(h, set()).add(m)
            size[h] = n
    unique = sum(size.values())
    base_off = {h: o for h, _n, o in man["models"]["base"]["tensors"].values()}
    per = {}
    for m, mod in man["models"].items():
        tb = sum(n for _h, n, _o in mod["tensors"].values())
        shared = sum(n for h, n, _o in mod["tensors"].values() if len(users[h]) > 1)
        in_base = [(h, n, o) for h, n, o in mod["tensors"].values()
                   if h in base_off and len(users[h]) > 1]
        cong = sum(n for h, n, o in in_base if (o - base_off[h]) % 4096 == 0)
        per[m] = {"file_bytes": mod["file_bytes"], "tensor_bytes": tb, "shared_bytes": shared,
                  "shared_frac": shared / tb, "new_bytes": tb - shared,
                  "congruent_bytes": cong,
                  "congruent_frac": cong / shared if shared else 0.0}
    return {"unique_tensor_bytes": unique, "shared_hashes": sorted(h for h, u in users.items() if len(u) > 1),
            "models": per, "total_file_bytes": sum(p["file_bytes"] for p in per.values())}


# ==========================================================================================
# the parent


class Worker:
    def __init__(self, model: str, argv, env, logpath: Path):
        self.model = model
        self.logpath = logpath
        self.logf = open(logpath, "wb")
        self.t_spawn = time.monotonic()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.logf, env=env)
        self.buf = b""
        self.pid = None

    def tail(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not r:
                raise RuntimeError(f"worker {self.model}: no message within {timeout:.0f}s\n{self.tail()}")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                rc = self.p.wait()
                raise RuntimeError(f"worker {self.model} exited {rc}\n{self.tail()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, word: str) -> None:
        self.p.stdin.write(word.encode() + b"\n")
        self.p.stdin.flush()

    def finish(self) -> None:
        try:
            if self.p.poll() is None:
                try:
                    self.send("exit")
                except OSError:
                    pass
                try:
                    self.p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.p.kill()
                    self.p.wait()
        finally:
            self.logf.close()


class Bench:
    def __init__(self, args):
        self.args = args
        self.work: Path = args.workdir
        self.store = self.work / "store"
        self.mnt = self.work / "mnt"
        self.logs = self.work / "logs"
        self.mfs = SimpleNamespace(bin=args.modelfs, store=self.store, prefix=[])
        self.mount = None
        self.objects_dir = None

    # -- store and mount -------------------------------------------------------------------
    def mfs_run(self, *argv) -> str:
        cp = subprocess.run([str(self.args.modelfs), "--store", str(self.store), *map(str, argv)],
                            check=True, stdout=subprocess.PIPE, text=True)
        return cp.stdout

    def start_mount(self):
        import mountlib

        assert self.mount is None
        m = mountlib.Mount(self.mfs, self.mnt, *shlex.split(self.args.mount_args))
        self.mount = m
        m.start_daemon()
        from modelfs import share

        if not share.socket_paths(os.stat(self.mnt).st_dev):
            raise SystemExit("the mount serves no layout socket: the sharing setups cannot run\n"
                             + m.describe())
        m.daemon_anon0 = sum(rollup(p).get("Anonymous", 0) for p in m.daemon_pids)
        return m

    def stop_mount(self) -> None:
        if self.mount is not None:
            m, self.mount = self.mount, None
            try:
                m.umount(check=True)
            finally:
                m.cleanup()

    # -- preparation -----------------------------------------------------------------------
    def check_fit(self, n_models: int, base_bytes: float) -> dict:
        mi = meminfo()
        avail = mi["MemAvailable"]
        # the largest setup: the mount without sharing keeps the variants' bytes in their
        # FUSE inodes and the unique bytes (~1.6x the base) in the objects; every worker
        # holds its interpreter, torch and transformers; 1 GiB for everything else
        need = n_models * base_bytes + 1.6 * base_bytes + n_models * WORKER_BASE_GUESS + GiB
        fit = {"mem_total": mi["MemTotal"], "mem_available": avail, "estimated_peak": need,
               "fits": need <= avail}
        if not fit["fits"]:
            per = (avail - n_models * WORKER_BASE_GUESS - GiB) / (n_models + 1.6)
            sug = max(16, int(per / MiB) // 64 * 64)
            msg = (f"this machine cannot hold the run: about {need / GiB:.1f} GiB needed "
                   f"({n_models} models x {base_bytes / GiB:.2f} GiB of page cache through the mount "
                   f"plus the objects plus {n_models} workers), {avail / GiB:.1f} GiB available; "
                   f"--base-mib {sug} would fit")
            if not self.args.force:
                raise SystemExit(msg + " (or pass --force)")
            log("WARNING: " + msg)
        return fit

    def prepare(self) -> None:
        a = self.args
        variants = VARIANTS[:a.variants]
        n_models = 1 + len(variants)
        if a.family:
            self.fam = a.family.resolve()
            self.man = json.loads((self.fam / "manifest.json").read_text())
            missing = [v for v in ["base", *variants] if v not in self.man["models"]]
            if missing:
                raise SystemExit(f"{self.fam} has no {missing}")
            self.man["models"] = {k: v for k, v in self.man["models"].items() if k in ["base", *variants]}
            base_bytes = self.man["models"]["base"]["file_bytes"]
        else:
            base_bytes = a.base_mib * MiB
        self.fit = self.check_fit(n_models, base_bytes)
        need_disk = 2.8 * n_models * base_bytes
        free = shutil.disk_usage(self.work).free
        if free < need_disk and not a.family:
            raise SystemExit(f"{self.work}: {free / GiB:.1f} GiB free, the family and the store need "
                             f"about {need_disk / GiB:.1f} GiB")
        if not a.family:
            self.fam = self.work / "family"
            log(f"generating the family ({a.base_mib} MiB base, {len(variants)} variants) in {self.fam}")
            self.man = make_family(self.fam, a.base_mib, variants, a.seed)
            import gc

            gc.collect()
        self.models = list(self.man["models"])
        self.fs = family_stats(self.man)
        self.shared_hashes = set(self.fs["shared_hashes"])
        for m, s in self.fs["models"].items():
            if m != "base" and not 0.70 <= s["shared_frac"] <= 0.99:
                log(f"WARNING: {m} shares {s['shared_frac']:.1%} of its tensor bytes (goal 70-99%)")
        self.mfs_run("init")
        self.imports = {}
        for m in self.models:  # base first
            log(f"importing {m}")
            t0 = time.monotonic()
            out = self.mfs_run("import", self.fam / m, "--name", m, "--json")
            try:
                self.imports[m] = json.loads(out)
            except json.JSONDecodeError:
                self.imports[m] = {"raw": out.strip()}
            self.imports[m]["secs"] = time.monotonic() - t0
        try:
            self.du = json.loads(self.mfs_run("du", "--json"))
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            self.du = None
        self.objects_dir = os.path.realpath(self.store / "objects")
        self.preload = str(a.preload or Path(a.modelfs).resolve().parent / "libmodelfs_preload.so")
        if not os.path.isfile(self.preload):
            raise SystemExit(f"preload library {self.preload} not found (build -p modelfs-preload)")
        self.logs.mkdir(exist_ok=True)

    # -- one cell --------------------------------------------------------------------------
    def worker_argv_env(self, setup: str, loader: str, model: str):
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "MODELFS_SHARE", "MODELFS_SHARE_DEBUG", "MODELFS_PRELOAD")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
                   HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
        root = self.fam if setup == "ext4" else self.mnt
        spec = {"loader": loader, "dir": str(root / model), "objects": self.objects_dir,
                "vocab": self.man["vocab"]}
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        if setup == "mount+preload":
            env["LD_PRELOAD"] = self.preload
        elif setup == "mount+exec":
            argv = [str(self.args.modelfs), "exec", "--", *argv]
        return argv, env

    def page_cache(self, setup: str, files: bool = True) -> dict:
        """Page-cache bytes of the setup's model files and (mount setups) the store's objects.
        files=False skips the mount's files: opening one is a FUSE open, and the first open of
        a passthrough file in a mount's life reads (checks) its whole object, which must
        happen in the workers' timed load, not before it."""
        if setup == "ext4":
            per = {m: sum(resident_bytes(p) for p in files_under(self.fam / m)) for m in self.models}
            return {"files": sum(per.values()), "objects": 0, "per_model": per}
        objs = sum(resident_bytes(p) for p in files_under(self.store / "objects"))
        if not files:
            return {"files": None, "objects": objs, "per_model": None}
        per = {m: sum(resident_bytes(p) for p in files_under(self.mnt / m)) for m in self.models}
        return {"files": sum(per.values()), "objects": objs, "per_model": per}

    def cell(self, setup: str, loader: str, temp: str) -> dict:
        if temp == "cold":
            drop_caches()
        vm0 = vmstat()
        pc0 = self.page_cache(setup, files=setup == "ext4" or temp == "warm")
        ws = []
        try:
            for m in self.models:
                argv, env = self.worker_argv_env(setup, loader, m)
                ws.append(Worker(m, argv, env, self.logs / f"{setup}-{loader}-{temp}-{m}.log"))
            ready = {}
            for w in ws:
                msg = w.recv(READY_TIMEOUT)
                w.pid = msg["pid"]
                ready[w.model] = msg
                want_hook, want_pre = setup == "mount+exec", setup in ("mount+preload", "mount+exec")
                if msg["hook"] != want_hook or msg["preload"] != want_pre:
                    raise RuntimeError(f"{setup} worker {w.model}: hook {msg['hook']} preload "
                                       f"{msg['preload']}, expected {want_hook} {want_pre}")
            t_ready = time.monotonic()
            t_go = time.monotonic()
            for w in ws:
                w.send("go")
            done = {w.model: w.recv(DONE_TIMEOUT) for w in ws}
            t_done = max(d["t1"] for d in done.values())
            # measure while every worker holds its model
            roll = {w.model: rollup(w.pid) for w in ws}
            pc = self.page_cache(setup)
            daemon_anon = None
            if self.mount is not None:
                daemon_anon = (sum(rollup(p).get("Anonymous", 0) for p in self.mount.daemon_pids
                                   if os.path.exists(f"/proc/{p}")) - self.mount.daemon_anon0)
            vm1 = vmstat()
        finally:
            for w in ws:
                w.finish()
        per = {}
        for m in self.models:
            r, d = roll[m], done[m]
            tens = d["tensors"]
            exp = self.man["models"][m]["tensors"]
            got = {k: v[0] for k, v in tens.items()}
            # from_pretrained's state dict has every tensor of the file but the marker
            want = {k: v[0] for k, v in exp.items() if loader == "st_load" or k != MARKER}
            shared = [v for v in tens.values() if v[0] in self.shared_hashes]
            per[m] = {
                "anon_added": r.get("Anonymous", 0) - ready[m]["anon"],
                "anon_base": ready[m]["anon"],
                "pss": r.get("Pss", 0),
                "rss": r.get("Rss", 0),
                "load_s": d["t1"] - d["t0"],
                "start_wait_s": d["t0"] - t_go,
                "tensor_bytes": sum(v[1] for v in tens.values()),
                "on_objects": sum(v[2] for v in tens.values()),
                "on_file": sum(v[3] for v in tens.values()),
                "on_anon": sum(v[4] for v in tens.values()),
                "on_other": sum(v[5] for v in tens.values()),
                "shared_bytes": sum(v[1] for v in shared),
                "shared_on_objects": sum(v[2] for v in shared),
                "tensors_ok": got == want,
                "page_cache_files": pc["per_model"][m],
                "logits": d["logits"],
                "hook_stats": d["hook_stats"],
            }
        spawn = min(w.t_spawn for w in ws)
        anon = sum(p["anon_added"] for p in per.values())
        out = {
            "setup": setup, "loader": loader, "temp": temp,
            "load_s": t_done - t_go, "spawn_to_ready_s": t_ready - spawn,
            "spawn_to_done_s": t_done - spawn,
            "page_cache_before": pc0, "page_cache": pc, "anon_added": anon,
            "memory_added": pc["files"] + pc["objects"] + anon,
            "pss_sum": sum(p["pss"] for p in per.values()),
            "tensors_on_anon": sum(p["on_anon"] for p in per.values()),
            "daemon_anon_added": daemon_anon,
            "reclaim_pages": reclaimed(vm0, vm1),
            "tensors_ok": all(p["tensors_ok"] for p in per.values()),
            "models": per,
        }
        return out

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        a = self.args
        self.prepare()
        cells = []
        for r in range(a.rounds):
            k = r % len(a.setups)
            for setup in a.setups[k:] + a.setups[:k]:
                for loader in a.loaders:
                    if setup != "ext4":
                        self.start_mount()
                    try:
                        for temp in ("cold", "warm"):
                            c = self.cell(setup, loader, temp)
                            c["round"] = r
                            cells.append(c)
                            log(f"round {r} {loader:15s} {setup:14s} {temp}: {c['load_s']:.2f} s, "
                                f"memory added {c['memory_added'] / MiB:,.0f} MiB "
                                f"(page cache {c['page_cache']['files'] / MiB:,.0f} + "
                                f"{c['page_cache']['objects'] / MiB:,.0f}, anon {c['anon_added'] / MiB:,.0f})"
                                f"{'' if c['tensors_ok'] else '  TENSOR MISMATCH'}")
                    finally:
                        self.stop_mount()
        # logits: the same across setups (per loader, model); reference = the ext4 cold cell
        for loader in a.loaders:
            cs = [c for c in cells if c["loader"] == loader]
            ref = next((c for c in cs if c["setup"] == "ext4"), cs[0])
            for c in cs:
                c["logits_ok"] = all(c["models"][m]["logits"] == ref["models"][m]["logits"]
                                     for m in self.models)
                c["outputs_identical"] = c["tensors_ok"] and c["logits_ok"]
        summary = []
        for loader in a.loaders:
            for setup in a.setups:
                for temp in ("cold", "warm"):
                    cs = [c for c in cells if (c["loader"], c["setup"], c["temp"]) == (loader, setup, temp)]
                    med = lambda f: statistics.median(f(c) for c in cs)  # noqa: E731
                    summary.append({
                        "loader": loader, "setup": setup, "temp": temp, "n": len(cs),
                        "load_s": med(lambda c: c["load_s"]),
                        "spawn_to_done_s": med(lambda c: c["spawn_to_done_s"]),
                        "page_cache_files": med(lambda c: c["page_cache"]["files"]),
                        "page_cache_objects": med(lambda c: c["page_cache"]["objects"]),
                        "anon_added": med(lambda c: c["anon_added"]),
                        "memory_added": med(lambda c: c["memory_added"]),
                        "pss_sum": med(lambda c: c["pss_sum"]),
                        "tensors_on_anon": med(lambda c: c["tensors_on_anon"]),
                        "daemon_anon_added": (med(lambda c: c["daemon_anon_added"])
                                              if cs[0]["daemon_anon_added"] is not None else None),
                        "reclaim": any(c["reclaim_pages"] > 0 for c in cs),
                        "outputs_identical": all(c["outputs_identical"] for c in cs),
                    })
        for s in summary:
            ref = next((x for x in summary if (x["loader"], x["setup"], x["temp"]) ==
                        (s["loader"], "ext4", s["temp"])), None)
            s["load_vs_ext4"] = s["load_s"] / ref["load_s"] if ref else None
            s["mem_vs_ext4"] = s["memory_added"] / ref["memory_added"] if ref else None
            s["mem_over_unique"] = s["memory_added"] / self.fs["unique_tensor_bytes"]
        sharing = []
        for loader in a.loaders:
            for setup in [s for s in a.setups if s != "ext4"]:
                c = next(c for c in cells if (c["loader"], c["setup"], c["temp"], c["round"]) ==
                         (loader, setup, "cold", 0))
                for m in self.models:
                    p = c["models"][m]
                    sharing.append({"loader": loader, "setup": setup, "model": m,
                                    "shared_bytes": p["shared_bytes"],
                                    "shared_on_objects": p["shared_on_objects"],
                                    "frac": p["shared_on_objects"] / p["shared_bytes"] if p["shared_bytes"] else 0,
                                    "on_objects": p["on_objects"], "tensor_bytes": p["tensor_bytes"],
                                    "on_anon": p["on_anon"], "on_file": p["on_file"],
                                    "page_cache_files": p["page_cache_files"],
                                    "hook_stats": p["hook_stats"]})
        mi = meminfo()
        return {
            "config": {"base_mib": a.base_mib, "variants": a.variants, "rounds": a.rounds,
                       "setups": a.setups, "loaders": a.loaders, "mount_args": a.mount_args,
                       "seed": a.seed, "n_layers": N_LAYERS, "modelfs": str(a.modelfs),
                       "preload": self.preload, "residency": RESIDENCY_METHOD[0]},
            "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                        "mem_total": mi["MemTotal"], "cpu": _cpu_model(),
                        "workdir_fs": _fstype(self.work), "thp": _thp(),
                        "fit": self.fit},
            "family": {k: v for k, v in self.fs.items() if k != "shared_hashes"},
            "plan": {k: self.man[k] for k in ("hidden", "ff", "vocab", "head_dim", "n_layers")},
            "imports": self.imports, "du": self.du,
            "cells": cells, "summary": summary, "sharing": sharing,
            "elapsed_secs": time.time() - t0,
        }

    def cleanup(self) -> None:
        import mountlib

        try:
            self.stop_mount()
        except Exception as e:  # noqa: BLE001
            log(f"umount failed: {e}")
        mountlib.cleanup_all()
        mountlib.force_unmount(self.mnt)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fstype(p: Path) -> str:
    try:
        return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(p)], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def _thp() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "?"


# ==========================================================================================
# the report


def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:,.0f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(res: dict) -> str:
    cfg, mach, fam = res["config"], res["machine"], res["family"]
    uniq = fam["unique_tensor_bytes"]
    L = [f"\nmodelfs sharing benchmark: base {cfg['base_mib']} MiB, {len(fam['models'])} models "
         f"(base + {len(fam['models']) - 1} variants), one process per model at once, "
         f"{cfg['rounds']} round(s) (median)",
         f"machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['mem_total'] / GiB:.1f} GiB memory, "
         f"kernel {mach['kernel']}, workdir on {mach['workdir_fs']}, THP {mach['thp']}; "
         "'2 cores, machine otherwise idle' is the operator's claim",
         f"mount: {cfg['mount_args']}; page cache by {cfg['residency']}; estimated peak "
         f"{mach['fit']['estimated_peak'] / GiB:.1f} GiB of {mach['fit']['mem_available'] / GiB:.1f} GiB available",
         f"plan: hidden {res['plan']['hidden']}, ff {res['plan']['ff']}, vocab {res['plan']['vocab']}, "
         f"{res['plan']['n_layers']} layers, head_dim {res['plan']['head_dim']}",
         "", "family (shared = tensor bytes another model of the family also has; congruent = shared "
         "bytes at a file offset = the base's mod 4096):", "",
         "| model | file MiB | tensor MiB | shared | new MiB | congruent with base |",
         "|---|---|---|---|---|---|"]
    for m, s in fam["models"].items():
        L.append(f"| {m} | {s['file_bytes'] / MiB:,.1f} | {s['tensor_bytes'] / MiB:,.1f} | "
                 f"{s['shared_frac']:.1%} | {s['new_bytes'] / MiB:,.1f} | {s['congruent_frac']:.0%} |")
    du = res.get("du") or {}
    stored = du.get("stored_bytes") if isinstance(du, dict) else None
    L += ["", f"unique tensor bytes {uniq / MiB:,.1f} MiB; all files {fam['total_file_bytes'] / MiB:,.1f} MiB"
          + (f"; store holds {stored / MiB:,.1f} MiB" if stored else ""), "",
          "memory added = page cache (files + objects) + workers' anonymous memory above their "
          "baseline; load s = go until the last worker has loaded and hashed every tensor",
          "",
          "| loader | setup | run | load s | vs ext4 | page cache files MiB | page cache objects MiB "
          "| anon added MiB | memory added MiB | / unique | vs ext4 | Pss sum MiB | tensors in anon MiB "
          "| daemon anon MiB | identical | note |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        note = []
        if s["reclaim"]:
            note.append("RECLAIM: memory figures low")
        n_models = len(fam["models"])
        if s["tensors_on_anon"] > 0.5 * fam["total_file_bytes"] / n_models:
            note.append("loader copies tensors into private memory")
        L.append(
            f"| {s['loader']} | {s['setup']} | {s['temp']} | {s['load_s']:.2f} | "
            f"{_ratio(s['load_vs_ext4'])} | "
            f"{_mib(s['page_cache_files'])} | {_mib(s['page_cache_objects'])} | {_mib(s['anon_added'])} | "
            f"{_mib(s['memory_added'])} | {s['mem_over_unique']:.2f} | "
            f"{_ratio(s['mem_vs_ext4'])} | {_mib(s['pss_sum'])} | "
            f"{_mib(s['tensors_on_anon'])} | {_mib(s['daemon_anon_added'])} | "
            f"{'yes' if s['outputs_identical'] else 'NO'} | {'; '.join(note)} |")
    if res["sharing"]:
        routes = [r for r in ("mount", "mount+preload", "mount+exec") if r in cfg["setups"]]
        L += ["", "shared bytes mapped shared (cold runs): shared = the model's tensor bytes that another "
              "model of the family also has; on objects = the part of them the worker has on mappings of "
              "store object files; FUSE cache = the page cache of the model's file on the mount",
              "(route 1 = mount+preload, the library alone; route 2 = mount+exec, library + Python hook)",
              "", "| loader | model | shared MiB | " + " | ".join(
                  f"{r}: on objects MiB (fraction) | {r}: FUSE cache MiB" for r in routes) + " |",
              "|---|---|---|" + "---|---|" * len(routes)]
        by = {(x["loader"], x["setup"], x["model"]): x for x in res["sharing"]}
        for loader in cfg["loaders"]:
            for m in fam["models"]:
                xs = [by.get((loader, r, m)) for r in routes]
                if not any(xs):
                    continue
                sb = next(x for x in xs if x)["shared_bytes"]
                cols = []
                for x in xs:
                    if x is None:
                        cols += ["-", "-"]
                    else:
                        cols += [f"{x['shared_on_objects'] / MiB:,.1f} ({x['frac']:.1%})",
                                 _mib(x["page_cache_files"])]
                L.append(f"| {loader} | {m} | {sb / MiB:,.1f} | " + " | ".join(cols) + " |")
        for loader in cfg["loaders"]:
            for setup in routes:
                xs = [x for x in res["sharing"] if x["loader"] == loader and x["setup"] == setup]
                sb = sum(x["shared_bytes"] for x in xs)
                so = sum(x["shared_on_objects"] for x in xs)
                if sb:
                    L.append(f"family, {loader}, {setup}: {so / MiB:,.1f} of {sb / MiB:,.1f} MiB "
                             f"shared bytes mapped from objects ({so / sb:.1%})")
    L.append("")
    for loader in cfg["loaders"]:
        for setup in ("mount+preload", "mount+exec"):
            for temp in ("cold", "warm"):
                s = next((x for x in res["summary"] if (x["loader"], x["setup"], x["temp"]) ==
                          (loader, setup, temp)), None)
                if s is None:
                    continue
                mem_ok = s["mem_over_unique"] <= 1.10
                red = None if s["mem_vs_ext4"] is None else 1 - s["mem_vs_ext4"]
                t_ok = s["load_vs_ext4"] is not None and s["load_vs_ext4"] <= 1.0
                ok = mem_ok and t_ok and s["outputs_identical"]
                L.append(f"goal ({loader}, {setup}, {temp}): memory added {s['mem_over_unique']:.2f}x unique "
                         f"(<= 1.10), " + ("" if red is None else f"{red:.0%} less than ext4 (>= 80%), ")
                         + ("" if s["load_vs_ext4"] is None else f"load {s['load_vs_ext4']:.2f}x ext4's (<= 1), ")
                         + f"outputs {'identical' if s['outputs_identical'] else 'DIFFER'} -> "
                         f"{'met' if ok else 'NOT met'}")
    L.append(f"elapsed {res['elapsed_secs']:.0f} s")
    return "\n".join(L)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(json.loads(sys.argv[2]))
    if os.environ.get("LD_PRELOAD") or os.environ.get("MODELFS_SHARE"):
        # the parent measures with plain mappings and descriptors: never under the library
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MODELFS_SHARE")}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/modelfs-share-bench"))
    ap.add_argument("--base-mib", type=int, default=1024)
    ap.add_argument("--variants", type=int, default=7, help=f"how many of {', '.join(VARIANTS)}")
    ap.add_argument("--family", type=Path, default=None,
                    help="a family this benchmark generated before (kept with --keep: WORKDIR/family "
                         "copied elsewhere); skips generation")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    ap.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated subset of " + ",".join(LOADERS))
    ap.add_argument("--mount-args", default=MOUNT_ARGS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modelfs", type=Path, default=REPO / "target/release/modelfs")
    ap.add_argument("--preload", type=Path, default=None,
                    help="libmodelfs_preload.so (default: next to --modelfs)")
    ap.add_argument("--force", action="store_true", help="run even if the machine seems too small")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.setups = [s for s in args.setups.split(",") if s]
    args.loaders = [s for s in args.loaders.split(",") if s]
    if not set(args.setups) <= set(SETUPS) or not args.setups:
        ap.error(f"--setups: choose from {SETUPS}")
    if not set(args.loaders) <= set(LOADERS) or not args.loaders:
        ap.error(f"--loaders: choose from {LOADERS}")
    if not 7 <= args.variants <= len(VARIANTS):
        ap.error(f"--variants must be 7..{len(VARIANTS)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if os.geteuid() != 0:
        print("share_bench needs root (drop_caches, mount)", file=sys.stderr)
        return 2
    args.modelfs = args.modelfs.resolve()
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "python"))
    import mountlib

    return mountlib.run_bench(Bench, args, report)


if __name__ == "__main__":
    sys.exit(main())
