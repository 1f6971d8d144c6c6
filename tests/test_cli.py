"""The real `kt-sft` command line: doctor and bench kernels --quick in a subprocess, usage errors in process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kt_sft import cli, engine

ROOT = Path(__file__).resolve().parents[1]


def kt_sft(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kt_sft", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_doctor_prints_the_kernel_path():
    proc = kt_sft("doctor")
    assert proc.returncode == 0, proc.stderr
    assert f"kernel path       {engine.kernel_path()}" in proc.stdout
    assert "memory" in proc.stdout and "torch" in proc.stdout


def test_doctor_json():
    proc = kt_sft("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["engine"]["native_loaded"] is True
    assert report["engine"]["kernel_path"] == engine.kernel_path()
    assert report["engine"]["available_kernel_paths"] == engine.available_kernel_paths()
    assert set(report["versions"]) >= {"torch", "transformers", "cffi", "kt_sft"}


def test_doctor_reports_room_for_the_node_shared_expert_lora():
    """Several ranks per node keep one copy of the expert LoRA in /dev/shm (Docker's default is 64 MB)."""
    import os

    report = json.loads(kt_sft("doctor", "--json").stdout)["shared_memory"]
    assert os.path.isdir(report["dir"]) and report["free_gib"] > 0, report
    line = next(l for l in kt_sft("doctor").stdout.splitlines() if l.startswith("shared memory"))
    assert report["dir"] in line and "GiB free" in line, line


@pytest.mark.parametrize("forced", ["fma", "dpbf16"])
def test_doctor_says_which_bf16_products_the_avx512_path_runs(forced, monkeypatch):
    """KT_SFT_BF16_DOT forces the choice where the CPU has AVX512-BF16; elsewhere the FMA kernels run."""
    from kt_sft.engine._native import lib

    monkeypatch.setenv("KT_SFT_BF16_DOT", forced)  # inherited by the subprocesses
    has_bf16 = bool(lib.kt_cpu_features() & lib.KT_CPU_AVX512BF16)
    proc = kt_sft("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    eng = json.loads(proc.stdout)["engine"]
    assert eng["bf16_dot"] == (forced if has_bf16 else "fma")
    assert (eng["bf16_dot_ratio"] is None) == (not has_bf16)
    line = next(l for l in kt_sft("doctor").stdout.splitlines() if l.startswith("bf16 products"))
    assert ("vdpbf16ps on the avx512 path" in line) == (forced == "dpbf16" and has_bf16), line


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "kernels.json"
    proc = kt_sft("bench", "kernels", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_bench_kernels_quick_writes_results_for_every_format(quick_bench):
    proc, report = quick_bench
    cfg = report["config"]
    assert cfg["quick"] and cfg["formats"] == ["bf16", "int8", "int4"]
    workloads = {(t, "uniform") for t in cfg["tokens"]} | {(max(cfg["tokens"]), "zipf")}
    for fmt in cfg["formats"]:
        runs = [r for r in report["results"] if r["format"] == fmt]
        assert {(r["tokens"], r["routing"]) for r in runs} == workloads
        ok = [r for r in runs if r["mode"] == "bf16"]
        assert ok and all(r["status"] == "ok" for r in ok), ok
        for r in ok:
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["tokens_per_s"] > 0 and r["gflops_fwd_bwd"] > 0
            assert r["ratio_vs_baseline"]["fwd_bwd"] > 0
            # the same layer on both sides, up to quantization error (int4 ~15% on random weights)
            assert r["rel_err_vs_eager"]["y"] < {"bf16": 0.02, "int8": 0.05, "int4": 0.3}[fmt]
    for r in report["results"] + report["baseline"]:
        assert r["status"] in ("ok", "unsupported") or r["status"].startswith("error: "), r["status"]
    assert f"kt_sft {cfg['formats'][0]}" in " ".join(proc.stdout.split())  # the table


def test_bench_kernels_quick_records_the_baseline_and_context(quick_bench):
    _, report = quick_bench
    impls = {(b["experts_implementation"], b["tokens"], b["routing"]): b for b in report["baseline"]}
    for t in report["config"]["tokens"]:
        for impl in ("eager", "grouped_mm"):
            entry = impls[(impl, t, "uniform")]
            assert entry["status"] == "ok" and entry["fwd_ms"] > 0 and entry["bwd_ms"] > 0
    best = {(b["tokens"], b["routing"]) for b in report["baseline_best"]}
    assert best == {(r["tokens"], r["routing"]) for r in report["results"]}
    assert report["machine"]["ceiling_gflops_torch_fp32"] > 0
    assert report["definitions"]["flops_fwd_bwd"] == "T*k*12*H*I"
    assert {"commit", "dirty"} <= set(report["git"]) or "error" in report["git"]
    assert report["versions"]["transformers"] and report["engine"]["kernel_path"]


@pytest.mark.parametrize("args, message", [
    (["--formats", "int3"], "unknown expert format 'int3'"),
    (["--modes", "fp8"], "unknown compute mode 'fp8'"),
    (["--tokens", "0,64"], "expected positive integers"),
    (["--quick", "--top-k", "9"], "`top_k` (9) cannot exceed `num_experts` (8)"),
    (["--kernel-path", "neon"], "unknown kernel path 'neon'"),
])
def test_bench_kernels_rejects_bad_options(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # in process: argparse exits before any work starts
        cli.main(["bench", "kernels", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: kt-sft bench kernels" in err


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench"])
    assert exit_info.value.code == 2 and "SUITE" in capsys.readouterr().err


def test_convert_cli_reports_a_missing_tensor_cleanly(tmp_path, capsys):
    """A checkpoint missing an expert tensor: exit 2 with the tensor's name, nothing written."""
    from safetensors.torch import load_file, save_file

    from kt_sft.cli import main
    from kt_sft.fixtures import build_fixtures

    build_fixtures(tmp_path / "fx", archs=["qwen3_moe"], log=None)
    src = tmp_path / "fx" / "models" / "qwen3_moe"
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--model", str(src), "--out", str(tmp_path / "out"), "--quiet"])
    assert exc.value.code == 2
    assert "lacks tensor 'model.layers.1.mlp.experts.3.down_proj.weight'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
