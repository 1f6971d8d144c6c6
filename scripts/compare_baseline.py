"""Same as `kt-sft bench compare`: kt_sft vs plain LLaMA-Factory + HF vs DeepSpeed ZeRO-Offload on one
LoRA SFT job (kt_sft/bench/compare.py; `--help` for the options, docs/benchmarks.md for the measured run).

    .venv/bin/python scripts/compare_baseline.py --quick
    .venv/bin/python scripts/compare_baseline.py --out bench_results/compare/mini --plots-dir docs/images
"""

import sys

from kt_sft.bench.compare import main

if __name__ == "__main__":
    sys.exit(main())
