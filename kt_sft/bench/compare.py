"""`kt-sft bench compare`: one LLaMA-Factory LoRA SFT job, run several ways, one at a time, side by side.

Modes (each a separate process running LLaMA-Factory's own `run_exp`, see kt_sft/compare_worker.py):

    kt_int8, kt_bf16    kt_sft: the model converted with `kt-sft convert --format int8|bf16`
                        (kt_int4 too, when named in --modes)
    plain_default       LLaMA-Factory + transformers, upstream experts, default implementation (grouped_mm)
    plain_eager         the same with `"experts_implementation": "eager"` in config.json
    zero2_offload       + DeepSpeed ZeRO-2, optimizer offloaded to the CPU  (yaml_configs/deepspeed/)
    zero3_offload       + DeepSpeed ZeRO-3, parameters and optimizer offloaded to the CPU

Identical for all: data and its order (`disable_shuffling`), cutoff, batch, steps, seed, dtype, LoRA
(`lora_target: all`, rank, alpha), gradient checkpointing (LLaMA-Factory's default: on, reentrant),
threads (torch, OpenMP and kt_sft's kernels) and one process. `--expert-lora` is the second
comparison: LoRA on the routed experts too (kt_sft: `experts` added to lora_target, with `all` spelled
out as the module names, since LLaMA-Factory takes `all` only alone; plain: the same names plus PEFT
`target_parameters` on the fused expert weights, see compare_worker).

Definitions (also in every summary JSON):
* tokens/s = non-padding tokens of the timed steps / (median step time x timed steps); the timed steps
  are those after `warmup_steps`; a step is on_step_end to on_step_end (data loading included).
* start-up = process launch to train begin; end = train end to exit (the adapter save).
* split = per-step time in routed experts / shared experts + dense MLP / attention (forward, checkpoint
  recomputation and backward) and the rest (embeddings, norms, router, lm_head + loss, optimizer,
  data), the median over the timed steps.
* fits = finished, steady (no timed step > 1.5 x the time its token count predicts, from a least-squares
  line time = a + b * tokens through the timed steps) and < 1% of the timed steps' time in major page
  faults (the kernel's block-I/O delay when it accounts it, else faults x 0.5 ms).

`--memory-cap-gib` runs every mode in its own memory cgroup (v1 or v2, page cache included) so a run
that does not fit is OOM-killed and recorded instead of taking the machine down; without cgroups,
non-kt_sft modes get an address-space rlimit (it would break kt_sft's memory-mapped pack). Every run
also has a timeout. One JSON per run plus `summary.json` / `summary.md`; plots: kt_sft.bench.compare_plots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from kt_sft import environment

SCHEMA_RUN = "kt_sft.bench.compare.run/1"
SCHEMA_SUMMARY = "kt_sft.bench.compare.summary/1"
ROOT = Path(__file__).resolve().parents[2]  # the repository: kt_sft/bench/compare.py
DS_CONFIGS = {"zero2_offload": ROOT / "yaml_configs" / "deepspeed" / "ds_z2_offload_config.json",
              "zero3_offload": ROOT / "yaml_configs" / "deepspeed" / "ds_z3_offload_config.json"}
MODES = ("kt_int8", "kt_bf16", "plain_default", "plain_eager", "zero2_offload", "zero3_offload")
KNOWN_MODES = (*MODES, "kt_int4")  # kt_int4: asked for by name (the capacity runs), not in the default set
PLAIN, ZERO = ("plain_default", "plain_eager"), ("zero2_offload", "zero3_offload")
EXPERT_LORA_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "gate"  # the MoE router's module name (DeepSeek, Qwen3-MoE, Mixtral)
# (mode, baseline group, minimum ratio): the issue's targets for the mini DeepSeek-V2-Lite run
TARGETS = (("kt_int8", "plain", 1.4), ("kt_int8", "zero", 1.5), ("kt_bf16", "plain", 1.2))
STEADY_MAX = 1.5
FAULT_FRAC_MAX = 0.01
_VERSIONED = ("llamafactory", "peft", "accelerate", "deepspeed", "datasets", "trl")

DEFINITIONS = {
    "tokens_per_s": "non-padding tokens of the timed steps / (median step time x number of timed steps)",
    "timed_steps": "steps after warmup_steps",
    "step_time": "on_step_end to on_step_end (step 1 from on_train_begin): data loading, forward, backward, "
                 "optimizer, logging",
    "startup_s": "process launch to on_train_begin (imports, model load, data, DeepSpeed init)",
    "end_s": "on_train_end to the worker's exit (adapter / checkpoint save)",
    "split": "per-step seconds in hooked modules: routed_experts (mlp.experts), shared_and_dense_mlp "
             "(shared experts, dense MLPs), attention (self_attn); forward (incl. checkpoint recomputation) "
             "+ backward; rest = step - the three; median over timed steps",
    "ratio_vs_plain": "tokens_per_s / tokens_per_s of the faster of plain_default and plain_eager (a run counts "
                      "when it finished, or when it was killed after all its steps, e.g. while saving)",
    "ratio_vs_zero": "tokens_per_s / tokens_per_s of the faster of zero2_offload and zero3_offload",
    "cores_used": "median over timed steps of the process's CPU seconds / wall seconds: below the thread "
                  "count when a neighbour on a shared machine took CPU (or the run waited on I/O)",
    "node_pss_gib": "sum over the run's processes of each one's largest proportional set size at a step end "
                    "(/proc/self/smaps_rollup): pages shared between ranks (the memory-mapped pack, libraries) "
                    "count once per node",
    "processes": "training processes per run (torchrun ranks); tokens/s counts the tokens of all of them "
                 "(the Trainer sums the ranks' non-padding tokens) over rank 0's step times",
    "fits": f"status ok, steady (no timed step > {STEADY_MAX} x the time its token count predicts from a "
            f"least-squares line through the timed steps), and major-fault time < "
            f"{FAULT_FRAC_MAX:.0%} of the timed steps' time",
}


class CompareConfigError(ValueError):
    """An option is invalid; the CLI turns it into a usage error."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class CompareConfig:
    shape: str = _help("model shape for the generated checkpoint (kt_sft.bench.shaped_models.SHAPES); 'tiny' = the "
                       "fixtures' tiny DeepSeek-V2", default="deepseek_v2_lite_mini")
    hf_model: str | None = _help("an existing Hugging Face model directory to use instead of generating one",
                                 default=None)
    kt_models: dict = _help("format -> an existing kt_sft directory (else converted from the HF model)",
                            default_factory=dict)
    modes: tuple[str, ...] = _help("modes to run, in order", default=MODES)
    steps: int = _help("optimizer steps per run", default=8)
    warmup_steps: int = _help("untimed steps at the start of each run", default=2)
    batch: int = _help("per_device_train_batch_size", default=2)
    cutoff: int = _help("cutoff_len (tokens per sample)", default=512)
    lora_rank: int = _help("lora_rank (lora_target: all)", default=16)
    lora_alpha: int = _help("lora_alpha", default=32)
    learning_rate: float = _help("learning_rate", default=1e-4)
    dtype: str = _help("bf16 / fp32 for every mode, or auto: bf16 with a GPU or a CPU with native bf16 "
                       "(avx512_bf16 / amx_bf16), else fp32 (torch's bf16 matmuls take a slow path on "
                       "AVX2-only CPUs: a bf16 run would time that path, not the methods)", default="auto")
    threads: int = _help("threads for torch, OpenMP and kt_sft's kernels (in all, split among the processes)",
                         default=2)
    nproc: int = _help("training processes per run (torchrun ranks, LLaMA-Factory's data parallelism; each "
                       "gets `batch` samples per step and threads // nproc threads)", default=1)
    seed: int = _help("seed", default=0)
    data: str | None = _help("alpaca-format JSON (default: ../shared/data/alpaca_en_demo.json when present, "
                             "else the fixtures' tiny tasks)", default=None)
    expert_lora: bool = _help("second comparison: LoRA on the routed experts too", default=False)
    memory_cap_gib: float | None = _help("memory cap per run (cgroup; rlimit fallback)", default=None)
    timeout_s: int = _help("seconds before a run is killed and recorded as 'timeout'", default=1800)
    work_dir: str = _help("models and data are built here (reused across invocations)", default="runs/compare")
    out: str | None = _help("result directory (default bench_results/compare/<timestamp>)", default=None)
    plots_dir: str | None = _help("also write the PNG plots here (e.g. docs/images)", default=None)
    quick: bool = _help("tiny smoke configuration (every mode in ~2 min)", default=False)

    def __post_init__(self):
        for name in ("steps", "batch", "cutoff", "lora_rank", "lora_alpha", "threads", "nproc", "timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CompareConfigError(f"`{name}` must be a positive int, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise CompareConfigError(f"`warmup_steps` must be in [0, steps={self.steps}), got {self.warmup_steps}")
        unknown = [m for m in self.modes if m not in KNOWN_MODES]
        if unknown or not self.modes:
            raise CompareConfigError(f"unknown modes {unknown}; known: {', '.join(KNOWN_MODES)}")
        if self.nproc > self.threads:
            raise CompareConfigError(f"`nproc` ({self.nproc}) must not exceed `threads` ({self.threads}): "
                                     "every process needs a thread")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise CompareConfigError(f"`dtype` must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.memory_cap_gib is not None and self.memory_cap_gib <= 0:
            raise CompareConfigError(f"`memory_cap_gib` must be positive, got {self.memory_cap_gib}")
        if self.shape != "tiny":
            from kt_sft.bench.shaped_models import SHAPES

            if self.shape not in SHAPES:
                raise CompareConfigError(f"unknown shape {self.shape!r}; known: tiny, {', '.join(SHAPES)}")


QUICK = {"shape": "tiny", "steps": 4, "warmup_steps": 1, "batch": 2, "cutoff": 64, "lora_rank": 4, "lora_alpha": 8,
         "timeout_s": 600}


# ---------------------------------------------------------------- preparing models and data


def _say(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def prepare_data(cfg: CompareConfig, work: Path) -> dict:
    """dataset_dir / dataset / template for LLaMA-Factory: the alpaca JSON copied next to a
    dataset_info.json, or the fixtures' tiny tasks when no alpaca file is there."""
    from kt_sft import fixtures
    from kt_sft.bench.shaped_models import DEFAULT_DATA

    src = Path(cfg.data) if cfg.data else DEFAULT_DATA / "alpaca_en_demo.json"
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copyfile(src, data_dir / src.name)
        info = {"compare_data": {"file_name": src.name}}
        (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1) + "\n")
        return {"dataset_dir": str(data_dir), "dataset": "compare_data", "source": str(src)}
    if cfg.data:
        raise CompareConfigError(f"--data {cfg.data} does not exist")
    fixtures.write_dataset(data_dir)
    return {"dataset_dir": str(data_dir), "dataset": "kt_tiny_train", "source": "kt_sft.fixtures tiny tasks"}


def prepare_hf_model(cfg: CompareConfig, work: Path, data_source: str) -> Path:
    if cfg.hf_model:
        path = Path(cfg.hf_model).resolve()
        if not (path / "config.json").is_file():
            raise CompareConfigError(f"--hf-model {path} has no config.json")
        return path
    if cfg.shape == "tiny":
        from kt_sft import fixtures

        fixtures.build_fixtures(work / "fixtures", archs=["deepseek_v2"], log=None)
        return work / "fixtures" / "models" / "deepseek_v2"
    from kt_sft.bench import shaped_models as sm

    path = work / "models" / f"{cfg.shape}-hf"
    if not (path / "shaped_model.json").is_file():
        _say(f"writing the random-weight {cfg.shape} checkpoint -> {path}")
        corpus = sm.alpaca_texts(data_source) if Path(data_source).is_file() else None
        sm.write_hf(cfg.shape, path, sm.build_shape_tokenizer(8192, corpus), cfg.seed)
    return path


def config_variant(src: Path, work: Path, changes: dict) -> Path:
    """`src` itself, or a directory that links every file of `src` but whose config.json has `changes`
    (the experts implementation, the dtype LLaMA-Factory loads the weights in: it passes dtype="auto")."""
    config = json.loads((src / "config.json").read_text())
    if all(config.get(k) == v for k, v in changes.items()):
        return src
    out = work / "models" / (src.name + "".join(f"-{v}" for v in changes.values()))
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps({**config, **changes}, indent=2) + "\n")
    return out


def mode_model(cfg: CompareConfig, mode: str, hf: Path, work: Path) -> Path:
    """The model directory one mode loads: kt_sft's conversion or the HF checkpoint, in the run's dtype,
    with `"experts_implementation": "eager"` for plain_eager."""
    model = prepare_kt_model(cfg, hf, work, mode[3:]) if mode.startswith("kt_") else hf
    changes = {}
    if resolve_dtype(cfg.dtype) == "fp32":
        changes.update({"dtype": "float32", "torch_dtype": "float32"})
    if mode == "plain_eager":
        changes["experts_implementation"] = "eager"
    return config_variant(model, work, changes) if changes else model


def prepare_kt_model(cfg: CompareConfig, hf: Path, work: Path, fmt: str) -> Path:
    if fmt in cfg.kt_models:
        return Path(cfg.kt_models[fmt]).resolve()
    meta = hf / "shaped_model.json"
    if meta.is_file() and json.loads(meta.read_text()).get("sparse_experts"):
        raise CompareConfigError(f"{hf} has zero (sparse) experts; pass --kt-model {fmt}=DIR "
                                 "(scripts/make_shaped_model.py --target kt)")
    out = work / "models" / f"{hf.name}-kt-{fmt}"
    report = out / "kt_sft_convert.json"
    if not (report.is_file() and json.loads(report.read_text()).get("model_dir") == str(hf)):
        from kt_sft.integration.convert import convert

        _say(f"converting {hf} -> {out} ({fmt})")
        convert(hf, out, fmt, force=True, progress=False)
    return out


# ---------------------------------------------------------------- one run


def llamafactory_args(cfg: CompareConfig, data: dict, model: Path, output_dir: Path, mode: str) -> dict:
    """The LLaMA-Factory arguments of one mode: the same for all but the model and `deepspeed`."""
    import torch

    gpu = torch.cuda.is_available()
    args = {
        "model_name_or_path": str(model), "trust_remote_code": True,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all",
        "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0,
        "dataset_dir": data["dataset_dir"], "dataset": data["dataset"], "template": "chatml",
        "cutoff_len": cfg.cutoff, "max_samples": cfg.batch * cfg.steps * cfg.nproc, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "disable_shuffling": True,
        "output_dir": str(output_dir), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "include_num_input_tokens_seen": "non_padding",
        "per_device_train_batch_size": cfg.batch, "gradient_accumulation_steps": 1,
        "learning_rate": cfg.learning_rate, "max_steps": cfg.steps, "lr_scheduler_type": "constant",
        "bf16": resolve_dtype(cfg.dtype) == "bf16", "use_cpu": not gpu, "seed": cfg.seed, "data_seed": cfg.seed,
    }
    if mode == "zero3_offload" and cfg.nproc > 1 and not gpu:
        args["use_cpu"] = False  # ZeRO-3 with several CPU processes fails with use_cpu (docs/benchmarks.md)
    if mode in DS_CONFIGS:
        args["deepspeed"] = str(DS_CONFIGS[mode])
    if cfg.expert_lora or cfg.nproc > 1:
        # LLaMA-Factory takes `all` only alone: the same nn.Linear modules by name, plus kt_sft's `experts`
        # (its expert LoRA); the plain modes get PEFT `target_parameters` in the worker instead.
        # Several processes: without the router (`gate`), in every mode. transformers 5.6's DeepSeek-V2
        # router gets no gradient in plain runs, which DDP refuses, and find_unused_parameters clashes
        # with LLaMA-Factory's reentrant gradient checkpointing ("mark a variable ready only once").
        names = [n for n in linear_module_names(model) if cfg.nproc == 1 or n != ROUTER]
        args["lora_target"] = ",".join(names + (["experts"] if mode.startswith("kt_") and cfg.expert_lora else []))
    return args


def linear_module_names(model: Path) -> list[str]:
    """What `lora_target: all` finds (LLaMA-Factory's find_all_linear_modules: the last name component of
    every nn.Linear but lm_head), from the upstream class built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((Path(model) / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("auto_map", "kt_sft")}
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sorted({n.rsplit(".", 1)[-1] for n, mod in m.named_modules()
                   if isinstance(mod, torch.nn.Linear) and "lm_head" not in n})


def resolve_dtype(dtype: str) -> str:
    """`auto` -> bf16 where bf16 matmuls are native (a GPU, or avx512_bf16 / amx_bf16 CPU flags), else fp32."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags.split()) else "fp32"


class MemoryCap:
    """A per-run memory limit: a child memory cgroup (v2 `memory.max` or v1 `memory.limit_in_bytes`;
    page cache is charged too), else RLIMIT_AS for runs that map no big file, else none."""

    def __init__(self, limit_bytes: int | None, name: str, allow_rlimit: bool):
        self.limit, self.kind, self.path, self.note = limit_bytes, "none", None, None
        if limit_bytes is None:
            return
        base = self._own_cgroup()
        if base is not None:
            try:
                self.path = base / f"kt_compare_{name}_{os.getpid()}"
                self.path.mkdir(exist_ok=True)
                v2 = (self.path / "memory.max").exists()
                (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))
                self.kind = "cgroup_v2" if v2 else "cgroup_v1"
                return
            except OSError as exc:
                self.note = f"cgroup unavailable: {exc}"
                self.close()
        if allow_rlimit:
            self.kind = "rlimit_as"
        else:
            self.note = (self.note or "no writable memory cgroup") + "; RLIMIT_AS would break the mapped pack: uncapped"

    @staticmethod
    def _own_cgroup() -> Path | None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                p = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
                return p if os.access(p, os.W_OK) else None
        v2 = Path("/sys/fs/cgroup") / next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), "/").lstrip("/")
        return v2 if (v2 / "cgroup.controllers").exists() and os.access(v2, os.W_OK) else None

    def attach(self, pid: int) -> None:
        """Puts a just-started process under the cap (its children inherit it). Done from the parent
        right after the start rather than in a preexec_fn, which is unsafe in a threaded parent; the
        child is then still starting Python."""
        if self.kind.startswith("cgroup"):
            (self.path / "cgroup.procs").write_text(str(pid))
        elif self.kind == "rlimit_as":
            resource.prlimit(pid, resource.RLIMIT_AS, (self.limit, self.limit))

    def _read(self, *names: str) -> str | None:
        for n in names:
            try:
                return (self.path / n).read_text()
            except OSError:
                continue
        return None

    def report(self) -> dict:
        out = {"kind": self.kind, "limit_bytes": self.limit, "note": self.note}
        if self.kind.startswith("cgroup"):
            peak = self._read("memory.peak", "memory.max_usage_in_bytes")
            out["peak_bytes"] = int(peak) if peak and peak.strip().isdigit() else None
            events = self._read("memory.events", "memory.oom_control") or ""
            kv = dict(line.split() for line in events.splitlines() if len(line.split()) == 2)
            out["oom_kills"] = int(kv.get("oom_kill", 0))
            failcnt = self._read("memory.failcnt")
            out["limit_hits"] = int(failcnt) if failcnt and failcnt.strip().isdigit() else int(kv.get("max", 0))
        return out

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            self.path = None


