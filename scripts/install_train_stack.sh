#!/usr/bin/env bash
# Installs the training stack (LLaMA-Factory 0.9.5 + peft, accelerate, datasets, trl, deepspeed,
# bitsandbytes, matplotlib) into an existing venv, at the exact CPU-safe pins of constraints-cpu.txt,
# without ever pulling a CUDA torch. Idempotent: a second run only checks and verifies (~15-25 s).
#
#   bash scripts/install_train_stack.sh [VENV]        # VENV defaults to ./.venv
#   KT_SFT_FORCE_INSTALL=1 bash scripts/install_train_stack.sh   # re-run pip even if the pins are met
#
# Timing (2-core machine, torch already in the venv): ~1.7 min with a warm pip cache, ~5 min cold
# (deepspeed is an sdist and is built once; ~115 packages in all). Already installed: ~15-25 s, all
# of it the import check and `llamafactory-cli version`.
#
# Why it is not a plain `pip install llamafactory`:
# - llamafactory requires torchvision and torchaudio. PyPI has no torchaudio for torch 2.13 (the
#   newest is 2.11.x, pinned to torch 2.11), so with torch pinned the resolver fails outright; and the
#   torchvision wheel pip finds is a CUDA build whose import fails against the CPU torch
#   ("operator torchvision::nms does not exist"), which breaks `import transformers` too.
# - So: llamafactory goes in with --no-deps, then its own requirements read from its metadata minus
#   torchvision/torchaudio. torchvision stays uninstalled (LLaMA-Factory never imports it for text
#   models; transformers treats it as absent). torchaudio, which llamafactory/data/mm_plugin.py
#   imports at top level (only used to load audio files), is replaced by a stub distribution that
#   this script writes: `import torchaudio` works, its two used functions raise a RuntimeError that
#   names the cause, and pip sees `torchaudio` installed, so later installs do not pull a real one.
# Consequence: `pip check` reports "llamafactory requires torchvision, which is not installed". That
# is expected.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-./.venv}
PY="$VENV/bin/python"
CONSTRAINTS="$REPO/constraints-cpu.txt"
STUB_VERSION="2.13.0+ktsft.stub2"  # satisfies llamafactory's torchaudio>=2.4.0; the label marks the stub
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")

if [ ! -x "$PY" ]; then
  echo "[train-stack] no venv at $VENV (create it first: bash scripts/setup_env.sh)" >&2
  exit 1
fi

# Exact pins of every top-level package this stack needs, read from the constraints file so the
# versions live in one place.
pinned() { grep -E "^$1==" "$CONSTRAINTS" | head -n1; }
TOP=(llamafactory peft accelerate datasets trl deepspeed bitsandbytes matplotlib gradio)
for p in torch transformers "${TOP[@]}"; do
  if [ -z "$(pinned "$p")" ]; then
    echo "[train-stack] $CONSTRAINTS has no exact pin for $p" >&2
    exit 1
  fi
done

# Fast path: every pin already installed, torchaudio is our stub, torchvision absent.
already_installed() {
  "$PY" - "$CONSTRAINTS" "$STUB_VERSION" "torch transformers ${TOP[*]}" <<'EOF'
import importlib.metadata as md, re, sys
constraints, stub, names = sys.argv[1], sys.argv[2], sys.argv[3].split()
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(constraints).read(), re.M))
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
ok = all(version(n) is not None and version(n).split("+")[0] == pins[n].split("+")[0] for n in names)
ok = ok and version("torchaudio") == stub and version("torchvision") is None
sys.exit(0 if ok else 1)
EOF
}

if [ "${KT_SFT_FORCE_INSTALL:-0}" != 1 ] && already_installed; then
  echo "[train-stack] already installed in $VENV"
