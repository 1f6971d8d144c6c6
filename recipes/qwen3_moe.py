"""Qwen3-MoE (30B-A3B or 235B-A22B) with kt_sft: checks RAM / disk / threads / GPU, converts if needed,
launches yaml_configs/qwen3_30b_a3b_kt.yaml or qwen3_235b_a22b_kt.yaml (--size). --dry-run prints the plan
and the estimate (kt_sft/recipes.py says what is checked)."""

import sys

from kt_sft.recipes import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    size = "30b"
    if "--size" in argv:
        i = argv.index("--size")
        size = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
    keys = {"30b": "qwen3_30b_a3b", "235b": "qwen3_235b_a22b"}
    if size not in keys:
        sys.exit(f"--size must be one of {', '.join(keys)}, got {size!r}")
    sys.exit(main(keys[size], argv))
