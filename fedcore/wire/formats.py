"""Names and sizes of the wire encodings and codecs."""
from __future__ import annotations

import torch

from fedtune.v1 import fedtune_pb2 as pb

ENCODINGS: dict[str, int] = {
    "raw": pb.RAW, "fp32": pb.FP32, "fp16": pb.FP16, "bf16": pb.BF16, "int8": pb.INT8, "nf4": pb.NF4,
    "int4": pb.INT4,
}
CODECS: dict[str, int] = {"none": pb.NONE, "zstd": pb.ZSTD, "zstd-bg": pb.ZSTD_BG}
PAYLOADS: dict[str, int] = {"weights": pb.WEIGHTS, "delta": pb.DELTA}

# Quantized encodings carry one fp32 scale per block of elements.
BLOCKWISE = frozenset({pb.INT8, pb.NF4, pb.INT4})
FOUR_BIT = frozenset({pb.NF4, pb.INT4})
LOSSLESS_FOR_FP32 = frozenset({pb.RAW, pb.FP32})

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}


class WireError(ValueError):
    """A chunk, manifest or stream that fails a check. `kind` names the check."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def encoding_id(name: str) -> int:
    try:
        return ENCODINGS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)}") from None


def codec_id(name: str) -> int:
    try:
        return CODECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}") from None


def encoding_name(value: int) -> str:
    for k, v in ENCODINGS.items():
        if v == value:
            return k
    return f"encoding#{value}"


def codec_name(value: int) -> str:
    for k, v in CODECS.items():
        if v == value:
            return k
    return f"codec#{value}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise WireError("dtype", f"unsupported dtype {name!r}") from None


def wire_encoding(encoding: int, dtype: torch.dtype) -> int:
    """The encoding a tensor of `dtype` actually travels in: non-floats stay raw."""
    return encoding if dtype.is_floating_point else pb.RAW


def payload_len(encoding: int, dtype: torch.dtype, count: int) -> int:
    """Bytes of encoded elements before compression."""
    if encoding == pb.RAW:
        return count * dtype.itemsize
    if encoding == pb.FP32:
        return 4 * count
    if encoding in (pb.FP16, pb.BF16):
        return 2 * count
    if encoding == pb.INT8:
        return count
    if encoding in FOUR_BIT:
        return (count + 1) // 2
    raise WireError("encoding", f"unknown encoding {encoding}")


def element_width(encoding: int, dtype: torch.dtype) -> int:
    """Bytes of one encoded element: the word size the byte-grouped codec splits into planes."""
    if encoding == pb.RAW:
        return dtype.itemsize
    if encoding == pb.FP32:
        return 4
    if encoding in (pb.FP16, pb.BF16):
        return 2
    return 1  # int8 codes, and 4-bit codes packed two a byte: no planes to split


def scales_len(encoding: int, count: int, block_size: int) -> int:
    if encoding in BLOCKWISE:
        return 4 * ((count + block_size - 1) // block_size)
    return 0
