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
            # One-shot decompress() sizes its buffer from the frame header's
            # content size and ignores max_output_size when the header has one,
            # so a small frame declaring gigabytes would be allocated (or raise
            # MemoryError). A bounded streaming read allocates at most
            # expected_len + 1 bytes, whatever the header claims.
            try:
                with self._zstd.stream_reader(data, read_across_frames=True) as reader:
                    parts: list[bytes] = []
                    got = 0
                    while got <= expected_len:
                        part = reader.read(expected_len + 1 - got)
                        if not part:
                            break
                        parts.append(part)
                        got += len(part)
            except zstandard.ZstdError as exc:
                raise WireError("codec", f"zstd payload does not decompress: {exc}") from None
            if got > expected_len:
                raise WireError("length", f"zstd payload decompresses to more than the {expected_len} bytes "
                                          f"declared (refused)")
            out = b"".join(parts)
        else:
            raise WireError("codec", f"unknown codec {codec}")
        if len(out) != expected_len:
            raise WireError("length", f"payload is {len(out)} bytes, expected {expected_len}")
        return out
