"""State-dict layout on the wire: tied tensors found once, version digests."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedtune.v1 import fedtune_pb2 as pb

from .formats import (BLOCKWISE, CODECS, ENCODINGS, WireError, dtype_from_name, dtype_name, payload_len, scales_len,
                      wire_encoding)

# Limits on what a peer may declare, so a hostile manifest cannot make the
# receiver allocate without bound before any chunk arrives.
MAX_TENSORS = 100_000
MAX_CHUNK_ELEMS = 1 << 24
MAX_BLOCK_SIZE = 1 << 20


@dataclass
class TensorEntry:
    name: str
    tensor: torch.Tensor
    aliases: list[str] = field(default_factory=list)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
            t.device)


def unique_tensors(state: Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    """State-dict entries in order, tensors that share storage listed once.

    T5 keeps `shared.weight`, `encoder.embed_tokens.weight` and
    `decoder.embed_tokens.weight` as one tensor; it travels once.
    """
    seen: dict[tuple, TensorEntry] = {}
    out: list[TensorEntry] = []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: not a tensor")
        key = _storage_key(t)
        if key in seen:
            seen[key].aliases.append(name)
            continue
        entry = TensorEntry(name, t)
        seen[key] = entry
        out.append(entry)
    return out


def clone_tied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy that keeps tied tensors tied (one clone per storage), in state order."""
    out: dict[str, torch.Tensor] = {}
    for e in unique_tensors(state):
        t = e.tensor.detach().to("cpu", copy=True).contiguous()
        for name in (e.name, *e.aliases):
            out[name] = t
    return {k: out[k] for k in state}


def state_digest(entries: list[TensorEntry]) -> str:
    """sha256 over names, aliases, dtypes, shapes and bytes, streaming tensor by tensor."""
    h = hashlib.sha256()
    for e in entries:
        t = e.tensor.detach()
        h.update(f"{e.name}|{','.join(e.aliases)}|{dtype_name(t.dtype)}|{tuple(t.shape)}\n".encode())
        if t.numel():
            flat = t.reshape(-1)
            if flat.device.type != "cpu":
                flat = flat.cpu()
            h.update(flat.contiguous().view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def digest(state: Mapping[str, torch.Tensor]) -> str:
    return state_digest(unique_tensors(state))


def build_manifest(entries: list[TensorEntry], encoding: int, codec: int, block_size: int,
                   chunk_elems: int, payload: int = pb.WEIGHTS, digest_value: str | None = None) -> pb.Manifest:
    check_framing(encoding, codec, block_size, chunk_elems)
    m = pb.Manifest(encoding=encoding, codec=codec, block_size=block_size, chunk_elems=chunk_elems,
                    payload=payload, digest=digest_value if digest_value is not None else state_digest(entries))
    wire = 0
    for e in entries:
        m.tensors.add(name=e.name, dtype=dtype_name(e.tensor.dtype), shape=list(e.tensor.shape), aliases=e.aliases)
        wire += tensor_wire_bytes(e.tensor.dtype, e.tensor.numel(), encoding, block_size, chunk_elems)
    m.wire_bytes = wire if codec == pb.NONE else 0
    return m


def tensor_wire_bytes(dtype: torch.dtype, numel: int, encoding: int, block_size: int, chunk_elems: int) -> int:
    """Payload plus scales of one tensor, uncompressed."""
    enc = wire_encoding(encoding, dtype)
    full, rest = divmod(numel, chunk_elems)
    total = full * (payload_len(enc, dtype, chunk_elems) + scales_len(enc, chunk_elems, block_size))
    if rest:
        total += payload_len(enc, dtype, rest) + scales_len(enc, rest, block_size)
    return total


def check_framing(encoding: int, codec: int, block_size: int, chunk_elems: int) -> None:
    if encoding not in ENCODINGS.values():
        raise WireError("encoding", f"unknown encoding {encoding}")
    if codec not in CODECS.values():
        raise WireError("codec", f"unknown codec {codec}")
    if not 0 < block_size <= MAX_BLOCK_SIZE:
        raise WireError("framing", f"block_size {block_size} outside 1..{MAX_BLOCK_SIZE}")
    if not 0 < chunk_elems <= MAX_CHUNK_ELEMS:
        raise WireError("framing", f"chunk_elems {chunk_elems} outside 1..{MAX_CHUNK_ELEMS}")
    if encoding in BLOCKWISE and chunk_elems % block_size:
        raise WireError("framing", f"chunk_elems {chunk_elems} is not a multiple of block_size {block_size}")


@dataclass(frozen=True)
class Layout:
    """The checked form of a manifest entry."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    aliases: tuple[str, ...]


def check_manifest(m: pb.Manifest, expect: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
                   max_elems: int | None = None) -> list[Layout]:
    """Validate a manifest received from a peer; `expect` pins names, dtypes and shapes."""
    check_framing(m.encoding, m.codec, m.block_size, m.chunk_elems)
    if len(m.tensors) > MAX_TENSORS:
        raise WireError("manifest", f"manifest lists {len(m.tensors)} tensors, more than {MAX_TENSORS}")
    names: set[str] = set()
    out: list[Layout] = []
    total = 0
    for spec in m.tensors:
        for n in (spec.name, *spec.aliases):
            if not n or n in names:
                raise WireError("manifest", f"tensor name {n!r} is empty or listed twice")
            names.add(n)
        dtype = dtype_from_name(spec.dtype)
        shape = tuple(int(s) for s in spec.shape)
        if any(s < 0 for s in shape):
            raise WireError("shape", f"{spec.name}: negative dimension in shape {shape}")
        numel = 1
        for s in shape:
            numel *= s
        total += numel
        if max_elems is not None and total > max_elems:
            raise WireError("manifest", f"manifest declares more than {max_elems} elements")
        out.append(Layout(spec.name, dtype, shape, numel, tuple(spec.aliases)))
    if expect is not None:
        for lay in out:
            for n in (lay.name, *lay.aliases):
                if n not in expect:
                    raise WireError("unknown_tensor", f"tensor {n!r} is not part of the model")
            dt, shape = expect[lay.name]
            if tuple(shape) != lay.shape:
                raise WireError("shape", f"{lay.name}: shape {lay.shape} does not match the model's {tuple(shape)}")
            if dt != lay.dtype:
                raise WireError("dtype", f"{lay.name}: dtype {dtype_name(lay.dtype)} does not match the model's "
                                         f"{dtype_name(dt)}")
        missing = sorted(set(expect) - names)
        if missing:
            raise WireError("missing", f"manifest lacks {len(missing)} model tensor(s), first {missing[0]!r}")
    return out


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What check_manifest(expect=...) needs, for a model state dict."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
