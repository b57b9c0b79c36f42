"""Mount benchmark: reads, memory and metadata through `modelfs mount`, each
against the same work done on ext4 in the same run.

Run it through scripts/bench-mount.sh (builds the release binary and the
Python environment first). Needs root: it drops caches, mounts with kernel
passthrough, creates memory cgroups and reads /proc/kpageflags.

What it measures (every figure is a ratio against a native baseline measured
in the same run, native and mount interleaved within each repetition, the
order alternating between repetitions; median of --rounds, default 5):

1. Files. A: a safetensors file of random bf16 tensors written by the real
   `safetensors` writer (torch), imported first: a whole-file object, served
   by kernel passthrough. B: the same tensors plus one small extra tensor
   whose name sorts first, so every tensor offset shifts by a few KiB (not a
   multiple of the page size); imported after A it is a recipe (>99.9% of its
   bytes are chunks of A's object), served in copy mode. A is also served in
   copy mode by a `--passthrough off` mount. Native baselines: the original
   files in WORKDIR, on the same ext4 filesystem as the store.
2. Read throughput: {A passthrough, B recipe/copy, A copy} x
   {cold after a fresh mount, cold on a mount that has read the file before,
   warm} x {read() 1 MiB, mmap touching every 4 KiB page}.
     * cold, fresh mount: caches dropped and the daemon started anew right
       before the timed read. Includes what a first open costs per mount:
       the whole-object BLAKE3 check for passthrough, per-chunk checks in
       copy mode. This is a real cold start.
     * cold, mounted: the mount has already read the whole file once (whole
       object checked, all chunks verified), then caches are dropped. The
       daemon unmaps store objects when the last open of a file closes, so
       drop_caches does evict them; the bench checks this (fincore of the
       store object before each timed read, reported as resident bytes).
     * warm: the same file read once by the same method right before the
       timed read (this VM reclaims idle page cache within minutes).
   Plus: 4 processes mapping the same file at once right after mounting (N
   containers starting one model), seconds until all 4 have touched it.
   All these mounts run with --pin-budget 0: the daemon otherwise mlocks the
   chunks many models share (here: all of A's object, referenced by 8 names),
   and locked pages survive drop_caches, so "cold" would not be cold. Separate
   cells, "cold, mounted, pinning on (default)", measure what pinning buys:
   the mount read each file once, pins settled, then caches are dropped
   before every read.
3. Warm mmap in copy mode: folio sizes (pagemap + kpageflags), madvise
   variants (POPULATE_READ, HUGEPAGE, WILLNEED, SEQUENTIAL), and a
   read_ahead_kb sweep.
4. Memory: 4 processes mapping and touching one model file (same path), and
   4 model names with identical content (one inode), each reader in its own
   fresh memory cgroup and the daemon in another: bytes charged vs the file
   size, the daemon's read_requests/read_bytes, /proc/meminfo Cached; with
   pinning off and with the default pin budget.
5. Metadata: a 100 x 100 tree of tiny files imported as one model: `ls -lR`
   and stat() of all paths, mount vs ext4, warm and first touch.

Timed reads use a small C program compiled at run time (HELPER_C below), not
Python: touching every 4 KiB page of a warm 1 GiB mapping takes ~10-50 ms
natively, the same order as a Python loop over 262,144 pages, so a Python
reader would hide most of the difference we are measuring. The helper times
open..close with CLOCK_MONOTONIC (process start-up excluded). A calibration
line compares the helper with a Python os.readv loop on the same warm file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import mountlib  # noqa: E402  (after the sys.path change)

GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------------------
# the C reader

HELPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void die(const char *w) { fprintf(stderr, "mfsbench: %s: %s\n", w, strerror(errno)); exit(2); }

/* Folio sizes behind a mapping: /proc/self/pagemap gives each page's PFN,
   /proc/kpageflags its flags (15 COMPOUND_HEAD, 16 COMPOUND_TAIL, 22 THP). */
static void folios(unsigned char *p, size_t len) {
    int pm = open("/proc/self/pagemap", O_RDONLY), kf = open("/proc/kpageflags", O_RDONLY);
    if (pm < 0 || kf < 0) die("pagemap/kpageflags");
    size_t n = (len + 4095) / 4096;
    long present = 0, compound = 0, thp = 0, hist[24] = {0}, cur = 0;
#define FLUSH() do { if (cur) { int o = 0; while ((1L << o) < cur) o++; hist[o] += cur; cur = 0; } } while (0)
    for (size_t i = 0; i < n; i++) {
        uint64_t e, f;
        if (pread(pm, &e, 8, ((uintptr_t)p / 4096 + i) * 8) != 8) die("pread pagemap");
        if (!(e >> 63 & 1)) { FLUSH(); continue; }
        present++;
        if (pread(kf, &f, 8, (e & ((1ULL << 55) - 1)) * 8) != 8) die("pread kpageflags");
        int head = f >> 15 & 1, tail = f >> 16 & 1;
        if (f >> 22 & 1) thp++;
        if (head || tail) compound++;
        if (head) { FLUSH(); cur = 1; }
        else if (tail) cur++;
        else { FLUSH(); hist[0]++; }
    }
    FLUSH();
    printf(",\"pages\":%zu,\"present\":%ld,\"compound\":%ld,\"thp\":%ld,\"folio_kib_pages\":{", n, present, compound, thp);
    int first = 1;
    for (int o = 0; o < 24; o++) if (hist[o]) { printf("%s\"%d\":%ld", first ? "" : ",", 4 << o, hist[o]); first = 0; }
    printf("}");
    close(pm); close(kf);
    /* FilePmdMapped of this process (only this mapping is file-backed and large) */
    FILE *s = fopen("/proc/self/smaps_rollup", "r"); char line[256]; long pmd = -1;
    if (s) { while (fgets(line, sizeof line, s)) if (!strncmp(line, "FilePmdMapped:", 14)) pmd = atol(line + 14); fclose(s); }
    printf(",\"file_pmd_mapped_kb\":%ld", pmd);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: mfsbench read|mmap|hold|stat FILE [opts]\n"); return 2; }
    const char *mode = argv[1], *path = argv[2], *opts = argc > 3 ? argv[3] : "";
    int hp = !!strstr(opts, "hugepage"), pop = !!strstr(opts, "populate"), wn = !!strstr(opts, "willneed"),
        seq = !!strstr(opts, "sequential"), fol = !!strstr(opts, "folios");
    if (!strcmp(mode, "stat")) {  /* FILE = newline-separated list of paths */
        FILE *l = fopen(path, "r"); if (!l) die(path);
        static char buf[1 << 24]; size_t n = fread(buf, 1, sizeof buf - 1, l); buf[n] = 0; fclose(l);
        double t0 = now(); long cnt = 0; struct stat st; unsigned long sum = 0;
        for (char *q = buf, *e; *q; q = e + 1) {
            e = strchr(q, '\n'); if (!e) break; *e = 0;
            if (stat(q, &st)) die(q);
            sum += st.st_size; cnt++;
        }
        printf("{\"secs\":%.6f,\"count\":%ld,\"sum\":%lu}\n", now() - t0, cnt, sum); return 0;
    }
    uint64_t sum = 0; size_t total = 0;
    double t0 = now();
    int fd = open(path, O_RDONLY); if (fd < 0) die(path);
    double t_open = now() - t0;
    if (!strcmp(mode, "read")) {
        size_t bs = 1 << 20; unsigned char *buf;
        if (posix_memalign((void **)&buf, 4096, bs)) die("alloc");
        for (;;) { ssize_t r = read(fd, buf, bs); if (r < 0) die("read"); if (!r) break; total += r; sum += buf[0] + buf[r - 1]; }
        close(fd);
        printf("{\"secs\":%.6f,\"open_secs\":%.6f,\"bytes\":%zu,\"sum\":%lu}\n", now() - t0, t_open, total, (unsigned long)sum);
        return 0;
    }
    struct stat st; if (fstat(fd, &st)) die("fstat"); total = st.st_size;
    unsigned char *p = mmap(NULL, total, PROT_READ, MAP_SHARED, fd, 0); if (p == MAP_FAILED) die("mmap");
    if (hp && madvise(p, total, MADV_HUGEPAGE)) die("madvise(MADV_HUGEPAGE)");
    if (seq && madvise(p, total, MADV_SEQUENTIAL)) die("madvise(MADV_SEQUENTIAL)");
    if (wn && madvise(p, total, MADV_WILLNEED)) die("madvise(MADV_WILLNEED)");
    if (pop && madvise(p, total, MADV_POPULATE_READ)) die("madvise(MADV_POPULATE_READ)");
    for (size_t o = 0; o < total; o += 4096) sum += ((volatile unsigned char *)p)[o];
    if (total) sum += ((volatile unsigned char *)p)[total - 1];
    if (!strcmp(mode, "hold")) {  /* keep the mapping until stdin closes */
        printf("{\"secs\":%.6f,\"bytes\":%zu,\"sum\":%lu}\n", now() - t0, total, (unsigned long)sum); fflush(stdout);
        char c; while (read(0, &c, 1) > 0) {}
        munmap(p, total); close(fd); return 0;
    }
    if (fol) {
        printf("{\"secs_touch\":%.6f", now() - t0); folios(p, total); printf("}\n");
        munmap(p, total); close(fd); return 0;
    }
    munmap(p, total); close(fd);
    printf("{\"secs\":%.6f,\"open_secs\":%.6f,\"bytes\":%zu,\"sum\":%lu}\n", now() - t0, t_open, total, (unsigned long)sum);
    return 0;
}
"""


