"""Shared builders for the engine tests."""

import torch


def random_experts(e: int, h: int, inter: int, dtype=torch.float32):
    gate_up = (torch.randn(e, 2 * inter, h) / h**0.5).to(dtype)
    down = (torch.randn(e, h, inter) / inter**0.5).to(dtype)
    return gate_up, down


def distinct_routing(t: int, e: int, k: int):
    """top-k expert ids, distinct per token, and positive weights (softmax of random logits)."""
    idx = torch.argsort(torch.rand(t, e), dim=1)[:, :k].contiguous()
    w = torch.softmax(torch.randn(t, k), dim=1)
    return idx, w


def skewed_routing(t: int, e: int, k: int, hot: int = 0):
    """Every token sends its first slot to expert `hot`; the other slots are distinct random experts."""
    idx, w = distinct_routing(t, e, k)
    for row in range(t):
        others = [x for x in torch.randperm(e).tolist() if x != hot][: k - 1]
        idx[row] = torch.tensor([hot] + others)
    return idx, w


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    denom = ref.norm()
    return float((a - ref).norm() / denom) if denom > 0 else float((a - ref).norm())


def reference_with_pack_experts(model_dir, kt_dir):
    """The upstream fp32 model, its experts replaced by the pack's dequantized weights (the values
    the kernels multiply by)."""
    from transformers import AutoModelForCausalLM

    from kt_sft.engine.functional import dequantize_experts
    from kt_sft.engine.pack_file import PackFile

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pack = PackFile(kt_dir / "experts.ktpack")
    with torch.no_grad():
        for layer in pack.layers:
            gu, dn = dequantize_experts(pack.layer(layer))
            model.model.layers[layer].mlp.experts.gate_up_proj.copy_(gu)
            model.model.layers[layer].mlp.experts.down_proj.copy_(dn)
    return model


def write_pack(path, fmt, layers, e=4, h=40, inter=24, arch="test_arch", source=None):
    """An expert pack of random experts per layer, written through PackWriter; returns the fp32 experts."""
    from kt_sft.engine import functional as Fn
    from kt_sft.engine.pack_file import PackWriter

    experts = {layer: random_experts(e, h, inter) for layer in layers}
    w = PackWriter(path, fmt, arch, e, h, inter, layers, source=source)
    for layer, (gu, dn) in experts.items():
        packed = Fn.pack_experts(gu, dn, fmt)
        for i in range(e):
            w.write_expert(layer, "gate_up", i, packed.gate_up[i])
        for i in range(e):
            w.write_expert(layer, "down", i, packed.down[i])
    w.close()
    return experts
