#!/usr/bin/env bash
# Pinning benchmark: load A, drop caches, load variant B sharing most of A's
# tensors -- pinned mount vs --pin-budget 0 vs plain ext4. Extra arguments go to
# tests/bench/pin_bench.py (e.g. --base-mib 512 --rounds 3 --json).
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_fuse
ensure_python_env
cd "$REPO"
cargo build --release --quiet -p modelfs-cli
exec "$PY" tests/bench/pin_bench.py "$@"
