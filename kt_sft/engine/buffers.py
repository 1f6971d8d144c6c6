"""Reused host buffers for the forward's saved gate/up activations.

`moe_forward` saves `gu`, (T*k, 2I) fp32, for the backward: 138 MB per layer call at T = 2048 on the
DeepSeek-V2-Lite shape. A fresh `torch.empty` of that size is a new mapping from glibc (above its
mmap threshold), so the engine's first writes to it fault in ~35,000 pages inside the forward's
products, every call (measured on an EPYC Zen 4 VM: docs/benchmarks.md, session 13). The pool hands
out views of buffers that earlier calls' backward passes have released, so their pages stay mapped.

A buffer returns to the pool only when the view handed out is gone: `weakref.finalize` on the view
fires when its TensorImpl dies, which PyTorch delays while C++ still holds it (autograd's saved
tensors, also under `retain_graph=True`; the recompute cache holds it in Python), so a live buffer is
never handed out twice. The pool keeps at most as many free bytes as were ever handed out and alive
at the same time (the process needed that much at once anyway), so varying shapes cannot grow it.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch


class BufferPool:
    """fp32 CPU buffers, best fit by element count. take() may return a view into a larger buffer."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []  # 1-D bases, not handed out
        # re-entrant: a garbage collection inside take() can run a finalizer (_release) on this thread
        self._lock = threading.RLock()
        self.live_bytes = 0
        self.peak_live_bytes = 0
        self.reused = 0  # takes served from the pool (tests, diagnostics)

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in list(self._free))

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        with self._lock:
            fits = [b for b in self._free if b.numel() >= n]
            base = min(fits, key=torch.Tensor.numel) if fits else None
            # by identity (tensors compare elementwise); a finalizer run meanwhile on this thread may
            # have rebuilt the list without it
            at = next((i for i, b in enumerate(self._free) if b is base), None) if base is not None else None
            if at is None:
                base = None
            else:
                del self._free[at]
                self.reused += 1
        if base is None:
            base = torch.empty(n, dtype=torch.float32)
        view = base[:n].view(shape)
        nbytes = base.numel() * base.element_size()
        with self._lock:
            self.live_bytes += nbytes
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(view, self._release, base, nbytes)
        return view

    def _release(self, base: torch.Tensor, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes
            self._free.append(base)
            # keep the largest buffers within the cap (peak live bytes): a later larger call reuses them
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            total, keep = 0, []
            for b in self._free:
                size = b.numel() * b.element_size()
                if total + size <= self.peak_live_bytes:
                    keep.append(b)
                    total += size
            self._free = keep

    def clear(self) -> None:
        with self._lock:
            self._free = []


GU_POOL = BufferPool()
