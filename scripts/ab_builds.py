"""Before/after of two builds of kt_sft, interleaved call by call (the two builds cannot share a process).

One worker process per tree (each imports kt_sft from its own tree, builds the kernel bench's
DeepSeek-V2-Lite layer from the same seed, packs it and waits for orders on stdin); the driver asks
them in turn, ABBA within every round, for one forward+backward of a case and collects the times.
Sequential runs of `kt-sft bench kernels` minutes apart moved by up to 1.3x on these shared hosts;
here both builds see the same minute of the machine, and the per-round ratio's median is reported.

    .venv/bin/python scripts/ab_builds.py --old /tmp/old --path avx2 --formats bf16,int8,int4 \\
        --modes bf16,f32 --tokens 128,512,2048 --rounds 6 --out bench_results/ab-avx2.json

--old is a tree of an earlier commit with its native module built in place
(`git archive <commit> | tar -x -C /tmp/old && cd /tmp/old && .venv/bin/python setup.py build_ext
--inplace`); --new defaults to this script's own tree. Both run under this interpreter.
Prints per case each build's median fwd / bwd / fwd+bwd ms and tok/s, and the median over rounds of
old time / new time (> 1: the new build is faster).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent.parent

# The worker: imports kt_sft from PYTHONPATH, answers one JSON line per order. It times the call
# itself rather than with bench_kernels._one_run: older trees lack that helper, and the worker must
# run the same code against both builds.
WORKER = r"""
import json, sys, time, torch
from kt_sft.bench.bench_kernels import KernelBenchConfig, make_inputs, make_weights
from kt_sft.engine import runtime
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.formats import ComputeMode

cfg = KernelBenchConfig(**json.loads(sys.argv[1]))
torch.set_num_threads(cfg.threads)
runtime.set_num_threads(cfg.threads)
runtime.set_kernel_path(sys.argv[2])
gate_up, down = make_weights(cfg)
packs, inputs = {}, {}
print(json.dumps({"ready": runtime.kernel_path()}), flush=True)
for line in sys.stdin:
    order = json.loads(line)
    fmt, mode, t = order["format"], order["mode"], order["tokens"]
    if fmt not in packs:
        packs[fmt] = CPUExperts.from_tensors(gate_up, down, format=fmt)
    if t not in inputs:
        inputs[t] = make_inputs(cfg, t, "uniform")
    experts, inp = packs[fmt], inputs[t]
    experts.compute_mode = ComputeMode.parse(mode)
    x = inp["x"].clone().requires_grad_(True)
    w = inp["w"].clone().requires_grad_(True)
    with torch.enable_grad():
        t0 = time.perf_counter()
        y = experts(x, inp["idx"], w)
        t1 = time.perf_counter()
    y.backward(inp["dy"])
    t2 = time.perf_counter()
    print(json.dumps({"fwd": t1 - t0, "bwd": t2 - t1}), flush=True)
"""


class Worker:
    def __init__(self, name: str, tree: pathlib.Path, cfg: dict, path: str):
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg), path], cwd="/",
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read()
        if hello.get("ready") != path:
            raise SystemExit(f"ab_builds: the {name} build runs path {hello.get('ready')!r}, not {path!r}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"ab_builds: the {self.name} worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, fmt: str, mode: str, t: int) -> dict:
        self.proc.stdin.write(json.dumps({"format": fmt, "mode": mode, "tokens": t}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=pathlib.Path, help="tree of the earlier build")
    ap.add_argument("--new", type=pathlib.Path, default=HERE, help="tree of the later build (default: this one)")
    ap.add_argument("--path", required=True, help="kernel path both builds run (e.g. avx2)")
    ap.add_argument("--formats", type=_list, default=["bf16", "int8", "int4"])
    ap.add_argument("--modes", type=_list, default=["bf16"])
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in _list(s)], default=[128, 512, 2048])
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds per case, after one warm-up round")
    ap.add_argument("--threads", type=int, default=2)
    for flag, field in (("--experts", "num_experts"), ("--top-k", "top_k"), ("--hidden", "hidden"),
                        ("--intermediate", "intermediate")):
        ap.add_argument(flag, dest=field, type=int, help="layer shape (default: the kernel bench's)")
    ap.add_argument("--out", help="JSON file for every sample and the summary")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    for tree in (args.old, args.new):
        if not (tree / "kt_sft" / "__init__.py").is_file():
            ap.error(f"{tree} holds no kt_sft package")

    cfg = {"threads": args.threads}
    cfg.update({f: getattr(args, f) for f in ("num_experts", "top_k", "hidden", "intermediate")
                if getattr(args, f) is not None})
    workers = {"old": Worker("old", args.old.resolve(), cfg, args.path),
               "new": Worker("new", args.new.resolve(), cfg, args.path)}
    cases, rows = [], []
    try:
        for t in args.tokens:
            for fmt in args.formats:
                for mode in args.modes:
                    samples = {"old": [], "new": []}
                    for r in range(args.rounds + 1):
                        order = ("old", "new") if r % 2 == 0 else ("new", "old")
                        for name in order + order[::-1]:
                            s = workers[name].run(fmt, mode, t)
                            if r:  # round 0 warms up (packs, inputs, scratch)
                                samples[name].append(s)
                    cases.append({"tokens": t, "format": fmt, "mode": mode, "samples": samples})
                    rows.append(_summary(t, fmt, mode, samples))
                    _print_row(rows[-1], header=len(rows) == 1)
    finally:
        for w in workers.values():
            w.close()
    if args.out:
        git = subprocess.run(["git", "-C", str(args.new), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        pathlib.Path(args.out).write_text(json.dumps(
            {"old_tree": str(args.old), "new_tree": str(args.new), "new_commit": git, "path": args.path,
             "config": cfg, "rounds": args.rounds, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
             "summary": rows, "cases": cases}, indent=1))
        print(f"wrote {args.out}")


def _summary(t: int, fmt: str, mode: str, samples: dict) -> dict:
    out = {"tokens": t, "format": fmt, "mode": mode}
    for name, runs in samples.items():
        out[f"{name}_fwd_ms"] = statistics.median(s["fwd"] for s in runs) * 1e3
        out[f"{name}_bwd_ms"] = statistics.median(s["bwd"] for s in runs) * 1e3
        total = statistics.median(s["fwd"] + s["bwd"] for s in runs)
        out[f"{name}_tok_s"] = t / total
    # two samples per build per round: pair them up in order
    ratios = [(o["fwd"] + o["bwd"]) / (n["fwd"] + n["bwd"]) for o, n in zip(samples["old"], samples["new"])]
    out["new_speedup_median"] = statistics.median(ratios)
    out["new_speedup_range"] = [min(ratios), max(ratios)]
    return out


def _print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'T':>5} {'fmt':>4} {'mode':>4} | {'old fwd/bwd ms':>16} {'tok/s':>6} | "
              f"{'new fwd/bwd ms':>16} {'tok/s':>6} | new speedup (median, range)")
    print(f"{row['tokens']:>5} {row['format']:>4} {row['mode']:>4} | "
          f"{row['old_fwd_ms']:7.1f}/{row['old_bwd_ms']:7.1f}  {row['old_tok_s']:6.1f} | "
          f"{row['new_fwd_ms']:7.1f}/{row['new_bwd_ms']:7.1f}  {row['new_tok_s']:6.1f} | "
          f"{row['new_speedup_median']:.3f} ({row['new_speedup_range'][0]:.2f}-{row['new_speedup_range'][1]:.2f})",
          flush=True)


if __name__ == "__main__":
    main()
