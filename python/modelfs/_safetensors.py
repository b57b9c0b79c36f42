"""``safetensors.safe_open`` that serves tensors from the store's objects.

The replacement wraps the original ``safe_open`` (which is always opened
first, so every error, every method and every argument behave as before) and,
for a file on a modelfs mount, asks the mount for the file's layout (§11) and
maps the objects the file's tensors are in. A tensor whose bytes lie wholly
inside one run is then a view of the object mapping; anything else (a tensor
across runs, an empty or misaligned tensor, an unknown dtype, another device
or backend, no layout) comes from the original.

Semantics kept from the original (safetensors 0.8, backend "mmap"): tensors
are zero-copy views of a private copy-on-write mapping; two get_tensor calls
on one handle return views of the same memory, two handles never share
memory. So the objects are mapped once per handle (MAP_PRIVATE, read+write:
writes stay in the process), not once per process: a process that loads a
base and its fine-tune and then trains one in place does not change the
other. Pages are shared through the page cache either way.

Lifetime: ``torch.frombuffer`` does not keep its buffer alive, so the torch
tensors are made with ``torch.from_numpy(np.frombuffer(mapping, uint8))``:
the tensor's storage holds the array, which holds the mapping's buffer, so
the mapping lives exactly as long as some tensor or view does, and holds no
descriptor (modelfs._mapping).
"""

from __future__ import annotations

import json
import os
import struct
import threading

from . import share
from ._mapping import PAGE, map_private

_orig_safe_open = None  # the original class, set by patch_safetensors()

MAX_HEADER = 100 << 20  # the format's own limit

# dtype name -> (bytes per element, torch dtype attribute name, numpy dtype name)
_DTYPES = {
    "F64": (8, "float64", "float64"),
    "F32": (4, "float32", "float32"),
    "F16": (2, "float16", "float16"),
    "BF16": (2, "bfloat16", "bfloat16"),  # numpy: only once ml_dtypes registered it, as the original
    "I64": (8, "int64", "int64"),
    "U64": (8, "uint64", "uint64"),
    "I32": (4, "int32", "int32"),
    "U32": (4, "uint32", "uint32"),
    "I16": (2, "int16", "int16"),
    "U16": (2, "uint16", "uint16"),
    "I8": (1, "int8", "int8"),
    "U8": (1, "uint8", "uint8"),
    "BOOL": (1, "bool", "bool"),
    "C64": (8, "complex64", "complex64"),
    "F8_E4M3": (1, "float8_e4m3fn", None),  # the original numpy loader cannot load F8: delegate
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz", None),
    "F8_E5M2": (1, "float8_e5m2", None),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz", None),
    "F8_E8M0": (1, "float8_e8m0fnu", None),
}


class _Tensor:
    __slots__ = ("dtype", "shape", "nbytes", "begin", "obj", "object_offset")

    def __init__(self, dtype, shape, nbytes, begin, obj, object_offset):
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.begin = begin
        self.obj = obj
        self.object_offset = object_offset


