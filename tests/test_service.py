"""The service layer: mount helper, fstab, SIGTERM/SIGHUP, configuration file,
Prometheus metrics, `modelfs status`, `modelfs install` and the shipped systemd units.

Mounts are made the way an operator makes them: `mount -t fuse.modelfs STORE MNT -o ...` and
`mount -T FSTAB MNT` (mount(8) runs /sbin/mount.fuse.modelfs, which this module points at the
binary under test for its duration and restores afterwards). The helper detaches its daemon,
so to learn the daemon's exit status every mount(8) call runs under a small "reaper" process
that is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): the orphaned daemon is re-parented
to it and its exit status reported back. Every mount is registered with tests/mountlib.py and
removed in teardown, whatever happens.

Needs root, /dev/fuse, fusermount3 (fuse3), mount/umount and setpriv (util-linux), and
systemd-analyze (Debian package systemd) for the unit checks.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import modelfamily
import mountlib
from conftest import REPO, Modelfs
from mountlib import Mount, is_mounted, mount_entries, proc_mounts, stat_ok, wait_until

IS_ROOT = os.geteuid() == 0
GiB, MiB = 1 << 30, 1 << 20
HELPER_LINK = Path("/sbin/mount.fuse.modelfs")
SYSTEMD_DIR = REPO / "mount-helper" / "systemd"
RELOAD_WITHIN = 5.0  # seconds for a SIGHUP to show in the metrics (polled)
NOBODY = mountlib.NOBODY

# the keys `modelfs status --json` promises
STATUS_KEYS = {"mounted", "mountpoint", "store", "mode", "uptime_seconds", "models", "logical_bytes",
               "stored_bytes", "pinned_bytes", "stats"}

# name -> Prometheus type of every family the endpoint promises
METRIC_TYPES = {
    "modelfs_up": "gauge",
    "modelfs_uptime_seconds": "gauge",
    "modelfs_passthrough_enabled": "gauge",
    "modelfs_read_bytes_total": "counter",
    "modelfs_read_requests_total": "counter",
    "modelfs_opens_total": "counter",
    "modelfs_passthrough_opened_bytes_total": "counter",
    "modelfs_verification_failures_total": "counter",
    "modelfs_catalog_refreshes_total": "counter",
    "modelfs_pin_budget_bytes": "gauge",
    "modelfs_pinned_bytes": "gauge",
    "modelfs_config_reloads_total": "counter",
    "modelfs_read_latency_seconds": "histogram",
    "modelfs_models": "gauge",
    "modelfs_logical_bytes": "gauge",
    "modelfs_stored_bytes": "gauge",
    "modelfs_model_logical_bytes": "gauge",
    "modelfs_model_unique_bytes": "gauge",
    "modelfs_model_shared_bytes": "gauge",
}

QUOTED_NAME = 'org/q"uo\\te'  # a model name that needs escaping in a Prometheus label


# ------------------------------------------------------------------------------------------
# environment checks and fixtures


@pytest.fixture(scope="module", autouse=True)
def _no_mount_left_behind():
    yield
    mountlib.cleanup_all()


@pytest.fixture(scope="module", autouse=True)
def service_prerequisites():
    problems = []
    if not IS_ROOT:
        problems.append("not root (mount(8) with a helper, /sbin/mount.fuse.modelfs, setpriv)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist")
    for tool, pkg in (("fusermount3", "fuse3"), ("mount", "mount"), ("umount", "mount"),
                      ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (Debian package: {pkg})")
    if problems:
        pytest.fail("the service tests need: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    p = shutil.which("systemd-analyze")
    if p is None:
        pytest.fail("systemd-analyze not found: install the Debian package `systemd` "
                    "(apt-get install systemd) to verify the shipped units", pytrace=False)
    return p


@pytest.fixture(scope="module")
def mount_helper(modelfs_bin):
    """/sbin/mount.fuse.modelfs -> the binary under test, for this module only; whatever was
    there before is moved aside and put back."""
    target = str(Path(modelfs_bin).resolve())
    backup = None
    if HELPER_LINK.is_symlink() or HELPER_LINK.exists():
        backup = HELPER_LINK.with_name(f".mount.fuse.modelfs.test-backup-{os.getpid()}")
        os.rename(HELPER_LINK, backup)
    try:
        os.symlink(target, HELPER_LINK)
        yield HELPER_LINK
    finally:
        mountlib.cleanup_all()
        try:
            if HELPER_LINK.is_symlink() and os.readlink(HELPER_LINK) == target:
                HELPER_LINK.unlink()
        finally:
            if backup is not None:
                os.rename(backup, HELPER_LINK)


@pytest.fixture(scope="module")
def direct_helper(modelfs_bin, tmp_path_factory) -> Path:
    """A private `mount.fuse.modelfs` symlink, to run the helper without mount(8)."""
    d = tmp_path_factory.mktemp("helper")
    link = d / "mount.fuse.modelfs"
    os.symlink(Path(modelfs_bin).resolve(), link)
    return link


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory) -> Path:
    """MODELFS_CONFIG for every command: an empty (valid) file, so a /etc/modelfs/config.toml
    on the test machine cannot change what the tests see."""
    p = tmp_path_factory.mktemp("cfg") / "empty.toml"
    p.write_text("")
    return p


def service_env(empty_config: Path, **extra) -> dict:
    e = dict(os.environ)
    for k in ("MODELFS_STORE", "RUST_LOG", "NOTIFY_SOCKET", "JOURNAL_STREAM", "LISTEN_FDS"):
        e.pop(k, None)
    e["MODELFS_CONFIG"] = str(empty_config)
    e["NO_COLOR"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


class SvcStore:
    def __init__(self, mfs: Modelfs, expected: dict, family_root: Path):
        self.mfs = mfs
        self.expected = expected  # model name -> {rel: original path}
        self.family_root = family_root

    def orig(self, key: str) -> Path:
        for name, files in self.expected.items():
            if key.startswith(name + "/") and key[len(name) + 1:] in files:
                return files[key[len(name) + 1:]]
        raise KeyError(key)


def _fill_store(mfs: Modelfs, family_root: Path) -> dict:
    expected = {}
    for key, name in (("base", "base"), ("ft-head", "ft-head"), ("base", QUOTED_NAME)):
        src = family_root / key
        mfs.import_(src, "--name", name, ok=True)
        expected[name] = {rel: src / rel for rel in modelfamily.list_files(src)}
    return expected


@pytest.fixture(scope="module")
def svc_family(tmp_path_factory, required_libs) -> Path:
    root = tmp_path_factory.mktemp("svc-family")
    modelfamily.generate(root, base_mib=4, seed=0, formats="core")
    return root


@pytest.fixture(scope="module")
def svc(modelfs_bin, svc_family, tmp_path_factory) -> SvcStore:
    """A store with base (whole files: passthrough), ft-head (a recipe: copy mode) and base
    again under a name with a quote and a backslash."""
    root = tmp_path_factory.mktemp("svc-store")
    mfs = Modelfs(modelfs_bin, root / "store")
    mfs.run("init", ok=True)
    exp = _fill_store(mfs, svc_family)
    files = mfs.ls_files("ft-head")
    assert files["model.safetensors"]["storage"] == "recipe", files
    assert mfs.ls_files("base")["model.safetensors"]["storage"] == "whole"
    return SvcStore(mfs, exp, svc_family)


@pytest.fixture
def work():
    """A world-traversable scratch directory (so user nobody can reach mounts in it)."""
    d = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="modelfs-svc-"))
    os.chmod(d, 0o755)
    yield d
    prefix = str(d) + "/"
    for _src, mp, _fs, _opts in proc_mounts():
        if mp.startswith(prefix):
            mountlib.force_unmount(mp)
    if any(mp.startswith(prefix) for _s, mp, _f, _o in proc_mounts()):
        pytest.fail(f"could not unmount everything below {d}; not removing it")
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# mounts through mount(8) / the helper, with the daemon's exit status


REAPER = r"""
import ctypes, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    print(json.dumps({"error": "prctl(PR_SET_CHILD_SUBREAPER) failed: errno %d" % ctypes.get_errno()}), flush=True)
    sys.exit(2)
