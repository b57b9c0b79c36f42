"""Load traces and per-model statistics through a real mount.

The mount records, per file content, the order in which a loader first
reads its byte ranges, saves it under the store's traces/ when the last
handle closes (docs/store-format.md section 4a), and at the next first open
replays it ahead of the reader; `modelfs warm` reads in that order too.
`modelfs stats` reports pinned bytes, reads from memory vs disk and
prefetched bytes, overall and per model.

The trace files are decoded here by an independent reader written from
the documented format, not by the project's code."""

from __future__ import annotations

import hashlib
import os
import struct
import time
from pathlib import Path

import pytest

from conftest import Modelfs
from mountlib import Mount, cleanup_all, wait_until

MiB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module", autouse=True)
def _no_mounts_left():
    yield
    cleanup_all()


def decode_trace(data: bytes, file_size: int) -> list[tuple[int, int]]:
    """Second reader of the trace format (docs/store-format.md 4a)."""
    import blake3  # noqa: PLC0415  (from requirements.txt)

    body, check = data[:-32], data[-32:]
    assert blake3.blake3(body).digest() == check, "trace checksum mismatch"
    magic, version, count, size = struct.unpack_from("<8sIIQ", body, 0)
    assert magic == b"MFSTRACE" and version == 1, (magic, version)
    assert size == file_size, (size, file_size)
    assert len(body) == 24 + 16 * count
    return [struct.unpack_from("<QQ", body, 24 + 16 * i) for i in range(count)]


def trace_file(store: Path, file_hash: str) -> Path:
    return store / "traces" / file_hash[:2] / file_hash


def drop_caches():
    if os.geteuid() != 0:
        pytest.fail("this test drops the page cache and needs root (CI runs as root)",
                    pytrace=False)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.fixture
def store(modelfs_bin, dedup_family, tmp_path):
    mfs = Modelfs(modelfs_bin, tmp_path / "store")
    for key in ["base", "ft-head"]:
        mfs.import_(dedup_family.path(key), "--name", key, ok=True)
    return mfs


def weights(mfs: Modelfs, model: str) -> dict:
    files = mfs.ls_files(model)
    return files["model.safetensors"]


