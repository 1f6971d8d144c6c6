"""Input builders and option handling of the kernel benchmark (in process, no timing)."""

import argparse

import pytest
import torch

from kt_sft.bench import bench_kernels as bk


def test_uniform_routing_is_distinct_per_token():
    idx = bk.uniform_routing(256, 16, 4, torch.Generator().manual_seed(0))
    assert idx.shape == (256, 4) and idx.dtype == torch.int64
    assert all(len(set(row)) == 4 for row in idx.tolist())


def test_zipf_routing_is_distinct_and_skewed_towards_expert_0():
    idx = bk.zipf_routing(2048, 64, 6, torch.Generator().manual_seed(0))
    assert all(len(set(row)) == 6 for row in idx.tolist())
    load = bk.routing_load(idx, 64)
    assert load["expert0_share_of_tokens"] > 0.5 and load["max_over_mean"] > 4
    uniform = bk.routing_load(bk.uniform_routing(2048, 64, 6, torch.Generator().manual_seed(0)), 64)
    assert uniform["max_over_mean"] < 1.5


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bk.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_explicit_options_override_the_quick_preset():
    cfg = bk.config_from_args(_args("--quick", "--tokens", "32,8", "--repeats", "3"))
    assert (cfg.num_experts, cfg.hidden, cfg.tokens, cfg.repeats) == (8, 256, (8, 32), 3)
    assert cfg.workloads() == [(8, "uniform"), (32, "uniform"), (32, "zipf")]
    assert cfg.baseline_workloads() == cfg.workloads()
    capped = bk.config_from_args(_args("--quick", "--baseline-max-tokens", "16"))
    assert capped.baseline_workloads() == [(16, "uniform")]
    assert bk.config_from_args(_args("--quick", "--no-baseline")).baseline_workloads() == []
    default = bk.config_from_args(_args())
    assert (default.num_experts, default.top_k, default.hidden, default.intermediate) == (64, 6, 2048, 1408)
    assert default.tokens == (128, 512, 2048) and default.repeats == 5


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(bk.BenchConfigError, match="`repeats` must be a positive int, got 0"):
        bk.KernelBenchConfig(repeats=0)
    with pytest.raises(bk.BenchConfigError, match="unknown expert format 'fp8'"):
        bk.KernelBenchConfig(formats=("fp8",))


def test_torch_lora_baseline_computes_the_same_layer_as_kt_sft():
    """The LoRA baseline and kt_sft's LoRA rows time the same math: outputs agree (bf16 activations,
    so within the bf16 mode's bound) -- and the option is validated."""
    cfg = bk.KernelBenchConfig(quick=True, **{**bk.QUICK, "lora_rank": 4})
    gate_up, down = bk.make_weights(cfg)
    inp = bk.make_inputs(cfg, 16, "uniform")
    base = bk.TorchLoraExperts(bk.build_baseline(cfg, gate_up, down), bk.make_lora(cfg), 2.0)
    ours = bk._with_lora(bk.CPUExperts.from_tensors(gate_up, down, "bf16"), cfg)
    a, b = base(inp["x"], inp["idx"], inp["w"]), ours(inp["x"], inp["idx"], inp["w"])
    assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
    with pytest.raises(bk.BenchConfigError, match="lora_rank"):
        bk.KernelBenchConfig(lora_rank=-1)


def test_cases_run_round_robin_and_a_failing_case_drops_out():
    """time_interleaved runs every case once per round (so a drifting machine slows all alike), records
    only the rounds after warm-up, and keeps going when one case raises: that case reports its exception
    (NotImplementedError -> 'unsupported', anything else -> 'error: ...') and is skipped afterwards."""
    calls = []

    def case(name, fail=None):
        def fn(x, idx, w):
            calls.append(name)
            if fail is not None and calls.count(name) == 2:  # fails in the second round
                raise fail
            return (x * w.sum()).sum(dim=0, keepdim=True).expand_as(x)
        return (lambda: calls.append(f"prepare {name}"), fn, inp)

    inp = {"x": torch.randn(3, 4), "idx": torch.zeros(3, 1, dtype=torch.int64), "w": torch.rand(3, 1),
           "dy": torch.randn(3, 4)}
    out = bk.time_interleaved([case("a"), case("b", RuntimeError("boom")), case("c", NotImplementedError("no"))],
                              warmup=1, repeats=3)
    runs = [c for c in calls if not c.startswith("prepare")]
    assert runs == ["a", "b", "c", "a", "b", "c", "a", "a"]  # round-robin; b and c gone after failing
    assert all(calls[i] == f"prepare {calls[i + 1]}" for i in range(0, len(calls), 2))  # prepared each time
    assert len(out[0]["fwd"]) == len(out[0]["bwd"]) == 3 and out[0]["dx"].shape == (3, 4)
    cfg = bk.KernelBenchConfig(quick=True)
    assert bk._case_entry(cfg, 3, out[0])[0]["status"] == "ok"
    assert bk._case_entry(cfg, 3, out[1]) == ({"status": "error: RuntimeError: boom"}, None)
    assert bk._case_entry(cfg, 3, out[2]) == ({"status": "unsupported", "detail": "no"}, None)
