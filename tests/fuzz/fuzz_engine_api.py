"""atheris harness: the engine's Python API (CPUExperts / cpu_experts, and functional.moe_forward /
moe_backward, which validate on their own too).

Every input decodes into one call: random E, H, I, T, k, format and compute mode; hidden states of a
random dtype (fp32, bf16, fp16, fp64, int64), sometimes non-contiguous, misaligned (a view one element
into its storage), of the wrong shape or on the meta device; expert ids of a random dtype, sometimes
negative or >= E; routing weights with NaN/Inf; expert LoRA tensors, sometimes of the wrong shape,
dtype or layout. Allowed outcomes: the result, or TypeError / ValueError / NotImplementedError. A
valid fp32 call without NaN/Inf must also match kt_sft.engine.reference (pure torch, dequantized
weights) -- never silently wrong numbers. Run through scripts/fuzz.sh.
"""

import sys

import atheris
import torch

with atheris.instrument_imports(include=["kt_sft"]):
    from kt_sft.engine import functional as Fn
    from kt_sft.engine import reference
    from kt_sft.engine.autograd import cpu_experts
    from kt_sft.engine.formats import ComputeMode

torch.set_num_threads(1)
_ALLOWED = (TypeError, ValueError, NotImplementedError)
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]
_PACKS: dict = {}


def _packed(fmt: str, e: int, h: int, inter: int):
    key = (fmt, e, h, inter)
    if key not in _PACKS:
        if len(_PACKS) > 64:
            _PACKS.clear()
        g = torch.Generator().manual_seed(hash(key) & 0xFFFF)
        gu, dn = torch.randn(e, 2 * inter, h, generator=g) / h**0.5, torch.randn(e, h, inter, generator=g) / inter**0.5
        packed = Fn.pack_experts(gu, dn, fmt)
        _PACKS[key] = (packed, *Fn.dequantize_experts(packed))
    return _PACKS[key]


def _tensor(fdp, shape, dtype, weird: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    vals = torch.tensor(fdp.ConsumeFloatListInRange(n, -4.0, 4.0) if n else [], dtype=torch.float64)
    if weird == 1 and n:  # NaN / Inf somewhere
        vals[fdp.ConsumeIntInRange(0, n - 1)] = fdp.PickValueInList([float("nan"), float("inf"), -float("inf")])
    t = vals.reshape(shape).to(dtype) if dtype != torch.int64 else vals.reshape(shape).round().to(dtype)
    if weird == 2 and t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:  # non-contiguous, same shape
        t = t.T.contiguous().T
    elif weird == 3 and n:  # misaligned: one element into a larger storage
        t = torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:].reshape(shape)
    return t


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    e, h, inter = fdp.ConsumeIntInRange(1, 8), fdp.ConsumeIntInRange(1, 48), fdp.ConsumeIntInRange(1, 24)
    fmt = fdp.PickValueInList(["bf16", "int8", "int4"])
    mode = fdp.PickValueInList([ComputeMode.F32, ComputeMode.BF16, ComputeMode.INT8])
    t, k = fdp.ConsumeIntInRange(0, 12), fdp.ConsumeIntInRange(-1, e + 1)
    packed, gu_ref, dn_ref = _packed(fmt, e, h, inter)
    x_dtype = fdp.PickValueInList(_DTYPES) if fdp.ConsumeIntInRange(0, 3) == 0 else torch.float32
    x_shape = (t, h) if fdp.ConsumeIntInRange(0, 7) else (t, fdp.ConsumeIntInRange(0, 50))
    x = _tensor(fdp, x_shape, x_dtype, fdp.ConsumeIntInRange(0, 5))
    kk = max(k, 0)
    idx = torch.tensor([fdp.ConsumeIntInRange(0, e - 1) for _ in range(t * kk)], dtype=torch.int64).reshape(t, kk)
    if t * kk and fdp.ConsumeIntInRange(0, 3) == 0:  # an id out of range
        idx.view(-1)[fdp.ConsumeIntInRange(0, t * kk - 1)] = fdp.PickValueInList([-1, e, e + 7, -(2**40), 2**40])
    idx = idx.to(fdp.PickValueInList([torch.int64, torch.int64, torch.int32, torch.float32]))
    w = _tensor(fdp, (t, kk), torch.float32, fdp.ConsumeIntInRange(0, 4)).abs()
    if fdp.ConsumeIntInRange(0, 15) == 0:
        x, idx, w = (v.to("meta") if fdp.ConsumeBool() else v for v in (x, idx, w))
    lora = None
    if fdp.ConsumeIntInRange(0, 3) == 0:
        r = fdp.ConsumeIntInRange(1, 3)
        shapes = [(e, r, 2 * inter), (e, r, h), (e, r, h), (e, r, inter)]
        if fdp.ConsumeIntInRange(0, 3) == 0:
            i = fdp.ConsumeIntInRange(0, 3)
            shapes[i] = (e, r, shapes[i][2] + fdp.ConsumeIntInRange(-1, 2))
        lora = Fn.ExpertLora(*(_tensor(fdp, s, torch.float32, fdp.ConsumeIntInRange(0, 4)) / 4 for s in shapes),
                             scale=fdp.PickValueInList([0.5, 1.0, 2]))
    direct = fdp.ConsumeBool()
    try:
        if direct:
            y, saved = Fn.moe_forward(packed, x, idx, w, mode, lora=lora)
            dy = torch.ones(t, h)
            Fn.moe_backward(packed, dy, idx, w, saved, mode, x=x, lora=lora)
        else:
            xg = x.detach().requires_grad_(x.is_floating_point() and x.device.type == "cpu")
            y = cpu_experts(xg, idx, w, packed, mode, lora=lora)
            if xg.requires_grad:
                y.sum().backward()
    except _ALLOWED:
        return
    # a call that went through: compare with the pure-torch twin in the exact mode
    finite = all(bool(torch.isfinite(v.float()).all()) for v in (x, w) if v.numel())
    if mode is ComputeMode.F32 and lora is None and finite and t * kk:
        ref = reference.moe_forward(x.float(), idx.long(), w, gu_ref, dn_ref)
        err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-6))
        tol = 1e-2 if x.dtype in (torch.bfloat16, torch.float16) else 1e-4
        if not err <= tol:
            raise AssertionError(f"wrong numbers: relative error {err} (fmt {fmt}, x {x.dtype}, T={t}, k={kk})")


def test_one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
