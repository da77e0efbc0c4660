"""The device daemon's typed config: TOML keys and `fedclient run` flags share these names."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.channel import ClientSecurity
from fedcore.config import described
from fedcore.metrics import split_listen


@dataclass
class ClientConfig:
    server: str = field(default="127.0.0.1:50051", metadata=described("server address host:port (the device dials out)"))
    device_id: str = field(default_factory=socket.gethostname, metadata=described("this device's id (default: hostname)"))
    # local data: never leaves the device
    data: str = field(default="builtin", metadata=described("'builtin' synthetic corpus or a Samsum JSON/JSONL file"))
    data_size: int = field(default=2000, metadata=described("examples of the built-in corpus (or first N of a file; 0: all)"))
    data_seed: int = field(default=0, metadata=described("seed of the built-in corpus and of the partition"))
    partitions: int = field(default=0, metadata=described("split the data Dirichlet-wise into this many parts (0: keep all)"))
    partition: int = field(default=0, metadata=described("which part this device keeps"))
    alpha: float = field(default=1.0, metadata=described("Dirichlet concentration of the split"))
    # model
    weights_dir: Path | None = field(default=None, metadata=described("local Hugging Face dir for the tokenizer"))
    device: str = field(default="auto", metadata=described("torch device: auto, cpu, cuda, cuda:1"))
    threads: int = field(default=0, metadata=described("torch CPU threads (0: torch's default)"))
    # hardware figures (MFU, power)
    hardware: str = field(default="", metadata=described("peak-table key for MFU, e.g. a100, agx-orin-64gb, "
                                                          "orin-nx-16gb (empty: detect)"))
    peak_tflops: float = field(default=0.0, metadata=described("peak TFLOP/s for MFU; overrides the table (0: none)"))
    power_source: str = field(default="auto", metadata=described("auto, ina3221, nvml, rapl or none"))
    power_hz: float = field(default=5.0, metadata=described("power samples per second during local training"))
    # connection
    retry_initial_s: float = field(default=1.0, metadata=described("first reconnect delay"))
    retry_max_s: float = field(default=30.0, metadata=described("longest reconnect delay (backoff with jitter)"))
    transfer_retries: int = field(default=8, metadata=described("resumed attempts per download or upload"))
    stall_timeout_s: float = field(default=60.0, metadata=described("cancel and resume a transfer that moved no chunk "
                                                                    "for this long"))
    transfer_timeout_floor_s: float = field(default=60.0, metadata=described("shortest deadline of one transfer attempt"))
    transfer_timeout_safety: float = field(default=3.0, metadata=described("transfer deadline: this x bytes left / "
                                                                           "measured link rate (floor above)"))
    max_upload_mbit: float = field(default=0.0, metadata=described("cap this device's upload rate in Mbit/s, e.g. to "
                                                                   "leave a shared uplink usable (0: no cap)"))
    state_dir: Path | None = field(default=None, metadata=described(
        "directory for state kept across restarts: partial downloads, pending uploads and the error-feedback "
        "residual (unset: kept in memory only)"))
    # heterogeneity
    compute_slowdown: float = field(default=1.0, metadata=described("EMULATION of a slower device: sleep (factor-1) x "
                                                                    "each measured training step (1: off)"))
    max_batch_size: int = field(default=0, metadata=described("largest minibatch this device fits (0: the server's)"))
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
        "(e.g. 127.0.0.1:9465; empty: off)"))

    def validate(self) -> None:
        if ":" not in self.server:
            raise ValueError(f"server must be host:port, got {self.server!r}")
        if self.partitions < 0 or (self.partitions and not 0 <= self.partition < self.partitions):
            raise ValueError(f"partition {self.partition} is not in 0..{self.partitions - 1}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.peak_tflops < 0 or self.power_hz <= 0:
            raise ValueError("need peak_tflops >= 0 and power_hz > 0")
        if self.hardware:
            from fedcore.hardware import from_table
            from_table(self.hardware)  # raises with the known keys
        if self.power_source not in ("auto", "none", "ina3221", "nvml", "rapl"):
            raise ValueError(f"power_source must be auto, none, ina3221, nvml or rapl, got {self.power_source!r}")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")
        if self.compute_slowdown < 1:
            raise ValueError(f"compute_slowdown must be >= 1, got {self.compute_slowdown}")
        if self.stall_timeout_s <= 0 or self.transfer_timeout_floor_s <= 0 or self.transfer_timeout_safety < 1:
            raise ValueError("need stall_timeout_s > 0, transfer_timeout_floor_s > 0, transfer_timeout_safety >= 1")
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.metrics_listen:
            split_listen(self.metrics_listen)
        self.security().validate()


@dataclass
class BenchConfig:
    """`fedclient bench` settings; lengths default to the study's 512 input and 95 target tokens."""

    preset: list[str] = field(default_factory=lambda: ["small"], metadata=described("model presets, comma-separated"))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata=described("minibatch sizes, comma-separated"))
    steps: int = field(default=5, metadata=described("timed steps per configuration"))
    warmup: int = field(default=1, metadata=described("untimed steps before them"))
    input_tokens: int = field(default=512, metadata=described("input tokens per item"))
    target_tokens: int = field(default=95, metadata=described("target tokens per item"))
    device: str = field(default="auto", metadata=described("torch device: auto, cpu, cuda, cuda:1"))
    threads: int = field(default=0, metadata=described("torch CPU threads (0: torch's default)"))
    hardware: str = field(default="", metadata=described("peak-table key for MFU (empty: detect)"))
    peak_tflops: float = field(default=0.0, metadata=described("peak TFLOP/s for MFU; overrides the table"))
    power_source: str = field(default="auto", metadata=described("auto, ina3221, nvml, rapl or none"))
    power_hz: float = field(default=5.0, metadata=described("power samples per second"))
    seed: int = field(default=0, metadata=described("seed of the random weights and token ids"))

    def validate(self) -> None:
        from fedcore.models import PRESETS

        unknown = [p for p in self.preset if p.lower() not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch_sizes must be positive integers")
        if self.steps < 1 or self.warmup < 0 or self.input_tokens < 1 or self.target_tokens < 1:
            raise ValueError("need steps >= 1, warmup >= 0 and positive token lengths")
