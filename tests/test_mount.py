"""The FUSE mount (`modelfs mount`), tested through the kernel with real mounts.

Every mount is made by tests/mountlib.py's `Mount`, which always unmounts in teardown
(`modelfs umount`, then `fusermount3 -u -z`, then `umount -l`), so a failing test never
leaves a mount behind. The core tests run in both modes: `--passthrough auto` (kernel
passthrough for whole-file objects) and `--passthrough off` (copy mode for everything).

Needs: /dev/fuse, `fusermount3` (Debian package fuse3), `setpriv` (util-linux), root for
the parts that run as user nobody. The only timing rule checked is the 1-second
visibility of imports/removals (polled for up to VISIBLE_WITHIN seconds).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

import modelfamily
import mountlib
from conftest import Modelfs
from mountlib import (  # noqa: F401 (mount_factory is a fixture)
    LoadReaders, Mount, first_diff, is_mounted, mount_factory, pread_full, stat_ok, wait_until,
)

TESTS_DIR = Path(__file__).resolve().parent
IS_ROOT = os.geteuid() == 0
VISIBLE_WITHIN = 1.5  # contract: 1 s; polled generously
AUTO_UNMOUNT_WITHIN = 3.0  # after SIGKILL of the daemon (contract: "allow a second")
MiB = 1 << 20
CHUNK_MAX = MiB  # tensor pieces are 1 MiB, content-defined chunks at most 256 KiB
PAGE = 4096

MODES = ["auto", "off"]
COUNTERS = ("read_requests", "read_bytes", "eio", "passthrough_opens", "copy_opens")


@pytest.fixture(scope="module", autouse=True)
def _no_mount_left_behind():
    yield
    mountlib.cleanup_all()


@pytest.fixture(scope="module", autouse=True)
def fuse_available():
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 not found (Debian package: fuse3)")
    if shutil.which("setpriv") is None:
        problems.append("setpriv not found (Debian package: util-linux)")
    if problems:
        pytest.fail("the mount tests need FUSE: " + "; ".join(problems), pytrace=False)


# ------------------------------------------------------------------------------------------
# the expected tree


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Expected:
    """What the mount must show: model name -> {relative path: original file}."""

    def __init__(self):
        self.models: dict[str, dict[str, Path]] = {}
        self.dirs: dict[str, set[str]] = {}  # model name -> its directories (relative, '' excluded)
        self.sha: dict[str, str] = {}  # "name/rel" -> sha256
        self.modes: dict[str, int] = {}  # "name/rel" -> expected permission bits

    def add(self, name: str, src: Path, manifest_files=None):
        src = Path(src)
        files = {rel: src / rel for rel in modelfamily.list_files(src)}
        self.models[name] = files
        dirs = set()
        for dirpath, dirnames, _ in os.walk(src, followlinks=True):
            for d in dirnames:
                dirs.add((Path(dirpath) / d).relative_to(src).as_posix())
        self.dirs[name] = dirs
        known = {f["path"]: f["sha256"] for f in (manifest_files or [])}
        for rel, p in files.items():
            key = f"{name}/{rel}"
            self.sha[key] = known.get(rel) or modelfamily.sha256_file(p)
            self.modes[key] = 0o555 if os.stat(p).st_mode & 0o111 else 0o444

    def all_files(self):
        for name, files in self.models.items():
            for rel, p in files.items():
                yield f"{name}/{rel}", p

    def all_dirs(self) -> set[str]:
        out = set()
        for name, dirs in self.dirs.items():
            parts = name.split("/")
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
            out |= {f"{name}/{d}" for d in dirs}
        return out


def write_extras(d: Path, family) -> Path:
    """A small model with an executable file, an empty directory, an empty file, a deep
    directory, and one file identical to base/config.json (so it shares base's inode)."""
    (d / "bin").mkdir(parents=True)
    (d / "bin" / "run.sh").write_bytes(b"#!/bin/sh\necho modelfs\n")
    os.chmod(d / "bin" / "run.sh", 0o755)
    (d / "empty-dir").mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "deep" / "a" / "b").mkdir(parents=True)
    shutil.copy(family.path("base") / "config.json", d / "deep" / "a" / "b" / "config.json")
    (d / "README.md").write_text("extras for the mount tests\n")
    return d


class StoreWithFamily:
    def __init__(self, mfs: Modelfs, expected: Expected):
        self.mfs = mfs
        self.expected = expected


