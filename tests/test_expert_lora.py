"""Expert LoRA: the C kernels' LoRA forward and gradients against a float64 reference built from
PEFT's own ΔW formula, the PEFT integration (names, placement, adapters that load in plain PEFT),
parity with HF + PEFT `target_parameters` training, and a router that learns."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import distinct_routing, random_experts, reference_with_pack_experts, rel_err, skewed_routing
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from kt_sft.engine import functional as Fn
from kt_sft.engine import reference as R
from kt_sft.engine.expert_lora import delta_weight
from kt_sft.engine.formats import ComputeMode, Format
from kt_sft.fixtures import build_fixtures
from kt_sft.integration.convert import convert
from kt_sft.integration.peft_lora import EXPERT_TARGET_PARAMETERS, PEFT_KEYS, LoraCPUExperts

# Relative error (Frobenius) vs float64 on the dequantized weights, by compute mode (as the base layer).
LORA_REL_ERR = {ComputeMode.F32: 1e-4, ComputeMode.BF16: 1e-2}
ACT_DTYPE = {ComputeMode.F32: torch.float32, ComputeMode.BF16: torch.bfloat16}
NAMES = ("lora_gu_A", "lora_gu_B", "lora_A", "lora_B")


def lora_experts(gate_up, down, fmt, mode, r, alpha=16.0, std=0.2):
    ex = LoraCPUExperts.from_tensors(gate_up, down, format=fmt, compute_mode=mode)
    ex.update_layer("default", r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
    with torch.no_grad():
        for name in NAMES:
            getattr(ex, name)["default"].weight.normal_(std=std)
    return ex


def check_against_float64(ex: LoraCPUExperts, x, idx, w, mode):
    e = ex.num_experts
    gu, dn = ex.dequantized()
    x = x.detach().clone().requires_grad_(True)
    wq = w.detach().clone().requires_grad_(True)
    y = ex(x, idx, wq)
    dy = torch.randn(y.shape).to(y.dtype)
    y.backward(dy)
    params = {n: getattr(ex, n)["default"].weight for n in NAMES}
    ref = {n: p.detach().double().requires_grad_(True) for n, p in params.items()}
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    s = ex.scaling["default"]
    y_ref = R.moe_forward(x64, idx, w64, gu.double() + delta_weight(ref["lora_gu_A"], ref["lora_gu_B"], s, e),
                          dn.double() + delta_weight(ref["lora_A"], ref["lora_B"], s, e))
    y_ref.backward(dy.double())
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, x64.grad), "dw": rel_err(wq.grad, w64.grad)}
    errs.update({n: rel_err(params[n].grad, ref[n].grad) for n in NAMES})
    assert max(errs.values()) <= LORA_REL_ERR[mode], f"{ex.format.value}/{mode.value}: {errs}"
    return errs


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("mode", [ComputeMode.F32, ComputeMode.BF16])
@pytest.mark.parametrize(
    "e,h,inter,t,k,r",
    [
        (8, 64, 32, 1, 1, 1),
        (8, 70, 45, 17, 3, 5),     # H, I not multiples of any block, odd rank
        (64, 96, 40, 29, 6, 16),   # DeepSeek-V2-Lite's E and top-k, rank 16
        (4, 33, 7, 40, 4, 7),      # k = E, rank = I, many tokens per expert
    ],
)
def test_lora_matches_float64_reference(kernel_path, fmt, mode, e, h, inter, t, k, r, seed):
    gate_up, down = random_experts(e, h, inter)
    ex = lora_experts(gate_up, down, fmt.value, mode, r)
    idx, w = distinct_routing(t, e, k)
    check_against_float64(ex, torch.randn(t, h).to(ACT_DTYPE[mode]), idx, w, mode)


def test_lora_skewed_and_idle_experts(kernel_path, seed):
    """One hot expert, most experts idle: idle experts' LoRA gradients are exactly zero."""
    gate_up, down = random_experts(16, 48, 24)
    ex = lora_experts(gate_up, down, "int8", ComputeMode.F32, 4)
    idx, w = skewed_routing(9, 16, 2, hot=3)
    check_against_float64(ex, torch.randn(9, 48), idx, w, ComputeMode.F32)
    idle = sorted(set(range(16)) - set(idx.flatten().tolist()))
    assert idle
    gu_a = ex.lora_gu_A["default"].weight.grad.view(16, 4, -1)
    assert torch.count_nonzero(gu_a[idle]) == 0 and torch.count_nonzero(gu_a[3]) > 0


