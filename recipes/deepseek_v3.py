"""DeepSeek-V3 and DeepSeek-R1 (671B, FP8 source) with kt_sft: checks RAM / disk / threads / GPU, converts if needed, launches
yaml_configs/deepseek_v3_kt.yaml.
--dry-run prints the plan and the estimate (kt_sft/recipes.py says what is checked)."""

import sys

from kt_sft.recipes import main

if __name__ == "__main__":
    sys.exit(main("deepseek_v3"))
