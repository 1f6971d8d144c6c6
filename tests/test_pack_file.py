"""The expert pack file: round trip through a memory map, checksums, and clear errors."""

import helpers
import pytest
import torch
from helpers import distinct_routing, random_experts

from kt_sft import CPUExperts
from kt_sft.engine import functional as Fn
from kt_sft.engine.pack_file import PackFile, PackWriter


def write_pack(path, fmt, layers, e=4, h=40, inter=24):
    return helpers.write_pack(path, fmt, layers, e, h, inter, source={"model": "unit-test"})


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_round_trip_through_mmap(tmp_path, fmt, seed):
    path = tmp_path / "experts.ktpack"
    experts = write_pack(path, fmt, [1, 3])
    pack = PackFile(path, verify=True)
    assert pack.layers == [1, 3] and pack.header.source == {"model": "unit-test"}
    for layer, (gu, dn) in experts.items():
        mapped = pack.layer(layer)
        direct = Fn.pack_experts(gu, dn, fmt)
        assert torch.equal(mapped.gate_up, direct.gate_up) and torch.equal(mapped.down, direct.down)
        assert mapped.gate_up.data_ptr() % 4096 == 0 and mapped.down.data_ptr() % 4096 == 0
        idx, w = distinct_routing(7, 4, 2)
        x = torch.randn(7, 40)
        assert torch.equal(CPUExperts(mapped)(x, idx, w), CPUExperts(direct)(x, idx, w))


def test_corruption_and_truncation_are_caught(tmp_path, seed):
    path = tmp_path / "experts.ktpack"
    write_pack(path, "int8", [0])
    pack = PackFile(path)
    off = pack.header.layers[0]["down"].offset
    data = bytearray(path.read_bytes())
    data[off + 5] ^= 0xFF
    bad = tmp_path / "bad.ktpack"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch in layer 0 down"):
        PackFile(bad, verify=True)
    short = tmp_path / "short.ktpack"
    short.write_bytes(path.read_bytes()[: off + 10])
    with pytest.raises(ValueError, match="truncated"):
        PackFile(short)
    junk = tmp_path / "junk.ktpack"
    junk.write_bytes(b"hello world, not a pack")
    with pytest.raises(ValueError, match="not a kt_sft expert pack"):
        PackFile(junk)
    with pytest.raises(KeyError, match="no experts for layer 5"):
        pack.layer(5)


def test_writer_refuses_out_of_order_and_incomplete(tmp_path, seed):
    gu, dn = random_experts(2, 16, 8)
    packed = Fn.pack_experts(gu, dn, "bf16")
    w = PackWriter(tmp_path / "p.ktpack", "bf16", "a", 2, 16, 8, [0])
    with pytest.raises(ValueError, match="in order, expected 0, got 1"):
        w.write_expert(0, "gate_up", 1, packed.gate_up[1])
    with pytest.raises(ValueError, match="bytes, expected"):
        w.write_expert(0, "gate_up", 0, packed.gate_up[0][:10])
    w.write_expert(0, "gate_up", 0, packed.gate_up[0])
    with pytest.raises(ValueError, match="pack incomplete"):
        w.close()


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_mapping_costs_only_the_pages_touched(tmp_path, seed):
    """Opening a pack maps it without reading it; a forward that routes every token to two of 64
    experts brings in about those two experts' pages (RssFile), not the whole layer."""
    e, h, inter = 64, 512, 256
    gu, dn = random_experts(e, h, inter)
    packed = Fn.pack_experts(gu, dn, "bf16")
    path = tmp_path / "experts.ktpack"
    w = PackWriter(path, "bf16", "t", e, h, inter, [0])
    for i in range(e):
        w.write_expert(0, "gate_up", i, packed.gate_up[i])
    for i in range(e):
        w.write_expert(0, "down", i, packed.down[i])
    w.close()
    layer_kib = (packed.gate_up.numel() + packed.down.numel()) // 1024
    per_expert_kib = layer_kib // e

    before = _status_kib("RssFile")
    pack = PackFile(path)
    mapped = pack.layer(0)
    after_open = _status_kib("RssFile")
    ex = CPUExperts(mapped, compute_mode="f32")
    idx = torch.tensor([[3, 40]] * 9)
    ex(torch.randn(9, h), idx, torch.rand(9, 2))
    after_use = _status_kib("RssFile")
    assert after_open - before < layer_kib // 8
    assert after_use - after_open <= 2 * per_expert_kib + 1024, (layer_kib, after_use - after_open)
    assert after_use - after_open >= per_expert_kib  # the two experts really were read from the map
