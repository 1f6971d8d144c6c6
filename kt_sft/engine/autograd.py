"""autograd Functions over the native expert engine. They call kt_sft.engine.functional only."""

from __future__ import annotations

import torch

from kt_sft.engine import functional as Fn
from kt_sft.engine import recompute_cache
from kt_sft.engine.formats import ComputeMode


def _to_host(*tensors: torch.Tensor, pin: bool = True) -> list[torch.Tensor]:
    """CPU tensors pass through; CUDA tensors land in pinned host buffers (async copies, then one wait
    on the current stream only, not the whole device)."""
    out, device = [], None
    for t in tensors:
        if t.device.type == "cpu":
            out.append(t)
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        out.append(host)
        device = t.device
    if device is not None:
        torch.cuda.current_stream(device).synchronize()
    return out


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype, pin: bool = True) -> torch.Tensor:
    if device.type == "cpu":
        return t.to(dtype)
    host = t.to(dtype)
    if pin and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=pin)


class CPUExpertsFunction(torch.autograd.Function):
    """y = experts(x, top_k_index, top_k_weights) with frozen packed weights, plus optional expert
    LoRA (the four tensors of Fn.ExpertLora as inputs, so autograd delivers their gradients).

    Saved for backward: the routing (index, weights) and the gate/up pre-activations (T*k, 2I) fp32
    from the forward (and x with LoRA). Recomputing them would cost a third of the backward's FLOPs
    again; keeping them costs T*k*2I*4 bytes for one layer at a time under gradient checkpointing."""

    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, packed: Fn.PackedExperts, mode: ComputeMode,
                cache: "recompute_cache.RecomputeCache | None" = None, phase: str = "plain", pin: bool = True,
                lora_scale: float | None = None, lora_key: bytes = b"", *lora_tensors):
        device, x_dtype, w_dtype = x.device, x.dtype, top_k_weights.dtype
        x_h, idx_h, w_h = _to_host(x, top_k_index, top_k_weights, pin=pin)
        if top_k_index.device.type != "cpu":
            Fn.check_expert_ids(packed, idx_h)
        lora = Fn.ExpertLora(*lora_tensors, scale=lora_scale) if lora_scale is not None else None
        need_grad = any(ctx.needs_input_grad[i] for i in (0, 2, *range(10, 10 + len(lora_tensors))))
        # (phase is decided by the caller: inside forward() grad mode is always off)
        key = recompute_cache.key_of(x_h, idx_h, w_h) + lora_key if phase != "plain" else None
        hit = cache.take(key) if phase == "recompute" else None
        if hit is not None:  # checkpoint recomputation: the first pass already ran these experts
            y, gu = hit
        else:
            y, gu = Fn.moe_forward(packed, x_h, idx_h, w_h, mode, save_for_backward=need_grad or phase == "first",
                                   lora=lora)
        if phase == "first":
            cache.put(key, y, gu)
        ctx.packed, ctx.mode, ctx.lora_scale = packed, mode, lora_scale
        ctx.device, ctx.x_dtype, ctx.w_dtype, ctx.pin = device, x_dtype, w_dtype, pin
        if need_grad:
            ctx.save_for_backward(idx_h, w_h, gu, *((x_h, *lora_tensors) if lora else ()))
        return _to_device(y, device, x_dtype, pin)

    @staticmethod
    def backward(ctx, dy):
        n_lora = 4 if ctx.lora_scale is not None else 0
        if not any(ctx.needs_input_grad):
            return (None,) * len(ctx.needs_input_grad)
        idx_h, w_h, gu, *rest = ctx.saved_tensors
        x_h, lora = (rest[0], Fn.ExpertLora(*rest[1:], scale=ctx.lora_scale)) if n_lora else (None, None)
        (dy_h,) = _to_host(dy.contiguous(), pin=ctx.pin)
        dx, dw, grads = Fn.moe_backward(ctx.packed, dy_h, idx_h, w_h, gu, ctx.mode, x=x_h, lora=lora)
        dx = _to_device(dx, ctx.device, ctx.x_dtype, ctx.pin) if ctx.needs_input_grad[0] else None
        dw = _to_device(dw, ctx.device, ctx.w_dtype, ctx.pin) if ctx.needs_input_grad[2] else None
        lora_grads = tuple(g if ctx.needs_input_grad[10 + i] else None for i, g in enumerate(grads or ()))
        return ((dx, None, dw) + (None,) * 7 + lora_grads)[: len(ctx.needs_input_grad)]


def cpu_experts(x, top_k_index, top_k_weights, packed: Fn.PackedExperts, mode: ComputeMode,
                cache: "recompute_cache.RecomputeCache | None" = None, pin_memory: bool = True,
                lora: "Fn.ExpertLora | None" = None, lora_key: bytes = b""):
    """Validates, then runs CPUExpertsFunction (with `cache`, checkpoint recomputation reuses the
    first pass's results; see kt_sft/recompute_cache.py). `lora_key` identifies the LoRA weights'
    state for that cache (kt_sft/lora.py passes the parameters' versions)."""
    devices = {t.device for t in (x, top_k_index, top_k_weights) if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    device = next(iter(devices)) if devices else None
    if device is not None and device.type not in ("cpu", "cuda"):
        raise ValueError(f"inputs must be on cpu or cuda, got {device}")
    Fn.validate_routing(packed, x, top_k_index, top_k_weights)
    phase = recompute_cache.phase() if cache is not None else "plain"
    if lora is None:
        return CPUExpertsFunction.apply(x, top_k_index, top_k_weights, packed, mode, cache, phase, pin_memory)
    Fn.validate_lora(packed, lora)
    return CPUExpertsFunction.apply(x, top_k_index, top_k_weights, packed, mode, cache, phase, pin_memory,
                                    lora.scale, lora_key, *lora.tensors())
