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
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
bash scripts/install_train_stack.sh .venv
.venv/bin/python -c "import kt_sft, torch; from kt_sft import engine; print('[setup] kt_sft', kt_sft.__version__, '| torch', torch.__version__, '| kernels:', engine.kernel_path())"