else
  echo "[train-stack] installing into $VENV (pins from $(basename "$CONSTRAINTS"))"
  # 1. torch first, pinned: the local CPU wheel. A no-op when it is there.
  "${PIP[@]}" "$(pinned torch)" "$(pinned transformers)"

  # 2. torchvision out (a CUDA build breaks `import transformers`).
  if "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
    "$PY" -m pip uninstall -q -y torchvision
  fi

  # 3. the torchaudio stub, as a real wheel so pip records (and can uninstall) it.
  HAVE_AUDIO=$("$PY" -c 'import importlib.metadata as m; print(m.version("torchaudio"))' 2>/dev/null || true)
  if [ "$HAVE_AUDIO" != "$STUB_VERSION" ]; then
    STUB_DIR=$(mktemp -d)
    trap 'rm -rf "$STUB_DIR"' EXIT
    "$PY" - "$STUB_DIR" "$STUB_VERSION" <<'EOF'
import base64, hashlib, sys, zipfile
out, version = sys.argv[1], sys.argv[2]
init = f'''"""Stand-in for torchaudio, written by kt_sft's scripts/install_train_stack.sh.

PyPI has no torchaudio build for this CPU torch; LLaMA-Factory imports torchaudio at top level but
uses it only to load and resample audio files, which text fine-tuning never does.
"""
__version__ = "{version}"

def _unavailable(*args, **kwargs):
    raise RuntimeError(
        "torchaudio is a stub in this environment (installed by kt_sft's install_train_stack.sh: "
        "no torchaudio wheel matches the CPU torch). Audio datasets are not supported here."
    )

load = _unavailable
save = _unavailable
info = _unavailable

from torchaudio import functional  # noqa: E402  (torchaudio.functional.resample raises the same error)
'''
functional = "from torchaudio import _unavailable as resample  # noqa: F401\n"
name = "torchaudio"
dist = f"{name}-{version}.dist-info"
files = {
    f"{name}/__init__.py": init,
    f"{name}/functional.py": functional,
    f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    "Summary: kt_sft stand-in for torchaudio (no native library; audio I/O raises)\n",
    f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: kt_sft\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
def digest(text):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
record = "".join(f"{path},{digest(text)},{len(text.encode())}\n" for path, text in files.items())
files[f"{dist}/RECORD"] = record + f"{dist}/RECORD,,\n"
with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as whl:
    for path, text in files.items():
        whl.writestr(path, text)
EOF
    "$PY" -m pip install -q --no-deps --force-reinstall "$STUB_DIR"/torchaudio-*.whl
  fi

  # 4. llamafactory without its deps, then its real requirements minus torchvision/torchaudio,
  #    plus the rest of the stack, all in one resolve under the constraints.
  "${PIP[@]}" --no-deps "$(pinned llamafactory)"
  mapfile -t LF_REQS < <("$PY" - <<'EOF'
import importlib.metadata as md, re
for req in md.requires("llamafactory") or []:
    if "extra ==" in req:
        continue
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
    if name not in ("torchvision", "torchaudio"):
        print(req.split(";")[0].strip())
EOF
  )
  PINS=()
  for p in "${TOP[@]}"; do PINS+=("$(pinned "$p")"); done
  "${PIP[@]}" "${LF_REQS[@]}" "${PINS[@]}"

  # 5. a dependency of a dependency may have dragged torchvision back in.
  if "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
    "$PY" -m pip uninstall -q -y torchvision
  fi
  already_installed || { echo "[train-stack] pins not met after install (see pip list)" >&2; exit 1; }
fi

# Verify: the imports the training path needs (mm_plugin is the torchaudio import site), and the CLI.
VERIFY='
import llamafactory, transformers, peft, accelerate, datasets, trl, deepspeed, bitsandbytes, torch
from llamafactory.data import mm_plugin
print(" | ".join(f"{m.__name__} {m.__version__}" for m in
      (llamafactory, transformers, peft, accelerate, datasets, trl, deepspeed, bitsandbytes, torch)))
'
if ! VERSIONS=$("$PY" -c "$VERIFY" 2>&1); then
  echo "[train-stack] import check failed:" >&2; echo "$VERSIONS" >&2; exit 1
fi
echo "[train-stack] ${VERSIONS##*$'\n'}"
if ! "$VENV/bin/llamafactory-cli" version >/dev/null; then
  echo "[train-stack] llamafactory-cli version failed" >&2
  exit 1
fi
echo "[train-stack] ok: llamafactory-cli version runs"
