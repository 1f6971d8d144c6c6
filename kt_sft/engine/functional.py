"""Stateless native ops: validate -> allocate -> call C -> return tensors.

Every tensor that reaches C is checked here first (dtype, shape, device, contiguity, index range),
so no C function sees unchecked input. Inputs must already be on the CPU; the autograd layer moves
CUDA tensors through pinned buffers. The first op on a SIMD kernel path checks it against the
scalar path (verify_kernel_path, at the end).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from kt_sft.engine import _native, buffers, runtime
from kt_sft.engine._native import ffi, lib
from kt_sft.engine.formats import COMPUTE_MODE_C_ID, TRAITS, ComputeMode, Format, matrix_bytes

_ACT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # KT_DTYPE_*


@dataclass
class PackedExperts:
    """Frozen expert weights packed for the C kernels. Plain tensors, deliberately not nn.Parameters
    or buffers: moving a model to a GPU leaves them in host memory."""

    format: Format
    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    gate_up: torch.Tensor  # uint8, E x matrix_bytes(format, 2I, H)
    down: torch.Tensor     # uint8, E x matrix_bytes(format, H, I)

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() + self.down.numel()


@dataclass
class ExpertLora:
    """One rank-r LoRA adapter per expert on both products, in the kernels' layout: fp32, contiguous,
    CPU, (E, r, n) each. B maps a product's input to rank r, A maps rank r to its output:
        gate_up:  gu += scale * A_gu[e]^T (B_gu[e] x)      gu_b (E, r, H),  gu_a (E, r, 2I)
        down:     out += scale * A_d[e]^T (B_d[e] h)       d_b  (E, r, I),  d_a  (E, r, H)
    kt_sft/engine/expert_lora.py builds this from PEFT's tensors (lora_A.weight is A viewed (E, r, N) as is;
    lora_B.weight (K, r*E) is B with the expert fastest, permuted)."""

    gu_a: torch.Tensor
    gu_b: torch.Tensor
    d_a: torch.Tensor
    d_b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.gu_a.shape[1]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gu_a, self.gu_b, self.d_a, self.d_b


def validate_lora(packed: "PackedExperts", lora: ExpertLora) -> None:
    """Raises a ValueError/TypeError naming the tensor whose dtype, device, layout or shape is wrong."""
    e, h, inter = packed.num_experts, packed.hidden_dim, packed.intermediate_dim
    r = lora.gu_a.shape[1] if lora.gu_a.dim() == 3 else -1
    if r < 1:
        raise ValueError(f"expert LoRA rank must be >= 1, got gu_a of shape {tuple(lora.gu_a.shape)}")
    expected = {"gu_a": (e, r, 2 * inter), "gu_b": (e, r, h), "d_a": (e, r, h), "d_b": (e, r, inter)}
    for name, shape in expected.items():
        t = getattr(lora, name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"expert LoRA `{name}` must be a float32 CPU tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '?')}")
        if tuple(t.shape) != shape:
            raise ValueError(f"expert LoRA `{name}` has shape {tuple(t.shape)}, expected {shape} "
                             f"for E={e}, H={h}, I={inter}, r={r}")
        if not t.is_contiguous():
            raise ValueError(f"expert LoRA `{name}` must be contiguous")
    if not isinstance(lora.scale, float):
        raise TypeError(f"expert LoRA scale must be a float, got {type(lora.scale).__name__}")


def _set_lora(a, lora: "ExpertLora | None") -> None:
    if lora is None:
        a.lora_r = 0
        return
    a.lora_r, a.lora_scale = lora.rank, lora.scale
    a.lora_gu_a, a.lora_gu_b = _ptr(lora.gu_a, "float *"), _ptr(lora.gu_b, "float *")
    a.lora_d_a, a.lora_d_b = _ptr(lora.d_a, "float *"), _ptr(lora.d_b, "float *")


def _ptr(t: torch.Tensor, ctype: str = "void *"):
    return ffi.cast(ctype, t.data_ptr())


def _check_weight(name: str, t: torch.Tensor, expected: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"`{name}` must be float32 or bfloat16, got {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"`{name}` must be 3-D (E, rows, cols), got shape {tuple(t.shape)}")
    if expected is not None and tuple(t.shape) != expected:
        raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {expected} to match gate_up_proj")
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"`{name}` contains NaN or Inf; refusing to pack non-finite weights")


def pack_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, format: str | Format) -> PackedExperts:
    """Quantizes transformers-layout expert weights, gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    fmt = Format.parse(format)
    _check_weight("gate_up_proj", gate_up_proj)
    e, two_i, h = gate_up_proj.shape
    if two_i % 2:
        raise ValueError(f"`gate_up_proj` dim 1 must be 2*I (even), got {two_i}")
    inter = two_i // 2
    _check_weight("down_proj", down_proj, (e, h, inter))
    if e < 1 or h < 1 or inter < 1:
        raise ValueError(f"expert shapes must be positive, got E={e} H={h} I={inter}")

    def pack(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
        w = w.detach().to("cpu").contiguous()
        out = torch.empty((e, matrix_bytes(fmt, n, k)), dtype=torch.uint8)
        runtime.advise_hugepages(out.data_ptr(), out.numel())  # before the first write
        rc = lib.kt_quantize_experts(TRAITS[fmt].c_id, _ptr(w), _ACT_DTYPES[w.dtype], e, n, k, _ptr(out))
        _native.check(rc, "kt_quantize_experts")
        return out

    return PackedExperts(fmt, e, h, inter, pack(gate_up_proj, two_i, h), pack(down_proj, h, inter))


def quantize_matrix(w: torch.Tensor, format: str | Format) -> torch.Tensor:
    """One (N, K) fp32/bf16 matrix -> its packed bytes (uint8, kt_matrix_bytes long). Threaded."""
    fmt = Format.parse(format)
    if w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"expected a 2-D float32/bfloat16 matrix, got {w.dtype} {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("matrix contains NaN or Inf; refusing to pack non-finite weights")
    w = w.detach().to("cpu").contiguous()
    n, k = w.shape
    out = torch.empty(matrix_bytes(fmt, n, k), dtype=torch.uint8)
    _native.check(lib.kt_quantize_experts(TRAITS[fmt].c_id, _ptr(w), _ACT_DTYPES[w.dtype], 1, n, k, _ptr(out)),
                  "kt_quantize_experts")
    return out


def dequantize_matrix(packed: torch.Tensor, format: str | Format, n: int, k: int) -> torch.Tensor:
    """Packed bytes of one (N, K) matrix -> fp32, the values the kernels multiply by."""
    fmt = Format.parse(format)
    if packed.dtype != torch.uint8 or packed.numel() < matrix_bytes(fmt, n, k):
        raise ValueError(f"expected {matrix_bytes(fmt, n, k)} packed bytes, got {packed.dtype} x {packed.numel()}")
    out = torch.empty((n, k), dtype=torch.float32)
    _native.check(lib.kt_dequantize_matrix(TRAITS[fmt].c_id, _ptr(packed.contiguous()), n, k, _ptr(out)),
                  "kt_dequantize_matrix")
    return out


def dequantize_experts(packed: PackedExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_proj, down_proj) as fp32, exactly the values the kernels multiply by."""
    e, h, inter = packed.num_experts, packed.hidden_dim, packed.intermediate_dim
    gu = torch.empty((e, 2 * inter, h), dtype=torch.float32)
    dn = torch.empty((e, h, inter), dtype=torch.float32)
    for i in range(e):
        gu[i] = dequantize_matrix(packed.gate_up[i], packed.format, 2 * inter, h)
        dn[i] = dequantize_matrix(packed.down[i], packed.format, h, inter)
    return gu, dn


def validate_routing(packed: PackedExperts, x: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> None:
    """Raises a TypeError/ValueError naming the bad value. Devices are checked by the caller."""
    for name, t in (("hidden_states", x), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"`{name}` must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"`{name}` must be contiguous (call .contiguous()), got strides {t.stride()}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"`hidden_states` must be float32 or bfloat16, got {x.dtype}")
    if x.shape[1] != packed.hidden_dim:
        raise ValueError(f"`hidden_states` has hidden size {x.shape[1]}, experts expect {packed.hidden_dim}")
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"`top_k_index` must be int64 or int32, got {top_k_index.dtype}")
    if not top_k_weights.is_floating_point():
        raise TypeError(f"`top_k_weights` must be a floating tensor, got {top_k_weights.dtype}")
    t, k = top_k_index.shape
    if t != x.shape[0] or tuple(top_k_weights.shape) != (t, k):
        raise ValueError(
            f"shapes disagree: hidden_states {tuple(x.shape)}, top_k_index {tuple(top_k_index.shape)}, "
            f"top_k_weights {tuple(top_k_weights.shape)}; expected (T, H), (T, k), (T, k)"
        )
    if k < 1 or k > packed.num_experts:
        raise ValueError(f"top-k must be in [1, {packed.num_experts}] (the number of experts), got k={k}")
    if t * k >= 2**31:
        raise ValueError(f"T*k = {t * k} routing pairs exceed the engine's int32 limit; split the batch")
    if top_k_index.device.type == "cpu":  # CUDA ids are checked on their host copy (no extra sync)
        check_expert_ids(packed, top_k_index)


def check_expert_ids(packed: PackedExperts, top_k_index: torch.Tensor) -> None:
    if top_k_index.numel():
        lo, hi = int(top_k_index.min()), int(top_k_index.max())
        if lo < 0 or hi >= packed.num_experts:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`top_k_index` holds expert id {bad}, outside [0, {packed.num_experts})")


def _validate_call(packed: PackedExperts, x, top_k_index, top_k_weights, lora: ExpertLora | None,
                   x_name: str = "hidden_states") -> None:
    """The functional ops' own check (they are reachable without cpu_experts): CPU tensors only, then
    validate_routing and validate_lora. Costs a min/max over the ids, ~µs."""
    for name, t in ((x_name, x), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise ValueError(f"`{name}` must be a CPU tensor here (cpu_experts stages CUDA tensors), got {t.device}")
    try:
        validate_routing(packed, x, top_k_index, top_k_weights)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("`hidden_states`", f"`{x_name}`")) from None
    if lora is not None:
        validate_lora(packed, lora)


def _args(packed: PackedExperts, mode: ComputeMode, idx: torch.Tensor, w: torch.Tensor):
    a = ffi.new("kt_moe_args *")
    a.format = TRAITS[packed.format].c_id
    a.act_mode = COMPUTE_MODE_C_ID[mode]
    a.E, a.H, a.I = packed.num_experts, packed.hidden_dim, packed.intermediate_dim
    a.T, a.k = idx.shape
    a.gate_up = _ptr(packed.gate_up)
    a.down = _ptr(packed.down)
    a.topk_idx = _ptr(idx, "int64_t *")
    a.topk_w = _ptr(w, "float *")
    return a


# int8 mode sums up to K products of |q| <= 127 in int32: 127 * 127 * K < 2^31 needs K <= 131072.
INT8_MAX_CONTRACTION = 131072


def _check_mode(packed: PackedExperts, mode: ComputeMode) -> None:
    longest = max(packed.hidden_dim, 2 * packed.intermediate_dim)
    if mode is ComputeMode.INT8 and longest > INT8_MAX_CONTRACTION:
        raise ValueError(f"compute mode int8 sums {longest} products in int32; at most {INT8_MAX_CONTRACTION} are safe")


def _routing_tensors(top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    return top_k_index.to(torch.int64).contiguous(), top_k_weights.to(torch.float32).contiguous()


def moe_forward(packed: PackedExperts, x: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, mode: ComputeMode, save_for_backward: bool = True,
                lora: ExpertLora | None = None):
    """Returns (y fp32 (T, H), gu fp32 (T*k, 2I) or None): the layer output and the gate/up
    pre-activations the backward needs. CPU tensors only; validated by validate_routing (and
    validate_lora for `lora`)."""
    _validate_call(packed, x, top_k_index, top_k_weights, lora)
    verify_kernel_path()
    _check_mode(packed, mode)
    idx, w = _routing_tensors(top_k_index, top_k_weights)
    t, k = idx.shape
    y = torch.empty((t, packed.hidden_dim), dtype=torch.float32)
    gu = buffers.GU_POOL.take((t * k, 2 * packed.intermediate_dim)) if save_for_backward else None
    if t == 0:
        return y, gu
    a = _args(packed, mode, idx, w)
    a.x, a.x_dtype = _ptr(x), _ACT_DTYPES[x.dtype]
    a.y = _ptr(y, "float *")
    a.gu = _ptr(gu, "float *") if gu is not None else ffi.NULL
    _set_lora(a, lora)
    _native.check(lib.kt_moe_forward(a), "kt_moe_forward")
    return y, gu


def moe_backward(packed: PackedExperts, dy: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, gu: torch.Tensor, mode: ComputeMode,
                 x: torch.Tensor | None = None, lora: ExpertLora | None = None):
    """Returns (dx fp32 (T, H), d top_k_weights fp32 (T, k), LoRA grads) for the incoming gradient
    dy (T, H). With `lora`, `x` is the forward's input and the grads are (d gu_a, d gu_b, d d_a,
    d d_b) in the kernels' layout; without, None."""
    if isinstance(dy, torch.Tensor) and dy.dtype not in _ACT_DTYPES and dy.is_floating_point():
        dy = dy.to(torch.float32)
    dy = dy.contiguous() if isinstance(dy, torch.Tensor) else dy
    _validate_call(packed, dy, top_k_index, top_k_weights, lora, x_name="dy")
    _check_mode(packed, mode)
    idx, w = _routing_tensors(top_k_index, top_k_weights)
    t, k = idx.shape
    if (not isinstance(gu, torch.Tensor) or gu.dtype != torch.float32 or gu.device.type != "cpu"
            or not gu.is_contiguous() or tuple(gu.shape) != (t * k, 2 * packed.intermediate_dim)):
        raise ValueError("backward needs the gate/up activations saved by moe_forward(save_for_backward=True)")
    dx = torch.zeros((t, packed.hidden_dim), dtype=torch.float32)
    dw = torch.zeros((t, k), dtype=torch.float32)
    grads = None
    if lora is not None:
        if (not isinstance(x, torch.Tensor) or tuple(x.shape) != (t, packed.hidden_dim) or x.dtype not in _ACT_DTYPES
                or x.device.type != "cpu"):
            raise ValueError("the LoRA backward needs the forward's input x, (T, H) float32/bfloat16 on the CPU")
        x = x.contiguous()
        grads = tuple(torch.zeros_like(m) for m in lora.tensors())
    if t == 0:
        return dx, dw, grads
    a = _args(packed, mode, idx, w)
    a.dy, a.dy_dtype = _ptr(dy), _ACT_DTYPES[dy.dtype]
    a.gu = _ptr(gu, "float *")
    a.dx = _ptr(dx, "float *")
    a.dw = _ptr(dw, "float *")
    _set_lora(a, lora)
    if lora is not None:
        a.x, a.x_dtype = _ptr(x), _ACT_DTYPES[x.dtype]
        a.grad_gu_a, a.grad_gu_b, a.grad_d_a, a.grad_d_b = (_ptr(g, "float *") for g in grads)
    _native.check(lib.kt_moe_backward(a), "kt_moe_backward")
    return dx, dw, grads


