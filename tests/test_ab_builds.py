"""scripts/ab_builds.py: two builds timed call by call from two worker processes. With this tree as
both builds, every case gets its samples from both workers, on the path asked for, and a bad tree or
a path the engine lacks is an error, not a silent run of something else."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kt_sft.engine import _native, runtime

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ab_builds.py"
TINY = ["--experts", "4", "--top-k", "2", "--hidden", "64", "--intermediate", "32", "--threads", "1"]

pytestmark = pytest.mark.skipif(not _native.available(), reason="native engine not built")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_same_tree_twice(tmp_path):
    out = tmp_path / "ab.json"
    res = _run("--old", str(ROOT), "--path", "scalar", "--formats", "bf16,int8", "--modes", "f32",
               "--tokens", "3,17", "--rounds", "2", "--out", str(out), *TINY)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["path"] == "scalar" and report["config"]["num_experts"] == 4
    assert [(c["tokens"], c["format"]) for c in report["cases"]] == [(3, "bf16"), (3, "int8"), (17, "bf16"), (17, "int8")]
    for case, row in zip(report["cases"], report["summary"]):
        # ABBA per round: two samples per build per timed round
        assert len(case["samples"]["old"]) == len(case["samples"]["new"]) == 4
        assert all(s["fwd"] > 0 and s["bwd"] > 0 for s in case["samples"]["old"] + case["samples"]["new"])
        lo, hi = row["new_speedup_range"]
        assert lo <= row["new_speedup_median"] <= hi
    assert res.stdout.count("\n") == 6  # header, 4 rows, "wrote"


def test_refuses_a_tree_without_kt_sft(tmp_path):
    res = _run("--old", str(tmp_path), "--path", "scalar", *TINY)
    assert res.returncode != 0 and "holds no kt_sft package" in res.stderr


def test_refuses_a_path_this_cpu_lacks():
    missing = [p for p in runtime.KERNEL_PATHS if p not in runtime.available_kernel_paths()]
    if not missing:
        pytest.skip("every kernel path runs here")
    res = _run("--old", str(ROOT), "--path", missing[0], "--tokens", "3", "--rounds", "1", *TINY)
    assert res.returncode != 0
