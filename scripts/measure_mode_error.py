"""Error of each (format, compute mode) against a float64 reference, on fresh random inputs.

Two references per case: the float64 layer on the *dequantized* weights (the kernel's own error:
activation rounding and summation) and on the *original* weights (what a user sees: quantization
included). Prints a table and writes JSON (default bench_results/mode-error.json).

    .venv/bin/python scripts/measure_mode_error.py [--e 16 --h 512 --i 256 --t 64 --k 6 --seeds 3]
"""

import argparse
import json
import os
import statistics

import torch

from kt_sft import CPUExperts
from kt_sft.engine import reference as R


def rel(a, b):
    return float((a.detach().double() - b).norm() / b.norm())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--e", type=int, default=16)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--i", type=int, default=256)
    p.add_argument("--t", type=int, default=64)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="bench_results/mode-error.json")
    a = p.parse_args()
    cases = [("bf16", "f32"), ("bf16", "bf16"), ("int8", "f32"), ("int8", "bf16"), ("int8", "int8"),
             ("int4", "f32"), ("int4", "bf16"), ("int4", "int8")]
    rows = []
    for fmt, mode in cases:
        errs = {key: [] for key in ("y", "dx", "dw", "y_orig", "dx_orig", "dw_orig")}
        for seed in range(a.seeds):
            torch.manual_seed(seed)
            gate_up = torch.randn(a.e, 2 * a.i, a.h) / a.h**0.5
            down = torch.randn(a.e, a.h, a.i) / a.i**0.5
            ex = CPUExperts.from_tensors(gate_up, down, format=fmt, compute_mode=mode)
            gu, dn = ex.dequantized()
            idx = torch.argsort(torch.rand(a.t, a.e), dim=1)[:, : a.k].contiguous()
            w = torch.softmax(torch.randn(a.t, a.k), dim=1)
            x = torch.randn(a.t, a.h).to(torch.bfloat16 if mode == "bf16" else torch.float32)
            xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            y = ex(xx, idx, ww)
            dy = torch.randn(a.t, a.h)
            y.backward(dy.to(y.dtype))
            for suffix, (g, d) in (("", (gu, dn)), ("_orig", (gate_up, down))):
                args = (x.double(), idx, w.double(), g.double(), d.double())
                y_ref = R.moe_forward(*args)
                dx_ref, dw_ref = R.moe_backward(*args, dy.to(y.dtype).double())
                errs["y" + suffix].append(rel(y, y_ref))
                errs["dx" + suffix].append(rel(xx.grad, dx_ref))
                errs["dw" + suffix].append(rel(ww.grad, dw_ref))
        row = {"format": fmt, "mode": mode, **{k: statistics.median(v) for k, v in errs.items()}}
        rows.append(row)
        print(f"{fmt:5} {mode:5}  vs dequantized: y {row['y']:.2e} dx {row['dx']:.2e} dw {row['dw']:.2e}"
              f"   vs original: y {row['y_orig']:.2e} dx {row['dx_orig']:.2e} dw {row['dw_orig']:.2e}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"config": vars(a), "median_over_seeds": rows}, f, indent=2)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
