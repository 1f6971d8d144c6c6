"""`kt-sft export`: a kt_sft model directory (+ a LoRA adapter) -> one merged Hugging Face checkpoint.

The result is what upstream transformers would have saved for the fine-tuned model: the upstream
class's config (no `auto_map`, no `kt_sft` block), the routed experts dense again, every LoRA merged,
so `AutoModelForCausalLM.from_pretrained(OUT)` loads it without trust_remote_code and without kt_sft.

    experts:  W = dequantize(pack) + ΔW,  ΔW = kt_sft.engine.expert_lora.delta_weight(A, B, scaling, E)  (PEFT's formula)
    modules:  PEFT's own merge_and_unload (attention, shared experts, router, ... and modules_to_save)

Merging runs in fp32; the result is cast to the export dtype once. Modules the upstream class keeps
in fp32 (`_keep_in_fp32_modules[_strict]`, e.g. DeepSeek-V3's e_score_correction_bias) stay fp32.
transformers' own save_pretrained writes the tensors, so the on-disk names and per-expert layout are
the installed version's.

What cannot be restored (the export is the upstream class, not the original checkpoint):
- the experts are the pack's values: an int8/int4 conversion's quantization error stays in them;
- FP8 sources (DeepSeek-V3, Kimi-K2): `quantization_config` is gone, the weights are dense bf16/fp16/fp32;
- an aliased model_type (Kimi-K2) stays the family's (deepseek_v3), and the source's own `auto_map`
  (remote modeling code), which convert replaced, is not restored.

Memory: the whole dense model is held in host memory (plus the non-expert part once more in fp32);
`export` checks that up front. Streaming export for models bigger than RAM is not implemented.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from kt_sft.integration.atomic_dir import is_out_of_space, out_of_space, publish_dir, staging_dir
from kt_sft.integration.convert import _WEIGHT_FILES, TensorIndex, _check_out_dir
from kt_sft.integration.loading import MODELING_FILE
from kt_sft.integration.models import ARCHS
from kt_sft.integration.settings import KtSettings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPORT_NAME = "kt_sft_export.json"
# kt_sft's own files in a converted directory; never copied into an export
_KT_FILES = ("config.json", MODELING_FILE, "kt_sft_convert.json", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


class InsufficientResources(RuntimeError):
    """The export clearly does not fit in this machine's memory or the output's disk."""


def read_kt_config(model_dir: Path) -> dict:
    """config.json of a `kt-sft convert` output; a clear error for anything else."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} does not exist or is not a directory")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except ValueError as exc:
        raise ValueError(f"{model_dir / 'config.json'} is not valid JSON: {exc}") from exc
    if "kt_sft" not in config:
        raise ValueError(f"{model_dir} is not a kt_sft model directory (its config.json has no `kt_sft` block); "
                         "export reads `kt-sft convert` outputs, a plain checkpoint needs no export")
    if config.get("model_type") not in ARCHS:
        raise ValueError(f"{model_dir}: model_type {config.get('model_type')!r} is not one kt_sft supports "
                         f"({', '.join(sorted(ARCHS))})")
    return config


