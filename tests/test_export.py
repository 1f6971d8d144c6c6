"""`kt-sft export`: converted tiny models + a random LoRA adapter (attention, shared experts and the
routed experts) -> merged checkpoints that plain transformers loads in a process where kt_sft cannot
be imported, with the logits of the kt model + adapter.

Tolerance of the fp32 exports: max |Δlogits| <= 1e-4 * max |logits|. Both sides use the same fp32
weights (the pack's dequantized values, LoRA merged in fp32) and differ only in summation order:
kt_sft adds scaling * (x B) A to x W in its kernels, the export multiplies by W + ΔW. Measured on
these models: 3.3e-7 to 3.9e-7, a margin of ~250. Leaving the expert LoRA out moves the logits by
9e-2 (qwen3_moe) / 1.3e-1 (deepseek_v3); the test asserts that gap stays above 2e-2, so a part of the
adapter that the export dropped could not hide under the bound. bf16 exports are checked to load, run
and stay within 5e-2 (bf16 keeps 8 significant bits per weight; measured 7e-3)."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from kt_sft import cli
from kt_sft.fixtures import build_fixtures
from kt_sft.integration import export as kt_export
from kt_sft.integration.convert import convert

pytestmark = pytest.mark.filterwarnings("ignore:target_parameters=.*no parameter was matched:RuntimeWarning")

RTOL_FP32, RTOL_BF16 = 1e-4, 5e-2
# deepseek_v3 has q_a_proj/q_b_proj (q LoRA), no q_proj; gate_proj reaches its shared experts and dense layer
TARGETS = {"qwen3_moe": ["q_proj", "experts"], "deepseek_v3": ["q_b_proj", "gate_proj", "experts"]}
# (name, kt model, with the adapter, dtype)
EXPORTS = [
    ("qwen3_fp32", "qwen3_moe-bf16", True, "fp32"),
    ("deepseek_fp32", "deepseek_v3-bf16", True, "fp32"),
    ("qwen3_bf16", "qwen3_moe-bf16", True, "bf16"),
    ("qwen3_plain_fp32", "qwen3_moe-bf16", False, "fp32"),
    ("qwen3_int8_fp32", "qwen3_moe-int8", True, "fp32"),
]

# Runs in a fresh interpreter: kt_sft is made unimportable, as if it were not installed.
PLAIN_LOADER = r"""
import json, sys
class NoKtSft:
    def find_spec(self, name, path=None, target=None):
        if name == "kt_sft" or name.startswith("kt_sft."):
            raise ImportError("kt_sft is not installed here")
sys.meta_path.insert(0, NoKtSft())
import torch
from transformers import AutoModelForCausalLM
dirs, ids_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ids, result = torch.load(ids_file), {}
for name, path in dirs.items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # dtype from config.json, no remote code
    with torch.no_grad():
        logits = model(ids).logits.float()
    result[name] = {"class": type(model).__name__, "dtype": str(model.dtype), "logits": logits}
