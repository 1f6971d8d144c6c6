"""`kt-sft bench compare` (kt_sft/bench/compare.py, compare_worker.py, compare_plots.py), the shaped random
checkpoints (kt_sft/bench/shaped_models.py) and the recipes' checks (kt_sft/recipes.py).

The end-to-end runs use the fixtures' tiny DeepSeek-V2 with the --quick settings: kt_sft and plain modes
in CI (~1 min), the DeepSpeed modes and the expert-LoRA comparison `slow`."""

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

from kt_sft import recipes
from kt_sft.bench import compare
from kt_sft.bench import shaped_models as sm
from kt_sft.bench.compare_worker import CATEGORIES, _ModuleClock

ROOT = Path(__file__).resolve().parents[1]
HAS_LF = shutil.which("llamafactory-cli", path=str(Path(sys.executable).parent)) is not None
needs_lf = pytest.mark.skipif(not HAS_LF, reason="llamafactory-cli is not installed next to this Python")

RUN_KEYS = ("schema", "mode", "status", "error", "command", "llamafactory_args", "config", "versions", "git",
            "machine", "threads", "processes", "memory_cap", "timing", "steps", "metrics", "data")


# ---------------------------------------------------------------- numbers from recorded steps


def _record(mode, times, tokens, status="ok", faults=0):
    split = dict.fromkeys(CATEGORIES, 0.1)
    steps = [{"step": i + 1, "time_s": t, "tokens": n, "major_faults": faults, "blkio_delay_s": None,
              "rss_anon_kib": 2**20, "rss_file_kib": 2**19, "split_s": split, "loss": 2.0 - 0.1 * i}
             for i, (t, n) in enumerate(zip(times, tokens))]
    rec = {"mode": mode, "status": status, "steps": steps, "worker": {"memory": {"VmHWM": 3 * 2**20}},
           "memory_cap": {}, "timing": {}}
    rec["metrics"] = compare.metrics(rec, warmup_steps=2)
    return rec


def test_tokens_per_s_is_timed_tokens_over_median_times_steps():
    rec = _record("kt_int8", [9.0, 5.0, 1.0, 3.0, 2.0], [100, 100, 200, 300, 400])
    m = rec["metrics"]
    assert m["timed_steps"] == 3 and m["median_step_s"] == 2.0
    assert m["tokens_per_s"] == pytest.approx(900 / (2.0 * 3))
    assert m["split_s"]["rest"] == pytest.approx(2.0 - 0.3)
    assert sum(m["split_frac"].values()) == pytest.approx(1.0)
    assert m["memory"]["vmhwm_gib"] == 3.0 and m["memory"]["rss_anon_gib"] == 1.0
    # 1 / 3 / 2 s for 200 / 300 / 400 tokens: the fitted line says 1 / 2 / 3 s, and 3 s = 1.5 x 2 s
    assert not m["steady"] and not m["fits"]
    assert _record("kt_int8", [9, 9, 1, 2, 3], [100, 100, 200, 300, 400])["metrics"]["steady"]
    assert not _record("kt_int8", [1, 1, 2, 2, 4], [100] * 5)["metrics"]["steady"]  # 4 s > 1.5 x the 2 s median


def test_fits_needs_steady_steps_and_few_major_faults():
    steady = _record("kt_int8", [5, 5, 2, 2, 2], [1] * 5)
    assert steady["metrics"]["fits"]
    faulting = _record("kt_int8", [5, 5, 2, 2, 2], [1] * 5, faults=200)  # 200 x 0.5 ms = 0.1 s of 6 s
    assert faulting["metrics"]["fault_time_frac"] == pytest.approx(0.3 / 6)
    assert not faulting["metrics"]["fits"]


def test_summary_ratios_come_from_the_measured_runs():
    cfg = compare.CompareConfig(steps=5, warmup_steps=2)
    records = {
        "kt_int8": _record("kt_int8", [1, 1, 1, 1, 1], [300] * 5),
        "kt_bf16": _record("kt_bf16", [1, 1, 1, 1, 1], [200] * 5),
        "plain_default": _record("plain_default", [1, 1, 2, 2, 2], [300] * 5),
        "plain_eager": _record("plain_eager", [1, 1, 1.5, 1.5, 1.5], [300] * 5),
        "zero2_offload": _record("zero2_offload", [1, 1, 3, 3, 3], [300] * 5),
        "zero3_offload": _record("zero3_offload", [1, 1, 1, 1, 1], [0] * 5, status="failed"),
    }
    s = compare.summarize(records, cfg)
    assert s["baselines"] == {"plain": "plain_eager", "zero": "zero2_offload"}  # failed runs never count
    assert s["runs"]["kt_int8"]["ratio_vs_plain"] == pytest.approx(300 / (300 / 1.5))
    assert s["runs"]["kt_int8"]["ratio_vs_zero"] == pytest.approx(3.0)
    assert s["runs"]["zero3_offload"]["ratio_vs_plain"] is None
    met = {(t["mode"], t["vs"]): t["met"] for t in s["targets"]}
    assert met == {("kt_int8", "plain_eager"): True, ("kt_int8", "zero2_offload"): True,
                   ("kt_bf16", "plain_eager"): False}  # 200 / 200 = 1.0 < 1.2
    assert "MISSED" in compare.format_table(s)


