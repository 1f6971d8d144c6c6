"""scripts/loop_check.py: the hot tiles keep their accumulators in registers (docs/engine.md, "The model
missed a store bound"), and the check itself flags a loop that does not."""

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("loop_check", ROOT / "scripts" / "loop_check.py")
loop_check = importlib.util.module_from_spec(_spec)
sys.modules["loop_check"] = loop_check  # dataclasses look their module up
_spec.loader.exec_module(loop_check)

CLEAN = """\
tile:
.L3:
\tvmovaps\t(%rdx), %zmm0
\tvfmadd231ps\t(%rsi){1to16}, %zmm0, %zmm1
\tvfmadd231ps\t4(%rsi){1to16}, %zmm0, %zmm2
\taddq\t$1, %rax
\tcmpq\t%rax, 128(%rsp)
\tjl\t.L3
\tret
"""
# the same loop with one accumulator living in its stack slot, and with copied accumulators
SPILLED = CLEAN.replace("\taddq", "\tvmovaps\t%zmm2, 64(%rsp)\n\taddq")
COPIED = CLEAN.replace("\taddq", "\tvmovaps\t%zmm1, %zmm3\n\tvmovaps\t%zmm2, %zmm4\n\tvmovaps\t%zmm3, %zmm5\n\taddq")


def test_detector_on_written_loops():
    clean = loop_check.hot_loop(loop_check.innermost_loops(CLEAN), "tile")
    assert (clean.dot_ops, clean.stack_refs, clean.moves) == (2, 0, 0)  # the scalar stack compare is not a spill
    assert clean.findings() == []
    spilled = loop_check.hot_loop(loop_check.innermost_loops(SPILLED), "tile")
    assert spilled.stack_refs == 1 and "stack" in spilled.findings()[0]
    copied = loop_check.hot_loop(loop_check.innermost_loops(COPIED), "tile")
    assert copied.moves == 3 and "copies" in copied.findings()[0]
    assert loop_check.hot_loop(loop_check.innermost_loops(CLEAN), "other") is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("gcc") is None,
                    reason="compiles the x86 kernels with gcc")
def test_hot_tiles_keep_accumulators_in_registers():
    report = loop_check.check(loop_check.DEFAULT)
    assert len(report) == len(loop_check.DEFAULT)
    assert not [line for line in report if line.startswith("FAIL")], "\n".join(report)
