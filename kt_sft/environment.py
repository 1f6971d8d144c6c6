"""What this machine and install look like: CPU, memory, package versions, git state, engine.

Shared by `kt-sft doctor` and the benchmarks (whose JSON records the same facts). Every probe
tolerates failure and says so in its value: a report must never crash because /proc or git is missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from kt_sft.engine import _native

_REPO_ROOT = Path(__file__).resolve().parent.parent
_VERSIONED_PACKAGES = ("kt_sft", "torch", "transformers", "cffi", "numpy", "tqdm")
_ENV_VARS = ("KT_SFT_ISA", "KT_SFT_NUM_THREADS", "KT_SFT_BF16_DOT", "KT_SFT_EXPERT_OPTIMIZER", "OMP_NUM_THREADS")


def cpu_model() -> str | None:
    """`model name` from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def meminfo_gib() -> dict[str, float | None]:
    """MemTotal and MemAvailable from /proc/meminfo, in GiB (None where unreadable)."""
    out: dict[str, float | None] = {"total_gib": None, "available_gib": None}
    keys = {"MemTotal": "total_gib", "MemAvailable": "available_gib"}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[keys[name]] = round(int(rest.split()[0]) / 2**20, 2)  # the file says kB
    except (OSError, ValueError, IndexError):
        pass
    return out


def usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Installed versions read from package metadata (no heavy imports), plus Python's; `extra` names more
    packages (a benchmark's own stack)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*_VERSIONED_PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(repo: Path = _REPO_ROOT) -> dict:
    """{'commit', 'dirty', 'changed'} of the checkout holding kt_sft; 'error' instead when git fails
    (not a checkout, git missing). Untracked, non-ignored files count as dirty."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True,
                              check=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        return {"commit": None, "dirty": None, "error": detail.strip()}
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}


def machine() -> dict:
    """The hardware facts a benchmark result depends on. cpu_flags come from the engine's own CPUID
    probe, so they name what the kernels can use, not everything the CPU has."""
    info = {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "nproc": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory": meminfo_gib(),
        "os": platform.platform(),
    }
    info["cpu_flags"] = engine_report().get("cpu_flags")
    return info


def engine_report(self_check: bool = False) -> dict:
    """engine_info() plus whether the native module loaded; the load error instead of a crash. With
    self_check, the chosen path is first checked against scalar (as training does before first use)
    and the paths that failed are listed with their errors."""
    from kt_sft import engine

    if not _native.available():
        return {"native_loaded": False, "native_error": str(_native._IMPORT_ERROR)}
    if not self_check:
        return {"native_loaded": True, **engine.engine_info()}
    from kt_sft.engine import functional

    functional.verify_kernel_path()
    return {"native_loaded": True, **engine.engine_info(), "self_check_failures": dict(functional.SELF_CHECK_FAILURES)}


def peak_report(seconds: float = 0.25) -> dict:
    """Each instruction's measured peak (G ops/s on the engine's threads) and, per compute mode of the
    chosen path, which one bounds it."""
    from kt_sft.engine import runtime

    path = runtime.kernel_path()
    return {
        "threads": runtime.lib.kt_get_num_threads(),
        "gops": runtime.measure_peaks(seconds),
        "bound_by": {mode: runtime.peak_instruction(path, mode) for mode in ("f32", "bf16", "int8")},
    }


def shared_memory() -> dict:
    """Where several ranks of a node keep their one copy of the expert LoRA (kt_sft.integration.expert_optimizer),
    and how much room is free there."""
    from kt_sft.integration import expert_optimizer

    where = expert_optimizer.SHM_DIR if os.path.isdir(expert_optimizer.SHM_DIR) else tempfile.gettempdir()
    try:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize / 2**30
    except OSError:
        free = None
    return {"dir": where, "free_gib": free}


def doctor_report(peak: bool = False) -> dict:
    report = {
        "engine": engine_report(self_check=True),
        "machine": {k: v for k, v in machine().items() if k != "cpu_flags"},
        "versions": versions(),
        "shared_memory": shared_memory(),
        "env": {name: os.environ[name] for name in _ENV_VARS if name in os.environ},
        "python_executable": sys.executable,
    }
    if peak and report["engine"]["native_loaded"]:
        report["peak"] = peak_report()
    return report


def _bf16_dot_line(eng: dict) -> str:
    """How the avx512 path multiplies bf16 packs in the bf16 mode, and why."""
    ratio, forced = eng.get("bf16_dot_ratio"), os.environ.get("KT_SFT_BF16_DOT")
    if ratio is None:
        return "zmm FMA on the avx512 path (no AVX512-BF16)"
    name = "vdpbf16ps" if eng["bf16_dot"] == "dpbf16" else "zmm FMA"
    why = f"set by KT_SFT_BF16_DOT={forced}" if forced in ("fma", "dpbf16") else "chosen: vdpbf16ps needs >= 1.3x"
    return f"{name} on the avx512 path (vdpbf16ps runs {ratio:.2f}x the zmm FMA's multiply-adds here; {why})"


def format_doctor_report(report: dict) -> str:
    eng, mach, ver = report["engine"], report["machine"], report["versions"]
    mem = mach["memory"]

    def gib(v: float | None) -> str:
        return "?" if v is None else f"{v:.1f} GiB"

    if eng["native_loaded"]:
        lines = [
            f"native engine     loaded (abi {eng['abi_version']})",
            f"kernel path       {eng['kernel_path']}",
            f"available paths   {', '.join(eng['available_kernel_paths'])}",
            f"threads           {eng['threads']}",
            f"cpu flags         {' '.join(eng['cpu_flags']) or '(none of those the engine probes)'}",
            f"bf16 products     {_bf16_dot_line(eng)}",
        ]
    else:
        lines = [f"native engine     NOT LOADED: {eng['native_error']}"]
    lines += [
        f"cpu               {mach['cpu_model'] or '?'} ({mach['arch']})",
        f"cpus              {mach['nproc']} ({mach['usable_cpus']} usable by this process)",
        f"memory            {gib(mem['total_gib'])} total, {gib(mem['available_gib'])} available",
        (f"shared memory     {report['shared_memory']['dir']}: {gib(report['shared_memory']['free_gib'])} free "
         "(several ranks per node keep one copy of the expert LoRA there, 4 bytes per value)"),
        "versions          " + ", ".join(f"{k} {v or 'not installed'}" for k, v in ver.items()),
    ]
    if report["env"]:
        lines.append("environment       " + " ".join(f"{k}={v}" for k, v in report["env"].items()))
    for name, bad in eng.get("self_check_failures", {}).items():
        lines.append(f"self-check        path {name!r} FAILED against scalar (relative error by mode {bad}); "
                     "it is not used")
    if "peak" in report:
        pk = report["peak"]
        lines.append(f"peak (G ops/s, {pk['threads']} threads; a multiply-add is 2)")
        for name, v in pk["gops"].items():
            bounds = [m for m, b in pk["bound_by"].items() if b == name]
            mark = f"   <- bounds {eng['kernel_path']} {', '.join(bounds)} mode" if bounds else ""
            lines.append(f"  {name:<15} {'not on this CPU' if v is None else f'{v:8.1f}'}{mark}")
    return "\n".join(lines)
