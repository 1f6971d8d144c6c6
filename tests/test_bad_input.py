"""Bad input gets a clear Python exception naming the bad value: never a crash, never garbage."""

import pytest
import torch
from helpers import distinct_routing, random_experts

from kt_sft import CPUExperts
from kt_sft.engine.formats import ComputeMode


@pytest.fixture
def ex():
    torch.manual_seed(0)
    return CPUExperts.from_tensors(*random_experts(8, 32, 16), format="int8")


def good(t=5, k=2):
    idx, w = distinct_routing(t, 8, k)
    return torch.randn(t, 32), idx, w


def test_wrong_dtypes(ex):
    x, idx, w = good()
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float16"):
        ex(x.half(), idx, w)
    with pytest.raises(TypeError, match="int64 or int32, got torch.float32"):
        ex(x, idx.float(), w)
    with pytest.raises(TypeError, match="floating tensor, got torch.int64"):
        ex(x, idx, idx)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ex(x.numpy(), idx, w)


def test_wrong_shapes(ex):
    x, idx, w = good()
    with pytest.raises(ValueError, match="hidden size 31, experts expect 32"):
        ex(x[:, :31].contiguous(), idx, w)
    with pytest.raises(ValueError, match="must be 2-D"):
        ex(x[None], idx, w)
    with pytest.raises(ValueError, match="shapes disagree"):
        ex(x[:4], idx, w)
    with pytest.raises(ValueError, match="shapes disagree"):
        ex(x, idx, w[:, :1].contiguous())


def test_non_contiguous(ex):
    x, idx, w = good()
    with pytest.raises(ValueError, match="`hidden_states` must be contiguous"):
        ex(torch.randn(32, 5).T, idx, w)
    with pytest.raises(ValueError, match="`top_k_index` must be contiguous"):
        ex(x, idx.T.contiguous().T, w)


@pytest.mark.parametrize("bad", [-1, 8, 1000])
def test_expert_id_out_of_range(ex, bad):
    x, idx, w = good()
    idx[3, 1] = bad
    with pytest.raises(ValueError, match=f"expert id {bad}, outside \\[0, 8\\)"):
        ex(x, idx, w)


def test_k_larger_than_experts(ex):
    x = torch.randn(2, 32)
    idx = torch.randint(0, 8, (2, 9))
    with pytest.raises(ValueError, match="top-k must be in \\[1, 8\\].*got k=9"):
        ex(x, idx, torch.rand(2, 9))


def test_mixed_devices(ex):
    x, idx, w = good()
    with pytest.raises(ValueError, match="cpu or cuda, got meta"):
        ex(x.to("meta"), idx.to("meta"), w.to("meta"))
    with pytest.raises(ValueError, match="different devices"):
        ex(x.to("meta"), idx, w)


def test_bad_weights_at_pack_time():
    gu, dn = random_experts(4, 32, 16)
    with pytest.raises(ValueError, match="unknown expert format 'int3'; supported: bf16, int8, int4"):
        CPUExperts.from_tensors(gu, dn, format="int3")
    with pytest.raises(ValueError, match="expected \\(4, 32, 16\\) to match gate_up_proj"):
        CPUExperts.from_tensors(gu, dn[:, :, :15], format="int8")
    with pytest.raises(ValueError, match="2\\*I \\(even\\), got 31"):
        CPUExperts.from_tensors(gu[:, :31], dn, format="int8")
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float16"):
        CPUExperts.from_tensors(gu.half(), dn, format="int8")
    with pytest.raises(ValueError, match="must be 3-D"):
        CPUExperts.from_tensors(gu[0], dn, format="int8")
    gu[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        CPUExperts.from_tensors(gu, dn, format="int4")


def test_unknown_compute_mode():
    with pytest.raises(ValueError, match="unknown compute mode 'fp8'"):
        CPUExperts.from_tensors(*random_experts(2, 16, 8), compute_mode="fp8")


def test_unimplemented_mode_raises_not_crashes(ex):
    """A compute mode that the active kernel path lacks raises NotImplementedError from C."""
    ex.compute_mode = ComputeMode.INT8
    x, idx, w = good()
    try:
        y = ex(x, idx, w)
    except NotImplementedError as exc:
        assert "compute mode" in str(exc)
    else:
        assert torch.isfinite(y).all()


def test_engine_settings_validated():
    import kt_sft
    from kt_sft import engine

    with pytest.raises(ValueError, match="positive int, got 0"):
        kt_sft.set_num_threads(0)
    with pytest.raises(ValueError, match="unknown kernel path 'sse9'"):
        kt_sft.set_kernel_path("sse9")
    missing = [p for p in engine.KERNEL_PATHS if p not in engine.available_kernel_paths()]
    for path in missing:
        with pytest.raises(ValueError, match="not available here"):
            kt_sft.set_kernel_path(path)


def test_int8_mode_refuses_sums_that_could_overflow_int32():
    ex = CPUExperts.from_tensors(torch.randn(1, 2, 131073), torch.randn(1, 131073, 1), format="int8",
                                 compute_mode="int8")
    with pytest.raises(ValueError, match="sums 131073 products in int32; at most 131072 are safe"):
        ex(torch.randn(1, 131073), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))
