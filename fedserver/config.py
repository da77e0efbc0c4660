"""The server's typed config: TOML keys and `fedserver run` flags share these names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcore.wire import TransferSpec, codec_id, encoding_id

STRATEGIES = ("fedavg", "fedadam", "fedadamw", "fedyogi")


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class ServerConfig:
    listen: str = field(default="0.0.0.0:50051", metadata=_h("address:port to serve on"))
    out: Path = field(default=Path("runs/server"), metadata=_h("run directory: checkpoints, rounds.jsonl, summary.json"))
    # model
    preset: str = field(default="small", metadata=_h("model preset: tiny, small, base, large, xl"))
    weights_dir: Path | None = field(default=None, metadata=_h("local Hugging Face dir with FLAN-T5 weights"))
    # rounds (defaults reproduce Woisetschläger et al. 2023)
    rounds: int = field(default=20, metadata=_h("federated rounds to run"))
    devices_per_round: int = field(default=3, metadata=_h("devices sampled each round"))
    min_devices: int = field(default=0, metadata=_h("devices that must be connected before a round starts "
                                                     "(0: devices_per_round)"))
    min_updates: int = field(default=1, metadata=_h("updates needed to aggregate when the deadline passes"))
    round_deadline_s: float = field(default=3600.0, metadata=_h("seconds a round waits for its updates"))
    seed: int = field(default=0, metadata=_h("seed for device sampling and model init"))
    # local training sent to the devices
    local_epochs: int = field(default=1, metadata=_h("local epochs per round"))
    local_steps: int = field(default=0, metadata=_h("local steps per round (0: use local_epochs)"))
    batch_size: int = field(default=32, metadata=_h("local minibatch size"))
    learning_rate: float = field(default=5e-4, metadata=_h("local AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_h("local AdamW weight decay"))
    max_input_tokens: int = field(default=512, metadata=_h("dialogue tokens kept"))
    max_target_tokens: int = field(default=95, metadata=_h("summary tokens kept and generated"))
    # aggregation
    strategy: str = field(default="fedavg", metadata=_h("fedavg, fedadam, fedadamw or fedyogi"))
    server_lr: float | None = field(default=None, metadata=_h("server learning rate (default: the strategy's)"))
    beta1: float = field(default=0.9, metadata=_h("adaptive strategies: first moment decay"))
    beta2: float = field(default=0.99, metadata=_h("adaptive strategies: second moment decay"))
    tau: float = field(default=1e-3, metadata=_h("adaptive strategies: adaptivity"))
    server_weight_decay: float = field(default=1e-2, metadata=_h("fedadamw: decoupled weight decay"))
    # wire
    download_encoding: str = field(default="fp32", metadata=_h("fp32, fp16, bf16, int8 or nf4"))
    download_codec: str = field(default="none", metadata=_h("none or zstd"))
    upload_encoding: str = field(default="fp32", metadata=_h("fp32, fp16, bf16, int8 or nf4"))
    upload_codec: str = field(default="none", metadata=_h("none or zstd"))
    zstd_level: int = field(default=3, metadata=_h("zstd level"))
    block_size: int = field(default=64, metadata=_h("quantization block size (elements)"))
    chunk_elems: int = field(default=1 << 18, metadata=_h("elements per chunk"))
    # evaluation
    eval_data: str = field(default="builtin", metadata=_h("held-out set: 'builtin' or a Samsum JSON/JSONL file"))
    eval_size: int = field(default=64, metadata=_h("held-out examples evaluated after each round"))
    eval_batch_size: int = field(default=16, metadata=_h("evaluation batch size"))
    # service
    poll_seconds: int = field(default=10, metadata=_h("longest a GetTask call is held"))
    liveness_s: float = field(default=60.0, metadata=_h("a device unheard of this long is not sampled"))
    max_workers: int = field(default=64, metadata=_h("gRPC server threads"))
    max_concurrent_uploads: int = field(default=8, metadata=_h("uploads staged in memory at once"))
    checkpoint_keep: int = field(default=3, metadata=_h("checkpoints kept on disk"))
    save_updates: bool = field(default=False, metadata=_h("keep every received update under out/updates"))
    threads: int = field(default=0, metadata=_h("torch threads (0: torch's default)"))

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

    @property
    def devices_needed(self) -> int:
        return self.min_devices or self.devices_per_round

    def download_spec(self) -> TransferSpec:
        return TransferSpec(self.download_encoding, self.download_codec, self.zstd_level, 0, self.block_size,
                            self.chunk_elems)

    def upload_spec(self) -> TransferSpec:
        return TransferSpec(self.upload_encoding, self.upload_codec, self.zstd_level, 0, self.block_size,
                            self.chunk_elems)