with open(sys.argv[1], "ab") as out:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    rc = p.wait()
print(json.dumps({"mount_rc": rc}), flush=True)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
print(json.dumps({"done": True}), flush=True)
"""


class HelperMount(Mount):
    """A mount made by running `cmd` (mount(8) or the helper itself) under a subreaper.
    Cleanup is mountlib's (modelfs umount, fusermount3 -u -z, umount -l, SIGKILL)."""

    def __init__(self, mfs: Modelfs, mountpoint, env: dict):
        super().__init__(mfs, mountpoint)
        self.helper_env = env
        self.cmd: list[str] = []
        self.rc: int | None = None
        self.reaper: subprocess.Popen | None = None
        self._q: queue.Queue = queue.Queue()
        self.exits: dict[int, int] = {}
        self.reaper_done = False

    def argv(self, *extra):
        return self.cmd

    def _env(self):
        return dict(self.helper_env)

    def _pump(self, stream):
        for line in stream:
            self._q.put(line.decode("utf-8", "replace"))
        self._q.put(None)

    def _msg(self, timeout):
        try:
            line = self._q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return "timeout"
        if line is None:
            return None
        return json.loads(line)

    def run(self, *cmd, timeout=mountlib.STARTUP_TIMEOUT) -> int:
        """Run the mount command; returns its exit status (the daemon, if any, lives on)."""
        self.cmd = [str(c) for c in cmd]
        self.reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(self.log), *self.cmd],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       env=self._env())
        threading.Thread(target=self._pump, args=(self.reaper.stdout,), daemon=True).start()
        msg = self._msg(timeout)
        if msg == "timeout":
            raise AssertionError(self.describe(f"`{' '.join(self.cmd)}` did not return within {timeout}s"))
        assert isinstance(msg, dict) and "mount_rc" in msg, f"reaper: {msg!r}"
        self.rc = msg["mount_rc"]
        self.daemon_pids = mountlib.modelfs_pids(self.mfs.bin, self.mountpoint)
        if not self.daemon_pids:  # mountpoint not on its command line (from the config file)
            said = re.findall(r"\(daemon pid (\d+)\)", self.output)
            self.daemon_pids = [int(p) for p in said[-1:] if mountlib.pid_alive(int(p))]
        return self.rc

    @property
    def output(self) -> str:
        return self.log_text()

    def check_mounted(self, fstype="fuse.modelfs"):
        """Ready means ready: mounted and answering the moment the command returned."""
        assert self.rc == 0, self.describe(f"`{' '.join(self.cmd)}` exited {self.rc}")
        ents = mount_entries(self.mountpoint)
        assert ents, self.describe("the mount command exited 0 but nothing is mounted")
        assert ents[-1][2] == fstype, f"fstype {ents[-1][2]!r}, expected {fstype!r}: {ents}"
        err = stat_ok(self.mountpoint)
        assert err is None, self.describe(f"mountpoint unusable right after the helper returned: {err}")
        assert len(self.daemon_pids) == 1, (
            f"expected one daemon process for {self.mountpoint}, found {self.daemon_pids}")
        return ents[-1]

    @property
    def pid(self) -> int:
        assert self.daemon_pids, "no daemon process"
        return self.daemon_pids[0]

    def wait_daemon_exit(self, timeout=mountlib.EXIT_TIMEOUT) -> dict:
        """{daemon pid: exit status or None if it had not exited within `timeout`}."""
        deadline = time.monotonic() + timeout
        while not self.reaper_done and not all(p in self.exits for p in self.daemon_pids):
            msg = self._msg(deadline - time.monotonic())
            if msg == "timeout":
                break
            if msg is None or "done" in msg:
                self.reaper_done = True
            elif "pid" in msg:
                self.exits[msg["pid"]] = msg["exit"]
        return {p: self.exits.get(p) for p in self.daemon_pids}

    def cleanup(self):
        used = super().cleanup()
        if self.reaper is not None and self.reaper.poll() is None:
            try:
                self.reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
                self.reaper.wait()
        return used


@pytest.fixture
def helper_mounts(svc, empty_config, work):
    """helper_mounts(mountpoint=None, mfs=None, **env) -> HelperMount (cleaned up after the test)."""
    made = []

    def make(mountpoint=None, mfs=None, **env) -> HelperMount:
        if mountpoint is None:
            mountpoint = work / f"mnt{len(made) + 1}"
        Path(mountpoint).mkdir(exist_ok=True)
        m = HelperMount(mfs or svc.mfs, mountpoint, service_env(empty_config, **env))
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()


