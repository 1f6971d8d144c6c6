"""Runtime settings of a converted model: the `kt_sft` block of its config.json, overridden by
`KT_SFT_*` environment variables (LLaMA-Factory rejects unknown YAML keys, so the environment is the
per-run knob). Documented in docs/usage.md."""

from __future__ import annotations

import dataclasses
import os

from kt_sft.engine.formats import ComputeMode, Format

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass
class KtSettings:
    pack: str = "experts.ktpack"
    """Expert pack file, relative to the model directory (or absolute). Env: KT_SFT_PACK."""
    format: str = "int8"
    """Format the pack was written in (informational; the pack header is authoritative)."""
    compute_mode: str | None = None
    """f32 / bf16 / int8, or None for the default per input dtype and pack format (experts.default_compute_mode). Env: KT_SFT_COMPUTE_MODE."""
    num_threads: int | None = None
    """Threads of the C kernels; None = the CPUs this process may use / ranks on this node (torchrun's
    LOCAL_WORLD_SIZE). Env: KT_SFT_NUM_THREADS."""
    torch_threads: int | None = None
    """torch intra-op threads; None = unchanged with one rank per node, else the same share as
    num_threads (torchrun would leave 1). Env: KT_SFT_TORCH_THREADS."""
    pin_memory: bool = True
    """Stage CUDA activations through pinned host buffers. Env: KT_SFT_PIN_MEMORY."""
    verify: bool = False
    """Check every tensor's CRC-32 when the pack is opened (reads the whole file). Env: KT_SFT_VERIFY."""
    checkpoint_cache: bool = True
    """Reuse the experts' first-pass results in gradient-checkpointing recomputation (host memory:
    T*H*4 + T*k*2I*4 bytes per MoE layer until its backward). Env: KT_SFT_CHECKPOINT_CACHE."""

    def __post_init__(self):
        Format.parse(self.format)
        if self.compute_mode is not None:
            self.compute_mode = ComputeMode.parse(self.compute_mode).value
        for key in ("num_threads", "torch_threads"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`kt_sft.{key}` should be a positive integer, got {value!r}")
        if not isinstance(self.pack, str) or not self.pack:
            raise ValueError(f"`kt_sft.pack` should be a file name, got {self.pack!r}")

    @classmethod
    def from_config(cls, block: dict | None, environ: dict | None = None) -> "KtSettings":
        block = dict(block or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(block) - known - {"version", "arch", "source_model_type"}
        if unknown:
            raise ValueError(f"unknown keys in config.json's kt_sft block: {sorted(unknown)}; known: {sorted(known)}")
        env = os.environ if environ is None else environ
        values = {k: v for k, v in block.items() if k in known}
        for f in dataclasses.fields(cls):
            raw = env.get(f"KT_SFT_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.name in ("pin_memory", "verify", "checkpoint_cache"):
                if raw.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"KT_SFT_{f.name.upper()} should be 0/1/true/false, got {raw!r}")
                values[f.name] = raw.lower() in _TRUE
            elif f.name in ("num_threads", "torch_threads"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"KT_SFT_{f.name.upper()} should be a positive integer, got {raw!r}") from None
            else:
                values[f.name] = raw
        return cls(**values)

    def to_config(self) -> dict:
        return {"version": 1, **dataclasses.asdict(self)}