def read_ranges(path: Path, ranges) -> None:
    """pread each range with readahead off, so the daemon sees exactly these reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off, length in ranges:
            got = 0
            while got < length:
                n = len(os.pread(fd, min(MiB, length - got), off + got))
                assert n > 0, f"short read at {off + got} of {path}"
                got += n
    finally:
        os.close(fd)


def test_trace_records_first_touch_order_and_replay_prefetches_it(store, tmp_path):
    mfs = store
    f = weights(mfs, "ft-head")
    size, file_hash = f["size"], f["hash"]
    assert f["storage"] == "recipe", f"ft-head's weights should be a recipe (copy mode): {f}"
    assert size > 8 * MiB
    last = (size - MiB) // PAGE * PAGE
    middle = size // 2 // PAGE * PAGE
    order = [(last, MiB), (0, MiB), (middle, 2 * MiB), (MiB // 2, MiB)]  # the last overlaps
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(mfs, mp, "--pin-budget", "0")
    m.start_daemon()
    try:
        path = mp / "ft-head" / "model.safetensors"
        read_ranges(path, order)
        assert wait_until(lambda: trace_file(mfs.store, file_hash).exists(), 5), (
            "no trace saved after the last handle closed\n" + m.describe())
        assert m.stats()["traces_saved"] == 1
    finally:
        m.cleanup()

    ranges = decode_trace(trace_file(mfs.store, file_hash).read_bytes(), size)
    # First-touch order; the overlapping read adds only its new half.
    want = [(last, min(MiB, size - last)), (0, MiB), (middle, 2 * MiB), (MiB, MiB // 2)]
    assert ranges == want, ranges
    covered = sum(length for _, length in want)

    # A later, smaller look at the file does not replace the trace.
    before = trace_file(mfs.store, file_hash).read_bytes()
    drop_caches()
    m = Mount(mfs, mp, "--pin-budget", "0")
    m.start_daemon()
    try:
        path = mp / "ft-head" / "model.safetensors"
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, PAGE, 0)  # the replay starts on this open
            assert wait_until(lambda: m.stats()["prefetched_bytes"] > 0, 5), m.stats()
            # Let the replay finish (the window is larger than the file): it
            # has then asked for every chunk the trace touches; give the disk
            # a moment to deliver the few MiB.
            assert wait_until(lambda: m.stats()["trace_replays_running"] == 0, 10), m.stats()
            time.sleep(0.5)
            s = m.stats()
            assert s["trace_replays"] == 1, s
            # It fetched what the trace covers, not the whole file (chunk granular).
            assert covered * 0.5 <= s["prefetched_bytes"] <= covered + 8 * MiB, (
                s["prefetched_bytes"], covered, size)
            disk_before = s["read_disk_bytes"]
            for off, length in want:
                got = 0
                while got < length:
                    got += len(os.pread(fd, min(MiB, length - got), off + got))
            s = m.stats()
            # The recorded ranges are now served from memory, not from disk.
            assert s["read_disk_bytes"] - disk_before <= 0.05 * covered, s
            assert s["read_resident_bytes"] >= 0.9 * covered, s
        finally:
            os.close(fd)
        assert m.stats()["traces_saved"] == 0
    finally:
        m.cleanup()
    assert trace_file(mfs.store, file_hash).read_bytes() == before

    # warm, through a mount, reads the file in the recorded order.
    m = Mount(mfs, mp, "--pin-budget", "0")
    m.start_daemon()
    try:
        r = mfs.json("warm", "ft-head", "model.safetensors", "--mountpoint", mp)
        assert r["through_mount"] and r["files_in_trace_order"] == 1, r
        assert r["bytes"] == size and r["files"] == 1, r
    finally:
        m.cleanup()

    # gc removes the trace once no model has that content.
    mfs.run("rm", "ft-head", ok=True)
    g = mfs.json("gc")
    assert g["traces_removed"] == 1, g
    assert not trace_file(mfs.store, file_hash).exists()


def test_damaged_trace_is_ignored_and_rewritten(store, tmp_path):
    mfs = store
    f = weights(mfs, "ft-head")
    t = trace_file(mfs.store, f["hash"])
    t.parent.mkdir(parents=True, exist_ok=True)
    t.write_bytes(b"MFSTRACE" + os.urandom(100))
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(mfs, mp, "--pin-budget", "0")
    m.start_daemon()
    try:
        data = (mp / "ft-head" / "model.safetensors").read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(
            mfs.cat("ft-head/model.safetensors")).digest()
        s = m.stats()
        assert s["trace_replays"] == 0 and s["eio"] == 0, s
        assert wait_until(lambda: m.stats()["traces_saved"] == 1, 5), m.stats()
    finally:
        m.cleanup()
    ranges = decode_trace(t.read_bytes(), f["size"])
    assert sum(length for _, length in ranges) == f["size"]
    # A sequential read starts at 0; the daemon's workers may take the
    # kernel's concurrent readahead requests slightly out of order.
    assert ranges[0][0] < 8 * MiB, ranges[:4]


def test_stats_per_model(store, tmp_path):
    mfs = store
    mp = tmp_path / "mnt"
    mp.mkdir()
    base_size = weights(mfs, "base")["size"]
    budget = 4 * base_size
    m = Mount(mfs, mp, "--pin-budget", str(budget), "--passthrough", "off")
    m.start_daemon()
    try:
        r = mfs.run("stats", mp, "--json", ok=True).json()
        assert {x["name"] for x in r["models"]} == {"base", "ft-head"}
        assert all(x["read_bytes"] == 0 and x["pinned_bytes"] == 0 for x in r["models"]), r
        (mp / "base" / "model.safetensors").read_bytes()
        r = mfs.run("stats", mp, "--json", ok=True).json()
        by = {x["name"]: x for x in r["models"]}
        assert by["base"]["read_bytes"] == base_size, by["base"]
        assert by["ft-head"]["read_bytes"] == 0
        for x in r["models"]:
            assert x["read_resident_bytes"] + x["read_disk_bytes"] == x["read_bytes"], x
        # Pinned: base's chunks; ft-head shares nearly all of them.
        assert 0 < by["base"]["pinned_bytes"] <= r["pinned_bytes"] <= budget, r
        assert by["ft-head"]["pinned_bytes"] >= 0.8 * by["base"]["pinned_bytes"], by
        # Reading base again is served from memory.
        resident = r["read_resident_bytes"]
        (mp / "base" / "model.safetensors").read_bytes()
        one = mfs.run("stats", mp, "--model", "ft-head", "--json", ok=True).json()
        assert [x["name"] for x in one["models"]] == ["ft-head"]
        text = mfs.run("stats", mp, ok=True).stdout
        assert "base" in text and "ft-head" in text and "FROM MEMORY" in text, text
        # The FUSE page cache (KEEP_CACHE) may answer the second read itself;
        # whatever reached the daemon came from memory.
        after = m.stats()
        assert after["read_disk_bytes"] == r["read_disk_bytes"], (r, after)
        assert after["read_resident_bytes"] >= resident
        mfs.run("stats", mp, "--model", "nope", ok=False)
    finally:
        m.cleanup()
    r = mfs.run("stats", mp, ok=None)
    assert r.returncode == 3, r.describe()


def test_replay_stays_within_the_window_and_stops_with_the_reader(store, tmp_path):
    mfs = store
    f = weights(mfs, "ft-head")
    size = f["size"]
    assert size >= 24 * MiB, "the family's base should be >= 24 MiB for this test"
    mp = tmp_path / "mnt"
    mp.mkdir()
    path = mp / "ft-head" / "model.safetensors"
    m = Mount(mfs, mp, "--pin-budget", "0")
    m.start_daemon()
    try:
        path.read_bytes()  # records a trace covering the whole file
    finally:
        m.cleanup()
    assert trace_file(mfs.store, f["hash"]).exists()

    drop_caches()
    m = Mount(mfs, mp, "--pin-budget", "0", "--prefetch-window", "1MiB")
    m.start_daemon()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, PAGE, 0)
            assert wait_until(lambda: m.stats()["prefetched_bytes"] > 0, 5), m.stats()
            time.sleep(0.5)
            # window (1 MiB) + one 8 MiB step, + a chunk of slack at its edge
            first = m.stats()["prefetched_bytes"]
            assert first <= 10 * MiB, first
            for off in range(0, 12 * MiB, MiB):
                os.pread(fd, MiB, off)
            assert wait_until(lambda: m.stats()["prefetched_bytes"] > first, 5), (
                "the replay should advance as the reader consumes", first, m.stats())
            assert m.stats()["trace_replays_running"] == 1
        finally:
            os.close(fd)
        # Reader gone: the replay stops without reading the rest of the file.
        assert wait_until(lambda: m.stats()["trace_replays_running"] == 0, 5), m.stats()
        s = m.stats()
        # consumed 12 MiB + window 1 MiB + one 8 MiB step + slack, of a larger file
        assert s["prefetched_bytes"] <= 22 * MiB < size, s
    finally:
        m.cleanup()