def test_lora_bitwise_repeatable_across_threads(seed):
    import kt_sft

    gate_up, down = random_experts(8, 64, 32)
    ex = lora_experts(gate_up, down, "bf16", ComputeMode.F32, 4)
    idx, w = distinct_routing(50, 8, 2)
    x = torch.randn(50, 64)
    outs = []
    for threads in (1, 2, 3):
        kt_sft.set_num_threads(threads)
        ex.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = ex(xx, idx, w)
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), xx.grad] + [getattr(ex, n)["default"].weight.grad.clone() for n in NAMES])
    kt_sft.set_num_threads(2)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_int8_compute_mode_with_lora_close_to_exact(seed):
    """int8 activations change the base products only (LoRA math stays fp32): the whole layer stays
    within the int8 mode's documented error (docs/formats.md: ~2% on y) of the exact mode."""
    gate_up, down = random_experts(8, 128, 64)
    idx, w = distinct_routing(40, 8, 2)
    x = torch.randn(40, 128)
    ys = {}
    for mode in (ComputeMode.F32, ComputeMode.INT8):
        torch.manual_seed(0)
        ex = lora_experts(gate_up, down, "int8", mode, 8)
        ys[mode] = ex(x, idx, w)
    assert rel_err(ys[ComputeMode.INT8], ys[ComputeMode.F32]) < 0.05


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_rank_and_options():
    gate_up, down = random_experts(4, 32, 16)
    ex = LoraCPUExperts.from_tensors(gate_up, down)
    for r in (0, -2):
        with pytest.raises(ValueError, match="positive integer"):
            ex.update_layer("a", r, 8, 0.0, True, False)
    with pytest.raises(ValueError, match="exceeds min"):
        ex.update_layer("a", 17, 8, 0.0, True, False)
    with pytest.raises(ValueError, match="DoRA"):
        ex.update_layer("a", 4, 8, 0.0, True, False, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        ex.update_layer("a", 4, 8, 0.0, "pissa", False)
    with pytest.warns(UserWarning, match="does not apply to the routed experts"):
        ex.update_layer("a", 4, 8, 0.1, True, False)


def test_functional_rejects_mismatched_lora():
    packed = Fn.pack_experts(*random_experts(4, 32, 16), "bf16")
    x, (idx, w) = torch.randn(3, 32), distinct_routing(3, 4, 2)
    good = [torch.zeros(4, 2, n) for n in (32, 32, 32, 16)]
    bad_shape = Fn.ExpertLora(*good[:3], torch.zeros(4, 2, 15), scale=1.0)
    with pytest.raises(ValueError, match=r"`d_b` has shape \(4, 2, 15\), expected \(4, 2, 16\)"):
        Fn.validate_lora(packed, bad_shape)
    bad_dtype = Fn.ExpertLora(good[0].double(), *good[1:], scale=1.0)
    with pytest.raises(TypeError, match="float32 CPU"):
        Fn.validate_lora(packed, bad_dtype)
    from kt_sft.engine.autograd import cpu_experts

    with pytest.raises(ValueError, match="gu_b"):
        cpu_experts(x, idx, w, packed, ComputeMode.F32, lora=Fn.ExpertLora(good[0], good[0][:, :, :5], *good[2:], 1.0))


def test_lora_parameters_stay_fp32_on_cpu():
    gate_up, down = random_experts(4, 32, 16)
    ex = lora_experts(gate_up, down, "bf16", ComputeMode.F32, 2)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), ex)
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in ex.parameters())


# ---- PEFT integration on converted tiny models -----------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    build_fixtures(root / "fx", archs=["qwen3_moe", "deepseek_v2"], log=None)
    for arch in ("qwen3_moe", "deepseek_v2"):
        convert(root / "fx" / "models" / arch, root / f"kt-{arch}", "bf16", progress=False)
    return root


