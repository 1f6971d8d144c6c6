"""DeepSeek-V2-Lite (16B) with kt_sft: checks RAM / disk / threads / GPU, converts if needed, launches
yaml_configs/deepseek_v2_lite_kt.yaml.
--dry-run prints the plan and the estimate (kt_sft/recipes.py says what is checked)."""

import sys

from kt_sft.recipes import main

if __name__ == "__main__":
    sys.exit(main("deepseek_v2_lite"))
