"""The device daemon's typed config: TOML keys and `fedclient run` flags share these names."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.channel import ClientSecurity
from fedcore.config import ConfigError, check_fields, check_weights_dir, described

POWER_SOURCES = ("auto", "none", "ina3221", "nvml", "rapl")


@dataclass
class ClientConfig:
    server: str = field(default="127.0.0.1:50051", metadata=described("server address host:port (the device dials out)",
                                                                      address="dial"))
    device_id: str = field(default_factory=socket.gethostname, metadata=described("this device's id (default: hostname)"))
    # local data: never leaves the device
    data: str = field(default="builtin", metadata=described("'builtin' synthetic corpus or a Samsum JSON/JSONL file"))
    data_size: int = field(default=2000, metadata=described("examples of the built-in corpus (or first N of a file; 0: all)",
                                                            ge=0))
    data_seed: int = field(default=0, metadata=described("seed of the built-in corpus and of the partition",
                                                         ge=0, le=(1 << 32) - 1))
    partitions: int = field(default=0, metadata=described("split the data Dirichlet-wise into this many parts (0: keep all)",
                                                          ge=0))
    partition: int = field(default=0, metadata=described("which part this device keeps", ge=0))
    alpha: float = field(default=1.0, metadata=described("Dirichlet concentration of the split", gt=0))
    # model
    weights_dir: Path | None = field(default=None, metadata=described(
        "local Hugging Face dir: the tokenizer, and the weights this device holds (hold_base)"))
    hold_base: bool = field(default=True, metadata=described(
        "offer the digest of weights_dir's weights at Join: a run that starts from them needs no first download"))
    device: str = field(default="auto", metadata=described("torch device: auto, cpu, cuda, cuda:1"))
    threads: int = field(default=0, metadata=described("torch CPU threads (0: torch's default)", ge=0, le=4096))
    # hardware figures (MFU, power)
    hardware: str = field(default="", metadata=described("peak-table key for MFU, e.g. a100, agx-orin-64gb, "
                                                          "orin-nx-16gb (empty: detect)"))
    peak_tflops: float = field(default=0.0, metadata=described("peak TFLOP/s for MFU; overrides the table (0: none)",
                                                               ge=0))
    power_source: str = field(default="auto", metadata=described("auto, ina3221, nvml, rapl or none",
                                                                 choices=POWER_SOURCES))
    power_hz: float = field(default=5.0, metadata=described("power samples per second during local training",
                                                            gt=0, le=1000))
    # connection
    retry_initial_s: float = field(default=1.0, metadata=described("first reconnect delay", gt=0))
    retry_max_s: float = field(default=30.0, metadata=described("longest reconnect delay (backoff with jitter)", gt=0))
    transfer_retries: int = field(default=8, metadata=described("resumed attempts per download or upload",
                                                                ge=0, le=10000))
    stall_timeout_s: float = field(default=60.0, metadata=described("cancel and resume a transfer that moved no chunk "
                                                                    "for this long", gt=0))
    transfer_timeout_floor_s: float = field(default=60.0, metadata=described("shortest deadline of one transfer attempt",
                                                                             gt=0))
    transfer_timeout_safety: float = field(default=3.0, metadata=described("transfer deadline: this x bytes left / "
                                                                           "measured link rate (floor above)", ge=1))
    max_upload_mbit: float = field(default=0.0, metadata=described("cap this device's upload rate in Mbit/s, e.g. to "
                                                                   "leave a shared uplink usable (0: no cap)", ge=0))
    state_dir: Path | None = field(default=None, metadata=described(
        "directory for state kept across restarts: partial downloads, pending uploads and the error-feedback "
        "residual (unset: kept in memory only)"))
    # heterogeneity
    compute_slowdown: float = field(default=1.0, metadata=described("EMULATION of a slower device: sleep (factor-1) x "
                                                                    "each measured training step (1: off)", ge=1))
    max_batch_size: int = field(default=0, metadata=described("largest minibatch this device fits (0: the server's)",
                                                              ge=0))
    # budgets for one round (methods that plan each device's part: layerwise, smha)
    memory_budget_mb: float = field(default=0.0, metadata=described(
        "peak training memory this device may use, MiB: methods that cannot fit a step in it do not sample the "
        "device (0: measured at start, the accelerator's memory, else the RAM available; a hint for plans only)",
        ge=0))
    compute_budget_tflop: float = field(default=0.0, metadata=described(
        "model TFLOPs of one round's local training (0: no limit)", ge=0))
    upload_budget_mb: float = field(default=0.0, metadata=described("wire MB of one update (0: no limit)", ge=0))
    head_fraction: float = field(default=0.0, metadata=described(
        "smha: share of the attention heads this device trains, 0.25, 0.5 or 1 (0: the server's plan chooses)",
        ge=0, le=1))
    # power cap (fedclient.capping): batch size and GPU frequency chosen together
    power_cap_w: float = field(default=0.0, metadata=described(
        "train under this power cap, W: each round's batch size and GPU frequency chosen together from a profile "
        "of this device, a watchdog lowering the clock if power exceeds it (0: off)", ge=0))
    clock_control: str = field(default="auto", metadata=described(
        "power cap: the clock to lock (auto: Jetson GPU devfreq, else NVML, else cpufreq)",
        choices=("auto", "jetson-gpu", "nvml-gpu", "cpufreq")))
    emulate: str = field(default="", metadata=described(
        "power cap on an EMULATED device (no clock or power touched; training still runs here): agx-orin-64gb",
        choices=("", "agx-orin-64gb")))
    noise_scale: float = field(default=0.0, metadata=described(
        "power cap: gradient noise scale B_noise of S(B) = S_min(1 + B_noise/B) (0: measured on this device's "
        "data with the first capped round's model)", ge=0))
    stay_after_shutdown: bool = field(default=False, metadata=described("keep waiting for a new run when one ends"))
    # security: TLS unless insecure is set explicitly
    tls_ca: Path | None = field(default=None, metadata=described("CA that signed the server certificate (PEM; "
                                                             "default: the system's roots)"))
    tls_cert: Path | None = field(default=None, metadata=described("this device's certificate (PEM) for mutual TLS"))
    tls_key: Path | None = field(default=None, metadata=described("this device's private key (PEM)"))
    enrollment_token: str = field(default="", metadata=described("token the server maps to this device "
                                                             "(TLS without client certificates)"))
    tls_server_name: str = field(default="", metadata=described("name to check the server certificate against "
                                                            "(default: the host in server)"))
    insecure: bool = field(default=False, metadata=described("plaintext gRPC, no TLS (the server must say insecure too)"))

    def security(self) -> ClientSecurity:
        return ClientSecurity(self.tls_ca, self.tls_cert, self.tls_key, self.enrollment_token, self.tls_server_name,
                              self.insecure)
    metrics_listen: str = field(default="", metadata=described(
        "host:port for Prometheus /metrics, plain HTTP: localhost or a management network only "
        "(e.g. 127.0.0.1:9465; empty: off)", address="listen", empty=True))

    def validate(self) -> None:
        """Every value in its declared range (field metadata), then what depends on more than one field."""
        check_fields(self)
        if not self.device_id.strip():
            raise ConfigError("device_id must not be empty", "device_id")
        if self.partitions and not self.partition < self.partitions:
            raise ConfigError(f"partition must be in 0..{self.partitions - 1} (partitions - 1), got "
                              f"{self.partition}", "partition")
        if self.weights_dir is not None:
            check_weights_dir(self.weights_dir)
        if self.hardware:
            from fedcore.hardware import from_table
            from_table(self.hardware)  # raises with the known keys
        if self.head_fraction not in (0.0, 0.25, 0.5, 1.0):
            raise ConfigError(f"head_fraction must be 0 (the plan chooses), 0.25, 0.5 or 1, got {self.head_fraction:g}",
                              "head_fraction")
        if self.emulate and not self.power_cap_w:
            raise ConfigError("emulate applies to the power cap: set power_cap_w too", "emulate")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError(f"retry_max_s must be at least retry_initial_s ({self.retry_initial_s:g}), got "
                              f"{self.retry_max_s:g}", "retry_max_s")
        self.security().validate()


@dataclass
class BenchConfig:
    """`fedclient bench` settings; lengths default to the study's 512 input and 95 target tokens."""

    preset: list[str] = field(default_factory=lambda: ["small"], metadata=described("model presets, comma-separated"))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata=described("minibatch sizes, comma-separated",
                                                                                      ge=1))
    steps: int = field(default=5, metadata=described("timed steps per configuration", ge=1))
    warmup: int = field(default=1, metadata=described("untimed steps before them", ge=0))
    input_tokens: int = field(default=512, metadata=described("input tokens per item", ge=1))
    target_tokens: int = field(default=95, metadata=described("target tokens per item", ge=1))
    device: str = field(default="auto", metadata=described("torch device: auto, cpu, cuda, cuda:1"))
    threads: int = field(default=0, metadata=described("torch CPU threads (0: torch's default)", ge=0, le=4096))
    hardware: str = field(default="", metadata=described("peak-table key for MFU (empty: detect)"))
    peak_tflops: float = field(default=0.0, metadata=described("peak TFLOP/s for MFU; overrides the table", ge=0))
    power_source: str = field(default="auto", metadata=described("auto, ina3221, nvml, rapl or none",
                                                                 choices=POWER_SOURCES))
    power_hz: float = field(default=5.0, metadata=described("power samples per second", gt=0, le=1000))
    seed: int = field(default=0, metadata=described("seed of the random weights and token ids", ge=0, le=(1 << 32) - 1))
    # --power-cap: profile (batch, GPU frequency), choose under the cap, compare with frequency capping alone
    power_cap: float = field(default=0.0, metadata=described(
        "choose batch size and GPU frequency together under this cap in W, against lowering the frequency "
        "alone (0: off, the Table 4 bench)", ge=0))
    emulate: str = field(default="", metadata=described(
        "power cap on an EMULATED device (no clock or power touched): agx-orin-64gb (empty: this device)",
        choices=("", "agx-orin-64gb")))
    max_batch: int = field(default=128, metadata=described(
        "power cap: profile batch sizes 1, 2, 4, ... up to this or the largest that fits", ge=1))
    frequencies: int = field(default=0, metadata=described(
        "power cap: profile this many GPU frequencies spread over the clock's list, both ends included (0: all)",
        ge=0))
    samples: int = field(default=3200, metadata=described(
        "power cap: the progress to reach, as samples at reference_batch (the study's round: 100 steps of 32)", ge=1))
    reference_batch: int = field(default=32, metadata=described(
        "power cap: the minibatch the samples were planned for", ge=1))
    noise_scale: float = field(default=0.0, metadata=described(
        "power cap: gradient noise scale B_noise of S(B) = S_min(1 + B_noise/B) (0: measure B_simple on the "
        "preset, random weights, built-in corpus: far below a pretrained model's)", ge=0))
    profile_dir: Path | None = field(default=None, metadata=described(
        "power cap: directory caching profiles per hardware, model, lengths, clock and grid (unset: no cache)"))
    watchdog_window_s: float = field(default=1.0, metadata=described(
        "power cap: the watchdog lowers the frequency when the mean power over this window exceeds the cap", gt=0))

    def validate(self) -> None:
        from fedcore.models import PRESETS

        check_fields(self)
        unknown = [p for p in self.preset if p.lower() not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch_sizes must be positive integers")
        if self.steps < 1 or self.warmup < 0 or self.input_tokens < 1 or self.target_tokens < 1:
            raise ValueError("need steps >= 1, warmup >= 0 and positive token lengths")
        if self.power_cap and len(self.preset) != 1:
            raise ConfigError("power_cap profiles one model: give one preset", "preset")
        if self.emulate and not self.power_cap:
            raise ConfigError("emulate applies to the power-cap bench: set power_cap too", "emulate")