def kt_model(tiny, arch="qwen3_moe"):
    model = AutoModelForCausalLM.from_pretrained(tiny / f"kt-{arch}", trust_remote_code=True, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, LoraCPUExperts):
            m.compute_mode = "f32"
    return model


def hf_model_with_pack_experts(tiny, arch="qwen3_moe"):
    return reference_with_pack_experts(tiny / "fx" / "models" / arch, tiny / f"kt-{arch}")


def randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_peft_attaches_expert_lora_with_peft_names(tiny):
    pm = get_peft_model(kt_model(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "experts"]))
    cfg = pm.peft_config["default"]
    assert cfg.target_modules == {"q_proj"} and cfg.target_parameters == sorted(EXPERT_TARGET_PARAMETERS)
    experts = [m for m in pm.modules() if isinstance(m, LoraCPUExperts)]
    assert experts and all(m.r == {"default": 4} for m in experts)
    keys = set(get_peft_model_state_dict(pm))
    layer = "base_model.model.model.layers.0.mlp.experts."
    assert {layer + k for k in ("lora_A.weight", "lora_B.weight", "base_layer.lora_A.weight",
                                "base_layer.lora_B.weight")} <= keys
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("experts.lora_gu_A" in n for n in trainable) and any("experts.lora_B" in n for n in trainable)


def test_adapter_loads_in_plain_peft_on_original_checkpoint(tiny, tmp_path):
    pm = get_peft_model(kt_model(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "experts"]))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(1))
    pm.eval()
    with torch.no_grad():
        ours = pm(input_ids=ids).logits
    torch.save({"ids": ids, "logits": ours}, tmp_path / "ours.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(tiny / "fx" / "models" / "qwen3_moe")!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        ref = torch.load({str(tmp_path / "ours.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits
            with model.disable_adapter():
                plain = model(input_ids=ref["ids"]).logits
        assert "kt_sft" not in sys.modules
        print((logits - ref["logits"]).abs().max().item(), (plain - ref["logits"]).abs().max().item(),
              ref["logits"].abs().max().item())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff, without_adapter, scale = map(float, proc.stdout.split()[-3:])
    # bf16 experts in kt_sft vs the original fp32 experts in plain PEFT: bf16 rounding only (~1e-3 relative)
    assert diff <= 2e-3 * scale, (diff, scale)
    assert without_adapter > 20 * diff  # the adapter (expert LoRA included) changes the logits


def test_save_with_module_walk_state_dict_uses_peft_names(tiny, tmp_path):
    """DeepSpeed ZeRO-3 hands save_pretrained a state dict gathered by walking the modules (no
    state-dict hooks, so kt_sft's attribute names): the saved adapter must still carry PEFT's names
    and equal the one a plain save writes."""
    from safetensors.torch import load_file

    pm = get_peft_model(kt_model(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "experts"]))
    randomize_lora(pm, seed=3)
    walked = {name: p.detach().clone() for name, p in pm.named_parameters()}  # as ZeRO-3's gather
    assert any(".experts.lora_gu_A." in k for k in walked)
    pm.save_pretrained(tmp_path / "plain")
    pm.save_pretrained(tmp_path / "walked", state_dict=walked)
    plain, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "walked"))
    assert set(got) == set(plain)
    assert not any("lora_gu_" in k for k in got)
    assert any(k.endswith("experts.base_layer.lora_A.weight") for k in got)
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=0, atol=0)


def test_reload_on_kt_model_and_rank_mismatch(tiny, tmp_path):
    from peft import PeftModel

    pm = get_peft_model(kt_model(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["experts"]))
    randomize_lora(pm)
    pm.save_pretrained(tmp_path / "a")
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        ours = pm.eval()(input_ids=ids).logits
    again = PeftModel.from_pretrained(kt_model(tiny), tmp_path / "a").eval()  # expert-only adapter
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ours)
    other = get_peft_model(kt_model(tiny), LoraConfig(r=2, lora_alpha=8, target_modules=["experts"]))
    with pytest.raises(ValueError, match=r"rank 4.*rank 2|size mismatch"):
        other.load_adapter(tmp_path / "a", adapter_name="default")