def _evict_page_cache(path: Path) -> None:
    """Drops one file's clean pages from the page cache, so a capped run pays for reading it (a page
    cached earlier would be charged to whoever read it first, not to the run's cgroup)."""
    for f in ([path] if path.is_file() else sorted(path.glob("*"))):
        f = f.resolve()
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def result_path(spec: dict, rank: int) -> Path:
    """Where a worker of rank `rank` writes its record: the spec's path for rank 0, `<stem>.rank<N>.json`
    beside it for the others (kt_sft.bench.compare_worker)."""
    path = Path(spec["result"])
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def threads_per_rank(cfg: CompareConfig) -> int:
    return max(1, cfg.threads // cfg.nproc)


def run_mode(cfg: CompareConfig, mode: str, model: Path, data: dict, out_dir: Path, common: dict) -> dict:
    """Runs one mode in fresh processes (one, or cfg.nproc torchrun ranks) and returns its run record
    (also written as <mode>.json)."""
    run_dir = out_dir / "runs" / mode
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    args = llamafactory_args(cfg, data, model, run_dir / "output", mode)
    per_rank = threads_per_rank(cfg)
    spec = {"args": args, "threads": per_rank, "result": str(run_dir / "worker.json"),
            "zero3_leaf_fix": mode == "zero3_offload",
            "plain_expert_lora": EXPERT_LORA_PARAMS if cfg.expert_lora and not mode.startswith("kt_") else None}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(per_rank), "MKL_NUM_THREADS": str(per_rank),
           "KT_SFT_NUM_THREADS": str(per_rank), "KT_SFT_TORCH_THREADS": str(per_rank), "PYTHONUNBUFFERED": "1"}
    bindir = Path(sys.executable).parent
    if mode in DS_CONFIGS or cfg.nproc > 1:
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # DeepSpeed's JIT builds find ninja here
        cmd = [str(bindir / "torchrun"), "--standalone", "--nproc_per_node", str(cfg.nproc), "-m",
               "kt_sft.bench.compare_worker", str(run_dir / "spec.json")]
    else:
        cmd = [sys.executable, "-m", "kt_sft.bench.compare_worker", str(run_dir / "spec.json")]
    cap_bytes = int(cfg.memory_cap_gib * 2**30) if cfg.memory_cap_gib else None
    cap = MemoryCap(cap_bytes, mode, allow_rlimit=not mode.startswith("kt_"))
    if cap.kind.startswith("cgroup"):
        _evict_page_cache(model)
        kt_pack = model / "experts.ktpack"
        if kt_pack.exists():
            _evict_page_cache(kt_pack.resolve())
    _say(f"{mode}: {' '.join(cmd[-4:])} (memory cap: {cap.kind}{'' if cap_bytes is None else f' {cfg.memory_cap_gib} GiB'})")
    load_start = os.getloadavg()
    launch = time.time()
    status, error = "ok", None
    with open(run_dir / "stdout.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        cap.attach(proc.pid)
        try:
            rc = proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run's own process group (torchrun + worker)
            rc = proc.wait()
            status, error = "timeout", f"killed after {cfg.timeout_s} s"
    wall = time.time() - launch
    cap_report = cap.report()
    cap.close()
    ranks = [json.loads(p.read_text()) for r in range(cfg.nproc) if (p := result_path(spec, r)).exists()]
    worker = ranks[0] if ranks and ranks[0].get("rank", 0) == 0 else None
    if status == "ok" and rc != 0:
        if cap_report.get("oom_kills") or rc in (-9, 137):
            status, error = "oom_killed", f"exit {rc}; killed for memory ({cfg.memory_cap_gib} GiB cap)"
        else:
            status = "failed"
            error = (worker or {}).get("error") or f"exit {rc}: " + _tail(run_dir / "stdout.log")
    elif status == "ok" and (worker is None or worker.get("status") != "ok"):
        status, error = "failed", (worker or {}).get("error", "the worker wrote no result")
    record = {
        "schema": SCHEMA_RUN, "mode": mode, "status": status, "error": error, "exit_code": rc,
        "command": cmd, "cwd": str(ROOT), "model": str(model), "llamafactory_args": args, "spec": spec,
        "env": {k: env[k] for k in sorted(env) if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") or k.startswith("KT_SFT_")},
        "memory_cap": cap_report, "wall_s": wall, "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()), **common,
    }
    if worker is not None:
        record["worker"] = {k: worker.get(k) for k in ("patches", "hooked_modules", "trainable_params", "memory",
                                                        "checkpoint_cache", "traceback")}
        record["steps"] = worker.get("steps", [])
        for s in record["steps"]:
            s["loss"] = worker.get("losses", {}).get(str(s["step"]))
        # every rank's own view: its steps' times, CPU use and memory (rank 0's steps are the ones above)
        record["ranks"] = [{"rank": w.get("rank", 0), "steps": [{k: s.get(k) for k in ("step", "time_s", "cpu_s", "pss_kib")}
                                                           for s in w.get("steps", [])], "memory": w.get("memory")}
                           for w in ranks]
        record["timing"] = {
            "startup_s": worker["train_begin"] - launch if "train_begin" in worker else None,
            "train_s": worker["train_end"] - worker["train_begin"] if "train_end" in worker else None,
            "end_s": worker["end"] - worker["train_end"] if "train_end" in worker else None,
        }
    record["metrics"] = metrics(record, cfg.warmup_steps)
    if status == "ok" and not record["metrics"].get("timed_steps"):
        record["status"], record["error"] = "failed", "no timed steps were recorded"
    (out_dir / f"{mode}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------- numbers


def metrics(record: dict, warmup_steps: int) -> dict:
    """Everything the summary reports for one run, computed from its recorded steps only."""
    steps = record.get("steps") or []
    timed = [s for s in steps if s["step"] > warmup_steps]
    mem = (record.get("worker") or {}).get("memory") or {}
    out = {"timed_steps": len(timed), "memory": {
        "vmhwm_gib": mem["VmHWM"] / 2**20 if "VmHWM" in mem else None,
        "rss_anon_gib": max((s["rss_anon_kib"] or 0 for s in steps), default=0) / 2**20 or None,
        "rss_file_gib": max((s["rss_file_kib"] or 0 for s in steps), default=0) / 2**20 or None,
        "cgroup_peak_gib": (record.get("memory_cap") or {}).get("peak_bytes", 0) and
                           record["memory_cap"]["peak_bytes"] / 2**30,
        "gpu_max_allocated_gib": mem["gpu_max_allocated_bytes"] / 2**30 if "gpu_max_allocated_bytes" in mem else None,
        "node_pss_gib": None,
    }}
    per_rank = []
    for r in record.get("ranks") or []:
        own = [s for s in r["steps"] if s["step"] > warmup_steps and s.get("time_s")]
        pss = [s["pss_kib"] for s in r["steps"] if s.get("pss_kib")]
        per_rank.append({
            "rank": r["rank"], "median_step_s": statistics.median(s["time_s"] for s in own) if own else None,
            "cores_used": (statistics.median(s["cpu_s"] / s["time_s"] for s in own)
                           if own and all(s.get("cpu_s") is not None for s in own) else None),
            "max_pss_gib": max(pss) / 2**20 if pss else None})
    if per_rank:
        out["ranks"] = per_rank
        if all(r["max_pss_gib"] for r in per_rank):
            out["memory"]["node_pss_gib"] = sum(r["max_pss_gib"] for r in per_rank)
    if not timed:
        return out
    times = [s["time_s"] for s in timed]
    med = statistics.median(times)
    tokens = sum(s["tokens"] for s in timed)
    split = {k: statistics.median(s["split_s"][k] for s in timed) for k in timed[0]["split_s"]}
    split["rest"] = max(med - sum(split.values()), 0.0)
    faults = sum(s["major_faults"] for s in timed)
    blkio = [s.get("blkio_delay_s") for s in timed]
    fault_s = sum(blkio) if all(b is not None for b in blkio) else faults * 0.5e-3
    out.update({
        "median_step_s": med, "min_step_s": min(times), "max_step_s": max(times), "tokens_timed": tokens,
        "tokens_per_s": tokens / (med * len(timed)),
        "tokens_per_s_all_steps": sum(s["tokens"] for s in steps) / sum(s["time_s"] for s in steps),
        "split_s": split, "split_frac": {k: v / med for k, v in split.items()},
        "major_faults_timed": faults, "fault_time_s": fault_s, "fault_time_source":
            "blkio_delay" if all(b is not None for b in blkio) else "major_faults x 0.5 ms",
        "fault_time_frac": fault_s / sum(times), "steady": _steady(timed),
        "cores_used": (statistics.median(s["cpu_s"] / s["time_s"] for s in timed)
                       if all("cpu_s" in s for s in timed) else None),
        "losses": [s.get("loss") for s in steps],
    })
    out["fits"] = record["status"] == "ok" and out["steady"] and out["fault_time_frac"] < FAULT_FRAC_MAX
    return out


def _steady(timed: list[dict]) -> bool:
    """No timed step slower than STEADY_MAX x what its token count predicts. Steps differ in length
    (batches are padded to their longest sample), so the prediction is the least-squares line
    time = a + b * tokens through the timed steps; with equal lengths, the median step."""
    times = [s["time_s"] for s in timed]
    try:
        slope, intercept = statistics.linear_regression([s["tokens"] for s in timed], times)
        predicted = [max(intercept + slope * s["tokens"], 1e-9) for s in timed]
    except statistics.StatisticsError:  # fewer than two steps, or every step the same length
        predicted = [statistics.median(times)] * len(times)
    return all(t < STEADY_MAX * p for t, p in zip(times, predicted))


def summarize(records: dict[str, dict], cfg: CompareConfig) -> dict:
    """Ratios between modes, from the runs' own measured tokens/s (never from typed-in numbers)."""
    # a run killed after its last step (ZeRO-2's adapter save clones the model) still measured every step
    tps = {m: r["metrics"].get("tokens_per_s") for m, r in records.items()
           if r["status"] == "ok" or len(r.get("steps") or []) == cfg.steps}

    def best(group):
        ok = {m: tps[m] for m in group if tps.get(m)}
        return max(ok, key=ok.get) if ok else None

    base = {"plain": best(PLAIN), "zero": best(ZERO)}
    rows = {}
    for m, r in records.items():
        mt = r["metrics"]
        rows[m] = {
            "status": r["status"], "error": r.get("error"), "tokens_per_s": mt.get("tokens_per_s"),
            "steps_done": len(r.get("steps") or []),
            "median_step_s": mt.get("median_step_s"), "split_frac": mt.get("split_frac"),
            "split_s": mt.get("split_s"), "memory": mt["memory"], "fits": mt.get("fits"),
            "fault_time_frac": mt.get("fault_time_frac"), "timing": r.get("timing"),
            "trainable_params": (r.get("worker") or {}).get("trainable_params"), "cores_used": mt.get("cores_used"),
            "loadavg_start": r.get("loadavg_start"), "ranks": mt.get("ranks"),
            **{f"ratio_vs_{g}": (tps[m] / tps[b] if tps.get(m) and b else None) for g, b in base.items()},
        }
    targets = []
    for mode, group, need in TARGETS:
        if mode in records and base[group] is not None:
            ratio = rows[mode][f"ratio_vs_{group}"]
            targets.append({"mode": mode, "vs": base[group], "need": need, "ratio": ratio,
                            "met": ratio is not None and ratio >= need})
    return {"schema": SCHEMA_SUMMARY, "config": asdict(cfg), "definitions": DEFINITIONS, "baselines": base,
            "runs": rows, "targets": targets}


def format_table(summary: dict) -> str:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    header = ("| mode | status | tokens/s | median step (s) | vs plain | vs ZeRO | experts / MLP / attn / rest (%) "
              "| VmHWM / RssAnon / RssFile (GiB) | node Pss (GiB) | start-up / end (s) |")
    cfg = summary.get("config") or {}
    lines = [f"{cfg.get('nproc', 1)} process(es) per run x {max(1, cfg.get('threads', 1) // cfg.get('nproc', 1))} "
             "thread(s) each; memory columns are rank 0's, node Pss all ranks'", "", header, "|" + "---|" * 10]
    for m, r in summary["runs"].items():
        sf = r["split_frac"] or {}
        split = " / ".join(num(sf.get(k) and 100 * sf[k], ".0f") for k in
                           ("routed_experts", "shared_and_dense_mlp", "attention", "rest"))
        mem = r["memory"]
        t = r["timing"] or {}
        lines.append(
            f"| {m} | {r['status']} | {num(r['tokens_per_s'], '.1f')} | {num(r['median_step_s'], '.2f')} | "
            f"{num(r['ratio_vs_plain'], '.2f')} | {num(r['ratio_vs_zero'], '.2f')} | {split} | "
            f"{num(mem['vmhwm_gib'], '.1f')} / {num(mem['rss_anon_gib'], '.1f')} / {num(mem['rss_file_gib'], '.1f')} | "
            f"{num(mem.get('node_pss_gib'), '.1f')} | {num(t.get('startup_s'), '.0f')} / {num(t.get('end_s'), '.1f')} |")
    for t in summary["targets"]:
        lines.append(f"\ntarget {t['mode']} >= {t['need']}x {t['vs']}: "
                     f"{num(t['ratio'], '.2f')}x -> {'met' if t['met'] else 'MISSED'}")
    for m, r in summary["runs"].items():
        if r["status"] != "ok":
            lines.append(f"\n{m}: {r['status']}: {(r['error'] or '')[:300]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def run(cfg: CompareConfig) -> dict:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(cfg.out or ROOT / "bench_results" / "compare" / stamp).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work_dir if Path(cfg.work_dir).is_absolute() else ROOT / cfg.work_dir)
    data = prepare_data(cfg, work)
    hf = prepare_hf_model(cfg, work, data["source"])
    common = {"config": asdict(cfg), "dtype": resolve_dtype(cfg.dtype), "data": data, "versions": environment.versions(_VERSIONED), "git": environment.git_state(),
              "machine": environment.machine(), "threads": threads_per_rank(cfg), "processes": cfg.nproc,
              "started": stamp,
              "definitions": DEFINITIONS}
    records = {}
    for mode in cfg.modes:
        try:
            model = mode_model(cfg, mode, hf, work)
        except (OSError, ValueError) as exc:  # recorded like a failed run; the others still run
            records[mode] = {"mode": mode, "status": "failed", "error": f"preparing the model: {exc}",
                             "metrics": metrics({}, cfg.warmup_steps), **common}
            (out_dir / f"{mode}.json").write_text(json.dumps(records[mode], indent=1, default=str) + "\n")
            continue
        records[mode] = run_mode(cfg, mode, model, data, out_dir, common)
        m = records[mode]["metrics"]
        _say(f"{mode}: {records[mode]['status']}"
             + (f", {m['tokens_per_s']:.1f} tok/s, median step {m['median_step_s']:.2f} s" if m.get("tokens_per_s") else ""))
    summary = summarize(records, cfg)
    summary.update({"dtype": common["dtype"], "git": common["git"], "machine": common["machine"], "versions": common["versions"],
                    "runs_dir": str(out_dir)})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = format_table(summary)
    (out_dir / "summary.md").write_text(table + "\n")
    print(table)
    try:
        from kt_sft.bench.compare_plots import make_plots

        summary["plots"] = [str(p) for p in make_plots(out_dir, cfg.plots_dir)]
    except ImportError as exc:  # matplotlib is an optional extra
        _say(f"no plots: {exc}")
    print(f"[compare] results: {out_dir}")
    return summary


def resummarize(out_dir: str | Path) -> dict:
    """Recomputes every run's metrics and the summary from the run JSON files in `out_dir` (after a change
    of definitions, or to check the ratios by hand); rewrites summary.json / summary.md and the plots."""
    out_dir = Path(out_dir)
    old = json.loads((out_dir / "summary.json").read_text())
    cfg = CompareConfig(**{**old["config"], "modes": tuple(old["config"]["modes"])})
    records = {}
    for mode in cfg.modes:
        rec = json.loads((out_dir / f"{mode}.json").read_text())
        rec["metrics"] = metrics(rec, cfg.warmup_steps)
        (out_dir / f"{mode}.json").write_text(json.dumps(rec, indent=1) + "\n")
        records[mode] = rec
    summary = {**old, **summarize(records, cfg)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "summary.md").write_text(format_table(summary) + "\n")
    return summary


def _kt_model(text: str) -> tuple[str, str]:
    fmt, sep, path = text.partition("=")
    if not sep or fmt not in ("bf16", "int8", "int4"):
        raise argparse.ArgumentTypeError(f"expected FORMAT=DIR with FORMAT bf16/int8/int4, got {text!r}")
    return fmt, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `kt-sft bench compare`; None = the CompareConfig default (or the --quick preset)."""
    h = {f.name: f.metadata["help"] for f in fields(CompareConfig)}
    for name, kind in (("shape", str), ("hf_model", str), ("steps", int), ("warmup_steps", int), ("batch", int),
                       ("cutoff", int), ("lora_rank", int), ("lora_alpha", int), ("learning_rate", float),
                       ("threads", int), ("nproc", int), ("seed", int), ("data", str), ("dtype", str), ("memory_cap_gib", float),
                       ("timeout_s", int), ("work_dir", str), ("out", str), ("plots_dir", str)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=h[name])
    parser.add_argument("--kt-model", type=_kt_model, action="append", help=h["kt_models"] + " (FORMAT=DIR)")
    parser.add_argument("--modes", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                        help=f"{h['modes']}, comma-separated (default: {','.join(MODES)}; also kt_int4)")
    parser.add_argument("--expert-lora", action="store_true", default=None, help=h["expert_lora"])
    parser.add_argument("--quick", action="store_true", default=None,
                        help=h["quick"] + ": " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    values = dict(QUICK) if args.quick else {}
    for f in fields(CompareConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if args.kt_model:
        values["kt_models"] = dict(args.kt_model)
    return CompareConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_baseline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except CompareConfigError as exc:
        parser.error(str(exc))
    run(cfg)
    return 0
