#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust unit and integration tests,
# a short fuzz run of every cargo-fuzz target (scripts/fuzz.sh), and the
# Python suite that drives the real binary with files written by the real
# libraries (safetensors, torch, gguf, onnx), and real FUSE mounts read by
# unmodified loaders (onnxruntime, TensorFlow, ...). Installs what it needs.
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_fuse
# systemd-analyze (unit checks) and /bin/kill (the unit's ExecReload).
apt_install systemd procps
ensure_python_env
cd "$REPO"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
say "cargo machete (declared dependencies nothing uses)"
ensure_cargo_tool cargo-machete
cargo machete
say "cargo build --all-features"
cargo build --workspace --all-features --quiet
say "cargo test --all-features"
cargo test --workspace --all-features --quiet
say "fuzz (short run)"
"$REPO/scripts/fuzz.sh"
say "pytest tests/"
MODELFS_BIN="$REPO/target/debug/modelfs" "$PY" -m pytest "$REPO/tests" -q -p no:cacheprovider "$@"
