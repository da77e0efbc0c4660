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
from typing import Any, ClassVar, TextIO

from fedclient.config import ClientConfig
from fedcore.config import ConfigError, check_fields, described, from_mapping, to_dict
from fedcore.hwreport import efficiency_lines
from fedlab.basecorpus import BASE_PRESET
from fedlab.report import megabytes
from fedserver.config import WIRE_CODECS, WIRE_ENCODINGS, ServerConfig
from fedserver.roundlog import read_summaries


# Where a lab run's defaults differ from a deployed server's: a tiny model and a short run that finish on a
# laptop in minutes. One place, read by SimulateConfig's default; every other default is the server's.
LAB_SERVER_DEFAULTS: dict[str, Any] = dict(
    preset="tiny", rounds=8, learning_rate=1e-3, eval_size=48, round_deadline_s=600.0,
    # The launcher's polling and threading: devices poll every 2 s, the server uses torch's threads.
    poll_seconds=2, threads=0)


def lab_server() -> ServerConfig:
    return ServerConfig(**LAB_SERVER_DEFAULTS)


# Server settings the launcher decides (no flags; a [server] table that sets one is refused by `expand`).
LAUNCHER_SERVER_KEYS = ("listen", "out", "eval_data", "metrics_listen", "tls_cert", "tls_key", "tls_ca")
# Device settings the launcher decides for each daemon (no flags; a [client] table that sets one is refused).
LAUNCHER_CLIENT_KEYS = ("server", "device_id", "data_seed", "partitions", "partition", "threads", "state_dir",
                        "weights_dir", "metrics_listen", "insecure", "tls_ca", "tls_cert", "tls_key")
# The server's seed is every device's data_seed too, and a device's seed range is narrower than the server's.
MAX_DATA_SEED = (1 << 32) - 1
# Where a run's initial model comes from when no weights_dir is given (see fedlab.base).
BASES = ("auto", "pretrained", "random")
# SimulateConfig's per-device lists, each passed to device i as the daemon's flag of the same name.
PER_DEVICE = ("compute_slowdown", "max_batch_size", "memory_budget_mb", "head_fraction")
# Reconnect quickly: on one machine the server is either up or about to be. Every device gets the base's directory
# (for the tokenizer) but downloads round 1's model as a fresh device would, unless --hold-base.
LAB_CLIENT_DEFAULTS: dict[str, Any] = dict(retry_initial_s=0.5, retry_max_s=5.0, hold_base=False)


