"""The client side of the layout protocol (docs/store-format.md §11).

A modelfs mount tells a process where the bytes of a file it has open lie in
the store's object files, and hands it the objects' descriptors. Mapping the
objects instead of the file makes every process (and every model) that uses a
chunk map the same page-cache pages.

Public API:

* ``layout(path)``: the runs of a file on a mount (descriptors closed), or
  raises ``LayoutError``.
* ``stats()``: bytes and tensors the loader hook served from object mappings
  ("shared") and from the original loader ("fallback").

Everything the daemon sends is treated as hostile: counts are bounded, every
run is checked to lie inside the file, inside ``[from, end)`` and inside its
object, and every received descriptor must be a regular file at least as long
as the object it stands for (so a mapping can never fault past an object's
end, which would be SIGBUS).
"""

from __future__ import annotations

import array
import errno as _errno
import os
import socket
import stat as _stat
import struct
import sys
import threading
from typing import NamedTuple

MAGIC = b"MFSLAY01"
MAX_OBJECTS = 250
MAX_RUNS = 4096
REQUEST_LEN = 16
REPLY_HEADER_LEN = 40
RUN_LEN = 32
MAX_REPLY_LEN = REPLY_HEADER_LEN + MAX_OBJECTS * 8 + MAX_RUNS * RUN_LEN
FLAG_PASSTHROUGH = 1
PAGE = 4096

_HEADER = struct.Struct("<8siIQQII")
_RUN = struct.Struct("<QQI4xQ")
assert _HEADER.size == REPLY_HEADER_LEN and _RUN.size == RUN_LEN

# Seconds to wait for one reply. The daemon checks every chunk's hash before
# its first reply about a file, which for a very large file takes a while.
DEFAULT_TIMEOUT = 300.0


class LayoutError(Exception):
    """No layout: not on a modelfs mount that serves layouts, refused, or the
    daemon broke the protocol. ``errno`` is set for a refusal."""

    def __init__(self, msg: str, errno: int | None = None):
        super().__init__(msg)
        self.errno = errno


class NoSocket(LayoutError):
    """No layout socket for the file's device: not on a (layout-serving) modelfs mount."""


class Run(NamedTuple):
    file_offset: int
    len: int
    object: int  # index into Layout.objects
    object_offset: int


class Reply(NamedTuple):
    status: int
    flags: int
    file_size: int
    end: int
    object_lens: list
    runs: list


class ObjectInfo(NamedTuple):
    length: int  # bytes, as the daemon declared it
    dev: int  # st_dev / st_ino of the received descriptor (identifies the object file)
    ino: int
    path: str  # where /proc/self/fd says the descriptor points (informative)


class Layout:
    """The layout of one open file. ``fds`` (one per object) are open until
    ``close()``; ``layout()`` returns a closed one."""

    def __init__(self, file_size: int, passthrough: bool, objects: list, runs: list, fds: list):
        self.file_size = file_size
        self.passthrough = passthrough
        self.objects = objects  # [ObjectInfo]
        self.runs = runs  # [Run], sorted by file_offset, object indexing self.objects
        self.fds = fds

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def covered_bytes(self) -> int:
        return sum(r.len for r in self.runs)

    def run_containing(self, begin: int, end: int):
        """The run holding file bytes [begin, end) entirely, or None."""
        import bisect

        i = bisect.bisect_right(self._starts(), begin) - 1
        if i < 0:
            return None
        r = self.runs[i]
        if r.file_offset <= begin and end <= r.file_offset + r.len:
            return r
        return None

    def _starts(self):
        s = getattr(self, "_starts_cache", None)
        if s is None or len(s) != len(self.runs):
            s = [r.file_offset for r in self.runs]
            self._starts_cache = s
        return s

    def __repr__(self):
        return (f"Layout(file_size={self.file_size}, passthrough={self.passthrough}, "
                f"objects={len(self.objects)}, runs={len(self.runs)}, covered={self.covered_bytes()})")


# ----------------------------------------------------------------------------------------
# wire format


def encode_request(from_: int) -> bytes:
    if not 0 <= from_ < 1 << 64:
        raise ValueError("from out of range")
    return MAGIC + struct.pack("<Q", from_)