@pytest.fixture(scope="module")
def fam_store(modelfs_bin, family, tmp_path_factory) -> StoreWithFamily:
    """One store holding the whole family + org/extras, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("mount-store")
    mfs = Modelfs(modelfs_bin, root / "store")
    mfs.run("init", ok=True)
    exp = Expected()
    for key in family.models:
        mfs.import_(family.path(key), ok=True)
        exp.add(family.name(key), family.path(key), family.files(key))
    extras = write_extras(root / "extras", family)
    mfs.import_(extras, "--name", "org/extras", ok=True)
    exp.add("org/extras", extras)
    assert mfs.ls_files("org/extras")["bin/run.sh"]["mode"] == "555"
    return StoreWithFamily(mfs, exp)




@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def mounted(fam_store, mount_factory, mode) -> Mount:
    m = mount_factory(fam_store.mfs, "--passthrough", mode)
    m.mode = mode
    return m


def tree_of(root: Path):
    """(files, dirs) under a mount root, relative, excluding the reserved .modelfs."""
    files, dirs = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != ".modelfs"]
            filenames = [f for f in filenames if f != ".modelfs"]
        for d in dirnames:
            dirs.add(d if rel == "." else f"{rel}/{d}")
        for f in filenames:
            files.add(f if rel == "." else f"{rel}/{f}")
    return files, dirs


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


# ------------------------------------------------------------------------------------------
# stats.json


def stats_counters(s: dict) -> dict:
    missing = [k for k in ("mode",) + COUNTERS if k not in s]
    assert not missing, f"stats.json lacks {missing}: {s}"
    for k in COUNTERS:
        assert isinstance(s[k], int) and s[k] >= 0, f"stats.json {k} = {s[k]!r}"
    return {k: s[k] for k in COUNTERS}


class StatsProbe:
    """Counter deltas caused by an action, with the cost of reading stats.json itself
    (measured by two back-to-back reads) subtracted."""

    def __init__(self, m: Mount):
        self.m = m
        a = stats_counters(m.stats())
        b = stats_counters(m.stats())
        self.overhead = {k: b[k] - a[k] for k in COUNTERS}
        self.last = b

    def delta(self) -> dict:
        now = stats_counters(self.m.stats())
        d = {k: now[k] - self.last[k] - self.overhead[k] for k in COUNTERS}
        d["raw"] = {k: now[k] - self.last[k] for k in COUNTERS}
        d["overhead"] = dict(self.overhead)
        self.last = now
        return d


# ------------------------------------------------------------------------------------------
# round trip and attributes


def test_round_trip(mounted, fam_store):
    exp = fam_store.expected
    files, dirs = tree_of(mounted.mountpoint)
    want_files = {k for k, _ in exp.all_files()}
    assert files == want_files, (f"files in the mount differ from the imported trees: missing "
                                 f"{sorted(want_files - files)[:10]}, extra {sorted(files - want_files)[:10]}")
    assert dirs == exp.all_dirs(), (f"directories differ: missing {sorted(exp.all_dirs() - dirs)[:10]}, "
                                    f"extra {sorted(dirs - exp.all_dirs())[:10]}")
    for key, orig in exp.all_files():
        want = orig.read_bytes()
        p = mounted / key
        got = p.read_bytes()
        assert got == want, (f"[{mounted.mode}] read() of {key}: {len(got)} bytes, differs from the "
                             f"original ({len(want)} bytes) at byte {first_diff(got, want)}")
        got = mountlib.read_via_mmap(p)
        assert got == want, (f"[{mounted.mode}] mmap of {key}: {len(got)} bytes, differs from the "
                             f"original ({len(want)} bytes) at byte {first_diff(got, want)}")


def _imported_at(mfs) -> dict:
    out = {}
    for name, m in mfs.ls_models().items():
        out[name] = datetime.fromisoformat(m["imported_at"].replace("Z", "+00:00")).timestamp()
    return out


def test_attributes(mounted, fam_store):
    exp = fam_store.expected
    mp = mounted.mountpoint
    uid = os.geteuid()
    imported = _imported_at(fam_store.mfs)
    problems = []
    by_sha: dict[str, list[tuple[str, os.stat_result]]] = {}
    for key, orig in exp.all_files():
        st = os.stat(mp / key)
        size = orig.stat().st_size
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{key}: not a regular file (mode {st.st_mode:o})")
        if st.st_size != size:
            problems.append(f"{key}: st_size {st.st_size} != {size}")
        if stat.S_IMODE(st.st_mode) != exp.modes[key]:
            problems.append(f"{key}: mode {stat.S_IMODE(st.st_mode):o} != {exp.modes[key]:o}")
        if st.st_uid != uid:
            problems.append(f"{key}: st_uid {st.st_uid} != daemon uid {uid}")
        by_sha.setdefault(exp.sha[key], []).append((key, st))
    # mtime = import time; content shared by several models is one inode, so
    # it carries the earliest import time among the models that hold it.
    for sha, group in by_sha.items():
        owners = [next(n for n in exp.models if k.startswith(n + "/") and k[len(n) + 1:] in exp.models[n])
                  for k, _ in group]
        first = min(imported[n] for n in owners)
        for k, st in group:
            if abs(st.st_mtime - first) > 1.0:
                problems.append(f"{k}: mtime {st.st_mtime:.3f} is not within 1 s of the earliest import "
                                f"({first:.0f}) of the models holding that content {sorted(set(owners))}")
    # one inode per content; nlink = number of paths with that content in the whole mount
    ino_owner = {}
    for sha, group in by_sha.items():
        inos = {st.st_ino for _, st in group}
        if len(inos) != 1:
            problems.append(f"identical content at {[k for k, _ in group]} has several inodes {sorted(inos)}")
        for k, st in group:
            if st.st_nlink != len(group):
                problems.append(f"{k}: st_nlink {st.st_nlink} != {len(group)} paths with that content")
        for ino in inos:
            if ino in ino_owner and ino_owner[ino] != sha:
                problems.append(f"inode {ino} is shared by different contents ({group[0][0]})")
            ino_owner[ino] = sha
    shared = [g for g in by_sha.values() if len(g) > 2]
    assert shared, "test set-up: expected contents shared by more than two paths (base/base-copy/...)"
    # directories: 0555, owned by the daemon's uid, nlink = 2 + subdirectories
    for rel in sorted(exp.all_dirs() | {""}):
        p = mp / rel if rel else mp
        st = os.stat(p)
        if not stat.S_ISDIR(st.st_mode):
            problems.append(f"{rel or '/'}: not a directory")
            continue
        if stat.S_IMODE(st.st_mode) != 0o555:
            problems.append(f"{rel or '/'}: directory mode {stat.S_IMODE(st.st_mode):o} != 555")
        if st.st_uid != uid:
            problems.append(f"{rel or '/'}: directory st_uid {st.st_uid} != {uid}")
        subdirs = [e for e in os.scandir(p) if e.is_dir(follow_symlinks=False)]
        if st.st_nlink != 2 + len(subdirs):
            problems.append(f"{rel or '/'}: st_nlink {st.st_nlink} != 2 + {len(subdirs)} subdirectories")
    assert not problems, f"[{mounted.mode}] {len(problems)} attribute problems:\n" + "\n".join(problems[:40])
    # spot checks of the set-up itself
    assert os.stat(mp / "base/config.json").st_ino == os.stat(mp / "org/extras/deep/a/b/config.json").st_ino
    assert os.stat(mp / "org").st_nlink == 4  # org/tiny and org/extras
    assert os.stat(mp / "org/extras/empty-dir").st_nlink == 2


def test_inodes_stable_across_remount(fam_store, mount_factory, mode):
    exp = fam_store.expected
    m = mount_factory(fam_store.mfs, "--passthrough", mode)
    before = {k: os.stat(m / k).st_ino for k, _ in exp.all_files()}
    m.umount()
    m.start_daemon()
    after = {k: os.stat(m / k).st_ino for k, _ in exp.all_files()}
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"[{mode}] inode numbers changed across a remount: {list(changed.items())[:10]}"


def test_store_serves_whole_and_recipe_files(mounted, fam_store):
    """Sanity of the test store: both storage kinds are present and served."""
    mfs = fam_store.mfs
    assert mfs.ls_files("base")["model.safetensors"]["storage"] == "whole"
    assert mfs.ls_files("ft-head")["model.safetensors"]["storage"] == "recipe"
    for key in ("base/model.safetensors", "ft-head/model.safetensors"):
        assert os.stat(mounted / key).st_size == fam_store.expected.models[key.split("/")[0]][
            "model.safetensors"].stat().st_size


# ------------------------------------------------------------------------------------------
# read-only


def _erofs_ops(mp: Path):
    f = mp / "base" / "config.json"
    d = mp / "base"
    big = mp / "base" / "model.safetensors"
    empty = mp / "org" / "extras" / "empty-dir"
    stats_file = mp / ".modelfs" / "stats.json"
    return [
        ("open O_WRONLY", lambda: os.open(f, os.O_WRONLY)),
        ("open O_RDWR", lambda: os.open(big, os.O_RDWR)),
        ("open O_WRONLY|O_APPEND", lambda: os.open(f, os.O_WRONLY | os.O_APPEND)),
        ("open O_WRONLY|O_TRUNC", lambda: os.open(f, os.O_WRONLY | os.O_TRUNC)),
        ("create in model dir", lambda: os.open(d / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644)),
        ("create at root", lambda: os.open(mp / "new.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
        ("mkfifo", lambda: os.mkfifo(d / "fifo")),
        ("mkdir in model dir", lambda: os.mkdir(d / "newdir")),
        ("mkdir at root", lambda: os.mkdir(mp / "newmodel")),
        ("unlink", lambda: os.unlink(f)),
        ("rmdir empty dir", lambda: os.rmdir(empty)),
        ("rmdir model dir", lambda: os.rmdir(d)),
        ("rename file", lambda: os.rename(f, d / "renamed.json")),
        ("rename file across models", lambda: os.rename(f, mp / "ft-head" / "config2.json")),
        ("rename dir", lambda: os.rename(d, mp / "base-renamed")),
        ("chmod file", lambda: os.chmod(f, 0o644)),
        ("chmod dir", lambda: os.chmod(d, 0o755)),
        ("chown", lambda: os.chown(f, os.geteuid(), os.getegid())),
        ("truncate", lambda: os.truncate(big, 0)),
        ("utime", lambda: os.utime(f, (0, 0))),
        ("symlink", lambda: os.symlink("config.json", d / "link.json")),
        ("link", lambda: os.link(f, d / "hard.json")),
        ("setxattr file", lambda: os.setxattr(f, "user.modelfs-test", b"1")),
        ("setxattr dir", lambda: os.setxattr(d, "user.modelfs-test", b"1")),
        ("removexattr", lambda: os.removexattr(f, "user.modelfs-test")),
        ("open stats.json O_WRONLY", lambda: os.open(stats_file, os.O_WRONLY)),
        ("unlink stats.json", lambda: os.unlink(stats_file)),
    ]


def test_every_modifying_call_fails_with_erofs(mounted, fam_store):
    mp = mounted.mountpoint
    wrong = []
    for label, op in _erofs_ops(mp):
        try:
            r = op()
        except OSError as e:
            if e.errno != errno.EROFS:
                wrong.append(f"{label}: errno {e.errno} ({errno.errorcode.get(e.errno)}) instead of EROFS")
            continue
        if isinstance(r, int):
            os.close(r)
        wrong.append(f"{label}: succeeded")
    assert not wrong, f"[{mounted.mode}] modifying calls that did not fail with EROFS:\n" + "\n".join(wrong)
    # nothing changed
    exp = fam_store.expected
    assert (mp / "base/config.json").read_bytes() == exp.models["base"]["config.json"].read_bytes()
    assert os.stat(mp / "base/model.safetensors").st_size == exp.models["base"]["model.safetensors"].stat().st_size
    files, dirs = tree_of(mp)
    assert files == {k for k, _ in exp.all_files()} and dirs == exp.all_dirs()


# ------------------------------------------------------------------------------------------
# concurrency


CONCURRENT_FILES = ["base/model.safetensors", "ft-head/model.safetensors", "torch-bin/pytorch_model.bin",
                    "nested/unet/diffusion_pytorch_model.safetensors", "gguf-model/model.gguf",
                    "resharded/model-00002-of-00003.safetensors", "org/tiny/tokenizer.json",
                    "onnx-external/model.onnx.data"]


CONCURRENT_READS = 400  # random ranges per reader thread / process


@pytest.mark.parametrize("mount_args", [["--passthrough", "auto"], ["--passthrough", "off"],
                                        ["--passthrough", "off", "--threads", "1"]],
                         ids=["auto", "off", "off-threads1"])
def test_concurrent_readers(fam_store, mount_factory, mount_args):
    """8 threads (half of them through mmap) + 4 processes read random ranges of several
    files of a freshly mounted (cold) store; every byte is compared with the original."""
    m = mount_factory(fam_store.mfs, *mount_args)
    exp = fam_store.expected
    pairs = []
    for key in CONCURRENT_FILES:
        name, rel = next((n, key[len(n) + 1:]) for n in exp.models if key.startswith(n + "/")
                         and key[len(n) + 1:] in exp.models[n])
        pairs.append((str(m / key), str(exp.models[name][rel])))
    procs = []
    for i in range(4):
        spec = json.dumps({"pairs": pairs, "seed": 1000 + i, "n": CONCURRENT_READS, "mmap": i % 2 == 1})
        procs.append(subprocess.Popen([sys.executable, str(TESTS_DIR / "mountlib.py"), spec],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=TESTS_DIR))
    errors = []
    counts = [0] * 8

    def thread_reader(i):
        try:
            counts[i] = mountlib.random_reads(pairs, seed=i, n=CONCURRENT_READS, use_mmap=i % 2 == 1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=thread_reader, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
        if t.is_alive():
            errors.append(f"{t.name} still running after 240 s (hung read?)")
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            errors.append(f"process {i} hung")
        if p.returncode != 0:
            errors.append(f"process {i} exited {p.returncode}: {out.decode(errors='replace')[-2000:]}")
    assert not errors, f"[{' '.join(mount_args)}] concurrent readers:\n" + "\n".join(errors)
    assert counts == [CONCURRENT_READS] * 8


# ------------------------------------------------------------------------------------------
# live changes: import / rm / gc while mounted


def dir_nlink_problems(mp: Path) -> list[str]:
    """Directories whose st_nlink is not 2 + the number of subdirectories they list."""
    out = []
    for dirpath, dirnames, _files in os.walk(mp):
        n = os.stat(dirpath).st_nlink
        if n != 2 + len(dirnames):
            out.append(f"{Path(dirpath).relative_to(mp).as_posix()}: st_nlink {n}, "
                       f"subdirectories {sorted(dirnames)}")
    return out


def _poll(pred, timeout=VISIBLE_WITHIN):
    t0 = time.monotonic()
    ok = wait_until(pred, timeout, interval=0.01)
    return ok, time.monotonic() - t0


def test_import_while_mounted_appears(new_store, family, mount_factory, mode):
    mfs = new_store()
    mfs.import_(family.path("gguf-model"), ok=True)
    mfs.import_(family.path("hf-cache"), ok=True)  # org/tiny
    m = mount_factory(mfs, "--passthrough", mode)
    mp = m.mountpoint
    targets = {"org/onnx": family.path("onnx-model"), "late/gguf2": family.path("onnx-external")}
    # look them up first: the kernel may now cache negative entries, which must not hide them
    for name in targets:
        assert not (mp / name).exists()
        assert not (mp / name / "model.onnx").exists()
    assert sorted(os.listdir(mp / "org")) == ["tiny"]
    assert "late" not in os.listdir(mp)
    for name, src in targets.items():
        mfs.import_(src, "--name", name, ok=True)
        parent, leaf = name.split("/")

        def visible():
            try:
                return leaf in os.listdir(mp / parent) and (mp / name / "model.onnx").is_file()
            except OSError:
                return False

        ok, dt = _poll(visible)
        assert ok, (f"[{mode}] {name} imported while mounted is not visible after {dt:.2f}s "
                    f"(contract: within 1 s): listdir({parent}) = "
                    f"{os.listdir(mp / parent) if (mp / parent).exists() else 'ENOENT'}")
        for rel in modelfamily.list_files(src):
            assert (mp / name / rel).read_bytes() == (src / rel).read_bytes(), f"{name}/{rel}"
    assert sorted(os.listdir(mp / "org")) == ["onnx", "tiny"]
    ok, dt = _poll(lambda: not dir_nlink_problems(mp))
    assert ok, (f"[{mode}] directory link counts still stale {dt:.2f}s after the imports "
                f"(expected 2 + subdirectories): {dir_nlink_problems(mp)}")


def test_rm_while_mounted_disappears(new_store, family, mount_factory, mode):
    mfs = new_store()
    for key in ("gguf-model", "hf-cache", "onnx-model"):
        mfs.import_(family.path(key), ok=True)
    m = mount_factory(mfs, "--passthrough", mode)
    mp = m.mountpoint
    assert (mp / "gguf-model" / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert (mp / "org" / "tiny" / "config.json").is_file()
    for name, probe in (("gguf-model", "gguf-model/model.gguf"), ("org/tiny", "org/tiny/config.json")):
        mfs.run("rm", name, ok=True)
        top = name.split("/")[0]

        def gone():
            return not (mp / probe).exists() and not (mp / name).exists() and top not in os.listdir(mp)

        ok, dt = _poll(gone)
        assert ok, (f"[{mode}] {name} still visible {dt:.2f}s after `modelfs rm` (contract: within 1 s); "
                    f"root lists {sorted(os.listdir(mp))}")
    assert sorted(x for x in os.listdir(mp) if x != ".modelfs") == ["onnx-model"]
    ok, dt = _poll(lambda: not dir_nlink_problems(mp))
    assert ok, (f"[{mode}] directory link counts still stale {dt:.2f}s after the removals "
                f"(expected 2 + subdirectories): {dir_nlink_problems(mp)}")
    assert (mp / "onnx-model/model.onnx").read_bytes() == (family.path("onnx-model") / "model.onnx").read_bytes()


def test_open_file_survives_rm_and_gc(new_store, family, mount_factory, mode, tmp_path):
    """Keep files open (nothing read yet), rm their models, gc (which deletes their
    objects), then read them completely through the open descriptors."""
    mfs = new_store()
    mfs.import_(copy_model(family.path("base"), tmp_path / "src" / "base"), ok=True)
    mfs.import_(copy_model(family.path("ft-last"), tmp_path / "src" / "ft-last"), ok=True)
    mfs.import_(copy_model(family.path("gguf-model"), tmp_path / "src" / "gguf-model"), ok=True)
    gguf_obj = mfs.ls_files("gguf-model")["model.gguf"]
    assert gguf_obj["storage"] == "whole"
    last = mfs.ls_files("ft-last")
    assert last["model.safetensors"]["storage"] == "recipe"
    m = mount_factory(mfs, "--passthrough", mode)
    held = {
        "gguf-model/model.gguf": family.path("gguf-model") / "model.gguf",  # whole
        "ft-last/model.safetensors": family.path("ft-last") / "model.safetensors",  # recipe
        "ft-last/config.json": family.path("ft-last") / "config.json",  # whole, unique
    }
    fds = {k: os.open(m / k, os.O_RDONLY) for k in held}
    try:
        objects_before = {p for p in (mfs.store / "objects").rglob("*") if p.is_file()}
        mfs.run("rm", "ft-last", ok=True)
        mfs.run("rm", "gguf-model", ok=True)
        mfs.run("gc", ok=True)
        objects_after = {p for p in (mfs.store / "objects").rglob("*") if p.is_file()}
        assert not Path(gguf_obj["object"]).exists(), "test set-up: gc should have deleted gguf's object"
        assert len(objects_after) < len(objects_before) - 1, "test set-up: gc deleted too little"
        ok, dt = _poll(lambda: not (m / "gguf-model").exists() and not (m / "ft-last").exists())
        assert ok, f"[{mode}] removed models still visible after {dt:.2f}s"
        for k, orig in held.items():
            want = orig.read_bytes()
            try:
                got = pread_full(fds[k], len(want) + 1, 0)
            except OSError as e:
                raise AssertionError(f"[{mode}] reading {k} (open before rm + gc) failed: {e!r}") from None
            assert got == want, (f"[{mode}] {k} (open before rm + gc): {len(got)} bytes, differs from the "
                                 f"original ({len(want)} bytes) at byte {first_diff(got, want)}")
    finally:
        for fd in fds.values():
            os.close(fd)
    # base is untouched
    assert (m / "base/model.safetensors").read_bytes() == (family.path("base") / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------
# unmount: umount command, signals, SIGKILL


def test_umount_command(fam_store, mount_factory, mode):
    m = mount_factory(fam_store.mfs, "--passthrough", mode)
    assert (m / "base/config.json").read_bytes() == fam_store.expected.models["base"]["config.json"].read_bytes()
    pids = list(m.daemon_pids)
    assert pids, "could not find the daemon process of `modelfs mount --daemon` in /proc"
    m.umount()  # exit 0, not in /proc/mounts, mountpoint usable, daemon exited
    assert os.listdir(m.mountpoint) == []


def _load_pairs(m: Mount, fam_store, keys=("base/model.safetensors", "ft-head/model.safetensors",
                                           "gguf-model/model.gguf", "torch-bin/pytorch_model.bin")):
    exp = fam_store.expected
    out = []
    for key in keys:
        name, rel = key.split("/", 1)
        out.append((str(m / key), str(exp.models[name][rel])))
    return out


@pytest.mark.parametrize("mode,sig", [("auto", signal.SIGTERM), ("off", signal.SIGTERM), ("auto", signal.SIGINT)],
                         ids=["auto-SIGTERM", "off-SIGTERM", "auto-SIGINT"])
def test_signal_unmounts_cleanly_under_load(fam_store, mount_factory, mode, sig):
    m = mount_factory(fam_store.mfs, "--passthrough", mode, start=False)
    proc = m.start_foreground()
    readers = LoadReaders(_load_pairs(m, fam_store))
    readers.start()
    t_sig = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        rc = proc.wait(timeout=mountlib.EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        rc = None
    hung = readers.finish()
    if rc is None:
        # diagnose: does it exit once the readers have closed their files?
        try:
            late = f"it exited {proc.wait(timeout=10)} once the readers closed their files"
        except subprocess.TimeoutExpired:
            late = "it was still running 10 s after the readers closed their files"
        pytest.fail(m.describe(
            f"[{mode}] foreground mount still running {mountlib.EXIT_TIMEOUT}s after {sig.name} while "
            f"readers held files open ({late}); in /proc/mounts: {is_mounted(m.mountpoint)}"))
    assert rc == 0, m.describe(f"[{mode}] foreground mount exited {rc} after {sig.name} (expected 0)")
    assert not readers.mismatches, readers.mismatches
    early = [msg for t, msg in readers.errors if t < t_sig]
    assert not early, f"read errors before the signal: {early}"
    assert not is_mounted(m.mountpoint), m.describe(f"[{mode}] still in /proc/mounts after {sig.name}")
    err = stat_ok(m.mountpoint)
    assert err is None, f"[{mode}] mountpoint unusable after {sig.name}: {err}"
    assert os.listdir(m.mountpoint) == []
    assert not hung, f"reader threads stuck in the dead mount: {hung}"


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_leaves_no_stale_mount(fam_store, mount_factory, mode):
    m = mount_factory(fam_store.mfs, "--passthrough", mode)
    pids = mountlib.modelfs_pids(fam_store.mfs.bin, m.mountpoint)
    assert pids, "could not find the daemon process of `modelfs mount --daemon` in /proc"
    readers = LoadReaders(_load_pairs(m, fam_store))
    readers.start()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    ok, dt = _poll(lambda: not is_mounted(m.mountpoint), AUTO_UNMOUNT_WITHIN)
    hung = readers.finish()
    assert not readers.mismatches, readers.mismatches
    assert ok, (f"[{mode}] {dt:.1f}s after SIGKILL of the daemon {pids} the mount is still in /proc/mounts "
                f"(no auto-unmount); stat: {stat_ok(m.mountpoint)}")
    err = stat_ok(m.mountpoint)
    assert err is None, f"[{mode}] stale mountpoint after SIGKILL: {err}"
    assert os.listdir(m.mountpoint) == []
    assert not hung, f"reader threads stuck in the dead mount: {hung}"


# ------------------------------------------------------------------------------------------
# refusals, reserved name


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "foreground"])
def test_refuses_missing_mountpoint(fam_store, tmp_path, daemon):
    mp = tmp_path / "no-such-dir"
    args = ["mount", mp] + (["--daemon"] if daemon else [])
    r = fam_store.mfs.run(*args, ok=False, timeout=60)
    assert str(mp) in r.stderr, f"error should name the mountpoint {mp}:\n{r.describe()}"
    assert not mp.exists() and not is_mounted(mp)


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "foreground"])
def test_refuses_nonempty_mountpoint(fam_store, tmp_path, daemon):
    mp = tmp_path / "busy"
    mp.mkdir()
    (mp / "keep.txt").write_text("x")
    args = ["mount", mp] + (["--daemon"] if daemon else [])
    try:
        r = fam_store.mfs.run(*args, ok=False, timeout=60)
    finally:
        if is_mounted(mp):
            mountlib.force_unmount(mp)
            pytest.fail(f"`modelfs mount` mounted over the non-empty directory {mp}")
    assert str(mp) in r.stderr, f"error should name the mountpoint {mp}:\n{r.describe()}"
    assert os.listdir(mp) == ["keep.txt"]


@pytest.mark.parametrize("name", [".modelfs", ".modelfs/x"])
def test_modelfs_name_is_reserved(new_store, family, name):
    mfs = new_store()
    r = mfs.import_(family.path("gguf-model"), "--name", name, ok=False)
    assert ".modelfs" in r.stderr, r.describe()
    assert mfs.ls_models() == {}


# ------------------------------------------------------------------------------------------
# statistics, passthrough, page cache


def test_stats_file(mounted, fam_store):
    mp = mounted.mountpoint
    assert ".modelfs" in os.listdir(mp)
    assert "stats.json" in os.listdir(mp / ".modelfs")
    st = os.stat(mounted.stats_path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444, f"stats.json mode {st.st_mode:o}"
    s = mounted.stats()
    stats_counters(s)
    want_mode = "passthrough" if mounted.mode == "auto" and IS_ROOT else "copy"
    assert s["mode"] == want_mode, f"--passthrough {mounted.mode} as uid {os.geteuid()}: stats mode {s['mode']!r}"
    # regenerated on each open: reading a recipe file (copy mode in both modes) moves the counters
    probe = StatsProbe(mounted)
    data = (mp / "ft-head/model.safetensors").read_bytes()
    d = probe.delta()
    assert d["copy_opens"] >= 1, d
    assert d["read_requests"] >= 1 and d["read_bytes"] >= len(data), d
    assert d["eio"] == 0, d


def test_passthrough_serves_whole_files_without_daemon_reads(fam_store, mount_factory):
    m = mount_factory(fam_store.mfs, "--passthrough", "auto")
    exp = fam_store.expected
    if not IS_ROOT:
        pytest.fail("kernel passthrough needs CAP_SYS_ADMIN: run the suite as root")
    assert m.stats()["mode"] == "passthrough"
    key = "base/model.safetensors"  # a whole-file object
    want = exp.models["base"]["model.safetensors"].read_bytes()
    probe = StatsProbe(m)
    assert (m / key).read_bytes() == want
    assert mountlib.read_via_mmap(m / key) == want
    d = probe.delta()
    assert d["passthrough_opens"] >= 2, f"opening a whole-file object in auto mode: {d}"
    assert d["read_requests"] <= 0 and d["read_bytes"] <= 64, (
        f"reading a whole-file object ({len(want)} bytes) through passthrough made the daemon serve "
        f"READ requests: {d}")
    # control: a recipe file in the same mount is served by the daemon
    want = exp.models["ft-head"]["model.safetensors"].read_bytes()
    assert (m / "ft-head/model.safetensors").read_bytes() == want
    d = probe.delta()
    assert d["copy_opens"] >= 1 and d["read_requests"] >= 1 and d["read_bytes"] >= len(want), d


def test_passthrough_off_serves_everything_in_copy_mode(fam_store, mount_factory):
    m = mount_factory(fam_store.mfs, "--passthrough", "off")
    want = fam_store.expected.models["base"]["model.safetensors"].read_bytes()
    probe = StatsProbe(m)
    assert (m / "base/model.safetensors").read_bytes() == want
    d = probe.delta()
    s = m.stats()
    assert s["mode"] == "copy" and s["passthrough_opens"] == 0, s
    assert d["copy_opens"] >= 1 and d["read_bytes"] >= len(want), d


MMAP_TOUCH = r"""
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    total = 0
    for off in range(0, len(mm), 4096):
        total += mm[off]
    print(hashlib.sha256(mm).hexdigest())
    mm.close()