@pytest.mark.parametrize("bad", [{"modes": ("kt_int9",)}, {"warmup_steps": 8, "steps": 8}, {"steps": 0},
                                 {"memory_cap_gib": -1.0}, {"shape": "llama"}, {"nproc": 0},
                                 {"nproc": 3, "threads": 2}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(compare.CompareConfigError):
        compare.CompareConfig(**bad)


def test_cli_parses_bench_compare():
    from kt_sft.cli import build_parser

    args = build_parser().parse_args(["bench", "compare", "--quick", "--modes", "kt_int8,plain_eager",
                                      "--kt-model", "int8=/x", "--memory-cap-gib", "12"])
    cfg = compare.config_from_args(args)
    assert cfg.shape == "tiny" and cfg.modes == ("kt_int8", "plain_eager") and cfg.kt_models == {"int8": "/x"}
    assert cfg.memory_cap_gib == 12.0 and cfg.steps == compare.QUICK["steps"]


def test_llamafactory_args_differ_only_in_model_and_deepspeed(tmp_path):
    cfg = compare.CompareConfig(quick=True, **compare.QUICK)
    data = {"dataset_dir": "d", "dataset": "x"}
    base = compare.llamafactory_args(cfg, data, Path("m"), tmp_path, "plain_default")
    for mode in compare.MODES:
        args = compare.llamafactory_args(cfg, data, Path("m"), tmp_path, mode)
        diff = {k for k in set(args) | set(base) if args.get(k) != base.get(k)}
        assert diff <= {"deepspeed"}, (mode, diff)
    assert base["disable_shuffling"] and base["include_num_input_tokens_seen"] == "non_padding"
    from kt_sft import fixtures

    tok = fixtures.build_tokenizer(300)
    model = tmp_path / "tiny"
    fixtures.build_model("deepseek_v2", tok).save_pretrained(model)
    expert = compare.CompareConfig(expert_lora=True, **compare.QUICK)
    kt = compare.llamafactory_args(expert, data, model, tmp_path, "kt_int8")["lora_target"].split(",")
    plain = compare.llamafactory_args(expert, data, model, tmp_path, "plain_eager")["lora_target"].split(",")
    assert kt == [*plain, "experts"] and {"q_proj", "o_proj", "kv_b_proj", "gate_proj", "down_proj"} <= set(plain)


def test_several_processes_get_their_share(tmp_path):
    """--nproc N: N ranks each take `batch` samples per step (so N x the samples), threads // N threads
    each, ZeRO-3 without use_cpu on a CPU (it fails with several CPU processes otherwise), and the same
    LoRA targets in every mode without the router (no gradient in plain DeepSeek-V2: DDP would refuse)."""
    from kt_sft import fixtures

    model = tmp_path / "tiny"
    fixtures.build_model("deepseek_v2", fixtures.build_tokenizer(300)).save_pretrained(model)
    cfg = compare.CompareConfig(**{**compare.QUICK, "nproc": 2, "threads": 2})
    data = {"dataset_dir": "d", "dataset": "x"}
    one = compare.llamafactory_args(compare.CompareConfig(**compare.QUICK), data, model, tmp_path, "kt_int8")
    two = compare.llamafactory_args(cfg, data, model, tmp_path, "kt_int8")
    assert two["max_samples"] == 2 * one["max_samples"] and compare.threads_per_rank(cfg) == 1
    assert one["lora_target"] == "all" and "q_proj" in two["lora_target"].split(",")
    assert compare.ROUTER not in two["lora_target"].split(",")
    assert compare.llamafactory_args(cfg, data, model, tmp_path, "plain_eager")["lora_target"] == two["lora_target"]
    z3 = compare.llamafactory_args(cfg, data, model, tmp_path, "zero3_offload")
    if not torch.cuda.is_available():
        assert z3["use_cpu"] is False and two["use_cpu"] is True
    spec = {"result": str(tmp_path / "worker.json")}
    assert compare.result_path(spec, 0) == tmp_path / "worker.json"
    assert compare.result_path(spec, 1) == tmp_path / "worker.rank1.json"


def test_node_memory_counts_every_rank_once():
    rec = _record("kt_int8", [1.0] * 5, [100] * 5)
    rec["ranks"] = [{"rank": r, "memory": {}, "steps": [
        {"step": i + 1, "time_s": t, "cpu_s": t * (0.9 - 0.1 * r), "pss_kib": (3 + r + i % 2) * 2**20}
        for i, t in enumerate([2.0, 2.0, 1.0, 1.0 + r, 1.0])]} for r in range(2)]
    m = compare.metrics(rec, warmup_steps=2)
    assert m["memory"]["node_pss_gib"] == pytest.approx(4 + 5)  # each rank's largest, summed
    assert [r["median_step_s"] for r in m["ranks"]] == [1.0, 1.0]
    assert [r["cores_used"] for r in m["ranks"]] == [pytest.approx(0.9), pytest.approx(0.8)]
    assert compare.metrics(_record("kt_int8", [1.0] * 5, [100] * 5), 2)["memory"]["node_pss_gib"] is None


# ---------------------------------------------------------------- the step split


def test_module_clock_splits_a_checkpointed_step():
    """Hooks on a tiny DeepSeek-V2 with reentrant checkpointing (LLaMA-Factory's default): every category
    gets time, forward and backward, and together they stay within the step's wall time."""
    import time
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers import AutoModelForCausalLM

    from kt_sft import fixtures

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fixtures.tiny_config("deepseek_v2", 256, 0, 1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model._set_gradient_checkpointing(True, partial(checkpoint, use_reentrant=True))
    model.enable_input_require_grads()
    model.train()
    clock = _ModuleClock()
    found = clock.install(model)
    assert found == {"routed_experts": 2, "shared_and_dense_mlp": 3, "attention": 3}
    ids = torch.randint(0, 256, (2, 32))
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    wall = time.perf_counter() - t0
    split = clock.take()
    assert all(v > 0 for v in split.values()), split
    assert sum(split.values()) <= wall * 1.05
    assert clock.take() == dict.fromkeys(CATEGORIES, 0.0)


# ---------------------------------------------------------------- end to end (tiny model)


def _quick(tmp_path, modes, **kw):
    cfg = compare.CompareConfig(**{**compare.QUICK, "modes": tuple(modes), "work_dir": str(tmp_path / "work"),
                                   "out": str(tmp_path / "out"), **kw})
    return compare.run(cfg), tmp_path / "out"


def _check_complete(summary, out, modes):
    tps = {}
    for mode in modes:
        rec = json.loads((out / f"{mode}.json").read_text())
        missing = [k for k in RUN_KEYS if k not in rec]
        assert not missing, (mode, missing)
        assert rec["status"] == "ok", (mode, rec["error"])
        assert rec["git"].get("commit") and "dirty" in rec["git"] and rec["machine"]["cpu_model"]
        assert rec["versions"]["llamafactory"] and rec["versions"]["torch"]
        assert rec["timing"]["startup_s"] > 0 and rec["timing"]["end_s"] >= 0
        assert len(rec["steps"]) == summary["config"]["steps"]
        assert all(s["loss"] is not None and s["tokens"] > 0 for s in rec["steps"])
        m = rec["metrics"]
        timed = rec["steps"][summary["config"]["warmup_steps"]:]
        med = statistics.median(s["time_s"] for s in timed)
        assert m["tokens_per_s"] == pytest.approx(sum(s["tokens"] for s in timed) / (med * len(timed)))
        assert set(m["split_frac"]) == {*CATEGORIES, "rest"} and m["memory"]["vmhwm_gib"] > 0
        tps[mode] = m["tokens_per_s"]
    for mode in modes:
        for group, names in (("plain", compare.PLAIN), ("zero", compare.ZERO)):
            present = [n for n in names if n in tps]
            if present:
                want = tps[mode] / max(tps[n] for n in present)
                assert summary["runs"][mode][f"ratio_vs_{group}"] == pytest.approx(want)
    assert json.loads((out / "summary.json").read_text())["runs"].keys() == set(modes)
    again = compare.resummarize(out)  # recomputed from the run files alone: the same numbers
    for mode in modes:
        for key in ("tokens_per_s", "ratio_vs_plain", "ratio_vs_zero"):
            assert again["runs"][mode][key] == summary["runs"][mode][key]
    for png in ("throughput.png", "memory.png", "loss.png"):
        assert (out / png).stat().st_size > 1000


@needs_lf
def test_quick_run_kt_and_plain_modes(tmp_path):
    modes = ("kt_int8", "kt_bf16", "plain_default", "plain_eager")
    summary, out = _quick(tmp_path, modes)
    _check_complete(summary, out, modes)
    # the same samples in the same order: identical non-padding tokens per step in every mode
    tokens = {m: [s["tokens"] for s in json.loads((out / f"{m}.json").read_text())["steps"]] for m in modes}
    assert len({tuple(v) for v in tokens.values()}) == 1, tokens


@needs_lf
def test_timeout_and_failure_are_recorded(tmp_path):
    summary, out = _quick(tmp_path, ("plain_default",), timeout_s=3)
    rec = json.loads((out / "plain_default.json").read_text())
    assert rec["status"] == "timeout" and "3 s" in rec["error"] and summary["runs"]["plain_default"]["tokens_per_s"] is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    _, out = _quick(tmp_path / "b", ("plain_eager",), hf_model=str(broken))
    rec = json.loads((out / "plain_eager.json").read_text())
    assert rec["status"] == "failed" and rec["error"], rec.get("error")


@needs_lf
def test_memory_cap_stops_a_run_cleanly(tmp_path):
    """0.3 GiB is far below what LLaMA-Factory needs: the run is stopped (cgroup OOM kill, or a
    MemoryError under the rlimit fallback) and recorded, not left to take the machine down."""
    _, out = _quick(tmp_path, ("plain_default",), memory_cap_gib=0.3)
    rec = json.loads((out / "plain_default.json").read_text())
    assert rec["status"] in ("oom_killed", "failed"), rec["status"]
    assert rec["memory_cap"]["kind"] in ("cgroup_v1", "cgroup_v2", "rlimit_as")


@needs_lf
@pytest.mark.slow
def test_quick_run_two_processes(tmp_path):
    """--nproc 2 through torchrun: every rank writes its record, tokens are all ranks' and the node's
    memory is counted with shared pages once."""
    modes = ("kt_int8", "plain_default")
    summary, out = _quick(tmp_path, modes, nproc=2)
    _check_complete(summary, out, modes)
    for mode in modes:
        rec = json.loads((out / f"{mode}.json").read_text())
        assert rec["processes"] == 2 and rec["threads"] == 1 and [r["rank"] for r in rec["ranks"]] == [0, 1]
        assert rec["metrics"]["memory"]["node_pss_gib"] > 0 and len(rec["metrics"]["ranks"]) == 2
    one, _ = _quick(tmp_path / "one", modes[:1])
    tokens = lambda o, m: sum(s["tokens"] for s in json.loads((o / f"{m}.json").read_text())["steps"])  # noqa: E731
    assert tokens(out, "kt_int8") > 1.5 * tokens(tmp_path / "one" / "out", "kt_int8")  # two ranks' batches


@needs_lf
@pytest.mark.slow
def test_quick_run_every_mode(tmp_path):
    """All six modes, DeepSpeed included (its CPU Adam is JIT-compiled on first use: minutes, once)."""
    summary, out = _quick(tmp_path, compare.MODES)
    _check_complete(summary, out, compare.MODES)
    assert json.loads((out / "zero3_offload.json").read_text())["worker"]["patches"] == ["zero3_leaf_fix"]


@needs_lf
@pytest.mark.slow
def test_quick_run_expert_lora(tmp_path):
    """The second comparison: needs kt_sft's expert LoRA (kt_sft/integration/peft_lora.py, issue #6)."""
    if not (ROOT / "kt_sft" / "integration" / "peft_lora.py").exists():
        pytest.skip("kt_sft expert LoRA (issue #6) is not there yet")
    modes = ("kt_int8", "plain_eager")
    summary, out = _quick(tmp_path, modes, expert_lora=True)
    _check_complete(summary, out, modes)
    # the same LoRA on both sides: kt_sft's expert LoRA has exactly PEFT's target_parameters shapes
    trainable = {m: summary["runs"][m]["trainable_params"] for m in modes}
    _, plain_only = _quick(tmp_path / "no_expert_lora", ("plain_eager",))
    without = json.loads((plain_only / "plain_eager.json").read_text())["worker"]["trainable_params"]
    assert trainable["kt_int8"] == trainable["plain_eager"] > without, (trainable, without)


# ---------------------------------------------------------------- shaped random checkpoints


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe", "deepseek_v3"])
def test_random_checkpoint_names_match_save_pretrained(arch, tmp_path):
    from kt_sft import fixtures

    tok = fixtures.build_tokenizer(300)
    model = fixtures.build_model(arch, tok)
    model.save_pretrained(tmp_path)
    saved = {name: shape for name, shape, _ in fixtures.iter_safetensors_keys(tmp_path)}
    ckpt = sm.RandomCheckpoint(model.config.to_dict())
    assert {n: tuple(s) for n, (s, _) in ckpt.where.items()} == saved


def test_write_hf_loads_and_write_kt_equals_converting_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from kt_sft import fixtures
    from kt_sft.engine.pack_file import PackFile
    from kt_sft.integration.convert import convert

    tok = fixtures.build_tokenizer(300)
    config = fixtures.tiny_config("deepseek_v2", len(tok), tok.pad_token_id, tok.eos_token_id).to_dict()
    sm.write_hf(config, tmp_path / "hf", tok, progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.layers[1].mlp.experts.gate_up_proj.std().item() == pytest.approx(sm.WEIGHT_STD, rel=0.1)
    convert(tmp_path / "hf", tmp_path / "converted", "int8", progress=False)
    sm.write_kt(config, tmp_path / "direct", "int8", tok, progress=False)
    a, b = PackFile(tmp_path / "converted" / "experts.ktpack"), PackFile(tmp_path / "direct" / "experts.ktpack")
    for layer in a.layers:
        assert torch.equal(a.layer(layer).gate_up, b.layer(layer).gate_up)
        assert torch.equal(a.layer(layer).down, b.layer(layer).down)


def test_sparse_experts_take_no_disk(tmp_path):
    from kt_sft import fixtures

    tok = fixtures.build_tokenizer(300)
    config = fixtures.tiny_config("qwen3_moe", len(tok), tok.pad_token_id, tok.eos_token_id).to_dict()
    sm.write_hf(config, tmp_path / "hf", tok, sparse_experts=True, progress=False)
    ckpt = sm.RandomCheckpoint(config)
    from kt_sft.integration.convert import TensorIndex

    index = TensorIndex(tmp_path / "hf")
    name = min(ckpt.expert_names)
    assert not index.get(name).any()  # a hole reads as zeros
    assert torch.equal(index.get("model.embed_tokens.weight"), ckpt.get("model.embed_tokens.weight"))


def test_disk_is_checked_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(sm.shutil, "disk_usage", lambda p: type("U", (), {"free": 2**30})())
    with pytest.raises(OSError, match="needs 3.5 GiB"):
        sm.write_hf("deepseek_v2_lite_mini", tmp_path / "x", tokenizer=None)
    assert not (tmp_path / "x").exists()


def test_shapes_state_their_size():
    mini = sm.disk_needed("deepseek_v2_lite_mini", "hf")
    assert (mini["routed_params"] + mini["non_expert_params"]) / 1e9 == pytest.approx(1.87, abs=0.01)
    full = sm.disk_needed("deepseek_v2_lite", "kt", "int8")
    assert full["routed_params"] / 1e9 == pytest.approx(14.39, abs=0.01)
    assert "qwen3_30b_a3b" in sm.describe_shapes()


# ---------------------------------------------------------------- recipes


def test_recipe_plan_refuses_what_does_not_fit():
    small = recipes.plan("deepseek_v2_lite", "int8", Path("/tmp/kt"), True, None, 16.0, 500.0, 8)
    assert not small["fits"] and [c.what.split()[0] for c in small["checks"] if not c.ok] == ["RAM"]
    big = recipes.plan("deepseek_v2_lite", "int8", Path("/tmp/kt"), True, 80.0, 64.0, 500.0, 8)
    assert big["fits"] and any("GPU" in c.what for c in big["checks"])
    no_disk = recipes.plan("qwen3_30b_a3b", "int4", Path("/tmp/kt"), True, 80.0, 64.0, 5.0, 8)
    assert [c.what.split()[0] for c in no_disk["checks"] if not c.ok] == ["disk"]


@pytest.mark.parametrize("key", sorted(recipes.RECIPES))
def test_recipe_dry_run_prints_the_plan(key, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(recipes.environment, "meminfo_gib", lambda: {"total_gib": 4096.0, "available_gib": 4096.0})
    monkeypatch.setattr(recipes, "gpu_memory_gb", lambda: 80.0)
    rc = recipes.main(key, ["--kt-dir", str(tmp_path / "kt"), "--dry-run", "--force"])
    out = capsys.readouterr().out
    assert rc == 0 and "estimate: host RAM" in out and "kt-sft convert" in out and "llamafactory-cli train" in out


def test_recipe_scripts_exist_for_each_family():
    names = {p.stem for p in (ROOT / "recipes").glob("*.py")}
    assert {"deepseek_v3", "kimi_k2", "qwen3_moe", "mixtral", "deepseek_v2_lite"} <= names
