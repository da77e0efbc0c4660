"""Byte codecs applied to each chunk's payload after encoding.

ZSTD_BG groups bytes by significance before zstd, as ZipNN does (Hershcovitch
et al. 2024): in a float tensor the sign and exponent bits repeat a handful of
values while the low mantissa bytes are close to random, and one zstd stream
over interleaved words sees neither pattern. Each little-endian word is first
rotated left by one bit, so the sign moves to the bottom and an fp32/bf16
exponent fills the top byte exactly; the top bytes of all words come first,
then the next byte plane, down to the lowest. It is a permutation plus a bit
rotation, so it is lossless for any bytes, floats or not.
"""
from __future__ import annotations

import numpy as np
import zstandard

from fedtune.v1 import fedtune_pb2 as pb

from .formats import WireError

_WORD = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def group_bytes(data: bytes, width: int) -> bytes:
    """Rotate each `width`-byte little-endian word left by one bit, then split into byte planes, high first."""
    if width <= 1 or len(data) % width:
        return data
    word = _WORD[width]
    bits = 8 * width
    w = np.frombuffer(data, dtype=f"<u{width}").astype(word)
    w = (w << word(1)) | (w >> word(bits - 1))
    planes = w.astype(f"<u{width}").view(np.uint8).reshape(-1, width)[:, ::-1].T
    return np.ascontiguousarray(planes).tobytes()


def ungroup_bytes(data: bytes, width: int) -> bytes:
    """The inverse of group_bytes."""
    if width <= 1 or len(data) % width:
        return data
    word = _WORD[width]
    bits = 8 * width
    planes = np.frombuffer(data, dtype=np.uint8).reshape(width, -1)
    w = np.ascontiguousarray(planes[::-1].T).view(f"<u{width}").reshape(-1).astype(word)
    w = (w >> word(1)) | (w << word(bits - 1))
    return w.astype(f"<u{width}").tobytes()


class Compressor:
    """One per stream: zstd contexts are not shared across threads."""

    def __init__(self, codec: int, level: int = 3, threads: int = 0) -> None:
        self.codec = codec
        self._zstd = (zstandard.ZstdCompressor(level=level, threads=threads)
                      if codec in (pb.ZSTD, pb.ZSTD_BG) else None)

    def compress(self, data: bytes, width: int = 1) -> bytes:
        """`width`: bytes per encoded element (formats.element_width), used by ZSTD_BG."""
        if self._zstd is None:
            return data
        if self.codec == pb.ZSTD_BG:
            data = group_bytes(data, width)
        return self._zstd.compress(data)


class Decompressor:
    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()

    def decompress(self, codec: int, data: bytes, expected_len: int, width: int = 1) -> bytes:
        """Decompress to exactly expected_len bytes; never allocates more."""
        if codec == pb.NONE:
            out = data
        elif codec in (pb.ZSTD, pb.ZSTD_BG):
            out = self._bounded_zstd(data, expected_len)
        else:
            raise WireError("codec", f"unknown codec {codec}")
        if len(out) != expected_len:
            raise WireError("length", f"payload is {len(out)} bytes, expected {expected_len}")
        return ungroup_bytes(out, width) if codec == pb.ZSTD_BG else out

    def _bounded_zstd(self, data: bytes, expected_len: int) -> bytes:
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
        return b"".join(parts)
