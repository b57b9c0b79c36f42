"""Store benchmark: dedup against the ideal and against plain CDC, and import
speed against `cp -r` of the same directories to the same disk.

Run it through scripts/bench-store.sh, which builds the release binaries and the
Python environment first. Every figure is a ratio against a baseline measured
in the same run, interleaved round by round, because these machines are shared
and noisy. Source files are warm in the page cache for both the copy and the
import (they were just generated, and every round reads them once before it is
timed); the store and the copies go to the same filesystem as WORKDIR.

The duplicate-heavy import is timed twice: with the stored copies in the page
cache (the base was just imported, as when a fine-tune of a model being served
arrives), where known chunks are recognised by comparing bytes; and with the
store's objects evicted first, where every chunk is hashed with BLAKE3.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from mountlib import evict_page_cache  # noqa: E402

DEDUP_SET = ["base", "base-copy", "ft-head", "ft-last", "resharded", "torch-bin"]
DUPLICATES = DEDUP_SET[1:]


def run(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, **kw)


def timed(argv) -> float:
    t = time.perf_counter()
    run(argv)
    return time.perf_counter() - t


def sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def warm(paths):
    for p in paths:
        for f in Path(p).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(8 << 20):
                        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/var/tmp")) / "modelfs-bench")
    ap.add_argument("--base-mib", type=float, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modelfs", type=Path, default=REPO / "target/release/modelfs")
    ap.add_argument("--cdc-baseline", type=Path, default=REPO / "target/release/examples/cdc_baseline")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fam = work / "family"
    print(f"generating family (base {args.base_mib} MiB) in {fam}", file=sys.stderr)
    run([sys.executable, str(REPO / "tests/modelfamily.py"), str(fam), "--base-mib", str(args.base_mib),
         "--formats", "core"], stderr=subprocess.DEVNULL)
    manifest = json.loads((fam / "manifest.json").read_text())
    ideal = manifest["dedup_set_ideal"]
    m = str(args.modelfs)

    rows = {k: [] for k in ["cp_new", "sync_new", "import_new", "cp_dup", "sync_dup", "import_dup",
                            "import_dup_cold_store"]}
    store = None
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        warm([fam / d for d in DEDUP_SET])
        copies = work / f"copies{r}"
        copies.mkdir()
        store = work / f"store{r}"
        # All-new bytes: the base model into an empty store vs cp -r of base.
        sync()
        rows["cp_new"].append(timed(["cp", "-r", str(fam / "base"), str(copies / "base")]))
        rows["sync_new"].append(sync())
        rows["import_new"].append(timed([m, "--store", str(store), "import", str(fam / "base"), "--name", "base"]))
        # Mostly duplicates: the rest of the family, once base is stored.
        sync()
        rows["cp_dup"].append(timed(["cp", "-r", *[str(fam / d) for d in DUPLICATES], str(copies)]))
        rows["sync_dup"].append(sync())
        t = time.perf_counter()
        for d in DUPLICATES:
            run([m, "--store", str(store), "import", str(fam / d), "--name", d])
        rows["import_dup"].append(time.perf_counter() - t)
        # The same with the stored copies out of memory: a second store.
        cold = work / f"cold{r}"
        run([m, "--store", str(cold), "import", str(fam / "base"), "--name", "base"])
        sync()
        evict_page_cache(cold / "objects")
        t = time.perf_counter()
        for d in DUPLICATES:
            run([m, "--store", str(cold), "import", str(fam / d), "--name", d])
        rows["import_dup_cold_store"].append(time.perf_counter() - t)
        shutil.rmtree(cold)
        shutil.rmtree(copies)
        if r + 1 < args.rounds:
            shutil.rmtree(store)

    med = {k: statistics.median(v) for k, v in rows.items()}
    du = json.loads(run([m, "--store", str(store), "du", "--json"]).stdout)
    files = [str(p) for d in DEDUP_SET for p in sorted((fam / d).rglob("*")) if p.is_file()]
    cdc = json.loads(run([str(args.cdc_baseline), *files]).stdout)

    logical = du["logical_bytes"]
    res = {
        "base_mib": args.base_mib,
        "rounds": args.rounds,
        "logical_bytes": logical,
        "ideal_bytes": ideal["ideal_bytes"],
        "stored_bytes": du["stored_bytes"],
        "chunk_bytes": du["chunk_bytes"],
        "cdc64k_stored_bytes": cdc["stored_bytes"],
        "metadata_bytes": du["metadata_bytes"],
        "stored_over_ideal": du["stored_bytes"] / ideal["ideal_bytes"],
        "chunks_over_ideal": du["chunk_bytes"] / ideal["ideal_bytes"],
        "stored_over_cdc64k": du["stored_bytes"] / cdc["stored_bytes"],
        "metadata_over_logical": du["metadata_bytes"] / logical,
        "seconds": med,
        "import_new_over_cp": med["import_new"] / med["cp_new"],
        "import_new_over_cp_sync": med["import_new"] / (med["cp_new"] + med["sync_new"]),
        "import_dup_over_cp": med["import_dup"] / med["cp_dup"],
        "import_dup_over_cp_sync": med["import_dup"] / (med["cp_dup"] + med["sync_dup"]),
        "import_dup_cold_store_over_cp": med["import_dup_cold_store"] / med["cp_dup"],
        "import_dup_cold_store_over_cp_sync": med["import_dup_cold_store"] / (med["cp_dup"] + med["sync_dup"]),
    }

    mib = lambda b: f"{b / 2**20:,.2f} MiB"  # noqa: E731
    print(f"\nDedup ({len(DEDUP_SET)} models: {', '.join(DEDUP_SET)})")
    print(f"| measure | bytes | ratio |\n|---|---|---|")
    print(f"| logical (sum of file sizes) | {mib(logical)} | |")
    print(f"| ideal (unique tensor + unique non-tensor bytes) | {mib(ideal['ideal_bytes'])} | 1.000 |")
    print(f"| modelfs stored (allocated blocks of objects) | {mib(du['stored_bytes'])} | {res['stored_over_ideal']:.4f} x ideal |")
    print(f"| modelfs distinct chunk bytes | {mib(du['chunk_bytes'])} | {res['chunks_over_ideal']:.4f} x ideal |")
    print(f"| plain FastCDC 64 KiB, same files | {mib(cdc['stored_bytes'])} | {cdc['stored_bytes'] / ideal['ideal_bytes']:.4f} x ideal |")
    print(f"| catalog metadata | {mib(du['metadata_bytes'])} | {100 * res['metadata_over_logical']:.4f}% of logical |")
    print(f"\nImport speed (median of {args.rounds} interleaved rounds, seconds)")
    print("| workload | cp -r | cp -r + sync | modelfs import | import / cp -r | import / (cp -r + sync) |")
    print("|---|---|---|---|---|---|")
    for key, label in [("new", "all-new bytes (base into empty store)"),
                       ("dup", "mostly duplicates (5 variants), stored copies in memory"),
                       ("dup_cold_store", "mostly duplicates, stored copies evicted first")]:
        base_key = "dup" if key.startswith("dup") else key
        cp, sy, imp = med[f"cp_{base_key}"], med[f"sync_{base_key}"], med[f"import_{key}"]
        print(f"| {label} | {cp:.3f} | {cp + sy:.3f} | {imp:.3f} | {imp / cp:.2f} | {imp / (cp + sy):.2f} |")
    if args.json:
        print(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
