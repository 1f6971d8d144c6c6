#!/usr/bin/env bash
# Time-budgeted fuzz campaign over every input surface (issue #15; results in docs/reliability.md).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   targets: c_api (libFuzzer, needs clang-19 + libclang-rt-19-dev), pack, safetensors, engine_api (atheris)
#   bash scripts/fuzz.sh 60                 # one minute each
#   bash scripts/fuzz.sh --regress          # only replay the seed corpora + regressions (CI; seconds)
#
# Corpora: tests/fuzz/corpus/<target>/ (seeds, committed); new inputs found during a run go to
# build/fuzz/corpus/<target>/ (not committed). Crashes land in build/fuzz/crashes/<target>/; each one
# becomes a minimized regression test (tests/test_fuzz_regressions.py). Runs under nice -n 19 and waits
# while /tmp/BENCH_LOCK exists (someone is benchmarking). Prints executions per target.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SECS=60
REGRESS=0
TARGETS=()
for arg in "$@"; do
  case "$arg" in
    --regress) REGRESS=1 ;;
    [0-9]*) SECS=$arg ;;
    *) TARGETS+=("$arg") ;;
  esac
done
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(c_api pack safetensors engine_api)
mkdir -p build/fuzz
# the harnesses' scratch files (RAM-backed where /dev/shm exists), removed however the run ends
KT_FUZZ_TMP=$(mktemp -d "$([ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/kt_fuzz.XXXXXX")
export KT_FUZZ_TMP
trap 'rm -rf "$KT_FUZZ_TMP"' EXIT
while [ -e /tmp/BENCH_LOCK ]; do echo "[fuzz] /tmp/BENCH_LOCK present, waiting"; sleep 30; done

build_c_api() {
  local cc=${CLANG:-clang-19}
  if ! command -v "$cc" >/dev/null; then
    echo "[fuzz] $cc not found (apt-get install -y clang-19 libclang-rt-19-dev): skipping c_api" >&2
    return 1
  fi
  local srcs
  srcs=$("$PY" -c "import sys; sys.path.insert(0, 'native'); import build_ffi; \
print(' '.join('native/' + s for s in build_ffi.SOURCES if 'simde' not in s))")
  local stamp
  stamp=$(cat native/*.c native/*.h native/fuzz/*.c | sha1sum | cut -c1-16)
  if [ "$(cat build/fuzz/fuzz_moe_api.stamp 2>/dev/null)" != "$stamp" ]; then
    echo "[fuzz] building build/fuzz/fuzz_moe_api (clang, -fsanitize=fuzzer,address,undefined)"
    # clang ignores the sources' `#pragma GCC target`: each SIMD file gets its ISA as -m flags instead
    # (its code still runs only where kt_isa_supported says the CPU has that ISA)
    local objs=() f isa
    local avx2="-mavx2 -mfma -mf16c" avx512="-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16"
    for f in $srcs; do
      case "$f" in
        *avx2*) isa=$avx2 ;;
        *amx*) isa="$avx512 -mamx-tile -mamx-bf16 -mamx-int8" ;;
        *avx512*) isa=$avx512 ;;
        *) isa="" ;;
      esac
      # shellcheck disable=SC2086
      "$cc" -c -g -O1 -std=c11 -fno-math-errno -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all \
        -fno-omit-frame-pointer -Inative $isa "$f" -o "build/fuzz/$(basename "$f" .c).o" || return 1
      objs+=("build/fuzz/$(basename "$f" .c).o")
    done
    "$cc" -g -O1 -std=c11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
      -Inative native/fuzz/fuzz_moe_api.c "${objs[@]}" -lm -pthread -o build/fuzz/fuzz_moe_api || return 1
    echo "$stamp" > build/fuzz/fuzz_moe_api.stamp
  fi
}

status=0
for target in "${TARGETS[@]}"; do
  seeds=tests/fuzz/corpus/$target
  work=build/fuzz/corpus/$target
  crashes=build/fuzz/crashes/$target
  mkdir -p "$work" "$crashes"
  t0=$(date +%s)
  if [ "$target" = c_api ]; then
    build_c_api || continue
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
    if [ "$REGRESS" = 1 ]; then
      nice -n 19 build/fuzz/fuzz_moe_api -runs=0 "$seeds" 2>&1 | tail -3 || status=1
    else
      nice -n 19 build/fuzz/fuzz_moe_api -max_total_time="$SECS" -max_len=4096 -timeout=10 -rss_limit_mb=4096 \
        -artifact_prefix="$crashes/" -print_final_stats=1 "$work" "$seeds" 2>build/fuzz/c_api.log || status=1
      grep -E "stat::number_of_executed_units|stat::new_units_added|ERROR|SUMMARY" build/fuzz/c_api.log || true
    fi
  else
    # atheris harnesses: python process with the normal build; the kernels' own memory errors are the
    # sanitizer run's and the C harness's job
    if [ "$REGRESS" = 1 ]; then
      nice -n 19 "$PY" -P tests/fuzz/fuzz_"$target".py -runs=0 "$seeds" 2>&1 | tail -3 || status=1
    else
      nice -n 19 "$PY" -P tests/fuzz/fuzz_"$target".py -max_total_time="$SECS" -timeout=20 -rss_limit_mb=6144 \
        -artifact_prefix="$crashes/" -print_final_stats=1 "$work" "$seeds" 2>build/fuzz/"$target".log || status=1
      grep -E "stat::number_of_executed_units|stat::new_units_added|ERROR|Uncaught|SUMMARY" build/fuzz/"$target".log || true
    fi
  fi
  echo "[fuzz] $target: $(( $(date +%s) - t0 )) s"
done
exit $status
