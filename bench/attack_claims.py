"""A device that lies about its sample count, against a live server: how far can it move the model?

One honest daemon and one attacker share a round (tiny preset, mutual TLS
on loopback, 2 local steps of batch 8). The attacker joins with 10 samples,
takes its task, downloads the model and uploads it back with a shifted
embedding and num_samples = 2^40. The server weights an update by its claim
only up to the work its task allowed (fedserver.intake.weight_bound), so the
global embedding moves by at most (cut weight / total weight) x shift, plus
the honest device's own share. Without that bound the next model would have
been the attacker's.

    python -m bench.attack_claims [--out DIR] [--shift 1.0] [--claim 1099511627776]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedclient.transfer import Limits, download, upload
from fedcore.channel import ClientSecurity, open_channel
from fedcore.wire import TransferSpec, codec_name, encoding_name, unique_tensors
from fedserver.app import build_coordinator
from fedserver.certs import write_fleet
from fedserver.config import ServerConfig
from fedcore.wire import clone_tied
from fedserver.service import make_server
from fedserver.storage import RoundLog, load_checkpoint
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING = "shared.weight"
ATTACKER, HONEST = "attacker", "honest"


@dataclass
class AttackResult:
    claim: int
    weight_used: int  # the attacker's FedAvg weight as the server used it
    weight_cut: str  # the round log's reason
    honest_claim: int
    honest_weight: int
    shift: float
    max_change: float  # max |new global - old global| over the embedding
    bound: float  # (weight used / total weight) x shift: the attack's share of the change
    honest_part: float  # (honest weight / total weight) x max |honest delta|: what the honest update adds
    unbounded_change: float  # max |change| had the claim been taken as is
    unbounded_from_attacker: float  # max |that model - the attacker's upload| over the embedding
    seconds: float


def server_config(out: Path, tls: dict[str, Path]) -> ServerConfig:
    cfg = ServerConfig(listen="127.0.0.1:0", out=out, preset="tiny", rounds=1, devices_per_round=2, min_updates=2,
                       round_deadline_s=120.0, local_steps=2, batch_size=8, learning_rate=1e-3, max_input_tokens=128,
                       max_target_tokens=32, eval_size=0, poll_seconds=1, liveness_s=60.0, save_updates=True,
                       upload_encoding="fp32", **tls)
    cfg.validate()
    return cfg


def _no_wait(_attempt: int) -> None:
    time.sleep(0.2)


def _attacker(address: str, security: ClientSecurity, shift: float, claim: int) -> dict[str, torch.Tensor]:
    """Join with 10 samples, take the task, upload the model with a shifted embedding; returns what it sent."""
    with open_channel(address, security) as ch:
        stub = pbg.FederationStub(ch)
        sid = stub.Join(pb.JoinRequest(device_id=ATTACKER, num_samples=10), timeout=60, wait_for_ready=True).session_id
        task = stub.GetTask(pb.TaskRequest(device_id=ATTACKER, session_id=sid), timeout=60)
        while task.kind != pb.Task.TRAIN:
            task = stub.GetTask(pb.TaskRequest(device_id=ATTACKER, session_id=sid), timeout=60)
        assert (task.training.local_steps, task.training.batch_size) == (2, 8), task.training
        state, _ = download(stub, ATTACKER, sid, task.model_version, None, Limits(stall_s=60), _no_wait)
        canonical = {e.name: e.tensor for e in unique_tensors(state)}
        canonical[EMBEDDING] = canonical[EMBEDDING] + shift
        sent = {k: canonical[e.name] for e in unique_tensors(state) for k in (e.name, *e.aliases)}
        sent = {k: sent[k] for k in state}  # ties kept, the state dict's order
        up = task.upload
        spec = TransferSpec(encoding_name(up.encoding), codec_name(up.codec), block_size=up.block_size,
                            chunk_elems=up.chunk_elems)
        hdr = pb.UploadHeader(device_id=ATTACKER, session_id=sid, task_id=task.task_id, round=task.round,
                              base_version=task.model_version, num_samples=claim)
        upload(stub, hdr, sent, spec, Limits(stall_s=60), _no_wait)
        # Metrics spare the round its wait for them.
        stub.ReportMetrics(pb.RoundMetrics(device_id=ATTACKER, session_id=sid, task_id=task.task_id,
                                           round=task.round, t_comp_s=0.1, num_samples=claim), timeout=30)
        return canonical


def _daemon(address: str, cert: Path, key: Path, ca: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    argv = [sys.executable, "-m", "fedclient", "run", "--server", address, "--device-id", HONEST, "--data-size", "24",
            "--threads", "1", "--retry-initial-s", "0.2", "--retry-max-s", "1",
            "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def run_attack(out: Path, shift: float = 1.0, claim: int = 1 << 40) -> AttackResult:
    """One round with an honest daemon and the attacker; figures from the server's model and round log."""
    t0 = time.monotonic()
    fleet = write_fleet(out / "pki", [HONEST, ATTACKER], ["127.0.0.1", "localhost"])
    cfg = server_config(out / "srv", fleet.server_settings())
    coord = build_coordinator(cfg)
    base = clone_tied(coord.state)[EMBEDDING]
    server = make_server(coord, cfg.listen, 16)
    port = server.port
    server.start()
    loop = threading.Thread(target=coord.run, daemon=True)
    loop.start()
    address = f"127.0.0.1:{port}"
    daemon = _daemon(address, *fleet.device(HONEST), fleet.ca_cert, out / "honest.log")
    try:
        sent = _attacker(address, ClientSecurity(tls_ca=fleet.ca_cert, tls_cert=fleet.device(ATTACKER)[0],
                                                 tls_key=fleet.device(ATTACKER)[1]), shift, claim)
        loop.join(180)
        if loop.is_alive() or coord.round_no < 1:
            raise RuntimeError(f"the round did not complete; see {out / 'honest.log'}")
        new = coord.state[EMBEDDING]
    finally:
        coord.stop()
        loop.join(10)
        try:
            daemon.wait(30)  # a finished server tells it SHUTDOWN at its next poll
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        server.stop(0)
    recs = {r["client"]: r for r in RoundLog(cfg.out / "rounds.jsonl").read()}
    att, hon = recs[ATTACKER], recs[HONEST]
    honest_up, _ = load_checkpoint(cfg.out / "updates" / "round-000001" / f"{HONEST}.safetensors")
    # In float64: next to a weight of 2^40 the honest share is below fp32's resolution.
    d_att, d_hon = sent[EMBEDDING].double() - base.double(), honest_up[EMBEDDING].double() - base.double()
    total = att["num_samples"] + hon["num_samples"]
    # What FedAvg gives with the claims taken as they came.
    c_att, c_hon = float(att.get("num_samples_claimed", att["num_samples"])), float(hon["num_samples"])
    unbounded = base.double() + (c_att * d_att + c_hon * d_hon) / (c_att + c_hon)
    return AttackResult(
        claim=int(c_att), weight_used=att["num_samples"], weight_cut=att.get("weight_cut", ""),
        honest_claim=hon.get("num_samples_claimed", hon["num_samples"]), honest_weight=hon["num_samples"],
        shift=shift, max_change=float((new - base).abs().max()), bound=att["num_samples"] / total * shift,
        honest_part=hon["num_samples"] / total * float(d_hon.abs().max()),
        unbounded_change=float((unbounded - base.double()).abs().max()),
        unbounded_from_attacker=float((unbounded - sent[EMBEDDING].double()).abs().max()),
        seconds=time.monotonic() - t0)


