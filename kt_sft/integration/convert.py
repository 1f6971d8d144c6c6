"""`kt-sft convert`: a Hugging Face MoE checkpoint -> a kt_sft model directory.

Streams the routed experts one expert at a time from the safetensors shards (never the whole model)
into `experts.ktpack`, writes the other tensors as safetensors, and carries config, tokenizer and
chat template over. The config gains a `kt_sft` block and an `auto_map` to a two-line modeling
file, so upstream `from_pretrained(..., trust_remote_code=True)` (and so LLaMA-Factory) loads the
model with its experts served from the memory-mapped pack.

Reads per-expert tensors (hub layout: `...experts.{e}.gate_proj.weight`, Mixtral's `w1/w3/w2`) or
already-fused `experts.gate_up_proj` / `experts.down_proj`, in fp32/bf16/fp16 or FP8 (e4m3) with
`weight_scale_inv` block scales (DeepSeek-V3/R1, Kimi-K2). FP8 non-expert weights become bf16.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from kt_sft.engine import functional as Fn
from kt_sft.engine.formats import Format
from kt_sft.engine.pack_file import PACK_NAME, PackWriter
from kt_sft.integration.atomic_dir import is_out_of_space, out_of_space, publish_dir, staging_dir
from kt_sft.integration.loading import MODELING_FILE, modeling_source
from kt_sft.integration.models import MoEArch, arch_for
from kt_sft.integration.settings import KtSettings

SHARD_BYTES = 512 * 2**20  # non-expert shards: bounds the converter's memory
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, **({"F8_E4M3": torch.float8_e4m3fn} if hasattr(torch, "float8_e4m3fn") else {}),
    **({"F8_E5M2": torch.float8_e5m2} if hasattr(torch, "float8_e5m2") else {}),
}


def _check_entry(path: Path, name: str, info) -> tuple[str, list[int], int, int]:
    """One header entry: a known dtype, a shape of non-negative ints, and data_offsets [start, end]
    exactly as long as the shape and dtype say. Returns (dtype, shape, start, end)."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{path}: tensor {name}: header entry must hold dtype, shape and data_offsets, got {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype!r:.50}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise ValueError(f"{path}: tensor {name}: shape must be a list of non-negative ints, got {shape!r:.100}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets) or offsets[0] > offsets[1]:
        raise ValueError(f"{path}: tensor {name}: data_offsets must be [start, end] with 0 <= start <= end, got {offsets!r:.100}")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{path}: tensor {name}: {dtype} {shape} needs {nbytes} bytes, data_offsets span "
                         f"{offsets[1] - offsets[0]}")
    return dtype, shape, offsets[0], offsets[1]


class TensorIndex:
    """Lazy access to every tensor of a model directory's safetensors shards.

    Reads each tensor with a plain seek + read instead of mapping the shard: a mapped shard's touched
    pages stay in this process's resident set, so converting would look (and be accounted) as big as
    the checkpoint. This way resident memory holds one expert at a time."""

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        self.where: dict[str, tuple[Path, int, str, list[int], int]] = {}
        for path in files:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"{path} is not a valid safetensors file (header length {n}, file {size} bytes)")
                try:
                    header = json.loads(f.read(n))
                except ValueError as exc:
                    raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
            if not isinstance(header, dict):
                raise ValueError(f"{path}: the safetensors header is not a JSON object")  # noqa: TRY004 - bad file
            spans = []
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, start, end = _check_entry(path, name, info)
                if 8 + n + end > size:
                    raise ValueError(f"{path} is truncated: tensor {name} ends at byte {8 + n + end}, file has {size}")
                spans.append((start, end, name))
                self.where[name] = (path, 8 + n + start, dtype, shape, end - start)
            spans.sort()
            for (_, end, a), (start, _, b) in itertools.pairwise(spans):
                if start < end:
                    raise ValueError(f"{path}: tensors {a} and {b} overlap (bytes {start}..{end})")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        path, offset, dtype, shape, nbytes = self.where[name]
        buf = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise ValueError(f"{path}: short read for tensor {name}")
        if not nbytes:
            return torch.empty(shape, dtype=_ST_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[dtype]).reshape(shape)

    def get_float(self, name: str, block: tuple[int, int]) -> torch.Tensor:
        """fp32 values; FP8 weights are multiplied by their `weight_scale_inv` blocks."""
        t = self.get(name)
        if t.dtype in _FP8:
            scale_name = name + "_scale_inv"
            if scale_name not in self:
                raise ValueError(f"{name} is FP8 but {scale_name} is missing")
            return fp8_dequantize(t, self.get(scale_name), block)
        return t.to(torch.float32)