def parse_header(fd: int, size: int):
    """{name: (dtype, shape, file_begin, file_end)} of a safetensors file, or
    raises ValueError. Checks what a mapping relies on: sizes, bounds."""
    if size < 8:
        raise ValueError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n < 2 or n > MAX_HEADER or n > size - 8:
        raise ValueError(f"header length {n} impossible for a {size}-byte file")
    raw = b""
    while len(raw) < n:
        b = os.pread(fd, n - len(raw), 8 + len(raw))
        if not b:
            raise ValueError("short header read")
        raw += b
    hdr = json.loads(raw)
    if not isinstance(hdr, dict):
        raise ValueError("header is not a JSON object")
    data = 8 + n
    out = {}
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict):
            raise ValueError(f"{name}: not an object")
        dtype, shape, offs = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if (not isinstance(dtype, str) or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ValueError(f"{name}: malformed entry")
        b, e = offs
        if not 0 <= b <= e or data + e > size:
            raise ValueError(f"{name}: data_offsets {offs} outside the file")
        out[name] = (dtype, tuple(shape), data + b, data + e)
    return out


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class _Plan:
    """What one handle serves from object mappings."""

    def __init__(self, framework: str, tensors: dict, maps: dict):
        self.framework = framework  # "pt" or "np"
        self.tensors = tensors  # name -> _Tensor
        self.maps = maps  # object index -> (buffer, start offset of the mapping in the object)

    def close(self):
        # the mappings go once no tensor made from them is alive (modelfs._mapping)
        self.maps = {}


def _framework(framework):
    f = str(framework).lower()
    if f in ("pt", "torch", "pytorch"):
        return "pt"
    if f in ("np", "numpy"):
        return "np"
    return None


def _dtype_ok(framework: str, dtype: str):
    """The library dtype for a safetensors dtype, or None (then: original)."""
    spec = _DTYPES.get(dtype)
    if spec is None:
        return None
    if framework == "pt":
        import torch

        return getattr(torch, spec[1], None)
    import numpy as np

    if spec[2] is None:
        return None
    try:
        return np.dtype(spec[2])
    except TypeError:  # bfloat16 without ml_dtypes: the original fails the same way
        return None


def make_plan(filename, framework, device, backend):
    """A _Plan for this file, or None (with the reason logged in debug mode)."""
    fw = _framework(framework)
    if fw is None:
        share.debug(f"fw:{framework}", f"framework {framework!r} not handled: original loader")
        return None
    if backend != "mmap":
        share.debug(f"backend:{backend}", f"backend {backend!r}: original loader")
        return None
    if fw == "pt" and str(device) != "cpu":
        share.debug(f"device:{device}", f"device {device!r}: original loader")
        return None
    import numpy as np  # both frameworks build on np.frombuffer (see the module doc)

    path = os.fspath(filename)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not share.socket_paths(st.st_dev):
            share.debug(f"nosock:{st.st_dev}",
                        f"{path}: not on a modelfs mount serving layouts "
                        f"(no {share.socket_name(st.st_dev)}): original loader")
            return None
        header = parse_header(fd, st.st_size)
        lay = share.request_layout(fd)
    finally:
        os.close(fd)
    try:
        tensors = {}
        spans = {}  # object -> [lo, hi) of object bytes used
        for name, (dtype, shape, b, e) in header.items():
            lib_dtype = _dtype_ok(fw, dtype)
            if lib_dtype is None or e == b:
                continue
            itemsize = _DTYPES[dtype][0]
            if _numel(shape) * itemsize != e - b:
                continue
            run = lay.run_containing(b, e)
            if run is None:
                continue
            oo = run.object_offset + (b - run.file_offset)
            if oo % itemsize:
                continue  # a view of it would be misaligned for its dtype
            tensors[name] = _Tensor(lib_dtype, shape, e - b, b, run.object, oo)
            lo, hi = spans.get(run.object, (oo, oo + e - b))
            spans[run.object] = (min(lo, oo), max(hi, oo + e - b))
        maps = {}
        for obj, (lo, hi) in spans.items():
            start = lo - lo % PAGE
            maps[obj] = (map_private(lay.fds[obj], start, hi - start), start)
    finally:
        lay.close()  # the mappings keep the objects' open file descriptions (and lock)
    share.debug(f"plan:{path}", f"{path}: {len(tensors)}/{len(header)} tensors from "
                f"{len(maps)} object(s)")
    return _Plan(fw, tensors, maps)


def _build(plan: _Plan, t: _Tensor):
    import numpy as np

    entry = plan.maps.get(t.obj)
    if entry is None:
        return None  # the handle was closed
    mm, start = entry
    if plan.framework == "np":
        return np.frombuffer(mm, dtype=t.dtype, count=t.nbytes // t.dtype.itemsize,
                             offset=t.object_offset - start).reshape(t.shape)
    import torch

    arr = np.frombuffer(mm, dtype=np.uint8, count=t.nbytes, offset=t.object_offset - start)
    return torch.from_numpy(arr).view(t.dtype).reshape(t.shape)


def _fallback_bytes(x) -> int:
    try:
        if hasattr(x, "element_size"):
            return x.numel() * x.element_size()
        return int(x.nbytes)
    except Exception:  # noqa: BLE001
        return 0


class _SharedSlice:
    """get_slice() result: indexing serves from the object mapping (the
    original indexes its own mapped tensor the same way); the rest is the
    original slice's."""

    def __init__(self, owner, name, inner):
        self._owner = owner
        self._name = name
        self._inner = inner

    def get_shape(self):
        return self._inner.get_shape()

    def get_dtype(self):
        return self._inner.get_dtype()

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def __getitem__(self, idx):
        full = self._owner._shared(self._name, count=False)
        if full is None:
            r = self._inner[idx]
            share._count(fallback_tensors=1, fallback_bytes=_fallback_bytes(r))
            return r
        r = full[idx]
        share._count(shared_tensors=1, shared_bytes=_fallback_bytes(r))
        return r


class safe_open:  # noqa: N801 - the name the libraries import
    """safetensors.safe_open, serving tensors from a modelfs mount's objects
    (see modelfs._safetensors). Same arguments and methods as the original."""

    def __init__(self, filename, framework, device="cpu", *args, **kwargs):
        self._inner = _orig_safe_open(filename, framework, device, *args, **kwargs)
        self._plan = None
        backend = kwargs.get("backend", args[0] if args else "mmap")
        try:
            self._plan = make_plan(filename, framework, device, backend)
        except Exception as e:  # noqa: BLE001 - any failure: the original loader
            share.debug(f"err:{type(e).__name__}:{e}",
                        f"{os.fspath(filename)}: {type(e).__name__}: {e}: original loader")
        share._count(**{"files_shared" if self._plan is not None else "files_fallback": 1})

    # -- context manager: the original's, then drop the mappings ------------------------------
    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._inner.__exit__(*exc)
        finally:
            self._release()

    def _release(self):
        plan, self._plan = self._plan, None
        if plan is not None:
            plan.close()

    def __del__(self):
        try:
            self._release()
        except Exception:  # noqa: BLE001
            pass

    def __getattr__(self, attr):  # keys, metadata, offset_keys, anything newer
        if attr in ("_inner", "_plan"):
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    # -- tensors ------------------------------------------------------------------------------
    def _shared(self, name, count=True):
        plan = self._plan
        if plan is None:
            return None
        t = plan.tensors.get(name)
        if t is None:
            return None
        try:
            x = _build(plan, t)
        except Exception as e:  # noqa: BLE001
            share.debug(f"build:{type(e).__name__}", f"tensor {name!r}: {e}: original loader")
            return None
        if x is not None and count:
            share._count(shared_tensors=1, shared_bytes=t.nbytes)
        return x

    def get_tensor(self, name):
        x = self._shared(name)
        if x is None:
            x = self._inner.get_tensor(name)
            share._count(fallback_tensors=1, fallback_bytes=_fallback_bytes(x))
        return x

    def get_tensors(self):
        return {k: self.get_tensor(k) for k in self._inner.offset_keys()}

    def get_slice(self, name):
        inner = self._inner.get_slice(name)
        plan = self._plan
        if plan is None or name not in plan.tensors:
            return inner
        return _SharedSlice(self, name, inner)

    def keys(self):
        return self._inner.keys()

    def metadata(self):
        return self._inner.metadata()

    def offset_keys(self):
        return self._inner.offset_keys()


def patch_module(mod) -> bool:
    """Point ``mod.safe_open`` at the sharing safe_open if it is the original.
    For ``safetensors`` itself this also records the original."""
    global _orig_safe_open
    cur = getattr(mod, "safe_open", None)
    if cur is None or cur is safe_open:
        return False
    if _orig_safe_open is None:
        if mod.__name__ != "safetensors":
            import safetensors  # noqa: F401 - patches the package first, via the hook

            if _orig_safe_open is None:
                return False
        else:
            _orig_safe_open = cur
    if cur is not _orig_safe_open:
        return False  # somebody else's replacement: leave it
    mod.safe_open = safe_open
    return True
