"""Build the offline test fixtures: tokenizer, tiny random MoE checkpoints, synthetic SFT dataset.

    python scripts/build_fixtures.py --out fixtures                      # every arch
    python scripts/build_fixtures.py --out fixtures --arch qwen3_moe deepseek_v3 --force

Deterministic (seeded) and offline; see kt_sft/fixtures.py for the layout, the on-disk expert key
names of each architecture, and the LLaMA-Factory settings (`template: chatml`,
`dataset_dir: <out>/data`, `dataset: kt_tiny_train`, `eval_dataset: kt_tiny_eval`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs a hub; fail fast if asked
    from transformers.utils import logging as hf_logging

    from kt_sft import fixtures

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model is noise here

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--arch", nargs="+", default=None, choices=fixtures.ARCHS, metavar="ARCH",
        help=f"model families to build (default: all of {', '.join(fixtures.ARCHS)})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    parser.add_argument("--seed", type=int, default=0, help="seed for tokenizer corpus, data and weights")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    manifest = fixtures.build_fixtures(
        args.out, archs=args.arch, force=args.force, seed=args.seed, vocab_size=args.vocab_size
    )
    print(
        f"[fixtures] {len(manifest['models'])} models, vocab {manifest['vocab']}, "
        f"template {manifest['llamafactory_template']!r} in {time.perf_counter() - start:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
