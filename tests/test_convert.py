"""Conversion and loading: tiny checkpoints of every family -> kt_sft directories that upstream
`from_pretrained(trust_remote_code=True)` loads, matching the original model run with the same
(dequantized) expert weights, forward and backward."""

import json

import pytest
import torch
from helpers import reference_with_pack_experts
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kt_sft.engine import functional as Fn
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.pack_file import PackFile
from kt_sft.fixtures import ARCHS, build_fixtures
from kt_sft.integration.convert import convert, fp8_dequantize
from kt_sft.integration.loading import MODELING_FILE, kt_causal_lm_class


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixtures")
    build_fixtures(out, log=None)
    return out


def forward_backward(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_converted_model_matches_upstream(fixtures, tmp_path, arch, fmt):
    src = fixtures / "models" / arch
    report = convert(src, tmp_path / "kt", fmt, progress=False)
    assert report["arch"] == arch and report["moe_layers"]
    kt = AutoModelForCausalLM.from_pretrained(tmp_path / "kt", trust_remote_code=True, dtype=torch.float32)
    assert type(kt).__name__ == "KtSftForCausalLM"
    experts = [m for m in kt.modules() if isinstance(m, CPUExperts)]
    assert len(experts) == len(report["moe_layers"])
    assert not any("mlp.experts." in n for n, _ in kt.named_parameters())
    for m in experts:
        m.compute_mode = "f32"  # exact mode: the comparison isolates conversion and loading
    ref = reference_with_pack_experts(src, tmp_path / "kt")
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(0))
    logits_kt, grads_kt = forward_backward(kt, ids)
    logits_ref, grads_ref = forward_backward(ref, ids)
    assert float((logits_kt - logits_ref).norm() / logits_ref.norm()) < 1e-5
    assert set(grads_kt) == {n for n in grads_ref if "mlp.experts." not in n}
    for name, g in grads_kt.items():  # includes the router: its gradient flows through the kernels' dw
        denom = grads_ref[name].norm()
        assert float((g - grads_ref[name]).norm() / denom.clamp_min(1e-12)) < 1e-4, name


