"""The packed experts with and without transparent huge pages, side by side in one process.

Packs the DeepSeek-V2-Lite layer (random weights, real shapes) twice, once with KT_SFT_HUGEPAGES=0
(4 KiB pages) and once with the default advice (2 MiB pages where THP allows), then times fwd+bwd
of both alternately, so machine noise hits both alike. Prints and saves medians.

    .venv/bin/python scripts/bench_hugepages.py --formats bf16,int8 --tokens 128,512 \
        --out bench_results/hugepages.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from kt_sft.bench.bench_kernels import KernelBenchConfig, make_inputs, make_weights
from kt_sft.engine import runtime
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.formats import ComputeMode


def anon_huge_kib() -> int:
    text = Path(f"/proc/{os.getpid()}/smaps_rollup").read_text() if Path("/proc/self/smaps_rollup").exists() else ""
    m = re.search(r"AnonHugePages:\s+(\d+) kB", text)
    return int(m.group(1)) if m else -1


def pack(gu, dn, fmt: str, huge: bool) -> CPUExperts:
    old = os.environ.get("KT_SFT_HUGEPAGES")
    os.environ["KT_SFT_HUGEPAGES"] = "1" if huge else "0"
    try:
        return CPUExperts.from_tensors(gu, dn, format=fmt)
    finally:
        os.environ.pop("KT_SFT_HUGEPAGES") if old is None else os.environ.__setitem__("KT_SFT_HUGEPAGES", old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="bf16,int8")
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--mode", default="bf16")
    ap.add_argument("--kernel-path", default=None, help="default: the engine's choice")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.kernel_path:
        runtime.set_kernel_path(args.kernel_path)
    cfg = KernelBenchConfig()
    gu, dn = make_weights(cfg)
    rows = []
    for fmt in args.formats.split(","):
        before = anon_huge_kib()
        small = pack(gu, dn, fmt, huge=False)
        mid = anon_huge_kib()
        huge = pack(gu, dn, fmt, huge=True)
        print(f"{fmt}: AnonHugePages grew by {mid - before} KiB (4 KiB pack), {anon_huge_kib() - mid} KiB (advised pack)")
        for ex in (small, huge):
            ex.compute_mode = ComputeMode.parse(args.mode)
        for t in (int(v) for v in args.tokens.split(",")):
            inp = make_inputs(cfg, t, "uniform")
            samples = {"4k": [], "huge": []}
            for r in range(args.repeats + 1):
                for name, ex in (("4k", small), ("huge", huge)):
                    x = inp["x"].clone().requires_grad_(True)
                    w = inp["w"].clone().requires_grad_(True)
                    t0 = time.perf_counter()
                    y = ex(x, inp["idx"], w)
                    t1 = time.perf_counter()
                    y.backward(inp["dy"])
                    t2 = time.perf_counter()
                    if r:  # the first round warms up
                        samples[name].append((t1 - t0, t2 - t1))
            row = {"format": fmt, "mode": args.mode, "tokens": t, "load_avg": os.getloadavg()[0]}
            for name, s in samples.items():
                row[name] = {"fwd_ms": 1e3 * statistics.median(a for a, _ in s),
                             "bwd_ms": 1e3 * statistics.median(b for _, b in s),
                             "total_ms": 1e3 * statistics.median(a + b for a, b in s)}
            row["speedup_total"] = row["4k"]["total_ms"] / row["huge"]["total_ms"]
            rows.append(row)
            print(f"{fmt} T={t}: 4 KiB pages fwd {row['4k']['fwd_ms']:.1f} bwd {row['4k']['bwd_ms']:.1f} ms | "
                  f"huge pages fwd {row['huge']['fwd_ms']:.1f} bwd {row['huge']['bwd_ms']:.1f} ms | "
                  f"total x{row['speedup_total']:.3f}", flush=True)
        del small, huge
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
