"""scripts/gemm_harness.sh (the avx512 products alone against their micro-kernel, docs/benchmarks.md)
keeps building against the kernel source it includes, and runs where the CPU has AVX-512."""

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kt_sft import engine

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or platform.machine() != "x86_64", reason="needs gcc on x86-64"
)
ROW = re.compile(r"^(bf16|int8|int4)\s+(nt|tn)\s+([\d.]+) \(\s*\d+%\)\s+([\d.]+) \(\s*\d+%\)\s+([\d.]+)$")


def test_harness_builds_and_runs():
    if "avx512" not in engine.available_kernel_paths():
        # still compiled: the script builds first and the binary refuses this CPU with exit status 2
        proc = subprocess.run(["bash", "scripts/gemm_harness.sh"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "lacks AVX-512" in proc.stderr
        return
    proc = subprocess.run(["bash", "scripts/gemm_harness.sh", "96", "1", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [m.groups() for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert {(f, d) for f, d, *_ in rows} == {(f, d) for f in ("bf16", "int8", "int4") for d in ("nt", "tn")}
    for f, d, kernel, product, ratio in rows:
        assert float(kernel) > 0 and float(product) > 0, (f, d)
        assert float(ratio) == pytest.approx(float(product) / float(kernel), abs=0.02), (f, d)  # printed values are rounded


def test_harness_rejects_bad_arguments():
    proc = subprocess.run(["bash", "scripts/gemm_harness.sh", "4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage" in proc.stderr or "lacks AVX-512" in proc.stderr
