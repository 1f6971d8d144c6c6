"""Keeps the routed experts out of gradient-checkpointing recomputation.

With gradient checkpointing (LLaMA-Factory's default, reentrant or not) every decoder layer runs its
forward twice: once in the forward pass with activations discarded, once inside the backward pass
to rebuild them. For CPU experts the second run is pure waste: the inputs are the same, so are the
outputs. RecomputeCache keeps, per experts module, what the first run produced (the layer output and
the gate/up pre-activations the backward needs, in host memory) and hands it to the recomputation,
which then skips the C forward. Entries are matched by an exact hash of the inputs, so a recomputation
that sees different inputs (it should never happen) just computes. Cost: T*H*4 + T*k*2I*4 bytes of
host memory per MoE layer between a layer's forward and its backward (`stats()` reports it).
Switch: `checkpoint_cache` in the kt_sft config block, env KT_SFT_CHECKPOINT_CACHE=0.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

_STATS = {"hits": 0, "misses": 0, "stored": 0, "bytes": 0, "peak_bytes": 0}


def stats() -> dict:
    """Process-wide counters: recomputations served from the cache, misses, bytes held now and at peak."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.update(hits=0, misses=0, stored=0, peak_bytes=_STATS["bytes"])


def _checkpoint_hooks_active() -> bool:
    """True inside the first pass of a non-reentrant torch.utils.checkpoint region."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError):  # internal API; without it, non-reentrant runs just recompute
        return False
    return hooks is not None and "checkpoint" in getattr(hooks[0], "__qualname__", "")


def phase() -> str:
    """'recompute' inside a backward pass; 'first' in a forward whose activations checkpointing will
    rebuild (grad disabled: reentrant; checkpoint hooks: non-reentrant); else 'plain'."""
    if torch._C._current_graph_task_id() != -1:
        return "recompute"
    if not torch.is_grad_enabled() or _checkpoint_hooks_active():
        return "first"
    return "plain"


def key_of(*tensors: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class RecomputeCache:
    """At most `capacity` entries per module (one per micro-batch in flight); oldest evicted first."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @staticmethod
    def _size(entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry)

    def put(self, key: bytes, y: torch.Tensor, gu: torch.Tensor) -> None:
        if key in self._entries:
            _STATS["bytes"] -= self._size(self._entries.pop(key))
        while len(self._entries) >= self.capacity:
            _STATS["bytes"] -= self._size(self._entries.popitem(last=False)[1])
        self._entries[key] = (y, gu)
        _STATS["stored"] += 1
        _STATS["bytes"] += self._size((y, gu))
        _STATS["peak_bytes"] = max(_STATS["peak_bytes"], _STATS["bytes"])

    def take(self, key: bytes):
        entry = self._entries.pop(key, None)
        if entry is None:
            _STATS["misses"] += 1
            return None
        _STATS["hits"] += 1
        _STATS["bytes"] -= self._size(entry)
        return entry

    def clear(self) -> None:
        while self._entries:
            _STATS["bytes"] -= self._size(self._entries.popitem()[1])
