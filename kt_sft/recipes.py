"""What the thin launchers in recipes/ share: check this machine against what a model needs, convert
if needed, then `llamafactory-cli train` the model's YAML.

    .venv/bin/python recipes/deepseek_v2_lite.py --model HF_DIR --kt-dir KT_DIR --dataset-dir DIR --output-dir DIR
    .venv/bin/python recipes/deepseek_v2_lite.py ... --dry-run       # the plan and the estimate, nothing run

Checks (numbers from kt_sft.memory_estimate, exact parameter counts of the public configs):
* RAM: the expert pack must stay resident (it is memory-mapped; evicted pages are re-read every step)
  plus the checkpoint cache and, without a GPU, the non-expert weights, LoRA state and activations
  (`host_estimate`) <= MemAvailable;
* disk: the converted directory (pack + non-expert bf16) <= free space where it goes, when converting;
* threads: at least `MIN_THREADS` usable CPUs (the experts' kernels scale with cores);
* GPU: `gpu_estimate` <= the first GPU's memory when there is one; without one the run is CPU-only
  (`use_cpu=true`), which is refused for models whose non-expert part alone exceeds RAM.
A failed check refuses with the numbers; `--force` launches anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kt_sft import environment
from kt_sft.memory_estimate import GB, MODELS, count, gpu_estimate, host_estimate, pack_bytes

ROOT = Path(__file__).resolve().parent.parent
MIN_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Recipe:
    key: str               # kt_sft.memory_estimate.MODELS key
    default_format: str    # expert format when --format is not given
    note: str = ""


RECIPES = {r.key: r for r in (
    Recipe("deepseek_v3", "int4", "DeepSeek-V3 / R1: FP8 source, converted straight to int4 (368 GB pack)"),
    Recipe("kimi_k2", "int4", "Kimi-K2: DeepSeek-V3 architecture, 1T parameters"),
    Recipe("qwen3_30b_a3b", "int8"),
    Recipe("qwen3_235b_a22b", "int4"),
    Recipe("mixtral_8x7b", "int8"),
    Recipe("deepseek_v2_lite", "int8"),
)}


@dataclasses.dataclass
class Check:
    what: str
    need: float
    have: float | None
    unit: str = "GB"

    @property
    def ok(self) -> bool:
        return self.have is None or self.need <= self.have

    def line(self) -> str:
        have = "unknown" if self.have is None else f"{self.have:.1f} {self.unit}"
        return f"  [{'ok' if self.ok else 'NO'}] {self.what}: need {self.need:.1f} {self.unit}, have {have}"


def gpu_memory_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GB
    except ImportError:
        pass
    return None


def plan(key: str, fmt: str, kt_dir: Path, need_convert: bool, gpu_gb: float | None, mem_available_gb: float | None,
         disk_free_gb: float | None, threads: int | None, cutoff_len: int | None = None) -> dict:
    """The estimate and the checks for one model; pure (the machine facts are arguments)."""
    m = MODELS[key]
    c = count(m["config"])
    seq, rank = cutoff_len or m["cutoff_len"], m["lora_rank"]
    host = host_estimate(c, fmt, seq, batch=1, gpu=gpu_gb is not None, rank=rank)
    converted = pack_bytes(c, fmt) + c["non_expert"] * 2
    checks = [Check("RAM (pack resident + checkpoint cache" + ("" if gpu_gb else " + non-expert model on the CPU")
                    + " + base)", host["total"] / GB, mem_available_gb),
              Check("usable CPU threads", MIN_THREADS, threads, "threads")]
    if need_convert:
        checks.append(Check(f"disk for the converted model in {kt_dir.parent}", converted / GB, disk_free_gb))
    gpu = gpu_estimate(c, seq, rank)
    if gpu_gb is not None:
        checks.append(Check(f"GPU memory (LoRA bf16, batch 1, cutoff {seq})", gpu["total"] / GB, gpu_gb))
    return {"model": key, "repo": m["repo"], "yaml": m["yaml"], "format": fmt, "cutoff_len": seq, "routed_params": c["routed"],
            "non_expert_params": c["non_expert"], "host_bytes": host, "converted_bytes": converted,
            "gpu_bytes": gpu["total"], "checks": checks, "fits": all(ch.ok for ch in checks)}


def _commands(args, p: dict, need_convert: bool, gpu: bool) -> list[list[str]]:
    bindir = Path(sys.executable).parent
    cmds = []
    if need_convert:
        cmds.append([str(bindir / "kt-sft"), "convert", "--model", str(args.model or "HF_DIR"), "--out", str(args.kt_dir),
                     "--format", p["format"]])
    overrides = [f"model_name_or_path={args.kt_dir}", f"output_dir={args.output_dir}"]
    if args.dataset_dir:
        overrides.append(f"dataset_dir={args.dataset_dir}")
    if args.cutoff_len:
        overrides.append(f"cutoff_len={args.cutoff_len}")
    if not gpu:  # the YAMLs are written for a GPU; without one the non-expert part trains on the CPU
        overrides += ["use_cpu=true", "bf16=true"]
    cmds.append([str(bindir / "llamafactory-cli"), "train", str(ROOT / "yaml_configs" / p["yaml"]), *overrides,
                 *args.overrides])
    return cmds


def main(key: str, argv: list[str] | None = None) -> int:
    recipe = RECIPES[key]
    m = MODELS[key]
    ap = argparse.ArgumentParser(
        description=f"Fine-tune {m['repo']} with kt_sft: check, convert if needed, launch yaml_configs/{m['yaml']}. "
                    + recipe.note)
    ap.add_argument("--model", help="the Hugging Face checkpoint directory (needed when --kt-dir is not converted yet)")
    ap.add_argument("--kt-dir", required=True, type=Path, help="the kt_sft directory (written by the conversion)")
    ap.add_argument("--format", default=recipe.default_format, choices=["bf16", "int8", "int4"], help="expert format")
    ap.add_argument("--dataset-dir", help="LLaMA-Factory dataset_dir (else the YAML's)")
    ap.add_argument("--output-dir", default=f"runs/{key}-kt-lora", help="LLaMA-Factory output_dir")
    ap.add_argument("--cutoff-len", type=int, help=f"tokens per sample (default the YAML's {m['cutoff_len']}); "
                    "the estimate uses it too")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the estimate; run nothing")
    ap.add_argument("--force", action="store_true", help="launch even if a check fails")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for llamafactory-cli train")
    args = ap.parse_args(argv)

    need_convert = not (args.kt_dir / "config.json").is_file()
    if need_convert and not args.model and not args.dry_run:
        ap.error(f"{args.kt_dir} is not converted yet: pass --model HF_DIR")
    probe = args.kt_dir.parent if args.kt_dir.parent.exists() else Path.cwd()
    gpu_gb = gpu_memory_gb()
    avail_gib = environment.meminfo_gib()["available_gib"]
    p = plan(key, args.format, args.kt_dir, need_convert, gpu_gb, None if avail_gib is None else avail_gib * 2**30 / GB,
             shutil.disk_usage(probe).free / GB, environment.usable_cpus(), args.cutoff_len)
    cmds = _commands(args, p, need_convert, gpu_gb is not None)
    print(f"{m['repo']}: routed experts {p['routed_params'] / 1e9:.2f}B params ({args.format} pack), "
          f"everything else {p['non_expert_params'] / 1e9:.2f}B")
    h = p["host_bytes"]
    print(f"estimate: host RAM {h['total'] / GB:.1f} GB (pack {h['pack'] / GB:.1f}, checkpoint cache {h['cache'] / GB:.1f}"
          f" @{p['cutoff_len']} tokens, non-expert on CPU {h['other'] / GB:.1f}, base {h['base'] / GB:.1f}); "
          f"converted on disk {p['converted_bytes'] / GB:.1f} GB; GPU {p['gpu_bytes'] / GB:.1f} GB"
          + ("" if gpu_gb else " (no GPU here: CPU-only run)"))
    print("checks:\n" + "\n".join(c.line() for c in p["checks"]))
    print("plan:\n" + "\n".join("  " + " ".join(c) for c in cmds))
    if not p["fits"] and not args.force:
        failed = [c for c in p["checks"] if not c.ok]
        print(f"refusing: {', '.join(c.what for c in failed)} "
              f"({'; '.join(f'need {c.need:.1f}, have {c.have:.1f} {c.unit}' for c in failed)}). "
              "--force launches anyway.", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for cmd in cmds:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        if rc:
            return rc
    return 0
