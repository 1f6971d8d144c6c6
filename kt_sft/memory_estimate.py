"""RAM / disk / GPU estimates for real MoE models (the numbers in the yaml_configs/ headers, the recipes'
checks and the shaped random checkpoints of kt_sft.bench.shaped_models).

    .venv/bin/python scripts/estimate_moe_memory.py [--json OUT.json]

Parameter counts are exact for the transformers 5.6 classes: each model is built on the meta device
from the public config.json values below (no download) and its parameters are counted, split into
routed experts (`mlp.experts.*`, served by kt_sft from the pack) and everything else. Pack bytes come
from kt_sft.engine.formats.matrix_bytes (the layout `kt-sft convert` writes). The GPU column is an estimate
for LoRA in bf16 with gradient checkpointing, batch 1 (see `gpu_estimate`); `host_estimate` is the
host RAM of a kt_sft run.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kt_sft.engine.formats import Format, matrix_bytes

GB = 1e9

# Public config.json values (hub repo in "repo"); only what shapes the parameters. cutoff_len and lora_rank
# are those of the model's YAML; source_gb is the download size where it is not simply params x 2 (bf16).
_DSV3_MLA = {
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
}
MODELS = {
    "deepseek_v3": {
        "repo": "deepseek-ai/DeepSeek-V3 (and DeepSeek-R1)",
        "yaml": "deepseek_v3_kt.yaml",
        "cutoff_len": 4096,
        "lora_rank": 8,
        "source_gb": 689,
        "source_note": "FP8 e4m3 + 128x128 scales, 163 shards, incl. the MTP layer",
        "config": {
            "model_type": "deepseek_v3",
            **_DSV3_MLA,
            "first_k_dense_replace": 3,
            "n_routed_experts": 256,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "n_group": 8,
            "topk_group": 4,
            "vocab_size": 129280,
            "tie_word_embeddings": False,
        },
    },
    "kimi_k2": {
        "repo": "moonshotai/Kimi-K2-Instruct (DeepSeek-V3 architecture)",
        "yaml": "kimi_k2_kt.yaml",
        "cutoff_len": 4096,
        "lora_rank": 8,
        "source_gb": 1030,
        "source_note": "FP8 e4m3 + 128x128 scales, 62 shards",
        "config": {
            "model_type": "deepseek_v3",
            **_DSV3_MLA,
            "first_k_dense_replace": 1,
            "n_routed_experts": 384,
            "num_attention_heads": 64,
            "num_key_value_heads": 64,
            "n_group": 1,
            "topk_group": 1,
            "vocab_size": 163840,
            "tie_word_embeddings": False,
        },
    },
    "qwen3_235b_a22b": {
        "repo": "Qwen/Qwen3-235B-A22B",
        "yaml": "qwen3_235b_a22b_kt.yaml",
        "cutoff_len": 4096,
        "lora_rank": 8,
        "source_gb": None,
        "source_note": "bf16",
        "config": {
            "model_type": "qwen3_moe",
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "moe_intermediate_size": 1536,
            "num_hidden_layers": 94,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_attention_heads": 64,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    },
    "qwen3_30b_a3b": {
        "repo": "Qwen/Qwen3-30B-A3B",
        "yaml": "qwen3_30b_a3b_kt.yaml",
        "cutoff_len": 4096,
        "lora_rank": 16,
        "source_gb": None,
        "source_note": "bf16",
        "config": {
            "model_type": "qwen3_moe",
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
    },
    "mixtral_8x7b": {
        "repo": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "yaml": "mixtral_8x7b_kt.yaml",
        "cutoff_len": 4096,
        "lora_rank": 16,
        "source_gb": None,
        "source_note": "bf16 safetensors only (skip the consolidated *.pt)",
        "config": {
            "model_type": "mixtral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        },
    },
    "deepseek_v2_lite": {
        "repo": "deepseek-ai/DeepSeek-V2-Lite(-Chat)",
        "yaml": "deepseek_v2_lite_kt.yaml",
        "cutoff_len": 4096,
        "lora_rank": 16,
        "source_gb": None,
        "source_note": "bf16",
        "config": {
            "model_type": "deepseek_v2",
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "first_k_dense_replace": 1,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "q_lora_rank": None,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "greedy",
            "vocab_size": 102400,
            "tie_word_embeddings": False,
        },
    },
}
BITS = {"bf16": 16.0, "int8": 8.016, "int4": 4.5}  # nominal bits per weight, scales included


def count(config: dict) -> dict:
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts = other = 0
    lora_pairs = []  # (in, out) of every nn.Linear that `lora_target: all` wraps (not lm_head)
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            experts += p.numel()
        else:
            other += p.numel()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            lora_pairs.append((m.in_features, m.out_features))
    layers = cfg.num_hidden_layers
    moe_layers = sum(1 for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    e = model.model.layers[-1].mlp.experts
    num_experts, two_i, hidden = e.gate_up_proj.shape
    return {
        "routed": experts,
        "non_expert": other,
        "layers": layers,
        "moe_layers": moe_layers,
        "experts": num_experts,
        "inter": two_i // 2,
        "hidden": hidden,
        "top_k": cfg.num_experts_per_tok,
        "vocab": cfg.vocab_size,
        "lora_pairs": lora_pairs,
    }


def pack_bytes(c: dict, fmt: str) -> int:
    f = Format(fmt)
    per_expert = matrix_bytes(f, 2 * c["inter"], c["hidden"]) + matrix_bytes(f, c["hidden"], c["inter"])
    return c["moe_layers"] * c["experts"] * per_expert


def gpu_estimate(c: dict, seq: int, rank: int, qlora: bool = False) -> dict:
    """bytes on the GPU for LoRA SFT, batch 1, `seq` tokens, gradient checkpointing on.

    weights: non-expert params in bf16 (2 B); with QLoRA the wrapped nn.Linear weights at ~0.5625 B
             (nf4 + double-quantized scales) and the rest (embeddings, lm_head, norms, router) in bf16.
    lora:    r * (in + out) per wrapped Linear, fp32 weight + grad + two Adam moments = 16 B/param.
    acts:    checkpointed layer inputs L*T*H*2 B; logits T*V*(2 + 4 + 4) B (bf16, fp32 copy for the loss,
             its gradient); one layer's recomputation ~ 16*T*H*2 B + attention/shared-expert widths;
             plus ~3 GB of CUDA context and allocator slack. A rough bound, not a measurement.
    """
    linear = sum(i * o for i, o in c["lora_pairs"])
    if qlora:
        weights = linear * 0.5625 + (c["non_expert"] - linear) * 2
    else:
        weights = c["non_expert"] * 2
    lora_params = rank * sum(i + o for i, o in c["lora_pairs"])
    widest = sum(o for _, o in c["lora_pairs"]) / c["layers"]  # output widths of one layer's Linears
    acts = (
        c["layers"] * seq * c["hidden"] * 2
        + seq * c["vocab"] * 10
        + seq * (16 * c["hidden"] + 2 * widest) * 2
    )
    overhead = 3 * GB
    return {
        "weights": weights,
        "lora_params": lora_params,
        "lora": lora_params * 16,
        "acts": acts,
        "total": weights + lora_params * 16 + acts + overhead,
    }


def checkpoint_cache_bytes(c: dict, seq: int) -> int:
    """kt_sft's host-side recompute cache (docs/usage.md): T*H*4 + T*k*2I*4 per MoE layer."""
    return c["moe_layers"] * (seq * c["hidden"] * 4 + seq * c["top_k"] * 2 * c["inter"] * 4)


