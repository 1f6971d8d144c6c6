"""Mixtral-8x7B with kt_sft: checks RAM / disk / threads / GPU, converts if needed, launches
yaml_configs/mixtral_8x7b_kt.yaml.
--dry-run prints the plan and the estimate (kt_sft/recipes.py says what is checked)."""

import sys

from kt_sft.recipes import main

if __name__ == "__main__":
    sys.exit(main("mixtral_8x7b"))