def umount_and_check_exit(m: HelperMount):
    """`umount MNT` (util-linux): unmounted, mountpoint usable, daemon exited 0."""
    cp = subprocess.run(["umount", str(m.mountpoint)], capture_output=True, timeout=30)
    assert cp.returncode == 0, f"umount {m.mountpoint} exited {cp.returncode}: {cp.stderr!r}"
    assert not is_mounted(m.mountpoint), f"{m.mountpoint} still mounted after umount"
    exits = m.wait_daemon_exit()
    assert exits and all(v == 0 for v in exits.values()), m.describe(
        f"daemon exit status after `umount` (pid: status, None = still running after "
        f"{mountlib.EXIT_TIMEOUT}s): {exits}")
    assert stat_ok(m.mountpoint) is None and os.listdir(m.mountpoint) == []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_nobody(*argv, timeout=60):
    return subprocess.run([*NOBODY, *map(str, argv)], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def size_of_25pct() -> int:
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(kb * 1024 * 25.0 / 100.0)


# ------------------------------------------------------------------------------------------
# Prometheus text format


_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*')
_HIST_SUFFIXES = ("_bucket", "_sum", "_count")


def _unescape_label(v: str) -> str:
    out, i = [], 0
    while i < len(v):
        if v[i] == "\\":
            nxt = v[i + 1]
            if nxt not in '\\"n':
                raise ValueError(f"bad escape \\{nxt} in label value {v!r}")
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(v[i])
            i += 1
    return "".join(out)


class Scrape:
    """A parsed /metrics page (text format 0.0.4), validated while parsing: every sample
    belongs to a family declared by a preceding # TYPE, no series twice, values are floats."""

    def __init__(self, text: str):
        self.text = text
        self.types: dict[str, str] = {}
        self.help: dict[str, str] = {}
        self.samples: dict[str, dict[frozenset, float]] = {}
        for n, line in enumerate(text.split("\n"), 1):
            where = f"line {n}: {line!r}"
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    name = parts[2]
                    assert _NAME_RE.fullmatch(name), f"bad metric name, {where}"
                    if parts[1] == "TYPE":
                        assert name not in self.types, f"second # TYPE for {name}, {where}"
                        assert len(parts) == 4 and parts[3] in (
                            "counter", "gauge", "histogram", "summary", "untyped"), where
                        assert not any(s == name or (s.startswith(name) and s[len(name):] in _HIST_SUFFIXES)
                                       for s in self.samples), f"# TYPE after samples of {name}, {where}"
                        self.types[name] = parts[3]
                    else:
                        self.help[name] = parts[3] if len(parts) == 4 else ""
                continue
            m = _NAME_RE.match(line)
            assert m, f"no metric name, {where}"
            name, rest = m.group(0), line[m.end():]
            labels = {}
            if rest.startswith("{"):
                pos = 1
                while True:
                    while rest[pos:pos + 1] in (" ", "\t"):
                        pos += 1
                    if rest[pos:pos + 1] == "}":
                        pos += 1
                        break
                    lm = _LABEL_RE.match(rest, pos)
                    assert lm, f"bad label set, {where}"
                    k, v = lm.group(1), _unescape_label(lm.group(2))
                    assert k not in labels, f"label {k} twice, {where}"
                    labels[k] = v
                    pos = lm.end()
                    sep = rest[pos:pos + 1]
                    assert sep in (",", "}"), f"label set not closed, {where}"
                    pos += 1
                    if sep == "}":
                        break
                rest = rest[pos:]
            fields = rest.split()
            assert rest[:1] in (" ", "\t") and 1 <= len(fields) <= 2, f"expected ' VALUE [TS]', {where}"
            value = float(fields[0])  # accepts NaN, +Inf, -Inf, exponents
            family = self.family_of(name)
            assert family is not None, f"sample without a # TYPE for its family, {where}"
            key = frozenset(labels.items())
            series = self.samples.setdefault(name, {})
            assert key not in series, f"duplicate series {name}{labels}, {where}"
            series[key] = value

    def family_of(self, sample: str) -> str | None:
        if sample in self.types:
            return sample
        for suf in _HIST_SUFFIXES:
            if sample.endswith(suf) and self.types.get(sample[:-len(suf)]) in ("histogram", "summary"):
                return sample[:-len(suf)]
        return None

    def get(self, name: str, **labels) -> float:
        series = self.samples.get(name, {})
        key = frozenset(labels.items())
        assert key in series, f"no sample {name}{labels} in /metrics; have {sorted(map(dict, series))}"
        return series[key]

    def by_label(self, name: str, label: str) -> dict:
        return {dict(k)[label]: v for k, v in self.samples.get(name, {}).items()}

    def histogram(self, name: str) -> dict:
        assert self.types.get(name) == "histogram", f"{name} is not declared a histogram"
        buckets = []
        for k, v in self.samples.get(name + "_bucket", {}).items():
            d = dict(k)
            assert set(d) == {"le"}, f"{name}_bucket labels {d}"
            buckets.append((float(d["le"]), v))
        buckets.sort()
        assert buckets and buckets[-1][0] == float("inf"), f"{name}: no le=\"+Inf\" bucket: {buckets}"
        for (a, ca), (b, cb) in zip(buckets, buckets[1:]):
            assert cb >= ca, f"{name}: bucket le={b} ({cb}) < le={a} ({ca}); buckets must be cumulative"
        count, total = self.get(name + "_count"), self.get(name + "_sum")
        assert count == buckets[-1][1], f"{name}_count {count} != +Inf bucket {buckets[-1][1]}"
        assert total >= 0
        return {"buckets": buckets, "count": count, "sum": total}


def scrape(addr: str, path="/metrics") -> Scrape:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
        assert r.status == 200
        ctype = r.headers.get("Content-Type", "")
        assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, f"Content-Type {ctype!r}"
        return Scrape(r.read().decode("utf-8"))


def wait_for_metric(addr, pred, timeout=RELOAD_WITHIN) -> Scrape:
    last = [None]

    def ok():
        last[0] = scrape(addr)
        return pred(last[0])

    wait_until(ok, timeout, interval=0.05)
    return last[0]


# ------------------------------------------------------------------------------------------
# configuration: modelfs config check, and errors on the mount path


ALL_VALID = {
    "store": '"/var/lib/modelfs"',
    "mountpoint": '"/models"',
    "pin_budget": '"512MiB"',
    "passthrough": '"off"',
    "threads": "8",
    "read_ahead_kb": "2048",
    "allow_other": "true",
    "metrics": '"127.0.0.1:9477"',
    "shutdown_grace": "1.5",
    "log": '"info,modelfs_fs=debug"',
}


def config_with(bad_line: str, key: str | None) -> tuple[str, int]:
    """Every valid key except `key`, half before and half after `bad_line`; returns the text
    and the (1-based) line number of `bad_line`."""
    others = [f"{k} = {v}" for k, v in ALL_VALID.items() if k != key]
    half = len(others) // 2
    lines = ["# modelfs test configuration", *others[:half], bad_line, *others[half:]]
    return "\n".join(lines) + "\n", half + 2


def test_config_check_accepts_a_valid_file(svc, tmp_path, empty_config):
    text, _ = config_with('pin_budget = "512MiB"', "pin_budget")
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    r = svc.mfs.run("config", "check", cfg, ok=True)
    assert r.stdout.splitlines()[0] == f"{cfg}: ok", r.describe()
    assert f"({512 * MiB} bytes)" in r.stdout, f"pin_budget 512MiB not reported as bytes:\n{r.describe()}"
    # the file given by --config and by MODELFS_CONFIG is the one checked
    r = svc.mfs.run("--config", cfg, "config", "check", ok=True)
    assert r.stdout.startswith(f"{cfg}: ok"), r.describe()
    r = svc.mfs.run("config", "check", ok=True, env={"MODELFS_CONFIG": str(cfg)})
    assert r.stdout.startswith(f"{cfg}: ok"), r.describe()
    # the shipped example
    example = SYSTEMD_DIR / "config.toml"
    r = svc.mfs.run("config", "check", example, ok=True)
    assert r.stdout.startswith(f"{example}: ok"), r.describe()
    # and an empty file is valid (every key is optional)
    svc.mfs.run("config", "check", empty_config, ok=True)


# (id, the bad line, the key that must be named, kind): kind "type"/"syntax" errors must also
# point at the right line, "value" errors must say key `KEY`.
CONFIG_ERRORS = [
    ("unknown-key", 'pin_budgt = "1GiB"', "pin_budgt", "unknown"),
    ("unknown-table", '[mount]', "mount", "unknown-last"),
    ("type-threads", 'threads = "four"', "threads", "type"),
    ("type-threads-float", "threads = 4.5", "threads", "type"),
    ("type-allow_other", 'allow_other = "yes"', "allow_other", "type"),
    ("type-shutdown_grace", 'shutdown_grace = "2s"', "shutdown_grace", "type"),
    ("type-pin_budget", "pin_budget = 1024", "pin_budget", "type"),
    ("type-read_ahead_kb-negative", "read_ahead_kb = -4", "read_ahead_kb", "type"),
    ("type-metrics", "metrics = 9477", "metrics", "type"),
    ("type-store", "store = 5", "store", "type"),
    ("type-passthrough", "passthrough = false", "passthrough", "type"),
    ("type-log", "log = 3", "log", "type"),
    ("type-mountpoint", "mountpoint = []", "mountpoint", "type"),
    ("syntax", "threads = ", "threads", "syntax"),
    ("value-store-relative", 'store = "rel/store"', "store", "value"),
    ("value-mountpoint-relative", 'mountpoint = "models"', "mountpoint", "value"),
    ("value-pin_budget-word", 'pin_budget = "lots"', "pin_budget", "value"),
    ("value-pin_budget-200pct", 'pin_budget = "200%"', "pin_budget", "value"),
    ("value-pin_budget-unit", 'pin_budget = "4 parsecs"', "pin_budget", "value"),
    ("value-pin_budget-negative", 'pin_budget = "-1GiB"', "pin_budget", "value"),
    ("value-passthrough", 'passthrough = "maybe"', "passthrough", "value"),
    ("value-threads-0", "threads = 0", "threads", "value"),
    ("value-threads-65", "threads = 65", "threads", "value"),
    ("value-read_ahead_kb-0", "read_ahead_kb = 0", "read_ahead_kb", "value"),
    ("value-read_ahead_kb-huge", "read_ahead_kb = 2000000", "read_ahead_kb", "value"),
    ("value-metrics-host", 'metrics = "localhost"', "metrics", "value"),
    ("value-metrics-noport", 'metrics = "127.0.0.1"', "metrics", "value"),
    ("value-shutdown_grace-negative", "shutdown_grace = -1", "shutdown_grace", "value"),
    ("value-shutdown_grace-huge", "shutdown_grace = 7200", "shutdown_grace", "value"),
    ("value-shutdown_grace-nan", "shutdown_grace = nan", "shutdown_grace", "value"),
    ("value-log", 'log = "foo=bar=baz"', "log", "value"),
]


@pytest.mark.parametrize("bad,key,kind", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_check_names_the_bad_key(svc, tmp_path, bad, key, kind):
    if kind == "unknown-last":  # a table swallows what follows it: put it last
        others = [f"{k} = {v}" for k, v in ALL_VALID.items()]
        text, line = "\n".join([*others, bad, "threads = 4"]) + "\n", len(others) + 1
    else:
        text, line = config_with(bad, key if kind != "unknown" else None)
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    r = svc.mfs.run("config", "check", cfg, ok=False)
    assert r.returncode == 1, f"expected exit 1:\n{r.describe()}"
    assert ": ok" not in r.stdout, r.describe()
    assert str(cfg) in r.stderr, f"the error should name the file:\n{r.describe()}"
    if kind.startswith("unknown"):
        assert f"unknown field `{key}`" in r.stderr, f"should name the unknown key {key}:\n{r.describe()}"
    elif kind == "value":
        assert f"key `{key}`" in r.stderr, f"should name the key {key}:\n{r.describe()}"
        others = [k for k in ALL_VALID if k != key and f"key `{k}`" in r.stderr]
        assert not others, f"names the valid key(s) {others}:\n{r.describe()}"
    else:  # type / syntax errors: the key, on the right line
        assert key in r.stderr and f"line {line}," in r.stderr, (
            f"should name {key} and point at line {line}:\n{r.describe()}")


def test_config_errors_refuse_to_mount(svc, helper_mounts, work, mount_helper, empty_config):
    bad = work / "bad.toml"
    bad.write_text('pin_budget = "1GiB"\nthreads = 0\n')
    mp = work / "mnt"
    mp.mkdir()
    # modelfs mount with --config / MODELFS_CONFIG
    for args, env in (((f"--config={bad}",), {}), ((), {"MODELFS_CONFIG": str(bad)})):
        r = svc.mfs.run(*args, "mount", mp, "--daemon", ok=False, timeout=60,
                        env=service_env(empty_config, **env))
        assert "key `threads`" in r.stderr, r.describe()
        assert not is_mounted(mp), f"mounted despite an invalid configuration: {r.describe()}"
    # the helper through mount(8), config= option
    m = helper_mounts(mp)
    rc = m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, mp, "-o", f"ro,config={bad}")
    assert rc != 0 and not is_mounted(mp), m.describe("mount -t with an invalid config= file")
    assert "key `threads`" in m.output, m.describe("the error should name the key")


def test_config_file_drives_the_mount_and_flags_win(modelfs_bin, svc, helper_mounts, work):
    """`modelfs --config F mount` with no argument: mountpoint, store and options from the
    file; the same keys given as flags override it."""
    addr = f"127.0.0.1:{free_port()}"
    mp = work / "from-config"
    cfg = work / "config.toml"
    cfg.write_text(f'store = "{svc.mfs.store}"\nmountpoint = "{mp}"\npassthrough = "off"\n'
                   f'pin_budget = "256MiB"\nmetrics = "{addr}"\nthreads = 2\n')
    m = helper_mounts(mp)
    m.run(modelfs_bin, "--config", cfg, "mount", "--daemon")
    m.check_mounted()
    s = scrape(addr)
    assert s.get("modelfs_pin_budget_bytes") == 256 * MiB, "pin_budget from the file"
    assert s.get("modelfs_passthrough_enabled") == 0 and m.stats()["mode"] == "copy", "passthrough from the file"
    _read_check(m, svc, ["ft-head/config.json"])
    umount_and_check_exit(m)

    addr2 = f"127.0.0.1:{free_port()}"
    m = helper_mounts(mp)
    m.run(modelfs_bin, "--config", cfg, "mount", "--daemon", "--passthrough", "auto",
          "--pin-budget", "1GiB", "--metrics", addr2)
    m.check_mounted()
    s = scrape(addr2)
    assert s.get("modelfs_pin_budget_bytes") == GiB, "--pin-budget must override the file"
    assert s.get("modelfs_passthrough_enabled") == 1, "--passthrough auto must override the file"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{addr}/metrics", timeout=2)  # the file's address is not used
    umount_and_check_exit(m)


# ------------------------------------------------------------------------------------------
# the mount helper: mount -t, fstab, umount, SIGTERM


def _read_check(m: Mount, svc: SvcStore, keys):
    for key in keys:
        got = (m.mountpoint / key).read_bytes()
        assert got == svc.orig(key).read_bytes(), f"{key} read through {m.mountpoint} differs"


def test_mount_t_fuse_modelfs_and_umount(svc, helper_mounts, mount_helper):
    port = free_port()
    m = helper_mounts()
    m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint,
          "-o", f"ro,allow_other,pin_budget=1GiB,metrics=127.0.0.1:{port}")
    src, _mp, _fs, opts = m.check_mounted()
    assert os.path.realpath(src) == os.path.realpath(svc.mfs.store), f"source {src!r}"
    assert "ro" in opts.split(","), f"mount options {opts}"
    # options reached the daemon: metrics served at once, with the pin budget given
    s = scrape(f"127.0.0.1:{port}")
    assert s.get("modelfs_pin_budget_bytes") == GiB, "pin_budget=1GiB"
    assert sorted(os.listdir(m.mountpoint)) == [".modelfs", "base", "ft-head", "org"]
    _read_check(m, svc, ["base/model.safetensors", "ft-head/model.safetensors",
                         f"{QUOTED_NAME}/config.json"])
    # allow_other: another user can read the root-owned mount
    key = "ft-head/model.safetensors"
    r = as_nobody("cat", m.mountpoint / key)
    assert r.returncode == 0, f"-o allow_other: user nobody cannot read {key}: {r.stderr!r}"
    assert r.stdout == svc.orig(key).read_bytes()
    umount_and_check_exit(m)