def host_estimate(c: dict, fmt: str, seq: int, batch: int = 1, gpu: bool = True, rank: int = 16) -> dict:
    """bytes of host RAM for a kt_sft LoRA run (gradient checkpointing on, `batch` x `seq` tokens).

    pack:    the expert pack, memory-mapped; it must stay resident (page cache), or steps read from disk.
    cache:   kt_sft's checkpoint cache, T*H*4 + T*k*2I*4 per MoE layer (T = batch*seq).
    other:   without a GPU the non-expert weights live here too (bf16, 2 B/param) with the LoRA state
             (16 B/param) and activations (layer inputs L*T*H*2 B, logits T*V*10 B).
    base:    ~2.5 GB for Python, torch, LLaMA-Factory, the dataset and allocator slack (measured: a tiny
             model's LLaMA-Factory run peaks at ~1.5-2 GB RSS).
    """
    tokens = batch * seq
    pack = pack_bytes(c, fmt)
    cache = checkpoint_cache_bytes(c, tokens)
    other = 0
    if not gpu:
        lora = rank * sum(i + o for i, o in c["lora_pairs"]) * 16
        acts = c["layers"] * tokens * c["hidden"] * 2 + tokens * c["vocab"] * 10
        other = c["non_expert"] * 2 + lora + acts
    base = 2.5 * GB
    return {"pack": pack, "cache": cache, "other": other, "base": base, "total": pack + cache + other + base}


