"""Static check of the hot loops' register allocation: no accumulator kept in memory.

Compiles a kernel source to assembly with the build's flags and, for each named function, finds its
innermost loops and takes the one with the most dot-product instructions (vfmadd*, vdpbf16ps,
vpdpbusd, vpmaddwd). That loop must not touch a vector register's stack slot (a spilled or
memory-held accumulator) and may copy vector registers at most max(2, dot ops / 8) times per
iteration. Neither shows in llvm-mca's verdict when the model's own bound hides it: in session 14
the int8 mode's 12 x 32 vpdpbusd tile stored its 24 accumulators every step (gcc kept the `acc`
array on the stack) and ran at 29% of the vpdpbusd peak on a Zen 4, while scripts/kernel_mca.sh
rated the loop 100% of its bound (docs/engine.md, "The model missed a store bound").

    .venv/bin/python scripts/loop_check.py            # the default list below; exit 1 on a finding
    .venv/bin/python scripts/loop_check.py native/kt_kernels_avx512.c nt_q8_int8_tile_12
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CFLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-Wno-psabi"]  # native/build_ffi.py's, less warnings

# (source, function): the tiles every path's hot products run in.
DEFAULT = (
    ("native/kt_kernels_avx512.c", "ukernel_packed_12"),  # fp32 / bf16-mode FMA tile, 12 x 32
    ("native/kt_kernels_avx512.c", "ukernel_dp_12"),  # vdpbf16ps tile
    ("native/kt_kernels_avx512.c", "ukernel_dp_fold_6"),  # vdpbf16ps, int4 blocks folded in registers
    ("native/kt_kernels_avx512.c", "ukernel_lanes_8_3"),  # vdpbf16ps, bf16 pack nt, tokens in the lanes
    ("native/kt_kernels_avx512.c", "nt_q8_int8_tile_12"),  # int8 mode, vpdpbusd
    ("native/kt_kernels_avx512.c", "tn_q8_tile_12"),
    ("native/kt_kernels_avx512.c", "nt_q8_int4_tile_6"),
    ("native/kt_kernels_avx512.c", "nt_dot_bf16"),  # few-token dot forms
    ("native/kt_kernels_avx512.c", "nt_dot_int8"),
    ("native/kt_kernels_avx2.c", "q_nt_int8_tile_6"),  # vpmaddwd int8 mode
    ("native/kt_kernels_avx2.c", "q_tn_tile_6"),
    ("native/kt_kernels_avx2.c", "v_nt_int8_tile_6"),  # avx-vnni
    ("native/kt_kernels_avx2.c", "v_tn_tile_6"),
)

DOT = re.compile(r"\b(vfn?madd\w*|vdpbf16ps|vpdpbusds?|vpmaddwd)\b")
VEC_STACK = re.compile(r"%[xyz]mm\d+.*\(%[re]sp\)|\(%[re]sp\).*%[xyz]mm\d+")
VEC_MOVE = re.compile(r"^\s*vmov\w*\s+%[xyz]mm\d+,\s*%[xyz]mm\d+\s*$")
LABEL = re.compile(r"^(\.L\w+):")
FUNC = re.compile(r"^([A-Za-z_]\w*):")
JUMP = re.compile(r"^\s*j\w+\s+(\.L\w+)")


@dataclasses.dataclass
class Loop:
    function: str
    dot_ops: int
    stack_refs: int
    moves: int
    lines: list[str]

    def findings(self) -> list[str]:
        out = []
        if self.stack_refs:
            out.append(f"{self.stack_refs} vector stack access(es) per iteration")
        if self.moves > max(2, self.dot_ops // 8):
            out.append(f"{self.moves} vector register copies per iteration beside {self.dot_ops} dot ops")
        return out


def innermost_loops(asm: str) -> list[Loop]:
    """Every backward jump whose body holds no other label: an innermost loop, with its function."""
    lines = [ln.split("#")[0].rstrip() for ln in asm.splitlines()]
    func, labels, loops = None, {}, []
    for i, line in enumerate(lines):
        if (m := FUNC.match(line)) and not line.startswith("."):
            func = m.group(1)
        if m := LABEL.match(line):
            labels[m.group(1)] = (i, func)
        m = JUMP.match(line)
        if not m or m.group(1) not in labels:
            continue
        start, owner = labels[m.group(1)]
        body = lines[start + 1 : i + 1]
        if start >= i or owner != func or any(LABEL.match(b) for b in body):
            continue
        loops.append(Loop(func, sum(bool(DOT.search(b)) for b in body), sum(bool(VEC_STACK.search(b)) for b in body),
                          sum(bool(VEC_MOVE.match(b)) for b in body), body))
    return loops


def hot_loop(loops: list[Loop], function: str) -> Loop | None:
    """The function's innermost loop with the most dot-product instructions (None: it has none)."""
    own = [lp for lp in loops if lp.function == function and lp.dot_ops]
    return max(own, key=lambda lp: lp.dot_ops) if own else None


def compile_asm(source: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.s"
        subprocess.run(["gcc", *CFLAGS, f"-I{ROOT / 'native'}", "-S", str(ROOT / source), "-o", str(out)],
                       check=True)
        return out.read_text()


def check(pairs) -> list[str]:
    """One line per (source, function): its hot loop's counts, and FAIL with the reasons where any."""
    report, cache = [], {}
    for source, function in pairs:
        if source not in cache:
            cache[source] = innermost_loops(compile_asm(source))
        loop = hot_loop(cache[source], function)
        if loop is None:
            report.append(f"FAIL {source}:{function}: no loop with dot-product instructions (renamed or inlined?)")
            continue
        found = loop.findings()
        status = "FAIL" if found else "ok  "
        report.append(f"{status} {source}:{function}: {loop.dot_ops} dot ops, {loop.stack_refs} vector stack "
                      f"accesses, {loop.moves} vector copies per iteration" + (f" -- {'; '.join(found)}" if found else ""))
    return report


def main(argv: list[str]) -> int:
    args = argv[1:]
    if len(args) not in (0, 2):
        print(__doc__, file=sys.stderr)
        return 2
    report = check(DEFAULT if not args else [tuple(args)])
    print("\n".join(report))
    return 1 if any(r.startswith("FAIL") for r in report) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
