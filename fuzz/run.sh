#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each one in turn for a time bound,
# then prints the executions per target. Stable Rust: no sanitizer
# (`--sanitizer none`); cargo-fuzz's debug assertions turn overflow checks
# on, so an integer overflow is a crash. See docs/TESTING.md, "Fuzzing".
#
#   fuzz/run.sh [seconds-per-target] [target...]     (default: 60 s, all)
#
# Each target's corpus grows in fuzz/corpus/<target>/ (not committed),
# starting from fuzz/seeds/<target>/ and fuzz/regressions/<target>/. A
# failure leaves its input in fuzz/artifacts/<target>/; the script carries
# on with the other targets and exits 1 at the end. Replay an input with
#   cargo run -p tenantsync-fuzz-bodies --example replay -- <target> <file>
# and, once fixed, keep it in fuzz/regressions/<target>/.
#
# Targets run one after the other (the machine is shared). FUZZ_ARGS adds
# libFuzzer flags (e.g. FUZZ_ARGS=-max_len=65536); FUZZ_TARGET_DIR builds
# elsewhere than fuzz/target (CI keeps its build outside the clone).
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
all=(protocol_decode pk_value policy_parse rewrite changes_insert)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

opts=(--sanitizer none)
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then opts+=(--target-dir "$FUZZ_TARGET_DIR"); fi
build=(cargo fuzz build "${opts[@]}")
run=(cargo fuzz run "${opts[@]}")
echo "building the fuzz targets"
start=$SECONDS
"${build[@]}"
echo "built in $((SECONDS - start)) s"

dict_for() {
  case "$1" in
    protocol_decode | pk_value) echo dict/json.dict ;;
    *) echo dict/sql.dict ;;
  esac
}

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "seeds/$t" "regressions/$t"
  log="artifacts/$t/last-run.log"
  echo "fuzzing $t for ${secs}s"
  status=0
  "${run[@]}" "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -dict="$(dict_for "$t")" -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed+=("$t")
    echo "  FAILED (exit $status): see $log and artifacts/$t/" >&2
    grep -m1 -E "panicked at|ERROR: libFuzzer" "$log" >&2 || true
  fi
  summary+=("$(printf '%-16s %12s executions  %6s corpus  %s' "$t" "${execs:-?}" "$corpus" \
    "$([ "$status" -eq 0 ] && echo ok || echo FAILED)")")
done

echo
echo "target           executions in ${secs}s each (fuzzing took $((SECONDS - start)) s with the build)"
printf '%s\n' "${summary[@]}"
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
