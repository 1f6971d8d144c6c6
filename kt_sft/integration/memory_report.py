"""Memory and CPU reports of a kt_sft process (KT_SFT_MEMORY_REPORT): its peak and resident set, the
pack mappings' Rss and Pss, the cores it used; per rank as JSON for the multi-rank tests."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from kt_sft.engine import runtime


def memory_status() -> dict[str, int]:
    """VmHWM (peak resident), VmRSS, RssAnon and RssFile of this process, in KiB (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def pss_kib() -> int | None:
    """Proportional set size of this process in KiB, from /proc/self/smaps_rollup (Linux; None
    elsewhere): a page shared by n processes counts 1/n, so the ranks' Pss add up to the node's use."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mapping_memory(path: str | Path) -> dict[str, int]:
    """Size, Rss and Pss (KiB) of this process's mappings of the file `path`, from /proc/self/smaps
    (Linux; zeros elsewhere). Pss counts a page shared by n processes as 1/n, so the Pss of every
    process that maps a file sums to the file's pages resident once in the page cache."""
    target = os.path.realpath(path)
    out = {"Size": 0, "Rss": 0, "Pss": 0}
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if head and re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):  # a mapping's first line
                    inside = len(head) >= 6 and head[5] == target
                elif inside and head and head[0].rstrip(":") in out:
                    out[head[0].rstrip(":")] += int(head[1])
    except OSError:
        pass
    return out


PACKS: set[str] = set()  # pack files this process serves experts from
PACKS_AT_SYNC: dict[str, dict[str, int]] = {}  # their mapping_memory at the last rank-sync check
# the node-shared expert LoRA (kt_sft.integration.expert_optimizer): its shared file (None: private),
# this rank's AdamW state bytes, the values; "at_sync": the file's mapping_memory at the last rank check
EXPERT_LORA: dict = {}


def note_pack_memory() -> None:
    """Records the packs' Rss / Pss now (KT_SFT_MEMORY_REPORT=<dir> only): called right after a
    collective, while every rank still maps the pack, so the ranks' Pss add up to the pages resident
    once per node (at exit a rank that already left would no longer share them)."""
    if os.path.isdir(os.environ.get("KT_SFT_MEMORY_REPORT", "")):
        PACKS_AT_SYNC.update({p: mapping_memory(p) for p in PACKS})
        if EXPERT_LORA.get("path"):
            EXPERT_LORA["at_sync"] = mapping_memory(EXPERT_LORA["path"])


def report_at_exit() -> None:
    """KT_SFT_MEMORY_REPORT=1: one line at exit; =<existing directory>: also <dir>/rank<RANK>.json
    (the multi-rank tests sum the ranks' pack Pss to show the pack is resident once per node)."""
    from kt_sft.engine import recompute_cache

    mem = memory_status()
    peak_cache = recompute_cache.stats()["peak_bytes"]
    packs = {p: mapping_memory(p) for p in sorted(PACKS)}
    times = os.times()
    cpu = times.user + times.system - _START_CPU  # since this module's import (the model's loading)
    wall = time.time() - _START
    cores = cpu / wall if wall > 0 else 0.0
    print("[kt_sft] memory at exit: " + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in mem.items())
          + f"; checkpoint cache peak {peak_cache / 2**20:.1f} MiB"
          + "".join(f"; pack {Path(p).name} Rss {m['Rss'] / 1024:.0f} MiB, Pss {m['Pss'] / 1024:.0f} MiB"
                    for p, m in packs.items())
          + (f"; expert LoRA {EXPERT_LORA['numel'] * 4 / 2**20:.0f} MiB "
             f"({'shared by the node' if EXPERT_LORA.get('path') else 'this process'}), "
             f"AdamW state here {EXPERT_LORA['state_bytes'] / 2**20:.0f} MiB" if EXPERT_LORA else "")
          + f"; cores used {cores:.2f} (engine threads {runtime.num_threads()}, torch {torch.get_num_threads()})",
          flush=True)
    where = os.environ.get("KT_SFT_MEMORY_REPORT", "")
    if os.path.isdir(where):
        rank = int(os.environ.get("RANK", "0"))
        report = {"rank": rank, "pid": os.getpid(), "status_kib": mem, "packs_kib": packs,
                  "packs_at_last_rank_sync_kib": PACKS_AT_SYNC,
                  "pack_bytes": {p: os.path.getsize(p) for p in packs}, "expert_lora": EXPERT_LORA, "cpu_s": cpu,
                  "wall_s": wall, "cores_used": cores, "engine_threads": runtime.num_threads(),
                  "torch_threads": torch.get_num_threads()}
        Path(where, f"rank{rank}.json").write_text(json.dumps(report, indent=1))


_START = time.time()  # this module's import: when kt_sft loads a model
_START_CPU = os.times().user + os.times().system
