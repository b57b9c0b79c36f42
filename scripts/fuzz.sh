#!/usr/bin/env bash
# Fuzz every cargo-fuzz target in fuzz/ (format parsers, format detection,
# the store's metadata decoding and reader, name validation) for a fixed time
# each, one target at a time. Any crash, hang, or unbounded allocation fails.
# What each target checks: docs/reliability.md, "Fuzzing".
source "$(dirname "$0")/common.sh"

usage() {
    cat <<EOF
Usage: scripts/fuzz.sh [--seconds N] [TARGET...]

Build the fuzz targets (cargo fuzz, AddressSanitizer) and run each one (all
of them unless TARGETs are named) for N seconds with libFuzzer, seeded from
the committed corpus fuzz/corpus/<target>/. New corpus entries go to a
scratch directory, never into the repository. Prints the executions run per
target; exits 1 naming the target and the crash artifact if any target
crashes, hangs (-timeout=5) or allocates too much (-malloc_limit_mb=512,
-rss_limit_mb=1024).

  --seconds N   time per target (default 15, for CI; MODELFS_FUZZ_SECONDS
                sets the default)
  -h, --help    this help

Environment:
  MODELFS_FUZZ_SECONDS    default for --seconds
  MODELFS_FUZZ_WORKDIR    scratch directory to use and keep (new corpus
                          entries per target, logs); default: a temporary
                          directory, removed at the end
  MODELFS_FUZZ_SANITIZER  cargo fuzz --sanitizer (default address; none is
                          faster but catches less)

Long run (docs/reliability.md records one):
  MODELFS_FUZZ_WORKDIR=/tmp/modelfs-fuzz scripts/fuzz.sh --seconds 300

The toolchain is stable Rust: cargo fuzz needs nightly-only flags
(-Zsanitizer, sanitizer coverage), so this sets RUSTC_BOOTSTRAP=1.
EOF
}

seconds="${MODELFS_FUZZ_SECONDS:-15}"
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --seconds) seconds="${2:?--seconds needs a value}"; shift 2 ;;
        --seconds=*) seconds="${1#--seconds=}"; shift ;;
        -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case "$seconds" in
    '' | *[!0-9]* | 0) echo "--seconds must be a positive integer, not '$seconds'" >&2; exit 2 ;;
esac
sanitizer="${MODELFS_FUZZ_SANITIZER:-address}"

ensure_rust
# libfuzzer-sys compiles libFuzzer (C++).
command -v c++ >/dev/null || apt_install g++
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

cd "$REPO"
if [ -n "${MODELFS_FUZZ_WORKDIR:-}" ]; then
    work="$MODELFS_FUZZ_WORKDIR"
    mkdir -p "$work"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/modelfs-fuzz.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
fi
# store_read builds a small store under $TMPDIR; keep it in the scratch
# directory so a crashed run leaves nothing behind elsewhere.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"

say "cargo fuzz build (sanitizer: $sanitizer)"
build_started=$SECONDS
cargo fuzz build --sanitizer "$sanitizer"
say "built in $((SECONDS - build_started)) s"
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
# Run the built binaries directly rather than through `cargo fuzz run`, which
# costs two cargo invocations per target; with the same ASan options.
bin_dir="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"

# libFuzzer's -print_final_stats line, e.g. "stat::number_of_executed_units: 123".
final_stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }

failed=()
summary=()
for target in "${targets[@]}"; do
    say "fuzz $target for ${seconds} s"
    mkdir -p "$work/corpus/$target" "fuzz/artifacts/$target"
    log="$work/$target.log"
    started=$SECONDS
    # New entries go to the first corpus directory (scratch); the committed
    # seeds are only read. Crash inputs go where cargo fuzz puts them
    # (fuzz/artifacts/, ignored by git). libFuzzer stops once the whole
    # seconds elapsed exceed -max_total_time, i.e. after N+1 s, hence N-1.
    # The outer timeout is a backstop for a hang that libFuzzer's own
    # -timeout cannot interrupt.
    status=0
    timeout --kill-after=10 $((seconds + 120)) \
        "$bin_dir/$target" -artifact_prefix="fuzz/artifacts/$target/" \
        -max_total_time=$((seconds > 1 ? seconds - 1 : 1)) \
        -rss_limit_mb=1024 -malloc_limit_mb=512 -timeout=5 \
        -print_final_stats=1 "$work/corpus/$target" "fuzz/corpus/$target" >"$log" 2>&1 ||
        status=$?
    elapsed=$((SECONDS - started))
    execs="$(final_stat number_of_executed_units "$log")"
    line="$(printf '%-12s %9s execs in %4d s (%s exec/s, %s new units, peak RSS %s MiB)' \
        "$target" "${execs:-?}" "$elapsed" "$(final_stat average_exec_per_sec "$log")" \
        "$(final_stat new_units_added "$log")" "$(final_stat peak_rss_mb "$log")")"
    if [ "$status" -ne 0 ]; then
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
        tail -n 60 "$log" >&2
        failed+=("$target (exit $status; artifact: ${artifact:-none, see $log}; reproduce:
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $target ${artifact:-ARTIFACT})")
        line="$line  FAILED"
    fi
    echo "$line"
    summary+=("$line")
done

say "fuzz summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing failed:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    [ -n "${MODELFS_FUZZ_WORKDIR:-}" ] || trap - EXIT  # keep logs and corpus
    echo "logs and new corpus kept in $work" >&2
    exit 1
fi
