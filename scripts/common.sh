# Shared set-up for scripts/demo.sh and scripts/test.sh: make sure the tools
# they need are installed, so both work on a fresh Debian machine with Rust.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Python environment lives outside the checkout so that fresh clones (and
# CI runs on the same machine) reuse it; it is rebuilt when requirements change.
VENV="${MODELFS_VENV:-$HOME/.cache/modelfs/venv}"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
    # Install Debian packages that are missing (only those), once.
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_python_env() {
    local req="$REPO/tests/requirements.txt"
    # The stamp covers the requirements and the in-tree package's metadata
    # (python/, installed editable: its code needs no reinstall).
    local stamp="$VENV/.requirements-$(cat "$req" "$REPO/python/pyproject.toml" | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt_install python3-venv python3-pip
    fi
    say "creating Python environment $VENV (numpy, safetensors, torch, transformers, gguf, onnx, pytest, modelfs hook)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r "$req"
    # The loader hook (python/modelfs) and its .pth line: MODELFS_SHARE=1 then
    # switches it on in every Python process of the environment.
    "$VENV/bin/pip" install -q -e "$REPO/python"
    "$PY" -m modelfs install-pth >/dev/null
    rm -f "$VENV"/.requirements-*
    touch "$stamp"
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: install Rust (rustup) first" >&2
        exit 1
    fi
}

ensure_cargo_tool() {
    # A cargo subcommand from crates.io, built once into ~/.cargo/bin.
    command -v "$1" >/dev/null && return 0
    say "installing $1"
    cargo install "$1" --locked --quiet
}

ensure_fuse() {
    # The mount needs /dev/fuse and fusermount3 (Debian package fuse3).
    apt_install fuse3
    # Debian's udev rule makes /dev/fuse 0666 so ordinary users can mount;
    # minimal containers create it 0600 (root only). The test suite mounts as
    # an ordinary user too, so give the device its standard mode.
    if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
        as_root chmod 0666 /dev/fuse
    fi
}
