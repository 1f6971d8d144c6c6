"""One minimized test per fuzz finding (issue #15; docs/reliability.md lists them). The raw inputs
that found them are in tests/fuzz/corpus/*/regression-* and replay with `scripts/fuzz.sh --regress`."""

import json
import math
import struct

import pytest
import torch
from helpers import distinct_routing, random_experts, write_pack

import kt_sft
from kt_sft.engine import functional as Fn
from kt_sft.engine import runtime
from kt_sft.engine._native import ffi, lib
from kt_sft.engine.formats import ComputeMode
from kt_sft.engine.pack_file import MAGIC, PackFile
from kt_sft.integration.convert import TensorIndex, convert, read_source_config


def _pack(path):
    write_pack(path, "int8", [0, 1], e=2, h=8, inter=4, arch="qwen3_moe")
    return path


def _rewrite_header(path, edit):
    """Applies edit(dict) to the pack's JSON header in place (same reserved space)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    edit(header)
    text = json.dumps(header).encode()
    reserve = header.get("data_offset", 8192) if isinstance(header.get("data_offset"), int) else 8192
    data[8 : min(reserve, len(data))] = struct.pack("<I", len(text)) + text + b" " * (min(reserve, len(data)) - 12 - len(text))
    path.write_bytes(bytes(data))


# ---- pack reader (fuzz_pack) -------------------------------------------------------------------


def test_pack_layer_with_wrong_tensor_names(tmp_path):
    """Found by fuzz_pack: a layer holding {"gate_uq", "down"} raised KeyError('gate_up') from layer()."""
    path = _pack(tmp_path / "p.ktpack")
    _rewrite_header(path, lambda h: h["layers"]["0"].update(gate_uq=h["layers"]["0"].pop("gate_up")))
    with pytest.raises(ValueError, match="layer 0 must hold exactly"):
        PackFile(path)


@pytest.mark.parametrize("verify", [False, True])
def test_pack_header_that_lies_about_sizes(tmp_path, verify):
    """A header whose hidden_size is larger than the bytes stored: without the check, layer() handed the
    kernels views shorter than they read (verify=False skips the CRCs, so sizes must be checked anyway)."""
    path = _pack(tmp_path / "p.ktpack")
    _rewrite_header(path, lambda h: h.update(hidden_size=4096))
    with pytest.raises(ValueError, match="bytes, .* expected for int8 E=2 H=4096"):
        PackFile(path, verify=verify)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["layers"]["1"]["down"].update(offset=h["layers"]["1"]["gate_up"]["offset"]), "overlaps|offset"),
    (lambda h: h["layers"]["0"]["down"].update(offset=12), "before the data"),
    (lambda h: h.update(num_experts="2"), "num_experts"),
    (lambda h: h.update(num_experts=True), "num_experts"),
    (lambda h: h.update(format="int3"), "int3"),
    (lambda h: h.update(layers=[]), "unreadable pack header"),
    (lambda h: h["layers"]["0"]["down"].update(crc32=-1), "non-integer fields"),
])
def test_pack_header_schema(tmp_path, edit, message):
    path = _pack(tmp_path / "p.ktpack")
    _rewrite_header(path, edit)
    with pytest.raises(ValueError, match=message):
        PackFile(path)


def test_pack_header_not_an_object(tmp_path):
    path = tmp_path / "p.ktpack"
    text = b"[1, 2]"
    path.write_bytes(MAGIC + struct.pack("<I", len(text)) + text)
    with pytest.raises(ValueError, match="unreadable pack header"):
        PackFile(path)


# ---- checkpoint reading (fuzz_safetensors) ------------------------------------------------------


def _shard(path, header: dict, payload: bytes = b""):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


@pytest.mark.parametrize("entry, message", [
    # found by fuzz_safetensors: shape [0, 1] with 4 bytes of data -> RuntimeError from reshape
    ({"dtype": "F32", "shape": [0, 1], "data_offsets": [0, 4]}, "needs 0 bytes, data_offsets span 4"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8 bytes"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "non-negative ints"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "start <= end"),
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype"),
    ({"dtype": "F32", "shape": [1]}, "must hold dtype, shape and data_offsets"),
    ("F32", "must hold dtype"),
])
def test_safetensors_header_entries(tmp_path, entry, message):
    _shard(tmp_path / "model.safetensors", {"w": entry}, b"\0" * 8)
    with pytest.raises(ValueError, match=message):
        TensorIndex(tmp_path)


def test_safetensors_overlapping_tensors(tmp_path):
    _shard(tmp_path / "model.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(ValueError, match="overlap"):
        TensorIndex(tmp_path)


def test_safetensors_header_not_an_object(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        TensorIndex(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"model_type": ["qwen3_moe"]}, "`model_type` must be a string"),  # was TypeError (unhashable) in arch_for
    ([1, 2], "must hold a JSON object"),
    ({"model_type": "qwen3_moe", "num_experts": 2, "moe_intermediate_size": 4, "hidden_size": "8",
      "num_hidden_layers": 1}, "`hidden_size` must be a positive integer, got '8'"),
    ({"model_type": "qwen3_moe", "num_experts": 0, "moe_intermediate_size": 4, "hidden_size": 8,
      "num_hidden_layers": 1}, "number of experts"),
    ({"model_type": "deepseek_v3", "n_routed_experts": 2, "moe_intermediate_size": 4, "hidden_size": 8,
      "num_hidden_layers": 1, "quantization_config": {"weight_block_size": [0]}}, "weight_block_size"),
])
def test_config_values(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        read_source_config(tmp_path)


_QWEN = {"model_type": "qwen3_moe", "hidden_size": 8, "num_hidden_layers": 1, "num_experts": 2,
         "moe_intermediate_size": 4}


@pytest.mark.parametrize("tensors, message", [
    # found by fuzz_safetensors: a fused gate_up_proj whose down_proj is missing -> TypeError in convert
    ({"gate_up_proj": [2, 8, 8], "eown_proj": [2, 8, 4]}, "gate_up_proj without .*down_proj"),
    ({"down_proj": [2, 8, 4]}, "down_proj without .*gate_up_proj"),
    ({"gate_up_proj": [1, 8, 8], "down_proj": [1, 8, 4]}, r"shape \(1, 8, 8\), expected \(2, \., \.\)"),
    ({"gate_up_proj": [16, 8], "down_proj": [2, 8, 4]}, r"shape \(16, 8\)"),
])
def test_convert_fused_experts_incomplete(tmp_path, tensors, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(_QWEN))
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 4 * math.prod(shape)
        header[f"model.layers.0.mlp.experts.{name}"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    _shard(model / "model.safetensors", header, b"\0" * offset)
    with pytest.raises(ValueError, match=message):
        convert(model, tmp_path / "out", "int8", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_per_expert_gate_and_up_shapes_differ(tmp_path):
    """found by fuzz_safetensors: gate (4, 8) with up (8, 4) made torch.cat raise a RuntimeError"""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(_QWEN))
    header, offset = {}, 0
    for e in range(2):
        for name, shape in (("gate_proj", [4, 8]), ("up_proj", [8, 4] if e else [4, 8]), ("down_proj", [8, 4])):
            header[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = {"dtype": "F32", "shape": shape,
                                                                      "data_offsets": [offset, offset + 128]}
            offset += 128
    _shard(model / "model.safetensors", header, b"\0" * offset)
    with pytest.raises(ValueError, match=r"experts\.1\.up_proj\.weight: shape \(8, 4\), the config's \(I, H\) is \(4, 8\)"):
        convert(model, tmp_path / "out", "int8", progress=False)
    assert not (tmp_path / "out").exists()


def test_config_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_source_config(tmp_path)


# ---- engine API (fuzz_engine_api, fuzz_moe_api.c) ------------------------------------------------


@pytest.fixture(scope="module")
def packed():
    torch.manual_seed(0)
    return Fn.pack_experts(*random_experts(4, 16, 8), "int8")


def test_functional_forward_validates_its_inputs(packed):
    """Found by fuzz_engine_api: moe_forward (reachable without cpu_experts) raised KeyError for int64
    hidden states, and passed unchecked ids and shapes to C."""
    idx, w = distinct_routing(3, 4, 2)
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.int64"):
        Fn.moe_forward(packed, torch.ones(3, 16, dtype=torch.int64), idx, w, ComputeMode.F32)
    bad = idx.clone()
    bad[1, 0] = 4
    with pytest.raises(ValueError, match="expert id 4, outside \\[0, 4\\)"):
        Fn.moe_forward(packed, torch.ones(3, 16), bad, w, ComputeMode.F32)
    with pytest.raises(ValueError, match="hidden size 15"):
        Fn.moe_forward(packed, torch.ones(3, 15), idx, w, ComputeMode.F32)
    with pytest.raises(ValueError, match="must be a CPU tensor"):
        Fn.moe_forward(packed, torch.ones(3, 16, device="meta"), idx, w, ComputeMode.F32)


def test_functional_backward_validates_its_inputs(packed):
    idx, w = distinct_routing(3, 4, 2)
    _, gu = Fn.moe_forward(packed, torch.ones(3, 16), idx, w, ComputeMode.F32)
    bad = idx.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="expert id -1"):
        Fn.moe_backward(packed, torch.ones(3, 16), bad, w, gu, ComputeMode.F32)
    with pytest.raises(ValueError, match="`dy` has hidden size 8"):
        Fn.moe_backward(packed, torch.ones(3, 8), idx, w, gu, ComputeMode.F32)
    with pytest.raises(ValueError, match="gate/up activations"):
        Fn.moe_backward(packed, torch.ones(3, 16), idx, w, gu.double(), ComputeMode.F32)


def _raw_args(packed, idx, w, x, y):
    a = ffi.new("kt_moe_args *")
    a.format, a.act_mode = 1, 0
    a.E, a.H, a.I = packed.num_experts, packed.hidden_dim, packed.intermediate_dim
    a.T, a.k = idx.shape
    a.gate_up, a.down = ffi.cast("void *", packed.gate_up.data_ptr()), ffi.cast("void *", packed.down.data_ptr())
    a.topk_idx, a.topk_w = ffi.cast("int64_t *", idx.data_ptr()), ffi.cast("float *", w.data_ptr())
    a.x, a.x_dtype, a.y = ffi.cast("void *", x.data_ptr()), 0, ffi.cast("float *", y.data_ptr())
    return a


@pytest.mark.parametrize("bad_id", [-1, 4, 2**40])
def test_c_api_rejects_expert_ids_out_of_range(packed, bad_id):
    """The C API validates ids itself (it indexed them unchecked before #15): KT_EINVAL, not a wild write."""
    idx, w = distinct_routing(3, 4, 2)
    idx[2, 1] = bad_id
    x, y = torch.ones(3, 16), torch.empty(3, 16)
    a = _raw_args(packed, idx, w, x, y)
    assert lib.kt_moe_forward(a) == lib.KT_EINVAL
    assert f"expert id {bad_id} (pair 5) outside [0, 4)" in ffi.string(lib.kt_last_error()).decode()


def test_c_api_rejects_missing_buffers_and_bad_dtypes(packed):
    idx, w = distinct_routing(3, 4, 2)
    x, y = torch.ones(3, 16), torch.empty(3, 16)
    a = _raw_args(packed, idx, w, x, y)
    a.y = ffi.NULL
    assert lib.kt_moe_forward(a) == lib.KT_EINVAL
    a = _raw_args(packed, idx, w, x, y)
    a.x_dtype = 7
    assert lib.kt_moe_forward(a) == lib.KT_EINVAL
    assert "unknown activation dtype 7" in ffi.string(lib.kt_last_error()).decode()
    a = _raw_args(packed, idx, w, x, y)
    a.T = 2**40
    assert lib.kt_moe_forward(a) == lib.KT_EINVAL
    assert "int32 limits" in ffi.string(lib.kt_last_error()).decode()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_second_thread_scratch_is_aligned(kernel_path, fmt):
    """Found by fuzz_moe_api.c (session 7, UBSan: a misaligned 32-byte store in the avx2 panel): the
    per-thread scratch of thread t starts at t x the table's scratch size, which the avx2 int8 kernels'
    formula (session 5) did not round to 16 floats, so with 2 threads the second thread's aligned
    stores faulted (SIGSEGV in a normal build) for dimensions like H = I = 29. Run shapes whose sizes
    are not multiples of 16 on 2 threads; the results must be those of 1 thread, bit for bit."""
    torch.manual_seed(29)
    before = runtime.num_threads()
    for h, inter in [(29, 29), (13, 37), (71, 5)]:
        packed = Fn.pack_experts(*random_experts(3, h, inter), fmt)
        idx, w = distinct_routing(7, 3, 2)
        x, dy = torch.randn(7, h), torch.randn(7, h)
        for mode in ("f32", "bf16") + (("int8",) if fmt != "bf16" else ()):
            results = []
            for threads in (1, 2):
                kt_sft.set_num_threads(threads)
                try:
                    y, gu = Fn.moe_forward(packed, x, idx, w, ComputeMode(mode))
                    dx, dw = Fn.moe_backward(packed, dy, idx, w, gu, ComputeMode(mode))[:2]
                finally:
                    kt_sft.set_num_threads(before)
                results.append((y, dx, dw))
            for a, b in zip(*results):
                assert torch.equal(a, b), (h, inter, mode)
