#!/usr/bin/env bash
# Sets up the environment, reports the machine, then benchmarks the native expert engine on one
# DeepSeek-V2-Lite-shaped MoE layer against transformers' own experts (results in bench_results/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/kt-sft doctor
exec .venv/bin/kt-sft bench kernels --tokens 128,512 --formats bf16,int8,int4 "$@"
