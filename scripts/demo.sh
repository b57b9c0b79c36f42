#!/usr/bin/env bash
# The main job on an embedded default: generate a small model family with the
# real writers (a base model, an identical copy, two fine-tunes, a re-sharded
# copy, the same weights as torch .bin, plus GGUF/ONNX models), import it into
# a store, print the dedup table, check every file reads back byte-exact, then
# mount the store and load the models through the mount with the real loaders.
#
#   MODELFS_STORE   store to use   (default: ~/.cache/modelfs/demo/store, recreated)
#   DEMO_BASE_MIB   base model size (default: 64)
#   DEMO_MOUNT      mount point     (default: ~/.cache/modelfs/demo/models; left mounted)
source "$(dirname "$0")/common.sh"
ensure_rust
ensure_fuse
ensure_python_env
cd "$REPO"

DEMO="$HOME/.cache/modelfs/demo"
STORE="${MODELFS_STORE:-$DEMO/store}"
FAMILY="$DEMO/family"
BASE_MIB="${DEMO_BASE_MIB:-64}"
MNT="${DEMO_MOUNT:-$DEMO/models}"

say "building modelfs (release)"
cargo build --release --quiet -p modelfs-cli
M="$REPO/target/release/modelfs"

say "generating a model family (base ${BASE_MIB} MiB) in $FAMILY"
rm -rf "$FAMILY"
"$PY" tests/modelfamily.py "$FAMILY" --base-mib "$BASE_MIB" >/dev/null

if grep -q " $MNT fuse.modelfs" /proc/mounts 2>/dev/null; then "$REPO/target/release/modelfs" umount --lazy "$MNT"; sleep 0.5; fi
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

say "mounting the store at $MNT"
mkdir -p "$MNT"
"$M" mount "$MNT" --daemon --log-file "$DEMO/mount.log"
ls -l "$MNT/demo" "$MNT/demo/ft-head"
say "loading models through the mount with the real loaders"
"$PY" - "$MNT/demo" "$FAMILY" <<'PYEOF'
import sys, torch
from safetensors.torch import load_file
mnt, fam = sys.argv[1], sys.argv[2]
for m in ["base", "ft-head", "ft-last"]:
    a, b = load_file(f"{mnt}/{m}/model.safetensors"), load_file(f"{fam}/{m}/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].flatten().view(torch.uint8), b[k].flatten().view(torch.uint8)) for k in a)
    print(f"safetensors {m}: {len(a)} tensors identical to the original")
sd = torch.load(f"{mnt}/torch-bin/pytorch_model.bin", mmap=True, weights_only=True)
print(f"torch.load(mmap=True) torch-bin: {len(sd)} tensors")
PYEOF
say "the same loads with tensor sharing on (modelfs exec): the fine-tunes map the base's pages"
"$M" exec -- "$PY" - "$MNT/demo" <<'PYEOF'
import sys
from safetensors.torch import load_file
from modelfs import share
for m in ["base", "ft-head", "ft-last"]:
    load_file(f"{sys.argv[1]}/{m}/model.safetensors")
s = share.stats()
print(f"{s['shared_tensors']} tensors ({s['shared_bytes'] / 2**20:.0f} MiB) mapped from the store's objects")
PYEOF
"$M" stats "$MNT"
echo "The store stays mounted at $MNT; unmount with: $M umount $MNT"