"""


def _mmap_touch(path) -> str:
    r = subprocess.run([sys.executable, "-c", MMAP_TOUCH, str(path)], capture_output=True, timeout=120)
    assert r.returncode == 0, f"mmap reader of {path} failed: {r.stderr.decode(errors='replace')[-2000:]}"
    return r.stdout.decode().strip()


def test_page_cache_shared_between_models(fam_store, mount_factory):
    """Copy mode: the same content under two model names is one inode, so a second process
    mapping it is served from the page cache the first one filled."""
    m = mount_factory(fam_store.mfs, "--passthrough", "off")
    a, b = m / "base/model.safetensors", m / "base-copy/model.safetensors"
    assert os.stat(a).st_ino == os.stat(b).st_ino
    orig = fam_store.expected.models["base"]["model.safetensors"]
    size = orig.stat().st_size
    want = modelfamily.sha256_file(orig)
    probe = StatsProbe(m)
    assert _mmap_touch(a) == want
    da = probe.delta()
    assert _mmap_touch(b) == want
    db = probe.delta()
    assert da["read_bytes"] >= size, f"first mmap reader of {size} bytes: daemon served only {da}"
    assert db["read_bytes"] <= size // 20 and db["read_requests"] <= max(2, da["read_requests"] // 20), (
        f"second process mapping the same content under another model name was not served from "
        f"the shared page cache: first {da}, second {db} (file size {size})")
    assert da["read_bytes"] + db["read_bytes"] <= 1.25 * size


# ------------------------------------------------------------------------------------------
# damage: bit flips are EIO, never wrong bytes; other ranges keep working


def _flip_byte(path, offset):
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_chunk(path: Path, offset: int):
    """[start, end) of the chunk holding `offset` if it lies in a tensor (1 MiB pieces from
    the tensor's start, store-format §8), else None."""
    for start, length, _name in modelfamily.scan_safetensors(path):
        if start <= offset < start + length:
            k = (offset - start) // CHUNK_MAX
            cs = start + k * CHUNK_MAX
            return cs, min(start + length, cs + CHUNK_MAX)
    return None


def _check_damage(m: Mount, key: str, data: bytes, bad_off: int, chunk, mode_label: str):
    """The page holding bad_off gives EIO (twice, and in a sequential read of the whole file);
    ranges outside the damaged chunk read correctly; stats count the EIO."""
    cs, ce = chunk
    fd = os.open(m / key, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into other chunks
        page = bad_off - bad_off % PAGE
        for attempt in (1, 2):
            try:
                got = os.pread(fd, PAGE, page)
            except OSError as e:
                assert e.errno == errno.EIO, f"[{mode_label}] damaged range: {e!r}, expected EIO"
            else:
                raise AssertionError(
                    f"[{mode_label}] read #{attempt} of the damaged range [{page}, +{PAGE}) of {key} returned "
                    f"{len(got)} bytes ({'the original' if got == data[page:page + PAGE] else 'WRONG'} bytes)"
                    f" instead of failing with EIO")
        good = [(0, PAGE), (len(data) - 65536, 65536)]
        before = cs - cs % PAGE - PAGE
        after = ce + (-ce) % PAGE
        if before >= 0:
            good.append((before, PAGE))
        if after + PAGE <= len(data):
            good.append((after, PAGE))
        for off, n in good:
            assert off + n <= cs or off >= ce, ("test set-up: good range overlaps the damaged chunk",
                                                off, n, chunk)
            try:
                got = os.pread(fd, n, off)
            except OSError as e:
                raise AssertionError(f"[{mode_label}] undamaged range [{off}, +{n}) of {key} (damaged chunk "
                                     f"[{cs}, {ce})) failed: {e!r}") from None
            assert got == data[off:off + n], f"[{mode_label}] undamaged range [{off}, +{n}) of {key} differs"
    finally:
        os.close(fd)
    with open(m / key, "rb") as f:
        with pytest.raises(OSError) as ei:
            f.read()
        assert ei.value.errno == errno.EIO, f"[{mode_label}] sequential read of damaged {key}: {ei.value!r}"
    s = m.stats()
    assert s["eio"] >= 1, f"[{mode_label}] stats.json does not count the EIO: {s}"


def test_bit_flip_in_whole_object(new_store, family, mount_factory, mode, tmp_path):
    mfs = new_store()
    src = copy_model(family.path("base"), tmp_path / "src" / "base")
    mfs.import_(src, ok=True)
    f = mfs.ls_files("base")["model.safetensors"]
    assert f["storage"] == "whole", f
    data = (src / "model.safetensors").read_bytes()
    bad = len(data) // 2
    chunk = _tensor_chunk(src / "model.safetensors", bad)
    assert chunk, "test set-up: the middle of base/model.safetensors should be tensor data"
    _flip_byte(f["object"], bad)
    m = mount_factory(mfs, "--passthrough", mode)
    _check_damage(m, "base/model.safetensors", data, bad, chunk, mode)
    s = m.stats()
    if mode == "auto":
        assert s["passthrough_opens"] == 0 and s["copy_opens"] >= 1, (
            f"a damaged whole-file object must be detected at open and served in copy mode: {s}")
    # other files of the model are fine
    assert (m / "base/config.json").read_bytes() == (src / "config.json").read_bytes()


def test_bit_flip_in_packed_object_of_recipe(new_store, family, mount_factory, mode, tmp_path):
    mfs = new_store()
    mfs.import_(copy_model(family.path("base"), tmp_path / "src" / "base"), ok=True)
    src = copy_model(family.path("ft-head"), tmp_path / "src" / "ft-head")
    mfs.import_(src, ok=True)
    head = mfs.ls_files("ft-head")
    assert head["model.safetensors"]["storage"] == "recipe"
    whole = {os.path.realpath(f["object"]) for n in ("base", "ft-head")
             for f in mfs.ls_files(n).values() if f["storage"] == "whole"}
    packed = [p for p in (mfs.store / "objects").rglob("*")
              if p.is_file() and os.path.realpath(p) not in whole and p.stat().st_size > 0]
    assert len(packed) == 1, f"test set-up: expected one packed object (ft-head's new chunks), got {packed}"
    obj = packed[0].read_bytes()
    mid = len(obj) // 2
    data = (src / "model.safetensors").read_bytes()
    window = obj[mid - 32:mid + 32]
    pos = data.find(window)
    assert pos >= 0 and data.find(window, pos + 1) < 0, "test set-up: cannot locate the packed bytes in the file"
    bad = pos + 32
    chunk = _tensor_chunk(src / "model.safetensors", bad)
    assert chunk, "test set-up: the middle of the packed object should be tensor data (lm_head)"
    _flip_byte(packed[0], mid)
    m = mount_factory(mfs, "--passthrough", mode)
    _check_damage(m, "ft-head/model.safetensors", data, bad, chunk, mode)
    # base (sharing all other chunks) is intact
    want = (tmp_path / "src" / "base" / "model.safetensors").read_bytes()
    assert (m / "base/model.safetensors").read_bytes() == want


# ------------------------------------------------------------------------------------------
# other users


def _var_tmp_dir(prefix):
    work = Path(tempfile.mkdtemp(dir="/var/tmp", prefix=prefix))
    os.chmod(work, 0o755)
    return work


def _as_nobody(*argv, timeout=60):
    return subprocess.run([*mountlib.NOBODY, *map(str, argv)], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_mount_as_ordinary_user(modelfs_bin, family, mount_factory):
    if not IS_ROOT:
        pytest.fail("this test switches to user nobody with setpriv: run the suite as root")
    work = _var_tmp_dir("modelfs-user-")
    try:
        store, mp, src = work / "store", work / "mnt", work / "src"
        for d in (store, mp):
            d.mkdir()
            os.chown(d, 65534, 65534)
        copy_model(family.path("gguf-model"), src / "gguf-model")
        copy_model(family.path("onnx-external"), src / "onnx-external")
        subprocess.run(["chmod", "-R", "a+rX", str(src)], check=True)  # onnx writes .data as 0600
        user = Modelfs(modelfs_bin, store, mountlib.NOBODY)
        user.import_(src / "gguf-model", ok=True)
        user.import_(src / "onnx-external", "--name", "org/onnx", ok=True)
        m = mount_factory(user, mountpoint=mp, start=False)
        m.start_daemon()
        for key, orig in (("gguf-model/model.gguf", src / "gguf-model" / "model.gguf"),
                          ("org/onnx/model.onnx.data", src / "onnx-external" / "model.onnx.data")):
            r = _as_nobody("cat", mp / key)
            assert r.returncode == 0, f"nobody cannot read {key} through its own mount: {r.stderr!r}"
            assert r.stdout == orig.read_bytes(), f"{key} read by nobody differs from the original"
        r = _as_nobody("stat", "-c", "%u %a %F", mp / "gguf-model/model.gguf", mp / "org")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split("\n")[:2] == ["65534 444 regular file", "65534 555 directory"], r.stdout
        r = _as_nobody("cat", mp / ".modelfs/stats.json")
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert s["mode"] == "copy", f"an unprivileged daemon cannot use kernel passthrough: {s}"
        assert s["read_bytes"] > 0 and s["copy_opens"] >= 2, s
        m.umount()  # `modelfs umount` as nobody: exit 0, unmounted, daemon gone
    finally:
        mountlib.force_unmount(work / "mnt")
        shutil.rmtree(work, ignore_errors=True)


def test_allow_other(fam_store, mount_factory):
    if not IS_ROOT:
        pytest.fail("this test switches to user nobody with setpriv: run the suite as root")
    work = _var_tmp_dir("modelfs-allow-other-")
    try:
        mp = work / "mnt"
        mp.mkdir()
        m = mount_factory(fam_store.mfs, "--allow-other", mountpoint=mp)
        orig = fam_store.expected.models["org/tiny"]["model.safetensors"]
        r = _as_nobody("cat", m / "org/tiny/model.safetensors")
        assert r.returncode == 0, f"--allow-other: nobody cannot read the root-owned mount: {r.stderr!r}"
        assert r.stdout == orig.read_bytes()
        m.umount()
    finally:
        mountlib.force_unmount(work / "mnt")
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# names, poll, busy unmount


def _small_store(new_store, tmp_path) -> Modelfs:
    d = tmp_path / "src" / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "tiny"}')
    (d / "sub").mkdir()
    (d / "sub" / "vocab.txt").write_text("a\nb\n")
    mfs = new_store()
    mfs.import_(d, ok=True)
    return mfs


def _errno_of(op):
    try:
        r = op()
    except OSError as e:
        return e.errno
    if isinstance(r, int):
        os.close(r)
    return 0


KERNEL_EROFS_FIRST = {"unlink", "rmdir", "rename to", "rename from"}


def test_names_longer_than_255_bytes_are_enametoolong(new_store, mount_factory, tmp_path):
    """What pjdfstest's */02 tests check: a component over NAME_MAX (255 bytes) is
    ENAMETOOLONG for every call that takes a name, not ENOENT or EROFS."""
    m = mount_factory(_small_store(new_store, tmp_path))
    mp = m.mountpoint
    f, d = mp / "m/config.json", mp / "m/sub"
    wrong = []
    for n in (256, 1000):
        for where in (mp, d):
            long = where / ("x" * n)
            ops = [
                ("stat", lambda: os.stat(long)),
                ("lstat", lambda: os.lstat(long)),
                ("open", lambda: os.open(long, os.O_RDONLY)),
                ("open O_CREAT", lambda: os.open(long, os.O_WRONLY | os.O_CREAT, 0o644)),
                ("mkdir", lambda: os.mkdir(long)),
                ("mkfifo", lambda: os.mkfifo(long)),
                ("mknod", lambda: os.mknod(long, 0o644 | stat.S_IFREG)),
                ("unlink", lambda: os.unlink(long)),
                ("rmdir", lambda: os.rmdir(long)),
                ("symlink", lambda: os.symlink("target", long)),
                ("link", lambda: os.link(f, long)),
                ("rename to", lambda: os.rename(f, long)),
                ("rename from", lambda: os.rename(long, d / "y")),
                ("chmod", lambda: os.chmod(long, 0o600)),
                ("chown", lambda: os.chown(long, 0, 0)),
                ("truncate", lambda: os.truncate(long, 0)),
            ]
            for label, op in ops:
                e = _errno_of(op)
                # unlink, rmdir and rename of a read-only mount get EROFS from the kernel
                # before any lookup, as on every read-only filesystem (pjdfstest's
                # unlink/02, rmdir/02 and rename/02 are not in the list that fails).
                if label in KERNEL_EROFS_FIRST and e == errno.EROFS:
                    continue
                if e != errno.ENAMETOOLONG:
                    wrong.append(f"{label} of a {n}-byte name in {where.relative_to(mp.parent)}: "
                                 f"{errno.errorcode.get(e, e)}")
    assert not wrong, "calls that did not fail with ENAMETOOLONG:\n" + "\n".join(wrong)
    # 255 bytes is a valid name: it just does not exist, and the mount is read-only.
    at_max = mp / ("x" * 255)
    assert _errno_of(lambda: os.stat(at_max)) == errno.ENOENT
    assert _errno_of(lambda: os.mkdir(at_max)) == errno.EROFS
    assert os.statvfs(mp).f_namemax == 255


def test_poll_is_answered_quietly(new_store, mount_factory, tmp_path):
    """Event loops and io_uring poll regular files: always ready, and no
    "[Not Implemented] poll" warning in the daemon's log per call."""
    import select  # noqa: PLC0415

    m = mount_factory(_small_store(new_store, tmp_path), "--passthrough", "off", start=False)
    m.start_foreground()
    fd = os.open(m / "m/config.json", os.O_RDONLY)
    try:
        for _ in range(3):
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert p.poll(1000) == [(fd, select.POLLIN)]
        assert os.read(fd, 100).startswith(b'{"model_type"')
    finally:
        os.close(fd)
    m.umount()
    log = m.log_text()
    assert "Not Implemented" not in log, log


def test_umount_of_a_busy_mount_says_why_in_one_line(new_store, mount_factory, tmp_path):
    m = mount_factory(_small_store(new_store, tmp_path))
    mp = m.mountpoint
    fd = os.open(mp / "m/config.json", os.O_RDONLY)
    try:
        cp = m.umount(check=False)
        err = cp.stderr.decode()
        assert cp.returncode != 0, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert f"{mp} is busy: 1 process has files open (fuser -vm {mp} lists them)" in err, err
        assert "--lazy" in err and "fusermount" not in err, err
        assert is_mounted(mp)
    finally:
        os.close(fd)
    m.umount()


def test_mv_while_mounted_shows_new_name(new_store, family, mount_factory, mode):
    mfs = new_store()
    mfs.import_(family.path("gguf-model"), ok=True)
    mfs.import_(family.path("onnx-model"), "--name", "org/onnx", ok=True)
    m = mount_factory(mfs, "--passthrough", mode)
    mp = m.mountpoint
    want = (family.path("onnx-model") / "model.onnx").read_bytes()
    assert (mp / "org/onnx/model.onnx").read_bytes() == want
    # look the new name up first: a cached negative entry must not hide it
    assert not (mp / "org2").exists()
    mfs.run("mv", "org/onnx", "org2/onnx", ok=True)

    def moved():
        try:
            return ((mp / "org2/onnx/model.onnx").is_file() and not (mp / "org").exists()
                    and "org" not in os.listdir(mp))
        except OSError:
            return False

    ok, dt = _poll(moved)
    assert ok, (f"[{mode}] `modelfs mv org/onnx org2/onnx` not shown {dt:.2f}s later "
                f"(contract: within 1 s); root lists {sorted(os.listdir(mp))}")
    assert (mp / "org2/onnx/model.onnx").read_bytes() == want
    assert (mp / "gguf-model/model.gguf").read_bytes()[:4] == b"GGUF"
