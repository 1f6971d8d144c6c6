"""The packed expert file (`experts.ktpack`): every MoE layer's routed experts, quantized, in the exact
byte layout the C kernels read, aligned so the file can be memory-mapped and used in place.

    offset 0      b"KTSFTPK1"                       magic (8 bytes)
    offset 8      uint32 little-endian              length of the JSON header that follows
    offset 12     JSON header (utf-8)               see PackHeader; padded with spaces
    data_offset   layer blocks, each tensor 4096-aligned:
                  gate_up: E x kt_matrix_bytes(format, 2I, H)   (experts back to back)
                  down:    E x kt_matrix_bytes(format, H, I)

Every tensor records its offset, length and CRC-32, so a truncated or corrupted file is caught
(`PackFile(path, verify=True)`, `kt-sft verify`). Mapping the file read-only lets processes share
the pages and makes resident memory grow only with the pages the kernels touch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import mmap
import os
import struct
import warnings
import zlib
from pathlib import Path

import torch

from kt_sft.engine.formats import Format, matrix_bytes
from kt_sft.engine.functional import PackedExperts
from kt_sft.engine.runtime import hugepages_enabled

MAGIC = b"KTSFTPK1"
VERSION = 1
ALIGN = 4096
PACK_NAME = "experts.ktpack"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclasses.dataclass
class TensorEntry:
    offset: int
    nbytes: int
    crc32: int = 0


@dataclasses.dataclass
class PackHeader:
    format: str
    arch: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    layers: dict[int, dict[str, TensorEntry]]  # layer index -> {"gate_up", "down"}
    data_offset: int
    version: int = VERSION
    source: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["layers"] = {str(k): {n: dataclasses.asdict(t) for n, t in v.items()} for k, v in self.layers.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PackHeader":
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise ValueError("the header is not a JSON object with a `layers` object")  # noqa: TRY004 - bad file
        d["layers"] = {int(k): {n: TensorEntry(**t) for n, t in v.items()} for k, v in d["layers"].items()}
        return cls(**d)


def plan_layout(fmt: Format, num_experts: int, hidden: int, inter: int, layers: list[int],
                header_reserve: int) -> tuple[int, dict[int, dict[str, TensorEntry]]]:
    """Offsets of every tensor, known before any byte is written (all MoE layers share shapes)."""
    gu_bytes = num_experts * matrix_bytes(fmt, 2 * inter, hidden)
    dn_bytes = num_experts * matrix_bytes(fmt, hidden, inter)
    data_offset = _align(header_reserve)
    pos, table = data_offset, {}
    for layer in layers:
        table[layer] = {"gate_up": TensorEntry(pos, gu_bytes)}
        pos = _align(pos + gu_bytes)
        table[layer]["down"] = TensorEntry(pos, dn_bytes)
        pos = _align(pos + dn_bytes)
    return data_offset, table


class PackWriter:
    """Streams experts into a pack file: expert by expert, in order, so peak memory stays at one
    expert's matrices. The header (with CRCs) is written last, into space reserved up front."""

    def __init__(self, path: str | os.PathLike, fmt: str | Format, arch: str, num_experts: int, hidden: int,
                 inter: int, layers: list[int], source: dict | None = None):
        self.fmt = Format.parse(fmt)
        reserve = 4096 + 256 * len(layers) + len(json.dumps(source or {}))
        data_offset, table = plan_layout(self.fmt, num_experts, hidden, inter, list(layers), reserve)
        self.header = PackHeader(self.fmt.value, arch, num_experts, hidden, inter, table, data_offset,
                                 source=dict(source or {}))
        self._reserve = data_offset
        self._f = open(path, "wb")
        end = max((t.offset + t.nbytes for v in table.values() for t in v.values()), default=data_offset)
        self._f.truncate(_align(end))
        self._next: dict[tuple[int, str], int] = {}

    def write_expert(self, layer: int, which: str, expert: int, data: torch.Tensor) -> None:
        """data: the packed bytes of one expert's matrix (uint8, kt_matrix_bytes long)."""
        entry = self.header.layers[layer][which]
        per_expert = entry.nbytes // self.header.num_experts
        expected = self._next.get((layer, which), 0)
        if expert != expected:
            raise ValueError(f"layer {layer} {which}: experts must be written in order, expected {expected}, got {expert}")
        buf = data.contiguous().view(torch.uint8).numpy().tobytes()
        if len(buf) != per_expert:
            raise ValueError(f"layer {layer} {which}: expert {expert} has {len(buf)} bytes, expected {per_expert}")
        self._f.seek(entry.offset + expert * per_expert)
        self._f.write(buf)
        entry.crc32 = zlib.crc32(buf, entry.crc32)
        self._next[(layer, which)] = expert + 1

    def close(self) -> None:
        missing = [(layer, which) for layer, v in self.header.layers.items() for which in v
                   if self._next.get((layer, which), 0) != self.header.num_experts]
        if missing:
            raise ValueError(f"pack incomplete: tensors not fully written: {missing[:4]}")
        text = self.header.to_json().encode()
        if 12 + len(text) > self._reserve:
            raise RuntimeError("pack header larger than its reserved space")  # a bug in plan_layout's reserve
        self._f.seek(0)
        self._f.write(MAGIC + struct.pack("<I", len(text)) + text + b" " * (self._reserve - 12 - len(text)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def _check_header(h: PackHeader, path: Path, header_end: int) -> Format:
    """Every field the reader relies on, checked before any byte is mapped: the types, positive sizes,
    exactly the two tensors per layer, each ALIGN-aligned after the header, exactly as long as the
    shapes say (E x kt_matrix_bytes), not overlapping. A header that lies is a ValueError naming the
    field, never a view shorter than the kernels read. Returns the format."""

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    try:
        fmt = Format.parse(h.format)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: bad pack header: {exc}") from None
    for name in ("num_experts", "hidden_size", "intermediate_size"):
        v = getattr(h, name)
        if not is_int(v) or not 1 <= v < 2**31:
            raise ValueError(f"{path}: bad pack header: `{name}` must be a positive int, got {v!r}")
    if not is_int(h.data_offset) or h.data_offset < header_end or h.data_offset % ALIGN:
        raise ValueError(f"{path}: bad pack header: data_offset {h.data_offset!r} (header ends at {header_end})")
    if not isinstance(h.arch, str) or not isinstance(h.source, dict):
        raise ValueError(f"{path}: bad pack header: `arch` must be a string and `source` an object")  # noqa: TRY004
    e, hid, inter = h.num_experts, h.hidden_size, h.intermediate_size
    want = {"gate_up": e * matrix_bytes(fmt, 2 * inter, hid), "down": e * matrix_bytes(fmt, hid, inter)}
    spans = []
    for layer, tensors in h.layers.items():
        if layer < 0 or not isinstance(tensors, dict) or set(tensors) != set(want):
            raise ValueError(f"{path}: bad pack header: layer {layer} must hold exactly {sorted(want)}, "
                             f"got {sorted(tensors) if isinstance(tensors, dict) else tensors!r}")
        for which, t in tensors.items():
            if not (is_int(t.offset) and is_int(t.nbytes) and is_int(t.crc32)) or not 0 <= t.crc32 < 2**32:
                raise ValueError(f"{path}: bad pack header: layer {layer} {which} has non-integer fields")
            if t.nbytes != want[which]:
                raise ValueError(f"{path}: bad pack header: layer {layer} {which} is {t.nbytes} bytes, "
                                 f"{want[which]} expected for {fmt.value} E={e} H={hid} I={inter}")
            if t.offset < h.data_offset or t.offset % ALIGN:
                raise ValueError(f"{path}: bad pack header: layer {layer} {which} offset {t.offset} is before "
                                 f"the data ({h.data_offset}) or not {ALIGN}-aligned")
            spans.append((t.offset, t.offset + t.nbytes, layer, which))
    spans.sort()
    for (_, end, layer, which), (start, _, layer2, which2) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"{path}: bad pack header: layer {layer} {which} overlaps layer {layer2} {which2}")
    return fmt


class PackFile:
    """A read-only memory map of a pack; `layer(i)` gives PackedExperts whose tensors view the map."""

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:8] != MAGIC:
                raise ValueError(f"{self.path} is not a kt_sft expert pack (bad magic {head[:8]!r})")
            (n,) = struct.unpack("<I", head[8:12])
            try:
                self.header = PackHeader.from_json(f.read(n).decode())
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{self.path}: unreadable pack header: {exc!r}") from exc
        if self.header.version != VERSION:
            raise ValueError(f"{self.path}: pack version {self.header.version!r}, this kt_sft reads {VERSION}; reconvert")
        self.format = _check_header(self.header, self.path, 12 + n)
        size = self.path.stat().st_size
        for layer, tensors in self.header.layers.items():
            for which, t in tensors.items():
                if t.offset + t.nbytes > size:
                    raise ValueError(f"{self.path}: truncated (layer {layer} {which} ends at {t.offset + t.nbytes}, file has {size} bytes)")
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_HUGEPAGE") and hugepages_enabled():
            # a hint (see runtime.advise_hugepages). Measured on Linux 6.18 / ext4: the page cache's
            # large folios already map ~55% of a 1.5 GB pack with 2 MiB pages, with or without it.
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        if verify:
            self.verify()

    @property
    def layers(self) -> list[int]:
        return sorted(self.header.layers)

    def verify(self) -> None:
        for layer, tensors in sorted(self.header.layers.items()):
            for which, t in tensors.items():
                crc = zlib.crc32(self._map[t.offset : t.offset + t.nbytes])
                if crc != t.crc32:
                    raise ValueError(f"{self.path}: checksum mismatch in layer {layer} {which} "
                                     f"(stored {t.crc32:#010x}, computed {crc:#010x}); the file is corrupted")

    def _view(self, t: TensorEntry, rows: int) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only map: the C kernels only read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=t.nbytes, offset=t.offset)
        return flat.view(rows, t.nbytes // rows)

    def layer(self, index: int) -> PackedExperts:
        if index not in self.header.layers:
            raise KeyError(f"{self.path} has no experts for layer {index}; it has layers {self.layers}")
        h, t = self.header, self.header.layers[index]
        e = h.num_experts
        return PackedExperts(self.format, e, h.hidden_size, h.intermediate_size,
                             self._view(t["gate_up"], e), self._view(t["down"], e))


_OPEN: dict[str, PackFile] = {}


def open_pack(path: str | os.PathLike, verify: bool = False) -> PackFile:
    """One PackFile (one mapping) per file per process, shared by all layers that read it."""
    key = str(Path(path).resolve())
    pack = _OPEN.get(key)
    if pack is None:
        pack = _OPEN[key] = PackFile(key, verify=verify)
    elif verify:
        pack.verify()
    return pack
