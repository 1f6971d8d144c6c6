"""Kernel benchmark: one routed-experts layer, forward and backward, kt_sft against transformers.

Default shape: one MoE layer of DeepSeek-V2-Lite (E=64 experts, top-6, H=2048, I=1408), random
weights (std 0.02, rounded to bf16 so both sides hold identical values), bf16 activations, fp32
routing weights. Per token count T it times

* kt_sft `CPUExperts` for every (format, compute mode, kernel path) asked for, and
* transformers 5.6's own `DeepseekV2Experts` with frozen bf16 weights, under both its `eager` and
  its `grouped_mm` experts implementation (selected through `config._experts_implementation`).

Routing: "uniform" = k distinct experts per token, the top-k of uniform random logits. "zipf" (the
skewed case, at the largest T only) = k distinct experts per token drawn without replacement with
expert e weighted 1/(e+1) (Zipf, s=1), so expert 0 is the hottest; the JSON records the load it gave.

FLOPs (stated in the JSON too): forward = 3 GEMVs of H x I per routed (token, expert) pair =
6*H*I; backward (dx only, weights are frozen) the same again, so fwd+bwd = T*k*12*H*I. The
reference ceiling is torch's fp32 matmul (512 x 2048 x 1408) on the same threads, measured at the start
and again at the end; the higher of the two medians is used (a busy machine only ever lowers it), and
the table warns when they disagree by more than 20% or when the 1-minute load average at the start is
already >= 1 (another job holds a core; torch's OpenMP threads then slow down far more than in
proportion). The load average is recorded at both points.

Timing: forward runs under torch.enable_grad() with x and the routing weights requiring grad;
backward is `y.backward(dy)` timed alone. Per (T, routing) every case -- both transformers
implementations and every kt_sft (format, mode, path) -- runs once per round, round-robin:
`warmup` untimed rounds, then the median of `repeats` rounds. So the ratios compare runs seconds
apart, not minutes: on a shared host whose speed drifts, sequential timing moved the ratios by up
to 1.5x between runs (session 9).

Baseline notes (torch 2.13 CPU): `grouped_mm` dispatches to torch.nn.functional.grouped_mm (the JSON
records which); on CPU that is a loop of per-expert GEMMs, not a fused kernel. On CPUs without native
bf16 (AVX2 only), a bf16 `dy @ W` -- the input-gradient layout of nn.Linear -- takes a slow path
(machine.gflops_torch_bf16_dy_w_* vs *_x_wT_* in the JSON), and it dominates both baselines' backward.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from kt_sft import environment
from kt_sft.engine import _native, runtime
from kt_sft.engine.experts import CPUExperts
from kt_sft.engine.formats import ComputeMode, Format

SCHEMA = "kt_sft.bench.kernels/1"
BASELINE_IMPLS = ("eager", "grouped_mm")
WEIGHT_STD = 0.02
ZIPF_S = 1.0
CEILING_SHAPE = (512, 2048, 1408)  # M, K, N of the fp32 matmul that sets the reference ceiling
# (format, compute mode) pairs the engine rejects by definition (kt_moe.c: int8 products need integer
# weights). Recorded as 'unsupported' without running, instead of as an error.
INVALID_PAIRS = {("bf16", "int8"): "compute mode int8 takes int8 or int4 weights, not bf16"}

DEFINITIONS = {
    "flops_fwd": "T*k*6*H*I (gate, up and down GEMVs, 2*H*I each, per routed pair)",
    "flops_bwd": "T*k*6*H*I (counted the same as forward; weights are frozen, so dx only)",
    "flops_fwd_bwd": "T*k*12*H*I",
    "tokens_per_s": "T / (median fwd s + median bwd s)",
    "frac_of_ceiling": "gflops_fwd_bwd / machine.ceiling_gflops_torch_fp32 (the higher of the start and "
                       "end medians)",
    "frac_of_peak": "gflops_fwd_bwd / machine.peak_gops[peak_instruction]: the measured peak (the higher of the "
                    "readings at the start and at the end) of the instruction "
                    "that bounds the row's kernel path in its compute mode (kt-sft doctor --peak); for the "
                    "transformers rows the machine's fastest bf16-capable instruction",
    "ratio_vs_baseline": "faster baseline time / kt_sft time (= kt_sft throughput / baseline "
                         "throughput) for fwd, bwd and fwd_bwd; > 1 means kt_sft is faster",
    "baseline_best": "per (T, routing), the transformers implementation with the lower fwd+bwd median",
    "timing": "per (T, routing), every case once per round, round-robin; warmup rounds, then medians of `repeats`",
    "routing_uniform": "k distinct experts per token: top-k of uniform random logits",
    "routing_zipf": f"k distinct experts per token drawn without replacement, expert e weighted "
                    f"1/(e+1)^{ZIPF_S}; run at the largest T only",
    "rel_err_vs_eager": "||ours - eager|| / ||eager|| for y, dx, d top_k_weights (quantization error "
                        "included); a sanity check that both sides computed the same layer",
}


class BenchConfigError(ValueError):
    """A benchmark option is invalid; the CLI turns it into a usage error."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class KernelBenchConfig:
    num_experts: int = _help("routed experts E", default=64)
    top_k: int = _help("experts per token k", default=6)
    hidden: int = _help("hidden size H", default=2048)
    intermediate: int = _help("expert intermediate size I", default=1408)
    tokens: tuple[int, ...] = _help("token counts T to time", default=(128, 512, 2048))
    formats: tuple[str, ...] = _help("kt_sft weight formats", default=("bf16", "int8", "int4"))
    modes: tuple[str, ...] = _help("kt_sft compute modes; one that raises NotImplementedError is "
                                   "recorded as 'unsupported'", default=("bf16", "int8"))
    kernel_path: str | None = _help("kernel path: a name, a comma-separated list, 'all' (every available "
                                     "one), or None (the engine's choice)", default=None)
    threads: int = _help("threads for the kt_sft engine and for torch (baseline, ceiling)", default=2)
    repeats: int = _help("timed runs per case (the median is reported)", default=5)
    warmup: int = _help("untimed runs per case before timing", default=1)
    skew: bool = _help("also time Zipf-skewed routing at the largest T", default=True)
    baseline: bool = _help("also time transformers' experts module (eager and grouped_mm)", default=True)
    baseline_max_tokens: int | None = _help("time the baseline only for T <= this (its bf16 backward can "
                                            "take minutes per run on AVX2-only CPUs)", default=None)
    baseline_dtype: str = _help("dtype of the transformers baseline's weights and activations: bf16, fp32, or "
                                "auto (bf16 where the CPU has native bf16 dot products -- avx512_bf16 or "
                                "amx_bf16 -- else fp32: torch's bf16 input-gradient matmul takes a slow "
                                "generic path there and would flatter kt_sft by 60x+)", default="auto")
    lora_rank: int = _help("also time expert LoRA of this rank (0: off): kt_sft with the adapter in its kernels, "
                           "and an unmerged per-expert torch LoRA on the transformers eager loop", default=0)
    seed: int = _help("seed for weights and inputs", default=0)
    quick: bool = _help("tiny smoke configuration (seconds)", default=False)
    out: str | None = _help("JSON path (default bench_results/kernels-<timestamp>.json)", default=None)

    def __post_init__(self):
        for name in ("num_experts", "top_k", "hidden", "intermediate", "threads", "repeats", "baseline_max_tokens"):
            value = getattr(self, name)
            if name == "baseline_max_tokens" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise BenchConfigError(f"`{name}` must be a positive int, got {value!r}")
        if self.warmup < 0:
            raise BenchConfigError(f"`warmup` must be >= 0, got {self.warmup}")
        if self.baseline_dtype not in ("auto", "bf16", "fp32"):
            raise BenchConfigError(f"`baseline_dtype` must be auto, bf16 or fp32, got {self.baseline_dtype!r}")
        if not isinstance(self.lora_rank, int) or not 0 <= self.lora_rank <= min(self.hidden, self.intermediate):
            raise BenchConfigError(f"`lora_rank` must be in [0, min(H, I)], got {self.lora_rank!r}")
        if self.top_k > self.num_experts:
            raise BenchConfigError(f"`top_k` ({self.top_k}) cannot exceed `num_experts` ({self.num_experts})")
        self.tokens = tuple(sorted(set(self.tokens)))
        if not self.tokens or min(self.tokens) < 1:
            raise BenchConfigError(f"`tokens` must be positive ints, got {self.tokens}")
        try:
            self.formats = tuple(Format.parse(f).value for f in self.formats)
            self.modes = tuple(ComputeMode.parse(m).value for m in self.modes)
        except ValueError as exc:
            raise BenchConfigError(str(exc)) from None
        if not self.formats or not self.modes:
            raise BenchConfigError("need at least one format and one compute mode")
        if self.kernel_path is not None:
            self.kernel_path = self.kernel_path.lower()
            names = [] if self.kernel_path == "all" else self.kernel_path.split(",")
            for name in names:
                if name not in runtime.KERNEL_PATHS:
                    raise BenchConfigError(
                        f"unknown kernel path {name!r}; known: all, {', '.join(runtime.KERNEL_PATHS)}")
            if not _native.available():
                raise BenchConfigError(f"the native engine is not loaded: {_native._IMPORT_ERROR}")
            for name in names:
                if name not in runtime.available_kernel_paths():
                    raise BenchConfigError(f"kernel path {name!r} is not available here; "
                                           f"available: {', '.join(runtime.available_kernel_paths())}")

    def kernel_paths(self) -> list[str]:
        if self.kernel_path is None:
            return [runtime.kernel_path()]
        return runtime.available_kernel_paths() if self.kernel_path == "all" else self.kernel_path.split(",")

    def workloads(self) -> list[tuple[int, str]]:
        """(T, routing) pairs, in run order."""
        cases = [(t, "uniform") for t in self.tokens]
        return cases + [(self.tokens[-1], "zipf")] if self.skew else cases

    def baseline_workloads(self) -> list[tuple[int, str]]:
        if not self.baseline:
            return []
        return [(t, r) for t, r in self.workloads() if self.baseline_max_tokens is None or t <= self.baseline_max_tokens]