def test_fstab_line_mount_and_umount(svc, helper_mounts, work, mount_helper):
    port = free_port()
    mp = work / "my models"  # fstab escapes the space as \040
    m = helper_mounts(mp)
    fstab = work / "fstab"
    fstab.write_text(
        "# a temporary fstab for modelfs\n"
        "tmpfs /var/tmp/modelfs-not-used tmpfs noauto 0 0\n"
        f"{svc.mfs.store} {str(mp).replace(' ', chr(92) + '040')} fuse.modelfs "
        "defaults,allow_other,_netdev,nofail,x-systemd.requires=network-online.target,"
        f"pin_budget=512MiB,passthrough=off,metrics=127.0.0.1:{port} 0 0\n")
    m.run("mount", "-T", fstab, mp)
    m.check_mounted()
    s = scrape(f"127.0.0.1:{port}")
    assert s.get("modelfs_pin_budget_bytes") == 512 * MiB, "pin_budget=512MiB from the fstab line"
    assert s.get("modelfs_passthrough_enabled") == 0, "passthrough=off from the fstab line"
    assert m.stats()["mode"] == "copy", m.stats()
    _read_check(m, svc, ["base/model.safetensors", "ft-head/config.json"])
    after = scrape(f"127.0.0.1:{port}")
    assert after.get("modelfs_opens_total", mode="passthrough") == 0
    assert after.get("modelfs_opens_total", mode="copy") >= 2
    r = as_nobody("cat", mp / "base/config.json")
    assert r.returncode == 0, f"allow_other in fstab: nobody cannot read: {r.stderr!r}"
    umount_and_check_exit(m)


def test_sigterm_under_read_load_through_fstab(svc, helper_mounts, work, mount_helper):
    mp = work / "models"
    m = helper_mounts(mp)
    fstab = work / "fstab"
    fstab.write_text(f"{svc.mfs.store} {mp} fuse.modelfs defaults,allow_other,_netdev,shutdown_grace=1 0 0\n")
    m.run("mount", "-T", fstab, mp)
    m.check_mounted()
    keys = ["ft-head/model.safetensors", "base/model.safetensors", f"{QUOTED_NAME}/model.safetensors",
            "ft-head/tokenizer.json"]
    readers = mountlib.LoadReaders([(str(mp / k), str(svc.orig(k))) for k in keys], seed=500)
    readers.start()
    t_sig = time.monotonic()
    os.kill(m.pid, signal.SIGTERM)
    # no new opens: the mount is detached at once (the path lookup no longer reaches it)
    detached = wait_until(lambda: not is_mounted(mp), 2.0)
    new_open = None
    if detached:
        try:
            open(mp / "base/config.json", "rb").close()
            new_open = "succeeded"
        except OSError as e:
            new_open = repr(e)
    exits = m.wait_daemon_exit()
    hung = readers.finish()
    assert exits.get(m.pid) == 0, m.describe(
        f"daemon exit status after SIGTERM under load: {exits} (None: still running after "
        f"{mountlib.EXIT_TIMEOUT}s)")
    assert detached, "the mount was not detached within 2 s of SIGTERM"
    assert new_open != "succeeded", "a new open through the mountpoint succeeded after SIGTERM"
    assert not readers.mismatches, readers.mismatches
    early = [msg for t, msg in readers.errors if t < t_sig]
    assert not early, f"read errors before the signal: {early}"
    assert max(readers.progress_at) > t_sig, (
        "no read completed after SIGTERM: files already open should be served during shutdown_grace")
    assert not is_mounted(mp), m.describe("still in /proc/mounts after SIGTERM")
    err = stat_ok(mp)
    assert err is None, f"stale mountpoint after SIGTERM: {err}"
    assert os.listdir(mp) == []
    assert not hung, f"reader threads stuck in the dead mount: {hung}"


# (id, -o options or extra argv, what the error must name)
HELPER_ERRORS = [
    ("unknown-option", ["-o", "ro,pin_budgte=1GiB"], ["pin_budgte"]),
    ("unknown-bare-option", ["-o", "defaults,bogus"], ["bogus"]),
    ("option-without-value", ["-o", "pin_budget"], ["pin_budget"]),
    ("log_file-without-value", ["-o", "log_file"], ["log_file"]),
    ("threads-not-a-number", ["-o", "threads=abc"], ["threads"]),
    ("passthrough-bad", ["-o", "passthrough=maybe"], ["passthrough"]),
    ("pin_budget-bad", ["-o", "pin_budget=lots"], ["pin_budget", "pin-budget"]),
    ("metrics-bad", ["-o", "metrics=localhost"], ["metrics"]),
    ("config-missing-file", ["-o", "config=/nonexistent/modelfs.toml"], ["/nonexistent/modelfs.toml"]),
    ("unknown-flag", ["-x"], ["-x"]),
    ("o-without-argument", ["-o"], ["-o"]),
]


@pytest.mark.parametrize("extra,names", [c[1:] for c in HELPER_ERRORS], ids=[c[0] for c in HELPER_ERRORS])
def test_helper_option_errors(svc, helper_mounts, direct_helper, extra, names):
    m = helper_mounts()
    rc = m.run(direct_helper, svc.mfs.store, m.mountpoint, *extra)
    mounted = is_mounted(m.mountpoint)
    assert rc != 0 and not mounted, m.describe(f"mount.fuse.modelfs {' '.join(extra)}: exit {rc}, mounted {mounted}")
    assert any(n in m.output for n in names), m.describe(f"the error should name {names[0]}")
    assert not mountlib.modelfs_pids(svc.mfs.bin, m.mountpoint), "a daemon was left running"


