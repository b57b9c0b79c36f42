"""Helpers for the tests that mount a modelfs store for real (test_mount.py, test_loaders.py).

`Mount` starts `modelfs mount` (with `--daemon`, or in the foreground under Popen), checks
that the mountpoint really is a FUSE mount, and always cleans up: `modelfs umount`, then
`fusermount3 -u -z`, then `umount -l`, then SIGKILL of the daemon processes it started.
Every mount made through this module is registered, so `cleanup_all()` (called by an
autouse fixture of each mount test module) removes whatever a failing test left behind.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mountlib is also imported by reader subprocesses, which need no pytest
    from conftest import Modelfs

STARTUP_TIMEOUT = 30.0  # a `--daemon` start or a foreground start must be mounted by then
UMOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0  # a daemon must exit this long after umount / SIGTERM
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

_live: list["Mount"] = []


# ------------------------------------------------------------------------------------------
# /proc helpers


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def proc_mounts():
    """[(source, mountpoint, fstype, options)] from /proc/self/mounts."""
    rows = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                rows.append((_unescape(parts[0]), _unescape(parts[1]), parts[2], parts[3]))
    return rows


def mount_entries(mountpoint) -> list:
    mp = os.path.realpath(mountpoint)
    return [r for r in proc_mounts() if r[1] == mp]


def is_mounted(mountpoint) -> bool:
    return bool(mount_entries(mountpoint))


def wait_until(pred, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def modelfs_pids(binary, mountpoint) -> list[int]:
    """Live (non-zombie) processes running `binary` with `mountpoint` on their command line
    (the mount daemon; with --daemon it is not our child, so it is found through /proc)."""
    try:
        bst = os.stat(binary)
    except OSError:
        return []
    mp = os.path.realpath(mountpoint)
    mp_raw = str(mountpoint)
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            est = os.stat(f"/proc/{pid}/exe")
            if (est.st_dev, est.st_ino) != (bst.st_dev, bst.st_ino):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X"):
            continue
        if "mount" in argv and (mp in argv or mp_raw in argv):
            pids.append(pid)
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def stat_ok(path) -> str | None:
    """None if stat(path) works, else a description (e.g. a stale FUSE mount gives ENOTCONN)."""
    try:
        os.stat(path)
        os.listdir(path)
        return None
    except OSError as e:
        return f"{type(e).__name__}: [errno {e.errno} {errno.errorcode.get(e.errno, '?')}] {e.strerror}"


def force_unmount(mountpoint) -> None:
    for argv in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if not is_mounted(mountpoint):
            return
        try:
            subprocess.run(argv, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass


# ------------------------------------------------------------------------------------------
# the statistics file


STATS_KEYS = ("mode", "read_requests", "read_bytes", "eio", "passthrough_opens", "copy_opens")


def read_stats_file(path) -> dict:
    """Read MOUNTPOINT/.modelfs/stats.json the same way every time (one open, reads until EOF)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{path} is not valid JSON ({e}): {raw[:500]!r}") from None


# ------------------------------------------------------------------------------------------
# the mount


