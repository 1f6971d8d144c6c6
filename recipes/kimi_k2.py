"""Kimi-K2 (1T, DeepSeek-V3 architecture, FP8 source) with kt_sft: checks RAM / disk / threads / GPU, converts if needed, launches
yaml_configs/kimi_k2_kt.yaml.
--dry-run prints the plan and the estimate (kt_sft/recipes.py says what is checked)."""

import sys

from kt_sft.recipes import main

if __name__ == "__main__":
    sys.exit(main("kimi_k2"))