def test_helper_argument_and_path_errors(svc, helper_mounts, direct_helper, mount_helper, work):
    # wrong number of positional arguments
    m = helper_mounts()
    assert m.run(direct_helper, svc.mfs.store) != 0
    assert "STORE MOUNTPOINT" in m.output, m.describe()
    # a store that does not exist: the helper fails with the reason (through mount(8) too)
    m = helper_mounts()
    rc = m.run("mount", "-t", "fuse.modelfs", work / "no-store", m.mountpoint)
    assert rc != 0 and not is_mounted(m.mountpoint), m.describe()
    assert str(work / "no-store") in m.output, m.describe("the error should name the store")
    # a mountpoint that does not exist
    m = helper_mounts()
    missing = work / "no-such-mountpoint"
    rc = m.run(direct_helper, svc.mfs.store, missing)
    assert rc != 0 and not missing.exists(), m.describe()
    assert str(missing) in m.output, m.describe("the error should name the mountpoint")
    # an unknown option through mount(8)
    m = helper_mounts()
    rc = m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint, "-o", "ro,bogus_option=1")
    assert rc != 0 and not is_mounted(m.mountpoint), m.describe()
    assert "bogus_option" in m.output, m.describe()


# Values the configuration file refuses (see CONFIG_ERRORS) must not be accepted as mount
# options either ("every setting also a flag"): same key, same rule.
HELPER_VALUE_ERRORS = [
    ("threads=0", "threads"),
    ("threads=65", "threads"),
    ("read_ahead_kb=0", "read_ahead_kb"),
    ("shutdown_grace=-1", "shutdown_grace"),
    ("shutdown_grace=7200", "shutdown_grace"),
    ("allow_other=0", "allow_other"),
]


@pytest.mark.parametrize("opt,key", HELPER_VALUE_ERRORS, ids=[c[0] for c in HELPER_VALUE_ERRORS])
def test_helper_option_values_are_validated_like_the_config(svc, helper_mounts, direct_helper, opt, key):
    m = helper_mounts()
    rc = m.run(direct_helper, svc.mfs.store, m.mountpoint, "-o", opt)
    mounted = is_mounted(m.mountpoint)
    output = m.output
    m.cleanup()
    assert rc != 0 and not mounted, (
        f"`mount.fuse.modelfs STORE MNT -o {opt}` exited {rc} and mounted={mounted}; the same value "
        f"in the configuration file is refused (`{key} = ...`)\n{output}")
    assert key in output or key.replace("_", "-") in output, f"the error should name {key}:\n{output}"


# ------------------------------------------------------------------------------------------
# SIGHUP


def _log_count(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


def test_sighup_reloads_the_config(svc, helper_mounts, work, mount_helper):
    addr = f"127.0.0.1:{free_port()}"
    cfg, log = work / "config.toml", work / "daemon.log"
    cfg.write_text('pin_budget = "512MiB"\nlog = "warn"\n')
    m = helper_mounts()
    m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint,
          "-o", f"config={cfg},metrics={addr},log_file={log}")
    m.check_mounted()
    pid = m.pid
    s = scrape(addr)
    assert s.get("modelfs_pin_budget_bytes") == 512 * MiB
    assert s.get("modelfs_config_reloads_total") == 0

    # 1. a valid change: pin budget and log filter take effect, without unmounting
    cfg.write_text('pin_budget = "1GiB"\nlog = "info"\n')
    os.kill(pid, signal.SIGHUP)
    s = wait_for_metric(addr, lambda s: s.get("modelfs_config_reloads_total") >= 1)
    assert s.get("modelfs_config_reloads_total") == 1, "one SIGHUP, one reload"
    assert s.get("modelfs_pin_budget_bytes") == GiB, "pin_budget after SIGHUP"
    assert wait_until(lambda: _log_count(log, "configuration reloaded") == 1, 2.0), (
        f"log = \"info\" after SIGHUP: no info line about the reload in {log}:\n{log.read_text()}")

    # 2. invalid files are refused, the old configuration kept, the mount keeps serving
    for i, (text, key) in enumerate([('pin_budgt = "2GiB"\nlog = "info"\n', "pin_budgt"),
                                     ('pin_budget = "2GiB"\nthreads = 0\n', "threads")]):
        cfg.write_text(text)
        os.kill(pid, signal.SIGHUP)
        assert wait_until(lambda: _log_count(log, "not reloaded") == i + 1, RELOAD_WITHIN), (
            f"no warning about the refused configuration in the log:\n{log.read_text()}")
        text_log = log.read_text()
        assert key in text_log.rsplit("not reloaded", 1)[1], f"the warning should name {key}:\n{text_log}"
        s = scrape(addr)
        assert s.get("modelfs_config_reloads_total") == 1, f"invalid config ({key}) counted as a reload"
        assert s.get("modelfs_pin_budget_bytes") == GiB, f"invalid config ({key}) changed the pin budget"
        assert is_mounted(m.mountpoint) and mountlib.pid_alive(pid)
        _read_check(m, svc, ["ft-head/config.json", "base/model.safetensors"])

    # 3. valid again, back to log = "warn": counted, applied, and the info line is now filtered
    cfg.write_text('pin_budget = "3GiB"\nlog = "warn"\n')
    os.kill(pid, signal.SIGHUP)
    s = wait_for_metric(addr, lambda s: s.get("modelfs_config_reloads_total") >= 2)
    assert s.get("modelfs_config_reloads_total") == 2
    assert s.get("modelfs_pin_budget_bytes") == 3 * GiB
    cfg.write_text("bogus_key = 1\n")  # a warning, logged after everything the reload above logs
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: _log_count(log, "not reloaded") == 3, RELOAD_WITHIN), log.read_text()
    assert _log_count(log, "configuration reloaded") == 1, (
        f"log = \"warn\" after SIGHUP, yet info lines are still written:\n{log.read_text()}")
    assert m.daemon_pids == mountlib.modelfs_pids(svc.mfs.bin, m.mountpoint) == [pid], "daemon restarted?"
    umount_and_check_exit(m)


def test_sighup_keeps_flags_over_the_file(svc, helper_mounts, work, mount_helper):
    """Flags override the file, also after a reload: -o pin_budget=1GiB wins over the file's
    pin_budget, before and after SIGHUP."""
    addr = f"127.0.0.1:{free_port()}"
    cfg = work / "config.toml"
    cfg.write_text('pin_budget = "512MiB"\n')
    m = helper_mounts()
    m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint,
          "-o", f"config={cfg},pin_budget=1GiB,metrics={addr}")
    m.check_mounted()
    assert scrape(addr).get("modelfs_pin_budget_bytes") == GiB, "the flag must win over the file"
    os.kill(m.pid, signal.SIGHUP)
    s = wait_for_metric(addr, lambda s: s.get("modelfs_config_reloads_total") >= 1)
    assert s.get("modelfs_config_reloads_total") == 1
    assert s.get("modelfs_pin_budget_bytes") == GiB, (
        f"after SIGHUP the pin budget is {s.get('modelfs_pin_budget_bytes'):.0f} (the file's 512MiB), "
        f"but pin_budget=1GiB was given as a mount option, which overrides the file")
    umount_and_check_exit(m)


# ------------------------------------------------------------------------------------------
# metrics


def _check_usage(s: Scrape, du: dict, where: str):
    assert s.get("modelfs_models") == len(du["models"]), where
    assert s.get("modelfs_logical_bytes") == du["logical_bytes"], where
    assert s.get("modelfs_stored_bytes") == du["stored_bytes"], where
    for metric, field in (("modelfs_model_logical_bytes", "logical_bytes"),
                          ("modelfs_model_unique_bytes", "unique_bytes"),
                          ("modelfs_model_shared_bytes", "shared_bytes")):
        got = s.by_label(metric, "model")
        want = {m["name"]: m[field] for m in du["models"]}
        assert got == want, f"{where}: {metric} {got} != `modelfs du --json` {want}"


STATS_TO_METRICS = {
    "read_bytes": ("modelfs_read_bytes_total", {"mode": "copy"}),
    "read_requests": ("modelfs_read_requests_total", {}),
    "copy_opens": ("modelfs_opens_total", {"mode": "copy"}),
    "passthrough_opens": ("modelfs_opens_total", {"mode": "passthrough"}),
    "passthrough_opened_bytes": ("modelfs_passthrough_opened_bytes_total", {}),
    "eio": ("modelfs_verification_failures_total", {}),
    "refreshes": ("modelfs_catalog_refreshes_total", {}),
}


