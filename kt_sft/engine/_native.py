"""Loads the compiled cffi module. Importing never fails: without the extension, a stand-in whose
attributes raise a RuntimeError explaining how to build it takes its place."""

from __future__ import annotations

_IMPORT_ERROR: Exception | None = None

try:
    from kt_sft._kt_native import ffi, lib  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _IMPORT_ERROR = exc

    class _MissingNative:
        def __getattr__(self, name: str):
            raise RuntimeError(
                f"kt_sft's native engine is not built (needed for `{name}`): {_IMPORT_ERROR}. "
                "Reinstall with `pip install -e .` from the project root (needs gcc and the Python headers)."
            )

    ffi = _MissingNative()
    lib = _MissingNative()


def available() -> bool:
    return _IMPORT_ERROR is None


def check(rc: int, what: str) -> None:
    """Turns a C return code into a Python exception carrying the C-side message."""
    if rc != 0:
        msg = ffi.string(lib.kt_last_error()).decode(errors="replace")
        exc = MemoryError if rc == lib.KT_ENOMEM else (NotImplementedError if rc == lib.KT_EUNSUPPORTED else ValueError)
        raise exc(f"{what} failed: {msg}")
