"""QLoRA with CPU experts, and the trained adapter in `llamafactory-cli chat`, all through the real CLI.

One QLoRA run (`quantization_bit=4`: bitsandbytes nf4 for the non-expert nn.Linear layers, kt_sft's int8
pack for the routed experts) trains a tiny converted Qwen3-MoE; the chat tests reuse its adapter.
Each CLI run is a fresh process (~10-15 s, mostly start-up).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kt_sft.fixtures import build_fixtures
from kt_sft.integration.convert import convert

ROOT = Path(__file__).resolve().parents[1]
QLORA_YAML = ROOT / "yaml_configs" / "tiny_qwen3_moe_kt_qlora.yaml"
CHAT_YAML = ROOT / "yaml_configs" / "tiny_qwen3_moe_kt_chat.yaml"
CLI = shutil.which("llamafactory-cli", path=str(Path(sys.executable).parent))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KT_SFT_NUM_THREADS": "2"}
QUANTIZED_MESSAGE = "Quantizing model to 4 bit with bitsandbytes."  # LLaMA-Factory's log line

pytestmark = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed next to this Python")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    build_fixtures(root / "fx", archs=["qwen3_moe", "deepseek_v2"], log=None)
    for arch in ("qwen3_moe", "deepseek_v2"):
        convert(root / "fx" / "models" / arch, root / "kt" / f"{arch}-int8", "int8", progress=False)
    return root


def _train_args(work: Path, out: Path, arch: str = "qwen3_moe") -> dict:
    return {"model_name_or_path": work / "kt" / f"{arch}-int8", "dataset_dir": work / "fx" / "data",
            "output_dir": out, "max_steps": 30, "eval_steps": 30, "plot_loss": "false"}


@pytest.fixture(scope="module")
def qlora_run(work):
    """The QLoRA recipe for 30 steps; returns (output_dir, completed process, wall seconds)."""
    out = work / "qlora"
    cmd = [CLI, "train", str(QLORA_YAML)] + [f"{k}={v}" for k, v in _train_args(work, out).items()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    return out, proc, time.perf_counter() - t0


def test_qlora_train_learns_and_saves_adapter(qlora_run):
    out, proc, seconds = qlora_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert QUANTIZED_MESSAGE in proc.stdout + proc.stderr
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    assert len(evals) == 2, log
    print(f"[qlora] qwen3_moe int8 + nf4: eval loss {evals[0]:.3f} -> {evals[1]:.3f} in {seconds:.0f}s")
    assert evals[1] <= 0.7 * evals[0], f"eval loss {evals[0]:.3f} -> {evals[1]:.3f} (< 30% drop)"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()


def _load_like_llamafactory(work: Path, arch: str, tmp_path: Path):
    """The model exactly as `llamafactory-cli train` builds it for the QLoRA YAML (tokenizer, bnb, LoRA)."""
    import transformers
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    args = {**yaml.safe_load(QLORA_YAML.read_text()), **_train_args(work, tmp_path / "out", arch)}
    args = {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}
    args["plot_loss"] = False
    verbosity = transformers.utils.logging.get_verbosity()
    try:
        model_args, _, training_args, finetuning_args, _ = get_train_args(args)
        tokenizer = load_tokenizer(model_args)["tokenizer"]
        model = load_model(tokenizer, model_args, finetuning_args, is_trainable=training_args.do_train)
    finally:  # get_train_args turns transformers' logging to INFO for the whole process
        transformers.utils.logging.set_verbosity(verbosity)
    return model


def test_qlora_non_expert_linears_are_4bit(work, tmp_path):
    import bitsandbytes as bnb

    from kt_sft.engine.experts import CPUExperts

    model = _load_like_llamafactory(work, "qwen3_moe", tmp_path)
    lora_wrapped = {n: m for n, m in model.named_modules()
                    if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    # Qwen3-MoE in transformers 5.6: q/k/v/o_proj are the only nn.Linear below lm_head (2 layers x 4)
    assert len(lora_wrapped) == 8, sorted(lora_wrapped)
    for name, m in lora_wrapped.items():
        assert isinstance(m.base_layer, bnb.nn.Linear4bit), f"{name} is {type(m.base_layer).__name__}"
        weight = m.base_layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None, name
        assert weight.quant_state.quant_type == "nf4", name
        packed_bytes = weight.numel() * weight.element_size()
        assert packed_bytes * 2 == m.in_features * m.out_features, name  # 4 bits per weight
    experts = [m for m in model.modules() if isinstance(m, CPUExperts)]
    assert len(experts) == 2  # the routed experts stay kt_sft's, untouched by bitsandbytes
    lm_head = model.get_output_embeddings()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in lm_head.modules())  # kept in full precision
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and not any("base_layer" in n for n in trainable)


def test_qlora_deepseek_v2_router_stays_unquantized(work, tmp_path):
    """DeepseekV2Moe.forward reads self.gate.weight directly (F.linear), so a bitsandbytes 4-bit router
    breaks it (plain LLaMA-Factory fails the same way); kt_sft's class keeps the router out of
    quantization (`_keep_in_fp32_modules`), and the rest is still 4-bit."""
    import bitsandbytes as bnb
    import torch

    model = _load_like_llamafactory(work, "deepseek_v2", tmp_path)
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert routers and not any(isinstance(m, bnb.nn.Linear4bit) for m in routers)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = torch.randint(3, 1000, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()


def _chat(overrides: dict, prompts: list[str]) -> subprocess.CompletedProcess:
    """One `llamafactory-cli chat` session; `clear` after each prompt keeps every question single-turn."""
    cmd = [CLI, "chat", str(CHAT_YAML)] + [f"{k}={v}" for k, v in overrides.items()]
    stdin = "".join(f"{p}\nclear\n" for p in prompts) + "exit\n"
    return subprocess.run(cmd, cwd=ROOT, env=ENV, input=stdin, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.parametrize("quantization_bit", [None, 4], ids=["full-base", "4bit-base"])
def test_chat_answers_with_the_adapter(work, qlora_run, quantization_bit):
    out, train_proc, _ = qlora_run
    assert train_proc.returncode == 0, "the QLoRA run failed; see test_qlora_train_learns_and_saves_adapter"
    overrides = {"model_name_or_path": work / "kt" / "qwen3_moe-int8", "adapter_name_or_path": out}
    if quantization_bit:
        overrides["quantization_bit"] = quantization_bit
    # Held-out questions, one line each. After 30 steps the model's next-token distribution is still
    # flat (top-1 p ~ 0.02) and greedy decoding ends some answers at once with <|im_end|> (an empty
    # reply), so ask several and require each turn to be answered and at least one reply to have text.
    held_out = json.loads((work / "fx" / "data" / "tiny_tasks_eval.json").read_text())[:6]
    prompts = [f"{ex['instruction']} {ex['input']}" for ex in held_out]
    t0 = time.perf_counter()
    proc = _chat(overrides, prompts)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Loaded adapter(s): {out}" in proc.stdout + proc.stderr  # LLaMA-Factory applied our adapter
    replies = re.findall(r"Assistant: (.*)", proc.stdout)
    print(f"[chat] {'4-bit' if quantization_bit else 'full-precision'} base, {seconds:.1f} s: "
          + "; ".join(f"{q!r} -> {r!r}" for q, r in zip(prompts, replies)))
    assert len(replies) == len(prompts), proc.stdout[-2000:]
    assert any(r.strip() for r in replies), f"every reply was empty: {proc.stdout[-2000:]}"