def test_metrics_endpoint(modelfs_bin, svc, helper_mounts, work, mount_helper):
    mfs = Modelfs(modelfs_bin, work / "store")  # this test imports while mounted: its own store
    mfs.run("init", ok=True)
    _fill_store(mfs, svc.family_root)
    addr = f"127.0.0.1:{free_port()}"
    m = helper_mounts(mfs=mfs)
    m.run("mount", "-t", "fuse.modelfs", mfs.store, m.mountpoint, "-o", f"ro,metrics={addr}")
    m.check_mounted()

    # other paths are not the metrics
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{addr}/", timeout=10)
    assert e.value.code == 404

    s0 = scrape(addr)
    for name, kind in METRIC_TYPES.items():
        assert s0.types.get(name) == kind, f"{name}: # TYPE {s0.types.get(name)!r}, expected {kind}"
        assert s0.help.get(name), f"{name} has no # HELP"
    assert s0.get("modelfs_up") == 1
    assert s0.get("modelfs_uptime_seconds") > 0
    assert s0.get("modelfs_pin_budget_bytes") == size_of_25pct(), "default pin budget is 25% of RAM"
    assert s0.get("modelfs_pinned_bytes") >= 0
    assert s0.get("modelfs_config_reloads_total") == 0
    assert s0.get("modelfs_passthrough_enabled") == 1, "root, passthrough auto: kernel passthrough"
    _check_usage(s0, mfs.du(), "at mount")
    assert QUOTED_NAME in s0.by_label("modelfs_model_logical_bytes", "model"), "label escaping"
    h0 = s0.histogram("modelfs_read_latency_seconds")
    for series in ("modelfs_read_bytes_total", "modelfs_opens_total"):
        for k in s0.samples[series]:
            assert set(dict(k)) == {"mode"}, f"{series} labels {dict(k)}"

    # a recipe file: copy mode, the daemon serves (and times) every read
    key = "ft-head/model.safetensors"
    want = svc.orig(key).read_bytes()
    assert (m.mountpoint / key).read_bytes() == want
    s1 = scrape(addr)
    d = lambda name, s_new, s_old, **lb: s_new.get(name, **lb) - s_old.get(name, **lb)  # noqa: E731
    assert d("modelfs_read_bytes_total", s1, s0, mode="copy") >= len(want), "copy-mode bytes served"
    reqs = d("modelfs_read_requests_total", s1, s0)
    assert reqs >= 1
    h1 = s1.histogram("modelfs_read_latency_seconds")
    assert h1["count"] - h0["count"] == reqs, (
        f"latency histogram counted {h1['count'] - h0['count']} reads, read_requests_total {reqs}")
    assert h1["sum"] > h0["sum"], "latency sum did not grow"
    assert d("modelfs_opens_total", s1, s0, mode="copy") >= 1
    assert d("modelfs_opens_total", s1, s0, mode="passthrough") == 0
    assert s1.get("modelfs_uptime_seconds") > s0.get("modelfs_uptime_seconds")

    # a whole-file object: passthrough, the daemon sees the open, not the reads
    key = "base/model.safetensors"
    want = svc.orig(key).read_bytes()
    assert (m.mountpoint / key).read_bytes() == want
    s2 = scrape(addr)
    assert d("modelfs_opens_total", s2, s1, mode="passthrough") >= 1
    pt_bytes, pt_size = d("modelfs_passthrough_opened_bytes_total", s2, s1), len(want)  # checked last
    assert d("modelfs_read_bytes_total", s2, s1, mode="copy") == 0
    assert s2.get("modelfs_verification_failures_total") == 0

    # the same counters as .modelfs/stats.json (which does not count itself)
    stats = m.stats()
    for field, (metric, labels) in STATS_TO_METRICS.items():
        assert s2.get(metric, **labels) == stats[field], (
            f"{metric}{labels} = {s2.get(metric, **labels)}, stats.json {field} = {stats[field]}")

    # an import while mounted: the catalog refresh and the new model show up
    mfs.import_(svc.family_root / "ft-last", ok=True)
    s3 = wait_for_metric(addr, lambda s: s.get("modelfs_models") == 4 and
                         s.get("modelfs_catalog_refreshes_total") >= 1, 3.0)
    assert s3.get("modelfs_catalog_refreshes_total") >= 1, "import while mounted: no catalog refresh"
    _check_usage(s3, mfs.du(), "after importing ft-last")
    umount_and_check_exit(m)
    assert pt_bytes >= pt_size, (
        f"modelfs_passthrough_opened_bytes_total grew by {pt_bytes:.0f} when a {pt_size}-byte file was "
        f"opened by passthrough")


# ------------------------------------------------------------------------------------------
# status


def _status(modelfs_bin, env, *args):
    cp = subprocess.run([str(modelfs_bin), *map(str, args)], capture_output=True, timeout=60, env=env,
                        stdin=subprocess.DEVNULL)
    return cp.returncode, cp.stdout.decode(), cp.stderr.decode()


def test_status(modelfs_bin, svc, helper_mounts, work, mount_helper, empty_config):
    m = helper_mounts()
    m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint, "-o", "ro")
    m.check_mounted()
    env = service_env(empty_config)
    du = svc.mfs.du()
    rc, out, err = _status(modelfs_bin, env, "--store", svc.mfs.store, "status", m.mountpoint, "--json")
    assert rc == 0, f"status of a mounted store exited {rc}: {err}"
    st = json.loads(out)
    assert STATUS_KEYS <= set(st), f"status --json lacks {STATUS_KEYS - set(st)}: {st}"
    assert st["mounted"] is True and st["mountpoint"] == str(m.mountpoint)
    assert os.path.realpath(st["store"]) == os.path.realpath(svc.mfs.store)
    assert st["mode"] == "passthrough" == m.stats()["mode"], st
    assert isinstance(st["uptime_seconds"], (int, float)) and st["uptime_seconds"] > 0
    assert st["models"] == len(du["models"]) == 3
    assert st["logical_bytes"] == du["logical_bytes"] and st["stored_bytes"] == du["stored_bytes"]
    assert isinstance(st["pinned_bytes"], int) and st["pinned_bytes"] >= 0
    assert isinstance(st["stats"], dict) and "read_requests" in st["stats"], st
    # uptime moves
    time.sleep(0.05)
    rc, out, _ = _status(modelfs_bin, env, "--store", svc.mfs.store, "status", m.mountpoint, "--json")
    assert json.loads(out)["uptime_seconds"] > st["uptime_seconds"]
    # text
    rc, out, err = _status(modelfs_bin, env, "--store", svc.mfs.store, "status", m.mountpoint)
    assert rc == 0 and f"mounted at {m.mountpoint}" in out and "passthrough" in out, out + err
    # the mountpoint and store from the configuration
    cfg = work / "config.toml"
    cfg.write_text(f'store = "{svc.mfs.store}"\nmountpoint = "{m.mountpoint}"\n')
    rc, out, err = _status(modelfs_bin, service_env(empty_config, MODELFS_CONFIG=cfg), "status", "--json")
    assert rc == 0, err
    st = json.loads(out)
    assert st["mounted"] is True and st["mountpoint"] == str(m.mountpoint) and st["models"] == 3, st

    umount_and_check_exit(m)
    rc, out, err = _status(modelfs_bin, env, "--store", svc.mfs.store, "status", m.mountpoint, "--json")
    assert rc == 3, f"status of an unmounted mountpoint exited {rc} (expected 3): {out}{err}"
    st = json.loads(out)
    assert st["mounted"] is False and st["mode"] is None and st["models"] == 3, st
    rc, out, _ = _status(modelfs_bin, env, "--store", svc.mfs.store, "status", m.mountpoint)
    assert rc == 3 and "not mounted" in out, out
    # something else mounted there is not a modelfs mount
    rc, out, _ = _status(modelfs_bin, env, "--store", svc.mfs.store, "status", "/proc", "--json")
    assert rc == 3 and json.loads(out)["mounted"] is False, out


def test_status_reports_the_mounted_store(modelfs_bin, svc, helper_mounts, mount_helper, empty_config):
    """`modelfs status MNT` without --store: the store is the one mounted there (not the
    default /var/lib/modelfs), and models/bytes are that store's."""
    m = helper_mounts()
    m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint)
    m.check_mounted()
    rc, out, err = _status(modelfs_bin, service_env(empty_config), "status", m.mountpoint, "--json")
    assert rc == 0, err
    st = json.loads(out)
    du = svc.mfs.du()
    assert os.path.realpath(str(st["store"])) == os.path.realpath(svc.mfs.store), (
        f"status of a mount of {svc.mfs.store} reports store {st['store']!r}: {st}")
    assert st["models"] == len(du["models"]) and st["logical_bytes"] == du["logical_bytes"], st


