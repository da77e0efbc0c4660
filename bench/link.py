"""A preset's model down and up one emulated link through the real protocol, next to raw TCP.

    python -m bench.link --preset small --profile lte [--encoding fp32] [--codec none] [--json]

Needs root (network namespaces). `fedserver run` serves from the topology's
server namespace; a device process in the device namespace downloads the
global model and uploads it back as its update. In the same run a raw TCP
transfer of the same number of bytes crosses the same link in each
direction. Prints both times and their ratio; it never fails on a time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER_PORT = 50051


def device_main(args: argparse.Namespace) -> int:
    """Inside the device namespace: join, take the task, download, upload, print JSON."""
    from fedclient.transfer import Limits, download, upload
    from fedcore.channel import ClientSecurity, open_channel
    from fedcore.wire import TransferSpec
    from fedtune.v1 import fedtune_pb2 as pb
    from fedtune.v1 import fedtune_pb2_grpc as pbg

    certs = Path(args.certs)
    channel = open_channel(args.server, ClientSecurity(certs / "ca.pem", certs / "devices" / "bench-link.pem",
                                                      certs / "devices" / "bench-link.key"))
    stub = pbg.FederationStub(channel)
    j = stub.Join(pb.JoinRequest(device_id="bench-link", num_samples=1), timeout=300, wait_for_ready=True)
    task = stub.GetTask(pb.TaskRequest(device_id="bench-link", session_id=j.session_id), timeout=300)
    while task.kind != pb.Task.TRAIN:
        task = stub.GetTask(pb.TaskRequest(device_id="bench-link", session_id=j.session_id), timeout=300)

    def no_retry(_attempt: int) -> None:
        raise RuntimeError("the bench does not retry")

    state, d = download(stub, "bench-link", j.session_id, task.model_version, None, Limits(retries=0, stall_s=0), no_retry)
    spec = TransferSpec(args.encoding, args.codec, block_size=task.upload.block_size,
                        chunk_elems=task.upload.chunk_elems)
    hdr = pb.UploadHeader(device_id="bench-link", session_id=j.session_id, task_id=task.task_id, round=task.round,
                          base_version=task.model_version, num_samples=1)
    _, u = upload(stub, hdr, state, spec, Limits(retries=0, stall_s=0), no_retry)
    print(json.dumps({"down_s": d.seconds, "down_bytes": d.bytes, "up_s": u.seconds + u.wait_s,
                      "up_wait_s": u.wait_s, "up_bytes": u.bytes}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.link", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--profile", default="lte", help="link profile (netem profiles lists them)")
    ap.add_argument("--encoding", default="fp32")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", action="store_true", help=argparse.SUPPRESS)  # internal: the device side
    ap.add_argument("--server", default="", help=argparse.SUPPRESS)
    ap.add_argument("--certs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device:
        return device_main(args)

    from fedserver.certs import write_fleet
    from netem.measure import measure_tcp
    from netem.profiles import parse_profile
    from netem.topology import Topology, require_namespaces

    profile = parse_profile(args.profile)
    require_namespaces()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp, Topology([profile]) as topo:
        dev = topo.devices[0]
        fleet = write_fleet(Path(tmp) / "certs", ["bench-link"], [topo.server_ip])
        server_argv = [py, "-m", "fedserver", "run", "--listen", f"0.0.0.0:{SERVER_PORT}", "--out", tmp,
                       "--preset", args.preset, "--rounds", "1", "--devices-per-round", "1", "--eval-size", "0",
                       "--download-encoding", args.encoding, "--download-codec", args.codec,
                       "--upload-encoding", args.encoding, "--upload-codec", args.codec, "--poll-seconds", "2",
                       "--checkpoint-keep", "1", "--tls-cert", str(fleet.server_cert), "--tls-key",
                       str(fleet.server_key), "--tls-ca", str(fleet.ca_cert)]
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(topo.exec_argv(topo.server_ns, server_argv), stdout=log, stderr=subprocess.STDOUT)
        try:
            device = subprocess.run(
                topo.exec_argv(dev.ns, [py, "-m", "bench.link", "--device", "--server",
                                        f"{topo.server_ip}:{SERVER_PORT}", "--certs", str(fleet.out),
                                        "--encoding", args.encoding,
                                        "--codec", args.codec]),
                capture_output=True, text=True)
            if device.returncode != 0:
                print(f"bench.link: device side failed:\n{device.stderr[-3000:]}", file=sys.stderr)
                return 1
            proto = json.loads(device.stdout.strip().splitlines()[-1])
        finally:
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
        rows = []
        for direction, nbytes, seconds, sender, receiver, rip, mbit in (
                ("down", proto["down_bytes"], proto["down_s"], topo.server_ns, dev.ns, dev.ip, profile.down_mbit),
                ("up", proto["up_bytes"], proto["up_s"], dev.ns, topo.server_ns, topo.server_ip, profile.up_mbit)):
            limit = nbytes * 8 / (mbit * 1e6) * 2 + 60
            tcp = measure_tcp(topo, sender, receiver, rip, nbytes, warmup_s=0.0, timeout_s=limit)
            rows.append({"direction": direction, "bytes": nbytes, "profile_mbit": mbit,
                         "protocol_s": seconds, "tcp_s": tcp.seconds, "ratio": seconds / tcp.seconds,
                         "protocol_mbit": nbytes * 8 / 1e6 / seconds, "tcp_mbit": nbytes * 8 / 1e6 / tcp.seconds})
        backend, warnings = topo.backend, list(topo.warnings)
    if args.json:
        print(json.dumps({"preset": args.preset, "profile": profile.name, "encoding": args.encoding,
                          "codec": args.codec, "backend": backend, "warnings": warnings, "rows": rows}, indent=2))
        return 0
    print(f"preset {args.preset}, {args.encoding}/{args.codec}, link {profile.name} "
          f"({profile.down_mbit:g}/{profile.up_mbit:g} Mbit/s, {backend} backend)")
    for w in warnings:
        print(f"  note: {w}")
    head = f"{'dir':>4} {'MB':>8} {'protocol s':>10} {'raw TCP s':>9} {'ratio':>6} {'proto Mbit/s':>12} {'TCP Mbit/s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['direction']:>4} {r['bytes'] / 1e6:8.1f} {r['protocol_s']:10.2f} {r['tcp_s']:9.2f} "
              f"{r['ratio']:6.3f} {r['protocol_mbit']:12.2f} {r['tcp_mbit']:10.2f}")
    total_p = sum(r["protocol_s"] for r in rows)
    total_t = sum(r["tcp_s"] for r in rows)
    print(f"total {total_p:.1f} s through the protocol, {total_t:.1f} s raw TCP: ratio {total_p / total_t:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