def grads_by_peft_name(model):
    """Gradients keyed like model.state_dict() (kt_sft's expert LoRA renamed to PEFT's keys)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            for ours, theirs in PEFT_KEYS.items():
                name = name.replace(".experts." + ours, ".experts." + theirs)
            out[name] = p.grad
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_gradients_and_router_match_hf_peft(tiny, arch):
    """Same adapter weights, one batch: every trainable gradient (attention LoRA, expert LoRA, and the
    router trained in full through modules_to_save) matches HF + PEFT target_parameters on the
    pack's dequantized experts."""
    targets = ["q_proj", "v_proj"]
    ours = get_peft_model(kt_model(tiny, arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets + ["experts"],
                                                           modules_to_save=["gate"]))
    ref = get_peft_model(hf_model_with_pack_experts(tiny, arch),
                         LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["gate"],
                                    target_parameters=list(EXPERT_TARGET_PARAMETERS)))
    randomize_lora(ours)
    set_peft_model_state_dict(ref, get_peft_model_state_dict(ours))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (ours, ref):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    g_ours, g_ref = (get_peft_model_state_dict(m, state_dict=grads_by_peft_name(m)) for m in (ours, ref))
    assert g_ours.keys() == g_ref.keys() and any("gate" in k and "lora" not in k for k in g_ours)
    for k in g_ours:
        assert rel_err(g_ours[k], g_ref[k]) < 1e-3, k
    # the router learns: one optimizer step moves its weights
    router = [p for n, p in ours.named_parameters() if "modules_to_save" in n and "gate" in n and p.requires_grad]
    before = [p.detach().clone() for p in router]
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    assert router and all(not torch.equal(b, p) for b, p in zip(before, router))


def test_training_parity_with_hf_peft_target_parameters(tiny):
    """10 AdamW steps from identical adapters: kt_sft (bf16 experts in the C kernels) vs HF + PEFT
    target_parameters on the original fp32 checkpoint. Per-step losses within 0.02."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ours = get_peft_model(kt_model(tiny), LoraConfig(r=8, lora_alpha=16, target_modules=targets + ["experts"]))
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny / "fx" / "models" / "qwen3_moe", dtype=torch.float32),
                         LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                    target_parameters=list(EXPERT_TARGET_PARAMETERS)))
    set_peft_model_state_dict(ref, get_peft_model_state_dict(ours))
    gen = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 1000, (4, 24), generator=gen) for _ in range(2)]
    batches = [data[i % 2] for i in range(10)]  # two batches, seen 5 times each: the loss must fall
    curves = []
    for model in (ours, ref):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    diffs = [abs(a - b) for a, b in zip(*curves)]
    print(f"[parity] losses kt {curves[0][0]:.4f} -> {curves[0][-1]:.4f}, max |diff| {max(diffs):.2e}")
    assert curves[0][-1] < curves[0][0] - 0.05  # it trains
    assert max(diffs) < 0.02, diffs


def test_deepseek_v2_router_lora_trains(tiny):
    """Upstream DeepseekV2Moe reads `self.gate.weight`, so PEFT's LoRA on the router (lora_target
    `all` includes it) never trains there. kt_sft's model routes through the LoRA: the loss equals the
    upstream model with the router's ΔW merged, and the router LoRA gets gradients."""
    ours = get_peft_model(kt_model(tiny, "deepseek_v2"), LoraConfig(r=4, lora_alpha=8, target_modules=["gate"]))
    randomize_lora(ours)
    ref = hf_model_with_pack_experts(tiny, "deepseek_v2")
    with torch.no_grad():
        for name, module in ours.named_modules():
            if name.endswith("mlp.gate") and hasattr(module, "lora_A"):
                merged = module.weight + module.get_delta_weight("default")
                ref.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(merged)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - ref(input_ids=ids, labels=ids).loss.item()) < 1e-5
    grads = [p.grad for n, p in ours.named_parameters() if "mlp.gate.lora_B" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