QUICK = {"num_experts": 8, "top_k": 2, "hidden": 256, "intermediate": 128, "tokens": (16, 64), "repeats": 2,
         "warmup": 1}


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(parse):
    def convert(text: str) -> tuple[str, ...]:
        try:
            return tuple(parse(v.strip()).value for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `kt-sft bench kernels`. Defaults are None so that run() can tell an explicit value
    from a --quick preset; the real defaults live in KernelBenchConfig."""
    h = {f.name: f.metadata["help"] for f in fields(KernelBenchConfig)}
    d = {f.name: f.default for f in fields(KernelBenchConfig)}

    def csv(v) -> str:
        return ",".join(map(str, v))

    parser.add_argument("--quick", action="store_true", default=None,
                        help=f"{h['quick']}: " + ", ".join(f"{k}={csv(v) if isinstance(v, tuple) else v}"
                                                          for k, v in QUICK.items()))
    parser.add_argument("--tokens", type=_int_list, help=f"{h['tokens']}, comma-separated (default {csv(d['tokens'])})")
    parser.add_argument("--formats", type=_choice_list(Format.parse),
                        help=f"{h['formats']}, comma-separated (default {csv(d['formats'])})")
    parser.add_argument("--modes", type=_choice_list(ComputeMode.parse),
                        help=f"{h['modes']}, comma-separated (default {csv(d['modes'])})")
    parser.add_argument("--kernel-path", dest="kernel_path", metavar="PATH",
                        help=f"{', '.join(runtime.KERNEL_PATHS)}, a comma-separated list of them, or all "
                             "(default: the engine's choice)")
    for name, flag in (("threads", "--threads"), ("repeats", "--repeats"), ("warmup", "--warmup"),
                       ("num_experts", "--experts"), ("top_k", "--top-k"), ("hidden", "--hidden"),
                       ("intermediate", "--intermediate"), ("seed", "--seed"),
                       ("baseline_max_tokens", "--baseline-max-tokens")):
        parser.add_argument(flag, dest=name, type=int, metavar="N", help=f"{h[name]} (default {'no limit' if d[name] is None else d[name]})")
    parser.add_argument("--skew", action=argparse.BooleanOptionalAction, help=f"{h['skew']} (default on)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, help=f"{h['baseline']} (default on)")
    parser.add_argument("--baseline-dtype", dest="baseline_dtype", choices=("auto", "bf16", "fp32"),
                        help=f"{h['baseline_dtype']} (default {d['baseline_dtype']})")
    parser.add_argument("--lora-rank", dest="lora_rank", type=int, metavar="R",
                        help=f"{h['lora_rank']} (default {d['lora_rank']})")
    parser.add_argument("--out", metavar="PATH", help=h["out"])


def config_from_args(args: argparse.Namespace) -> KernelBenchConfig:
    """Dataclass defaults, overridden by the --quick preset, overridden by explicit options."""
    values = dict(QUICK) if getattr(args, "quick", None) else {}
    for f in fields(KernelBenchConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return KernelBenchConfig(**values)


# ---------------------------------------------------------------- inputs


def make_weights(cfg: KernelBenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj (E, 2I, H) and down_proj (E, H, I) in bf16, std WEIGHT_STD, one expert at a time
    so the fp32 temporaries stay small."""
    g = torch.Generator().manual_seed(cfg.seed)
    e, h, inter = cfg.num_experts, cfg.hidden, cfg.intermediate
    gate_up = torch.empty(e, 2 * inter, h, dtype=torch.bfloat16)
    down = torch.empty(e, h, inter, dtype=torch.bfloat16)
    for i in range(e):
        gate_up[i] = torch.randn(2 * inter, h, generator=g) * WEIGHT_STD
        down[i] = torch.randn(h, inter, generator=g) * WEIGHT_STD
    return gate_up, down


def uniform_routing(t: int, e: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(T, k) int64, k distinct experts per token."""
    return torch.rand(t, e, generator=g).topk(k, dim=1).indices.contiguous()


def zipf_routing(t: int, e: int, k: int, g: torch.Generator, s: float = ZIPF_S) -> torch.Tensor:
    """(T, k) int64, k distinct experts per token drawn without replacement, expert j weighted 1/(j+1)^s."""
    p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64) ** s
    return torch.multinomial(p.expand(t, e), k, replacement=False, generator=g).contiguous()


def routing_load(idx: torch.Tensor, e: int) -> dict:
    load = torch.bincount(idx.flatten(), minlength=e).double()
    return {"max_over_mean": round(float(load.max() / load.mean()), 3),
            "experts_hit": int((load > 0).sum()),
            "expert0_share_of_tokens": round(float(load[0] / idx.shape[0]), 3)}


def make_inputs(cfg: KernelBenchConfig, t: int, routing: str) -> dict:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t * 2 + (routing == "zipf"))
    route = zipf_routing if routing == "zipf" else uniform_routing
    idx = route(t, cfg.num_experts, cfg.top_k, g)
    return {
        "x": torch.randn(t, cfg.hidden, generator=g).to(torch.bfloat16),
        "idx": idx,
        "w": torch.softmax(torch.randn(t, cfg.top_k, generator=g), dim=1),
        "dy": (torch.randn(t, cfg.hidden, generator=g) * 0.01).to(torch.bfloat16),
        "load": routing_load(idx, cfg.num_experts),
    }


# ---------------------------------------------------------------- timing


def _one_run(fn, inp: dict) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    x = inp["x"].clone().requires_grad_(True)
    w = inp["w"].clone().requires_grad_(True)
    with torch.enable_grad():
        t0 = time.perf_counter()
        y = fn(x, inp["idx"], w)
        t1 = time.perf_counter()
    y.backward(inp["dy"])
    return t1 - t0, time.perf_counter() - t1, y, (x, w)


def time_interleaved(cases: list, warmup: int, repeats: int) -> list:
    """Times every case of one workload round-robin: each of `warmup + repeats` rounds runs every case
    once (forward under enable_grad, then y.backward(dy), each timed alone, on fresh leaf tensors so
    no gradient accumulates), so a machine whose speed drifts over minutes (a shared host)
    slows every case alike and their ratios stay fair. cases: (prepare, fn, inp); prepare() selects
    the case's kernel path / mode / implementation before each run. Returns per case its samples
    ({"fwd": [s], "bwd": [s]} and the last run's y, dx, dw), or the exception that stopped it (the case is then left out of later
    rounds)."""
    out: list = [{"fwd": [], "bwd": []} for _ in cases]
    for i in range(warmup + repeats):
        for c, (prepare, fn, inp) in enumerate(cases):
            if isinstance(out[c], BaseException):
                continue
            try:
                prepare()
                fwd, bwd, y, (x, w) = _one_run(fn, inp)
            except Exception as exc:  # noqa: BLE001 - one failing case must not lose the rest of the run
                out[c] = exc
                continue
            if i >= warmup:
                out[c]["fwd"].append(fwd)
                out[c]["bwd"].append(bwd)
            out[c].update(y=y.detach(), dx=x.grad, dw=w.grad)
    return out


def summarize(cfg: KernelBenchConfig, t: int, samples: dict) -> dict:
    fwd, bwd = statistics.median(samples["fwd"]), statistics.median(samples["bwd"])
    flops = t * cfg.top_k * 6 * cfg.hidden * cfg.intermediate  # each of fwd and bwd
    out = {
        "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3,
        "fwd_ms_samples": [s * 1e3 for s in samples["fwd"]], "bwd_ms_samples": [s * 1e3 for s in samples["bwd"]],
        "tokens_per_s": t / (fwd + bwd),
        "gflops_fwd": flops / fwd / 1e9, "gflops_bwd": flops / bwd / 1e9,
        "gflops_fwd_bwd": 2 * flops / (fwd + bwd) / 1e9,
    }
    return out


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _timings(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def fp32_ceiling(quick: bool) -> tuple[float, float]:
    """(median, best) GFLOP/s of torch's fp32 matmul of CEILING_SHAPE on the current threads."""
    m, k, n = CEILING_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    gflops = [2 * m * k * n / s / 1e9 for s in _timings(lambda: a @ b, 3, 5 if quick else 15)]
    return statistics.median(gflops), max(gflops)


def measure_machine(quick: bool) -> dict:
    """Reference numbers taken on the benchmark's own threads: the fp32 matmul ceiling, bf16 matmul
    in the two layouts an nn.Linear meets (forward x @ W.T, backward dy @ W), and copy bandwidth."""
    _, k, n = CEILING_SHAPE
    median, best = fp32_ceiling(quick)
    out = {"loadavg_start": list(os.getloadavg()), "ceiling_shape_mkn": list(CEILING_SHAPE),
           "ceiling_gflops_torch_fp32_start": median, "ceiling_gflops_torch_fp32_best": best}
    if not quick:  # dy @ W can be very slow in bf16 (see the baseline notes above): keep it small
        x, w = torch.randn(128, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
        s = statistics.median(_timings(lambda: x @ w.T, 1, 5))
        out["gflops_torch_bf16_x_wT_128x2048x1408"] = 2 * 128 * k * n / s / 1e9
        dy = torch.randn(32, n, dtype=torch.bfloat16)
        s = statistics.median(_timings(lambda: dy @ w, 1, 1))
        out["gflops_torch_bf16_dy_w_32x1408x2048"] = 2 * 32 * k * n / s / 1e9
    src = torch.empty((16 if quick else 64) * 2**20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    s = statistics.median(_timings(lambda: dst.copy_(src), 1, 5))
    out["copy_gb_per_s"] = 2 * src.numel() * 4 / s / 1e9  # bytes read + written
    out["peak_gops"] = runtime.measure_peaks(0.1 if quick else 0.3)
    return out


# ---------------------------------------------------------------- the two sides


def resolve_baseline_dtype(cfg: KernelBenchConfig) -> torch.dtype:
    if cfg.baseline_dtype == "auto":
        flags = set(runtime.engine_info()["cpu_flags"]) if _native.available() else set()
        return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32
    return torch.bfloat16 if cfg.baseline_dtype == "bf16" else torch.float32


def baseline_inputs(inp: dict, dtype: torch.dtype) -> dict:
    """The same inputs in the baseline's dtype (x and dy are bf16 values: exact in fp32)."""
    return {**inp, "x": inp["x"].to(dtype), "dy": inp["dy"].to(dtype)}


def build_baseline(cfg: KernelBenchConfig, gate_up: torch.Tensor, down: torch.Tensor, dtype=torch.bfloat16):
    """transformers' DeepseekV2Experts holding our bf16 weights as frozen parameters (no copy; in fp32, an
    exact fp32 copy of the same values)."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

    config = DeepseekV2Config(hidden_size=cfg.hidden, moe_intermediate_size=cfg.intermediate,
                              n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, hidden_act="silu")
    config._experts_implementation = "eager"
    module = DeepseekV2Experts(config)
    module.gate_up_proj = torch.nn.Parameter(gate_up.to(dtype), requires_grad=False)
    module.down_proj = torch.nn.Parameter(down.to(dtype), requires_grad=False)
    return module


def make_lora(cfg: KernelBenchConfig) -> dict:
    """PEFT-layout expert LoRA tensors (fp32, std WEIGHT_STD; B non-zero so nothing is skipped)."""
    g = torch.Generator().manual_seed(cfg.seed + 7)
    e, h, inter, r = cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.lora_rank
    shapes = {"lora_gu_A": (r * e, 2 * inter), "lora_gu_B": (h, r * e), "lora_A": (r * e, h), "lora_B": (inter, r * e)}
    return {name: torch.randn(shape, generator=g) * WEIGHT_STD for name, shape in shapes.items()}


class TorchLoraExperts(torch.nn.Module):
    """The baseline with expert LoRA: transformers' eager experts loop (frozen bf16 weights) with an
    unmerged per-expert LoRA in torch, out += s * ((v @ B_e) @ A_e) in fp32 (the trainable tensors'
    dtype under LLaMA-Factory), for both products; ΔW is never formed."""

    def __init__(self, base, lora: dict, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        e = base.num_experts
        from kt_sft.engine.expert_lora import kernel_layout

        gu_a, gu_b = kernel_layout(lora["lora_gu_A"], lora["lora_gu_B"], e)
        d_a, d_b = kernel_layout(lora["lora_A"], lora["lora_B"], e)
        # per expert: B_e^T (K, r) and A_e (r, N) as trainable leaves
        self.gu_b = torch.nn.Parameter(gu_b.transpose(1, 2).contiguous())
        self.gu_a = torch.nn.Parameter(gu_a.contiguous())
        self.d_b = torch.nn.Parameter(d_b.transpose(1, 2).contiguous())
        self.d_a = torch.nn.Parameter(d_a.contiguous())

    def forward(self, x, top_k_index, top_k_weights):
        base, s = self.base, self.scaling
        y = torch.zeros(x.shape, dtype=torch.float32)
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            xe = x[tok]
            gu = (xe @ base.gate_up_proj[e].T).float() + s * ((xe.float() @ self.gu_b[e]) @ self.gu_a[e])
            g, u = gu.chunk(2, dim=-1)
            h = torch.nn.functional.silu(g) * u
            out = (h.to(x.dtype) @ base.down_proj[e].T).float() + s * ((h @ self.d_b[e]) @ self.d_a[e])
            y = y.index_add(0, tok, out * top_k_weights[tok, slot, None])
        return y.to(x.dtype)


def grouped_mm_backend(module, inp: dict) -> str:
    """Which grouped GEMM transformers' grouped_mm implementation dispatches to here."""
    from transformers.integrations import moe

    offs = torch.tensor([inp["x"].shape[0]] * module.num_experts, dtype=torch.int32)
    w = module.gate_up_proj.transpose(-2, -1)
    if moe._can_use_grouped_mm(inp["x"], w, offs):
        return "torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "torch._grouped_mm"
    return "transformers grouped_mm_fallback (a loop of torch.mm)"


def _case_entry(cfg, t, samples) -> tuple[dict, dict | None]:
    """time_interleaved's result for one case -> (report entry, samples or None)."""
    if isinstance(samples, NotImplementedError):
        return {"status": "unsupported", "detail": str(samples)}, None
    if isinstance(samples, BaseException):
        return {"status": f"error: {type(samples).__name__}: {samples}"}, None
    return {"status": "ok", **summarize(cfg, t, samples)}, samples


def _ratios(ours: dict, base: dict | None) -> dict | None:
    if base is None or ours["status"] != "ok":
        return None
    return {"fwd": base["fwd_ms"] / ours["fwd_ms"], "bwd": base["bwd_ms"] / ours["bwd_ms"],
            "fwd_bwd": (base["fwd_ms"] + base["bwd_ms"]) / (ours["fwd_ms"] + ours["bwd_ms"])}


# ---------------------------------------------------------------- driver


def run(args: argparse.Namespace | KernelBenchConfig) -> dict:
    """Runs the benchmark, prints a table, writes the JSON file and returns its contents."""
    cfg = args if isinstance(args, KernelBenchConfig) else config_from_args(args)
    if not _native.available():
        raise RuntimeError(f"kt_sft's native engine is not loaded: {_native._IMPORT_ERROR}")
    started = time.perf_counter()
    stamp = _dt.datetime.now().astimezone()
    out_path = Path(cfg.out or f"bench_results/kernels-{stamp:%Y%m%d-%H%M%S}.json")

    prev_torch_threads, prev_path = torch.get_num_threads(), runtime.kernel_path()
    torch.set_num_threads(cfg.threads)
    runtime.set_num_threads(cfg.threads)
    try:
        report = _run(cfg, stamp)
    finally:
        torch.set_num_threads(prev_torch_threads)
        runtime.set_kernel_path(prev_path)
    report["wall_s"] = time.perf_counter() - started
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB

    print(format_table(report))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_path}")
    report["out"] = str(out_path)
    return report


def _run(cfg: KernelBenchConfig, stamp: _dt.datetime) -> dict:
    paths = cfg.kernel_paths()
    workloads = cfg.workloads()
    base_workloads = cfg.baseline_workloads()
    with_lora = 2 if cfg.lora_rank else 1
    n_cases = (len(base_workloads) * (len(BASELINE_IMPLS) + with_lora - 1)
               + with_lora * len(workloads) * len(cfg.formats) * len(cfg.modes) * len(paths))
    report = {
        "schema": SCHEMA,
        "timestamp": stamp.isoformat(timespec="seconds"),
        "config": {**asdict(cfg), "kernel_paths": paths, "act_dtype": "bfloat16", "routing_weights_dtype": "float32",
                   "weight_dtype_before_packing": "bfloat16", "weight_std": WEIGHT_STD, "zipf_s": ZIPF_S,
                   "model_shape": "DeepSeek-V2-Lite MoE layer" if not cfg.quick else "quick smoke shape"},
        "definitions": DEFINITIONS,
        "versions": environment.versions(),
        "git": environment.git_state(),
        "engine": environment.engine_report(),
        "machine": environment.machine(),
        "routing_load": {},
        "baseline": [],
        "baseline_best": [],
        "packing": [],
        "results": [],
    }
    bar = tqdm(total=n_cases, desc="machine probe", unit="case", file=sys.stderr, dynamic_ncols=True)
    report["machine"].update(measure_machine(cfg.quick))
    inputs = {}
    for t, routing in workloads:
        inputs[(t, routing)] = make_inputs(cfg, t, routing)
        report["routing_load"][f"{routing}/T={t}"] = inputs[(t, routing)].pop("load")

    bar.set_description("weights")
    gate_up, down = make_weights(cfg)
    base_dtype = resolve_baseline_dtype(cfg)
    report["config"]["baseline_dtype_resolved"] = str(base_dtype).removeprefix("torch.")
    report["config"]["timing"] = "interleaved: per workload, every case once per round (see DEFINITIONS)"
    module = lora_module = None
    if base_workloads:
        module = build_baseline(cfg, gate_up, down, base_dtype)
        report["config"]["grouped_mm_backend"] = grouped_mm_backend(module, inputs[workloads[0]])
        if cfg.lora_rank:
            lora_module = TorchLoraExperts(module, make_lora(cfg), 2.0)  # alpha = 2r

    packs = {}  # (format, LoRA rank) -> experts; every format at once, so a workload's cases interleave
    for fmt in cfg.formats:
        bar.set_description(f"pack {fmt}")
        t0 = time.perf_counter()
        try:
            experts = CPUExperts.from_tensors(gate_up, down, format=fmt)
        except Exception as exc:  # noqa: BLE001
            report["packing"].append({"format": fmt, "status": f"error: {type(exc).__name__}: {exc}"})
            continue
        report["packing"].append({"format": fmt, "status": "ok", "pack_s": time.perf_counter() - t0,
                                  "packed_mib": experts.packed.nbytes / 2**20})
        packs[(fmt, 0)] = experts
        if cfg.lora_rank:
            packs[(fmt, cfg.lora_rank)] = _with_lora(experts, cfg)
    packed_ok = {fmt for fmt, _ in packs}

    def set_impl(impl):
        return lambda: setattr(module.config, "_experts_implementation", impl)

    def set_kt(experts, mode, path):
        def prepare():
            experts.compute_mode = ComputeMode.parse(mode)
            runtime.set_kernel_path(path)
        return prepare

    best = {}
    for t, routing in workloads:
        inp = inputs[(t, routing)]
        cases, labels = [], []  # labels: ("base", impl) | ("lora_base",) | ("kt", fmt, rank, mode, path)
        if (t, routing) in base_workloads:
            binp = baseline_inputs(inp, base_dtype)
            for impl in BASELINE_IMPLS:
                cases.append((set_impl(impl), module, binp))
                labels.append(("base", impl))
            if lora_module is not None:
                cases.append((set_impl("eager"), lora_module, binp))
                labels.append(("lora_base",))
        for fmt in cfg.formats:
            for rank in (0, cfg.lora_rank) if cfg.lora_rank else (0,):
                for mode in cfg.modes:
                    for path in paths:
                        entry = {"impl": "kt_sft", "format": fmt, "mode": mode, "kernel_path": path, "lora_rank": rank,
                                 "tokens": t, "routing": routing}
                        if fmt not in packed_ok:
                            report["results"].append({**entry, "status": "error: packing failed"})
                        elif (fmt, mode) in INVALID_PAIRS:
                            report["results"].append({**entry, "status": "unsupported",
                                                      "detail": INVALID_PAIRS[(fmt, mode)], "ratio_vs_baseline": None})
                        else:
                            experts = packs[(fmt, rank)]
                            cases.append((set_kt(experts, mode, path), experts, inp))
                            labels.append(("kt", fmt, rank, mode, path))
                            continue
                        bar.update()
        bar.set_description(f"T={t} {routing}: {len(cases)} cases interleaved")
        samples = time_interleaved(cases, cfg.warmup, cfg.repeats)
        eager_out = None
        for label, smp in zip(labels, samples):
            if label[0] == "kt":
                continue
            entry, got = _case_entry(cfg, t, smp)
            if label[0] == "base":
                report["baseline"].append({"impl": "transformers", "experts_implementation": label[1], "tokens": t,
                                           "routing": routing, **entry})
                if label[1] == "eager" and got is not None:
                    eager_out = {k: got[k] for k in ("y", "dx", "dw")}
            else:
                report["baseline"].append({"impl": "transformers", "experts_implementation": "eager+torch_lora",
                                           "lora_rank": cfg.lora_rank, "tokens": t, "routing": routing, **entry})
                if entry["status"] == "ok":
                    best[(t, routing, "lora")] = entry
            bar.update()
        ok = [b for b in report["baseline"] if b["tokens"] == t and b["routing"] == routing and b["status"] == "ok"
              and b["experts_implementation"] in BASELINE_IMPLS]
        if ok:
            fastest = min(ok, key=lambda b: b["fwd_ms"] + b["bwd_ms"])
            best[(t, routing)] = fastest
            report["baseline_best"].append({k: fastest[k] for k in (
                "experts_implementation", "tokens", "routing", "fwd_ms", "bwd_ms", "tokens_per_s", "gflops_fwd_bwd")})
        for label, smp in zip(labels, samples):
            if label[0] != "kt":
                continue
            _, fmt, rank, mode, path = label
            entry, got = _case_entry(cfg, t, smp)
            entry["ratio_vs_baseline"] = _ratios(entry, best.get((t, routing, "lora") if rank else (t, routing)))
            if got is not None and eager_out is not None and not rank:
                entry["rel_err_vs_eager"] = {k: _rel_err(got[k], eager_out[k]) for k in ("y", "dx", "dw")}
            report["results"].append({"impl": "kt_sft", "format": fmt, "mode": mode, "kernel_path": path,
                                      "lora_rank": rank, "tokens": t, "routing": routing, **entry})
            bar.update()
    packs = module = lora_module = None  # free the packs and the baseline module before the ceiling run
    bar.set_description("fp32 ceiling again")
    _apply_ceiling(report, *fp32_ceiling(cfg.quick))
    bar.set_description("done")
    bar.close()
    return report


def _with_lora(experts: CPUExperts, cfg: KernelBenchConfig):
    """The same packed weights as a LoraCPUExperts holding make_lora's adapter (alpha = 2r)."""
    from kt_sft.integration.peft_lora import LoraCPUExperts

    out = LoraCPUExperts(experts.packed)
    out.update_layer("default", cfg.lora_rank, 2 * cfg.lora_rank, 0.0, False, False)
    with torch.no_grad():
        for name, value in make_lora(cfg).items():
            getattr(out, name)["default"].weight.copy_(value)
    return out


def _apply_ceiling(report: dict, end_median: float, end_best: float) -> None:
    """Reference = the higher of the start and end medians; then every ok entry gets its fraction."""
    m = report["machine"]
    m["loadavg_end"] = list(os.getloadavg())
    m["ceiling_gflops_torch_fp32_end"] = end_median
    m["ceiling_gflops_torch_fp32_best"] = max(m["ceiling_gflops_torch_fp32_best"], end_best)
    start = m["ceiling_gflops_torch_fp32_start"]
    m["ceiling_gflops_torch_fp32"] = max(start, end_median)
    m["ceiling_unstable"] = min(start, end_median) < 0.8 * max(start, end_median)
    m["busy_at_start"] = m["loadavg_start"][0] >= 1.0
    # the peaks again, the higher reading kept per instruction (a busy moment only ever lowers one)
    m["peak_gops_start"] = m.get("peak_gops") or {}
    m["peak_gops_end"] = runtime.measure_peaks(0.1 if report["config"].get("quick") else 0.3)
    m["peak_gops"] = {k: max((v for v in (m["peak_gops_start"].get(k), m["peak_gops_end"][k]) if v), default=None)
                      for k in m["peak_gops_end"]}
    for entry in report["baseline"] + report["baseline_best"] + report["results"]:
        if "gflops_fwd_bwd" in entry:
            entry["frac_of_ceiling"] = entry["gflops_fwd_bwd"] / m["ceiling_gflops_torch_fp32"]
    _apply_peaks(report)


def _apply_peaks(report: dict) -> None:
    """Every ok kt_sft entry gets the instruction that bounds its (path, mode) and its share of that
    instruction's measured peak; baseline entries get their share of the machine's fastest bf16-capable
    instruction (torch's path is not ours to name)."""
    peaks = report["machine"].get("peak_gops") or {}
    bf16_capable = [v for k, v in peaks.items() if k in ("fma_zmm", "fma_ymm", "dpbf16_zmm", "amx_bf16") and v]
    best_bf16 = max(bf16_capable) if bf16_capable else None
    for entry in report["results"]:
        instr = runtime.peak_instruction(entry["kernel_path"], entry["mode"])
        entry["peak_instruction"] = instr
        if "gflops_fwd_bwd" in entry and instr and peaks.get(instr):
            entry["frac_of_peak"] = entry["gflops_fwd_bwd"] / peaks[instr]
    for entry in report["baseline"] + report["baseline_best"]:
        if "gflops_fwd_bwd" in entry and best_bf16:
            entry["peak_instruction"] = max((k for k in peaks if peaks[k] == best_bf16))
            entry["frac_of_peak"] = entry["gflops_fwd_bwd"] / best_bf16


# ---------------------------------------------------------------- table


def _by_case(results: list[dict]) -> dict:
    """ok kt_sft rows grouped by (format, mode, T, routing, LoRA rank): one entry per kernel path."""
    out: dict = {}
    for r in results:
        if r.get("status") == "ok":
            out.setdefault((r["format"], r["mode"], r["tokens"], r["routing"], r.get("lora_rank", 0)), []).append(r)
    return out


def format_table(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    head = [
        (f"kernel benchmark  E={cfg['num_experts']} k={cfg['top_k']} H={cfg['hidden']} I={cfg['intermediate']}  "
         f"threads={cfg['threads']}  repeats={cfg['repeats']} (median)  warmup={cfg['warmup']}"),
        f"cpu: {m['cpu_model']}  flags: {' '.join(m.get('cpu_flags') or [])}",
        (f"ceiling (torch fp32 matmul {'x'.join(map(str, m['ceiling_shape_mkn']))}): "
         f"{m['ceiling_gflops_torch_fp32']:.1f} GFLOP/s (medians: {m['ceiling_gflops_torch_fp32_start']:.1f} start, "
         f"{m['ceiling_gflops_torch_fp32_end']:.1f} end; best {m['ceiling_gflops_torch_fp32_best']:.1f})  "
         f"load avg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"),
        "FLOPs: fwd = bwd = T*k*6*H*I; 'vs base' = faster transformers time / kt_sft time (>1: kt_sft faster)",
        "peaks (G ops/s on these threads): " + ", ".join(
            f"{k} {v:.0f}" for k, v in (m.get("peak_gops") or {}).items() if v) +
        "; %peak = of the instruction bounding the row's path and mode (hf rows: of the fastest bf16 one)",
    ]
    cols = ("impl", "fmt", "mode", "path", "T", "routing", "fwd ms", "bwd ms", "tok/s", "GFLOP/s", "%ceil",
            "%peak", "vs base", "status")
    rows = []

    def num(v, spec):
        return "-" if v is None else format(v, spec)

    def row(impl, fmt, mode, path, r):
        ok = r["status"] == "ok"
        ratio = (r.get("ratio_vs_baseline") or {}).get("fwd_bwd")
        frac, peak = r.get("frac_of_ceiling"), r.get("frac_of_peak")
        rows.append((impl, fmt, mode, path, str(r["tokens"]), r["routing"],
                     num(r.get("fwd_ms") if ok else None, ".1f"), num(r.get("bwd_ms") if ok else None, ".1f"),
                     num(r.get("tokens_per_s") if ok else None, ".1f"),
                     num(r.get("gflops_fwd_bwd") if ok else None, ".2f"),
                     num(100 * frac if ok and frac is not None else None, ".1f"),
                     num(100 * peak if ok and peak is not None else None, ".1f"),
                     num(ratio, ".2f"), r["status"][:60]))

    order = {(t, rt): i for i, (t, rt) in enumerate(
        dict.fromkeys((r["tokens"], r["routing"]) for r in report["baseline"] + report["results"]))}
    best = {(b["tokens"], b["routing"]): b["experts_implementation"] for b in report["baseline_best"]}
    for r in sorted(report["baseline"], key=lambda r: order[(r["tokens"], r["routing"])]):
        mark = "*" if best.get((r["tokens"], r["routing"])) == r["experts_implementation"] else ""
        row(f"hf {r['experts_implementation']}{mark}", cfg.get("baseline_dtype_resolved", "bfloat16")
            .replace("bfloat16", "bf16").replace("float32", "fp32"), "-", "torch", r)
    for r in sorted(report["results"], key=lambda r: (r.get("lora_rank", 0), order[(r["tokens"], r["routing"])])):
        row(f"kt_sft{'+lora' + str(r['lora_rank']) if r.get('lora_rank') else ''}", r["format"], r["mode"],
            r["kernel_path"], r)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [" ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += [" ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    foot = [f"hf = transformers DeepseekV2Experts with frozen weights in {cfg.get('baseline_dtype_resolved', 'bfloat16')} "
            "(the 'fmt' column; kt_sft rows: their pack format, bf16 activations); * = faster of eager/grouped_mm; "
            "kt_sft+loraR rows compare with 'hf eager+torch_lora' (per-expert unmerged LoRA in torch)"]
    default = (report.get("engine") or {}).get("kernel_path")
    for (fmt, mode, t, routing, rank), runs in _by_case(report["results"]).items():
        fastest = min(runs, key=lambda r: r["fwd_ms"] + r["bwd_ms"])
        if len(runs) > 1 and default in {r["kernel_path"] for r in runs} and fastest["kernel_path"] != default:
            foot.append(f"NOTE: {fmt}/{mode} T={t} {routing}{f' lora{rank}' if rank else ''}: the default path "
                        f"{default!r} was not the fastest here ({fastest['kernel_path']!r})")
    if m["ceiling_unstable"]:
        foot.append("WARNING: the fp32 ceiling moved by more than 20% during the run; the machine was busy, "
                    "timings are noisy")
    if m["busy_at_start"]:
        foot.append(f"WARNING: load average {m['loadavg_start'][0]:.2f} at the start: other jobs were running, "
                    "timings (the baseline's most) are noisy")
    return "\n".join(head + [""] + lines + [""] + foot)