# ---- kernel self-check ------------------------------------------------------------------------

_VERIFIED: set[int] = set()
# Same inputs and mode: only the summation order differs between paths. In the bf16 and int8 modes
# that order can flip a rounding of h or of the gradients (one bf16 ulp, one int8 quantum), which
# the later products carry; measured on avx2 vs scalar: f32 3.4e-7, bf16 1.5e-4, int8 2.2e-7.
# A real kernel bug (indexing, a missed tail) is an O(1) error.
SELF_CHECK_REL_ERR = {"f32": 1e-4, "bf16": 2e-3, "int8": 2e-3}


def _self_check(isa: int) -> dict[str, float]:
    """Worst relative error vs scalar per compute mode of kernel path `isa` on a small random layer
    (every format and compute mode, few and many tokens per expert, forward and backward, with expert
    LoRA). Leaves `isa` selected."""
    gen = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    cases = [(f, m) for f in ("bf16", "int8", "int4") for m in (ComputeMode.F32, ComputeMode.BF16)]
    cases += [("int8", ComputeMode.INT8), ("int4", ComputeMode.INT8)]
    for fmt, mode in cases:
        packed = pack_experts(torch.randn(4, 2 * 24, 70, generator=gen), torch.randn(4, 70, 24, generator=gen), fmt)
        for t in (5, 61):
            x = torch.randn(t, 70, generator=gen)
            idx = torch.argsort(torch.rand(t, 4, generator=gen), dim=1)[:, :2].contiguous()
            w = torch.rand(t, 2, generator=gen)
            dy = torch.randn(t, 70, generator=gen)
            lora = ExpertLora(*(torch.randn(4, 3, n, generator=gen) for n in (48, 70, 70, 24)), scale=0.5)
            outs = []
            for path in (runtime.KERNEL_PATHS["scalar"], isa):
                _native.check(lib.kt_select_isa(path), "kt_select_isa")
                y, gu = moe_forward(packed, x, idx, w, mode, lora=lora)
                dx, dw, grads = moe_backward(packed, dy, idx, w, gu, mode, x=x, lora=lora)
                outs.append((y, dx, dw, *grads))
            for fast, ref in zip(outs[1], outs[0]):
                err = float((fast - ref).norm() / ref.norm().clamp_min(1e-30))
                worst[mode.value] = max(worst.get(mode.value, 0.0), err if err == err else float("inf"))
    return worst


