#!/usr/bin/env bash
# The engine under AddressSanitizer + UndefinedBehaviorSanitizer (gcc's libasan/libubsan).
#
#   bash scripts/sanitize.sh                 # engine numerics, bad-input, pack, format, fork/thread tests
#   bash scripts/sanitize.sh --quick         # the CI subset (see .ci/run)
#   KT_SFT_SAN_PATHS="scalar avx2" bash scripts/sanitize.sh   # only these kernel paths
#   bash scripts/sanitize.sh -- -k lora      # extra pytest arguments after --
#   bash scripts/sanitize.sh --thread        # ThreadSanitizer instead (engine threads, two Python threads)
#
# Builds a sanitized copy of the package under build/sanitize/ (never touches kt_sft/_kt_native*.so,
# so a normal build in the work tree keeps working), then runs pytest once per kernel path this CPU
# offers (KT_SFT_ISA), with the ASan runtime preloaded into Python. Any ASan or UBSan report aborts
# the process, so the run fails. Leak checking is off inside Python (the interpreter and torch
# allocate for the process lifetime); the engine's own leaks are checked by the C driver below, which
# runs the C API fuzz harness over its seed corpus with LeakSanitizer on (scripts/fuzz.sh when clang is
# present; else a gcc build of the same harness with a plain corpus driver).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
QUICK=0
THREAD=0
PYTEST_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --thread) THREAD=1 ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

OUT=build/sanitize
if [ "$THREAD" = 1 ]; then
  # ThreadSanitizer: a build of its own; the SIMDe twin only when asked for (it is the avx512 source again)
  export KT_SFT_SANITIZE=thread
  OUT=build/sanitize-thread
  [[ " ${KT_SFT_SAN_PATHS:-} " != *" avx512-simde "* ]] && export KT_SFT_NO_SIMDE=1
