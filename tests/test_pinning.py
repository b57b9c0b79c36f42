"""Pinning through a real mount: the mount locks (mlock) the chunks its
shared-aware policy admits, never more than --pin-budget, counts hits and
misses, releases pins when models are removed, and `modelfs warm` feeds it.
The policy itself (and LRU vs shared-aware) is tested in cache/ and by the
simulator; these tests check the wiring."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import Modelfs
from mountlib import Mount, cleanup_all

MiB = 1 << 20


def vm_locked(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmLck in /proc/{pid}/status")


@pytest.fixture(scope="module", autouse=True)
def _no_mounts_left():
    yield
    cleanup_all()


@pytest.fixture
def pinned_mount(modelfs_bin, dedup_family, tmp_path):
    mfs = Modelfs(modelfs_bin, tmp_path / "store")
    for name in ["base", "ft-head", "ft-last"]:
        mfs.import_(dedup_family.path(name), "--name", name, ok=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    base_size = (dedup_family.path("base") / "model.safetensors").stat().st_size
    budget = base_size // 2
    m = Mount(mfs, mp, "--pin-budget", str(budget))
    m.start_daemon()
    try:
        yield mfs, m, budget
    finally:
        m.cleanup()


def warm(mfs: Modelfs, name: str, mp: Path) -> dict:
    return mfs.json("warm", name, "--mountpoint", mp)


def test_budget_is_never_exceeded_and_locked_memory_matches(pinned_mount):
    mfs, m, budget = pinned_mount
    pid = m.daemon_pids[0]
    peak = 0
    for name in ["ft-head", "base", "ft-last", "ft-head", "base"]:
        r = warm(mfs, name, m.mountpoint)
        assert r["through_mount"] and r["bytes"] > 0, r
        time.sleep(0.3)  # passthrough opens are pinned by a background worker
        s = m.stats()
        assert s["pinned_bytes"] <= budget, f"pinned {s['pinned_bytes']} > budget {budget}"
        locked = vm_locked(pid)
        assert locked <= budget, f"VmLck {locked} > budget {budget}"
        peak = max(peak, s["pinned_bytes"])
    s = m.stats()
    assert peak > budget * 0.8, f"the budget should fill up after warming 3 models: peak {peak} of {budget}"
    assert s["cache_hits"] > 0 and s["cache_misses"] > 0, s
    # locked pages are whole pages inside pinned chunks: VmLck tracks pinned_bytes closely
    assert abs(vm_locked(pid) - s["pinned_bytes"]) <= 0.02 * s["pinned_bytes"] + 64 * 4096, (
        vm_locked(pid), s["pinned_bytes"])


def test_pins_are_released_when_models_are_removed(pinned_mount):
    mfs, m, budget = pinned_mount
    pid = m.daemon_pids[0]
    for name in ["base", "ft-head", "ft-last"]:
        warm(mfs, name, m.mountpoint)
    time.sleep(0.5)
    before = m.stats()["pinned_bytes"]
    assert before > 0
    mfs.run("rm", "base", "ft-head", "ft-last", ok=True)
    deadline = time.time() + 3
    while time.time() < deadline and m.stats()["pinned_bytes"] > 0:
        time.sleep(0.1)
    assert m.stats()["pinned_bytes"] == 0, m.stats()
    assert vm_locked(pid) == 0


def test_pin_budget_zero_disables_pinning(modelfs_bin, dedup_family, tmp_path):
    mfs = Modelfs(modelfs_bin, tmp_path / "store")
    mfs.import_(dedup_family.path("ft-head"), "--name", "ft-head", ok=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(mfs, mp, "--pin-budget", "0")
    m.start_daemon()
    try:
        warm(mfs, "ft-head", mp)
        s = m.stats()
        assert s["pinned_bytes"] == 0 and s["pin_budget"] == 0, s
        assert vm_locked(m.daemon_pids[0]) == 0
    finally:
        m.cleanup()


def test_warm_without_a_mount_reads_the_store(modelfs_bin, dedup_family, tmp_path):
    mfs = Modelfs(modelfs_bin, tmp_path / "store")
    mfs.import_(dedup_family.path("base"), "--name", "base", ok=True)
    r = mfs.json("warm", "base")
    size = sum(f.stat().st_size for f in dedup_family.path("base").rglob("*") if f.is_file())
    assert r["bytes"] == size and not r["through_mount"], r
    bad = mfs.run("warm", "base", "no-such-file.bin", ok=False)
    assert "no-such-file.bin" in bad.stderr
