"""PNG plots of a `kt-sft bench compare` result directory, made from its JSON files only.

    .venv/bin/python -m kt_sft.bench.compare_plots bench_results/compare/RUN [--dest docs/images]

throughput.png (tokens/s per mode, and the median step split into routed experts / shared + dense MLP /
attention / rest), memory.png (VmHWM with the peak RssAnon and RssFile beside it) and loss.png (loss per step).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SPLIT = (("routed_experts", "routed experts"), ("shared_and_dense_mlp", "shared + dense MLP"),
         ("attention", "attention"), ("rest", "rest"))


def _load(run_dir: Path) -> tuple[dict, dict[str, dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    runs = {m: json.loads((run_dir / f"{m}.json").read_text()) for m in summary["runs"]
            if (run_dir / f"{m}.json").exists()}
    return summary, runs


def _save(fig, ax, modes: list[str] | None, ylabel: str, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if modes is not None:
        ax.set_xticks(range(len(modes)), modes, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(run_dir: str | Path, dest: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    summary, runs = _load(run_dir)
    modes = list(summary["runs"])
    title = f"{summary['config']['shape']}, batch {summary['config']['batch']} x cutoff {summary['config']['cutoff']}, " \
            f"{summary['config']['threads']} threads, {summary.get('dtype', '?')}"
    paths = []

    fig, (ax_tps, ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(modes):
        r = summary["runs"][m]
        tps, split = r["tokens_per_s"], r["split_s"]
        if not tps:
            ax_tps.text(i, 0, r["status"], ha="center", va="bottom", rotation=90, color="crimson")
            continue
        ax_tps.bar(i, tps, color="C0" if m.startswith("kt_") else "C7")
        ax_tps.text(i, tps, f"{tps:.1f}", ha="center", va="bottom", fontsize=8)
        bottom = 0.0
        for j, (key, label) in enumerate(SPLIT):
            ax.bar(i, split.get(key, 0.0), bottom=bottom, color=f"C{j}", label=label if i == 0 else None)
            bottom += split.get(key, 0.0)
    ax_tps.set_xticks(range(len(modes)), modes, rotation=20)
    ax_tps.set_ylabel("tokens/s (steps after warm-up)")
    ax_tps.set_title(f"Throughput: {title}", fontsize=9)
    paths.append(_save(fig, ax, modes, "median step time (s), split by module", "Where a step goes",
                       run_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.27
    for j, (key, label) in enumerate((("vmhwm_gib", "VmHWM (peak RSS)"), ("rss_anon_gib", "peak RssAnon"),
                                      ("rss_file_gib", "peak RssFile"))):
        vals = [summary["runs"][m]["memory"].get(key) or 0.0 for m in modes]
        ax.bar([i + (j - 1) * width for i in range(len(modes))], vals, width, label=label, color=f"C{j}")
    for i, m in enumerate(modes):
        if summary["runs"][m]["status"] != "ok":
            ax.text(i, 0, summary["runs"][m]["status"], ha="center", va="bottom", rotation=90, color="crimson")
    paths.append(_save(fig, ax, modes, "GiB", f"Host memory: {title}", run_dir / "memory.png"))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for m, r in runs.items():
        pts = [(s["step"], s["loss"]) for s in r.get("steps", []) if s.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xlabel("step")
    paths.append(_save(fig, ax, None, "train loss", f"Loss per step: {title}", run_dir / "loss.png"))

    if dest:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        prefix = f"compare-{summary['config']['shape']}{'-expert-lora' if summary['config']['expert_lora'] else ''}-"
        for p in list(paths):
            shutil.copyfile(p, dest / (prefix + p.name))
            paths.append(dest / (prefix + p.name))
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    dest = argv[argv.index("--dest") + 1] if "--dest" in argv else None
    for p in make_plots(argv[0], dest):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
