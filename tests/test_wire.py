"""Behaviour of the wire codec: round trips, error bounds, every check a receiver makes, resumption, tied tensors."""
from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

import pytest
import torch
import zstandard

from fedcore.wire import (CODECS, ENCODINGS, StateEncoder, StateReceiver, TransferSpec, WireError, digest,
                          layout_of)
from fedcore.wire.stream import chunk_crc
from fedtune.v1 import fedtune_pb2 as pb

# The NF4 code book as published with QLoRA (Dettmers et al. 2023, appendix E).
NF4_TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
NF4_HALF_MAX_GAP = max(b - a for a, b in zip(NF4_TABLE, NF4_TABLE[1:])) / 2


# ------------------------------------------------------------------ helpers
def send(state: Mapping[str, torch.Tensor], spec: TransferSpec, **kw) -> dict[str, torch.Tensor]:
    """Encode, receive and finish (digest verified where lossless)."""
    enc = StateEncoder(state, spec)
    rx = StateReceiver(enc.manifest, **kw)
    for c in enc.chunks():
        rx.accept(c)
    return rx.finish()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-exact comparison (tells -0.0 from 0.0)."""
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(1000, generator=g),         # several chunks, partial last chunk
        "matrix": torch.randn(30, 17, generator=g) * 5,
        "odd": torch.randn(129, generator=g),          # partial last block, odd nibble count
        "small": torch.randn(5, generator=g),          # smaller than one block
        "scalar": torch.tensor(-2.5),
        "empty": torch.empty(0),
        "empty2d": torch.empty(4, 0),
        "zeros": torch.zeros(70),                      # absmax 0: scale 0 must not divide by zero
        "steps": torch.arange(-64, 64, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
    }


def spec_for(encoding: str = "fp32", codec: str = "none", **kw) -> TransferSpec:
    kw.setdefault("chunk_elems", 256)
    kw.setdefault("block_size", 64)
    return TransferSpec(encoding=encoding, codec=codec, **kw)


def stream(state: Mapping[str, torch.Tensor], spec: TransferSpec) -> tuple[pb.Manifest, list[pb.Chunk]]:
    enc = StateEncoder(state, spec)
    return enc.manifest, list(enc.chunks())


# ------------------------------------------------------- lossless round trips
@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("encoding", ["fp32", "raw"])
def test_lossless_round_trip_is_bit_exact(encoding: str, codec: str) -> None:
    state = mixed_state()
    state["signed_zero"] = torch.tensor([0.0, -0.0, 1e-45, -3.4e38, 3.4e38])  # subnormal and extremes
    out = send(state, spec_for(encoding, codec))  # finish() verifies the digest
    assert set(out) == set(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(bits(out[k]), bits(v)), k


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_every_codec_is_lossless_over_bytes(encoding: str) -> None:
    """Whatever the encoding, zstd gives exactly what `none` gives."""
    state = mixed_state(1)
    plain = send(state, spec_for(encoding, "none"))
    for codec in CODECS:
        out = send(state, spec_for(encoding, codec, zstd_level=5))
        for k in state:
            assert torch.equal(bits(out[k]), bits(plain[k])), (codec, k)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_non_float_tensors_travel_losslessly(encoding: str) -> None:
    state = {
        "i64": torch.tensor([-(2 ** 62), -1, 0, 1, 2 ** 62 + 7]),
        "i32": torch.arange(-300, 300, dtype=torch.int32),
        "u8": torch.arange(256, dtype=torch.uint8),
        "i8": torch.arange(-128, 128, dtype=torch.int8),
        "flag": torch.tensor([True, False, True] * 50),
        "w": torch.randn(100),
    }
    out = send(state, spec_for(encoding, "zstd"))
    for k, v in state.items():
        if k != "w":
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


@pytest.mark.parametrize("encoding", ["fp16", "bf16"])
def test_half_encodings_equal_torch_cast(encoding: str) -> None:
    half = torch.float16 if encoding == "fp16" else torch.bfloat16
    state = {"a": torch.randn(777) * 3, "b": torch.randn(8, 9) * 1e-3, "h": torch.randn(50).to(half)}
    out = send(state, spec_for(encoding))
    for k, v in state.items():
        assert out[k].dtype == v.dtype, k
        assert torch.equal(out[k], v.to(half).to(v.dtype)), k


# --------------------------------------------------------------- error bounds
def per_block(x: torch.Tensor, y: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block absmax of x, per-block max |x - y|, and y split in blocks (float64; zero padding is neutral)."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    pad = (-x.numel()) % block
    xb = torch.nn.functional.pad(x, (0, pad)).view(-1, block)
    yb = torch.nn.functional.pad(y, (0, pad)).view(-1, block)
    return xb.abs().amax(dim=1), (xb - yb).abs().amax(dim=1), yb


def check_int8(x: torch.Tensor, y: torch.Tensor, block: int) -> None:
    absmax, err, _ = per_block(x, y, block)
    bound = absmax / 254 * (1 + 1e-5) + 1e-30
    bad = (err > bound).nonzero()
    assert bad.numel() == 0, f"block {bad[0].item()}: error {err[bad[0]].item()} > {bound[bad[0]].item()}"


def check_nf4(x: torch.Tensor, y: torch.Tensor, block: int) -> None:
    absmax, err, yb = per_block(x, y, block)
    bound = NF4_HALF_MAX_GAP * absmax * (1 + 1e-5) + 1e-30
    bad = (err > bound).nonzero()
    assert bad.numel() == 0, f"block {bad[0].item()}: error {err[bad[0]].item()} > {bound[bad[0]].item()}"
    # Decoded values sit on the code book scaled by their block's absmax.
    levels = torch.tensor(NF4_TABLE, dtype=torch.float64)
    live = absmax > 0
    unit = yb[live] / absmax[live, None]
    dist = (unit[..., None] - levels).abs().amin(dim=-1)
    assert dist.numel() == 0 or dist.max().item() < 1e-5


def check_int4(x: torch.Tensor, y: torch.Tensor, block: int) -> None:
    absmax, err, yb = per_block(x, y, block)
    bound = absmax / 14 * (1 + 1e-5) + 1e-30
    bad = (err > bound).nonzero()
    assert bad.numel() == 0, f"block {bad[0].item()}: error {err[bad[0]].item()} > {bound[bad[0]].item()}"
    # Decoded values are whole multiples of absmax / 7 within -7..7.
    live = absmax > 0
    steps = yb[live] / (absmax[live, None] / 7)
    assert steps.numel() == 0 or ((steps - steps.round()).abs().max().item() < 1e-4
                                  and steps.abs().max().item() <= 7 + 1e-4)


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("block", [64, 32, 7])
@pytest.mark.parametrize("encoding,check", [("int8", check_int8), ("nf4", check_nf4), ("int4", check_int4)])
def test_blockwise_error_bounds(encoding: str, check: Callable, block: int, codec: str) -> None:
    g = torch.Generator().manual_seed(block)
    state = {
        "normal": torch.randn(1000, generator=g),
        "scaled": torch.randn(13, 31, generator=g) * torch.logspace(-6, 3, 31),  # blocks of very different scale
        "outlier": torch.cat([torch.randn(200, generator=g) * 1e-3, torch.tensor([50.0])]),
        "partial": torch.randn(block + 3, generator=g),                           # partial last block
        "tiny": torch.randn(max(1, block // 2), generator=g),                     # smaller than one block
        "zeros": torch.zeros(block * 2 + 1),
    }
    out = send(state, spec_for(encoding, codec, block_size=block, chunk_elems=block * 4))
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        check(v, out[k], block)
    assert torch.equal(out["zeros"], state["zeros"])


def test_empty_tensors_every_encoding() -> None:
    state = {"e": torch.empty(0), "e3": torch.empty(2, 0, 3), "i": torch.empty(0, dtype=torch.int64)}
    for encoding in ENCODINGS:
        for codec in CODECS:
            out = send(state, spec_for(encoding, codec))
            for k, v in state.items():
                assert out[k].shape == v.shape and out[k].dtype == v.dtype, (encoding, codec, k)


# ------------------------------------------------------------ hypothesis
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the property tests are extras; the rest of the file still runs
    given = None

if given is not None:
    finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)

    @settings(max_examples=40, deadline=None)
    @given(values=st.lists(finite32, max_size=300), chunk_blocks=st.integers(1, 4),
           codec=st.sampled_from(list(CODECS)))
    def test_property_fp32_bit_exact(values: list[float], chunk_blocks: int, codec: str) -> None:
        x = torch.tensor(values, dtype=torch.float32)
        out = send({"x": x}, spec_for("fp32", codec, block_size=16, chunk_elems=16 * chunk_blocks))
        assert torch.equal(bits(out["x"]), bits(x))

    @settings(max_examples=40, deadline=None)
    @given(values=st.lists(finite32, min_size=1, max_size=300), block=st.sampled_from([1, 3, 16, 64]))
    def test_property_int8_per_block_bound(values: list[float], block: int) -> None:
        """Includes values within an ulp of float32's max, whose scale * 127 once overflowed to inf."""
        x = torch.tensor(values, dtype=torch.float32)
        out = send({"x": x}, spec_for("int8", "none", block_size=block, chunk_elems=block * 2))
        check_int8(x, out["x"], block)


