"""Pure-torch twins of every native op. Slow and simple on purpose: tests compare the C engine
against these, and they document the math in executable form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_sft.engine.formats import Format, matrix_bytes, padded_k

# ---- formats ---------------------------------------------------------------------------------


def _quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) fp32 -> q (N, K) int8, d (N,) fp32 with w ~= d[:, None] * q."""
    d = w.abs().amax(dim=1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(w * inv[:, None]).to(torch.int8)
    return q, d


def _quantize_int4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K_pad) fp32 -> q (N, K_pad) uint8 in [0, 15], d (N, K_pad/32) fp16: w ~= d * (q - 8)."""
    n, k_pad = w.shape
    blocks = w.reshape(n, k_pad // 32, 32)
    pick = blocks.abs().argmax(dim=2, keepdim=True)  # first element of largest magnitude
    m = torch.gather(blocks, 2, pick).squeeze(2)
    d = (m / -8.0).to(torch.float16)
    d32 = d.to(torch.float32)
    inv = torch.where(d32 != 0, 1.0 / d32, torch.zeros_like(d32))
    q = torch.clamp(torch.round(blocks * inv[..., None]) + 8, 0, 15).to(torch.uint8)
    return q.reshape(n, k_pad), d


def pack_matrix(fmt: Format, w: torch.Tensor) -> torch.Tensor:
    """Twin of kt_quantize_matrix: w (N, K) -> the packed bytes, byte for byte."""
    fmt = Format.parse(fmt)
    n, k = w.shape
    k_pad = padded_k(fmt, k)
    w = F.pad(w.detach().to(torch.float32), (0, k_pad - k))
    out = torch.zeros(matrix_bytes(fmt, n, k), dtype=torch.uint8)
    if fmt is Format.BF16:
        rows = w.to(torch.bfloat16).view(torch.uint8).reshape(-1)
        scales = torch.empty(0, dtype=torch.uint8)
    elif fmt is Format.INT8:
        q, d = _quantize_int8_rows(w)
        rows, scales = q.view(torch.uint8).reshape(-1), d.view(torch.uint8)
    else:
        q, d = _quantize_int4_blocks(w)
        q = q.reshape(n, k_pad // 32, 2, 16)
        rows = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1)  # byte j: elem j (lo), j+16 (hi)
        scales = d.reshape(-1).view(torch.uint8)
    out[: rows.numel()] = rows
    start = (rows.numel() + 63) // 64 * 64
    out[start : start + scales.numel()] = scales
    return out


def unpack_matrix(fmt: Format, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Twin of kt_dequantize_matrix: the packed bytes -> (N, K) fp32."""
    fmt = Format.parse(fmt)
    k_pad = padded_k(fmt, k)
    if fmt is Format.BF16:
        w = packed[: n * k_pad * 2].view(torch.bfloat16).reshape(n, k_pad).to(torch.float32)
    else:
        row_bytes = k_pad if fmt is Format.INT8 else k_pad // 2
        start = (n * row_bytes + 63) // 64 * 64
        rows = packed[: n * row_bytes]
        if fmt is Format.INT8:
            d = packed[start : start + 4 * n].view(torch.float32)
            w = rows.view(torch.int8).reshape(n, k_pad).to(torch.float32) * d[:, None]
        else:
            d = packed[start : start + 2 * n * (k_pad // 32)].view(torch.float16).reshape(n, k_pad // 32)
            b = rows.reshape(n, k_pad // 32, 16)
            q = torch.stack([b & 0x0F, b >> 4], dim=2).reshape(n, k_pad // 32, 32).to(torch.float32) - 8
            w = (q * d.to(torch.float32)[..., None]).reshape(n, k_pad)
    return w[:, :k].contiguous()


# ---- the expert layer ------------------------------------------------------------------------


def moe_forward(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """y[t] = sum_j w[t,j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = top_k_index[t, j].

    gate_up_proj (E, 2I, H): rows [0, I) gate, [I, 2I) up; down_proj (E, H, I). Differentiable
    in x and top_k_weights; computed in the dtype of the inputs (tests use float64)."""
    inter = down_proj.shape[2]
    y = torch.zeros_like(x)
    for e in torch.unique(top_k_index).tolist():
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        gu = x[tok] @ gate_up_proj[e].T
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        out = (h @ down_proj[e].T) * top_k_weights[tok, slot, None]
        y = y.index_add(0, tok, out)
    return y


def moe_backward(x, top_k_index, top_k_weights, gate_up_proj, down_proj, dy):
    """(dx, d top_k_weights) of moe_forward for the incoming gradient dy, by autograd."""
    x = x.detach().requires_grad_(True)
    w = top_k_weights.detach().requires_grad_(True)
    y = moe_forward(x, top_k_index, w, gate_up_proj.detach(), down_proj.detach())
    dx, dw = torch.autograd.grad(y, (x, w), dy, allow_unused=True)
    return (torch.zeros_like(x) if dx is None else dx), (torch.zeros_like(w) if dw is None else dw)


# ---- the int8 compute mode -------------------------------------------------------------------


def quantize_activations(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization as the engine does it (fp32 math): v ~= s[:, None] * q,
    s = absmax / 127. Rows with NaN/Inf get s = NaN."""
    v = v.to(torch.float32)
    amax = v.abs().amax(dim=1) if v.shape[1] else torch.zeros(v.shape[0])
    s = amax / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = torch.round(v * inv[:, None])
    finite = torch.isfinite(amax)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    s = torch.where(finite, s, torch.full_like(s, float("nan")))
    return q, s


def _int8_quants(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized int8-format weights (E, N, K) -> integer quants and per-row scales."""
    d = w.abs().amax(dim=2) / 127.0
    q = torch.round(w / torch.where(d > 0, d, torch.ones_like(d))[..., None])
    return q, d


def moe_forward_int8(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """Twin of the engine's int8 compute mode (forward): x quantized per token, h per pair, products
    on the dequantized weights in float64. Not differentiable; see moe_backward_int8."""
    inter = down_proj.shape[2]
    xq, xs = quantize_activations(x)
    y = torch.zeros(x.shape, dtype=torch.float64)
    for e in torch.unique(top_k_index).tolist():
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        gu = (xq[tok].double() @ gate_up_proj[e].double().T) * xs[tok, None].double()
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        hq, hs = quantize_activations(h)
        out = (hq.double() @ down_proj[e].double().T) * hs[:, None].double()
        y.index_add_(0, tok, out * top_k_weights[tok, slot, None].double())
    return y


def _round_bf16(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the engine's fp32 value rounded to bf16 (nearest even), back in float64."""
    return v.float().bfloat16().double()


def moe_backward_int8(x, top_k_index, top_k_weights, gate_up_proj, down_proj, dy, fmt):
    """Twin of the engine's int8-mode backward: for int8 weights the incoming gradients, with the
    weights' per-row scales folded in, are quantized per pair; for int4 weights (per-block scales
    along the backward's sums) the backward is the bf16 mode's: the gradients dy and dgu and the
    (dequantized) weights they multiply are rounded to bf16."""
    xq, xs = quantize_activations(x)
    x_in = xq.double() * xs[:, None].double()
    q_bwd = Format.parse(fmt) is Format.INT8
    return _moe_backward_twin(x_in, top_k_index, top_k_weights, gate_up_proj, down_proj, dy, q_bwd=q_bwd, round_h=False)


def moe_backward_bf16(x, top_k_index, top_k_weights, gate_up_proj, down_proj, dy):
    """Twin of the engine's bf16-mode backward: x, h, the gradients dy and dgu, and the (dequantized)
    weights the gradients multiply are rounded to bf16; float64 sums."""
    x_in = _round_bf16(x.double())
    return _moe_backward_twin(x_in, top_k_index, top_k_weights, gate_up_proj, down_proj, dy, q_bwd=False, round_h=True)


def _moe_backward_twin(x_in, top_k_index, top_k_weights, gate_up_proj, down_proj, dy, *, q_bwd, round_h):
    """(dx, dw) of the layer whose forward input is x_in (float64, as the engine's forward saw it).
    q_bwd: the int8 mode's quantized backward (int8 weights); else the bf16 products (gradients and
    weights rounded to bf16), with h rounded too for dw when round_h (the bf16 mode)."""
    inter = down_proj.shape[2]
    w64, dy64 = top_k_weights.double(), dy.double()
    if q_bwd:
        gq, gd = _int8_quants(gate_up_proj.double())
        dq, dd = _int8_quants(down_proj.double())
    dx = torch.zeros_like(x_in)
    dw = torch.zeros_like(w64)
    for e in torch.unique(top_k_index).tolist():
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        gu = x_in[tok] @ gate_up_proj[e].double().T
        g, u = gu[:, :inter], gu[:, inter:]
        s = torch.sigmoid(g)
        h = g * s * u
        if q_bwd:
            zq, zs = quantize_activations(dy64[tok] * dd[e])
            dhu = (zq.double() @ dq[e]) * zs[:, None].double()
        else:
            dhu = _round_bf16(dy64[tok]) @ _round_bf16(down_proj[e].double())
        dw[tok, slot] = ((_round_bf16(h) if round_h else h) * dhu).sum(dim=1)
        dh = dhu * w64[tok, slot, None]
        dgu = torch.cat([dh * u * s * (1 + g * (1 - s)), dh * g * s], dim=1)
        if q_bwd:
            zq, zs = quantize_activations(dgu * gd[e])
            dx.index_add_(0, tok, (zq.double() @ gq[e]) * zs[:, None].double())
        else:
            dx.index_add_(0, tok, _round_bf16(dgu) @ _round_bf16(gate_up_proj[e].double()))
    return dx, dw
