#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs kt_sft with its pinned CPU stack, then the training stack
# (LLaMA-Factory 0.9.5 and friends, scripts/install_train_stack.sh). Idempotent: a second run takes
# ~30 s. First run: ~1 min for torch + kt_sft, ~2-5 min for the training stack.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing later pulls a CUDA build.
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch
# SIMDe's headers let the build add the emulated avx512 kernel path (a test path; optional outside CI).
if [ ! -f /usr/include/simde/x86/avx512.h ] && [ -z "${SIMDE_INCLUDE_DIR:-}" ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
  echo "[setup] installing libsimde-dev (SIMDe headers for the avx512-simde test path)"
  apt-get install -y -q libsimde-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null; } \
    || echo "[setup] could not install libsimde-dev: the avx512-simde path will be absent"
fi
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
bash scripts/install_train_stack.sh .venv
.venv/bin/python -c "import kt_sft, torch; from kt_sft import engine; print('[setup] kt_sft', kt_sft.__version__, '| torch', torch.__version__, '| kernels:', engine.kernel_path())"