assert "kt_sft" not in sys.modules
torch.save(result, out_file)
"""


def kt_logits(kt_dir, adapter, ids, expert_lora=True):
    model = AutoModelForCausalLM.from_pretrained(kt_dir, trust_remote_code=True, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        if not expert_lora:
            for module in model.modules():
                if type(module).__name__ == "LoraCPUExperts":
                    module.enable_adapters(False)
    with torch.no_grad():
        return model.eval()(ids).logits


def random_adapter(kt_dir, out, targets):
    """PEFT LoRA on `targets`, every LoRA tensor ~ N(0, 0.05^2) (B is not zero: the update is real)."""
    model = AutoModelForCausalLM.from_pretrained(kt_dir, trust_remote_code=True, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    build_fixtures(root / "fx", archs=list(TARGETS), log=None)
    kt = {}
    for arch in TARGETS:
        kt[f"{arch}-bf16"] = root / f"{arch}-bf16"
        convert(root / "fx" / "models" / arch, kt[f"{arch}-bf16"], "bf16", progress=False)
    kt["qwen3_moe-int8"] = root / "qwen3_moe-int8"
    convert(root / "fx" / "models" / "qwen3_moe", kt["qwen3_moe-int8"], "int8", progress=False)
    adapters = {arch: random_adapter(kt[f"{arch}-bf16"], root / f"adapter-{arch}", t) for arch, t in TARGETS.items()}
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")

    outs, reports, refs = {}, {}, {}
    for name, kt_name, with_adapter, dtype in EXPORTS:
        adapter = adapters[kt_name.split("-")[0]] if with_adapter else None
        outs[name] = root / f"out-{name}"
        reports[name] = kt_export.export(kt[kt_name], outs[name], adapter, dtype, progress=False)
        refs[name] = kt_logits(kt[kt_name], adapter, ids)
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, json.dumps({k: str(v) for k, v in outs.items()}),
                           str(root / "ids.pt"), str(root / "plain.pt")],
                          cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "kt": kt, "adapters": adapters, "ids": ids, "outs": outs, "reports": reports,
            "refs": refs, "plain": torch.load(root / "plain.pt")}


def rel_max(a, ref):
    return float((a.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", ["qwen3_fp32", "deepseek_fp32", "qwen3_plain_fp32", "qwen3_int8_fp32"])
def test_fp32_export_matches_the_kt_model_with_its_adapter(setup, name):
    plain = setup["plain"][name]
    assert plain["class"] == setup["reports"][name]["class"] and plain["dtype"] == "torch.float32"
    assert rel_max(plain["logits"], setup["refs"][name]) < RTOL_FP32


@pytest.mark.parametrize("arch", list(TARGETS))
def test_the_adapter_and_its_expert_lora_matter(setup, arch):
    """Guards the tolerance: without the expert LoRA (or without any) the logits move far past it."""
    kt, adapter = setup["kt"][f"{arch}-bf16"], setup["adapters"][arch]
    ref = setup["refs"][f"{arch.split('_')[0]}_fp32"]
    assert setup["reports"][f"{arch.split('_')[0]}_fp32"]["expert_lora_merged"]
    no_expert_lora = kt_logits(kt, adapter, setup["ids"], expert_lora=False)
    assert rel_max(no_expert_lora, ref) > 200 * RTOL_FP32
    assert rel_max(kt_logits(kt, None, setup["ids"]), ref) > 200 * RTOL_FP32


def test_bf16_export_loads_and_runs(setup):
    plain = setup["plain"]["qwen3_bf16"]
    assert plain["dtype"] == "torch.bfloat16" and torch.isfinite(plain["logits"]).all()
    assert rel_max(plain["logits"], setup["refs"]["qwen3_bf16"]) < RTOL_BF16
    config = json.loads((setup["outs"]["qwen3_bf16"] / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_output_is_a_plain_hf_directory(setup):
    out = setup["outs"]["deepseek_fp32"]
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "kt_sft" not in config
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    names = {f.name for f in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", kt_export.REPORT_NAME} <= names
    assert not names & {"experts.ktpack", "modeling_kt_sft.py", "kt_sft_convert.json"}
    assert not any(f.name.startswith(".") for f in out.parent.iterdir() if "out-" in f.name)  # no temp dirs


def test_bf16_export_keeps_fp32_modules_fp32(setup, tmp_path):
    """DeepSeek-V3 keeps its router's e_score_correction_bias in fp32 (_keep_in_fp32_modules_strict)."""
    from safetensors import safe_open

    kt_export.export(setup["kt"]["deepseek_v3-bf16"], tmp_path / "out", None, "bf16", progress=False)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a Mapping)
    assert {d for k, d in dtypes.items() if "e_score_correction_bias" in k} == {"F32"}
    assert {d for k, d in dtypes.items() if "e_score_correction_bias" not in k} == {"BF16"}


def test_llamafactory_style_adapter_dir(setup, tmp_path):
    """LLaMA-Factory's output_dir: task_type CAUSAL_LM and the tokenizer training used, which wins."""
    src, adapter = setup["adapters"]["qwen3_moe"], tmp_path / "output_dir"
    adapter.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    (adapter / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    kt = setup["kt"]["qwen3_moe-bf16"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).write_bytes((kt / name).read_bytes())
    (adapter / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    report = kt_export.export(kt, tmp_path / "out", adapter, "fp32", progress=False)
    assert report["expert_lora_merged"] and report["tokenizer_from"] == str(adapter)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    from safetensors.torch import load_file

    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(setup["outs"]["qwen3_fp32"] / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--quiet", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kt-sft export" in err and "Traceback" not in err
    return err


def test_cli_refuses_a_non_empty_out(setup, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = cli_error(["--model", str(setup["kt"]["qwen3_moe-bf16"]), "--out", str(tmp_path / "out")], capsys)
    assert "exists and is not empty; pass --force" in err
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("which, message", [
    ("missing", "does not exist"),
    ("plain", "is not a kt_sft model directory"),
    ("empty", "no config.json"),
])
def test_cli_rejects_a_bad_model(setup, tmp_path, capsys, which, message):
    model = {"missing": tmp_path / "nope", "plain": setup["root"] / "fx" / "models" / "qwen3_moe",
             "empty": tmp_path}[which]
    assert message in cli_error(["--model", str(model), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_an_adapter_of_another_model(setup, tmp_path, capsys):
    err = cli_error(["--model", str(setup["kt"]["qwen3_moe-bf16"]), "--adapter", str(setup["adapters"]["deepseek_v3"]),
                     "--out", str(tmp_path / "out")], capsys)
    assert "does not fit" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_adapter_with_wrong_shapes_or_missing_tensors(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    src = setup["adapters"]["qwen3_moe"]
    tensors = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for case, change in (("shape", lambda t: t.update({key: torch.zeros(4, 32)})), ("missing", lambda t: t.pop(key))):
        bad = tmp_path / f"adapter-{case}"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        changed = dict(tensors)
        change(changed)
        save_file(changed, bad / "adapter_model.safetensors")
        with pytest.raises(ValueError, match="does not fit"):
            kt_export.export(setup["kt"]["qwen3_moe-bf16"], tmp_path / "out", bad, "fp32", progress=False)


def test_cli_refuses_when_memory_clearly_does_not_suffice(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kt_export, "available_memory", lambda: 2**20)
    err = cli_error(["--model", str(setup["kt"]["qwen3_moe-bf16"]), "--out", str(tmp_path / "out")], capsys)
    assert "memory" in err and "streaming export" in err
    assert not (tmp_path / "out").exists()
