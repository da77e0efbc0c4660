"""Stream a preset's state dict through the real gRPC services on loopback, next to raw TCP.

    python -m bench.stream --preset small [--encodings fp32,bf16,int8,nf4] [--codec none] [--json]

For each encoding: one download (server -> device, Download RPC) and one
upload (device -> server, Upload RPC, verified and folded into a round's
aggregate), and in the same run a raw TCP copy of the same number of bytes
over the same loopback. Prints MB/s of wire bytes for each and the ratio.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedcore.channel import ClientSecurity, open_channel
from fedcore.wire import TransferSpec
from fedserver.app import build_coordinator
from fedserver.certs import write_fleet
from fedserver.config import ServerConfig
from fedserver.service import make_server
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg
from fedclient.transfer import Limits, download, upload

from .rawtcp import copy_bytes

NO_RETRY = Limits(retries=0, stall_s=0)  # a bench measures one clean attempt


def _no_backoff(_attempt: int) -> None:
    time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--encodings", default="fp32,bf16,int8,nf4")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--chunk-elems", type=int, default=1 << 18)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        fleet = write_fleet(Path(tmp) / "certs", ["bench"])
        cfg = ServerConfig(listen="127.0.0.1:0", out=Path(tmp), preset=args.preset, rounds=len(encodings),
                           devices_per_round=1, eval_size=0, poll_seconds=5, chunk_elems=args.chunk_elems,
                           checkpoint_keep=1, download_codec=args.codec, upload_codec=args.codec,
                           max_message_bytes=max(16 << 20, args.chunk_elems * 4 + (1 << 20)),
                           max_chunk_elems=max(1 << 20, args.chunk_elems), **fleet.server_settings())
        coord = build_coordinator(cfg)
        server = make_server(coord, "127.0.0.1:0", 8)
        port = server.port
        server.start()
        loop = threading.Thread(target=coord.run, daemon=True)
        loop.start()
        rows = []
        try:
            cert, key = fleet.device("bench")
            channel = open_channel(f"127.0.0.1:{port}", ClientSecurity(fleet.ca_cert, cert, key))
            stub = pbg.FederationStub(channel)
            j = stub.Join(pb.JoinRequest(device_id="bench", num_samples=1))
            for enc in encodings:
                task = stub.GetTask(pb.TaskRequest(device_id="bench", session_id=j.session_id), timeout=600)
                while task.kind != pb.Task.TRAIN:
                    task = stub.GetTask(pb.TaskRequest(device_id="bench", session_id=j.session_id), timeout=600)
                codec = pb.ZSTD if args.codec == "zstd" else pb.NONE
                req_enc = {"fp32": pb.FP32, "fp16": pb.FP16, "bf16": pb.BF16, "int8": pb.INT8, "nf4": pb.NF4}[enc]
                state, d = download(stub, "bench", j.session_id, task.model_version, None, NO_RETRY, _no_backoff,
                                    encoding=req_enc, codec=codec)
                spec = TransferSpec(enc, args.codec, block_size=cfg.block_size, chunk_elems=cfg.chunk_elems)
                hdr = pb.UploadHeader(device_id="bench", session_id=j.session_id, task_id=task.task_id,
                                      round=task.round, base_version=task.model_version, num_samples=1)
                _, u = upload(stub, hdr, state, spec, NO_RETRY, _no_backoff)
                up_s = u.seconds + u.wait_s
                tcp_down = copy_bytes(d.bytes)
                tcp_up = copy_bytes(u.bytes)
                rows.append({"encoding": enc, "codec": args.codec, "wire_mb": d.bytes / 1e6,
                             "down_s": d.seconds, "down_mb_s": d.bytes / 1e6 / d.seconds,
                             "up_s": up_s, "up_mb_s": u.bytes / 1e6 / up_s,
                             "tcp_down_mb_s": d.bytes / 1e6 / tcp_down, "tcp_up_mb_s": u.bytes / 1e6 / tcp_up,
                             "down_ratio": (d.bytes / d.seconds) / (d.bytes / tcp_down),
                             "up_ratio": (u.bytes / up_s) / (u.bytes / tcp_up)})
        finally:
            coord.stop()
            server.stop(0)
    if args.json:
        print(json.dumps({"preset": args.preset, "rows": rows}, indent=2))
        return 0
    print(f"preset {args.preset}, loopback with mutual TLS, chunk {args.chunk_elems} elements; MB/s of wire bytes "
          f"(upload includes server verification and aggregation)")
    head = (f"{'encoding':>8} {'codec':>5} {'wire MB':>8} {'down MB/s':>10} {'TCP MB/s':>9} {'ratio':>6} "
            f"{'up MB/s':>8} {'TCP MB/s':>9} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['encoding']:>8} {r['codec']:>5} {r['wire_mb']:8.1f} {r['down_mb_s']:10.1f} "
              f"{r['tcp_down_mb_s']:9.1f} {r['down_ratio']:6.3f} {r['up_mb_s']:8.1f} {r['tcp_up_mb_s']:9.1f} "
              f"{r['up_ratio']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
