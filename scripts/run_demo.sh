#!/usr/bin/env bash
# The main job, from a fresh clone: set up, build a tiny Qwen3-MoE and its data, convert it for kt_sft
# (routed experts int8 in CPU memory), fine-tune it with the unmodified `llamafactory-cli train`,
# show the held-out loss falling, then ask the fine-tuned model some held-out questions.
# Everything lands under runs/. Extra arguments go to llamafactory-cli (e.g. max_steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KT_SFT_MEMORY_REPORT=1
.venv/bin/kt-sft doctor
.venv/bin/python scripts/build_fixtures.py --out runs/fixtures --arch qwen3_moe
.venv/bin/kt-sft convert --model runs/fixtures/models/qwen3_moe --out runs/kt/qwen3_moe-int8 --format int8 --force
.venv/bin/llamafactory-cli train yaml_configs/tiny_qwen3_moe_kt.yaml "$@"
.venv/bin/python - <<'PY'
import json
log = json.load(open("runs/tiny_qwen3_moe_kt/trainer_state.json"))["log_history"]
evals = [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e]
print("held-out eval loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in evals))
print(f"eval loss fell {100 * (1 - evals[-1][1] / evals[0][1]):.0f}% (plot: runs/tiny_qwen3_moe_kt/training_eval_loss.png)")
PY
.venv/bin/python scripts/chat_demo.py --model runs/kt/qwen3_moe-int8 --adapter runs/tiny_qwen3_moe_kt
