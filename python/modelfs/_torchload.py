"""``torch.load(path, mmap=True)`` of a torch zip checkpoint on a modelfs mount.

torch maps the whole file once (``UntypedStorage.from_file``) and cuts each
``data/N`` record's storage out of that mapping (``overall_storage[a:b]``;
records are stored uncompressed). The hook wraps ``torch.load``: for a path
on a mount that serves its layout, the ``from_file`` call made inside that
``torch.load`` returns a stand-in whose slices are storages on private
mappings of the store's objects, for records lying wholly in one run (and
8-byte aligned there, as safetensors' own header padding gives; torch's
64-byte record alignment is not needed on the CPU); any other slice comes from
the original mapping of the file, created only if needed. The stand-in is
handed out only to the ``torch.load`` that asked for it (a thread-local),
every other ``from_file`` call is the original's.
"""

from __future__ import annotations

import functools
import os
import threading

from . import share
from ._mapping import PAGE, map_private

ALIGN = 8
_tls = threading.local()
_orig_from_file = None


class _Source:
    """One torch.load's file: its layout and lazily made object mappings."""

    def __init__(self, path: str, size: int, lay):
        self.path = path
        self.size = size
        self.lay = lay
        self.spans = {}
        for r in lay.runs:
            lo, hi = self.spans.get(r.object, (r.object_offset, r.object_offset + r.len))
            self.spans[r.object] = (min(lo, r.object_offset), max(hi, r.object_offset + r.len))
        self.maps = {}
        self.lock = threading.Lock()

    def mapping(self, obj):
        with self.lock:
            m = self.maps.get(obj)
            if m is None:
                lo, hi = self.spans[obj]
                start = lo - lo % PAGE
                m = self.maps[obj] = (map_private(self.lay.fds[obj], start, hi - start), start)
            return m

    def close(self):
        self.lay.close()
        self.maps = {}  # each mapping goes with the last storage made from it


class _Overall:
    """Stands for torch's whole-file storage: only slicing is used."""

    def __init__(self, src: _Source, make_orig):
        self._src = src
        self._make_orig = make_orig
        self._orig = None

    def _original(self):
        if self._orig is None:
            self._orig = self._make_orig()
        return self._orig

    def __getitem__(self, sl):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            return self._original()[sl]
        a, b = sl.start or 0, sl.stop if sl.stop is not None else self._src.size
        st = None
        if 0 <= a < b <= self._src.size:
            r = self._src.lay.run_containing(a, b)
            if r is not None:
                oo = r.object_offset + (a - r.file_offset)
                if oo % ALIGN == 0:
                    try:
                        st = self._shared(r.object, oo, b - a)
                    except Exception as e:  # noqa: BLE001
                        share.debug(f"torch-build:{type(e).__name__}", f"torch.load record: {e}")
        if st is None:
            st = self._original()[sl]
            share._count(fallback_tensors=1, fallback_bytes=max(0, b - a))
        else:
            share._count(shared_tensors=1, shared_bytes=b - a)
        return st

    def _shared(self, obj, oo, n):
        import numpy as np
        import torch

        mm, start = self._src.mapping(obj)
        arr = np.frombuffer(mm, dtype=np.uint8, count=n, offset=oo - start)
        return torch.from_numpy(arr).untyped_storage()


def _source_for(f):
    if not isinstance(f, (str, os.PathLike)):
        return None
    path = os.fspath(f)
    if isinstance(path, bytes):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not share.socket_paths(st.st_dev):
            share.debug(f"nosock:{st.st_dev}", f"{path}: not on a modelfs mount serving layouts: "
                        "original loader")
            return None
        lay = share.request_layout(fd)
    finally:
        os.close(fd)
    return _Source(path, st.st_size, lay)


def patch_torch(torch) -> bool:
    """Wrap torch.load / torch.serialization.load and UntypedStorage.from_file."""
    global _orig_from_file
    ser = torch.serialization
    orig_load = ser.load
    if getattr(orig_load, "_modelfs_share", False):
        return False
    _orig_from_file = torch.UntypedStorage.from_file

    def from_file(cls, *args, **kwargs):
        src = getattr(_tls, "src", None)
        # exactly torch.load's call: from_file(os.fspath(f), shared, size)
        if (src is not None and not kwargs and len(args) == 3 and args[0] == src.path
                and args[1] is False and args[2] == src.size):
            _tls.src = None  # for this one call only
            return _Overall(src, lambda: _orig_from_file(*args))
        return _orig_from_file(*args, **kwargs)

    @functools.wraps(orig_load)
    def load(f, *args, **kwargs):
        if not kwargs.get("mmap"):
            return orig_load(f, *args, **kwargs)
        try:
            src = _source_for(f)
        except Exception as e:  # noqa: BLE001 - any failure: the original loader
            share.debug(f"torch-err:{type(e).__name__}:{e}", f"torch.load({f!r}): {e}: original loader")
            src = None
        share._count(**{"files_shared" if src is not None else "files_fallback": 1})
        if src is None:
            return orig_load(f, *args, **kwargs)
        prev = getattr(_tls, "src", None)
        _tls.src = src
        try:
            return orig_load(f, *args, **kwargs)
        finally:
            _tls.src = prev
            src.close()

    load._modelfs_share = True
    torch.UntypedStorage.from_file = classmethod(from_file)
    ser.load = load
    if getattr(torch, "load", None) is orig_load:
        torch.load = load
    return True
