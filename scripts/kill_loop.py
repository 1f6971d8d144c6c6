"""kill -9 at random points of `kt-sft convert` and `kt-sft export` (issue #15, crash safety).

    .venv/bin/python scripts/kill_loop.py --trials 50 --work /tmp/kill_loop [--which convert export]

Builds one tiny fixture model (kt_sft.fixtures) and, for export, its conversion. Each trial starts the
CLI as a subprocess writing to an output that already holds a complete older result (so --force's
replacement path is exercised too), kills it with SIGKILL after a random delay drawn across the
command's measured run time, and then checks:
  - the output is either absent, the complete old result, or the complete new one: a directory that
    exists must pass `kt-sft verify` (convert) and hold its report, config and every weight file;
  - a rerun succeeds and leaves no `.NAME.tmp-*` / `.NAME.old-*` directories behind.
Prints a JSON summary (trials, kills that landed mid-run, outcomes, failures) and exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "kt_sft"]


def _complete(out: Path, kind: str) -> tuple[bool, str]:
    report = out / ("kt_sft_convert.json" if kind == "convert" else "kt_sft_export.json")
    if not report.is_file():
        return False, "no report"
    try:
        json.loads(report.read_text())
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return False, f"unreadable report/config: {exc}"
    if kind == "convert":
        if "kt_sft" not in config:
            return False, "config without kt_sft block"
        r = subprocess.run(CLI + ["verify", str(out)], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            return False, "verify failed: " + r.stdout.strip()
    index = out / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    for name in files:
        f = out / name
        if not f.is_file():
            return False, f"missing {name}"
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    st.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - any unreadable shard is a failure
            return False, f"unreadable {name}: {exc}"
    return True, "complete"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def _cmd(kind: str, src: Path, out: Path) -> list[str]:
    if kind == "convert":
        return CLI + ["convert", "--model", str(src), "--out", str(out), "--format", "int4", "--force", "--quiet"]
    return CLI + ["export", "--model", str(src), "--out", str(out), "--dtype", "bf16", "--force", "--quiet"]


def run_trials(kind: str, src: Path, work: Path, trials: int, rng: random.Random, rerun_every: int = 5) -> dict:
    out = work / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(_cmd(kind, src, out), check=True, capture_output=True)
    duration = time.perf_counter() - t0
    stats = {"trials": trials, "reruns_checked": 0, "run_seconds": round(duration, 2), "killed_mid_run": 0, "finished_before_kill": 0,
             "outcomes": {}, "failures": []}
    for trial in range(trials):
        proc = subprocess.Popen(_cmd(kind, src, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # half the kills anywhere in the run, half in its last 40% (where the files are written)
        time.sleep(rng.uniform(0.0 if trial % 2 else 0.6 * duration, duration * 1.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            stats["killed_mid_run"] += 1
        else:
            stats["finished_before_kill"] += 1
        proc.wait()
        if out.exists():
            ok, why = _complete(out, kind)
            outcome = "complete" if ok else "INCOMPLETE"
        else:
            ok, why, outcome = True, "absent", "absent"
        stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1
        if not ok:
            stats["failures"].append({"trial": trial, "problem": why, "leftovers": _leftovers(out)})
        # a rerun succeeds and cleans up after the dead runs (every `rerun_every` trials and at the end;
        # each next trial also starts over what the dead one left)
        if (trial + 1) % rerun_every and trial != trials - 1:
            continue
        r = subprocess.run(_cmd(kind, src, out), check=False, capture_output=True, text=True)
        left = _leftovers(out)
        stats["reruns_checked"] += 1
        if r.returncode != 0 or left or not _complete(out, kind)[0]:
            stats["failures"].append({"trial": trial, "problem": "rerun", "rc": r.returncode,
                                      "stderr": r.stderr[-500:], "leftovers": left})
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--work", default="/tmp/kt_kill_loop")
    ap.add_argument("--which", nargs="+", default=["convert", "export"], choices=["convert", "export"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from kt_sft.fixtures import build_fixtures
    from kt_sft.integration.convert import convert

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    arch = "qwen3_moe"
    if not (work / "fx" / "models" / arch / "config.json").is_file():
        build_fixtures(work / "fx", archs=[arch], log=None)
    src = work / "fx" / "models" / arch
    kt = work / "kt"
    if not (kt / "kt_sft_convert.json").is_file():
        convert(src, kt, "int8", force=True, progress=False)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    summary = {kind: run_trials(kind, src if kind == "convert" else kt, work, args.trials, rng) for kind in args.which}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=1))
    return 1 if any(s["failures"] for k, s in summary.items() if k != "seconds") else 0


if __name__ == "__main__":
    os.environ.setdefault("KT_SFT_NUM_THREADS", "1")
    sys.exit(main())
