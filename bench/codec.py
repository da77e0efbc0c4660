"""Wire codec figures for a FLAN-T5 preset: bytes on the wire, speed and round-trip error per encoding x codec.

    python -m bench.codec --preset small [--json] [--encodings fp32 int8] [--codecs none zstd zstd-bg]
                          [--zstd-level 3] [--block-size 64] [--weights-dir DIR] [--deltas STEPS]

With --deltas STEPS the same table is printed a second time for a real
update delta: the model fine-tuned STEPS local steps (AdamW, built-in corpus,
as a device does in a round) minus the model before, which is what delta
uploads and broadcast deltas carry. Weights and deltas compress differently:
a delta's exponents spread over a narrow band of small magnitudes, and
random-init weights have no trained structure, so figures for real FLAN-T5
weights differ again.

Speeds are MB/s of fp32 input (the state with tied tensors once, 4 bytes per
element) over the full encode iterator and over the full receive + finish()
(finish verifies the digest where the encoding is lossless). Encoding and
receiving are interleaved chunk by chunk, as on a real link, and timed
separately, so memory stays at one model copy plus the receiver's.
Figures only: nothing here passes or fails on a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench._models import count_parameters, load_model, preset_names
from fedcore.wire import (CODECS, ENCODINGS, StateEncoder, StateReceiver, TransferSpec, state_digest,
                          unique_tensors)
from fedcore.wire.stream import DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_ELEMS

MB = 1e6  # decimal megabytes, as the study reports (FLAN-T5-Small fp32: 308 MB)
STUDY_SMALL_FP32_MB = 308


@dataclass
class Row:
    """One encoding x codec measurement."""
    encoding: str
    codec: str
    wire_bytes: int          # serialized chunks plus the manifest, as gRPC carries them (before HTTP/2 framing)
    payload_bytes: int       # payload and scales only
    chunks: int
    ratio_to_fp32: float     # wire_bytes / fp32 state bytes (tied once)
    encode_s: float
    decode_s: float
    encode_mb_s: float
    decode_mb_s: float
    max_abs_err: float
    mean_abs_err: float
    rel_err: float           # ||received - sent|| / ||sent|| over all float elements


def measure(state: dict[str, torch.Tensor], spec: TransferSpec, fp32_bytes: int, digest: str) -> Row:
    """Stream state through encoder and receiver once, timing each side."""
    encoder = StateEncoder(state, spec, digest=digest)
    receiver = StateReceiver(encoder.manifest)
    wire = encoder.manifest.ByteSize()
    payload = chunks = 0
    t_enc = t_dec = 0.0
    it = encoder.chunks()
    while True:
        t0 = time.perf_counter()
        c = next(it, None)
        t1 = time.perf_counter()
        t_enc += t1 - t0
        if c is None:
            break
        receiver.accept(c)
        t_dec += time.perf_counter() - t1
        chunks += 1
        wire += c.ByteSize()
        payload += len(c.payload) + len(c.scales)
    t0 = time.perf_counter()
    out = receiver.finish()
    t_dec += time.perf_counter() - t0

    max_err, sum_err, n, sq_err, sq_ref = 0.0, 0.0, 0, 0.0, 0.0
    for e in encoder.entries:
        a, b = e.tensor.detach(), out[e.name]
        if a.numel() == 0:
            continue
        diff = (a.double() - b.double()).abs() if a.dtype.is_floating_point else (a != b).double()
        max_err = max(max_err, diff.max().item())
        sum_err += diff.sum().item()
        n += a.numel()
        if a.dtype.is_floating_point:
            sq_err += diff.pow(2).sum().item()
            sq_ref += a.double().pow(2).sum().item()
    return Row(spec.encoding, spec.codec, wire, payload, chunks, wire / fp32_bytes, t_enc, t_dec,
               fp32_bytes / MB / t_enc if t_enc else float("inf"), fp32_bytes / MB / t_dec if t_dec else float("inf"),
               max_err, sum_err / max(n, 1), (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0)


def _names(values: list[str], allowed: dict[str, int], what: str) -> list[str]:
    out = [v.strip().lower() for item in values for v in item.split(",") if v.strip()]
    bad = [v for v in out if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=preset_names())
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="local Hugging Face directory with real FLAN-T5 weights (default: random init)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random init")
    ap.add_argument("--encodings", nargs="+", default=list(ENCODINGS), metavar="ENC",
                    help=f"any of {', '.join(ENCODINGS)} (default: all)")
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), metavar="CODEC",
                    help=f"any of {', '.join(CODECS)} (default: all)")
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--zstd-threads", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--chunk-elems", type=int, default=DEFAULT_CHUNK_ELEMS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: a stream is encoded and received chunk by chunk on "
                         "one thread, and a server runs one per client; 0 keeps torch's default)")
    ap.add_argument("--deltas", type=int, default=0, metavar="STEPS",
                    help="also measure a real update delta: the model after STEPS local AdamW steps minus before")
    ap.add_argument("--batch-size", type=int, default=8, help="--deltas: minibatch of the local steps")
    ap.add_argument("--learning-rate", type=float, default=1e-3, help="--deltas: AdamW learning rate")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    args = ap.parse_args(argv)
    encodings = _names(args.encodings, ENCODINGS, "encoding")
    codecs = _names(args.codecs, CODECS, "codec")
    if args.threads > 0:
        # On a shared machine, OpenMP workers of 1 MiB chunk ops spin-wait on
        # descheduled siblings and swing the figures by 10x.
        torch.set_num_threads(args.threads)

    model, source = load_model(args.preset, args.weights_dir, args.seed)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    entries = unique_tensors(state)
    params = count_parameters(model)
    state_fp32 = sum(4 * t.numel() for t in state.values())
    unique_fp32 = sum(4 * e.tensor.numel() for e in entries)
    tied = {e.name: e.aliases for e in entries if e.aliases}

    def table(what: dict[str, torch.Tensor], label: str) -> list[Row]:
        out: list[Row] = []
        for enc in encodings:
            for codec in codecs:
                spec = TransferSpec(encoding=enc, codec=codec, zstd_level=args.zstd_level,
                                    zstd_threads=args.zstd_threads, block_size=args.block_size,
                                    chunk_elems=args.chunk_elems)
                out.append(measure(what, spec, unique_fp32, state_digest(unique_tensors(what))))
                if not args.json:
                    print(f"  measured {label} {enc}/{codec}", file=sys.stderr, flush=True)
        return out

    rows = table(state, "weights")
    delta_rows: list[Row] = []
    delta_note = ""
    if args.deltas > 0:
        delta, delta_note = _update_delta(model, state, args)
        delta_rows = table(delta, "delta")

    info = {
        "preset": args.preset, "weights": source, "parameters": params,
        "state_dict_entries": len(state), "wire_tensors": len(entries), "tied": tied,
        "fp32_state_bytes_all_entries": state_fp32, "fp32_state_bytes_tied_once": unique_fp32,
        "block_size": args.block_size, "chunk_elems": args.chunk_elems, "zstd_level": args.zstd_level,
        "zstd_threads": args.zstd_threads, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    if args.json:
        print(json.dumps({**info, "rows": [asdict(r) for r in rows], "delta": delta_note,
                          "delta_rows": [asdict(r) for r in delta_rows]}, indent=2))
        return 0

    print(f"FLAN-T5 preset {args.preset}: {source}")
    print(f"parameters {params:,} (tied counted once); state_dict {len(state)} entries, {len(entries)} on the wire")
    for name, aliases in tied.items():
        print(f"tied: {name} also as {', '.join(aliases)}")
    print(f"fp32 state dict {state_fp32 / MB:,.1f} MB with every entry, {unique_fp32 / MB:,.1f} MB with tied "
          f"tensors once" + (f" (study: ~{STUDY_SMALL_FP32_MB} MB)" if args.preset == "small" else ""))
    print(f"chunk {args.chunk_elems} elements, block {args.block_size}, zstd level {args.zstd_level}, "
          f"torch {torch.__version__} on {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s)")
    print()
    print("weights:")
    _print_rows(rows)
    if delta_rows:
        print()
        print(f"update delta: {delta_note}")
        _print_rows(delta_rows)
    print()
    print("wire MB: serialized chunks + manifest (1 MB = 10^6 B); vs fp32: of the fp32 state with tied tensors once;")
    print("MB/s: fp32 input bytes per second of the encode iterator / of accept()+finish(); errors: |received - sent|;")
    print("rel err: ||received - sent|| / ||sent||; x zstd: wire bytes of zstd over this codec's, same encoding.")
    return 0


def _print_rows(rows: list[Row]) -> None:
    head = (f"{'encoding':<8} {'codec':<7} {'wire MB':>9} {'vs fp32':>8} {'x zstd':>7} {'enc MB/s':>9} "
            f"{'dec MB/s':>9} {'max |err|':>10} {'mean |err|':>10} {'rel err':>9}")
    print(head)
    print("-" * len(head))
    zstd = {r.encoding: r.wire_bytes for r in rows if r.codec == "zstd"}
    for r in rows:
        vs_zstd = f"{zstd[r.encoding] / r.wire_bytes:.3f}" if r.encoding in zstd else "-"
        print(f"{r.encoding:<8} {r.codec:<7} {r.wire_bytes / MB:>9.2f} {100 * r.ratio_to_fp32:>7.2f}% {vs_zstd:>7} "
              f"{r.encode_mb_s:>9.1f} {r.decode_mb_s:>9.1f} {r.max_abs_err:>10.3g} {r.mean_abs_err:>10.3g} "
              f"{r.rel_err:>9.3g}")


def _update_delta(model: torch.nn.Module, state: dict[str, torch.Tensor],
                  args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], str]:
    """Fine-tune a copy of the weights as a device does in a round; the delta keeps the state's ties."""
    from fedclient.trainer import TrainSettings, train_local
    from fedcore.data import load_corpus
    from fedcore.models import load_tokenizer
    from fedcore.wire import subtract

    before = {e.name: e.tensor.clone() for e in unique_tensors(state)}
    settings = TrainSettings(local_steps=args.deltas, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             seed=args.seed)
    r = train_local(model, load_tokenizer(args.weights_dir), load_corpus("builtin", 400, args.seed), settings,
                    torch.device("cpu"))
    after = {e.name: e.tensor.detach() for e in unique_tensors(model.state_dict())}
    d = subtract(after, before)
    tied = {a: d[e.name] for e in unique_tensors(state) for a in (e.name, *e.aliases)}
    return tied, (f"{r.steps} AdamW steps, lr {args.learning_rate:g}, minibatch {args.batch_size}, built-in corpus "
                  f"(loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}); fine-tuned minus initial weights")


if __name__ == "__main__":
    sys.exit(main())
