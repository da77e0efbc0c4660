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
    # connection
    retry_initial_s: float = field(default=1.0, metadata=described("first reconnect delay"))
    retry_max_s: float = field(default=30.0, metadata=described("longest reconnect delay (backoff with jitter)"))
    transfer_retries: int = field(default=8, metadata=described("resumed attempts per download or upload"))
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
    state_dir: Path | None = field(default=None, metadata=described(
        "directory for state kept across restarts (the error-feedback residual); unset: kept in memory only"))

    def validate(self) -> None:
        if ":" not in self.server:
            raise ValueError(f"server must be host:port, got {self.server!r}")
        if self.partitions < 0 or (self.partitions and not 0 <= self.partition < self.partitions):
            raise ValueError(f"partition {self.partition} is not in 0..{self.partitions - 1}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")
        if self.metrics_listen:
            split_listen(self.metrics_listen)
        self.security().validate()
