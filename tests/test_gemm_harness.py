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


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


@pytest.mark.parametrize("kind, flag, cases", [
    ("dp", "avx512_bf16", {(f, d) for f in ("bf16", "int8", "int4") for d in ("nt", "tn")}),
    ("q8", "avx512_vnni", {("int8", "nt"), ("int8", "tn"), ("int4", "nt")}),
])
def test_harness_other_kernels(kind, flag, cases):
    """The vdpbf16ps (dp) and vpdpbusd (q8) kernels where the CPU has their instruction, else a refusal."""
    proc = subprocess.run(["bash", "scripts/gemm_harness.sh", "96", "1", "1", kind], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if "avx512" not in engine.available_kernel_paths() or flag not in _cpu_flags():
        assert proc.returncode == 2 and "lacks" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    rows = [m.groups() for m in map(ROW.match, proc.stdout.splitlines()) if m]
    assert {(f, d) for f, d, *_ in rows} == cases
    for f, d, kernel, product, ratio in rows:
        assert float(kernel) > 0 and float(product) > 0, (f, d)
        assert float(ratio) == pytest.approx(float(product) / float(kernel), abs=0.02), (f, d)


def test_harness_rejects_bad_arguments():
    for args in (["4"], ["96", "1", "1", "amx"]):
        proc = subprocess.run(["bash", "scripts/gemm_harness.sh", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2
        assert "usage" in proc.stderr or "lacks AVX-512" in proc.stderr
