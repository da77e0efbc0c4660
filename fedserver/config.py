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
    download_encoding: str = field(default="fp32", metadata=described("full-model downloads: fp32, fp16, bf16, int8, "
                                                                      "nf4 or int4 (fp32 keeps delta downloads possible)"))
    download_codec: str = field(default="none", metadata=described("none, zstd or zstd-bg (byte-grouped zstd)"))
    download_payload: str = field(default="weights", metadata=described(
        "'delta': a device holding a recent version exactly gets the quantized broadcast delta(s) to the new one, "
        "which the server applies to its own model too (with error feedback); 'weights': always the full model"))
    download_delta_encoding: str = field(default="int8", metadata=described("encoding of broadcast deltas: int8, int4, "
                                                                            "nf4, bf16, fp16 or fp32"))
    download_delta_keep: int = field(default=4, metadata=described("broadcast deltas kept to serve recent versions; "
                                                                  "a device further behind gets the full model"))
    upload_encoding: str = field(default="fp32", metadata=described("fp32, fp16, bf16, int8, nf4 or int4"))
    upload_codec: str = field(default="none", metadata=described("none, zstd or zstd-bg (byte-grouped zstd)"))
    upload_payload: str = field(default="weights", metadata=described("'weights' or 'delta' (local minus global)"))
    error_feedback: bool = field(default=False, metadata=described("delta uploads: devices add their last quantization "
                                                                   "residual to the next delta"))
    # link-aware upload encoding
    link_aware: bool = field(default=False, metadata=described(
        "choose each device's upload encoding from its measured link rates to meet link_target_g or link_byte_budget"))
    link_target_g: float = field(default=1.0, metadata=described("link_aware: wanted G = T_comp / T_comm per device"))
    link_byte_budget: int = field(default=0, metadata=described("link_aware: most upload bytes per device and round "
                                                                "(0: no budget, use link_target_g)"))
    link_t_comp_s: float = field(default=0.0, metadata=described("link_aware: T_comp to plan with, e.g. the target "
                                                                 "hardware's (0: the device's last measured)"))
    link_encodings: str = field(default="fp32,bf16,int8,int4", metadata=described(
        "link_aware: upload encodings to choose from, most precise first"))
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
        for name in ("download_encoding", "upload_encoding", "download_delta_encoding"):
            encoding_id(getattr(self, name))
        for name in self.link_encoding_list:
            encoding_id(name)
        for name in ("download_payload", "upload_payload"):
            if getattr(self, name) not in ("weights", "delta"):
                raise ValueError(f"{name} must be 'weights' or 'delta', got {getattr(self, name)!r}")
        if self.error_feedback and self.upload_payload != "delta":
            raise ValueError("error_feedback needs upload_payload = 'delta' (the residual is carried between deltas)")
        if self.download_delta_keep < 1:
            raise ValueError(f"download_delta_keep must be at least 1, got {self.download_delta_keep}")
        if self.link_aware and not (self.link_target_g > 0 or self.link_byte_budget > 0):
            raise ValueError("link_aware needs link_target_g > 0 or link_byte_budget > 0")
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

    def upload_spec(self, encoding: str | None = None) -> TransferSpec:
        return TransferSpec(encoding or self.upload_encoding, self.upload_codec, self.zstd_level, 0, self.block_size,
                            self.chunk_elems, payload=self.upload_payload)

    def download_delta_spec(self) -> TransferSpec:
        return TransferSpec(self.download_delta_encoding, self.download_codec, self.zstd_level, 0, self.block_size,
                            self.chunk_elems, payload="delta")

    @property
    def link_encoding_list(self) -> list[str]:
        return [e.strip().lower() for e in self.link_encodings.split(",") if e.strip()]