def test_int8_block_at_float32_max_decodes_finite() -> None:
    big = torch.finfo(torch.float32).max
    x = torch.tensor([big, -big, big / 3, 1.0])
    out = send({"x": x}, spec_for("int8", block_size=1, chunk_elems=4))
    assert torch.isfinite(out["x"]).all()
    check_int8(x, out["x"], 1)


# -------------------------------------------------------- receiver checks
NAME = "victim.weight"


def victim_stream(encoding: str = "int8", codec: str = "none") -> tuple[pb.Manifest, list[pb.Chunk]]:
    g = torch.Generator().manual_seed(3)
    state = {"first": torch.randn(100, generator=g), NAME: torch.randn(10, 60, generator=g),
             "last": torch.randn(3, generator=g)}
    return stream(state, spec_for(encoding, codec, chunk_elems=256))


def victim_chunks(chunks: list[pb.Chunk]) -> list[int]:
    return [i for i, c in enumerate(chunks) if c.tensor == NAME]


def recrc(c: pb.Chunk) -> None:
    c.crc32c = chunk_crc(c.scales, c.payload)


def flip_payload(c: pb.Chunk) -> None:
    p = bytearray(c.payload)
    p[len(p) // 2] ^= 0x10
    c.payload = bytes(p)


def flip_scales(c: pb.Chunk) -> None:
    s = bytearray(c.scales)
    s[1] ^= 0x01
    c.scales = bytes(s)


def truncate(c: pb.Chunk) -> None:
    c.payload = c.payload[:-3]
    recrc(c)


def inflate_raw_len(c: pb.Chunk) -> None:
    c.raw_len += 1


def shrink_count(c: pb.Chunk) -> None:
    c.count -= 1


def off_grid(c: pb.Chunk) -> None:
    c.offset += 1


def beyond(c: pb.Chunk) -> None:
    c.offset = 256 * 10


def reshape(c: pb.Chunk) -> None:
    c.shape[:] = [60, 10]


def retype(c: pb.Chunk) -> None:
    c.dtype = "float16"


def rename(c: pb.Chunk) -> None:
    c.tensor = NAME + ".typo"


def reencode(c: pb.Chunk) -> None:
    c.encoding = pb.FP16


CORRUPTIONS = [
    ("payload byte", flip_payload, "checksum"),
    ("scales byte", flip_scales, "checksum"),
    ("truncated payload", truncate, "length"),
    ("raw_len", inflate_raw_len, "length"),
    ("count", shrink_count, "length"),
    ("offset off grid", off_grid, "offset"),
    ("offset beyond", beyond, "offset"),
    ("shape", reshape, "shape"),
    ("dtype", retype, "dtype"),
    ("unknown tensor", rename, "unknown_tensor"),
    ("encoding", reencode, "encoding"),
]


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("what,corrupt,kind", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_chunk_is_refused(what: str, corrupt: Callable[[pb.Chunk], None], kind: str, codec: str) -> None:
    manifest, chunks = victim_stream("int8", codec)
    rx = StateReceiver(manifest)
    target = victim_chunks(chunks)[1]  # a middle chunk, after a good one of the same tensor
    for i, c in enumerate(chunks):
        if i == target:
            bad = pb.Chunk()
            bad.CopyFrom(c)
            corrupt(bad)
            with pytest.raises(WireError) as info:
                rx.accept(bad)
            assert info.value.kind == kind, (what, info.value.kind, str(info.value))
            assert NAME in str(info.value), str(info.value)
        rx.accept(c)  # a refused chunk leaves the receiver usable: the good copy is accepted
    out = rx.finish()
    assert out[NAME].shape == (10, 60)


def test_duplicate_chunk_is_refused() -> None:
    manifest, chunks = victim_stream("fp32")
    rx = StateReceiver(manifest)
    for c in chunks:
        rx.accept(c)
    with pytest.raises(WireError) as info:
        rx.accept(chunks[victim_chunks(chunks)[0]])
    assert info.value.kind == "duplicate" and NAME in str(info.value)


def test_missing_chunk_fails_finish() -> None:
    manifest, chunks = victim_stream("fp32")
    rx = StateReceiver(manifest)
    skip = victim_chunks(chunks)[1]
    for i, c in enumerate(chunks):
        if i != skip:
            rx.accept(c)
    assert not rx.complete
    with pytest.raises(WireError) as info:
        rx.finish()
    assert info.value.kind == "missing" and NAME in str(info.value)


def test_tampered_payload_with_valid_crc_fails_digest() -> None:
    manifest, chunks = victim_stream("fp32")
    rx = StateReceiver(manifest)
    for i, c in enumerate(chunks):
        if i == victim_chunks(chunks)[0]:
            c = pb.Chunk(tensor=c.tensor, dtype=c.dtype, shape=c.shape, offset=c.offset, count=c.count,
                         encoding=c.encoding, codec=c.codec, block_size=c.block_size, raw_len=c.raw_len,
                         payload=struct.pack("<f", 123.0) + c.payload[4:])
            recrc(c)
        rx.accept(c)
    with pytest.raises(WireError) as info:
        rx.finish()
    assert info.value.kind == "digest"


def test_bool_payload_with_non_boolean_bytes_is_refused() -> None:
    manifest, chunks = stream({"flag": torch.tensor([True, False, True])}, spec_for("fp32"))
    bad = chunks[0]
    bad.payload = b"\x01\x02\x00"
    recrc(bad)
    with pytest.raises(WireError) as info:
        StateReceiver(manifest).accept(bad)
    assert info.value.kind == "value" and "flag" in str(info.value)


def test_non_finite_block_scale_is_refused() -> None:
    manifest, chunks = victim_stream("int8")
    c = chunks[victim_chunks(chunks)[0]]
    c.scales = struct.pack("<f", float("inf")) + c.scales[4:]
    recrc(c)
    with pytest.raises(WireError) as info:
        StateReceiver(manifest).accept(c)
    assert info.value.kind == "value" and NAME in str(info.value)


@pytest.mark.parametrize("codec", ["zstd", "zstd-bg"])
@pytest.mark.parametrize("content_size", [True, False])
def test_zstd_bomb_is_refused(content_size: bool, codec: str) -> None:
    """A small payload that decompresses far beyond raw_len is refused, not inflated."""
    manifest, chunks = victim_stream("fp32", codec)
    c = chunks[victim_chunks(chunks)[0]]
    c.payload = zstandard.ZstdCompressor(write_content_size=content_size).compress(bytes(64 << 20))
    recrc(c)
    assert len(c.payload) < 64 << 10
    with pytest.raises(WireError) as info:
        StateReceiver(manifest).accept(c)
    assert info.value.kind == "length" and NAME in str(info.value)


def test_zstd_header_claiming_huge_size_is_refused() -> None:
    """A forged frame header declaring 32 TiB gives a WireError, not a MemoryError."""
    manifest, chunks = victim_stream("fp32", "zstd")
    c = chunks[victim_chunks(chunks)[0]]
    # magic, descriptor (8-byte content size, single segment), content size, last empty raw block
    c.payload = struct.pack("<I", 0xFD2FB528) + b"\xe0" + struct.pack("<Q", 1 << 45) + b"\x01\x00\x00"
    recrc(c)
    with pytest.raises(WireError) as info:
        StateReceiver(manifest).accept(c)
    assert info.value.kind in ("length", "codec") and NAME in str(info.value)


# ----------------------------------------------------------- resumption
@pytest.mark.parametrize("encoding,codec", [("fp32", "none"), ("raw", "zstd"), ("int8", "zstd")])
@pytest.mark.parametrize("cut", [1, 3, 5])
def test_resume_from_next_position(encoding: str, codec: str, cut: int) -> None:
    state = mixed_state(7)
    spec = spec_for(encoding, codec, chunk_elems=128)
    full = send(state, spec)
    first = StateEncoder(state, spec)
    rx = StateReceiver(first.manifest)
    for i, c in enumerate(first.chunks()):
        if i == cut:
            break  # the link drops
        rx.accept(c)
    pos = rx.next_position()
    assert pos is not None and (pos.tensor_index, pos.offset) != (0, 0)
    # A fresh encoder (the sender restarted) continues where the receiver stands.
    again = StateEncoder(state, spec)
    assert again.manifest.digest == rx.manifest.digest
    resent = list(again.chunks(pos))
    assert len(resent) == len(list(first.chunks())) - cut
    for c in resent:
        rx.accept(c)
    assert rx.next_position() is None
    out = rx.finish()  # digest verified for the lossless encodings
    for k in state:
        assert torch.equal(bits(out[k]), bits(full[k])), k


def test_resume_mid_tensor() -> None:
    state = {"a": torch.randn(10), "b": torch.randn(1000), "c": torch.randn(3)}
    spec = spec_for(chunk_elems=128)
    enc = StateEncoder(state, spec)
    rx = StateReceiver(enc.manifest)
    chunks = list(enc.chunks())
    for c in chunks[:4]:  # a, b[0:128], b[128:256], b[256:384]
        rx.accept(c)
    pos = rx.next_position()
    assert (pos.tensor_index, pos.offset) == (1, 384)
    for c in enc.chunks(pos):
        rx.accept(c)
    out = rx.finish()
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_start_off_the_grid_is_refused() -> None:
    enc = StateEncoder({"b": torch.randn(1000)}, spec_for(chunk_elems=128))
    with pytest.raises(WireError) as info:
        next(enc.chunks(pb.Position(tensor_index=0, offset=100)))
    assert info.value.kind == "offset"


# ------------------------------------------------ tied tensors and a real T5
def tiny_t5(seed: int) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).eval()


ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@pytest.fixture(scope="module")
def t5_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_t5(0), tiny_t5(1)


def test_t5_tied_embedding_travels_once(t5_pair) -> None:
    src, _ = t5_pair
    state = src.state_dict()
    enc = StateEncoder(state, spec_for("fp32", chunk_elems=4096))
    names = [t.name for t in enc.manifest.tensors]
    shared = next(t for t in enc.manifest.tensors if t.name == "shared.weight")
    assert sorted(shared.aliases) == sorted(ALIASES)
    assert "lm_head.weight" in names and not any(a in names for a in ALIASES)
    sent = sum(c.count for c in enc.chunks())
    unique = sum(v.numel() for k, v in state.items() if k not in ALIASES)
    assert sent == unique < sum(v.numel() for v in state.values())
    assert enc.manifest.wire_bytes == 4 * unique

    rx = StateReceiver(enc.manifest, expect=layout_of(state))
    for c in enc.chunks():
        rx.accept(c)
    out = rx.finish()
    assert set(out) == set(state)
    for a in ALIASES:
        assert out[a] is out["shared.weight"]
    assert out["lm_head.weight"] is not out["shared.weight"]
    assert all(torch.equal(out[k], v) for k, v in state.items())


@pytest.mark.parametrize("encoding", ["fp32", "bf16"])
def test_receive_into_model_in_place(t5_pair, encoding: str) -> None:
    src, dst = t5_pair
    dest = dst.state_dict()
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    enc = StateEncoder(src.state_dict(), spec_for(encoding, "zstd", chunk_elems=4096))
    rx = StateReceiver(enc.manifest, dest=dest, expect=layout_of(dest))
    for c in enc.chunks():
        rx.accept(c)
    out = rx.finish()
    for k, v in src.state_dict().items():
        assert out[k].data_ptr() == ptrs[k], k                 # no new tensor: written in place
        want = v if encoding == "fp32" else v.to(torch.bfloat16).to(v.dtype)
        assert torch.equal(dst.state_dict()[k], want), k       # the model itself now holds the weights
    assert dst.encoder.embed_tokens.weight.data_ptr() == dst.shared.weight.data_ptr()
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 1]])
        dec = torch.tensor([[0, 5]])
        if encoding == "fp32":
            assert torch.equal(src(input_ids=ids, decoder_input_ids=dec).logits,
                               dst(input_ids=ids, decoder_input_ids=dec).logits)


