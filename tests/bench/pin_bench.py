"""Pinning benchmark: load model A, lose the page cache, then load variant B that
shares most of A's tensors -- through a pinning mount, through a mount with pinning off, and
from plain files on ext4, interleaved in one run.

Run it through scripts/bench-pin.sh (builds the release binary and the Python environment
first). Needs root (drop_caches, mount).

A = `base`, B = `ft-last` of tests/modelfamily.py (ft-last replaces the tensors of the last
two layers, the rest is byte-identical to base). Setups, each round in a rotating order:

  ext4      the generated directories: read A, drop caches, time loading B
  unpinned  fresh `modelfs mount --pin-budget 0`: read A through the mount, drop caches,
            time loading B through the mount
  pinned    fresh `modelfs mount --pin-budget BUDGET`: read A through the mount, wait until
            stats.json pinned_bytes stops growing, drop caches, time loading B
  unpinned+trace, pinned+trace
            the same, with B's recorded load trace replayed ahead of the loader. The two
            setups above run with --prefetch-window 0 (no replay). Before each load method's
            rounds, B's trace is recorded once by loading B with that method through a mount.

Load methods (each its own cold cell, so B's own reads never warm the other method):
  read      every file of B read fully with read() into a 1 MiB buffer
  st_load   safetensors.torch.load_file(B/model.safetensors)

Median of --rounds (>= 3). Ratios: unpinned seconds / this setup's, ext4 seconds / this setup's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import mountlib  # noqa: E402

MiB = 1 << 20
SETUPS = ["ext4", "unpinned", "pinned", "unpinned+trace", "pinned+trace"]
METHODS = ["read", "st_load"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def read_all(d: Path) -> int:
    buf = bytearray(MiB)
    mv = memoryview(buf)
    total = 0
    for p in files_of(d):
        fd = os.open(p, os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [mv])
                if n == 0:
                    break
                total += n
        finally:
            os.close(fd)
    return total


def st_load(d: Path) -> int:
    from safetensors.torch import load_file
    t = load_file(str(d / "model.safetensors"))
    n = sum(v.numel() * v.element_size() for v in t.values())
    del t
    return n


def timed(method: str, d: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = read_all(d) if method == "read" else st_load(d)
    return time.perf_counter() - t0, n


class Bench:
    def __init__(self, args):
        self.args = args
        self.work: Path = args.workdir
        self.store = self.work / "store"
        self.mnt = self.work / "mnt"
        self.mfs = SimpleNamespace(bin=args.modelfs, store=self.store, prefix=[])
        self.mount: mountlib.Mount | None = None

    def mfs_run(self, *argv) -> str:
        cp = subprocess.run([str(self.args.modelfs), "--store", str(self.store), *map(str, argv)],
                            check=True, stdout=subprocess.PIPE, text=True)
        return cp.stdout

    def setup(self) -> None:
        if self.args.family:
            self.fam = self.args.family.resolve()
        else:
            self.fam = self.work / "family"
            log(f"generating model family ({self.args.base_mib} MiB base) in {self.fam}")
            subprocess.run([sys.executable, str(REPO / "tests/modelfamily.py"), str(self.fam),
                            "--base-mib", str(self.args.base_mib), "--formats", "core"], check=True,
                           stdout=subprocess.DEVNULL)
        self.A, self.B = self.fam / "base", self.fam / "ft-last"
        log("importing base as A, ft-last as B")
        self.mfs_run("import", self.A, "--name", "A")
        self.imp_b = self.mfs_run("import", self.B, "--name", "B", "--json")
        self.size = {"A": sum(p.stat().st_size for p in files_of(self.A)),
                     "B": sum(p.stat().st_size for p in files_of(self.B))}

    def start_mount(self, budget: str, window: str = "0") -> mountlib.Mount:
        assert self.mount is None
        m = mountlib.Mount(self.mfs, self.mnt, "--pin-budget", budget, "--prefetch-window", window)
        self.mount = m
        m.start_daemon()
        return m

    def stop_mount(self) -> None:
        if self.mount is not None:
            m, self.mount = self.mount, None
            try:
                m.umount(check=True)
            finally:
                m.cleanup()

    def settle_pins(self, timeout=120.0, quiet=2.0) -> tuple[int, float]:
        t0 = time.monotonic()
        last, since = -1, time.monotonic()
        while time.monotonic() - t0 < timeout:
            p = int(self.mount.stats().get("pinned_bytes") or 0)
            if p != last:
                last, since = p, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.2)
        return last, time.monotonic() - t0 - quiet

    def record_trace(self, method: str) -> None:
        """Forget B's traces and record new ones by loading B with `method` through a mount."""
        shutil.rmtree(self.store / "traces", ignore_errors=True)
        m = self.start_mount("0", "0")
        try:
            drop_caches()
            timed(method, m.mountpoint / "B")
        finally:
            self.stop_mount()
        n = sum(1 for p in (self.store / "traces").rglob("*") if p.is_file())
        log(f"recorded B's load trace with {method}: {n} trace files")
        if n == 0:
            raise SystemExit("no trace was recorded")

    def cell(self, setup: str, method: str) -> dict:
        out = {"setup": setup, "method": method}
        if setup == "ext4":
            read_all(self.A)
            drop_caches()
            out["secs"], out["bytes"] = timed(method, self.B)
            out["pinned_bytes"] = 0
            return out
        budget = "0" if setup.startswith("unpinned") else self.args.pin_budget
        window = self.args.prefetch_window if setup.endswith("+trace") else "0"
        m = self.start_mount(budget, window)
        try:
            a, b = m.mountpoint / "A", m.mountpoint / "B"
            if self.args.warm and setup.startswith("pinned"):
                self.mfs_run("warm", "A", "--mountpoint", m.mountpoint)
            else:
                read_all(a)
            out["pinned_bytes"], out["settle_secs"] = self.settle_pins()
            drop_caches()
            out["secs"], out["bytes"] = timed(method, b)
            st = m.stats()
            out["pinned_bytes_after"] = int(st.get("pinned_bytes") or 0)
            out["mode"] = st.get("mode")
            out["trace_replays"] = st.get("trace_replays")
            by = {x["name"]: x for x in st.get("models", [])}
            out["B_read"] = {k: by.get("B", {}).get(k) for k in
                             ("read_resident_bytes", "read_disk_bytes", "prefetched_bytes")}
        finally:
            self.stop_mount()
        return out

    def run(self) -> dict:
        t0 = time.time()
        import safetensors.torch  # noqa: F401  (import torch now, not inside the first timed load)
        self.setup()
        cells = []
        for method in METHODS:
            self.record_trace(method)
            for r in range(self.args.rounds):
                k = r % len(SETUPS)
                order = SETUPS[k:] + SETUPS[:k]
                for s in order:
                    c = self.cell(s, method)
                    c["round"] = r
                    cells.append(c)
                    log(f"round {r} {method:8s} {s:15s} {c['secs']:.3f} s  pinned {c['pinned_bytes'] / MiB:.0f} MiB"
                        f"  B {c.get('B_read')}")
        summary = []
        for method in METHODS:
            med = {s: statistics.median(c["secs"] for c in cells if c["setup"] == s and c["method"] == method)
                   for s in SETUPS}
            for s in SETUPS:
                cs = [c for c in cells if c["setup"] == s and c["method"] == method]
                summary.append({
                    "method": method, "setup": s, "median_secs": med[s],
                    "all_secs": [c["secs"] for c in cs],
                    "ratio_unpinned_over_this": med["unpinned"] / med[s],
                    "ratio_ext4_over_this": med["ext4"] / med[s],
                    "pinned_bytes_median": statistics.median(c["pinned_bytes"] for c in cs),
                    "unpinned_trace_over_this": med["unpinned+trace"] / med[s],
                })
        return {"config": {"base_mib": self.args.base_mib, "rounds": self.args.rounds,
                           "pin_budget": self.args.pin_budget,
                           "prefetch_window": self.args.prefetch_window, "kernel": os.uname().release,
                           "cpus": os.cpu_count(), "warm_cmd": self.args.warm},
                "sizes": self.size, "import_B": self.imp_b.strip(), "cells": cells, "summary": summary,
                "elapsed_secs": time.time() - t0}

    def cleanup(self) -> None:
        try:
            self.stop_mount()
        except Exception as e:  # noqa: BLE001
            log(f"umount failed: {e}")
        mountlib.cleanup_all()
        mountlib.force_unmount(self.mnt)


