"""Pure-torch twins of every native op. Slow and simple on purpose: tests compare the C engine
against these, and they document the math in executable form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_sft.formats import Format, matrix_bytes, padded_k


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
