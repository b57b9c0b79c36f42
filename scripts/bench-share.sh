#!/usr/bin/env bash
# Sharing benchmark: a base and >= 7 fine-tunes, each loaded in its own process at once
# (safetensors load_file, transformers from_pretrained) from ext4, through the mount, through
# the mount with the preload library, and under `modelfs exec` -- memory, load time, outputs.
# Extra arguments go to tests/bench/share_bench.py (e.g. --base-mib 256 --rounds 3 --json).
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_fuse
ensure_python_env
cd "$REPO"
cargo build --release --quiet -p modelfs-cli -p modelfs-preload
exec "$PY" tests/bench/share_bench.py "$@"
