#!/usr/bin/env bash
# Mount benchmark: read throughput through `modelfs mount` (kernel
# passthrough and copy mode, cold and warm, read() and mmap) vs ext4, the
# memory charged when several readers map one model, and metadata speed.
# Needs root. Extra arguments go to tests/bench/mount_bench.py
# (e.g. --size-mib 1024 --rounds 3 --json, or --quick for a smoke run).
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_fuse
apt_install gcc util-linux   # the timed reader is a small C program; fincore
ensure_python_env
cd "$REPO"
cargo build --release --quiet -p modelfs-cli
exec "$PY" tests/bench/mount_bench.py "$@"