def test_commands_find_the_mount_of_the_store(modelfs_bin, svc, helper_mounts, mount_helper, empty_config,
                                              tmp_path):
    """status, stats and warm find the store's mount in the kernel's mount table when no
    mount point is given or configured; a named directory that is not a modelfs mount is
    refused by warm (it would otherwise quietly warm from the store)."""
    m = helper_mounts()
    m.run("mount", "-t", "fuse.modelfs", svc.mfs.store, m.mountpoint)
    m.check_mounted()
    env = service_env(empty_config)
    store = ("--store", svc.mfs.store)
    rc, out, err = _status(modelfs_bin, env, *store, "status", "--json")
    assert rc == 0, f"status without a mount point did not find the mount: {out}{err}"
    st = json.loads(out)
    assert st["mounted"] is True and st["mountpoint"] == str(m.mountpoint), st
    rc, out, err = _status(modelfs_bin, env, *store, "stats", "--json")
    assert rc == 0 and "read_requests" in json.loads(out), out + err
    name = svc.mfs.du()["models"][0]["name"]
    rc, out, err = _status(modelfs_bin, env, *store, "warm", name, "--json")
    assert rc == 0 and json.loads(out)["through_mount"] is True, out + err
    not_a_mount = tmp_path / "not-a-mount"
    not_a_mount.mkdir()
    rc, out, err = _status(modelfs_bin, env, *store, "warm", name, "--mountpoint", not_a_mount)
    assert rc != 0 and "is not a modelfs mount" in err and str(m.mountpoint) in err, (rc, out, err)
    umount_and_check_exit(m)
    rc, out, err = _status(modelfs_bin, env, *store, "stats")
    assert rc == 3 and f"the store {svc.mfs.store} is not mounted" in err, (rc, out, err)