def encode_reply(status=0, flags=0, file_size=0, end=0, object_lens=(), runs=()) -> bytes:
    """A reply's bytes (the tests' fake daemon uses it; no validation)."""
    out = [_HEADER.pack(MAGIC, status, flags, file_size, end, len(object_lens), len(runs))]
    out += [struct.pack("<Q", n) for n in object_lens]
    out += [_RUN.pack(r[0], r[1], r[2], r[3]) for r in runs]
    return b"".join(out)


def decode_reply(b: bytes, from_: int) -> Reply:
    """Parse a reply to a request from ``from_``; raises LayoutError on anything
    malformed (as share/src/wire.rs ``Reply::decode``)."""
    if len(b) < REPLY_HEADER_LEN:
        raise LayoutError("malformed reply: shorter than its header")
    magic, status, flags, file_size, end, n_objects, n_runs = _HEADER.unpack_from(b, 0)
    if magic != MAGIC:
        raise LayoutError("malformed reply: bad magic")
    if n_objects > MAX_OBJECTS or n_runs > MAX_RUNS:
        raise LayoutError("malformed reply: too many objects or runs")
    if len(b) != REPLY_HEADER_LEN + n_objects * 8 + n_runs * RUN_LEN:
        raise LayoutError("malformed reply: length does not match the counts")
    if status != 0:
        return Reply(status, 0, 0, 0, [], [])
    if end > file_size or (end < from_ and end != file_size):
        raise LayoutError("malformed reply: end outside the file")
    object_lens = list(struct.unpack_from(f"<{n_objects}Q", b, REPLY_HEADER_LEN))
    at = REPLY_HEADER_LEN + n_objects * 8
    runs = []
    pos = from_
    for i in range(n_runs):
        fo, ln, obj, oo = _RUN.unpack_from(b, at + i * RUN_LEN)
        if ln == 0 or fo < pos or fo + ln > end:
            raise LayoutError("malformed reply: runs unsorted, overlapping or outside [from, end)")
        if obj >= n_objects:
            raise LayoutError("malformed reply: run names a missing object")
        if oo + ln > object_lens[obj]:
            raise LayoutError("malformed reply: run lies past its object's end")
        pos = fo + ln
        runs.append(Run(fo, ln, obj, oo))
    return Reply(status, flags, file_size, end, object_lens, runs)


# ----------------------------------------------------------------------------------------
# transport


def socket_name(dev: int) -> str:
    return f"share-{os.major(dev)}-{os.minor(dev)}.sock"


def runtime_dirs() -> list:
    """Runtime directories in the order §11 says clients try them."""
    dirs = []
    d = os.environ.get("MODELFS_RUNTIME_DIR")
    if d:
        dirs.append(d)
    dirs.append("/run/modelfs")
    d = os.environ.get("XDG_RUNTIME_DIR")
    if d:
        dirs.append(os.path.join(d, "modelfs"))
    dirs.append(f"/tmp/modelfs-{os.getuid()}")
    return dirs


def socket_paths(dev: int) -> list:
    """Existing socket files for device ``dev``, in the order to try them."""
    name = socket_name(dev)
    out = []
    for d in runtime_dirs():
        p = os.path.join(d, name)
        try:
            if _stat.S_ISSOCK(os.stat(p).st_mode):
                out.append(p)
        except OSError:
            pass
    return out


def _connect(dev: int, timeout: float) -> socket.socket:
    paths = socket_paths(dev)
    if not paths:
        raise NoSocket(f"no {socket_name(dev)} in {runtime_dirs()}")
    last = None
    for p in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(p)
            return s
        except OSError as e:  # a socket left by a mount that is gone refuses connections
            last = e
            s.close()
    raise NoSocket(f"cannot connect to {paths}: {last}")


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_reply(s: socket.socket):
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    data, anc, mflags, _addr = s.recvmsg(MAX_REPLY_LEN + 1, socket.CMSG_SPACE(MAX_OBJECTS * 4), flags)
    fds = []
    for level, typ, payload in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    if mflags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        raise LayoutError("reply or its descriptors truncated")
    if not data and not fds:
        raise LayoutError("the mount closed the connection")
    return data, fds