def report(res: dict) -> str:
    cfg = res["config"]
    L = [f"\nmodelfs pin benchmark: kernel {cfg['kernel']}, {cfg['cpus']} CPUs, base {cfg['base_mib']} MiB, "
         f"pin budget {cfg['pin_budget']}, median of {cfg['rounds']} interleaved rounds",
         f"A = base ({res['sizes']['A'] / MiB:.1f} MiB), B = ft-last ({res['sizes']['B'] / MiB:.1f} MiB); "
         "A read, caches dropped, B's load timed; B import: " + ", ".join(
             f"{k} {v}" for k, v in json.loads(res["import_B"]).items() if k in ("new_bytes", "logical_bytes")),
         "ratio = other setup's seconds / this setup's seconds (> 1: this setup is faster); goal: pinned >= 1.5 "
         "vs unpinned and vs ext4", "",
         "| load | setup | B load s (median) | per-round s | unpinned s / this | unpinned+trace s / this "
         "| ext4 s / this | pinned bytes |",
         "|---|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        L.append(f"| {s['method']} | {s['setup']} | {s['median_secs']:.3f} | "
                 f"{', '.join(f'{x:.3f}' for x in s['all_secs'])} | {s['ratio_unpinned_over_this']:.2f} | "
                 f"{s['unpinned_trace_over_this']:.2f} | "
                 f"{s['ratio_ext4_over_this']:.2f} | {s['pinned_bytes_median'] / MiB:,.1f} MiB |")
    L.append("")
    for m in METHODS:
        for setup in ("pinned", "pinned+trace"):
            p = next(s for s in res["summary"] if s["method"] == m and s["setup"] == setup)
            ok = p["ratio_unpinned_over_this"] >= 1.5 and p["ratio_ext4_over_this"] >= 1.5
            L.append(f"goal ({m}, {setup}): {p['ratio_unpinned_over_this']:.2f}x vs unpinned, "
                     f"{p['unpinned_trace_over_this']:.2f}x vs unpinned+trace, "
                     f"{p['ratio_ext4_over_this']:.2f}x vs ext4 -> {'met' if ok else 'NOT met'}")
    L.append(f"elapsed {res['elapsed_secs']:.0f} s")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/modelfs-pin-bench"))
    ap.add_argument("--base-mib", type=int, default=512)
    ap.add_argument("--family", type=Path, default=None,
                    help="an existing tests/modelfamily.py output directory (skips generation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pin-budget", default="2GiB")
    ap.add_argument("--prefetch-window", default="256MiB", help="window of the +trace setups")
    ap.add_argument("--warm", action="store_true", help="pinned setup: `modelfs warm A` instead of reading A")
    ap.add_argument("--modelfs", type=Path, default=REPO / "target/release/modelfs")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be >= 3")
    if os.geteuid() != 0:
        print("pin_bench needs root (drop_caches, mount)", file=sys.stderr)
        return 2
    return mountlib.run_bench(Bench, args, report)


if __name__ == "__main__":
    sys.exit(main())
