#!/usr/bin/env bash
# The main job on an embedded default: generate a small model family with the
# real writers (a base model, an identical copy, two fine-tunes, a re-sharded
# copy, the same weights as torch .bin, plus GGUF/ONNX models), import it into
# a store, print the dedup table and check every file reads back byte-exact.
#
#   MODELFS_STORE   store to use   (default: ~/.cache/modelfs/demo/store, recreated)
#   DEMO_BASE_MIB   base model size (default: 64)
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_python_env
cd "$REPO"

DEMO="$HOME/.cache/modelfs/demo"
STORE="${MODELFS_STORE:-$DEMO/store}"
FAMILY="$DEMO/family"
BASE_MIB="${DEMO_BASE_MIB:-64}"

say "building modelfs (release)"
cargo build --release --quiet -p modelfs-cli
M="$REPO/target/release/modelfs"

say "generating a model family (base ${BASE_MIB} MiB) in $FAMILY"
rm -rf "$FAMILY"
"$PY" tests/modelfamily.py "$FAMILY" --base-mib "$BASE_MIB" >/dev/null

if [ -z "${MODELFS_STORE:-}" ]; then rm -rf "$STORE"; fi
export MODELFS_STORE="$STORE"
say "importing into $STORE"
for model in base base-copy ft-head ft-last resharded torch-bin gguf-model onnx-model onnx-external nested; do
    "$M" import "$FAMILY/$model" --name "demo/$model"
done
"$M" import "$FAMILY/hf-cache/models--org--tiny" --name demo/hf-tiny

say "models"
"$M" ls
say "how the fine-tune is stored"
"$M" ls demo/ft-head
say "dedup"
"$M" du

say "reading every file back and comparing"
n=0
while IFS= read -r -d '' f; do
    rel="${f#"$FAMILY"/}"
    model="${rel%%/*}"
    [ "$model" = hf-cache ] && continue
    "$M" cat "demo/$rel" | cmp -s - "$f" || { echo "MISMATCH: $rel" >&2; exit 1; }
    n=$((n + 1))
done < <(find "$FAMILY" -type f ! -name manifest.json -print0)
echo "$n files byte-identical"
"$M" verify