@dataclass
class SimulateConfig:
    """A whole run on this machine: the lab's own settings, the server's ([server]) and every device's ([client]).

    The server's and the devices' settings are theirs (fedserver.config,
    fedclient.config), flags of the same names; the launcher fills in what
    only it knows (addresses, run and state directories, certificates, each
    device's part of the data).
    """

    out: Path = field(default=Path("runs/simulate"), metadata=described("run directory (rounds.jsonl, summary.json, logs/)"))
    devices: int = field(default=10, metadata=described("device daemons to start", ge=1, le=1000))
    encoding: str | None = field(default=None, metadata=described(
        "wire encoding, both directions, unless --upload-encoding / --download-encoding say otherwise",
        choices=WIRE_ENCODINGS))
    codec: str | None = field(default=None, metadata=described(
        "wire codec, both directions, unless --upload-codec / --download-codec say otherwise", choices=WIRE_CODECS))
    threads_per_device: int = field(default=1, metadata=described("torch threads per daemon", ge=0, le=4096))
    compute_slowdown: list[float] = field(default_factory=list, metadata=described(
        "per device (comma-separated, one value for all): EMULATED compute slowdown factor", ge=1))
    max_batch_size: list[int] = field(default_factory=list, metadata=described(
        "per device (comma-separated, one value for all): largest minibatch the device fits (0: server's)", ge=0))
    memory_budget_mb: list[float] = field(default_factory=list, metadata=described(
        "per device (comma-separated, one value for all): peak training memory budget, MiB (layerwise, smha "
        "plan to it; other methods sample only devices it holds; 0: measured by the device, a hint)", ge=0))
    head_fraction: list[float] = field(default_factory=list, metadata=described(
        "per device (comma-separated, one value for all): smha, share of heads the device trains (0: the plan "
        "chooses)", ge=0, le=1))
    metrics_port: int = field(default=0, metadata=described("serve Prometheus /metrics: the server on 127.0.0.1:PORT, "
                                                            "device i on PORT+1+i (0: off)", ge=0, le=65535))
    link: str | None = field(default=None, metadata=described("put every device behind an emulated link profile "
                                                        "(e.g. lte; needs root); comma-separate for a mixed fleet"))
    base: str = field(default="auto", metadata=described(
        "the model a run starts from when no --weights-dir is given: 'pretrained' (the offline pretrained base, "
        "built once per machine and cached; preset tiny), 'random' (seeded random init), 'auto' (pretrained for "
        "tiny, random for the other presets)", choices=BASES))
    server: ServerConfig = field(default_factory=lab_server)
    client: ClientConfig = field(default_factory=lambda: ClientConfig(**LAB_CLIENT_DEFAULTS))

    @classmethod
    def expand(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Shorthands into the server's keys, before defaults: --encoding and --codec set both directions
        where a direction is not given; a round needs all its sampled devices unless min_updates says less."""
        for part, keys in (("server", LAUNCHER_SERVER_KEYS), ("client", LAUNCHER_CLIENT_KEYS)):
            table = data.get(part)
            if isinstance(table, dict):  # a table given by a user (flat keys and flags cannot name these)
                taken = sorted(set(table) & set(keys))
                if taken:
                    raise ConfigError(f"[{part}] {', '.join(taken)}: set by the launcher for each process "
                                      f"(addresses, directories, certificates, each device's part); leave "
                                      f"{'it' if len(taken) == 1 else 'them'} out")
        server = dict(data.get("server") or {})
        own = {f.name for f in dataclasses.fields(cls)}
        flat = {k: data.pop(k) for k in list(data)
                if k not in own and k in {f.name for f in dataclasses.fields(ServerConfig)}}
        server = {**server, **flat}  # a flat key is an override
        for short, keys in (("encoding", ("upload_encoding", "download_encoding")),
                            ("codec", ("upload_codec", "download_codec"))):
            if data.get(short) is not None:
                for k in keys:
                    server.setdefault(k, data[short])
        server.setdefault("min_updates", server.get("devices_per_round", ServerConfig.devices_per_round))
        data["server"] = server
        return data

    #: flags not offered: what the launcher decides for each process
    HIDDEN_FLAGS: ClassVar[tuple[str, ...]] = (tuple(f"server.{k}" for k in LAUNCHER_SERVER_KEYS)
                                               + tuple(f"client.{k}" for k in LAUNCHER_CLIENT_KEYS))

    @classmethod
    def of(cls, **settings: Any) -> SimulateConfig:
        """A checked config from keyword settings, flat (rounds=2) or by part (server={...})."""
        return from_mapping(cls, settings, source="SimulateConfig")

    def validate(self) -> None:
        check_fields(self)
        check_fields(self.client)
        if self.server.devices_per_round > self.devices:
            raise ConfigError(f"devices_per_round must be at most devices ({self.devices}), got "
                              f"{self.server.devices_per_round}", "devices_per_round")
        if self.metrics_port and not self.metrics_port + self.devices < 65536:
            raise ConfigError(f"metrics_port {self.metrics_port}: the devices' ports would pass 65535", "metrics_port")
        # Certificates are made when the run starts; check everything else now, the daemons' side included:
        # a value each daemon refuses at start would otherwise surface as "N device daemons died".
        dataclasses.replace(self.server_config(Path("."), 0), insecure=True).validate()
        if self.server.seed > MAX_DATA_SEED:
            raise ConfigError(f"seed must be <= {MAX_DATA_SEED} (it is each device's data_seed too), got "
                              f"{self.server.seed}", "seed")
        dataclasses.replace(self.client, device_id=self.device_ids()[0], data_seed=self.server.seed,
                            partitions=self.devices, partition=0, insecure=True).validate()
        for name in PER_DEVICE:
            if len(getattr(self, name)) not in (0, 1, self.devices):
                raise ValueError(f"{name}: give one value or one per device ({self.devices})")
        if self.server.weights_dir is not None and self.base != "auto":
            raise ConfigError(f"base {self.base!r} and weights_dir both say where the weights come from; give one",
                              "base")
        if self.base == "pretrained" and self.server.preset != BASE_PRESET:
            raise ConfigError(f"base 'pretrained': the offline pretrained base is built for preset {BASE_PRESET}; "
                              f"for {self.server.preset} give --weights-dir (a FLAN-T5 directory) or --base random",
                              "base")

    def pretrained_base(self) -> bool:
        """Whether this run starts from the offline pretrained base (fedlab.base)."""
        if self.server.weights_dir is not None:
            return False
        return self.base == "pretrained" or (self.base == "auto" and self.server.preset == BASE_PRESET)

    def device_ids(self) -> list[str]:
        return [f"dev-{i:02d}" for i in range(self.devices)]

    def server_config(self, out: Path, port: int, host: str = "127.0.0.1") -> ServerConfig:
        """The server's config for this run: its part, at the launcher's address and under the run dir."""
        return dataclasses.replace(
            self.server, listen=f"{host}:{port}", out=out, eval_data=self.client.data,
            metrics_listen=f"127.0.0.1:{self.metrics_port}" if self.metrics_port else self.server.metrics_listen)

    def per_device(self, name: str, i: int) -> float | int | None:
        values = getattr(self, name)
        return None if not values else values[0] if len(values) == 1 else values[i]

    def client_args(self, i: int, server: str) -> list[str]:
        """Device i's command line: the [client] settings that differ from a daemon's defaults, then what the
        launcher decides (its id, address, part of the data, state dir, and the server's model settings)."""
        dev = self.device_ids()[i]
        args = cli_args(self.client, skip=LAUNCHER_CLIENT_KEYS)
        args += ["--server", server, "--device-id", dev, "--data-seed", str(self.server.seed),
                 "--partitions", str(self.devices), "--partition", str(i), "--threads", str(self.threads_per_device),
                 "--state-dir", str(Path(self.out) / "devices" / dev)]
        for name in PER_DEVICE:
            v = self.per_device(name, i)
            if v is not None:
                args += ["--" + name.replace("_", "-"), str(v)]
        if self.server.weights_dir:
            args += ["--weights-dir", str(self.server.weights_dir)]
        if self.metrics_port:
            args += ["--metrics-listen", f"127.0.0.1:{self.metrics_port + 1 + i}"]
        return args




def cli_args(cfg: Any, skip: Sequence[str] = ()) -> list[str]:
    """Flags that set every field of `cfg` that differs from its class's default (fedcore.config's names)."""
    args: list[str] = []
    default = type(cfg)()
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in skip or v == getattr(default, f.name) or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
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
            megabytes(s.get("bytes_down")), megabytes(s.get("bytes_up")),
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
    fleet = Fleet(cfg, launcher, echo)
    cfg = fleet.cfg
    procs = fleet.procs
    fleet.start_server()
    server_addr = fleet.server_addr
    for i in range(cfg.devices):
        fleet.start_device(i)
    security = f"mutual TLS (certificates in {fleet.certs.out})" if fleet.certs else "PLAINTEXT (--insecure)"
    echo(f"simulate: server on {server_addr}, {cfg.devices} device daemons, {_model(fleet)}, "
         f"{cfg.server.rounds} rounds x {cfg.server.devices_per_round} devices, {_wire(cfg)}, {cfg.server.strategy}, "
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
            if len(dead) > cfg.devices - cfg.server.devices_per_round:
                echo(f"simulate: {len(dead)} device daemons died ({', '.join(dead[:3])}...); see {logs}")
                echo(_tail(logs / f"{dead[0]}.log"))
                code = 1
                break
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                echo(f"simulate: {time.monotonic() - t0:.0f} s, round {max(printed - 1, 0)} of {cfg.server.rounds} done")
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
    for line in efficiency_lines(RoundLog(out / "rounds.jsonl").read(), cfg.server.preset, cfg.server.batch_size, by="hardware"):
        echo(line)
    line = held_out_line(summaries, "the pretrained base" if fleet.base_info else "the initial model")
    if line:
        echo(line)
    echo(f"simulate: {cfg.server.rounds} rounds in {elapsed:.0f} s; wrote {out / 'rounds.jsonl'} (per device: tokens/s, "
         f"MFU, power, ...) and {out / 'summary.json'}")
    return 0


def held_out_line(summaries: Sequence[dict[str, Any]], start: str) -> str | None:
    """What the run added on the held-out set: round 0 (the model it started from) against the last round."""
    first = next((s for s in summaries if s.get("round") == 0), None)
    last = summaries[-1] if summaries else None
    if first is None or last is None or last is first or first.get("rougeL") is None or last.get("rougeL") is None:
        return None
    return (f"held-out ROUGE-L {first['rougeL']:.2f} before round 1 ({start}) -> {last['rougeL']:.2f} after round "
            f"{last['round']}; eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")


class Fleet:
    """The processes of one simulated run, each startable, killable and restartable on its own.

    `run` drives one; resilience tests and `bench.resilience` use it to kill -9
    a daemon or the server mid-round and start it again on the same run
    directory and port.
    """

    def __init__(self, cfg: SimulateConfig, launcher: Launcher | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.base_info = None
        if cfg.pretrained_base():
            from fedlab import base  # torch: only for a run that needs the base

            path, self.base_info = base.ensure(echo=echo or (lambda line: print(line, flush=True)))
            cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, weights_dir=path))
        self.cfg, self.launcher = cfg, launcher or Launcher()
        self.out = Path(cfg.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", "rounds.jsonl", "registry.json", "registry.jsonl"):
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
        if not cfg.server.insecure:
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


def _model(fleet: Fleet) -> str:
    c = fleet.cfg.server
    if fleet.base_info is not None:
        return (f"preset {c.preset} from the offline pretrained base ({fleet.base_info.digest[:19]}...; "
                f"--base random for random weights)")
    if c.weights_dir is not None:
        return f"preset {c.preset} from {c.weights_dir}"
    return f"preset {c.preset} with RANDOM weights (seed {c.seed})"


def _wire(cfg: SimulateConfig) -> str:
    c = cfg.server
    down = f"down {c.download_encoding}/{c.download_codec}"
    if c.download_payload == "delta":
        down += f" then {c.download_delta_encoding} deltas"
    up = f"up {c.upload_encoding}/{c.upload_codec} {c.upload_payload}" + (" +EF" if c.error_feedback else "")
    if c.link_aware:
        up += " (link-aware)"
    method = c.build_method()
    if method.patches_trainable:
        note = method.summary_note.strip()
        return f"{method.describe()}: {down} ({note} after the first), {up} ({note})"
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