def test_daemon_log_file_has_the_startup_and_the_terminal_only_warnings(modelfs_bin, svc, work,
                                                                       empty_config):
    """`--daemon --log-file F` with `log = "info"` configured: F holds the startup lines
    (the mount line at info level), the terminal of the start gets none of them."""
    cfg, log = work / "log-config.toml", work / "startup.log"
    cfg.write_text('log = "info"\n')
    mp = work / "log-mnt"
    mp.mkdir(exist_ok=True)
    env = service_env(empty_config, MODELFS_CONFIG=cfg)
    try:
        cp = subprocess.run([str(modelfs_bin), "--store", str(svc.mfs.store), "mount", str(mp),
                             "--daemon", "--log-file", str(log)], capture_output=True, text=True,
                            timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, cp.stderr
        assert " INFO " not in cp.stdout + cp.stderr, f"INFO lines on the terminal:\n{cp.stderr}"
        assert wait_until(lambda: _log_count(log, "mounted") >= 1, 5.0), \
            f"the startup line is not in the log file:\n{log.read_text() if log.exists() else ''}"
        mountlib.force_unmount(mp)
        # without a log file, the configured level does not reach the terminal either
        cp = subprocess.run([str(modelfs_bin), "--store", str(svc.mfs.store), "mount", str(mp),
                             "--daemon"], capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
        assert cp.returncode == 0 and " INFO " not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
    finally:
        mountlib.force_unmount(mp)


def test_metrics_address_that_cannot_be_bound_fails_the_start(modelfs_bin, svc, work, empty_config):
    import socket as _socket

    taken = _socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    addr = f"127.0.0.1:{taken.getsockname()[1]}"
    mp = work / "metrics-mnt"
    mp.mkdir(exist_ok=True)
    try:
        for daemon in ([], ["--daemon"]):
            cp = subprocess.run([str(modelfs_bin), "--store", str(svc.mfs.store), "mount", str(mp),
                                 "--metrics", addr, *daemon], capture_output=True, text=True,
                                timeout=60, env=service_env(empty_config), stdin=subprocess.DEVNULL)
            assert cp.returncode != 0, f"mount with a taken metrics address started: {cp.stdout}"
            assert f"cannot serve metrics at {addr}" in cp.stderr, cp.stderr
            assert not is_mounted(mp), "mounted although the metrics endpoint could not serve"
    finally:
        taken.close()
        mountlib.force_unmount(mp)


# ------------------------------------------------------------------------------------------
# modelfs install, the shipped units


def _install(mfs: Modelfs, root: Path, *extra):
    return mfs.run("install", "--root", root, *extra, ok=True)


def test_install_staging(svc, modelfs_bin, tmp_path):
    stage = tmp_path / "stage"
    _install(svc.mfs, stage)
    binp = stage / "usr/local/bin/modelfs"
    assert binp.is_file() and (binp.stat().st_mode & 0o777) == 0o755
    assert binp.read_bytes() == Path(modelfs_bin).read_bytes(), "installed binary differs from the one running"
    link = stage / "sbin/mount.fuse.modelfs"
    assert link.is_symlink() and os.readlink(link) == "/usr/local/bin/modelfs", (
        f"{link} -> {os.readlink(link) if link.is_symlink() else 'not a symlink'}")
    cfg = stage / "etc/modelfs/config.toml"
    assert cfg.read_text() == (SYSTEMD_DIR / "config.toml").read_text()
    r = svc.mfs.run("config", "check", cfg, ok=True)
    assert r.stdout.startswith(f"{cfg}: ok")
    unit = (stage / "etc/systemd/system/modelfs.service").read_text()
    assert unit == (SYSTEMD_DIR / "modelfs.service").read_text()  # prefix /usr/local: unchanged
    doc = stage / "usr/local/share/doc/modelfs/models.mount"
    assert doc.read_text() == (SYSTEMD_DIR / "models.mount").read_text()
    # the staged binary runs
    cp = subprocess.run([str(binp), "--version"], capture_output=True, timeout=30)
    assert cp.returncode == 0 and b"modelfs" in cp.stdout, cp

    # again over an edited configuration and a damaged binary: config kept, binary replaced
    cfg.write_text('# edited by the operator\nthreads = 2\n')
    binp.write_bytes(b"not a binary")
    r = _install(svc.mfs, stage)
    assert cfg.read_text() == '# edited by the operator\nthreads = 2\n', "install overwrote an existing config"
    assert "kept" in r.stdout and str(cfg) in r.stdout, r.describe()
    assert binp.read_bytes() == Path(modelfs_bin).read_bytes()
    assert os.readlink(link) == "/usr/local/bin/modelfs"
    leftovers = [p for p in stage.rglob("*") if "modelfs-new" in p.name]
    assert not leftovers, f"temporary files left: {leftovers}"

    # another prefix: ExecStart, the helper link and the doc follow it
    stage2 = tmp_path / "stage2"
    _install(svc.mfs, stage2, "--prefix", "/opt/modelfs")
    assert (stage2 / "opt/modelfs/bin/modelfs").is_file()
    assert not (stage2 / "usr/local/bin/modelfs").exists()
    assert os.readlink(stage2 / "sbin/mount.fuse.modelfs") == "/opt/modelfs/bin/modelfs"
    unit2 = (stage2 / "etc/systemd/system/modelfs.service").read_text()
    execs = [ln for ln in unit2.splitlines() if ln.startswith("ExecStart=")]
    assert execs == ["ExecStart=/opt/modelfs/bin/modelfs --config /etc/modelfs/config.toml mount"], execs
    assert "/usr/local/bin" not in unit2
    assert (stage2 / "opt/modelfs/share/doc/modelfs/models.mount").is_file()


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """[(section, key, value)] of a systemd unit file (comments and blanks skipped)."""
    out, section = [], None
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        k, _, v = s.partition("=")
        out.append((section, k.strip(), v.strip()))
    return out


def _one(settings, section, key):
    vals = [v for s, k, v in settings if s == section and k == key]
    assert len(vals) == 1, f"[{section}] {key}: {vals}"
    return vals[0]


@pytest.fixture
def units_for_verify(svc, tmp_path):
    """The staged units in a directory of their own, ExecStart pointing at the staged binary
    (verify needs it to exist), models.mount under its Where=-derived name."""
    stage = tmp_path / "stage"
    _install(svc.mfs, stage)
    d = tmp_path / "units"
    d.mkdir()
    binp = stage / "usr/local/bin/modelfs"
    unit = (stage / "etc/systemd/system/modelfs.service").read_text()
    (d / "modelfs.service").write_text(unit.replace("/usr/local/bin/modelfs", str(binp)))
    mount_unit = (stage / "usr/local/share/doc/modelfs/models.mount").read_text()
    (d / "models.mount").write_text(mount_unit)
    return d


def _verify(systemd_analyze, *args, timeout=120):
    cp = subprocess.run([systemd_analyze, "verify", *map(str, args)], capture_output=True, timeout=timeout,
                        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"})
    return cp.returncode, (cp.stdout + cp.stderr).decode(errors="replace")


def _about(output: str, names) -> list[str]:
    return [ln for ln in output.splitlines() if any(n in ln for n in names)]


def test_systemd_units_verify(systemd_analyze, units_for_verify, tmp_path):
    d = units_for_verify
    # control: verify does read our files and reports problems in them
    ctl = tmp_path / "control"
    ctl.mkdir()
    (ctl / "modelfs-control.service").write_text(
        (d / "modelfs.service").read_text().replace("[Service]", "[Service]\nBogusKey=1"))
    _rc, out = _verify(systemd_analyze, "--man=no", ctl / "modelfs-control.service")
    assert _about(out, ["BogusKey"]), f"systemd-analyze verify did not report a bogus key (control):\n{out}"

    rc, out = _verify(systemd_analyze, "--man=no", d / "modelfs.service", d / "models.mount")
    bad = _about(out, ["modelfs.service", "models.mount", str(d)])
    assert not bad, "systemd-analyze verify on the shipped units:\n" + "\n".join(bad)


def test_systemd_units_verify_with_documentation_check(systemd_analyze, units_for_verify):
    """Plain `systemd-analyze verify` also checks that man: pages in Documentation= exist."""
    d = units_for_verify
    _rc, out = _verify(systemd_analyze, d / "modelfs.service", d / "models.mount")
    bad = _about(out, ["modelfs.service", "models.mount", str(d)])
    assert not bad, "`systemd-analyze verify` (default checks) on the shipped units:\n" + "\n".join(bad)


def test_shipped_units_say_what_the_service_needs():
    svc_unit = unit_settings((SYSTEMD_DIR / "modelfs.service").read_text())
    assert _one(svc_unit, "Service", "Type") == "notify"
    assert _one(svc_unit, "Service", "Restart") == "on-failure"
    memlock = _one(svc_unit, "Service", "LimitMEMLOCK")
    assert memlock == "infinity" or memlock.rstrip("KMGTkmgt").isdigit(), memlock
    exec_start = shlex.split(_one(svc_unit, "Service", "ExecStart"))
    assert "mount" in exec_start, exec_start
    assert "--daemon" not in exec_start, "Type=notify needs the foreground process"
    assert "-HUP" in _one(svc_unit, "Service", "ExecReload")
    for key in ("ProtectSystem", "PrivateTmp"):
        assert _one(svc_unit, "Service", key), key
    assert any(k == "DeviceAllow" and v.startswith("/dev/fuse") for _s, k, v in svc_unit)
    assert _one(svc_unit, "Install", "WantedBy")

    mnt = unit_settings((SYSTEMD_DIR / "models.mount").read_text())
    where = _one(mnt, "Mount", "Where")
    esc = subprocess.run(["systemd-escape", "--path", "--suffix=mount", where], capture_output=True,
                         text=True) if shutil.which("systemd-escape") else None
    name = esc.stdout.strip() if esc and esc.returncode == 0 else where.strip("/").replace("/", "-") + ".mount"
    assert name == "models.mount", f"Where={where} needs the unit name {name}"
    assert _one(mnt, "Mount", "Type") == "fuse.modelfs"


def test_shipped_mount_unit_options_work(svc, helper_mounts, mount_helper, tmp_path):
    """What systemd runs for models.mount: `mount What Where -t fuse.modelfs -o Options`, with
    the example configuration (its store/mountpoint are overridden by What/Where)."""
    mnt = unit_settings((SYSTEMD_DIR / "models.mount").read_text())
    cfg = tmp_path / "config.toml"
    cfg.write_text((SYSTEMD_DIR / "config.toml").read_text())
    opts = _one(mnt, "Mount", "Options").replace("/etc/modelfs/config.toml", str(cfg))
    m = helper_mounts()
    m.run("mount", svc.mfs.store, m.mountpoint, "-t", _one(mnt, "Mount", "Type"), "-o", opts)
    m.check_mounted()
    _read_check(m, svc, ["ft-head/config.json"])
    umount_and_check_exit(m)


# ------------------------------------------------------------------------------------------
# the service's own command line under a systemd-like environment (Type=notify, journald)


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; records
    (time, sender pid, {KEY: value}) with the sender's credentials."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int | None, dict]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (socket.timeout, OSError):
                continue
            pid = None
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[:12])[0]
            fields = dict(ln.split("=", 1) for ln in data.decode().splitlines() if "=" in ln)
            self.messages.append((time.monotonic(), pid, fields))

    def wait_for(self, key, value=None, after=0, timeout=mountlib.STARTUP_TIMEOUT):
        def find():
            for i, (_t, _pid, f) in enumerate(self.messages):
                if i >= after and key in f and (value is None or f[key] == value):
                    return i
            return None

        wait_until(lambda: find() is not None, timeout)
        return find()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_service_execstart_notify_reload_stop(svc, modelfs_bin, work, empty_config):
    """Run the unit's ExecStart (binary and config path substituted) as systemd would:
    READY=1 once mounted, from the main pid; RELOADING=1/READY=1 on SIGHUP; STOPPING=1 and
    exit 0 on SIGTERM; JSON log lines on stderr when JOURNAL_STREAM is set."""
    unit = unit_settings((SYSTEMD_DIR / "modelfs.service").read_text())
    argv = shlex.split(_one(unit, "Service", "ExecStart"))
    mp = work / "models"
    mp.mkdir()
    cfg = work / "config.toml"
    cfg.write_text(f'store = "{svc.mfs.store}"\nmountpoint = "{mp}"\nshutdown_grace = 0.5\nlog = "info"\n')
    argv = [str(modelfs_bin) if a == "/usr/local/bin/modelfs" else
            str(cfg) if a == "/etc/modelfs/config.toml" else a for a in argv]
    assert argv[0] == str(modelfs_bin) and str(cfg) in argv, f"unexpected ExecStart {argv}"
    sockdir = Path(tempfile.mkdtemp(prefix="mfs-notify-"))
    notify = NotifySocket(sockdir / "notify")
    stderr_path = work / "stderr.log"
    m = Mount(svc.mfs, mp)  # for cleanup only
    try:
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    env=service_env(empty_config, NOTIFY_SOCKET=notify.path,
                                                    JOURNAL_STREAM="8:424242"))
        m.daemon_pids = [proc.pid]
        i = notify.wait_for("READY", "1")
        assert i is not None, f"no READY=1 within {mountlib.STARTUP_TIMEOUT}s; exit {proc.poll()}; " \
                              f"stderr: {stderr_path.read_text()[-2000:]}"
        assert is_mounted(mp) and stat_ok(mp) is None, "READY=1 before the mount answers"
        _t, pid, fields = notify.messages[i]
        assert pid == proc.pid, f"READY=1 sent by pid {pid}, not the main process {proc.pid} (NotifyAccess=main)"
        assert any("STATUS" in f for _t, _p, f in notify.messages[:i + 1]), "no STATUS= line"
        _read_check(m, svc, ["ft-head/config.json"])

        n = len(notify.messages)
        os.kill(proc.pid, signal.SIGHUP)
        j = notify.wait_for("RELOADING", "1", after=n, timeout=RELOAD_WITHIN)
        assert j is not None, f"no RELOADING=1 after SIGHUP: {notify.messages[n:]}"
        assert notify.wait_for("READY", "1", after=j + 1, timeout=RELOAD_WITHIN) is not None, \
            f"no READY=1 after the reload: {notify.messages[n:]}"

        n = len(notify.messages)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=mountlib.EXIT_TIMEOUT)
        assert rc == 0, f"ExecStart process exited {rc} after SIGTERM"
        assert notify.wait_for("STOPPING", "1", after=n, timeout=1) is not None, \
            f"no STOPPING=1 on SIGTERM: {notify.messages[n:]}"
        assert not is_mounted(mp) and stat_ok(mp) is None
    finally:
        m.cleanup()
        notify.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    lines = [ln for ln in stderr_path.read_text().splitlines() if ln.strip()]
    assert lines, "no log output at log = \"info\""
    bad = []
    for ln in lines:
        try:
            rec = json.loads(ln)
            assert isinstance(rec, dict) and "level" in rec
        except (ValueError, AssertionError):
            bad.append(ln)
    assert not bad, f"under systemd (JOURNAL_STREAM set) every log line should be JSON: {bad[:5]}"
    assert any("mounted" in json.dumps(json.loads(ln)) for ln in lines), lines[:10]
