"""The pool of the forward's saved gate/up buffers (kt_sft/engine/buffers.py): a buffer is reused only
once autograd and everything else have let go of it, and the pool stays bounded."""

import gc

import torch
from helpers import distinct_routing, random_experts

from kt_sft import CPUExperts
from kt_sft.engine import buffers
from kt_sft.engine.buffers import BufferPool
from kt_sft.engine.formats import ComputeMode


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_pool_reuses_a_released_buffer_only():
    pool = BufferPool()
    a = pool.take((4, 8))
    b = pool.take((4, 8))
    assert _storage(a) != _storage(b), "two live takes share a buffer"
    pa = _storage(a)
    del a
    gc.collect()
    c = pool.take((2, 8))  # smaller: served by the released buffer (best fit)
    assert _storage(c) == pa and pool.reused == 1
    assert c.shape == (2, 8) and c.is_contiguous() and c.dtype == torch.float32
    d = pool.take((4, 8))  # nothing free: a new buffer
    assert _storage(d) not in (pa, _storage(b))


def test_pool_free_bytes_stay_under_the_peak_of_live_bytes():
    pool = BufferPool()
    for n in range(1, 40):  # varying shapes, one live at a time (a training run with varying T)
        t = pool.take((n, 16))
        del t
        gc.collect()
        assert pool.free_bytes <= pool.peak_live_bytes
    assert pool.peak_live_bytes <= 39 * 16 * 4 * 2  # never more than ~one (best-fit) buffer kept live
    held = [pool.take((64, 16)) for _ in range(3)]  # three at once: the cap grows to what was needed
    del held
    gc.collect()
    assert pool.free_bytes <= pool.peak_live_bytes
    assert pool.live_bytes == 0


def _layer(seed=0):
    torch.manual_seed(seed)
    gate_up, down = random_experts(4, 64, 32)
    return CPUExperts.from_tensors(gate_up, down, format="bf16", compute_mode=ComputeMode.BF16)


def _grads(ex, x, idx, w, dy, retain=False):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = ex(x, idx, w)
    y.backward(dy, retain_graph=retain)
    return y.detach(), x.grad, w.grad


def test_layer_reuses_gu_and_gives_the_same_bits():
    ex = _layer()
    torch.manual_seed(1)
    idx, w = distinct_routing(33, 4, 2)
    x = torch.randn(33, 64).to(torch.bfloat16)
    dy = torch.randn(33, 64).to(torch.bfloat16)
    first = _grads(ex, x, idx, w, dy)
    gc.collect()
    before = buffers.GU_POOL.reused
    second = _grads(ex, x, idx, w, dy)
    assert buffers.GU_POOL.reused > before, "the second call did not reuse the first call's buffer"
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_graph_kept_alive_keeps_its_buffer(monkeypatch):
    """retain_graph, and another forward + backward between two backward passes of one graph: the
    graph's saved gate/up buffer must not be handed to the other call. A fresh pool, so that buffer
    (the reference call's, released) is the only one the other call could be given."""
    monkeypatch.setattr(buffers, "GU_POOL", BufferPool())
    ex = _layer()
    torch.manual_seed(2)
    idx, w = distinct_routing(40, 4, 2)
    x1, x2 = torch.randn(40, 64).to(torch.bfloat16), torch.randn(40, 64).to(torch.bfloat16)
    dy = torch.randn(40, 64).to(torch.bfloat16)
    ref = _grads(ex, x1, idx, w, dy)

    xa, wa = x1.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = ex(xa, idx, wa)
    assert buffers.GU_POOL.reused == 1  # the reference call's buffer, now y's
    y.backward(dy, retain_graph=True)
    gc.collect()
    _grads(ex, x2, idx, w, dy)  # would overwrite y's saved buffer if it had been released
    gc.collect()
    xa.grad, wa.grad = None, None
    y.backward(dy)
    assert torch.equal(xa.grad, ref[1]) and torch.equal(wa.grad, ref[2])