# Paths that failed the self-check in this process: name -> {compute mode: relative error}.
SELF_CHECK_FAILURES: dict[str, dict[str, float]] = {}


def verify_kernel_path() -> None:
    """Before a SIMD path computes anything in this process, it must reproduce the scalar reference
    (_self_check). A path that does not, on this CPU, is dropped with a warning for the next one down
    (amx -> avx512 -> avx2 -> scalar) that passes: a wrong kernel costs a clear message and speed,
    never silently wrong numbers. Runs once per path (~10-50 ms); `kt-sft doctor` shows failures."""
    isa = lib.kt_current_isa()
    while isa != runtime.KERNEL_PATHS["scalar"]:
        name = runtime.path_name(isa)
        if name not in SELF_CHECK_FAILURES:
            if isa in _VERIFIED:
                break
            _VERIFIED.add(isa)  # first, so the check's own calls do not check again
            worst = _self_check(isa)
            bad = {m: e for m, e in worst.items() if not e <= SELF_CHECK_REL_ERR[m]}
            if not bad:
                break
            SELF_CHECK_FAILURES[name] = bad
            warnings.warn(
                f"kt_sft: kernel path {name!r} disagrees with the scalar reference on this CPU (relative error "
                f"by compute mode {bad}, allowed {SELF_CHECK_REL_ERR}); using "
                f"{runtime.path_name(runtime.next_path_down(isa))!r} instead. Please report this with `kt-sft doctor`.",
                RuntimeWarning,
                stacklevel=3,
            )
        isa = runtime.next_path_down(isa)
    _native.check(lib.kt_select_isa(isa), "kt_select_isa")
