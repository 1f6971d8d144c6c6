"""atheris harness: the expert pack reader (kt_sft.engine.pack_file.PackFile).

Input: the bytes of a whole .ktpack file (seeds: tests/fuzz/corpus/pack/, small valid packs of each
format from make_seeds.py). The harness opens it (with verify=True for half the inputs: a reader that skips the checksums
must still never hand the kernels a short view), maps every layer and runs one
expert-layer forward on each (so a header that lies about shapes or sizes would make the kernels
read past the map). Allowed outcome for a bad file: ValueError or KeyError naming the problem
(KeyError only from layer lookup). Anything else -- another exception type, a crash, a hang -- is a
finding. Run through scripts/fuzz.sh.
"""

import os
import sys
import tempfile

import atheris
import torch

with atheris.instrument_imports(include=["kt_sft"]):

    from kt_sft.engine import functional as Fn
    from kt_sft.engine.formats import ComputeMode
    from kt_sft.engine.pack_file import PackFile

# scripts/fuzz.sh passes a scratch directory it removes at exit (libFuzzer ends the process without
# running Python's atexit, so a directory made here would outlive the run)
_DIR = tempfile.mkdtemp(prefix="fuzz_pack_", dir=os.environ.get("KT_FUZZ_TMP") or
                        ("/dev/shm" if os.path.isdir("/dev/shm") else None))
_PATH = os.path.join(_DIR, "experts.ktpack")
torch.set_num_threads(1)


def check(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        pack = PackFile(_PATH, verify=bool(data[-1] & 1) if data else True)
    except ValueError:
        return
    try:
        for layer in pack.layers:
            packed = pack.layer(layer)
            e, h = packed.num_experts, packed.hidden_dim
            if e * h > 1 << 16 or packed.intermediate_dim > 1 << 12:
                continue  # valid but too big to run per input
            t = 3
            idx = torch.arange(t, dtype=torch.int64).remainder(e).view(t, 1)
            Fn.moe_forward(packed, torch.ones(t, h), idx, torch.ones(t, 1), ComputeMode.F32, save_for_backward=False)
    finally:
        del pack


def test_one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