def test_fp8_block_scaled_checkpoint(fixtures, tmp_path):
    """DeepSeek-V3/Kimi-K2 ship FP8 e4m3 weights with per-128x128 `weight_scale_inv`; here 16x16 blocks
    on the tiny model, experts and one attention projection in FP8."""
    src = fixtures / "models" / "deepseek_v3"
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (fp8_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    expected = {}
    for name in list(tensors):
        if not (".experts." in name or name.endswith("self_attn.q_a_proj.weight")):
            continue
        w = tensors[name]
        n, k = w.shape
        blocks = w.reshape(n // 16, 16, k // 16, 16).abs().amax(dim=(1, 3))
        scale_inv = (blocks / 448.0).clamp_min(1e-12)
        q = (w / scale_inv.repeat_interleave(16, 0).repeat_interleave(16, 1)).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale_inv
        expected[name] = fp8_dequantize(q, scale_inv, (16, 16))
    save_file(tensors, fp8_dir / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    report = convert(fp8_dir, tmp_path / "kt", "bf16", progress=False)
    assert report["fp8_dequantized"]
    out_config = json.loads((tmp_path / "kt" / "config.json").read_text())
    assert "quantization_config" not in out_config
    pack = PackFile(tmp_path / "kt" / "experts.ktpack")
    for layer in pack.layers:
        gu, dn = Fn.dequantize_experts(pack.layer(layer))
        for e in range(gu.shape[0]):
            base = f"model.layers.{layer}.mlp.experts.{e}"
            want = torch.cat([expected[f"{base}.gate_proj.weight"], expected[f"{base}.up_proj.weight"]])
            torch.testing.assert_close(gu[e], want.bfloat16().float(), rtol=0, atol=0)
            torch.testing.assert_close(dn[e], expected[f"{base}.down_proj.weight"].bfloat16().float(), rtol=0, atol=0)
    out = load_file(tmp_path / "kt" / "model.safetensors")
    assert not any(n.endswith("_scale_inv") for n in out)
    name = "model.layers.1.self_attn.q_a_proj.weight"
    assert out[name].dtype == torch.bfloat16
    torch.testing.assert_close(out[name], expected[name].bfloat16(), rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(tmp_path / "kt", trust_remote_code=True)  # loads


def test_refuses_non_empty_out_and_is_atomic(fixtures, tmp_path):
    src = fixtures / "models" / "qwen3_moe"
    out = tmp_path / "kt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert(src, out, "int8", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(KeyError):
        convert(broken, out, "int8", force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"  # the old directory survives a failed conversion
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kt.tmp")] == []
    convert(src, out, "int8", force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "experts.ktpack").exists()


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="does not support model_type 'llama'; supported: deepseek_v2"):
        convert(tmp_path, tmp_path / "out", "int8", progress=False)


def test_truncated_shard_and_mismatched_pack(fixtures, tmp_path):
    src = fixtures / "models" / "qwen3_moe"
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    with pytest.raises(ValueError, match="model.safetensors is truncated: tensor .* ends at byte"):
        convert(trunc, tmp_path / "out", "int8", progress=False)
    assert not (tmp_path / "out").exists()

    kt = tmp_path / "kt"
    convert(src, kt, "int8", progress=False)
    config = json.loads((kt / "config.json").read_text())
    config["moe_intermediate_size"] = 48  # the pack holds I = 32
    (kt / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(kt, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"experts are \(E, H, I\) = \(8, 64, 32\), the model expects \(8, 64, 48\)"):
        model(torch.tensor([[1, 2, 3]]))


def test_settings_block_and_environment(fixtures, tmp_path, monkeypatch):
    from kt_sft.integration.settings import KtSettings

    s = KtSettings.from_config({"compute_mode": "bf16", "num_threads": 2}, environ={"KT_SFT_COMPUTE_MODE": "f32"})
    assert s.compute_mode == "f32" and s.num_threads == 2 and s.checkpoint_cache
    assert KtSettings.from_config({}, environ={"KT_SFT_CHECKPOINT_CACHE": "0"}).checkpoint_cache is False
    with pytest.raises(ValueError, match="unknown keys in config.json's kt_sft block: \\['threads'\\]"):
        KtSettings.from_config({"threads": 2}, environ={})
    with pytest.raises(ValueError, match="KT_SFT_NUM_THREADS should be a positive integer, got 'many'"):
        KtSettings.from_config({}, environ={"KT_SFT_NUM_THREADS": "many"})
    with pytest.raises(ValueError, match="num_threads` should be a positive integer, got 0"):
        KtSettings.from_config({"num_threads": 0}, environ={})
    with pytest.raises(ValueError, match="unknown compute mode 'fp4'"):
        KtSettings.from_config({}, environ={"KT_SFT_COMPUTE_MODE": "fp4"})
    with pytest.raises(ValueError, match="KT_SFT_VERIFY should be 0/1/true/false, got 'maybe'"):
        KtSettings.from_config({}, environ={"KT_SFT_VERIFY": "maybe"})

    kt = tmp_path / "kt"
    convert(fixtures / "models" / "qwen3_moe", kt, "int8", progress=False)
    monkeypatch.setenv("KT_SFT_COMPUTE_MODE", "int8")
    monkeypatch.setenv("KT_SFT_CHECKPOINT_CACHE", "false")
    monkeypatch.setenv("KT_SFT_PIN_MEMORY", "0")
    model = AutoModelForCausalLM.from_pretrained(kt, trust_remote_code=True)
    experts = [m for m in model.modules() if isinstance(m, CPUExperts)]
    assert all(m.compute_mode.value == "int8" and m.recompute_cache is None and not m.pin_memory for m in experts)


def test_already_fused_checkpoint_converts_like_per_expert(fixtures, tmp_path):
    """Checkpoints that store the fused in-memory tensors (experts.gate_up_proj / down_proj) give the
    same pack as the hub's per-expert layout."""
    src = fixtures / "models" / "qwen3_moe"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, fused / "model.safetensors")
    convert(src, tmp_path / "a", "int4", progress=False)
    convert(fused, tmp_path / "b", "int4", progress=False)
    a, b = PackFile(tmp_path / "a" / "experts.ktpack"), PackFile(tmp_path / "b" / "experts.ktpack")
    assert a.layers == b.layers
    for layer in a.layers:
        assert torch.equal(a.layer(layer).gate_up, b.layer(layer).gate_up)
        assert torch.equal(a.layer(layer).down, b.layer(layer).down)


def test_kimi_k2_converts_as_deepseek_v3(fixtures, tmp_path):
    """Kimi-K2 ships model_type "kimi_k2" (unknown to transformers 5.6) with DeepSeek-V3's layout and
    its own tokenizer code: converted as deepseek_v3, tokenizer .py carried over, modeling code not."""
    src = fixtures / "models" / "deepseek_v3"
    kimi = tmp_path / "kimi"
    kimi.mkdir()
    for f in src.iterdir():
        (kimi / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "kimi_k2"
    (kimi / "config.json").write_text(json.dumps(config))
    (kimi / "tokenization_kimi.py").write_text("# tokenizer code\n")
    (kimi / "modeling_deepseek.py").write_text("# original remote modeling code\n")
    convert(kimi, tmp_path / "kt", "int4", progress=False)
    out = json.loads((tmp_path / "kt" / "config.json").read_text())
    assert out["model_type"] == "deepseek_v3" and out["kt_sft"]["source_model_type"] == "kimi_k2"
    assert (tmp_path / "kt" / "tokenization_kimi.py").exists()
    assert not (tmp_path / "kt" / "modeling_deepseek.py").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "kt", trust_remote_code=True)
    assert type(model).__mro__[1].__name__ == "DeepseekV3ForCausalLM"
    model(torch.tensor([[1, 2, 3]]))


# modeling_kt_sft.py exactly as `kt-sft convert` wrote it before the package got its engine /
# integration / bench wings (commit 1c5a9c2). Directories converted then hold this file; their import
# path, kt_sft.loading, must keep working.
MODELING_FILE_BEFORE_THE_WINGS = '''"""Written by `kt-sft convert`: the upstream Qwen3MoeForCausalLM with its routed
experts served by kt_sft from this directory's expert pack. Needs `pip install kt_sft`."""

from kt_sft.loading import kt_causal_lm_class

KtSftForCausalLM = kt_causal_lm_class("qwen3_moe")
'''


def test_directory_converted_before_the_wings_loads(fixtures, tmp_path):
    convert(fixtures / "models" / "qwen3_moe", tmp_path / "kt", "bf16", progress=False)
    modeling = tmp_path / "kt" / MODELING_FILE
    assert modeling.read_text() == MODELING_FILE_BEFORE_THE_WINGS  # and converts still write the same file
    modeling.write_text(MODELING_FILE_BEFORE_THE_WINGS)
    kt = AutoModelForCausalLM.from_pretrained(tmp_path / "kt", trust_remote_code=True, dtype=torch.float32)
    assert type(kt) is kt_causal_lm_class("qwen3_moe")
    assert any(isinstance(m, CPUExperts) for m in kt.modules())
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(kt(ids).logits).all()
