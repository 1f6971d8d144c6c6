"""Output directories that are never seen half-written (`kt-sft convert`, `kt-sft export`).

A run writes into a staging directory `.{name}.tmp-{pid}` beside the output, fsyncs it, and renames
it into place as its last step. Replacing an existing output (--force) first renames the old one
aside (`.{name}.old-{pid}`), so at every instant `out` is either the complete old directory, the
complete new one, or absent; it is never a directory being deleted or filled. A run killed at any
point (kill -9, power loss after the fsyncs) leaves at most these dot-directories; the next run for
the same output removes those whose process is gone, and puts a dead run's `.old-*` back in place
when the output itself is missing (the kill fell between the two renames).

Running out of disk (ENOSPC, a quota, RLIMIT_FSIZE's EFBIG) raises OutOfSpace, which names the
directory and the bytes needed; the staging directory is removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutOfSpace(ValueError):
    """The output did not fit on its filesystem (or under the process's file-size limit)."""


def staging_dir(out: Path) -> Path:
    """A fresh, empty staging directory for `out` (after clearing dead runs' leftovers)."""
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Removes `.{name}.tmp-PID` / `.{name}.old-PID` left by dead runs; returns what it removed.
    A dead run's `.old-PID` is moved back to `out` if `out` is missing."""
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    for entry in sorted(out.parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            entry.rename(out)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up: after this, a power loss cannot turn the
    renamed directory into one holding empty or short files."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def publish_dir(tmp: Path, out: Path, report_name: str, report: dict) -> dict:
    """The last step of an atomic directory write: the report goes into `tmp`, `tmp` is flushed to
    disk, then it replaces `out` (the old `out`, if any, is renamed aside first and deleted last).
    Returns the report."""
    (tmp / report_name).write_text(json.dumps(report, indent=1) + "\n")
    fsync_tree(tmp)
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _remove(old)
        out.rename(old)
    tmp.rename(out)
    _fsync_path(out.parent)
    if old is not None:
        _remove(old)
    return report


def _space_errno(exc: BaseException) -> int | None:
    """ENOSPC/EDQUOT/EFBIG behind `exc`: an OSError's errno, or the "(os error N)" that safetensors'
    Rust writer puts in its SafetensorError message."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in _SPACE_ERRNOS else None
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return int(m.group(1)) if m and int(m.group(1)) in _SPACE_ERRNOS else None


def is_out_of_space(exc: BaseException) -> bool:
    return _space_errno(exc) is not None


def out_of_space(exc: BaseException, where: Path, need_bytes: int | None = None) -> OutOfSpace:
    """The clear error for a failed write; `need_bytes` is the estimate of what the run writes."""
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    parts = [f"ran out of space writing {where} ({os.strerror(_space_errno(exc) or errno.ENOSPC)})"]
    if need_bytes is not None:
        parts.append(f"the output needs about {need_bytes / 2**20:.1f} MiB")
    if free is not None:
        parts.append(f"{free / 2**20:.1f} MiB are free there")
    return OutOfSpace("; ".join(parts) + "; nothing was written (the staging directory was removed)")