NOTES = [
    "ratio for reads = native seconds / mount seconds (>1: mount faster); for metadata = mount / native",
    "cold, fresh mount: drop_caches and a new daemon before each mount read (includes the per-mount "
    "whole-object check or per-chunk verification); cold, mounted: the mount read the file once before, "
    "then drop_caches (store objects are unmapped when the file is closed: fincore shows them evicted)",
    "warm: read once by the same method right before the timed read",
    "pinning: every mount runs with --pin-budget 0 except the 'pinning on (default)' cells and the memory "
    "scenarios labelled 'pinning on'",
    "timed reads: C helper, CLOCK_MONOTONIC around open..close (munmap included for mmap)",
    "memory: page cache charged to each reader's and the daemon's memory cgroup, 4 readers each mmap + touch",
    "metadata first touch: new daemon + drop_caches(2) (dentries/inodes) before mount runs, drop_caches(2) "
    "before native runs (ext4 metadata blocks may stay in its buffer cache)",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.PIPE, **kw)


class Bench:
    def __init__(self, args):
        self.args = args
        self.work: Path = args.workdir
        self.helper = self.work / "mfsbench"
        self.bin = args.modelfs
        self.store = self.work / "store"
        self.mnt = self.work / "mnt"
        self.mfs = SimpleNamespace(bin=self.bin, store=self.store, prefix=[])
        self.mount: mountlib.Mount | None = None
        self.cgroups = CgroupMem()
        self.res: dict = {"cells": [], "memory": [], "folios": [], "investigation": [], "metadata": [],
                          "notes": NOTES}
        self.size = 0
        self.rounds = args.rounds
        helptext = subprocess.run([str(self.bin), "mount", "--help"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True).stdout
        self.pin_supported = "--pin-budget" in helptext
        self.mount_args = list(args.mount_args)

    # ----------------------------------------------------------------------------------
    # plumbing

    def helper_run(self, mode, path, opts="") -> dict:
        argv = [str(self.helper), mode, str(path)] + ([opts] if opts else [])
        cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if cp.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")
        return json.loads(cp.stdout)

    @staticmethod
    def drop_caches(level: int = 3) -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write(str(level))

    @staticmethod
    def resident(path) -> int:
        """Page-cache bytes of a file on ext4 (fincore; never used on the mount)."""
        cp = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            return int(cp.stdout.split()[0])
        except (IndexError, ValueError):
            return -1

    def start_mount(self, passthrough="auto", ra_kb=None, cgroup=None, pin="off") -> mountlib.Mount:
        """pin="off": --pin-budget 0, so that "cold" stays cold (the daemon mlocks shared chunks
        otherwise, and mlocked pages survive drop_caches); pin="default": the daemon's default."""
        assert self.mount is None
        extra = ["--passthrough", passthrough]
        if ra_kb is not None:
            extra += ["--read-ahead-kb", str(ra_kb)]
        if pin == "off" and self.pin_supported:
            extra += ["--pin-budget", "0"]
        extra += self.mount_args
        prefix = []
        if cgroup is not None:  # the daemon (forked by --daemon) inherits the cgroup
            prefix = ["sh", "-c", 'echo $$ > "$0/cgroup.procs"; exec "$@"', str(cgroup)]
        m = mountlib.Mount(self.mfs, self.mnt, *extra, prefix=prefix)
        self.mount = m
        m.start_daemon()
        return m

    def stop_mount(self) -> None:
        if self.mount is not None:
            m, self.mount = self.mount, None
            m.umount(check=True)
            m.cleanup()

    def daemon_cpu(self) -> float:
        """User+system CPU seconds of the mount daemon so far."""
        tot = 0.0
        for pid in self.mount.daemon_pids or mountlib.modelfs_pids(self.bin, self.mnt):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                tot += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return tot

    def stats(self) -> dict:
        return self.mount.stats()

    # ----------------------------------------------------------------------------------
    # set-up

    def compile_helper(self) -> None:
        src = self.work / "mfsbench.c"
        src.write_text(HELPER_C)
        run(["gcc", "-O2", "-Wall", "-o", self.helper, src])

    def make_files(self) -> None:
        import numpy as np
        import torch
        from safetensors.torch import save_file

        size = self.args.size_mib * MiB
        n = 16
        rows = max(1, size // n // (4096 * 2))
        rng = np.random.default_rng(20240611)
        tensors = {}
        for i in range(n):
            a = rng.integers(0, 1 << 16, size=(rows, 4096), dtype=np.uint16)
            tensors[f"model.layers.{i:02d}.mlp.weight"] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        for d in ("A", "B"):
            (self.work / d).mkdir()
            (self.work / d / "config.json").write_text(json.dumps({"model_type": "bench", "variant": d}) + "\n")
        save_file(tensors, str(self.work / "A/model.safetensors"), metadata={"format": "pt"})
        # One extra tensor whose name sorts first: every tensor offset shifts by 2000 bytes
        # plus the header growth, so B shares A's tensors but at non-page-aligned offsets.
        extra = rng.integers(0, 1 << 16, size=(1000,), dtype=np.uint16)
        tensors["model.a_extra.bias"] = torch.from_numpy(extra.view(np.int16)).view(torch.bfloat16)
        save_file(tensors, str(self.work / "B/model.safetensors"), metadata={"format": "pt"})
        del tensors
        self.size = (self.work / "A/model.safetensors").stat().st_size
        self.size_b = (self.work / "B/model.safetensors").stat().st_size

        # metadata tree: D dirs x F files of a few (distinct) bytes each
        tree = self.work / "T"
        for d in range(self.args.tree_dirs):
            dd = tree / f"d{d:03d}"
            dd.mkdir(parents=True)
            for f in range(self.args.tree_files):
                (dd / f"f{f:03d}.txt").write_text(f"{d} {f}\n")

    def mfs_run(self, *args) -> str:
        return run([self.bin, "--store", self.store, *args], stderr=subprocess.PIPE).stdout.decode()

    def import_all(self) -> None:
        self.mfs_run("import", self.work / "A", "--name", "A")
        imp_b = json.loads(self.mfs_run("import", self.work / "B", "--name", "B", "--json"))
        for i in (1, 2, 3):  # identical content under other names: one inode each
            self.mfs_run("import", self.work / "A", "--name", f"A-copy{i}")
            self.mfs_run("import", self.work / "B", "--name", f"B-copy{i}")
        self.mfs_run("import", self.work / "T", "--name", "tree")
        ls = {name: {f["path"]: f for f in json.loads(self.mfs_run("ls", name, "--json"))}
              for name in ("A", "B")}
        a, b = ls["A"]["model.safetensors"], ls["B"]["model.safetensors"]
        if a["storage"] != "whole" or b["storage"] != "recipe":
            raise RuntimeError(f"unexpected storage: A {a['storage']}, B {b['storage']} (want whole, recipe)")
        self.object_a = Path(a["object"])
        # bytes of model B (both files) that were already in the store when B was imported
        shared = 1 - imp_b["new_bytes"] / imp_b["logical_bytes"]
        self.res["files"] = {
            "A": {"path": "A/model.safetensors", "size": self.size, "storage": a["storage"], "object": a["object"]},
            "B": {"path": "B/model.safetensors", "size": self.size_b, "storage": b["storage"],
                  "chunks": b["chunks"], "model_shared_fraction": shared,
                  "model_new_bytes_at_import": imp_b["new_bytes"]},
            "tree": {"dirs": self.args.tree_dirs, "files": self.args.tree_dirs * self.args.tree_files},
        }
        log(f"A: {self.size / MiB:.1f} MiB whole-file object; B: recipe, {100 * shared:.4f}% of model B's "
            f"bytes already stored ({imp_b['new_bytes']} new bytes)")

    # ----------------------------------------------------------------------------------
    # 2. read throughput

    FILES = {  # key: (relative path, mount --passthrough, label, serving)
        "A-pt": ("A/model.safetensors", "auto", "A whole-file, passthrough", "passthrough"),
        "B-copy": ("B/model.safetensors", "auto", "B recipe, copy mode", "copy"),
        "A-copy": ("A/model.safetensors", "off", "A whole-file, copy mode (--passthrough off)", "copy"),
    }

    def goal_for(self, key, temp, method):
        serving = self.FILES[key][3]
        if serving == "passthrough":
            return 0.95
        if temp.startswith("cold") and method == "read":
            return 0.8
        return None

    def timed_mount_run(self, method, path, opts="") -> dict:
        s0, c0 = self.stats(), self.daemon_cpu()
        r = self.helper_run(method, path, opts)
        s1, c1 = self.stats(), self.daemon_cpu()
        r["read_requests"] = s1["read_requests"] - s0["read_requests"]
        r["read_bytes"] = s1["read_bytes"] - s0["read_bytes"]
        r["daemon_cpu"] = c1 - c0
        r["mode"] = s1["mode"]
        r["passthrough_opens"] = s1["passthrough_opens"] - s0["passthrough_opens"]
        return r

    def new_cell(self, key, temp, method, opts="", label_extra="", goal="default"):
        rel, pt, label, serving = self.FILES[key]
        return {
            "file": key, "label": label + label_extra, "serving": serving, "passthrough_flag": pt,
            "temp": temp, "method": method, "opts": opts,
            "goal": self.goal_for(key, temp, method) if goal == "default" else goal,
            "ratio_def": "native/mount", "native": [], "mount": [], "runs": [],
            "native_resident_before": [], "object_resident_before": [],
        }

    def finish_cell(self, c) -> dict:
        c["native_med"] = statistics.median(c["native"])
        c["mount_med"] = statistics.median(c["mount"])
        c["ratio"] = c["native_med"] / c["mount_med"]
        # the native and mount runs of one round are neighbours in time: their ratio's spread
        # over the rounds shows how noisy the machine was
        c["round_ratios"] = [n / m for n, m in zip(c["native"], c["mount"])]
        c["met"] = None if c["goal"] is None else c["ratio"] >= c["goal"]
        runs = c["runs"]
        if runs and "read_requests" in runs[0]:
            req = sum(r["read_requests"] for r in runs)
            c["daemon_read_requests_per_run"] = req / len(runs)
            c["daemon_read_bytes_per_run"] = sum(r["read_bytes"] for r in runs) / len(runs)
            c["daemon_avg_request_kib"] = (sum(r["read_bytes"] for r in runs) / req / 1024) if req else 0
            c["daemon_cpu_per_run"] = statistics.median(r["daemon_cpu"] for r in runs)
            c["open_secs_med"] = statistics.median(r.get("open_secs", 0) for r in runs)
        return c

    def cold_fresh_cells(self) -> None:
        """Cold, fresh mount: drop caches and start a new daemon before every mount read."""
        cells = {(k, m): self.new_cell(k, "cold, fresh mount", m) for k in self.FILES for m in ("read", "mmap")}
        for r in range(self.rounds):
            for (key, method), c in cells.items():
                rel, pt = self.FILES[key][0], self.FILES[key][1]
                log(f"cold/fresh mount round {r + 1}/{self.rounds}: {key} {method}")
                for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                    if side == "native":
                        self.drop_caches()
                        c["native_resident_before"].append(self.resident(self.work / rel))
                        c["native"].append(self.helper_run(method, self.work / rel)["secs"])
                    else:
                        self.start_mount(pt)
                        try:
                            self.drop_caches()
                            c["object_resident_before"].append(self.resident(self.object_a))
                            run_ = self.timed_mount_run(method, self.mnt / rel)
                        finally:
                            self.stop_mount()
                        c["mount"].append(run_["secs"])
                        c["runs"].append(run_)
        self.res["cells"] += [self.finish_cell(c) for c in cells.values()]

    def parallel(self, method, paths) -> float:
        """Start one helper per path at once; seconds until the last one is done."""
        t = time.perf_counter()
        procs = [subprocess.Popen([str(self.helper), method, str(p)], stdout=subprocess.DEVNULL) for p in paths]
        rcs = [p.wait() for p in procs]
        wall = time.perf_counter() - t
        if any(rcs):
            raise RuntimeError(f"a concurrent {method} reader failed: exit statuses {rcs}")
        return wall

    def concurrent_cells(self, n=4) -> None:
        """Cold start of N processes mapping the same file at once, right after mounting
        (N containers starting the same model): seconds until all N have touched every page."""
        cells = {k: self.new_cell(k, f"cold, fresh mount, {n} concurrent readers", "mmap") for k in self.FILES}
        for r in range(self.rounds):
            for key, c in cells.items():
                rel, pt = self.FILES[key][0], self.FILES[key][1]
                log(f"cold/fresh mount, {n} concurrent readers, round {r + 1}/{self.rounds}: {key}")
                for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                    if side == "native":
                        self.drop_caches()
                        c["native"].append(self.parallel("mmap", [self.work / rel] * n))
                        continue
                    self.start_mount(pt)
                    try:
                        self.drop_caches()
                        s0, c0 = self.stats(), self.daemon_cpu()
                        wall = self.parallel("mmap", [self.mnt / rel] * n)
                        s1, c1 = self.stats(), self.daemon_cpu()
                    finally:
                        self.stop_mount()
                    c["mount"].append(wall)
                    c["runs"].append({"secs": wall, "daemon_cpu": c1 - c0,
                                      "read_requests": s1["read_requests"] - s0["read_requests"],
                                      "read_bytes": s1["read_bytes"] - s0["read_bytes"]})
        self.res["cells"] += [self.finish_cell(c) for c in cells.values()]

    def wait_pins(self, timeout=60.0) -> int:
        """Wait until the daemon's pinned_bytes stops growing; return it."""
        last, stable_since, t0 = -1, time.monotonic(), time.monotonic()
        while time.monotonic() - t0 < timeout:
            cur = self.stats().get("pinned_bytes", 0)
            if cur != last:
                last, stable_since = cur, time.monotonic()
            elif time.monotonic() - stable_since >= 1.5:
                break
            time.sleep(0.25)
        return last

    def pinned_cells(self) -> None:
        """Cold reads with the daemon's default pinning: the mount read each file once, the
        daemon pinned (mlock) what its policy admits, then caches are dropped before each read.
        Shows what pinning buys a reader after the page cache was dropped or reclaimed."""
        if not self.pin_supported:
            return
        for pt in ("auto", "off"):
            keys = [k for k in self.FILES if self.FILES[k][1] == pt]
            self.start_mount(pt, pin="default")
            try:
                for k in keys:
                    self.helper_run("read", self.mnt / self.FILES[k][0])
                pinned = self.wait_pins()
                vmlck = sum(proc_status(p).get("VmLck", 0) for p in self.mount.daemon_pids)
                budget = self.stats().get("pin_budget")
                log(f"pinning (--passthrough {pt}): {pinned / MiB:.0f} MiB pinned (VmLck {vmlck / MiB:.0f} MiB, "
                    f"budget {budget})")
                cells = {(k, m): self.new_cell(k, "cold, mounted, pinning on (default)", m,
                                               goal=self.goal_for(k, "cold", m))
                         for k in keys for m in ("read", "mmap")}
                for r in range(self.rounds):
                    log(f"pinned (--passthrough {pt}) round {r + 1}/{self.rounds}")
                    for (key, method), c in cells.items():
                        rel = self.FILES[key][0]
                        for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                            self.drop_caches()
                            if side == "native":
                                c["native_resident_before"].append(self.resident(self.work / rel))
                                c["native"].append(self.helper_run(method, self.work / rel)["secs"])
                            else:
                                c["object_resident_before"].append(self.resident(self.object_a))
                                run_ = self.timed_mount_run(method, self.mnt / rel)
                                c["mount"].append(run_["secs"])
                                c["runs"].append(run_)
                for c in cells.values():
                    c.update(pinned_bytes=pinned, daemon_vmlck=vmlck, pin_budget=budget)
                    self.res["cells"].append(self.finish_cell(c))
            finally:
                self.stop_mount()

    def mounted_cells(self, pt: str) -> None:
        """Cold on a mount that has read the file before, and warm, for the files of one
        mount configuration; then folio sizes of each file, warm."""
        keys = [k for k in self.FILES if self.FILES[k][1] == pt]
        self.start_mount(pt)
        try:
            self.res["config"]["mount_read_ahead_kb"] = self.read_ahead_of_mount()
            for k in keys:  # first open: whole-object check / chunk verification, untimed
                self.helper_run("read", self.mnt / self.FILES[k][0])
            cells = {}
            for k in keys:
                for temp in ("cold, mounted", "warm"):
                    for m in ("read", "mmap"):
                        cells[(k, temp, m)] = self.new_cell(k, temp, m)
            for r in range(self.rounds):
                log(f"mounted (--passthrough {pt}) round {r + 1}/{self.rounds}")
                for (key, temp, method), c in cells.items():
                    rel = self.FILES[key][0]
                    for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                        path = self.work / rel if side == "native" else self.mnt / rel
                        if temp == "warm":
                            self.helper_run(method, path)  # read once right before
                        else:
                            self.drop_caches()
                        if side == "native":
                            c["native_resident_before"].append(self.resident(path))
                            c["native"].append(self.helper_run(method, path)["secs"])
                        else:
                            c["object_resident_before"].append(self.resident(self.object_a))
                            run_ = self.timed_mount_run(method, path)
                            c["mount"].append(run_["secs"])
                            c["runs"].append(run_)
            self.res["cells"] += [self.finish_cell(c) for c in cells.values()]
            # folio sizes, warm (read once by mmap right before)
            for k in keys:
                rel = self.FILES[k][0]
                for side, path in (("native ext4", self.work / rel), (f"mount {k}", self.mnt / rel)):
                    self.helper_run("mmap", path)
                    f = self.helper_run("mmap", path, "folios")
                    f.update(where=side, file=k, how="warm (mmap touch right before)")
                    self.res["folios"].append(f)
        finally:
            self.stop_mount()

    # ----------------------------------------------------------------------------------
    # 3. warm mmap in copy mode

    def investigate(self) -> None:
        rel = self.FILES["A-copy"][0]
        inv = self.res["investigation"]
        # (a) madvise variants, warm, --passthrough off, default read_ahead_kb
        self.start_mount("off")
        try:
            self.helper_run("read", self.mnt / rel)  # verify chunks once
            variants = ["", "populate", "hugepage", "hugepage,populate", "willneed", "sequential"]
            cells = {v: self.new_cell("A-copy", "warm", "mmap", v, f" [madvise {v or 'none'}]", goal=None)
                     for v in variants}
            cells["read-warmed"] = self.new_cell("A-copy", "warm (warmed by read())", "mmap", "",
                                                 " [warmed by read(), then mmap]", goal=None)
            for r in range(self.rounds):
                log(f"investigation: madvise variants round {r + 1}/{self.rounds}")
                for v, c in cells.items():
                    opts = "" if v == "read-warmed" else v
                    for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                        path = self.work / rel if side == "native" else self.mnt / rel
                        self.helper_run("read" if v == "read-warmed" else "mmap", path, opts)
                        if side == "native":
                            c["native"].append(self.helper_run("mmap", path, opts)["secs"])
                        else:
                            run_ = self.timed_mount_run("mmap", path, opts)
                            c["mount"].append(run_["secs"])
                            c["runs"].append(run_)
            for v, c in cells.items():
                inv.append(dict(self.finish_cell(c), experiment="madvise", variant=v or "none"))
            # folio sizes: FUSE inode populated by read(), by mmap, by mmap with MADV_HUGEPAGE
            for how, warm_mode, opts in (("populated by read()", "read", ""),
                                         ("populated by mmap faults", "mmap", ""),
                                         ("populated by mmap with MADV_HUGEPAGE", "mmap", "hugepage")):
                self.drop_caches()
                self.helper_run(warm_mode, self.mnt / rel, opts)
                f = self.helper_run("mmap", self.mnt / rel, "folios," + opts)
                f.update(where="mount A-copy", file="A-copy", how=how)
                self.res["folios"].append(f)
            self.drop_caches()
            self.helper_run("read", self.work / rel)
            f = self.helper_run("mmap", self.work / rel, "folios")
            f.update(where="native ext4", file="A", how="populated by read()")
            self.res["folios"].append(f)
        finally:
            self.stop_mount()
        # (b) read_ahead_kb sweep: cold read, cold mmap, warm mmap on a mounted, verified file
        for ra in self.args.ra_sweep:
            self.start_mount("off", ra_kb=ra)
            try:
                bdi = self.read_ahead_of_mount()
                self.helper_run("read", self.mnt / rel)
                cells = {(t, m): self.new_cell("A-copy", t, m, "", f" [read_ahead_kb={ra}]", goal=None)
                         for t, m in (("cold, mounted", "read"), ("cold, mounted", "mmap"), ("warm", "mmap"))}
                for r in range(self.rounds):
                    log(f"investigation: read_ahead_kb={ra} round {r + 1}/{self.rounds}")
                    for (temp, method), c in cells.items():
                        for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                            path = self.work / rel if side == "native" else self.mnt / rel
                            if temp == "warm":
                                self.helper_run(method, path)
                            else:
                                self.drop_caches()
                            if side == "native":
                                c["native"].append(self.helper_run(method, path)["secs"])
                            else:
                                run_ = self.timed_mount_run(method, path)
                                c["mount"].append(run_["secs"])
                                c["runs"].append(run_)
                for c in cells.values():
                    inv.append(dict(self.finish_cell(c), experiment="read_ahead_kb", variant=ra,
                                    bdi_read_ahead_kb=bdi))
            finally:
                self.stop_mount()

    def read_ahead_of_mount(self):
        st = os.stat(self.mnt)
        try:
            return int(Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
                       .read_text())
        except (OSError, ValueError):
            return None

    # ----------------------------------------------------------------------------------
    # 4. memory

    def memory(self) -> None:
        scenarios = [
            ("copy (--passthrough off)", "off", "A"),
            ("passthrough", "auto", "A"),
            ("recipe, copy mode", "auto", "B"),
        ]
        pins = ["off", "default"] if self.pin_supported else ["off"]
        for (label, pt, model), pin in [(sc, pin) for pin in pins for sc in scenarios]:
            if self.pin_supported:
                label = f"{label}, pinning {'off' if pin == 'off' else 'on'}"
            for shape in ("same path x4", "4 names, identical content"):
                if shape == "same path x4":
                    rels = [f"{model}/model.safetensors"] * 4
                else:
                    rels = [f"{model}/model.safetensors"] + [f"{model}-copy{i}/model.safetensors" for i in (1, 2, 3)]
                log(f"memory: {label}, {shape}")
                self.res["memory"].append(self.memory_scenario(label, pt, rels, shape, pin))

    def memory_scenario(self, label, pt, rels, shape, pin) -> dict:
        tag = f"{len(self.res['memory'])}"
        cg_daemon = self.cgroups.create(f"daemon{tag}")
        cg_readers = [self.cgroups.create(f"reader{tag}-{i}") for i in range(len(rels))]
        procs = []
        out = {"mode": label, "shape": shape, "paths": rels, "cgroup": self.cgroups.kind}
        self.start_mount(pt, cgroup=cg_daemon, pin=pin)
        try:
            inodes = {os.stat(self.mnt / r).st_ino for r in rels}
            size = os.stat(self.mnt / rels[0]).st_size
            self.drop_caches()
            s0 = self.stats()
            cached0 = meminfo()["Cached"]
            d0 = self.cgroups.stat(cg_daemon)
            cpu0 = self.daemon_cpu()
            t0 = time.perf_counter()
            for rel, cg in zip(rels, cg_readers):
                procs.append(subprocess.Popen(
                    ["sh", "-c", 'echo $$ > "$0/cgroup.procs"; exec "$@"', str(cg), str(self.helper), "hold",
                     str(self.mnt / rel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            ready = []
            for p in procs:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"reader {p.args} exited {p.wait()} before mapping the file")
                ready.append(json.loads(line)["secs"])
            wall = time.perf_counter() - t0
            readers = [self.cgroups.stat(cg) for cg in cg_readers]
            d1 = self.cgroups.stat(cg_daemon)
            cached1 = meminfo()["Cached"]
            s1 = self.stats()
            cpu1 = self.daemon_cpu()
            pinned = self.wait_pins() if pin != "off" else 0
            d2 = self.cgroups.stat(cg_daemon)
            rss = [proc_status(p.pid).get("RssFile", 0) for p in procs]
            out.update({
                "file_size": size,
                "distinct_inodes": len(inodes),
                "readers": len(rels),
                "readers_charged_bytes": sum(r["file"] for r in readers),
                "readers_charged_each": [r["file"] for r in readers],
                "readers_mapped_bytes": sum(r["file_mapped"] for r in readers),
                "daemon_charged_bytes": d1["file"] - d0["file"],
                "meminfo_cached_delta": cached1 - cached0,
                "reader_rssfile_each": rss,
                "daemon_read_requests": s1["read_requests"] - s0["read_requests"],
                "daemon_read_bytes": s1["read_bytes"] - s0["read_bytes"],
                "passthrough_opens": s1["passthrough_opens"] - s0["passthrough_opens"],
                "copy_opens": s1["copy_opens"] - s0["copy_opens"],
                "reader_secs_each": ready,
                "wall_secs_all_ready": wall,
                "daemon_cpu_secs": cpu1 - cpu0,
                "pinned_bytes": pinned,
                "daemon_charged_after_pinning": d2["file"] - d0["file"],
                "daemon_vmlck": sum(proc_status(p).get("VmLck", 0) for p in self.mount.daemon_pids),
            })
            out["total_charged_bytes"] = out["readers_charged_bytes"] + out["daemon_charged_bytes"]
        finally:
            for p in procs:
                try:
                    p.stdin.close()
                    p.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait()
            self.stop_mount()
            for cg in [*cg_readers, cg_daemon]:
                self.cgroups.remove(cg)
        return out

    # ----------------------------------------------------------------------------------
    # 5. metadata

    def metadata(self) -> None:
        native_root = self.work / "T"
        mount_root = self.mnt / "tree"
        rels = [f"d{d:03d}/f{f:03d}.txt" for d in range(self.args.tree_dirs) for f in range(self.args.tree_files)]
        lists = {}
        for side, root in (("native", native_root), ("mount", mount_root)):
            lists[side] = self.work / f"paths-{side}.txt"
            lists[side].write_text("".join(f"{root / r}\n" for r in rels))
        env = dict(os.environ, LC_ALL="C")

        def do(what, side):
            root = native_root if side == "native" else mount_root
            if what == "ls -lR":
                t = time.perf_counter()
                subprocess.run(["ls", "-lR", str(root)], stdout=subprocess.DEVNULL, env=env, check=True)
                return time.perf_counter() - t
            if what.startswith("getxattr"):
                paths = [str(root / r) for r in rels]
                t = time.perf_counter()
                for p in paths:
                    try:
                        os.getxattr(p, "system.posix_acl_access")
                    except OSError:
                        pass
                return time.perf_counter() - t
            if what == "os.stat loop (Python)":
                paths = [str(root / r) for r in rels]
                t = time.perf_counter()
                for p in paths:
                    os.stat(p)
                return time.perf_counter() - t
            return self.helper_run("stat", lists[side])["secs"]

        # ls -l calls lgetxattr(security.selinux) and getxattr(system.posix_acl_access) per
        # file; the getxattr row (no goal) shows what one such call costs on each side.
        whats = ["ls -lR", "os.stat loop (Python)", "stat loop (C)", "getxattr loop (Python)"]
        n = len(rels)
        cells = {(w, t): {"file": "tree", "label": f"{w}, {n} files", "serving": "metadata", "temp": t,
                          "method": w, "goal": None if w.startswith("getxattr") else 2.0, "ratio_def": "mount/native", "native": [], "mount": [],
                          "runs": []}
                 for w in whats for t in ("first touch", "warm")}
        self.start_mount("auto")
        try:
            for r in range(self.rounds):
                log(f"metadata round {r + 1}/{self.rounds}")
                for (what, temp), c in cells.items():
                    for side in (("native", "mount") if r % 2 == 0 else ("mount", "native")):
                        if temp == "first touch":
                            if side == "mount":  # a new daemon, nothing cached in the kernel
                                self.stop_mount()
                                self.start_mount("auto")
                            # dentries and inodes (ext4's metadata blocks may stay in its buffer cache)
                            self.drop_caches(2)
                        else:
                            do(what, side)  # once right before
                        c[side].append(do(what, side))
        finally:
            self.stop_mount()
        for c in cells.values():
            c["native_med"] = statistics.median(c["native"])
            c["mount_med"] = statistics.median(c["mount"])
            c["ratio"] = c["mount_med"] / c["native_med"]
            c["round_ratios"] = [m / n for n, m in zip(c["native"], c["mount"])]
            c["met"] = None if c["goal"] is None else c["ratio"] <= c["goal"]
            c["per_file_us"] = {"native": 1e6 * c["native_med"] / n, "mount": 1e6 * c["mount_med"] / n}
            self.res["metadata"].append(c)

    # ----------------------------------------------------------------------------------

    def calibrate(self) -> None:
        """Python os.readv loop vs the C helper on the same warm native file."""
        path = self.work / "A/model.safetensors"
        self.helper_run("read", path)
        c_times, py_times = [], []
        buf = bytearray(MiB)
        for _ in range(self.rounds):
            c_times.append(self.helper_run("read", path)["secs"])
            t = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.readv(fd, [buf]):
                    pass
            finally:
                os.close(fd)
            py_times.append(time.perf_counter() - t)
        self.res["calibration"] = {"warm_read_c_secs": statistics.median(c_times),
                                   "warm_read_python_secs": statistics.median(py_times)}

    def run(self) -> dict:
        a = self.args
        self.res["config"] = {
            "size_mib": a.size_mib, "rounds": a.rounds, "kernel": os.uname().release,
            "cpus": os.cpu_count(), "workdir": str(self.work), "modelfs": str(self.bin),
            "thp_enabled": read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
            "thp_shmem_enabled": read_text("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
            "ext4_bdi_read_ahead_kb": self.native_read_ahead(),
        }
        t0 = time.perf_counter()
        log(f"work directory {self.work}; generating files ({a.size_mib} MiB)")
        self.compile_helper()
        self.make_files()
        self.import_all()
        self.calibrate()
        self.res["loadavg"] = [("start", read_text("/proc/loadavg"))]
        if "reads" in a.sections:
            self.cold_fresh_cells()
            self.concurrent_cells()
            self.mounted_cells("auto")
            self.mounted_cells("off")
            self.pinned_cells()
        self.res["loadavg"].append(("before mmap", read_text("/proc/loadavg")))
        if "mmap" in a.sections:
            self.investigate()
        self.res["loadavg"].append(("before memory", read_text("/proc/loadavg")))
        if "memory" in a.sections:
            self.memory()
        self.res["loadavg"].append(("before metadata", read_text("/proc/loadavg")))
        if "metadata" in a.sections:
            self.metadata()
        self.res["loadavg"].append(("end", read_text("/proc/loadavg")))
        self.res["elapsed_secs"] = time.perf_counter() - t0
        return self.res

    def native_read_ahead(self):
        st = os.stat(self.work.parent)
        for dev in (f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", f"{os.major(st.st_dev)}:0"):
            try:
                return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())
            except (OSError, ValueError):
                continue
        return None

    def cleanup(self) -> None:
        if self.mount is not None:
            self.mount.cleanup()
            self.mount = None
        mountlib.cleanup_all()
        self.cgroups.remove_all()


# --------------------------------------------------------------------------------------
# memory cgroups (v2 if the memory controller is there, else v1)


class CgroupMem:
    def __init__(self):
        self.created: list[Path] = []
        ctrl = Path("/sys/fs/cgroup/cgroup.controllers")
        if ctrl.exists() and "memory" in ctrl.read_text().split():
            self.kind, self.base, self.keys = "v2", Path("/sys/fs/cgroup"), ("file", "file_mapped")
            sub = Path("/sys/fs/cgroup/cgroup.subtree_control")
            if "memory" not in sub.read_text().split():
                sub.write_text("+memory")
        else:
            path = None
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                parts = line.split(":", 2)
                if "memory" in parts[1].split(","):
                    path = parts[2]
            if path is None or not Path("/sys/fs/cgroup/memory").is_dir():
                raise RuntimeError("no memory cgroup controller (v1 or v2) found")
            self.kind, self.base = "v1", Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            self.keys = ("cache", "mapped_file")

    def create(self, name: str) -> Path:
        p = self.base / f"modelfs-bench-{os.getpid()}-{name}"
        p.mkdir()
        self.created.append(p)
        return p

    def stat(self, p: Path) -> dict:
        kv = {}
        for line in (p / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            kv[k] = int(v)
        return {"file": kv.get(self.keys[0], 0), "file_mapped": kv.get(self.keys[1], 0)}

    def remove(self, p: Path) -> None:
        for _ in range(50):
            try:
                p.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)  # a process is still leaving
        if p in self.created and not p.exists():
            self.created.remove(p)

    def remove_all(self) -> None:
        for p in list(self.created):
            try:
                for pid in (p / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), 9)
                    except OSError:
                        pass
            except OSError:
                pass
            self.remove(p)


def meminfo() -> dict:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) * 1024
    return out


def proc_status(pid) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def read_text(p) -> str:
    try:
        return Path(p).read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# report


def fmt_bytes(b) -> str:
    return f"{b / MiB:,.1f} MiB"


def spread(c) -> str:
    r = c.get("round_ratios") or []
    return f"{min(r):.2f}–{max(r):.2f}" if r else "—"


def report(res: dict) -> str:
    L = []
    cfg = res["config"]
    files = res["files"]
    L.append(f"\nmodelfs mount benchmark: kernel {cfg['kernel']}, {cfg['cpus']} CPUs, files of "
             f"{cfg['size_mib']} MiB, median of {cfg['rounds']} interleaved rounds")
    L.append(f"A: {fmt_bytes(files['A']['size'])}, storage {files['A']['storage']}; B: "
             f"{fmt_bytes(files['B']['size'])}, storage {files['B']['storage']} ({files['B']['chunks']} chunks; "
             f"{files['B']['model_new_bytes_at_import']} bytes of model B were new at import, "
             f"{100 * files['B']['model_shared_fraction']:.4f}% were A's)")
    L.append(f"read_ahead_kb: ext4 device {cfg.get('ext4_bdi_read_ahead_kb')}, mount (modelfs default) "
             f"{cfg.get('mount_read_ahead_kb')}")
    L.append("load average (1, 5, 15 min) during the run: " + "; ".join(f"{k}: {' '.join(v.split()[:3])}"
                                                                    for k, v in res.get("loadavg", [])))
    cal = res.get("calibration")
    if cal:
        L.append(f"calibration, warm native read() of A: C helper {cal['warm_read_c_secs']:.3f} s, "
                 f"Python os.readv loop {cal['warm_read_python_secs']:.3f} s")

    def cell_rows(cells, extra_label=False):
        L.append("\n| file / serving | when | access | native s | mount s | ratio | per-round range | goal | met? | "
                 "daemon: MiB read, avg request KiB, CPU s | open s (mount) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in cells:
            goal = "—" if c["goal"] is None else (f">= {c['goal']}" if c["ratio_def"] == "native/mount"
                                                  else f"<= {c['goal']}")
            met = "—" if c["met"] is None else ("yes" if c["met"] else "**NO**")
            d = "—"
            if "daemon_read_bytes_per_run" in c:
                d = (f"{c['daemon_read_bytes_per_run'] / MiB:,.0f}, {c['daemon_avg_request_kib']:,.0f}, "
                     f"{c['daemon_cpu_per_run']:.2f}")
            o = f"{c['open_secs_med']:.3f}" if "open_secs_med" in c else "—"
            L.append(f"| {c['label']} | {c['temp']} | {c['method']} | {c['native_med']:.4f} | {c['mount_med']:.4f} "
                     f"| {c['ratio']:.2f} | {spread(c)} | {goal} | {met} | {d} | {o} |")

    if res["cells"]:
        L.append("\n### Read throughput (ratio = native seconds / mount seconds; > 1: the mount is faster)")
        cell_rows(res["cells"])
        res_obj = [max(c["object_resident_before"] or [0]) for c in res["cells"]
                   if c["temp"].startswith("cold") and "pinning on" not in c["temp"]]
        L.append(f"\nCold runs (pinning off): largest store-object page-cache residency seen right before a timed "
                 f"cold mount read: {fmt_bytes(max(res_obj or [0]))} (fincore; 0 means truly cold).")
        pinned = [c for c in res["cells"] if "pinning on" in c["temp"]]
        if pinned:
            L.append("Pinning on: " + "; ".join(
                f"{c['label']} {c['method']}: {fmt_bytes(c['pinned_bytes'])} pinned (daemon VmLck "
                f"{fmt_bytes(c['daemon_vmlck'])}), store object resident before the cold read: "
                f"{fmt_bytes(min(c['object_resident_before']))}" for c in pinned if c["method"] == "read"))
    if res["investigation"]:
        L.append("\n### Warm mmap in copy mode (A via --passthrough off)")
        cell_rows(res["investigation"])
    if res["folios"]:
        L.append("\n### Folio sizes behind a mapping of the whole file (pagemap + kpageflags)")
        L.append("| where | how | large-folio pages | PMD-mapped | folio size: share of pages |")
        L.append("|---|---|---|---|---|")
        for f in res["folios"]:
            pres = max(1, f["present"])
            dist = ", ".join(f"{k} KiB {100 * v / pres:.0f}%" for k, v in
                             sorted(f["folio_kib_pages"].items(), key=lambda kv: int(kv[0])))
            L.append(f"| {f['where']} | {f['how']} | {100 * f['compound'] / pres:.1f}% | "
                     f"{f['file_pmd_mapped_kb'] / 1024:.0f} MiB | {dist} |")
    if res["memory"]:
        L.append("\n### Memory: 4 readers mmap and touch a whole file (each reader in its own cgroup, "
                 "the daemon in another)")
        L.append("| serving | readers | file size | inodes | charged to readers | charged to daemon | "
                 "total charged | total / size | Cached delta | daemon read_bytes (requests) | daemon CPU s | "
                 "all 4 ready s | pinned (daemon VmLck) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m in res["memory"]:
            L.append(f"| {m['mode']} | {m['shape']} | {fmt_bytes(m['file_size'])} | {m['distinct_inodes']} | "
                     f"{fmt_bytes(m['readers_charged_bytes'])} | {fmt_bytes(m['daemon_charged_bytes'])} | "
                     f"{fmt_bytes(m['total_charged_bytes'])} | {m['total_charged_bytes'] / m['file_size']:.2f} | "
                     f"{fmt_bytes(m['meminfo_cached_delta'])} | {fmt_bytes(m['daemon_read_bytes'])} "
                     f"({m['daemon_read_requests']}) | {m['daemon_cpu_secs']:.2f} | {m['wall_secs_all_ready']:.2f} | "
                     f"{fmt_bytes(m['pinned_bytes'])} ({fmt_bytes(m['daemon_vmlck'])}) |")
        L.append(f"(cgroup {res['memory'][0]['cgroup']}: memory.stat "
                 f"{'file' if res['memory'][0]['cgroup'] == 'v2' else 'cache'}; every reader's RssFile is the "
                 f"whole file, as each maps all of it)")
    if res["metadata"]:
        L.append("\n### Metadata (ratio = mount seconds / native seconds; goal <= 2)")
        L.append("| operation | when | native s | mount s | native us/file | mount us/file | ratio | per-round range "
                 "| goal | met? |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in res["metadata"]:
            goal = "—" if c["goal"] is None else f"<= {c['goal']}"
            met = "—" if c["met"] is None else ("yes" if c["met"] else "**NO**")
            L.append(f"| {c['label']} | {c['temp']} | {c['native_med']:.4f} | {c['mount_med']:.4f} | "
                     f"{c['per_file_us']['native']:.2f} | {c['per_file_us']['mount']:.2f} | {c['ratio']:.2f} | "
                     f"{spread(c)} | {goal} | {met} |")
    L.append(f"\nelapsed {res['elapsed_secs']:.0f} s")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory on the disk to test (default /var/tmp/modelfs-mount-bench); "
                         "removed at the end unless --keep")
    ap.add_argument("--size-mib", type=int, default=1024, help="size of each model file (default 1024)")
    ap.add_argument("--rounds", type=int, default=5, help="repetitions per cell, median reported (>= 3)")
    ap.add_argument("--tree-dirs", type=int, default=100)
    ap.add_argument("--tree-files", type=int, default=100, help="files per directory of the metadata tree")
    ap.add_argument("--ra-sweep", type=lambda s: [int(x) for x in s.split(",")], default=[128, 1024, 8192, 16384],
                    help="read_ahead_kb values for the copy-mode sweep (comma separated)")
    ap.add_argument("--sections", type=lambda s: s.split(","), default=["reads", "mmap", "memory", "metadata"],
                    help="comma-separated subset of reads,mmap,memory,metadata")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 MiB files, 20x50 tree, one ra value")
    ap.add_argument("--modelfs", type=Path, default=REPO / "target/release/modelfs")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--mount-arg", action="append", default=[], dest="mount_args",
                    help="extra argument for every `modelfs mount` (repeat), e.g. --mount-arg=--prefetch-window=0")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.tree_dirs, args.tree_files, args.ra_sweep = 64, 20, 50, [1024]
        args.rounds = min(args.rounds, 3)
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (medians of fewer are not worth printing)")
    if os.geteuid() != 0:
        print("mount_bench needs root (drop_caches, passthrough, cgroups, kpageflags)", file=sys.stderr)
        return 2
    if args.workdir is None:
        args.workdir = Path("/var/tmp/modelfs-mount-bench")
    return mountlib.run_bench(Bench, args, report)


if __name__ == "__main__":
    sys.exit(main())