def main():
    ap = argparse.ArgumentParser(description="RAM / disk / GPU estimates for the real-model YAMLs in yaml_configs/")
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args()
    rows = {}
    columns = ["model", "layers (MoE)", "H", "experts x I, top-k", "routed params", "non-expert params",
               "pack bf16 / int8 / int4 (GB)", "source ckpt (GB)", "converted int8 / int4 (GB)",
               "ckpt cache @T (GB)", "GPU LoRA bf16 / QLoRA (GB)"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for key, m in MODELS.items():
        c = count(m["config"])
        packs = {f: pack_bytes(c, f) for f in BITS}
        src = m["source_gb"] * GB if m["source_gb"] else (c["routed"] + c["non_expert"]) * 2
        other_disk = c["non_expert"] * 2  # written as bf16 safetensors (FP8 dequantized)
        seq, rank = m["cutoff_len"], m["lora_rank"]
        gpu, gpu_q = gpu_estimate(c, seq, rank), gpu_estimate(c, seq, rank, qlora=True)
        cache = checkpoint_cache_bytes(c, seq)
        rows[key] = {
            "repo": m["repo"], "yaml": m["yaml"], **{k: v for k, v in c.items() if k != "lora_pairs"},
            "pack_bytes": packs, "nominal_pack_bytes": {f: c["routed"] * b / 8 for f, b in BITS.items()},
            "source_bytes": src, "source_note": m["source_note"], "converted_other_bytes": other_disk,
            "checkpoint_cache_bytes": cache, "cutoff_len": seq, "lora_rank": rank,
            "gpu_lora_bf16": gpu, "gpu_qlora": gpu_q,
        }  # fmt: skip
        cells = [
            key, f"{c['layers']} ({c['moe_layers']})", c["hidden"],
            f"{c['experts']} x {c['inter']}, {c['top_k']}",
            f"{c['routed'] / 1e9:.2f}B", f"{c['non_expert'] / 1e9:.2f}B",
            " / ".join(f"{packs[f] / GB:.0f}" for f in ("bf16", "int8", "int4")), f"{src / GB:.0f}",
            f"{(packs['int8'] + other_disk) / GB:.0f} / {(packs['int4'] + other_disk) / GB:.0f}",
            f"{cache / GB:.1f} @{seq}", f"{gpu['total'] / GB:.0f} / {gpu_q['total'] / GB:.0f}",
        ]  # fmt: skip
        print("| " + " | ".join(str(x) for x in cells) + " |")
        detail = (f"weights {gpu['weights'] / GB:.1f} (QLoRA {gpu_q['weights'] / GB:.1f}), LoRA r={rank} "
                  f"{gpu['lora_params'] / 1e6:.0f}M params -> {gpu['lora'] / GB:.1f}, "
                  f"activations {gpu['acts'] / GB:.1f}")
        print("|   | " + detail + " |" * (len(columns) - 1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
