"""Every LLaMA-Factory YAML parses and says how to launch it; the real-model YAMLs state the sizes that
scripts/estimate_moe_memory.py computes; the tiny recipe really trains (slow)."""

import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kt_sft import fixtures as fx

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "yaml_configs").glob("*.yaml"))
REAL_MODEL_YAMLS = [p for p in YAMLS if not p.name.startswith("tiny_")]


def _header(text: str) -> str:
    return "\n".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))


def _is_chat(path: Path, header: str) -> bool:
    """Chat YAMLs (inference arguments only) are launched by `llamafactory-cli chat`."""
    return f"llamafactory-cli chat yaml_configs/{path.name}" in header


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_loads_and_documents_its_launch(path):
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict) and cfg.get("model_name_or_path"), path.name
    header = _header(text)
    if _is_chat(path, header):
        assert cfg.get("adapter_name_or_path"), "a chat YAML serves a trained adapter"
        return
    assert f"llamafactory-cli train yaml_configs/{path.name}" in header, "the header must give the launch"
    assert cfg.get("report_to") == "none", "nothing may reach the network"


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_keys_are_llamafactory_arguments(path, monkeypatch):
    pytest.importorskip("llamafactory")
    import transformers.training_args
    from llamafactory.hparams.parser import _parse_infer_args, _parse_train_args

    text = path.read_text()
    cfg = yaml.safe_load(text)
    if _is_chat(path, _header(text)):
        _, data_args, finetuning_args, _ = _parse_infer_args(cfg)
    else:
        if not torch.cuda.is_available():
            # GPU recipes say `bf16: true, use_cpu: false`, which TrainingArguments refuses on a machine
            # without a bf16 GPU; parse them as the GPU machine they are written for would.
            monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
        _, data_args, training_args, finetuning_args, _ = _parse_train_args(cfg)
        assert training_args.output_dir
    # Every YAML states its chat template; `template: null` (explicit) = parsed from the tokenizer's own.
    assert data_args.template or ("template" in cfg and cfg["template"] is None), "state `template`"
    assert finetuning_args.finetuning_type


def _estimates():
    script = ROOT / "scripts" / "estimate_moe_memory.py"
    spec = importlib.util.spec_from_file_location("estimate_moe_memory", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_key(est, path: Path) -> str:
    keys = [k for k, m in est.MODELS.items() if m["yaml"] == path.name]
    assert len(keys) == 1, f"{path.name}: add the model to MODELS in scripts/estimate_moe_memory.py"
    return keys[0]


@pytest.mark.parametrize("path", REAL_MODEL_YAMLS, ids=[p.name for p in REAL_MODEL_YAMLS])
def test_real_model_yaml_states_its_sizes(path):
    """The parameter counts typed in the header match the transformers 5.6 class built from the config."""
    est = _estimates()
    key = _model_key(est, path)
    text = path.read_text()
    header = _header(text)
    cfg = yaml.safe_load(text)
    m = re.search(r"routed experts ([0-9.]+)B, everything else ([0-9.]+)B", header)
    assert m, "the header must state the routed and non-expert parameter counts"
    counted = est.count(est.MODELS[key]["config"])
    assert float(m.group(1)) == pytest.approx(counted["routed"] / 1e9, abs=0.006)
    assert float(m.group(2)) == pytest.approx(counted["non_expert"] / 1e9, abs=0.006)
    assert re.search(r"kt-sft convert --model \S+ --out \S+ --format int[48]", header)
    for what in ("RAM", "disk", "GPU", "lora_target: all", "estimate"):
        assert what in header, f"the header must cover {what!r}"
    assert str(cfg["model_name_or_path"]).startswith("/path/to/"), "user paths are obvious placeholders"
    assert cfg["bf16"] is True and cfg["use_cpu"] is False and cfg["trust_remote_code"] is True
    assumed = est.MODELS[key]  # the estimate's lora_rank and cutoff_len are the YAML's
    assert cfg["lora_rank"] == assumed["lora_rank"] and cfg["cutoff_len"] == assumed["cutoff_len"]


@pytest.mark.slow
@pytest.mark.parametrize("path", REAL_MODEL_YAMLS, ids=[p.name for p in REAL_MODEL_YAMLS])
def test_real_model_yaml_runs_on_its_tiny_twin(path, tmp_path):
    """Every key of a real-model YAML goes through the real CLI: 3 steps on the tiny converted model of the
    same family, with only the size-, data- and device-dependent keys overridden (~13 s each)."""
    pytest.importorskip("llamafactory")
    from kt_sft.integration.convert import convert

    cli = shutil.which("llamafactory-cli", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("llamafactory-cli is not installed next to this Python")
    est = _estimates()
    key = _model_key(est, path)
    arch = est.MODELS[key]["config"]["model_type"]  # Kimi-K2 runs as deepseek_v3, as its header says
    fx.build_fixtures(tmp_path / "fixtures", archs=[arch], log=None)
    convert(tmp_path / "fixtures" / "models" / arch, tmp_path / "kt", "int4", progress=False)
    overrides = [
        f"model_name_or_path={tmp_path / 'kt'}", f"dataset_dir={tmp_path / 'fixtures/data'}",
        "dataset=kt_tiny_train", f"output_dir={tmp_path / 'run'}", "bf16=false", "use_cpu=true",
        "max_steps=3", "max_samples=64", "cutoff_len=128", "gradient_accumulation_steps=1",
        "preprocessing_num_workers=1", "dataloader_num_workers=0", "plot_loss=false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", KT_SFT_NUM_THREADS="2")
    proc = subprocess.run([cli, "train", str(path), *overrides], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_tiny_qwen3_moe_plain_recipe_learns(tmp_path):
    """The real CLI on the tiny Qwen3-MoE: the held-out loss must fall well below chance (ln 1024)."""
    pytest.importorskip("llamafactory")
    cli = shutil.which("llamafactory-cli", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("llamafactory-cli is not installed next to this Python")
    fx.build_fixtures(tmp_path / "fixtures", archs=["qwen3_moe"], log=None)
    out = tmp_path / "run"
    overrides = [
        f"model_name_or_path={tmp_path / 'fixtures/models/qwen3_moe'}",
        f"dataset_dir={tmp_path / 'fixtures/data'}",
        f"output_dir={out}",
        "max_steps=40", "eval_steps=40", "plot_loss=false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run([cli, "train", str(ROOT / "yaml_configs/tiny_qwen3_moe_plain.yaml"), *overrides],
                   check=True, cwd=tmp_path, env=env, capture_output=True, timeout=600)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) >= 2 and evals[0] > 6.5  # the untrained model is at chance
    assert evals[-1] < evals[0] - 2.0, evals
