"""Chunk streams: a state dict -> lazily encoded chunks -> preallocated tensors.

Neither side builds a serialized copy of the model: the encoder slices one
tensor at a time and yields a chunk when the transport asks for it; the
receiver checks each chunk and writes its elements straight into place.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import crc32c
import torch

from fedtune.v1 import fedtune_pb2 as pb

from . import quant
from .delta import apply_delta
from .compress import Compressor, Decompressor
from .formats import (LOSSLESS_FOR_FP32, WireError, codec_id, dtype_name, element_width, encoding_id,
                      payload_len, scales_len, wire_encoding)
from .manifest import Layout, TensorEntry, build_manifest, check_manifest, state_digest, unique_tensors

# 256K elements is 1 MiB of fp32 per chunk. bench/stream.py measured 256 KiB
# to 4 MiB chunks within a few percent of each other on loopback; 1 MiB keeps
# the per-chunk overhead (~60 B header, one CRC) under 0.01% while a resumed
# transfer re-sends at most 1 MiB and gRPC's 4 MiB default message cap is far.
DEFAULT_CHUNK_ELEMS = 1 << 18
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class TransferSpec:
    """How a state dict is put on the wire."""
    encoding: str = "fp32"
    codec: str = "none"
    zstd_level: int = 3
    zstd_threads: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    payload: str = "weights"

    @property
    def encoding_id(self) -> int:
        return encoding_id(self.encoding)

    @property
    def codec_id(self) -> int:
        return codec_id(self.codec)

    @property
    def payload_id(self) -> int:
        return pb.DELTA if self.payload == "delta" else pb.WEIGHTS

    def settings(self, error_feedback: bool = False) -> pb.TransferSettings:
        return pb.TransferSettings(encoding=self.encoding_id, codec=self.codec_id, zstd_level=self.zstd_level,
                                   block_size=self.block_size, chunk_elems=self.chunk_elems,
                                   payload=self.payload_id, error_feedback=error_feedback)

    def validate(self) -> None:
        encoding_id(self.encoding)
        codec_id(self.codec)
        if self.payload not in ("weights", "delta"):
            raise ValueError(f"payload must be 'weights' or 'delta', not {self.payload!r}")
        if self.block_size <= 0 or self.chunk_elems <= 0 or self.chunk_elems % self.block_size:
            raise ValueError(f"chunk_elems ({self.chunk_elems}) must be a positive multiple of "
                             f"block_size ({self.block_size})")


def chunk_crc(scales: bytes, payload: bytes) -> int:
    return crc32c.crc32c(payload, crc32c.crc32c(scales))


class StateEncoder:
    """Encodes a state dict; `chunks()` may start anywhere for resumption."""

    def __init__(self, state: Mapping[str, torch.Tensor], spec: TransferSpec,
                 digest: str | None = None, base_version: str = "") -> None:
        spec.validate()
        self.spec = spec
        self.entries: list[TensorEntry] = unique_tensors(state)
        self.manifest = build_manifest(self.entries, spec.encoding_id, spec.codec_id, spec.block_size,
                                       spec.chunk_elems, spec.payload_id, digest)
        self.manifest.base_version = base_version

    def chunks(self, start: pb.Position | None = None) -> Iterator[pb.Chunk]:
        ti, off = (start.tensor_index, start.offset) if start is not None else (0, 0)
        if not 0 <= ti <= len(self.entries):
            raise WireError("offset", f"start tensor index {ti} outside 0..{len(self.entries)}")
        if ti < len(self.entries) and (off < 0 or off % self.spec.chunk_elems
                                       or off > self.entries[ti].tensor.numel()):
            raise WireError("offset", f"start offset {off} is not a chunk boundary of {self.entries[ti].name}")
        comp = Compressor(self.spec.codec_id, self.spec.zstd_level, self.spec.zstd_threads)
        step = self.spec.chunk_elems
        for idx in range(ti, len(self.entries)):
            e = self.entries[idx]
            t = e.tensor.detach()
            flat = t.reshape(-1)
            enc = wire_encoding(self.spec.encoding_id, t.dtype)
            first = off if idx == ti else 0
            n = flat.numel()
            # An empty tensor still sends one empty chunk, so the receiver sees it.
            for o in range(first, max(n, 1), step):
                piece = flat[o:o + step]
                if piece.device.type != "cpu":
                    piece = piece.cpu()
                raw, scales = quant.encode(piece, enc, self.spec.block_size)
                payload = comp.compress(raw, element_width(enc, t.dtype))
                yield pb.Chunk(tensor=e.name, dtype=dtype_name(t.dtype), shape=list(t.shape), offset=o,
                               count=piece.numel(), encoding=enc, codec=self.spec.codec_id,
                               block_size=self.spec.block_size, scales=scales, payload=payload,
                               crc32c=chunk_crc(scales, payload), raw_len=len(raw))


class FrozenStream:
    """A state dict encoded once and kept as its chunks, to serve many downloads (broadcast deltas).

    Holds the encoded bytes only (a quarter of fp32 for int8), not the tensors.
    """

    def __init__(self, encoder: StateEncoder) -> None:
        self.manifest = encoder.manifest
        self._chunks = list(encoder.chunks())
        self._index = {(c.tensor, c.offset): i for i, c in enumerate(self._chunks)}
        self._names = [e.name for e in encoder.entries]
        self.wire_bytes = sum(len(c.payload) + len(c.scales) for c in self._chunks)

    def chunks(self, start: pb.Position | None = None) -> Iterator[pb.Chunk]:
        if start is None:
            return iter(self._chunks)
        if start.tensor_index == len(self._names):
            return iter(())
        if not 0 <= start.tensor_index < len(self._names):
            raise WireError("offset", f"start tensor index {start.tensor_index} outside 0..{len(self._names)}")
        i = self._index.get((self._names[start.tensor_index], start.offset))
        if i is None:
            raise WireError("offset", f"start offset {start.offset} is not a chunk boundary of "
                                      f"{self._names[start.tensor_index]}")
        return iter(self._chunks[i:])


def encode_state(state: Mapping[str, torch.Tensor], spec: TransferSpec,
                 start: pb.Position | None = None) -> tuple[pb.Manifest, Iterator[pb.Chunk]]:
    enc = StateEncoder(state, spec)
    return enc.manifest, enc.chunks(start)


class StateReceiver:
    """Checks chunks against a manifest and writes them into place."""

    def __init__(self, manifest: pb.Manifest, dest: Mapping[str, torch.Tensor] | None = None,
                 expect: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
                 max_elems: int | None = None) -> None:
        self.manifest = manifest
        self.layouts: list[Layout] = check_manifest(manifest, expect, max_elems)
        self.index = {lay.name: i for i, lay in enumerate(self.layouts)}
        self.step = manifest.chunk_elems
        self.tensors: list[torch.Tensor] = []
        for lay in self.layouts:
            if dest is not None and lay.name in dest:
                t = dest[lay.name]
                if tuple(t.shape) != lay.shape:
                    raise WireError("shape", f"{lay.name}: destination shape {tuple(t.shape)} != {lay.shape}")
                if not t.is_contiguous():
                    raise WireError("shape", f"{lay.name}: destination tensor is not contiguous")
            else:
                t = torch.empty(lay.shape, dtype=lay.dtype)
            self.tensors.append(t)
        # One flag per chunk of each tensor; empty tensors have one empty chunk.
        self.received = [bytearray(max(1, -(-lay.numel // self.step))) for lay in self.layouts]
        self._cursor = (0, 0)
        self.chunks_received = 0
        self.bytes_received = 0
        self._decomp = Decompressor()

    # -------------------------------------------------------------- checks
    def accept(self, c: pb.Chunk) -> tuple[int, int]:
        """Check chunk `c` and write it into place; returns its (tensor index, chunk number)."""
        i = self.index.get(c.tensor)
        if i is None:
            raise WireError("unknown_tensor", f"chunk for unknown tensor {c.tensor!r}")
        lay = self.layouts[i]
        where = f"{lay.name}[{c.offset}:{c.offset + c.count}]"
        if c.dtype != dtype_name(lay.dtype):
            raise WireError("dtype", f"{where}: dtype {c.dtype!r}, manifest says {dtype_name(lay.dtype)!r}")
        if tuple(c.shape) != lay.shape:
            raise WireError("shape", f"{where}: shape {tuple(c.shape)}, manifest says {lay.shape}")
        enc = wire_encoding(self.manifest.encoding, lay.dtype)
        if c.encoding != enc or c.codec != self.manifest.codec or c.block_size != self.manifest.block_size:
            raise WireError("encoding", f"{where}: encoding/codec/block size differ from the manifest")
        if c.offset < 0 or c.offset % self.step or (c.offset >= lay.numel and not (lay.numel == 0 == c.offset)):
            raise WireError("offset", f"{where}: offset {c.offset} is not a chunk boundary inside "
                                      f"{lay.numel} elements")
        expected_count = min(self.step, lay.numel - c.offset)
        if c.count != expected_count:
            raise WireError("length", f"{where}: count {c.count}, expected {expected_count}")
        k = c.offset // self.step
        if self.received[i][k]:
            raise WireError("duplicate", f"{where}: chunk received twice")
        want_scales = scales_len(enc, c.count, c.block_size)
        if len(c.scales) != want_scales:
            raise WireError("length", f"{where}: {len(c.scales)} bytes of scales, expected {want_scales}")
        want_raw = payload_len(enc, lay.dtype, c.count)
        if c.raw_len != want_raw:
            raise WireError("length", f"{where}: raw length {c.raw_len}, expected {want_raw}")
        if chunk_crc(c.scales, c.payload) != c.crc32c:
            raise WireError("checksum", f"{where}: CRC-32C mismatch, chunk corrupted in transit")
        try:
            raw = self._decomp.decompress(c.codec, c.payload, want_raw, element_width(enc, lay.dtype))
            values = quant.decode(raw, c.scales, enc, lay.dtype, c.count, c.block_size)
        except WireError as exc:
            # The codec does not know which tensor it decodes; say where.
            raise WireError(exc.kind, f"{where}: {exc}") from None
        if enc != quant.pb.RAW and not torch.isfinite(values).all():
            raise WireError("value", f"{where}: NaN or Inf in the decoded values")
        dst = self.tensors[i].view(-1)[c.offset:c.offset + c.count]
        dst.copy_(values.to(dst.device) if dst.device.type != "cpu" else values)
        self.received[i][k] = 1
        self.chunks_received += 1
        self.bytes_received += len(c.payload) + len(c.scales)
        return i, k

    def mark_held(self, tensor_index: int, chunk: int) -> None:
        """Count a chunk its destination already holds (a transfer resumed from disk after a restart)."""
        if not 0 <= tensor_index < len(self.received) or not 0 <= chunk < len(self.received[tensor_index]):
            raise WireError("offset", f"held chunk {chunk} of tensor {tensor_index} is outside the manifest")
        self.received[tensor_index][chunk] = 1
        self._cursor = (0, 0)

    # ----------------------------------------------------------- progress
    def next_position(self) -> pb.Position | None:
        """First chunk not yet held, in stream order; None when complete."""
        ti, k = self._cursor
        while ti < len(self.received):
            flags = self.received[ti]
            while k < len(flags) and flags[k]:
                k += 1
            if k < len(flags):
                self._cursor = (ti, k)
                return pb.Position(tensor_index=ti, offset=k * self.step)
            ti, k = ti + 1, 0
        self._cursor = (ti, 0)
        return None

    @property
    def complete(self) -> bool:
        return self.next_position() is None

    @property
    def lossless(self) -> bool:
        """True when every element arrives bit-exact, so the digest can be checked."""
        for lay, t in zip(self.layouts, self.tensors):
            if t.dtype != lay.dtype:
                return False
            enc = wire_encoding(self.manifest.encoding, lay.dtype)
            if enc not in LOSSLESS_FOR_FP32 or (enc == pb.FP32 and lay.dtype != torch.float32):
                return False
        return True

    def finish(self, verify_digest: bool = True,
               base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The received state dict with aliases tied again; raises if incomplete.

        With `base` (a DELTA manifest naming the base version), the delta is
        added to base and the result, which must be bit-exact, is checked
        against the manifest's digest and returned instead. With `base` and a
        WEIGHTS manifest naming a base version (a patch: LoRA adapters), the
        received tensors replace base's, the rest of base is kept, and the
        whole result is checked against the digest and returned.
        """
        pos = self.next_position()
        if pos is not None:
            lay = self.layouts[pos.tensor_index]
            raise WireError("missing", f"stream ended before chunk {lay.name}[{pos.offset}:] arrived "
                                       f"({self.chunks_received} chunks received)")
        entries = [TensorEntry(lay.name, t, list(lay.aliases)) for lay, t in zip(self.layouts, self.tensors)]
        if base is not None and self.manifest.payload == pb.WEIGHTS and self.manifest.base_version:
            return self._patch(base, entries)
        if base is not None:
            if self.manifest.payload != pb.DELTA or not self.manifest.base_version:
                raise WireError("payload", "a base was given but the manifest is not a delta from a base version")
            missing = [lay.name for lay in self.layouts if lay.name not in base]
            if missing:
                raise WireError("base", f"the base lacks {len(missing)} tensor(s) of the delta, first "
                                           f"{missing[0]!r}")
            applied = apply_delta({lay.name: base[lay.name] for lay in self.layouts},
                                  {e.name: e.tensor for e in entries})
            entries = [TensorEntry(e.name, applied[e.name], e.aliases) for e in entries]
            got = state_digest(entries)
            if got != self.manifest.digest:
                raise WireError("digest", f"delta applied to {self.manifest.base_version[:19]}... gives {got[:19]}..., "
                                          f"not the manifest's {self.manifest.digest[:19]}...")
        elif verify_digest and self.lossless and self.manifest.digest and not self.manifest.base_version:
            got = state_digest(entries)
            if got != self.manifest.digest:
                raise WireError("digest", f"model digest {got} does not match the manifest's {self.manifest.digest}")
        out: dict[str, torch.Tensor] = {}
        for e in entries:
            out[e.name] = e.tensor
            for a in e.aliases:
                out[a] = e.tensor
        return out

    def _patch(self, base: Mapping[str, torch.Tensor], entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
        """base with the received tensors in place of its own (same names, dtypes and shapes), digest-checked."""
        base_entries = unique_tensors(base)
        held = {e.name: e for e in base_entries}
        for e in entries:
            b = held.get(e.name)
            if b is None or b.aliases != e.aliases:
                raise WireError("base", f"the patch's tensor {e.name!r} is not a tensor of the base version")
            if b.tensor.dtype != e.tensor.dtype or tuple(b.tensor.shape) != tuple(e.tensor.shape):
                raise WireError("base", f"{e.name}: the patch's {dtype_name(e.tensor.dtype)} "
                                         f"{tuple(e.tensor.shape)} does not fit the base's "
                                         f"{dtype_name(b.tensor.dtype)} {tuple(b.tensor.shape)}")
        new = {e.name: e.tensor for e in entries}
        patched = [TensorEntry(e.name, new.get(e.name, e.tensor), e.aliases) for e in base_entries]
        got = state_digest(patched)
        if got != self.manifest.digest:
            raise WireError("digest", f"patch applied to {self.manifest.base_version[:19]}... gives {got[:19]}..., "
                                      f"not the manifest's {self.manifest.digest[:19]}...")
        out: dict[str, torch.Tensor] = {}
        for e in patched:
            out[e.name] = e.tensor.to(base[e.name].device) if e.name in new else e.tensor
            for a in e.aliases:
                out[a] = out[e.name]
        return {k: out[k] for k in base}
