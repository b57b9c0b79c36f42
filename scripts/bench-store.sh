#!/usr/bin/env bash
# Store benchmark: dedup vs ideal and vs plain 64 KiB CDC, import
# time vs `cp -r`. Extra arguments go to tests/bench/store_bench.py
# (e.g. --base-mib 256 --rounds 3 --workdir /var/tmp/modelfs-bench).
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_python_env
cd "$REPO"
cargo build --release --quiet -p modelfs-cli -p modelfs-store --example cdc_baseline
exec "$PY" tests/bench/store_bench.py "$@"
