"""Refuse to resume training from a checkpoint whose save was interrupted.

transformers 5.6 writes `checkpoint-N/` in place: weights (adapter_model.safetensors or model
shards), then optimizer.pt, scheduler.pt, rng_state*.pth, and trainer_state.json last. A run killed
during a save leaves a partial `checkpoint-N`, and `get_last_checkpoint` (which LLaMA-Factory calls
when output_dir exists) picks it because it has the highest N. The Trainer then resumes silently
wrong: no trainer_state.json means step 0 with the new weights, a missing optimizer.pt means a fresh
optimizer, a short weight file fails deep inside safetensors.

`install_resume_guard()` wraps `transformers.Trainer.train` so that resuming first checks the
checkpoint (`checkpoint_problems`) and raises IncompleteCheckpoint naming what is missing and the
last complete checkpoint to resume from instead. Converted models install it when they load
(kt_sft/loading.py, which every converted directory's modeling file imports), so `llamafactory-cli
train` gets it with no configuration.
"""

from __future__ import annotations

import functools
import json
import os
import re
import zipfile
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


class IncompleteCheckpoint(ValueError):
    """A checkpoint directory that an interrupted save left behind."""


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            return f"{path.name} is truncated ({size} bytes, header length {n})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    ends = [info["data_offsets"][1] for k, info in header.items()
            if k != "__metadata__" and isinstance(info, dict) and "data_offsets" in info]
    if ends and 8 + n + max(ends) > size:
        return f"{path.name} is truncated (tensors end at byte {8 + n + max(ends)}, file has {size})"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    """torch.save files are zip archives; a short one has no central directory at its end."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{path.name} is truncated or corrupt ({exc})"
    return None


def checkpoint_problems(ckpt: str | os.PathLike) -> list[str]:
    """What makes `ckpt` unusable for resuming; an empty list when it looks complete."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return [f"{ckpt} is not a directory"]
    problems = []
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        problems.append("trainer_state.json is missing (it is written last: the save did not finish)")
    else:
        try:
            step = json.loads(state.read_text()).get("global_step")
        except ValueError:
            problems.append("trainer_state.json is unreadable (cut off mid-write)")
        else:
            m = _CHECKPOINT.match(ckpt.name)
            if m and step != int(m.group(1)):
                problems.append(f"trainer_state.json says step {step}, the directory is {ckpt.name}")
    weights = [ckpt / w for w in _WEIGHTS if (ckpt / w).is_file()]
    shards = sorted(ckpt.glob("model-*.safetensors"))
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            problems.append("model.safetensors.index.json is unreadable")
            names = set()
        problems += [f"weight shard {n} is missing" for n in sorted(names) if not (ckpt / n).is_file()]
    if not weights and not shards and not index.is_file():
        problems.append("no weights (adapter_model.safetensors / model*.safetensors)")
    for f in [*weights, *shards]:
        if f.suffix == ".safetensors":
            p = _safetensors_problem(f)
        else:
            p = _torch_zip_problem(f)
        if p:
            problems.append(p)
    for name in ("optimizer.pt", "scheduler.pt"):
        if (ckpt / name).is_file():
            p = _torch_zip_problem(ckpt / name)
            if p:
                problems.append(p)
    return problems + _expert_optimizer_problems(ckpt)


def _expert_optimizer_problems(ckpt: Path) -> list[str]:
    """kt_sft's expert-LoRA optimizer state (kt_sft.integration.expert_optimizer), when the checkpoint has it."""
    from kt_sft.integration.expert_optimizer import CHECKPOINT_DIR, read_index

    d = ckpt / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    try:
        index = read_index(d)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for name, _, _ in index["shards"]:
        f = d / name
        p = _safetensors_problem(f) if f.is_file() else f"{CHECKPOINT_DIR}/{name} is missing"
        if p:
            problems.append(p)
    return problems


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest-numbered `checkpoint-N` in `output_dir` that checkpoint_problems accepts."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in output_dir.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    return next((p for _, p in found if not checkpoint_problems(p)), None)


def check_resumable(ckpt: str | os.PathLike) -> None:
    """Raises IncompleteCheckpoint (what is wrong, and the checkpoint to use instead) or returns."""
    problems = checkpoint_problems(ckpt)
    if not problems:
        return
    ckpt = Path(ckpt)
    good = last_complete_checkpoint(ckpt.parent)
    hint = (f"the last complete checkpoint is {good}: resume from it (resume_from_checkpoint: {good})"
            if good is not None else "there is no complete checkpoint beside it")
    raise IncompleteCheckpoint(
        f"cannot resume from {ckpt}: it is incomplete, a save was interrupted ({'; '.join(problems)}). "
        f"{hint}, or delete {ckpt.name} so the newest complete one is picked.")


def _restore_on_cpu_index(storage, location: str):
    """torch.load's deserializer for locations "cpu:N". transformers 5.6 resumes a multi-process run with
    map_location=args.device, which is torch.device("cpu", 0) on CPU ranks, and torch only knows "cpu":
    every CPU DDP resume (plain LLaMA-Factory's too) failed with "don't know how to restore data
    location ... (tagged with cpu:0)". None for any other location (torch's own deserializers run)."""
    if location.startswith("cpu:") and location[4:].isdigit():
        return storage.cpu()
    return None


def install_resume_guard() -> None:
    """Makes `transformers.Trainer.train(resume_from_checkpoint=...)` call check_resumable first (and
    lets torch.load restore to "cpu:N", see _restore_on_cpu_index)."""
    import torch
    import transformers

    if not getattr(torch.serialization, "_kt_sft_cpu_index", False):
        torch.serialization.register_package(97, lambda obj: None, _restore_on_cpu_index)
        torch.serialization._kt_sft_cpu_index = True

    orig = transformers.Trainer.train
    if getattr(orig, "_kt_sft_resume_guard", False):
        return

    @functools.wraps(orig)
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, (str, os.PathLike)):
            check_resumable(path)
        return orig(self, resume_from_checkpoint, *args, **kwargs)

    train._kt_sft_resume_guard = True
    transformers.Trainer.train = train
