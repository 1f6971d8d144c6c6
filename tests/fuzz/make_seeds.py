"""Writes the fuzz seed corpora under tests/fuzz/corpus/ (committed; rerun after a format change):

    .venv/bin/python tests/fuzz/make_seeds.py

pack/         small valid .ktpack files (bf16, int8, int4; one and two layers)
safetensors/  [u16 config length][config.json][safetensors]: per-expert and fused layouts, FP8 with
              block scales, a wrong-shape scale, an offset past the end
engine_api/   random byte strings (the harness decodes any input)
c_api/        16-byte choice headers + random bodies (native/fuzz/fuzz_moe_api.c)
"""

import json
import random
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from kt_sft.engine import functional as Fn
from kt_sft.engine.pack_file import PackWriter

ROOT = Path(__file__).parent / "corpus"


def packs(tmp: Path) -> None:
    out = ROOT / "pack"
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for fmt in ("bf16", "int8", "int4"):
        for layers in ([0], [1, 3]):
            e, h, inter = 2, 8, 4
            w = PackWriter(tmp / "p.ktpack", fmt, "qwen3_moe", e, h, inter, layers)
            for layer in layers:
                packed = Fn.pack_experts(torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g), fmt)
                for i in range(e):
                    w.write_expert(layer, "gate_up", i, packed.gate_up[i])
                for i in range(e):
                    w.write_expert(layer, "down", i, packed.down[i])
            w.close()
            (out / f"{fmt}-{len(layers)}layer.ktpack").write_bytes((tmp / "p.ktpack").read_bytes())


def _entry(config: dict, tensors: dict) -> bytes:
    c = json.dumps(config).encode()
    return struct.pack("<H", len(c)) + c + save(tensors)


def safetensors() -> None:
    out = ROOT / "safetensors"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "qwen3_moe", "hidden_size": 8, "num_hidden_layers": 1, "num_experts": 2,
           "moe_intermediate_size": 4}
    per_expert = {}
    for e in range(2):
        for name, shape in (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4))):
            per_expert[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = torch.randn(shape)
    per_expert["model.embed_tokens.weight"] = torch.randn(16, 8).to(torch.bfloat16)
    (out / "per_expert").write_bytes(_entry(cfg, per_expert))
    fused = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 8, 8),
             "model.layers.0.mlp.experts.down_proj": torch.randn(2, 8, 4)}
    (out / "fused").write_bytes(_entry(cfg, fused))
    fp8 = {}
    for e in range(2):
        for name, shape in (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4))):
            key = f"model.layers.0.mlp.experts.{e}.{name}.weight"
            fp8[key] = torch.randn(shape).to(torch.float8_e4m3fn)
            fp8[key + "_scale_inv"] = torch.rand(1, 1)
    v3 = dict(cfg, model_type="deepseek_v3", n_routed_experts=2, quantization_config={"weight_block_size": [16, 16]})
    (out / "fp8").write_bytes(_entry(v3, fp8))
    bad_scale = dict(fp8)
    bad_scale["model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"] = torch.rand(3, 2)
    (out / "fp8_bad_scale").write_bytes(_entry(v3, bad_scale))
    mixtral = {"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_local_experts": 2,
               "intermediate_size": 4}
    mx = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.randn(s)
          for e in range(2) for w, s in (("w1", (4, 8)), ("w3", (4, 8)), ("w2", (8, 4)))}
    (out / "mixtral").write_bytes(_entry(mixtral, mx))
    raw = _entry(cfg, per_expert)
    (out / "truncated").write_bytes(raw[: len(raw) - 40])


def random_seeds(name: str, n: int, header: int = 0) -> None:
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    r = random.Random(name)
    for i in range(n):
        head = bytes(r.randrange(256) for _ in range(header))
        (out / f"seed-{i:02d}").write_bytes(head + bytes(r.randrange(256) for _ in range(r.randrange(32, 512))))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        packs(Path(d))
    safetensors()
    random_seeds("engine_api", 16)
    print("seeds written under", ROOT)
