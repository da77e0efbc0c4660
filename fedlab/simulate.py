"""`fedserver simulate`: a whole federated run on this machine, every party its own process.

The server and each device daemon run as separate processes talking real
gRPC (over loopback, or through emulated links when a netem topology is
given), so T_comm and T_comp are measured by the same code that runs on a
real fleet.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedcore.config import ConfigError, check_fields, described, to_dict
from fedcore.hwreport import efficiency_lines

from fedserver.roundlog import read_summaries
from fedserver.config import INT32, PAYLOADS, ROUND_POLICIES, STRATEGIES, WIRE_CODECS, WIRE_ENCODINGS, ServerConfig


@dataclass
class SimulateConfig:
    out: Path = field(default=Path("runs/simulate"), metadata=described("run directory (rounds.jsonl, summary.json, logs/)"))
    preset: str = field(default="tiny", metadata=described("model preset: tiny, small, base, large, xl"))
    rounds: int = field(default=8, metadata=described("federated rounds", ge=1, le=INT32))
    devices: int = field(default=10, metadata=described("device daemons to start", ge=1, le=1000))
    devices_per_round: int = field(default=3, metadata=described("devices sampled each round", ge=1, le=1000))
    encoding: str = field(default="fp32", metadata=described("wire encoding, both directions: fp32, fp16, bf16, int8, "
                                                             "nf4, int4", choices=WIRE_ENCODINGS))
    codec: str = field(default="none", metadata=described("wire codec, both directions: none, zstd or zstd-bg",
                                                          choices=WIRE_CODECS))
    download_encoding: str | None = field(default=None, metadata=described("full-model downloads (default: --encoding)",
                                                                           choices=WIRE_ENCODINGS))
    upload_payload: str = field(default="weights", metadata=described("'weights' or 'delta' (local minus global)",
                                                                      choices=PAYLOADS))
    error_feedback: bool = field(default=False, metadata=described("delta uploads carry the quantization residual on"))
    download_payload: str = field(default="weights", metadata=described("'delta': quantized broadcast deltas to "
                                                                        "devices holding a recent version",
                                                                        choices=PAYLOADS))
    download_delta_encoding: str = field(default="int8", metadata=described("encoding of broadcast deltas",
                                                                            choices=WIRE_ENCODINGS))
    link_aware: bool = field(default=False, metadata=described("choose each device's upload encoding from its "
                                                               "measured link (see fedserver run --help)"))
    link_target_g: float = field(default=1.0, metadata=described("link_aware: wanted G per device", ge=0))
    link_byte_budget: int = field(default=0, metadata=described("link_aware: most upload bytes per device and round",
                                                                ge=0))
    lora_rank: int = field(default=0, metadata=described("LoRA rank: devices train and upload only the adapters' B "
                                                         "matrices (0: full fine-tuning)", ge=0, le=4096))
    lora_alpha: float = field(default=0.0, metadata=described("LoRA alpha (0: 2 x lora_rank)", ge=0))
    lora_targets: str = field(default="q,v", metadata=described("T5 linear layers that get adapters, e.g. q,v"))
    lora_dropout: float = field(default=0.0, metadata=described("dropout on the adapters' input in local training",
                                                                ge=0, lt=1))
    strategy: str = field(default="fedavg", metadata=described("fedavg, fedadam, fedadamw or fedyogi",
                                                               choices=STRATEGIES))
    server_lr: float | None = field(default=None, metadata=described("server learning rate (default: the strategy's)",
                                                                     gt=0))
    local_epochs: int = field(default=1, metadata=described("local epochs per round", ge=1, le=INT32))
    local_steps: int = field(default=0, metadata=described("local steps per round (0: use local_epochs)",
                                                           ge=0, le=INT32))
    batch_size: int = field(default=32, metadata=described("local minibatch size", ge=1, le=INT32))
    learning_rate: float = field(default=1e-3, metadata=described("local AdamW learning rate", gt=0))
    max_input_tokens: int = field(default=512, metadata=described("dialogue tokens kept", ge=1, le=INT32))
    max_target_tokens: int = field(default=95, metadata=described("summary tokens kept and generated", ge=1, le=INT32))
    data: str = field(default="builtin",
    metadata=described("'builtin' or a Samsum JSON/JSONL file split over the devices"))
    data_size: int = field(default=2000, metadata=described("training examples over all devices", ge=1))
    alpha: float = field(default=1.0, metadata=described("Dirichlet concentration of the split over devices", gt=0))
    eval_size: int = field(default=48, metadata=described("held-out examples evaluated each round", ge=0))
    weights_dir: Path | None = field(default=None, metadata=described("local Hugging Face dir with FLAN-T5 weights"))
    seed: int = field(default=0, metadata=described("seed of data, split, sampling and init", ge=0, le=(1 << 32) - 1))
    round_deadline_s: float = field(default=600.0, metadata=described("seconds a round waits for its updates", gt=0))
    threads_per_device: int = field(default=1, metadata=described("torch threads per daemon", ge=0, le=4096))
    save_updates: bool = field(default=False, metadata=described("keep every received update under out/updates"))
    round_policy: str = field(default="steps", metadata=described("steps, samples or time (see fedserver run --help)",
                                                                  choices=ROUND_POLICIES))
    local_samples: int = field(default=0, metadata=described("policy samples: samples per device (0: steps x batch)",
                                                             ge=0, le=INT32))
    time_budget_s: float = field(default=0.0, metadata=described("policy time: seconds per round (0: derived)", ge=0))
    compute_slowdown: list[float] = field(default_factory=list, metadata=described(
        "per device (comma-separated, one value for all): EMULATED compute slowdown factor", ge=1))
    max_batch_size: list[int] = field(default_factory=list, metadata=described(
        "per device (comma-separated, one value for all): largest minibatch the device fits (0: server's)", ge=0))
    max_upload_mbit: float = field(default=0.0, metadata=described("cap every device's upload rate (Mbit/s, 0: none)",
                                                                   ge=0))
    chunk_elems: int = field(default=1 << 18, metadata=described("elements per wire chunk (both directions)",
                                                                 ge=1, le=INT32))
    stall_timeout_s: float = field(default=60.0, metadata=described("devices cancel and resume a transfer stalled "
                                                                    "this long", gt=0))
    metrics_port: int = field(default=0, metadata=described("serve Prometheus /metrics: the server on 127.0.0.1:PORT, "
                                                            "device i on PORT+1+i (0: off)", ge=0, le=65535))
    link: str | None = field(default=None, metadata=described("put every device behind an emulated link profile "
                                                        "(e.g. lte; needs root); comma-separate for a mixed fleet"))
    insecure: bool = field(default=False, metadata=described("plaintext gRPC instead of mutual TLS with a fleet of "
                                                         "certificates made in OUT/certs"))

    def validate(self) -> None:
        check_fields(self)
        if self.devices_per_round > self.devices:
            raise ConfigError(f"devices_per_round must be at most devices ({self.devices}), got "
                              f"{self.devices_per_round}", "devices_per_round")
        if self.metrics_port and not self.metrics_port + self.devices < 65536:
            raise ConfigError(f"metrics_port {self.metrics_port}: the devices' ports would pass 65535", "metrics_port")
        # Certificates are made when the run starts; check everything else now.
        dataclasses.replace(self.server_config(Path("."), 0), insecure=True).validate()
        for name in ("compute_slowdown", "max_batch_size"):
            if len(getattr(self, name)) not in (0, 1, self.devices):
                raise ValueError(f"{name}: give one value or one per device ({self.devices})")

    def device_ids(self) -> list[str]:
        return [f"dev-{i:02d}" for i in range(self.devices)]

    def server_config(self, out: Path, port: int, host: str = "127.0.0.1") -> ServerConfig:
        return ServerConfig(
            listen=f"{host}:{port}", out=out, preset=self.preset, weights_dir=self.weights_dir, rounds=self.rounds,
            devices_per_round=self.devices_per_round, min_updates=self.devices_per_round,
            round_deadline_s=self.round_deadline_s, seed=self.seed, local_epochs=self.local_epochs,
            local_steps=self.local_steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
            max_input_tokens=self.max_input_tokens, max_target_tokens=self.max_target_tokens,
            strategy=self.strategy, server_lr=self.server_lr, download_encoding=self.download_encoding or self.encoding,
            download_codec=self.codec, upload_encoding=self.encoding, upload_codec=self.codec,
            upload_payload=self.upload_payload, error_feedback=self.error_feedback,
            download_payload=self.download_payload, download_delta_encoding=self.download_delta_encoding,
            link_aware=self.link_aware, link_target_g=self.link_target_g, link_byte_budget=self.link_byte_budget,
            lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_targets=self.lora_targets,
            lora_dropout=self.lora_dropout, eval_data=self.data, eval_size=self.eval_size, poll_seconds=2, threads=0, save_updates=self.save_updates,
            chunk_elems=self.chunk_elems, round_policy=self.round_policy, local_samples=self.local_samples,
            time_budget_s=self.time_budget_s,
            metrics_listen=f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "", insecure=self.insecure)

    def per_device(self, name: str, i: int) -> float | int | None:
        values = getattr(self, name)
        return None if not values else values[0] if len(values) == 1 else values[i]

    def client_args(self, i: int, server: str) -> list[str]:
        dev = self.device_ids()[i]
        args = ["--server", server, "--device-id", dev, "--data", self.data,
                "--state-dir", str(Path(self.out) / "devices" / dev),
                "--data-size", str(self.data_size), "--data-seed", str(self.seed), "--partitions", str(self.devices),
                "--partition", str(i), "--alpha", str(self.alpha), "--threads", str(self.threads_per_device),
                "--retry-initial-s", "0.5", "--retry-max-s", "5", "--stall-timeout-s", str(self.stall_timeout_s),
                "--state-dir", str(Path(self.out) / "devices" / f"dev-{i:02d}"),
                "--max-upload-mbit", str(self.max_upload_mbit)]
        for name in ("compute_slowdown", "max_batch_size"):
            v = self.per_device(name, i)
            if v is not None:
                args += ["--" + name.replace("_", "-"), str(v)]
        if self.weights_dir:
            args += ["--weights-dir", str(self.weights_dir)]
        if self.metrics_port:
            args += ["--metrics-listen", f"127.0.0.1:{self.metrics_port + 1 + i}"]
        return args


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """A flat TOML file of str/int/float/bool values (what our configs hold)."""
    lines = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    path.write_text("\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------- table
COLUMNS = [("round", 5), ("devs", 4), ("T_comp s", 9), ("T_comm s", 9), ("G", 7), ("MB down", 9), ("MB up", 9),
           ("train loss", 10), ("eval loss", 9), ("ROUGE-L", 7)]


def table_header() -> str:
    head = "  ".join(name.rjust(w) for name, w in COLUMNS)
    return head + "\n" + "-" * len(head)


def table_row(s: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    vals = [str(s["round"]), str(len(s.get("participants", []))) if s["round"] else "-",
            f(s.get("t_comp_s"), ".2f"), f(s.get("t_comm_s"), ".2f"), f(s.get("g"), ".3f"),
            f(s["bytes_down"] / 1e6 if "bytes_down" in s else None, ".2f"),
            f(s["bytes_up"] / 1e6 if "bytes_up" in s else None, ".2f"),
            f(s.get("train_loss"), ".4f"), f(s.get("eval_loss"), ".4f"), f(s.get("rougeL"), ".2f")]
    return "  ".join(v.rjust(w) for v, (_, w) in zip(vals, COLUMNS))


# ------------------------------------------------------------------- running
@dataclass
class Launcher:
    """How processes are started: directly, or inside network namespaces."""
    server_host: str = "127.0.0.1"
    listen_host: str = "127.0.0.1"
    port: int = 0  # 0: a free loopback port
    wrap_server: Callable[[list[str]], list[str]] = lambda argv: argv
    wrap_device: Callable[[int, list[str]], list[str]] = lambda i, argv: argv


def _spawn(argv: Sequence[str], log_path: Path) -> tuple[subprocess.Popen, TextIO]:
    fh = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, fh


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run(cfg: SimulateConfig, launcher: Launcher | None = None, echo: Callable[[str], None] | None = None) -> int:
    """Start the server and the daemons, print the per-round table, return an exit code."""
    launcher = launcher or Launcher()
    echo = echo or (lambda line: print(line, flush=True))
    out = Path(cfg.out)
    logs = out / "logs"
    fleet = Fleet(cfg, launcher)
    procs = fleet.procs
    fleet.start_server()
    server_addr = fleet.server_addr
    for i in range(cfg.devices):
        fleet.start_device(i)
    security = f"mutual TLS (certificates in {fleet.certs.out})" if fleet.certs else "PLAINTEXT (--insecure)"
    echo(f"simulate: server on {server_addr}, {cfg.devices} device daemons, preset {cfg.preset}, "
         f"{cfg.rounds} rounds x {cfg.devices_per_round} devices, {_wire(cfg)}, {cfg.strategy}, "
         f"{security}; logs in {logs}")
    server = procs[0][1]
    printed = 0
    t0 = time.monotonic()
    last_note = t0
    code = 1
    try:
        while True:
            summaries = _read_summaries(out / "summary.json")
            if summaries and printed == 0:
                echo(table_header())
            for s in summaries[printed:]:
                echo(table_row(s))
            printed = max(printed, len(summaries))
            rc = server.poll()
            if rc is not None:
                code = rc
                break
            dead = [name for name, p, _ in procs[1:] if p.poll() not in (None, 0)]
            if len(dead) > cfg.devices - cfg.devices_per_round:
                echo(f"simulate: {len(dead)} device daemons died ({', '.join(dead[:3])}...); see {logs}")
                echo(_tail(logs / f"{dead[0]}.log"))
                code = 1
                break
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                echo(f"simulate: {time.monotonic() - t0:.0f} s, round {max(printed - 1, 0)} of {cfg.rounds} done")
            time.sleep(0.5)
    except KeyboardInterrupt:
        echo("simulate: interrupted; stopping all processes")
        code = 130
    finally:
        _stop_all(procs, wait_s=15.0 if code == 0 else 3.0)
    if code != 0:
        echo(f"simulate: server exited with {code}; last lines of {logs / 'server.log'}:")
        echo(_tail(logs / "server.log"))
        return code if code > 0 else 1
    summaries = _read_summaries(out / "summary.json")
    for s in summaries[printed:]:
        echo(table_row(s))
    elapsed = time.monotonic() - t0
    from fedserver.storage import RoundLog  # imports torch; keep `simulate --help` fast

    echo("")
    for line in efficiency_lines(RoundLog(out / "rounds.jsonl").read(), cfg.preset, cfg.batch_size, by="hardware"):
        echo(line)
    echo(f"simulate: {cfg.rounds} rounds in {elapsed:.0f} s; wrote {out / 'rounds.jsonl'} (per device: tokens/s, "
         f"MFU, power, ...) and {out / 'summary.json'}")
    return 0


class Fleet:
    """The processes of one simulated run, each startable, killable and restartable on its own.

    `run` drives one; resilience tests and `bench.resilience` use it to kill -9
    a daemon or the server mid-round and start it again on the same run
    directory and port.
    """

    def __init__(self, cfg: SimulateConfig, launcher: Launcher | None = None) -> None:
        self.cfg, self.launcher = cfg, launcher or Launcher()
        self.out = Path(cfg.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", "rounds.jsonl", "registry.json"):
            (self.out / stale).unlink(missing_ok=True)
        # A new run starts clean: no checkpoint to resume, no device state (partial transfers, pending
        # uploads, error-feedback residual) from an old run.
        for stale_dir in ("checkpoints", "devices", "staging"):
            shutil.rmtree(self.out / stale_dir, ignore_errors=True)
        for stale_log in self.logs.glob("*.log"):
            stale_log.unlink()
        self.port = self.launcher.port or free_port()
        scfg = cfg.server_config(self.out, self.port, self.launcher.listen_host)
        self.certs = None
        if not cfg.insecure:
            from fedserver.certs import write_fleet

            # The server certificate must name the address the daemons dial.
            self.certs = write_fleet(self.out / "certs", cfg.device_ids(),
                                     [self.launcher.server_host, "localhost", "127.0.0.1"])
            scfg = dataclasses.replace(scfg, **self.certs.server_settings())
        write_toml(self.out / "server.toml", to_dict(scfg))
        (self.out / "simulate.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        self.server_addr = f"{self.launcher.server_host}:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen, TextIO]] = []
        self.starts: dict[str, int] = {}

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        n = self.starts.get(name, 0)
        self.starts[name] = n + 1
        log_path = self.logs / (f"{name}.log" if n == 0 else f"{name}.{n}.log")
        for old in [p for p in self.procs if p[0] == name]:
            old[2].close()
            self.procs.remove(old)
        self.procs.insert(0 if name == "server" else len(self.procs), (name, *_spawn(argv, log_path)))
        return self.proc(name)

    def start_server(self) -> subprocess.Popen:
        py = sys.executable
        return self._start("server", self.launcher.wrap_server(
            [py, "-m", "fedserver", "run", "--config", str(self.out / "server.toml")]))

    def start_device(self, i: int) -> subprocess.Popen:
        dev = self.cfg.device_ids()[i]
        tls = self.certs.client_args(dev) if self.certs else ["--insecure"]
        argv = [sys.executable, "-m", "fedclient", "run", *self.cfg.client_args(i, self.server_addr), *tls]
        return self._start(dev, self.launcher.wrap_device(i, argv))

    def proc(self, name: str) -> subprocess.Popen:
        return next(p for n, p, _ in self.procs if n == name)

    def kill9(self, name: str) -> None:
        """SIGKILL the process group: no handler runs, nothing is flushed or cleaned up."""
        p = self.proc(name)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop(self, wait_s: float = 15.0) -> None:
        _stop_all(self.procs, wait_s)


def _wire(cfg: SimulateConfig) -> str:
    down = f"down {cfg.download_encoding or cfg.encoding}/{cfg.codec}"
    if cfg.download_payload == "delta":
        down += f" then {cfg.download_delta_encoding} deltas"
    up = f"up {cfg.encoding}/{cfg.codec} {cfg.upload_payload}" + (" +EF" if cfg.error_feedback else "")
    if cfg.link_aware:
        up += " (link-aware)"
    if cfg.lora_rank:
        spec = cfg.server_config(Path("."), 0).lora_spec()
        assert spec is not None
        return f"{spec.describe()}: {down} (B only after the first), {up} (B only)"
    return f"{down}, {up}"


def _read_summaries(path: Path) -> list[dict[str, Any]]:
    try:
        return read_summaries(path)
    except (OSError, ValueError):
        return []  # not written yet (it is replaced atomically, never torn)


def _stop_all(procs: list[tuple[str, subprocess.Popen, TextIO]], wait_s: float) -> None:
    end = time.monotonic() + wait_s
    for _, p, _ in procs:
        while p.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
    for _, p, _ in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for _, p, fh in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        fh.close()