def fp8_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w (N, K) FP8, scale_inv (ceil(N/bn), ceil(K/bk)) -> fp32 w * scale per (bn x bk) block."""
    n, k = w.shape
    bn, bk = block
    if scale_inv.shape != ((n + bn - 1) // bn, (k + bk - 1) // bk):
        raise ValueError(f"FP8 scale shape {tuple(scale_inv.shape)} does not tile a {n}x{k} weight by {bn}x{bk}")
    s = scale_inv.to(torch.float32).repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w.to(torch.float32) * s


def _moe_layers(arch: MoEArch, index: TensorIndex, num_layers: int) -> list[int]:
    return [i for i in range(num_layers)
            if arch.expert_key(i, 0, 0) in index or any(k in index for k in arch.fused_keys(i))]


def _is_expert_tensor(arch: MoEArch, name: str) -> bool:
    return re.search(rf"\.{re.escape(arch.disk_prefix)}\.experts\.", name) is not None


def read_source_config(src: Path) -> tuple[dict, MoEArch, tuple[int, int, int, int, tuple[int, int]]]:
    """config.json of a checkpoint to convert: (config, family, (E, H, I, layers, FP8 block)). Every
    value convert uses is checked here; a malformed file is a ValueError naming the key."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((src / "config.json").read_bytes())
    except ValueError as exc:  # includes UnicodeDecodeError
        raise ValueError(f"{src / 'config.json'} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{src / 'config.json'} must hold a JSON object, got {type(config).__name__}")  # noqa: TRY004
    if not isinstance(config.get("model_type"), str):
        raise ValueError(f"{src / 'config.json'}: `model_type` must be a string, got {config.get('model_type')!r}")  # noqa: TRY004
    arch = arch_for(config)

    def positive(key: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise ValueError(f"{src / 'config.json'}: `{key}` must be a positive integer, got {value!r}")
        return value

    num_experts = positive("number of experts", next((config[k] for k in arch.experts_key if config.get(k) is not None),
                                                     None))
    inter = positive(arch.inter_key, config.get(arch.inter_key))
    hidden = positive("hidden_size", config.get("hidden_size"))
    layers = positive("num_hidden_layers", config.get("num_hidden_layers"))
    qcfg = config.get("quantization_config") or {}
    block = (qcfg.get("weight_block_size") if isinstance(qcfg, dict) else None) or (128, 128)
    if not isinstance(block, (list, tuple)) or len(block) != 2:
        raise ValueError(f"{src / 'config.json'}: quantization_config.weight_block_size must be [rows, cols], got {block!r}")
    block = tuple(positive("weight_block_size", b) for b in block)
    return config, arch, (num_experts, hidden, inter, layers, block)


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")


def convert(model_dir: str | os.PathLike, out_dir: str | os.PathLike, format: str = "int8", force: bool = False,
            progress: bool = True, settings: KtSettings | None = None, index: TensorIndex | None = None) -> dict:
    """Converts `model_dir` into `out_dir`; returns a report (also written as kt_sft_convert.json).

    `index` replaces the safetensors shards as the tensor source (anything with TensorIndex's `where`,
    `in`, `get` and `get_float`; kt_sft.bench.shaped_models feeds random weights this way); `model_dir` then
    only supplies config.json and the tokenizer files."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    fmt = Format.parse(format)
    src, out = Path(model_dir), Path(out_dir)
    config, arch, sizes = read_source_config(src)
    num_experts, hidden, inter, num_layers, block = sizes
    _check_out_dir(out, force)
    index = TensorIndex(src) if index is None else index
    layers = _moe_layers(arch, index, num_layers)
    if not layers:
        raise ValueError(f"no routed experts found in {src} (looked for {arch.expert_key(0, 0, 0)} and fused tensors)")

    t0 = time.perf_counter()
    tmp = staging_dir(out)
    need = _output_bytes(fmt, num_experts, hidden, inter, layers, index, arch)
    try:
        free = shutil.disk_usage(tmp).free
        if need > free:
            raise OSError(errno.ENOSPC, f"needs {need} bytes, {free} free")
        source = {"model_dir": str(src.resolve()), "model_type": arch.model_type}
        writer = PackWriter(tmp / PACK_NAME, fmt, arch.model_type, num_experts, hidden, inter, layers, source)
        sq_err = {layer: [0.0, 0.0] for layer in layers}
        bar = tqdm(total=len(layers) * num_experts, desc=f"experts -> {fmt.value}", unit="expert", disable=not progress)
        for layer in layers:
            fused_gu, fused_dn = _fused_experts(arch, index, layer, num_experts)
            for e in range(num_experts):
                if fused_gu is not None:
                    gu, dn = fused_gu[e].to(torch.float32), fused_dn[e].to(torch.float32)
                else:
                    g, u, dn = (index.get_float(arch.expert_key(layer, e, w), block) for w in range(3))
                    for w, t in ((0, g), (1, u)):  # found by fuzz_safetensors: torch.cat's RuntimeError
                        if t.shape != (inter, hidden):
                            raise ValueError(f"{arch.expert_key(layer, e, w)}: shape {tuple(t.shape)}, the config's "
                                             f"(I, H) is ({inter}, {hidden})")
                    gu = torch.cat([g, u], dim=0)
                if gu.shape != (2 * inter, hidden) or dn.shape != (hidden, inter):
                    raise ValueError(f"layer {layer} expert {e}: shapes {tuple(gu.shape)}/{tuple(dn.shape)} do not match "
                                     f"the config's H={hidden}, I={inter}")
                for which, w in (("gate_up", gu), ("down", dn)):
                    packed = Fn.quantize_matrix(w, fmt)
                    writer.write_expert(layer, which, e, packed)
                    back = Fn.dequantize_matrix(packed, fmt, *w.shape)
                    sq_err[layer][0] += float((back - w).square().sum())
                    sq_err[layer][1] += float(w.square().sum())
                bar.update(1)
        bar.close()
        writer.close()

        # everything else: safetensors shards (FP8 -> bf16, scale tensors dropped)
        dropped_fp8 = False
        shard, shard_bytes, shards, weight_map = {}, 0, [], {}
        names = [n for n in index.where if not _is_expert_tensor(arch, n)]

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                fname = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                shards.append(fname)
                weight_map.update({n: fname for n in shard})
                shard, shard_bytes = {}, 0

        for name in tqdm(names, desc="other tensors", unit="tensor", disable=not progress):
            if name.endswith("_scale_inv"):
                dropped_fp8 = True
                continue
            t = index.get(name)
            if t.dtype in _FP8:
                t = index.get_float(name, block).to(torch.bfloat16)
                dropped_fp8 = True
            shard[name] = t.contiguous()
            shard_bytes += t.numel() * t.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
        flush()
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        elif shards:
            (tmp / shards[0]).rename(tmp / "model.safetensors")

        for f in src.iterdir():  # tokenizer, chat template, generation config, tokenizer code (Kimi)
            if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_FILES) \
                    and f.name != "model.safetensors.index.json" \
                    and not (f.suffix == ".py" and f.name.startswith(("modeling_", "configuration_"))):
                shutil.copy2(f, tmp / f.name)
        kt = settings or KtSettings(format=fmt.value)
        kt.format = fmt.value
        new_config = dict(config)
        if config.get("model_type") != arch.model_type:  # an alias (Kimi-K2 is DeepSeek-V3)
            new_config["model_type"] = arch.model_type
        if dropped_fp8:
            new_config.pop("quantization_config", None)
        new_config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.KtSftForCausalLM"}
        new_config["kt_sft"] = {**kt.to_config(), "arch": arch.model_type}
        if config.get("model_type") != arch.model_type:
            new_config["kt_sft"]["source_model_type"] = config.get("model_type")
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        (tmp / MODELING_FILE).write_text(modeling_source(arch.model_type))

        report = {
            "model_dir": str(src), "out_dir": str(out), "format": fmt.value, "arch": arch.model_type,
            "num_experts": num_experts, "hidden_size": hidden, "intermediate_size": inter, "moe_layers": layers,
            "pack_bytes": (tmp / PACK_NAME).stat().st_size,
            "expert_rel_error": {str(k): (v[0] / v[1]) ** 0.5 if v[1] else 0.0 for k, v in sq_err.items()},
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # VmHWM
            "fp8_dequantized": dropped_fp8,
        }
        return publish_dir(tmp, out, "kt_sft_convert.json", report)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(exc):
            raise out_of_space(exc, out, need) from exc
        raise


def _fused_experts(arch, index, layer: int, num_experts: int):
    """A layer's fused (E, 2I, H) gate_up / (E, H, I) down tensors, or (None, None) where the layer
    stores experts one by one. Both or neither must be there, each 3-D with one slice per expert
    (found by fuzz_safetensors: a fused gate_up without its down raised a TypeError)."""
    names = arch.fused_keys(layer)
    present = [name in index for name in names]
    if not any(present):
        return None, None
    if not all(present):
        have, missing = (names[0], names[1]) if present[0] else (names[1], names[0])
        raise ValueError(f"layer {layer}: fused expert tensor {have} without {missing}")
    tensors = tuple(index.get(name) for name in names)
    for name, t in zip(names, tensors):
        if t.dim() != 3 or t.shape[0] != num_experts:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected ({num_experts}, ., .) for the config's "
                             f"{num_experts} experts")
    return tensors


def _output_bytes(fmt: Format, num_experts: int, hidden: int, inter: int, layers: list[int], index, arch) -> int:
    """What convert writes: the pack (exact) plus the non-expert tensors (FP8 ones become bf16)."""
    from kt_sft.engine.formats import matrix_bytes

    pack = len(layers) * num_experts * (matrix_bytes(fmt, 2 * inter, hidden) + matrix_bytes(fmt, hidden, inter))
    other = 0
    for name, info in index.where.items():
        if _is_expert_tensor(arch, name) or name.endswith("_scale_inv"):
            continue
        if len(info) == 5:  # TensorIndex: (path, offset, safetensors dtype, shape, nbytes)
            _, _, dtype, shape, nbytes = info
            other += 2 * torch.Size(shape).numel() if dtype.startswith("F8") else nbytes
        else:  # a stand-in index (kt_sft.bench.shaped_models): (shape, torch dtype)
            shape, dtype = info
            other += torch.Size(shape).numel() * dtype.itemsize
    return pack + other
