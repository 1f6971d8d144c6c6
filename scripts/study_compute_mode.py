"""Issue #13 item 5: should int8 packs train in the int8 compute mode by default?

The question is accuracy, in training: on a shaped checkpoint (H >= 1024), trained through
LLaMA-Factory, how far does kt_sft's per-step loss move from plain LLaMA-Factory on the *same* weights
(the int8 pack, dequantized) in the bf16 compute mode and in the int8 one? The int8 mode may become the
default for int8 packs only if its gap is at most 3x the bf16 mode's.

Steps (each reused when its output exists):
  1. convert the HF checkpoint to an int8 pack (kt-sft convert --format int8);
  2. export that pack without an adapter in fp32: an HF checkpoint whose experts are exactly the
     dequantized int8 weights (kt-sft export --dtype fp32);
  3. `kt-sft bench compare` in fp32 on the same data and order: plain_default on the export, then
     kt_int8 on the pack with KT_SFT_COMPUTE_MODE=bf16 and with =int8 (fp32 everywhere else, so the
     compute mode is the only difference from plain).

    .venv/bin/python scripts/study_compute_mode.py --hf-model runs/shaped/dsv2-mini-hf --steps 32 \
        --work runs/study-compute-mode --out bench_results/study_compute_mode.json \
        --plot docs/images/compute-mode-study.png

Prints and saves per-step losses, the gaps (max and mean over steps of |kt - plain|) and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "kt_sft.cli"]
RATIO_LIMIT = 3.0  # the rule: int8-mode gap <= 3x the bf16-mode gap


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def losses(result_dir: Path, mode: str) -> list[float]:
    record = json.loads((result_dir / f"{mode}.json").read_text())
    if record.get("status") != "ok":
        raise SystemExit(f"{result_dir / mode}: status {record.get('status')}: {record.get('error')}")
    steps = sorted(record["steps"], key=lambda s: s["step"])
    return [s["loss"] for s in steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-model", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--work", default="runs/study-compute-mode")
    ap.add_argument("--out", default="bench_results/study_compute_mode.json")
    ap.add_argument("--plot", default=None, help="PNG of the loss curves and gaps")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pack, deq = work / "kt-int8", work / "hf-int8-dequantized"
    if not (pack / "config.json").exists():
        run(CLI + ["convert", "--model", args.hf_model, "--out", pack, "--format", "int8", "--quiet"])
    if not (deq / "config.json").exists():
        run(CLI + ["export", "--model", pack, "--out", deq, "--dtype", "fp32", "--quiet"])
    common = ["--hf-model", deq, "--kt-model", f"int8={pack}", "--dtype", "fp32", "--steps", args.steps,
              "--warmup-steps", 1, "--batch", args.batch, "--cutoff", args.cutoff, "--timeout-s", 3600,
              "--work-dir", work / "compare-work"]
    curves = {}
    for label, mode, env in (("plain", "plain_default", {}),
                             ("kt bf16 mode", "kt_int8", {"KT_SFT_COMPUTE_MODE": "bf16"}),
                             ("kt int8 mode", "kt_int8", {"KT_SFT_COMPUTE_MODE": "int8"})):
        out = work / ("result-" + label.replace(" ", "-"))
        if not (out / f"{mode}.json").exists():
            run(CLI + ["bench", "compare", *common, "--modes", mode, "--out", out], env=env)
        curves[label] = losses(out, mode)
    plain = curves["plain"]
    report = {"hf_model": str(args.hf_model), "steps": args.steps, "batch": args.batch, "cutoff": args.cutoff,
              "losses": curves, "gaps": {}}
    for label in ("kt bf16 mode", "kt int8 mode"):
        gaps = [abs(a - b) for a, b in zip(curves[label], plain)]
        report["gaps"][label] = {"max": max(gaps), "mean": statistics.mean(gaps), "per_step": gaps}
    g16, g8 = report["gaps"]["kt bf16 mode"], report["gaps"]["kt int8 mode"]
    report["ratio_max"] = g8["max"] / g16["max"] if g16["max"] else float("inf")
    report["ratio_mean"] = g8["mean"] / g16["mean"] if g16["mean"] else float("inf")
    report["int8_default_allowed"] = report["ratio_max"] <= RATIO_LIMIT and report["ratio_mean"] <= RATIO_LIMIT
    print(f"{'step':>4} {'plain':>9} {'bf16 mode':>10} {'int8 mode':>10}")
    for i, p in enumerate(plain):
        print(f"{i + 1:>4} {p:9.5f} {curves['kt bf16 mode'][i]:10.5f} {curves['kt int8 mode'][i]:10.5f}")
    print(f"loss gap to plain, max / mean over {len(plain)} steps: bf16 mode {g16['max']:.2e} / {g16['mean']:.2e}, "
          f"int8 mode {g8['max']:.2e} / {g8['mean']:.2e}; ratio {report['ratio_max']:.2f} / {report['ratio_mean']:.2f} "
          f"(limit {RATIO_LIMIT}) -> int8 default {'allowed' if report['int8_default_allowed'] else 'NOT allowed'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        steps = range(1, len(plain) + 1)
        for label, values in curves.items():
            ax1.plot(steps, values, label=label)
        ax1.set(xlabel="step", ylabel="training loss", title="int8 pack, fp32 model: loss per step")
        ax1.legend()
        for label in ("kt bf16 mode", "kt int8 mode"):
            ax2.semilogy(steps, [max(g, 1e-9) for g in report["gaps"][label]["per_step"]], label=label)
        ax2.set(xlabel="step", ylabel="|loss - plain loss|", title="gap to plain LLaMA-Factory (same weights)")
        ax2.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