def _object_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def request_layout(fd: int, timeout: float | None = None) -> Layout:
    """The whole layout of the open file ``fd`` (a file on a modelfs mount).
    The returned Layout owns one descriptor per object: close() it."""
    if timeout is None:
        try:
            timeout = float(os.environ.get("MODELFS_SHARE_TIMEOUT", DEFAULT_TIMEOUT))
        except ValueError:
            timeout = DEFAULT_TIMEOUT
    st = os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode):
        raise LayoutError("not a regular file")
    s = _connect(st.st_dev, timeout)
    objects, runs, fds = [], [], []
    ok = False
    try:
        from_ = 0
        file_size = None
        passthrough = False
        while True:
            s.sendmsg([encode_request(from_)],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            data, got = _recv_reply(s)
            try:
                reply = decode_reply(data, from_)
                if reply.status != 0:
                    raise LayoutError(f"the mount refused the layout: "
                                      f"{_errno.errorcode.get(reply.status, reply.status)} "
                                      f"({os.strerror(reply.status)})", reply.status)
                if len(got) != len(reply.object_lens):
                    raise LayoutError(f"{len(got)} descriptors for {len(reply.object_lens)} objects")
                if file_size is None:
                    file_size = reply.file_size
                    if file_size != st.st_size:
                        raise LayoutError(f"file_size {file_size} != st_size {st.st_size}")
                elif reply.file_size != file_size:
                    raise LayoutError("file_size changed between replies")
                for ofd, olen in zip(got, reply.object_lens):
                    ost = os.fstat(ofd)
                    if not _stat.S_ISREG(ost.st_mode):
                        raise LayoutError("an object descriptor is not a regular file")
                    if ost.st_size < olen:
                        raise LayoutError(f"object declared {olen} bytes, has {ost.st_size}")
            except BaseException:
                _close_all(got)
                raise
            base = len(objects)
            for ofd, olen in zip(got, reply.object_lens):
                ost = os.fstat(ofd)
                objects.append(ObjectInfo(olen, ost.st_dev, ost.st_ino, _object_path(ofd)))
                fds.append(ofd)
            runs.extend(Run(r.file_offset, r.len, r.object + base, r.object_offset)
                        for r in reply.runs)
            passthrough = bool(reply.flags & FLAG_PASSTHROUGH)
            if reply.end >= reply.file_size:
                break
            if reply.end <= from_:
                raise LayoutError("the mount's layout made no progress")
            from_ = reply.end
        ok = True
        return Layout(file_size, passthrough, objects, runs, fds)
    except OSError as e:
        raise LayoutError(f"layout request failed: {e}") from e
    finally:
        s.close()
        if not ok:
            _close_all(fds)


def layout(path) -> Layout:
    """The layout of the file at ``path`` (descriptors already closed: the
    result is information only). Raises LayoutError (NoSocket if the file is
    not on a modelfs mount serving layouts)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        lay = request_layout(fd)
    finally:
        os.close(fd)
    lay.close()
    return lay


# ----------------------------------------------------------------------------------------
# statistics and debug logging

_lock = threading.Lock()
_stats = {
    "shared_bytes": 0,  # tensor bytes served from object mappings
    "shared_tensors": 0,
    "fallback_bytes": 0,  # tensor bytes served by the original loader
    "fallback_tensors": 0,
    "files_shared": 0,  # files opened whose layout was had
    "files_fallback": 0,  # files opened without a layout (not on modelfs, refused, ...)
}
_logged = set()


def _count(**kw):
    with _lock:
        for k, v in kw.items():
            _stats[k] += v


def stats() -> dict:
    """Counters of this process since the hook was installed (or reset_stats())."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        for k in _stats:
            _stats[k] = 0


def debug(key: str, msg: str) -> None:
    """Log ``msg`` once per ``key`` to stderr, only with MODELFS_SHARE_DEBUG=1."""
    if os.environ.get("MODELFS_SHARE_DEBUG") != "1":
        return
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    try:
        print(f"modelfs.share: {msg}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - logging must never break a load
        pass