class Mount:
    """One `modelfs mount` of `mfs.store` on `mountpoint` (a directory that must exist)."""

    def __init__(self, mfs: Modelfs, mountpoint, *args, prefix=None, env=None):
        self.mfs = mfs
        self.mountpoint = Path(mountpoint)
        self.args = [str(a) for a in args]
        self.prefix = list(mfs.prefix if prefix is None else prefix)
        self.env = env
        self.proc: subprocess.Popen | None = None  # foreground mode
        self.log = Path(tempfile.mkstemp(prefix="modelfs-mount-", suffix=".log")[1])
        self.daemon_pids: list[int] = []
        _live.append(self)

    # -- paths -------------------------------------------------------------------------------
    def __truediv__(self, rel) -> Path:
        return self.mountpoint / rel

    @property
    def stats_path(self) -> Path:
        return self.mountpoint / ".modelfs" / "stats.json"

    def stats(self) -> dict:
        return read_stats_file(self.stats_path)

    # -- commands ----------------------------------------------------------------------------
    def argv(self, *extra):
        return [*self.prefix, str(self.mfs.bin), "--store", str(self.mfs.store), "mount",
                str(self.mountpoint), *self.args, *map(str, extra)]

    def _env(self):
        e = dict(os.environ)
        e.pop("MODELFS_STORE", None)
        e.setdefault("NO_COLOR", "1")
        if self.env:
            e.update(self.env)
        return e

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def describe(self, what="") -> str:
        return (f"{what}\ncommand: {' '.join(self.argv())}\n--- daemon output (stdout+stderr) ---\n"
                f"{self.log_text()}\n--- /proc/mounts entry: {mount_entries(self.mountpoint)}")

    def start_daemon(self, *extra, check=True, timeout=STARTUP_TIMEOUT) -> int:
        """`modelfs mount MP --daemon`: must exit 0 once the mount serves requests. Output goes
        to a log file, not a pipe (a daemon that keeps the inherited stderr would otherwise
        make us wait for it forever). Returns the exit status."""
        with open(self.log, "ab") as log:
            p = subprocess.Popen(self.argv("--daemon", *extra), stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, env=self._env(), start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError(self.describe(
                    f"`modelfs mount --daemon` did not return within {timeout}s"))
        self.daemon_pids = modelfs_pids(self.mfs.bin, self.mountpoint)
        if check:
            assert rc == 0, self.describe(f"`modelfs mount --daemon` exited {rc}")
            # ready means ready: no polling here
            assert is_mounted(self.mountpoint), self.describe(
                "`modelfs mount --daemon` exited 0 but the mountpoint is not in /proc/mounts")
            fstype = mount_entries(self.mountpoint)[-1][2]
            assert fstype.startswith("fuse"), f"mounted with fstype {fstype!r}, expected fuse*"
            if not self.prefix:  # root cannot look into another user's mount (no allow_other)
                err = stat_ok(self.mountpoint)
                assert err is None, self.describe(f"mountpoint not usable right after --daemon: {err}")
        return rc

    def start_foreground(self, *extra, timeout=STARTUP_TIMEOUT) -> subprocess.Popen:
        """`modelfs mount MP` (no --daemon) under Popen; returns once it is mounted."""
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(*extra), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, env=self._env())
        log.close()
        ok = wait_until(lambda: is_mounted(self.mountpoint) or self.proc.poll() is not None, timeout)
        if self.proc.poll() is not None or not ok:
            raise AssertionError(self.describe(
                f"foreground `modelfs mount` did not mount within {timeout}s "
                f"(exit status {self.proc.poll()})"))
        # mounted in /proc/mounts; wait until it answers (the INIT handshake may still run)
        assert wait_until(lambda: stat_ok(self.mountpoint) is None, timeout), self.describe(
            f"mountpoint not usable: {stat_ok(self.mountpoint)}")
        self.daemon_pids = [self.proc.pid]
        return self.proc

    def umount(self, check=True):
        """`modelfs umount MP` (as the same user as the mount). Returns the CompletedProcess."""
        argv = [*self.prefix, str(self.mfs.bin), "umount", str(self.mountpoint)]
        pids = self.daemon_pids or modelfs_pids(self.mfs.bin, self.mountpoint)
        try:
            cp = subprocess.run(argv, capture_output=True, timeout=UMOUNT_TIMEOUT, env=self._env(),
                                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`{' '.join(argv)}` did not finish within {UMOUNT_TIMEOUT}s")
        if check:
            desc = (f"`{' '.join(argv)}` exited {cp.returncode}\nstdout: {cp.stdout[-2000:]!r}\n"
                    f"stderr: {cp.stderr[-2000:]!r}")
            assert cp.returncode == 0, desc
            assert not is_mounted(self.mountpoint), "still in /proc/mounts after " + desc
            err = stat_ok(self.mountpoint)
            assert err is None, f"mountpoint unusable after umount: {err}"
            gone = wait_until(lambda: not any(pid_alive(p) for p in pids), EXIT_TIMEOUT)
            assert gone, (f"daemon process(es) {[p for p in pids if pid_alive(p)]} still running "
                          f"{EXIT_TIMEOUT}s after `modelfs umount`\n" + self.describe())
            if self.proc is not None:
                rc = self.proc.wait(timeout=EXIT_TIMEOUT)
                assert rc == 0, self.describe(f"foreground mount exited {rc} after `modelfs umount`")
        return cp

    def cleanup(self) -> list[str]:
        """Best effort, never raises: unmount however possible, stop what we started.
        Returns the list of fallbacks that were needed (empty if `modelfs umount` sufficed)."""
        used = []
        pids = set(self.daemon_pids) | set(modelfs_pids(self.mfs.bin, self.mountpoint))
        if self.proc is not None and self.proc.poll() is None:
            pids.add(self.proc.pid)
        if is_mounted(self.mountpoint):
            try:
                self.umount(check=False)
            except AssertionError:
                used.append("modelfs umount hung")
            if is_mounted(self.mountpoint):
                used.append("fusermount3 -u -z / umount -l")
                force_unmount(self.mountpoint)
        alive = [p for p in pids if pid_alive(p)]
        if alive and not wait_until(lambda: not any(pid_alive(p) for p in alive), 5):
            used.append(f"SIGKILL of {alive}")
            for p in alive:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if is_mounted(self.mountpoint):
            force_unmount(self.mountpoint)
        if self in _live:
            _live.remove(self)
        try:
            self.log.unlink()
        except OSError:
            pass
        return used


def cleanup_all() -> None:
    for m in list(_live):
        used = m.cleanup()
        if used:
            print(f"[mountlib] cleanup of {m.mountpoint} needed: {used}", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# reading helpers


def first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 1 << 16
    for i in range(0, n, step):
        if a[i:i + step] != b[i:i + step]:
            for j in range(i, min(n, i + step)):
                if a[j] != b[j]:
                    return j
    return n


def evict_page_cache(root: Path) -> None:
    """Drop the page-cache pages of every file under root (clean pages go at once;
    sync first for files just written)."""
    for p in Path(root).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_via_mmap(path) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return bytes(mm)


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread until `length` bytes or EOF (a short read is not an error, as in f.read(n))."""
    out = []
    got = 0
    while got < length:
        b = os.pread(fd, length - got, offset + got)
        if not b:
            break
        out.append(b)
        got += len(b)
    return b"".join(out)


class Mismatch(AssertionError):
    pass


def random_reads(pairs, seed: int, n: int, use_mmap: bool = False, stop=None, progress=None) -> int:
    """Read `n` random ranges (1 B .. 3 MiB, some crossing EOF) of the mount files in
    `pairs` [(mount path, original path)], compare each with the original, raise Mismatch
    on any difference. With `stop` (a threading.Event) run until it is set instead.
    `progress(i)` is called after each successful comparison. Returns the number of reads."""
    rng = random.Random(seed)
    files = []
    try:
        for mnt, orig in pairs:
            of = open(orig, "rb")
            size = os.fstat(of.fileno()).st_size
            om = mmap.mmap(of.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            mf = open(mnt, "rb")
            msize = os.fstat(mf.fileno()).st_size
            if msize != size:
                raise Mismatch(f"{mnt}: st_size {msize} != original size {size}")
            mm = mmap.mmap(mf.fileno(), 0, access=mmap.ACCESS_READ) if (use_mmap and size) else None
            files.append((str(mnt), of, om, mf, mm, size))
        i = 0
        while (stop is None and i < n) or (stop is not None and not stop.is_set()):
            mnt, _of, om, mf, mm, size = files[rng.randrange(len(files))]
            r = rng.random()
            if r < 0.6:
                length = rng.randint(1, 64 << 10)
            elif r < 0.92:
                length = rng.randint(64 << 10, 1 << 20)
            else:
                length = rng.randint(1 << 20, 3 << 20)
            if rng.random() < 0.1:
                off = max(0, size - rng.randint(0, 2 * length))  # around EOF
            else:
                off = rng.randrange(0, size + 1)
            want = om[off:off + length]
            got = mm[off:off + length] if mm is not None else pread_full(mf.fileno(), length, off)
            if got != want:
                raise Mismatch(f"{mnt} [{off}, +{length}) via {'mmap' if mm is not None else 'pread'}: "
                               f"got {len(got)} bytes, want {len(want)}; first difference at "
                               f"+{first_diff(got, want)}")
            i += 1
            if progress is not None:
                progress(i)
        return i
    finally:
        for _mnt, of, om, mf, mm, _size in files:
            for x in (mm, om if not isinstance(om, bytes) else None, mf, of):
                try:
                    if x is not None:
                        x.close()
                except (OSError, BufferError, ValueError):
                    pass


def _reader_main(argv):
    """python -m mountlib-style entry for reader subprocesses:
    argv = [json: {"pairs": [[mnt, orig], ...], "seed": s, "n": n, "mmap": bool}]
    (optional "seconds": t reads until t seconds have passed, ignoring n)"""
    spec = json.loads(argv[0])
    stop = None
    if spec.get("seconds"):  # optional: read for this long instead of `n` reads
        import threading

        stop = threading.Event()
        threading.Timer(float(spec["seconds"]), stop.set).start()
    try:
        n = random_reads([tuple(p) for p in spec["pairs"]], spec["seed"], spec["n"], spec["mmap"],
                         stop=stop)
    except Mismatch as e:
        print(f"MISMATCH {e}", flush=True)
        return 1
    print(f"ok {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_reader_main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------
# shared by the mount, service and reliability tests


class LoadReaders:
    """Threads that keep files of the mount open and read random ranges until stopped.
    Mismatched bytes are always an error; OSErrors are recorded with their time."""

    def __init__(self, pairs, n_threads=4, seed=100):
        self.pairs = pairs
        self.seed = seed
        self.stop = threading.Event()
        self.counts = [0] * n_threads
        self.progress_at = [0.0] * n_threads
        self.mismatches = []
        self.errors = []  # (monotonic time, message)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n_threads)]

    def _run(self, i):
        def progress(n):
            self.counts[i] = n
            self.progress_at[i] = time.monotonic()

        try:
            random_reads(self.pairs, seed=self.seed + i, n=0, use_mmap=False, stop=self.stop,
                         progress=progress)
        except Mismatch as e:
            self.mismatches.append(f"thread {i}: {e}")
        except OSError as e:
            self.errors.append((time.monotonic(), f"thread {i}: {e!r}"))
        except BaseException as e:  # noqa: BLE001
            self.mismatches.append(f"thread {i}: unexpected {type(e).__name__}: {e}")

    def start(self):
        for t in self.threads:
            t.start()
        assert wait_until(lambda: all(c >= 5 for c in self.counts) or self.errors or self.mismatches, 60), \
            f"readers made no progress: {self.counts}"
        assert not self.mismatches and not self.errors, (self.mismatches, self.errors)

    def finish(self, timeout=30):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=timeout)
        return [t.name for t in self.threads if t.is_alive()]


def fresh_workdir(workdir: Path) -> None:
    """Empty `workdir` for a benchmark run (with a `mnt/` in it), unmounting
    anything left mounted below it first: never delete through a mount."""
    workdir = Path(workdir)
    if workdir.exists():
        for m in proc_mounts():
            if m[1] == str(workdir) or m[1].startswith(str(workdir) + "/"):
                force_unmount(m[1])
        shutil.rmtree(workdir)
    (workdir / "mnt").mkdir(parents=True)


def run_bench(bench, args, report) -> int:
    """Run a benchmark object (`run()`, `cleanup()`) in `args.workdir`, print
    `report(result)` (and the JSON with `args.json`), and remove the work
    directory unless `args.keep` or something is still mounted below it."""
    args.workdir = Path(args.workdir).resolve()
    fresh_workdir(args.workdir)
    b = bench(args)
    try:
        res = b.run()
    finally:
        b.cleanup()
        if not args.keep and not any(m[1].startswith(str(args.workdir)) for m in proc_mounts()):
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(report(res))
    if args.json:
        import json  # noqa: PLC0415

        print(json.dumps(res, indent=2, default=str))
    return 0


def _mount_factory(tmp_path):
    """mount_factory(mfs, *args, start=True, mountpoint=None, prefix=None) -> Mount (cleaned up
    after the test). A test module uses it with `from mountlib import mount_factory`."""
    made = []
    n = [0]

    def make(mfs, *args, start=True, mountpoint=None, prefix=None):
        if mountpoint is None:
            n[0] += 1
            mountpoint = tmp_path / f"mnt{n[0]}"
            mountpoint.mkdir()
        m = Mount(mfs, mountpoint, *args, prefix=prefix)
        made.append(m)
        if start:
            m.start_daemon()
        return m

    yield make
    for m in made:
        m.cleanup()


try:
    import pytest as _pytest

    mount_factory = _pytest.fixture(_mount_factory)
except ImportError:  # used outside pytest (reader subprocesses)
    pass
