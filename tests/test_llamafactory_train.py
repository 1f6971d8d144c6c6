"""kt_sft inside the real, unmodified `llamafactory-cli train`: tiny converted models of each family
and format train (eval loss falls, adapter saved), and per-step losses match plain LLaMA-Factory on
the original checkpoint. Each run is a fresh process (~15 s, mostly start-up)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kt_sft.fixtures import build_fixtures
from kt_sft.integration.convert import convert

ROOT = Path(__file__).resolve().parents[1]
KT_YAML = ROOT / "yaml_configs" / "tiny_qwen3_moe_kt.yaml"
CLI = shutil.which("llamafactory-cli", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed next to this Python")

ARCHS = ("qwen3_moe", "deepseek_v2", "deepseek_v3", "qwen2_moe", "mixtral", "olmoe")
# CI: every architecture in bf16, plus one architecture in each other format; the rest are `slow`.
CI_CASES = [(a, "bf16") for a in ARCHS] + [("qwen3_moe", "int8"), ("deepseek_v3", "int4")]
ALL_CASES = [(a, f) for a in ARCHS for f in ("bf16", "int8", "int4")]
SLOW_CASES = [c for c in ALL_CASES if c not in CI_CASES]
# Per-step train loss, kt_sft vs plain LLaMA-Factory on the original fp32 checkpoint (20 steps).
PARITY_MAX_DIFF = {"bf16": 0.02, "int8": 0.01, "int4": 0.02}  # measured: 1e-4, 1e-4, 1.3e-3


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("lf")
    build_fixtures(root / "fx", archs=list(ARCHS), log=None)
    return root


def converted(work: Path, arch: str, fmt: str) -> Path:
    out = work / "kt" / f"{arch}-{fmt}"
    if not out.exists():
        convert(work / "fx" / "models" / arch, out, fmt, progress=False)
    return out


LAST_OUTPUT = {"stdout": ""}  # of the latest train() run


def train(work: Path, model: Path, out: Path, env_extra: dict | None = None, **overrides) -> list[dict]:
    args = {"model_name_or_path": model, "dataset_dir": work / "fx" / "data", "output_dir": out, **overrides}
    cmd = [CLI, "train", str(KT_YAML)] + [f"{k}={v}" for k, v in args.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KT_SFT_NUM_THREADS": "2",
           **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    LAST_OUTPUT["stdout"] = proc.stdout + proc.stderr
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def check_learns(work, arch, fmt, tmp_path):
    out = tmp_path / "run"
    log = train(work, converted(work, arch, fmt), out, max_steps=40, eval_steps=40, logging_steps=10)
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(evals) == 2, log
    print(f"[learns] {arch}/{fmt}: eval loss {evals[0]:.3f} -> {evals[1]:.3f}")
    assert evals[1] <= 0.7 * evals[0], f"{arch}/{fmt}: eval loss {evals[0]:.3f} -> {evals[1]:.3f} (< 30% drop)"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()


@pytest.mark.parametrize("arch,fmt", CI_CASES)
def test_train_learns(work, arch, fmt, tmp_path):
    check_learns(work, arch, fmt, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt", SLOW_CASES)
def test_train_learns_slow(work, arch, fmt, tmp_path):
    check_learns(work, arch, fmt, tmp_path)


def parity(work, arch, fmt, tmp_path):
    steps = {"max_steps": 20, "logging_steps": 1, "eval_strategy": "'no'", "eval_on_start": "false"}
    plain = train(work, work / "fx" / "models" / arch, tmp_path / "plain", **steps)
    # compute mode pinned (the fp32 run's default today): a change of defaults must not move parity
    ours = train(work, converted(work, arch, fmt), tmp_path / "kt", env_extra={"KT_SFT_COMPUTE_MODE": "f32"}, **steps)
    a = [e["loss"] for e in plain if "loss" in e]
    b = [e["loss"] for e in ours if "loss" in e]
    assert len(a) == len(b) == 20
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(f"[parity] {arch}/{fmt}: max per-step loss difference {worst:.4f} over 20 steps")
    assert worst <= PARITY_MAX_DIFF[fmt], f"{arch}/{fmt}: per-step loss differs by up to {worst:.4f}"
    return worst


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_parity_with_plain_llamafactory_bf16(work, arch, tmp_path):
    parity(work, arch, "bf16", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt", [("deepseek_v3", "bf16"), ("qwen3_moe", "int8"), ("qwen3_moe", "int4"),
                                      ("deepseek_v2", "int8")])
def test_parity_with_plain_llamafactory_slow(work, arch, fmt, tmp_path):
    parity(work, arch, fmt, tmp_path)


# ---- expert LoRA (`experts` in lora_target) ----------------------------------------------------

EXPERT_LORA_TARGET = "q_proj,k_proj,v_proj,o_proj,experts"


@pytest.mark.parametrize("arch", ARCHS)
def test_train_learns_with_expert_lora(work, arch, tmp_path):
    out = tmp_path / "run"
    log = train(work, converted(work, arch, "bf16"), out, max_steps=40, eval_steps=40, logging_steps=10,
                lora_target=EXPERT_LORA_TARGET)
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    print(f"[expert-lora] {arch}: eval loss {evals[0]:.3f} -> {evals[1]:.3f}")
    assert evals[1] <= 0.7 * evals[0], evals
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert "experts" not in cfg["target_modules"]
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in keys)
    assert any(k.endswith("mlp.experts.lora_B.weight") for k in keys)


def test_resume_continues_the_loss_curve(work, tmp_path):
    """20 steps straight vs 10 steps + resume_from_checkpoint for 10 more, expert LoRA on, fp32:
    the resumed steps' losses equal the uninterrupted run's within 1e-4."""
    model = converted(work, "qwen3_moe", "bf16")
    steps = {"max_steps": 20, "logging_steps": 1, "eval_strategy": "'no'", "eval_on_start": "false",
             "lora_target": EXPERT_LORA_TARGET, "lr_scheduler_type": "constant", "warmup_ratio": 0}
    full = train(work, model, tmp_path / "full", **steps)
    part = tmp_path / "part"
    train(work, model, part, save_strategy="steps", save_steps=10, **{**steps, "max_steps": 10})
    assert (part / "checkpoint-10" / "optimizer.pt").exists()
    resumed = train(work, model, part, resume_from_checkpoint=part / "checkpoint-10", overwrite_output_dir="false",
                    **steps)
    assert "Resuming training from checkpoint with epoch 0 and global step 10" in LAST_OUTPUT["stdout"]  # not restarted
    a = {e["step"]: e["loss"] for e in full if "loss" in e}
    b = {e["step"]: e["loss"] for e in resumed if "loss" in e and e["step"] > 10}
    assert sorted(b) == list(range(11, 21)), b
    worst = max(abs(a[s] - b[s]) for s in b)
    print(f"[resume] max loss difference over steps 11-20: {worst:.2e}")
    assert worst <= 1e-4, {s: (a[s], b[s]) for s in b}
