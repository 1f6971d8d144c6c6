"""RAM / disk / GPU estimates for the real-model YAMLs in yaml_configs/ (the numbers in their headers).

    .venv/bin/python scripts/estimate_moe_memory.py [--json OUT.json]

The logic lives in kt_sft/memory_estimate.py (the recipes use it too).
"""

from kt_sft.memory_estimate import (  # noqa: F401  (re-exported: tests/test_yaml_configs.py reads them)
    BITS,
    MODELS,
    checkpoint_cache_bytes,
    count,
    gpu_estimate,
    pack_bytes,
)
from kt_sft.memory_estimate import main

if __name__ == "__main__":
    main()