def test_expect_rejects_unknown_tensor_and_wrong_shape(t5_pair) -> None:
    src, _ = t5_pair
    state = dict(src.state_dict())
    expect = layout_of(state)
    extra = dict(state, **{"intruder.weight": torch.zeros(3)})
    with pytest.raises(WireError) as info:
        StateReceiver(StateEncoder(extra, spec_for()).manifest, expect=expect)
    assert info.value.kind == "unknown_tensor" and "intruder.weight" in str(info.value)

    wrong = dict(state, **{"lm_head.weight": torch.zeros(10, 32)})
    with pytest.raises(WireError) as info:
        StateReceiver(StateEncoder(wrong, spec_for()).manifest, expect=expect)
    assert info.value.kind == "shape" and "lm_head.weight" in str(info.value)


def test_absurd_manifest_rejected_by_max_elems() -> None:
    m = StateEncoder({"w": torch.zeros(10)}, spec_for()).manifest
    m.tensors[0].shape[:] = [1 << 31, 1 << 31]
    with pytest.raises(WireError) as info:
        StateReceiver(m, max_elems=10 ** 9)
    assert info.value.kind == "manifest"
    ok = StateEncoder({"w": torch.zeros(10)}, spec_for()).manifest
    StateReceiver(ok, max_elems=10)  # exactly at the limit is accepted


def test_negative_dimension_rejected() -> None:
    m = StateEncoder({"w": torch.zeros(10)}, spec_for()).manifest
    m.tensors[0].shape[:] = [-2, -5]
    with pytest.raises(WireError) as info:
        StateReceiver(m)
    assert info.value.kind == "shape" and "w" in str(info.value)


# ---------------------------------------------------------------- digest
def test_digest_changes_with_one_element() -> None:
    state = {"a": torch.randn(100), "b": torch.arange(10)}
    d0 = digest(state)
    assert digest({k: v.clone() for k, v in state.items()}) == d0
    changed = {k: v.clone() for k, v in state.items()}
    changed["a"][57] = torch.nextafter(changed["a"][57], torch.tensor(float("inf")))
    assert digest(changed) != d0
    changed = {k: v.clone() for k, v in state.items()}
    changed["b"][0] += 1
    assert digest(changed) != d0
    renamed = {"c" if k == "a" else k: v for k, v in state.items()}
    assert digest(renamed) != d0