def render(r: AttackResult) -> str:
    return "\n".join([
        f"attacker claim                 {r.claim} samples (joined with 10; task: 2 steps x batch 8)",
        f"weight the server used         {r.weight_used}" + (f"  ({r.weight_cut})" if r.weight_cut else "  (NOT cut)"),
        f"honest weight                  {r.honest_weight} (claimed {r.honest_claim})",
        f"shift on {EMBEDDING}       +{r.shift:g}",
        f"max |change| of the embedding  {r.max_change:.6f}",
        f"bound (cut/total) x shift      {r.bound:.6f}  (+ honest share {r.honest_part:.6f} = {r.bound + r.honest_part:.6f})",
        f"without the fix                max |change| {r.unbounded_change:.6f}; the global embedding would be the "
        f"attacker's upload to within {r.unbounded_from_attacker:.2e}",
        f"({r.seconds:.1f} s)",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attack_claims", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--shift", type=float, default=1.0, help="added to every value of the shared embedding")
    ap.add_argument("--claim", type=int, default=1 << 40, help="the attacker's num_samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.out is not None:
        print(render(run_attack(args.out, args.shift, args.claim)))
        return 0
    with tempfile.TemporaryDirectory(prefix="attack-claims-") as tmp:
        print(render(run_attack(Path(tmp), args.shift, args.claim)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
