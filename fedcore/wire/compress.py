"""Byte codecs applied to each chunk's payload after encoding."""
from __future__ import annotations

import zstandard

from fedtune.v1 import fedtune_pb2 as pb

from .formats import WireError


class Compressor:
    """One per stream: zstd contexts are not shared across threads."""

    def __init__(self, codec: int, level: int = 3, threads: int = 0) -> None:
        self.codec = codec
        self._zstd = zstandard.ZstdCompressor(level=level, threads=threads) if codec == pb.ZSTD else None

    def compress(self, data: bytes) -> bytes:
        if self._zstd is None:
            return data
        return self._zstd.compress(data)


class Decompressor:
    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()

    def decompress(self, codec: int, data: bytes, expected_len: int) -> bytes:
        """Decompress to exactly expected_len bytes; never allocates more."""
        if codec == pb.NONE:
            out = data
        elif codec == pb.ZSTD:
            try:
                out = self._zstd.decompress(data, max_output_size=expected_len)
            except zstandard.ZstdError as exc:
                raise WireError("codec", f"zstd payload does not decompress: {exc}") from None
        else:
            raise WireError("codec", f"unknown codec {codec}")
        if len(out) != expected_len:
            raise WireError("length", f"payload is {len(out)} bytes, expected {expected_len}")
        return out