def clean_config(config: dict, dtype: str) -> dict:
    """The converted config.json without what `kt-sft convert` added: upstream class, export dtype."""
    out = {k: v for k, v in config.items() if k not in ("auto_map", "kt_sft", "torch_dtype")}
    out["architectures"] = [ARCHS[config["model_type"]].causal_lm_class]
    out["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    return out


def pack_path(model_dir: Path, config: dict) -> Path:
    settings = KtSettings.from_config(config["kt_sft"])
    pack = Path(settings.pack)
    return pack if pack.is_absolute() else model_dir / pack


def estimate(model_dir: Path, config: dict, dtype: str) -> dict:
    """Parameter counts and the bytes the export holds in memory and writes to disk.

    memory = non-expert params x 4 (the kt model, fp32, where LoRA merges) + all params x dtype bytes
             (the output model) + one MoE layer's experts x 4 x 3 (dequantized, ΔW, merged; fp32)."""
    from kt_sft.engine.pack_file import PackFile

    pack_file = pack_path(model_dir, config)
    if not pack_file.is_file():
        raise FileNotFoundError(f"{model_dir}: expert pack {pack_file} is missing")
    head = PackFile(pack_file).header
    per_layer = head.num_experts * 3 * head.hidden_size * head.intermediate_size
    experts = len(head.layers) * per_layer
    other = sum(torch.Size(shape).numel() for _, _, _, shape, _ in TensorIndex(model_dir).where.values())
    size = DTYPES[dtype].itemsize
    return {"expert_params": experts, "other_params": other, "moe_layers": sorted(head.layers),
            "num_experts": head.num_experts, "pack_format": head.format,
            "memory_bytes": other * 4 + (experts + other) * size + per_layer * 12,
            "disk_bytes": (experts + other) * size}


def available_memory() -> int:
    """MemAvailable (Linux), lowered to the cgroup limit's headroom when one is set; 0 if unknown."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_resources(need: dict, out: Path, memory: int | None = None, disk: int | None = None) -> None:
    """Refuses when the estimate clearly exceeds available memory or the output's free disk."""
    memory = available_memory() if memory is None else memory
    if disk is None:
        parent = out.parent if out.parent.exists() else Path.cwd()
        disk = shutil.disk_usage(parent).free
    gib = 2**30
    if memory and need["memory_bytes"] > memory:
        raise InsufficientResources(
            f"export needs about {need['memory_bytes'] / gib:.1f} GiB of memory (the whole dense model; "
            f"{need['expert_params'] + need['other_params']:,} parameters), {memory / gib:.1f} GiB is available; "
            "free memory or export with --dtype bf16 (streaming export for models bigger than RAM is not implemented)")
    if need["disk_bytes"] > disk:
        raise InsufficientResources(f"export writes about {need['disk_bytes'] / gib:.1f} GiB, {out.parent} has "
                                    f"{disk / gib:.1f} GiB free")


def load_kt_model(model_dir: Path, config: dict, adapter_dir: Path | None) -> tuple[nn.Module, nn.Module | None]:
    """(the kt model in fp32, the PeftModel around it with the adapter loaded, or None)."""
    from kt_sft.integration.loading import kt_causal_lm_class

    model = kt_causal_lm_class(config["model_type"]).from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model, None
    from peft import PeftConfig, PeftType
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.peft_model import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    if peft_config.peft_type != PeftType.LORA:
        raise ValueError(f"{adapter_dir}: only LoRA adapters can be exported, this one is {peft_config.peft_type.value}")
    peft_config.inference_mode = True
    wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    try:
        with warnings.catch_warnings():  # PEFT finds no experts *parameters*: kt_sft's module takes them
            warnings.filterwarnings("ignore", message=r"target_parameters=.* no parameter was matched")
            peft_model = wrapper(model, peft_config, "default")
            result = peft_model.load_adapter(str(adapter_dir), "default")
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch, target modules not found, ...
        raise ValueError(f"adapter {adapter_dir} does not fit {model_dir}: {exc}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        problems = ([f"{len(missing)} LoRA tensors missing (e.g. {missing[0]})"] if missing else []) \
            + ([f"{len(unexpected)} tensors not used (e.g. {unexpected[0]})"] if unexpected else [])
        raise ValueError(f"adapter {adapter_dir} does not fit {model_dir}: {'; '.join(problems)}")
    return model, peft_model


def merged_experts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """fp32 (gate_up_proj (E, 2I, H), down_proj (E, H, I)) of a CPUExperts: the pack's values plus
    the active expert LoRA's ΔW, if any (third value: whether there was one)."""
    from kt_sft.engine.expert_lora import delta_weight
    from kt_sft.integration.peft_lora import LoraCPUExperts

    gate_up, down = module.dequantized()
    name = module._active_lora() if isinstance(module, LoraCPUExperts) else None
    if name is not None:
        e, s = module.num_experts, float(module.scaling[name])
        with torch.no_grad():
            gate_up += delta_weight(module.lora_gu_A[name].weight, module.lora_gu_B[name].weight, s, e)
            down += delta_weight(module.lora_A[name].weight, module.lora_B[name].weight, s, e)
    return gate_up, down, name is not None


def _fp32_pattern(cls: type) -> re.Pattern | None:
    """transformers' rule for `_keep_in_fp32_modules[_strict]`: a name component equal to an entry."""
    names = set(getattr(cls, "_keep_in_fp32_modules", None) or []) | set(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    return re.compile("|".join(rf"((^|\.){re.escape(n)}($|\.))" for n in sorted(names))) if names else None


def _copy_side_files(model_dir: Path, adapter_dir: Path | None, pack_name: str, dst: Path) -> str:
    """Tokenizer, chat template, generation config, ...: everything in the kt directory that is not
    kt_sft's or a weight file. A tokenizer saved with the adapter (LLaMA-Factory's output_dir holds
    the one training used) replaces the model's. Returns where the tokenizer came from."""
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in _KT_FILES and f.name != pack_name and not f.name.endswith(_WEIGHT_FILES):
            shutil.copy2(f, dst / f.name)
    if adapter_dir is None or not (adapter_dir / "tokenizer_config.json").is_file():
        return str(model_dir) if (model_dir / "tokenizer_config.json").is_file() else "none"
    for name in _TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, dst / name)
    return str(adapter_dir)


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None,
           dtype: str = "bf16", force: bool = False, progress: bool = True) -> dict:
    """Writes the merged checkpoint to `out_dir` (atomically); returns a report (also kt_sft_export.json)."""
    import transformers
    from tqdm import tqdm

    from kt_sft.engine.experts import CPUExperts

    if dtype not in DTYPES:
        raise ValueError(f"dtype should be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, out = Path(model_dir), Path(out_dir)
    adapter = None if adapter_dir is None else Path(adapter_dir)
    config = read_kt_config(src)
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter} does not exist")
    _check_out_dir(out, force)
    need = estimate(src, config, dtype)
    check_resources(need, out)

    t0 = time.perf_counter()
    model, peft_model = load_kt_model(src, config, adapter)
    base = model if peft_model is None else peft_model.get_base_model()
    torch_dtype = DTYPES[dtype]
    cls = getattr(transformers, ARCHS[config["model_type"]].causal_lm_class)
    fp32 = _fp32_pattern(cls)

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = not t.is_floating_point() or (fp32 is not None and fp32.search(name) is not None)
        return t.detach() if keep else t.detach().to(torch_dtype)

    # 1. experts: dense again, expert LoRA merged; each module is then dropped from the kt model
    state: dict[str, torch.Tensor] = {}
    expert_modules = [(n, m) for n, m in base.named_modules() if isinstance(m, CPUExperts)]
    expert_lora = False
    for name, module in tqdm(expert_modules, desc=f"experts -> {dtype}", unit="layer", disable=not progress):
        gate_up, down, merged = merged_experts(module)
        expert_lora |= merged
        state[f"{name}.gate_up_proj"] = cast(f"{name}.gate_up_proj", gate_up)
        state[f"{name}.down_proj"] = cast(f"{name}.down_proj", down)
        del gate_up, down
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, nn.Module())  # nothing left for PEFT to merge there
    # 2. everything else: PEFT merges the module LoRA in fp32
    if peft_model is not None:
        base = peft_model.merge_and_unload(progressbar=progress)
    for name, t in base.state_dict().items():
        state[name] = cast(name, t)
    buffers = {n: b for n, b in base.named_buffers() if n not in state}  # non-persistent (rotary inv_freq)
    del model, peft_model, base

    # 3. the upstream model around those tensors (built on the meta device: nothing allocated twice)
    hf_config = cls.config_class.from_dict(clean_config(config, dtype))
    with torch.device("meta"):
        out_model = cls(hf_config)
    try:
        out_model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{src}: the merged weights do not match {cls.__name__}: {exc}") from exc
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        setattr(out_model.get_submodule(owner), leaf, buf)
    del state
    if hf_config.tie_word_embeddings:
        out_model.tie_weights()
    out_model.eval()

    tmp = staging_dir(out)
    try:
        out_model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer = _copy_side_files(src, adapter, pack_path(src, config).name, tmp)
        report = {
            "model_dir": str(src), "adapter_dir": None if adapter is None else str(adapter), "out_dir": str(out),
            "arch": config["model_type"], "class": cls.__name__, "dtype": dtype,
            "pack_format": need["pack_format"], "moe_layers": need["moe_layers"], "num_experts": need["num_experts"],
            "params": need["expert_params"] + need["other_params"], "expert_lora_merged": expert_lora,
            "tokenizer_from": tokenizer, "source_model_type": config["kt_sft"].get("source_model_type"),
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # VmHWM
        }
        return publish_dir(tmp, out, REPORT_NAME, report)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(exc):
            raise out_of_space(exc, out, need["disk_bytes"]) from exc
        raise
