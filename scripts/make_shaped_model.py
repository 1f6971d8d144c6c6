"""Write a random-weight checkpoint with a real model's shapes (see kt_sft/bench/shaped_models.py).

    .venv/bin/python scripts/make_shaped_model.py --list
    .venv/bin/python scripts/make_shaped_model.py --shape deepseek_v2_lite_mini --out runs/shaped/dsv2-mini-hf
    .venv/bin/python scripts/make_shaped_model.py --shape deepseek_v2_lite --target kt --format int8 \
        --out runs/shaped/dsv2-lite-kt-int8
    .venv/bin/python scripts/make_shaped_model.py --shape deepseek_v2_lite --sparse-experts --out runs/shaped/dsv2-lite-hf-sparse

Free disk is checked before anything is written (`--list` shows what each shape needs).
"""

import argparse
import sys
from pathlib import Path

from kt_sft.bench import shaped_models as sm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print every shape and the disk it needs, then exit")
    ap.add_argument("--shape", choices=list(sm.SHAPES))
    ap.add_argument("--out", help="output directory (written atomically)")
    ap.add_argument("--target", choices=["hf", "kt"], default="hf", help="hf safetensors, or a kt_sft directory")
    ap.add_argument("--format", choices=["bf16", "int8", "int4"], default="int8", help="expert format (--target kt)")
    ap.add_argument("--sparse-experts", action="store_true", help="hf: routed experts as zero holes (no disk)")
    ap.add_argument("--data", default=str(sm.DEFAULT_DATA / "alpaca_en_demo.json"),
                    help="alpaca JSON the tokenizer also learns from (skipped when absent)")
    ap.add_argument("--tokenizer-vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace --out")
    a = ap.parse_args(argv)
    if a.list:
        print(sm.describe_shapes())
        return 0
    if not a.shape or not a.out:
        ap.error("--shape and --out are required (or --list)")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        ap.error(f"{out} exists and is not empty; pass --force to replace it")
    corpus = sm.alpaca_texts(a.data) if Path(a.data).is_file() else None
    tok = sm.build_shape_tokenizer(a.tokenizer_vocab, corpus)
    try:
        if a.target == "hf":
            report = sm.write_hf(a.shape, out, tok, a.seed, a.sparse_experts)
        else:
            report = sm.write_kt(a.shape, out, a.format, tok, a.seed, force=a.force)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {a.shape} ({a.target}) -> {out}: {report.get('disk_bytes') or report.get('pack_bytes')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
