"""Fork and thread safety of the engine (issue #15, item 4).

The C side has two locks: the pool's call lock (one parallel_for at a time) and the engine-wide lock
of kt_moe.c (one layer call at a time: the workspace is shared). Both have pthread_atfork handlers
that wait for a call running in another thread to end, so a child process never inherits a lock held
by a thread it does not have. Children run in os.fork()ed processes and report through a pipe; the
parent waits with a timeout, so a deadlock fails the test instead of hanging it.
"""

import os
import select
import signal
import threading
import time

import pytest
import torch
from helpers import distinct_routing, random_experts

import kt_sft
from kt_sft.engine import functional as Fn
from kt_sft.engine.formats import ComputeMode

CHILD_TIMEOUT_S = 60


def _layer(seed: int, fmt: str = "int8", e: int = 8, h: int = 96, inter: int = 64):
    torch.manual_seed(seed)
    packed = Fn.pack_experts(*random_experts(e, h, inter), fmt)
    t = 48
    idx, w = distinct_routing(t, e, 2)
    return packed, torch.randn(t, h), idx, w


def _forward(layer, mode=ComputeMode.F32):
    packed, x, idx, w = layer
    y, gu = Fn.moe_forward(packed, x, idx, w, mode)
    dx, dw, _ = Fn.moe_backward(packed, torch.ones_like(x), idx, w, gu, mode)
    return y, dx, dw


def _in_child(fn) -> tuple[int, bytes]:
    """Runs fn() in a forked child; returns (exit status, what it wrote). Fails on a timeout."""
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(r)
        code = 1
        try:
            msg = fn()
            os.write(wfd, msg if isinstance(msg, bytes) else b"ok")
            code = 0
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(wfd, repr(exc).encode()[:4000])
        finally:
            os._exit(code)
    os.close(wfd)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    out = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail(f"forked child did not finish in {CHILD_TIMEOUT_S} s (deadlock?)")
        ready, _, _ = select.select([r], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, out


def test_forward_in_child_after_forward_in_parent():
    layer = _layer(0)
    want = _forward(layer)
    kt_sft.set_num_threads(2)  # the child must start its own workers

    def child():
        got = _forward(layer)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "child results differ from the parent's"
        return b"ok"

    status, out = _in_child(child)
    assert status == 0, out.decode(errors="replace")
    assert all(torch.equal(a, b) for a, b in zip(_forward(layer), want))  # parent unharmed


def test_fork_while_another_thread_is_inside_the_engine():
    """Fork repeatedly while a second thread runs forward+backward in a loop: every child runs a layer
    call of its own (it must not deadlock on a lock the other thread held at fork time) and the
    parent's results stay bitwise equal to a quiet run."""
    layer = _layer(1, e=16, h=256, inter=128)
    want = _forward(layer)
    kt_sft.set_num_threads(2)
    stop, errors, calls = threading.Event(), [], [0]

    def busy():
        try:
            while not stop.is_set():
                got = _forward(layer)
                if not all(torch.equal(a, b) for a, b in zip(got, want)):
                    errors.append("parent results changed while forking")
                calls[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    th = threading.Thread(target=busy)
    th.start()
    try:
        for _ in range(8):
            time.sleep(0.01)
            status, out = _in_child(lambda: b"ok" if all(torch.equal(a, b) for a, b in zip(_forward(layer), want))
                                    else b"child results differ")
            assert status == 0 and out == b"ok", out.decode(errors="replace")
    finally:
        stop.set()
        th.join(timeout=CHILD_TIMEOUT_S)
    assert not th.is_alive()
    assert not errors, errors
    assert calls[0] > 0


def test_two_models_from_two_threads_match_one_at_a_time():
    layers = [_layer(2, "int8"), _layer(3, "int4", e=6, h=64, inter=96)]
    want = [_forward(layer, ComputeMode.BF16) for layer in layers]
    errors = []

    def run(i):
        try:
            for _ in range(10):
                got = _forward(layers[i], ComputeMode.BF16)
                if not all(torch.equal(a, b) for a, b in zip(got, want[i])):
                    errors.append(f"model {i} differs when run concurrently")
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors


def test_thread_count_changed_during_a_layer_call():
    """set_num_threads from one thread while another runs layers: per-thread workspace is carved from
    the count read at the call's start, so a larger count mid-call must not be used by that call."""
    layer = _layer(4, e=16, h=256, inter=128)
    kt_sft.set_num_threads(1)
    want = _forward(layer)
    stop, errors = threading.Event(), []

    def busy():
        try:
            while not stop.is_set():
                if not all(torch.equal(a, b) for a, b in zip(_forward(layer), want)):
                    errors.append("results changed with the thread count")
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    th = threading.Thread(target=busy)
    th.start()
    try:
        for i in range(200):
            kt_sft.set_num_threads(1 + i % 4)
            time.sleep(0.001)
    finally:
        stop.set()
        th.join(timeout=120)
        kt_sft.set_num_threads(2)
    assert not errors, errors
