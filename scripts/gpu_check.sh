#!/usr/bin/env bash
# Run on a lent GPU machine through the `device` tool, from the repo root (its Python 3.12 has torch
# with CUDA and transformers, but no cffi: carry a cffi wheel in .whl/, see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl cffi==2.0.0 pycparser==2.22   # here, once
#   python3 -m pip download --no-deps -d .whl peft==0.18.1 accelerate==1.11.0   # check 4 (pure Python)
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Builds the C extension in place with gcc, then runs scripts/gpu_check.py.
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
gcc --version | head -1
python3 -c "import sysconfig; print('python headers:', sysconfig.get_paths()['include'])"
python3 native/build_ffi.py > /dev/null
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 scripts/gpu_check.py
