"""Private mappings of object files that hold no descriptor.

Python's ``mmap.mmap`` keeps a dup of the descriptor for as long as the
mapping lives (before 3.13's ``trackfd=False``), which would cost a
descriptor per mapped object for the life of every tensor. Here the mapping
is made with libc's ``mmap`` and exposed as a ctypes array (a writable
buffer); a finalizer unmaps it once the array is no longer referenced, i.e.
once no numpy array, torch storage or view made from it is alive (numpy's
``frombuffer`` keeps its buffer's exporter referenced). The descriptor can be
closed at once: the mapping keeps the open file description, and so the
store's shared lock (§6, §11), alive.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

PAGE = mmap.ALLOCATIONGRANULARITY

_libc = None


def _lib():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int64]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def _unmap(addr: int, length: int) -> None:
    _lib().munmap(addr, length)


def map_private(fd: int, offset: int, length: int):
    """A writable buffer over ``length`` bytes of ``fd`` from ``offset`` (page
    aligned), mapped MAP_PRIVATE: writes stay in this process."""
    if offset % PAGE or length <= 0:
        raise ValueError("offset not page aligned or empty mapping")
    libc = _lib()
    addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, offset)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap: {os.strerror(e)}")
    buf = (ctypes.c_ubyte * length).from_address(addr)
    f = weakref.finalize(buf, _unmap, addr, length)
    f.atexit = False  # at exit the kernel unmaps; never under a tensor still in use
    return buf
