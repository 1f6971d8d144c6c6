"""Crash safety of the files kt_sft writes (issue #15, item 3): converted and exported directories
appear only complete, dead runs' leftovers are cleaned, a full disk is a clear error, and resuming
from a checkpoint whose save was interrupted is refused with the checkpoint to use instead.
The kill -9 campaign itself is scripts/kill_loop.py (50+ trials each, docs/reliability.md)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from kt_sft.fixtures import build_fixtures
from kt_sft.integration import atomic_dir
from kt_sft.integration.checkpoints import (
    IncompleteCheckpoint,
    check_resumable,
    checkpoint_problems,
    install_resume_guard,
    last_complete_checkpoint,
)
from kt_sft.integration.convert import convert

DEAD_PID = 2**22 + 12345  # above the default pid_max: never a live process


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    build_fixtures(root, archs=["qwen3_moe"], log=None)
    return root / "models" / "qwen3_moe"


def test_rerun_removes_dead_runs_leftovers(model_dir, tmp_path):
    out = tmp_path / "kt"
    for name in (f".kt.tmp-{DEAD_PID}", f".kt.old-{DEAD_PID + 1}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "experts.ktpack").write_bytes(b"\0" * 100)
    convert(model_dir, out, "int8", progress=False)
    leftovers = sorted(p.name for p in tmp_path.glob(".kt.*"))
    assert leftovers == [], leftovers


def test_dead_run_between_the_renames_gets_its_old_output_back(model_dir, tmp_path):
    """Killed after moving the old output aside but before the new one moved in: the next look at
    the directory restores the old one."""
    out = tmp_path / "kt"
    convert(model_dir, out, "int8", progress=False)
    out.rename(tmp_path / f".kt.old-{DEAD_PID}")
    atomic_dir.clean_stale(out)
    assert (out / "kt_sft_convert.json").is_file()


def test_force_replaces_an_existing_output(model_dir, tmp_path):
    out = tmp_path / "kt"
    convert(model_dir, out, "int8", progress=False)
    report = convert(model_dir, out, "int4", force=True, progress=False)
    assert report["format"] == "int4" and json.loads((out / "kt_sft_convert.json").read_text())["format"] == "int4"
    assert not list(tmp_path.glob(".kt.*"))


def test_disk_full_is_a_clear_error_and_leaves_nothing(model_dir, tmp_path):
    """RLIMIT_FSIZE (EFBIG, like a full disk without mounting a small tmpfs) in a child process."""
    out = tmp_path / "kt"
    code = (
        "import sys, resource\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from kt_sft.cli import main\n"
        f"sys.exit(main(['convert', '--model', {str(model_dir)!r}, '--out', {str(out)!r}, '--quiet']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ran out of space writing" in r.stderr and "nothing was written" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".kt.*"))


def test_disk_check_before_writing(model_dir, tmp_path, monkeypatch):
    """Free space clearly below the output's size: refused before any byte is written."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(atomic_dir.OutOfSpace, match="ran out of space.*MiB"):
        convert(model_dir, tmp_path / "kt", "int8", progress=False)
    assert not list(tmp_path.iterdir())


# ---- training checkpoints ---------------------------------------------------------------------


def _checkpoint(root, step, *, state=True, optimizer=True, cut_weights=False):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    save_file({"w": torch.ones(64, 64)}, str(d / "adapter_model.safetensors"))
    if cut_weights:
        data = (d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    if optimizer:
        torch.save({"state": {}}, d / "optimizer.pt")
    if state:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_complete_checkpoint_passes(tmp_path):
    assert checkpoint_problems(_checkpoint(tmp_path, 10)) == []


@pytest.mark.parametrize("damage, message", [
    ({"state": False}, "trainer_state.json is missing"),
    ({"cut_weights": True}, "adapter_model.safetensors is truncated"),
])
def test_partial_checkpoint_is_named(tmp_path, damage, message):
    good = _checkpoint(tmp_path, 10)
    bad = _checkpoint(tmp_path, 20, **damage)
    assert any(message in p for p in checkpoint_problems(bad))
    assert last_complete_checkpoint(tmp_path) == good
    with pytest.raises(IncompleteCheckpoint, match=f"{message}.*last complete checkpoint is {good}"):
        check_resumable(bad)


def test_truncated_optimizer_state(tmp_path):
    d = _checkpoint(tmp_path, 5)
    data = (d / "optimizer.pt").read_bytes()
    (d / "optimizer.pt").write_bytes(data[:-40])
    assert any("optimizer.pt is truncated" in p for p in checkpoint_problems(d))
    assert last_complete_checkpoint(tmp_path) is None


def test_trainer_resume_is_guarded(tmp_path):
    """Trainer.train(resume_from_checkpoint=<partial>) raises before touching the model."""
    import transformers

    install_resume_guard()
    install_resume_guard()  # idempotent
    _checkpoint(tmp_path, 10)
    bad = _checkpoint(tmp_path, 20, state=False)

    class Args:
        output_dir = str(tmp_path)

    class FakeTrainer:
        args = Args()

    with pytest.raises(IncompleteCheckpoint, match="checkpoint-20"):
        transformers.Trainer.train(FakeTrainer(), resume_from_checkpoint=str(bad))
    with pytest.raises(IncompleteCheckpoint, match="checkpoint-20"):
        transformers.Trainer.train(FakeTrainer(), resume_from_checkpoint=True)  # get_last_checkpoint's pick


def test_converted_model_load_installs_the_guard():
    import transformers

    import kt_sft.loading  # noqa: F401 - what every converted directory's modeling file imports

    assert getattr(transformers.Trainer.train, "_kt_sft_resume_guard", False)