fi
SRC=$OUT/src
t0=$(date +%s)
rm -rf "$SRC"
mkdir -p "$SRC"
# the Python package without its normal native module; the sanitized one is built next to it
cp -r kt_sft "$SRC/kt_sft"
find "$SRC/kt_sft" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
# rebuilt only when native/ or the flags changed (the SIMDe file takes minutes under ASan)
# --quick leaves the avx512-simde twin out unless asked for (ASan+UBSan compile it for ~6 minutes)
if [ "$QUICK" = 1 ] && [[ " ${KT_SFT_SAN_PATHS:-} " != *" avx512-simde "* ]]; then export KT_SFT_NO_SIMDE=1; fi
stamp="$(cat native/*.c native/*.h native/*.py | sha1sum | cut -c1-16)-${KT_SFT_SANITIZE:-address,undefined}-${KT_SFT_NO_SIMDE:-}"
if [ "$(cat "$OUT/build/stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[sanitize] building the engine with -fsanitize=${KT_SFT_SANITIZE:-address,undefined}"
  rm -rf "$OUT/build" && mkdir -p "$OUT/build" && cp -r native "$OUT/build/native"
  (cd "$OUT/build" && KT_SFT_SANITIZE=${KT_SFT_SANITIZE:-address,undefined} "$OLDPWD/$PY" -c \
    "import sys; sys.path.insert(0, 'native'); import build_ffi; build_ffi.ffibuilder.compile(tmpdir='.')" \
    >"$OLDPWD/$OUT/build.log" 2>&1) || { cat "$OUT/build.log"; exit 1; }
  echo "$stamp" > "$OUT/build/stamp"
fi
cp "$(find "$OUT/build/kt_sft" -name '_kt_native*.so' | head -1)" "$SRC/kt_sft/"
echo "[sanitize] build ready after $(( $(date +%s) - t0 )) s"

if [ "$THREAD" = 1 ]; then
  export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
  # A report ends the process inside a test, where pytest holds stderr: reports go to files instead.
  # scripts/tsan.supp silences libraries that synchronize in ways TSan cannot see (not built with it).
  rm -f "$OUT"/tsan-report.*
  export TSAN_OPTIONS="suppressions=$PWD/scripts/tsan.supp:halt_on_error=1:exitcode=66:report_signal_unsafe=0:log_path=$PWD/$OUT/tsan-report"
else
  ASAN_LIB=$(gcc -print-file-name=libasan.so)
  UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
  export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
  # Python and torch: no leak report (process-lifetime allocations), new/delete pairs across libraries
  # and duplicate globals in torch's libraries are not ours to report.
  export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:print_summary=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
fi
export PYTHONPATH="$PWD/$SRC${PYTHONPATH:+:$PYTHONPATH}"
export KT_SFT_NUM_THREADS=${KT_SFT_NUM_THREADS:-2}

"$PY" -P -c "import kt_sft, sys; from kt_sft.engine import _native; assert kt_sft.__file__.startswith('$PWD/$SRC'), kt_sft.__file__; print('[sanitize] using', _native.ffi and kt_sft.__file__)"
AVAILABLE=$("$PY" -P -c "from kt_sft import engine; print(' '.join(engine.available_kernel_paths()))")
PATHS=""
for p in ${KT_SFT_SAN_PATHS:-$AVAILABLE}; do  # requested paths this CPU and build have, each once
  [[ " $AVAILABLE " == *" $p "* && " $PATHS " != *" $p "* ]] && PATHS="$PATHS $p"
done
if [ "$THREAD" = 1 ]; then
  # Every test that runs the engine on its worker threads, and two Python threads at once. Not the two
  # fork tests: TSan does not support a child that starts threads after a multi-threaded fork.
  TESTS=(tests/test_engine_numerics.py tests/test_expert_lora.py tests/test_int8_mode.py tests/test_recompute_cache.py
         tests/test_bad_input.py tests/test_fork_threads.py)
  SELECT=(--deselect tests/test_fork_threads.py::test_forward_in_child_after_forward_in_parent
          --deselect tests/test_fork_threads.py::test_fork_while_another_thread_is_inside_the_engine)
elif [ "$QUICK" = 1 ]; then
  TESTS=(tests/test_bad_input.py tests/test_fuzz_regressions.py tests/test_pack_file.py tests/test_formats.py
         tests/test_fork_threads.py tests/test_engine_numerics.py tests/test_int8_kernels.py)
  SELECT=(-k "not slow")
else
  TESTS=(tests/test_engine_numerics.py tests/test_bad_input.py tests/test_pack_file.py tests/test_formats.py
         tests/test_int8_mode.py tests/test_int8_kernels.py tests/test_expert_lora.py tests/test_recompute_cache.py
         tests/test_fork_threads.py
         tests/test_fuzz_regressions.py
         tests/test_avx512_path.py tests/test_amx_path.py)
  SELECT=()
fi
existing=()
for t in "${TESTS[@]}"; do [ -f "$t" ] && existing+=("$t"); done

status=0
for path in $PATHS; do
  echo "[sanitize] kernel path $path"
  # The kernel_path fixture loops over every path; KT_SFT_TEST_KERNEL_PATHS keeps only this one.
  # (this test assumes the session's default path is not scalar; it runs on every other path)
  skip=()
  [ "$path" = scalar ] && skip=(--deselect tests/test_engine_numerics.py::test_kernel_self_check_passes_and_catches_a_bad_path)
  if ! KT_SFT_ISA=$path KT_SFT_TEST_KERNEL_PATHS=$path "$PY" -P -m pytest -q -p no:cacheprovider \
      "${existing[@]}" "${SELECT[@]}" "${skip[@]}" "${PYTEST_EXTRA[@]}"; then
    echo "[sanitize] FAILED on kernel path $path" >&2
    status=1
  fi
done
if [ "$THREAD" = 1 ] && ls "$OUT"/tsan-report.* >/dev/null 2>&1; then
  cat "$OUT"/tsan-report.* >&2
  status=1
fi
echo "[sanitize] $(( $(date +%s) - t0 )) s, paths: $PATHS, status $status"
exit $status
