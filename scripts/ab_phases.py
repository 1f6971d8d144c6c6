"""In-process A/B of environment-variable variants, timed per engine phase (KT_SFT_PROFILE).

For a change put behind an environment switch in a scratch build of the engine (read with getenv
inside the kernel, so it can change between calls): the variants alternate inside every iteration
(the first is a warm-up), and the engine's own phase timers (F0-F2, B0-B3, printed to stderr by
KT_SFT_PROFILE=1) are collected per variant. A phase the change does not touch is the control: on
a shared host whose speed drifts, whole-call timings moved by more than the effect being measured,
while per-phase medians of untouched phases stayed within a few percent (session 11).

    PYTHONPATH=/path/to/scratch/build .venv/bin/python scripts/ab_phases.py \\
        --path amx --format int4 --mode bf16 --tokens 2048 'MY_SWITCH=0' 'MY_SWITCH=1'

Prints, per phase, each variant's median time and the median over iterations of (first variant's
time / this variant's time): > 1 means faster than the first variant.
"""

import argparse
import os
import re
import statistics
import sys
import tempfile

from kt_sft.bench.bench_kernels import KernelBenchConfig, make_inputs, make_weights
from kt_sft.engine import runtime
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.formats import ComputeMode

PHASE_LINE = re.compile(r"\[kt_sft\] (\w+): \d+ tasks, ([\d.]+) ms")


def parse_variant(text: str) -> dict[str, str]:
    """'A=1,B=2' -> {'A': '1', 'B': '2'}; '' -> {} (the environment as it is)."""
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise SystemExit(f"ab_phases: variant item {item!r} is not NAME=VALUE")
        name, value = item.split("=", 1)
        out[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=VALUE[,NAME=VALUE...] per variant; '' = no change")
    ap.add_argument("--path", default="amx", help="kernel path")
    ap.add_argument("--format", default="int4", help="pack format")
    ap.add_argument("--mode", default="bf16", help="compute mode")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--routing", default="uniform", choices=["uniform", "zipf"])
    ap.add_argument("--iters", type=int, default=8, help="timed iterations (plus one warm-up)")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    names = sorted({k for v in variants for k in v})
    os.environ["KT_SFT_PROFILE"] = "1"  # read once, at the engine's first phase

    cfg = KernelBenchConfig()
    gu, dn = make_weights(cfg)
    runtime.set_kernel_path(args.path)
    experts = CPUExperts.from_tensors(gu, dn, format=args.format)
    experts.compute_mode = ComputeMode(args.mode)
    inp = make_inputs(cfg, args.tokens, args.routing)

    # times[variant][phase] = one time per timed iteration
    times: list[dict[str, list[float]]] = [{} for _ in variants]
    saved = os.dup(2)
    try:
        for it in range(args.iters + 1):
            for vi, v in enumerate(variants):
                for k in names:
                    os.environ.pop(k, None)
                os.environ.update(v)
                with tempfile.TemporaryFile(mode="w+") as log:
                    sys.stderr.flush()
                    os.dup2(log.fileno(), 2)
                    try:
                        x = inp["x"].clone().requires_grad_()
                        w = inp["w"].clone().requires_grad_()
                        experts(x, inp["idx"], w).backward(inp["dy"])
                    finally:
                        sys.stderr.flush()
                        os.dup2(saved, 2)
                    log.seek(0)
                    if it:
                        for m in PHASE_LINE.finditer(log.read()):
                            times[vi].setdefault(m.group(1), []).append(float(m.group(2)))
    finally:
        os.close(saved)

    print(f"{args.path} {args.format} {args.mode} T={args.tokens} {args.routing}, {args.iters} iterations; "
          "ratio = median over iterations of first / this (> 1: faster)")
    for phase in times[0]:
        cells = []
        for vi, label in enumerate(args.variants):
            med = statistics.median(times[vi].get(phase, [float("nan")]))
            cell = f"[{label or 'as is'}] {med:7.1f} ms"
            if vi:
                cell += f" {statistics.median(a / b for a, b in zip(times[0][phase], times[vi][phase])):.2f}x"
            cells.append(cell)
        print(f"{phase:4s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
