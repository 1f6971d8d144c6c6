"""In-process A/B of kernel paths (and compute modes) on one DeepSeek-V2-Lite routed-experts layer.

The variants (every path x every mode) alternate inside every iteration (the first iteration is a warm-up), so a machine whose
speed drifts within minutes still gives a fair ratio; prints median tokens/s per variant and the ratio
to the first one. For a change that is not a path (two builds), run it once per build with
PYTHONPATH pointing at each build and compare in the same sitting.

    .venv/bin/python scripts/ab_kernel_paths.py --paths avx2,avx-vnni --formats int8,int4 --mode int8
    .venv/bin/python scripts/ab_kernel_paths.py --paths amx,avx512 --formats int4 --mode int8 --forward-only
    .venv/bin/python scripts/ab_kernel_paths.py --paths amx --formats int4 --mode bf16,int8
"""

import argparse
import statistics
import time

import torch

from kt_sft.bench.bench_kernels import KernelBenchConfig, make_inputs, make_weights
from kt_sft.engine import runtime
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.formats import ComputeMode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", required=True, help="comma-separated kernel paths; ratios are to the first")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--mode", default="int8", help="comma-separated compute modes (f32, bf16, int8)")
    ap.add_argument("--tokens", default="128,512,2048")
    ap.add_argument("--iterations", type=int, default=4, help="per path, the first one untimed")
    ap.add_argument("--forward-only", action="store_true", help="time the forward alone (no autograd)")
    args = ap.parse_args()
    paths, modes = args.paths.split(","), args.mode.split(",")
    variants = [(p, m) for p in paths for m in modes]
    for p in paths:
        if p not in runtime.available_kernel_paths():
            raise SystemExit(f"kernel path {p!r} is not available here: {runtime.available_kernel_paths()}")
    cfg = KernelBenchConfig()
    gate_up, down = make_weights(cfg)
    for fmt in args.formats.split(","):
        experts = CPUExperts.from_tensors(gate_up, down, format=fmt)
        for t in (int(v) for v in args.tokens.split(",")):
            inp = make_inputs(cfg, t, "uniform")
            times = {v: [] for v in variants}
            for _ in range(args.iterations):
                for v in variants:
                    runtime.set_kernel_path(v[0])
                    experts.compute_mode = ComputeMode(v[1])
                    x = inp["x"].clone().requires_grad_(not args.forward_only)
                    w = inp["w"].clone().requires_grad_(not args.forward_only)
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(not args.forward_only):
                        y = experts(x, inp["idx"], w)
                        if not args.forward_only:
                            y.backward(inp["dy"])
                    times[v].append(time.perf_counter() - t0)
            med = {v: statistics.median(s[1:]) for v, s in times.items()}
            what = "fwd" if args.forward_only else "fwd+bwd"
            print(f"{fmt} T={t} {what}: " + ", ".join(
                f"{p}/{m} {t / med[(p, m)]:.0f} tok/s ({med[variants[0]] / med[(p, m)]:.2f}x)" for p, m in variants),
                flush=True)


if __name__ == "__main__":
    main()
