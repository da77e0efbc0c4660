"""The server's typed config: TOML keys and `fedserver run` flags share these names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcore.config import described
from fedcore.metrics import split_listen
from fedcore.wire import TransferSpec, codec_id, encoding_id

STRATEGIES = ("fedavg", "fedadam", "fedadamw", "fedyogi")


@dataclass
class ServerConfig:
    listen: str = field(default="0.0.0.0:50051", metadata=described("address:port to serve on"))
    out: Path = field(default=Path("runs/server"), metadata=described("run directory: checkpoints, rounds.jsonl, summary.json"))
    # model
    preset: str = field(default="small", metadata=described("model preset: tiny, small, base, large, xl"))
    weights_dir: Path | None = field(default=None, metadata=described("local Hugging Face dir with FLAN-T5 weights"))
    # rounds (defaults reproduce Woisetschläger et al. 2023)
    rounds: int = field(default=20, metadata=described("federated rounds to run"))
    devices_per_round: int = field(default=3, metadata=described("devices sampled each round"))
    min_devices: int = field(default=0, metadata=described("devices that must be connected before a round starts "
                                                     "(0: devices_per_round)"))
    min_updates: int = field(default=1, metadata=described("updates needed to aggregate when the deadline passes"))
    round_deadline_s: float = field(default=3600.0, metadata=described("seconds a round waits for its updates"))
    seed: int = field(default=0, metadata=described("seed for device sampling and model init"))
    # local training sent to the devices
    local_epochs: int = field(default=1, metadata=described("local epochs per round"))
    local_steps: int = field(default=0, metadata=described("local steps per round (0: use local_epochs)"))
    batch_size: int = field(default=32, metadata=described("local minibatch size"))
    learning_rate: float = field(default=5e-4, metadata=described("local AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=described("local AdamW weight decay"))
    max_input_tokens: int = field(default=512, metadata=described("dialogue tokens kept"))
    max_target_tokens: int = field(default=95, metadata=described("summary tokens kept and generated"))
    # aggregation
    strategy: str = field(default="fedavg", metadata=described("fedavg, fedadam, fedadamw or fedyogi"))
    server_lr: float | None = field(default=None, metadata=described("server learning rate (default: the strategy's)"))
    beta1: float = field(default=0.9, metadata=described("adaptive strategies: first moment decay"))
    beta2: float = field(default=0.99, metadata=described("adaptive strategies: second moment decay"))
    tau: float = field(default=1e-3, metadata=described("adaptive strategies: adaptivity"))
    server_weight_decay: float = field(default=1e-2, metadata=described("fedadamw: decoupled weight decay"))
    # wire
    download_encoding: str = field(default="fp32", metadata=described("fp32, fp16, bf16, int8 or nf4"))
    download_codec: str = field(default="none", metadata=described("none or zstd"))
    upload_encoding: str = field(default="fp32", metadata=described("fp32, fp16, bf16, int8 or nf4"))
    upload_codec: str = field(default="none", metadata=described("none or zstd"))
    zstd_level: int = field(default=3, metadata=described("zstd level"))
    block_size: int = field(default=64, metadata=described("quantization block size (elements)"))
    chunk_elems: int = field(default=1 << 18, metadata=described("elements per chunk"))
    # evaluation
    eval_data: str = field(default="builtin", metadata=described("held-out set: 'builtin' or a Samsum JSON/JSONL file"))
    eval_size: int = field(default=64, metadata=described("held-out examples evaluated after each round"))
    eval_batch_size: int = field(default=16, metadata=described("evaluation batch size"))
    # service
    poll_seconds: int = field(default=10, metadata=described("longest a GetTask call is held"))
    liveness_s: float = field(default=60.0, metadata=described("a device unheard of this long is not sampled"))
    max_workers: int = field(default=64, metadata=described("gRPC server threads"))
    max_concurrent_uploads: int = field(default=8, metadata=described("uploads staged in memory at once"))
    checkpoint_keep: int = field(default=3, metadata=described("checkpoints kept on disk"))
    save_updates: bool = field(default=False, metadata=described("keep every received update under out/updates"))
    threads: int = field(default=0, metadata=described("torch threads (0: torch's default)"))
    metrics_listen: str = field(default="", metadata=described("host:port for Prometheus /metrics "
                                                              "(e.g. 127.0.0.1:9464; empty: off)"))

    def validate(self) -> None:
        if self.strategy.lower() not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        for name in ("download_encoding", "upload_encoding"):
            encoding_id(getattr(self, name))
        for name in ("download_codec", "upload_codec"):
            codec_id(getattr(self, name))
        positive = ("rounds", "devices_per_round", "batch_size", "local_epochs", "max_input_tokens",
                    "max_target_tokens", "block_size", "chunk_elems", "poll_seconds", "max_workers")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_updates < 1 or self.min_updates > self.devices_per_round:
            raise ValueError(f"min_updates must be 1..devices_per_round ({self.devices_per_round})")
        if self.chunk_elems % self.block_size:
            raise ValueError(f"chunk_elems ({self.chunk_elems}) must be a multiple of block_size ({self.block_size})")
        if ":" not in self.listen:
            raise ValueError(f"listen must be host:port, got {self.listen!r}")
        if self.metrics_listen:
            split_listen(self.metrics_listen)

    @property
    def devices_needed(self) -> int:
        return self.min_devices or self.devices_per_round

    def download_spec(self) -> TransferSpec:
        return TransferSpec(self.download_encoding, self.download_codec, self.zstd_level, 0, self.block_size,
                            self.chunk_elems)

    def upload_spec(self) -> TransferSpec:
        return TransferSpec(self.upload_encoding, self.upload_codec, self.zstd_level, 0, self.block_size,
                            self.chunk_elems)
