"""Random-weight checkpoints with real model shapes, written without a hub and without holding the model.

    .venv/bin/python scripts/make_shaped_model.py --shape deepseek_v2_lite_mini --out DIR --target hf
    .venv/bin/python scripts/make_shaped_model.py --shape deepseek_v2_lite --out DIR --target kt --format int8
    .venv/bin/python scripts/make_shaped_model.py --list          # every shape with the disk it needs

A shape is a public config.json (kt_sft.memory_estimate.MODELS) or a "mini" variant of one: the same
layer shapes with few layers and an 8k vocabulary, for quick runs. The tensor names and shapes are
those `save_pretrained` writes for the transformers 5.6 class (experts per expert: hub layout), read
from the model built on the meta device; no tensor is ever allocated for the whole model.

Values: every tensor is drawn from its own generator seeded by (seed, CRC-32 of its name), N(0, 0.02)
rounded to bf16 (norm weights 1, biases 0), so a tensor is the same whichever target writes it.
Targets:

* ``hf``: bf16 safetensors shards (<= 2 GiB each) + index, config.json and a tokenizer. With
  ``sparse_experts`` the routed experts are left as holes in the shard files (zeros that take no disk):
  loading such a copy costs the same memory as a real one, which is all the capacity baselines need.
* ``kt``: straight into a kt_sft model directory (`kt-sft convert`'s code, fed these tensors instead
  of shards), for models whose bf16 source would not fit the disk. Same bytes as converting ``hf``.

Tokenizer: kt_sft.fixtures' byte-level BPE with `tokenizer_vocab` entries, trained on the synthetic
corpus plus the instruction data when given (so English text tokenizes like a real ~8k vocabulary).
A vocabulary larger than the tokenizer (the full shapes keep their real one) is harmless: those
embedding rows are never looked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from kt_sft.engine.formats import Format
from kt_sft.integration.convert import publish_dir
from kt_sft.integration.models import arch_for
from kt_sft.memory_estimate import MODELS, count, pack_bytes

GIB = 2**30
SHARD_BYTES = 2 * GIB
WEIGHT_STD = 0.02
DISK_MARGIN = 2 * GIB  # left free after writing
MINI = {"num_hidden_layers": 4, "vocab_size": 8192}  # DeepSeek: 1 dense + 3 MoE layers
SHAPES: dict[str, dict] = {
    "deepseek_v2_lite": MODELS["deepseek_v2_lite"]["config"],
    "deepseek_v2_lite_mini": {**MODELS["deepseek_v2_lite"]["config"], **MINI},
    "qwen3_30b_a3b": MODELS["qwen3_30b_a3b"]["config"],
    "qwen3_30b_a3b_mini": {**MODELS["qwen3_30b_a3b"]["config"], **MINI},
    "mixtral_8x7b_mini": {**MODELS["mixtral_8x7b"]["config"], **MINI},
}
_ST_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32"}
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def shape_config(shape: str | dict) -> dict:
    """The config.json dict of a named shape (a dict is taken as the config itself)."""
    if isinstance(shape, dict):
        return dict(shape)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


class RandomCheckpoint:
    """The on-disk tensors of `config` (a config.json dict) with seeded random values, read one at a time.

    Offers TensorIndex's interface (`where`, `in`, `get`, `get_float`), so kt_sft.integration.convert can read it
    like a checkpoint. `where` maps each name to (shape, dtype) in save_pretrained's order."""

    def __init__(self, config: dict, seed: int = 0, sparse_experts: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config, self.seed, self.sparse_experts = config, seed, sparse_experts
        self.arch = arch_for(config)
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        self.where: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.expert_names: set[str] = set()
        for name, t in model.state_dict().items():
            m = _FUSED.match(name)
            if m is None:
                self.where[name] = (tuple(t.shape), torch.bfloat16)
            elif m.group(2) == "gate_up_proj":  # (E, 2I, H) -> E x (gate (I, H), up (I, H), down (H, I))
                layer, (e, two_i, h) = int(m.group(1)), t.shape
                for expert in range(e):
                    for which, shp in enumerate(((two_i // 2, h), (two_i // 2, h), (h, two_i // 2))):
                        key = self.arch.expert_key(layer, expert, which)
                        self.where[key] = (shp, torch.bfloat16)
                        self.expert_names.add(key)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def nbytes(self, name: str) -> int:
        shape, dtype = self.where[name]
        return int(torch.Size(shape).numel()) * dtype.itemsize

    def get(self, name: str) -> torch.Tensor:
        shape, dtype = self.where[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if name.endswith(("bias", "e_score_correction_bias")) or (self.sparse_experts and name in self.expert_names):
            return torch.zeros(shape, dtype=dtype)
        gen = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen) * WEIGHT_STD).to(dtype)

    def get_float(self, name: str, block: tuple[int, int] | None = None) -> torch.Tensor:
        return self.get(name).to(torch.float32)


def disk_needed(shape: str | dict, target: str, fmt: str = "int8", sparse_experts: bool = False) -> dict:
    """Bytes a target writes: {'total', 'experts', 'other'} (the tokenizer's ~1 MB not counted)."""
    c = count(shape_config(shape))
    other = c["non_expert"] * 2
    if target == "hf":
        experts = 0 if sparse_experts else c["routed"] * 2
    elif target == "kt":
        experts = pack_bytes(c, Format.parse(fmt).value)
    else:
        raise ValueError(f"`target` should be 'hf' or 'kt', got {target!r}")
    return {"total": experts + other, "experts": experts, "other": other, "routed_params": c["routed"],
            "non_expert_params": c["non_expert"]}


def _check_disk(out: Path, need: int) -> None:
    probe = out.parent
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise OSError(f"writing {out} needs {need / GIB:.1f} GiB (+{DISK_MARGIN / GIB:.0f} GiB margin) but "
                      f"{probe} has {free / GIB:.1f} GiB free")


def _write_safetensors(path: Path, ckpt: RandomCheckpoint, names: list[str]) -> None:
    """One shard, tensor by tensor; sparse experts are skipped with a seek (a hole reads as zeros)."""
    header, pos = {}, 0
    for name in names:
        shape, dtype = ckpt.where[name]
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + ckpt.nbytes(name)]}
        pos += ckpt.nbytes(name)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        base = f.tell()
        for name in names:
            if ckpt.sparse_experts and name in ckpt.expert_names:
                continue
            f.seek(base + header[name]["data_offsets"][0])
            f.write(ckpt.get(name).contiguous().view(torch.uint8).numpy().data)
        f.truncate(base + pos)


def _write_skeleton(out: Path, config: dict, tokenizer) -> None:
    """config.json (bf16, the tokenizer's special ids), generation config and tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**config, "torch_dtype": "bfloat16", "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}, indent=2) + "\n")
    tokenizer.save_pretrained(out)


def build_shape_tokenizer(vocab: int = 8192, corpus: Iterable[str] | None = None):
    from kt_sft.fixtures import build_tokenizer

    return build_tokenizer(vocab_size=vocab, corpus=corpus)


def write_hf(shape: str | dict, out: str | os.PathLike, tokenizer, seed: int = 0, sparse_experts: bool = False,
             progress: bool = True) -> dict:
    """A Hugging Face checkpoint directory of `shape`, written shard by shard into a temporary directory
    that is renamed at the end. Returns a report (also `shaped_model.json` in the directory)."""
    from tqdm import tqdm

    out = Path(out)
    need = disk_needed(shape, "hf", sparse_experts=sparse_experts)
    _check_disk(out, need["total"])
    config = shape_config(shape)
    ckpt = RandomCheckpoint(config, seed, sparse_experts)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_skeleton(tmp, config, tokenizer)
        shards, current, size = [], [], 0
        for name in ckpt.where:
            if current and size + ckpt.nbytes(name) > SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append(name)
            size += ckpt.nbytes(name)
        shards.append(current)
        weight_map = {}
        for i, names in enumerate(tqdm(shards, desc="hf shards", unit="shard", disable=not progress)):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(tmp / fname, ckpt, names)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": sum(ckpt.nbytes(n) for n in ckpt.where)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        report = {"shape": shape if isinstance(shape, str) else config.get("model_type"), "target": "hf",
                  "seed": seed, "sparse_experts": sparse_experts, "shards": len(shards), "disk_bytes": need,
                  "config": config}
        return publish_dir(tmp, out, "shaped_model.json", report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_kt(shape: str | dict, out: str | os.PathLike, fmt: str, tokenizer, seed: int = 0, force: bool = False,
             progress: bool = True) -> dict:
    """A kt_sft model directory of `shape` with `fmt` experts, without a Hugging Face copy on disk."""
    from kt_sft.integration.convert import convert

    out = Path(out)
    _check_disk(out, disk_needed(shape, "kt", fmt)["total"])
    config = shape_config(shape)
    skeleton = out.parent / f".{out.name}.skeleton-{os.getpid()}"
    shutil.rmtree(skeleton, ignore_errors=True)
    try:
        _write_skeleton(skeleton, config, tokenizer)
        report = convert(skeleton, out, fmt, force=force, progress=progress, index=RandomCheckpoint(config, seed))
    finally:
        shutil.rmtree(skeleton, ignore_errors=True)
    report.update({"shape": shape if isinstance(shape, str) else config.get("model_type"), "target": "kt",
                   "seed": seed})
    (out / "shaped_model.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def describe_shapes() -> str:
    """A table of every shape: parameters and the disk each target needs."""
    lines = ["| shape | layers | routed / other params | hf bf16 | hf sparse experts | kt bf16 / int8 / int4 |",
             "|---|---|---|---|---|---|"]
    for shape in SHAPES:
        hf = disk_needed(shape, "hf")
        sparse = disk_needed(shape, "hf", sparse_experts=True)
        kt = [disk_needed(shape, "kt", f)["total"] / 1e9 for f in ("bf16", "int8", "int4")]
        lines.append(f"| {shape} | {SHAPES[shape]['num_hidden_layers']} | {hf['routed_params'] / 1e9:.2f}B / "
                     f"{hf['non_expert_params'] / 1e9:.2f}B | {hf['total'] / 1e9:.1f} GB | {sparse['total'] / 1e9:.1f} GB | "
                     + " / ".join(f"{v:.1f}" for v in kt) + " GB |")
    return "\n".join(lines)


DEFAULT_DATA = Path(os.environ.get("KT_SFT_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def alpaca_texts(path: str | os.PathLike) -> list[str]:
    """instruction + input + output of every record of an alpaca-format JSON file (a tokenizer corpus)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    return ["\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output")) for r in records]
