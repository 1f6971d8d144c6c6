"""One run of `kt-sft bench compare`: LLaMA-Factory's own training entry point, timed from inside.

    python -m kt_sft.bench.compare_worker SPEC.json            (kt_sft and plain runs, one process)
    torchrun --standalone --nproc_per_node N -m kt_sft.bench.compare_worker SPEC.json   (DeepSpeed runs, N >= 1;
                                                               every mode with --nproc N > 1)

SPEC (written by kt_sft.bench.compare) holds the LLaMA-Factory arguments and where to write the raw
result. This calls `llamafactory.train.tuner.run_exp(args, callbacks=[StepTimer])`, exactly what
`llamafactory-cli train` runs, with one callback added, and records per optimizer step:

* time: on_step_end to on_step_end (step 1 from on_train_begin): the whole loop, data loading and
  logging included;
* non-padding tokens (`include_num_input_tokens_seen: non_padding`; the Trainer sums them over the
  ranks), the loss (`logging_steps: 1`), major page faults (getrusage), resident memory
  (/proc/self/status) and the proportional set size (smaps_rollup: shared pages split among ranks);
* a split of the step into routed experts / shared experts + dense MLP / attention / rest, from
  perf_counter hooks on those modules (`_ModuleClock`). Start-up (process launch to train begin) and
  the end (train end to exit: adapter/checkpoint save) are timed apart.

In-process changes, each only where the spec asks for it and recorded in the result:
* `zero3_leaf_fix`: LLaMA-Factory 0.9.5 marks `DeepseekV2MoE` as the ZeRO-3 leaf module, but
  transformers 5.6 names the class `DeepseekV2Moe` (the run would fail with "No modules of type");
  the name is corrected, nothing else.
* `plain_expert_lora`: LLaMA-Factory does not expose PEFT's `target_parameters`; for the plain
  expert-LoRA baseline the LoraConfig it builds gets `target_parameters=[...]` added.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from kt_sft.bench.compare import result_path
from kt_sft.integration.memory_report import memory_status, pss_kib  # VmHWM, VmRSS, RssAnon, RssFile (KiB)

# Module classes of the split; matched on the module's qualified name (PEFT-wrapped names included).
EXPERTS, SHARED_MLP, ATTENTION = "routed_experts", "shared_and_dense_mlp", "attention"
CATEGORIES = (EXPERTS, SHARED_MLP, ATTENTION)
_PAGE_FAULT_S = 0.5e-3  # assumed cost of one major fault when the kernel does not account I/O delay


def _category(name: str, module: torch.nn.Module) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "experts" and parent in ("mlp", "block_sparse_moe"):
        return EXPERTS
    if leaf in ("shared_experts", "shared_expert"):
        return SHARED_MLP
    if leaf == "mlp" and not hasattr(module, "experts") and not hasattr(module, "gate"):
        return SHARED_MLP  # a dense layer's MLP (DeepSeek's first_k_dense_replace layers)
    if leaf == "self_attn":
        return ATTENTION
    return None


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward calls `fn()` when the gradient passes: marks where a module's backward
    starts (on its output) and ends (on its input)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


class _ModuleClock:
    """Per-category time in forward (every call, checkpoint recomputation included) and backward.

    Backward of one call = from the gradient reaching its output to the gradient leaving its input,
    minus any hooked forward time inside that window (so nothing is counted twice). On the CPU autograd
    runs its graph in one thread, in order, so the window holds that module's backward only. Overhead:
    two perf_counter calls and two identity autograd nodes per hooked call (~16 per layer and step)."""

    def __init__(self):
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self.forward_clock = 0.0  # all hooked forward time so far, to subtract from backward windows
        self._starts: dict[int, float] = {}
        self._bwd: dict[int, tuple[float, float]] = {}
        self._handles = []
        self._active: list[float] = []

    def install(self, model: torch.nn.Module) -> dict[str, int]:
        found = dict.fromkeys(CATEGORIES, 0)
        for name, module in model.named_modules():
            cat = _category(name, module)
            if cat is None:
                continue
            found[cat] += 1
            self._handles.append(module.register_forward_pre_hook(self._pre(cat), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(cat), with_kwargs=True))
        return found

    def _pre(self, cat):
        def hook(module, args, kwargs):
            call = id(args) ^ int(time.perf_counter_ns())
            self._active.append(time.perf_counter())
            module._kt_clock_call = call
            args = list(args)
            key, x = (0, args[0]) if args else ("hidden_states", kwargs.get("hidden_states"))
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                x = _BackwardMark.apply(x, lambda: self._bwd_end(cat, call))
                if key == 0:
                    args[0] = x
                else:
                    kwargs[key] = x
            return tuple(args), kwargs
        return hook

    def _post(self, cat):
        def hook(module, args, kwargs, output):
            dt = time.perf_counter() - self._active.pop()
            if not self._active:  # nested hooked modules are not counted twice in the forward clock
                self.forward_clock += dt
            self.totals[cat] += dt
            call = module._kt_clock_call
            y = output[0] if isinstance(output, tuple) else output
            if isinstance(y, torch.Tensor) and y.requires_grad and torch.is_grad_enabled():
                y = _BackwardMark.apply(y, lambda: self._bwd_start(call))
                return (y, *output[1:]) if isinstance(output, tuple) else y
            return output
        return hook

    def _bwd_start(self, call):
        self._bwd[call] = (time.perf_counter(), self.forward_clock)

    def _bwd_end(self, cat, call):
        start = self._bwd.pop(call, None)
        if start is not None:
            self.totals[cat] += (time.perf_counter() - start[0]) - (self.forward_clock - start[1])

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, dict.fromkeys(CATEGORIES, 0.0)
        self._bwd.clear()
        return out


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far: cpu_s / time_s of a step is how many cores it
    got, which on a shared machine shows when a neighbour took some."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _blkio_delay_s() -> float | None:
    """Time this process waited on block I/O (major faults included), from /proc/self/stat field 42;
    None when the kernel does not account it (kernel.task_delayacct=0)."""
    try:
        enabled = Path("/proc/sys/kernel/task_delayacct").read_text().strip() == "1"
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[39]) / os.sysconf("SC_CLK_TCK") if enabled else None
    except (OSError, ValueError, IndexError):
        return None


def _make_callback(clock: _ModuleClock, record: dict, flush=lambda: None):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            record["train_begin"] = time.time()
            record["hooked_modules"] = clock.install(model) if model is not None else {}
            if model is not None:  # ZeRO-3 partitions parameters: ds_numel is the full size
                record["trainable_params"] = sum(getattr(p, "ds_numel", p.numel())
                                                 for p in model.parameters() if p.requires_grad)
            self.last = time.perf_counter()
            self.tokens = state.num_input_tokens_seen
            self.majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            self.cpu = _cpu_s()
            self.blkio = _blkio_delay_s()
            clock.take()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            cpu = _cpu_s()
            blkio = _blkio_delay_s()
            mem = memory_status()
            record["steps"].append({
                "step": state.global_step,
                "time_s": now - self.last,
                "tokens": state.num_input_tokens_seen - self.tokens,
                "major_faults": majflt - self.majflt,
                "cpu_s": cpu - self.cpu,
                "blkio_delay_s": None if blkio is None or self.blkio is None else blkio - self.blkio,
                "rss_anon_kib": mem.get("RssAnon"),
                "rss_file_kib": mem.get("RssFile"),
                "pss_kib": pss_kib(),
                "split_s": clock.take(),
            })
            self.tokens, self.majflt, self.blkio, self.cpu = state.num_input_tokens_seen, majflt, blkio, cpu
            flush()  # a run killed later (OOM, timeout) still leaves its steps
            self.last = time.perf_counter()  # the callback's own work is not charged to the next step

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                record["losses"][str(state.global_step)] = float(logs["loss"])

        def on_train_end(self, args, state, control, **kw):
            record["train_end"] = time.time()

    return StepTimer()


def _patch_zero3_leaf_names() -> None:
    from llamafactory.model.model_utils import moe

    upstream = moe._set_z3_leaf_modules
    renamed = {"DeepseekV2MoE": "DeepseekV2Moe"}

    def set_leaf_modules(model, leaf_modules):
        # both spellings: plain transformers has DeepseekV2Moe, a kt_sft model DeepseekV2MoE (loading.py)
        return upstream(model, [n for m in leaf_modules for n in ((m, renamed[m]) if m in renamed else (m,))])

    moe._set_z3_leaf_modules = set_leaf_modules


def _patch_plain_expert_lora(target_parameters: list[str]) -> None:
    from llamafactory.model import adapter

    upstream = adapter.LoraConfig

    def lora_config(*args, **kwargs):
        kwargs.setdefault("target_parameters", list(target_parameters))
        return upstream(*args, **kwargs)

    adapter.LoraConfig = lora_config


def _writer(spec: dict, record: dict):
    def flush():
        record["rank"] = int(os.environ.get("RANK", "0"))
        result_path(spec, record["rank"]).write_text(json.dumps(record, indent=1) + "\n")
    return flush


def run(spec: dict) -> dict:
    record = {"status": "running", "steps": [], "losses": {}, "pid": os.getpid(), "patches": []}
    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    clock = _ModuleClock()
    if spec.get("zero3_leaf_fix"):
        _patch_zero3_leaf_names()
        record["patches"].append("zero3_leaf_fix")
    if spec.get("plain_expert_lora"):
        _patch_plain_expert_lora(spec["plain_expert_lora"])
        record["patches"].append("plain_expert_lora")
    from llamafactory.train.tuner import run_exp

    try:
        run_exp(dict(spec["args"]), callbacks=[_make_callback(clock, record, _writer(spec, record))])
        record["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 (recorded, then the process exits non-zero)
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
    record["end"] = time.time()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    record["memory"] = {**memory_status(), "ru_maxrss_kib": ru.ru_maxrss, "major_faults_total": ru.ru_majflt}
    if torch.cuda.is_available():
        record["memory"]["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["memory"]["gpu_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    try:
        from kt_sft.engine import recompute_cache

        record["checkpoint_cache"] = recompute_cache.stats()
    except ImportError:
        pass
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    record = run(spec)
    _writer(spec, record)()
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
