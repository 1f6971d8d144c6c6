"""atheris harness: the checkpoint reading of `kt-sft convert` (config.json + safetensors shards).

Input: [u16 little-endian config length][config.json bytes][one safetensors shard]. The harness
writes them as a model directory in /dev/shm and runs what convert reads before writing anything:
the config's family and sizes (arch_for, num_experts, intermediate_size), TensorIndex over the shard,
every tensor through get() and get_float() (FP8 with its scale blocks), and the MoE-layer scan; a
quarter of the inputs that get that far then run the whole `convert` (writes into /dev/shm).
Allowed outcome for bad input: ValueError, KeyError (a tensor the config promises is missing; the CLI
reports it) or FileNotFoundError. Anything else is a finding. Seeds: make_seeds.py.
"""

import os
import shutil
import sys
import tempfile

import atheris
import torch

with atheris.instrument_imports(include=["kt_sft"]):

    from kt_sft.integration import convert as C

# scripts/fuzz.sh passes a scratch directory it removes at exit (see fuzz_pack.py)
_ROOT = tempfile.mkdtemp(prefix="fuzz_st_", dir=os.environ.get("KT_FUZZ_TMP") or
                         ("/dev/shm" if os.path.isdir("/dev/shm") else None))
_MODEL = os.path.join(_ROOT, "model")
_OUT = os.path.join(_ROOT, "out")
os.makedirs(_MODEL)
torch.set_num_threads(1)
_ALLOWED = (ValueError, KeyError, FileNotFoundError)


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    n = int.from_bytes(data[:2], "little")
    config, shard = data[2 : 2 + n], data[2 + n :]
    with open(os.path.join(_MODEL, "config.json"), "wb") as f:
        f.write(config)
    with open(os.path.join(_MODEL, "model.safetensors"), "wb") as f:
        f.write(shard)
    try:
        _, arch, (num_experts, _, inter, num_layers, block) = C.read_source_config(C.Path(_MODEL))
        index = C.TensorIndex(C.Path(_MODEL))
        for name in list(index.where)[:64]:
            index.get(name)
            if not name.endswith("_scale_inv"):
                index.get_float(name, block)
        layers = C._moe_layers(arch, index, min(num_layers, 64))
        if layers and num_experts * inter < 1 << 16 and data[-1] % 4 == 0:
            C.convert(_MODEL, _OUT, "int8", force=True, progress=False)
    except _ALLOWED:
        pass
    finally:
        shutil.rmtree(_OUT, ignore_errors=True)


def test_one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
