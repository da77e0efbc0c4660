"""The server's typed config: TOML keys and `fedserver run` flags share these names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcore.config import described
from fedcore.lora import LoraSpec, parse_targets
from fedcore.metrics import split_listen
from fedcore.wire import TransferSpec, codec_id, encoding_id

STRATEGIES = ("fedavg", "fedadam", "fedadamw", "fedyogi")
ROUND_POLICIES = ("steps", "samples", "time")


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
    # heterogeneous devices (after Szablewski, Sani, Lane)
    round_policy: str = field(default="steps", metadata=described("local work per device: 'steps' (same local_steps "
                                                            "everywhere), 'samples' (same samples: steps follow each "
                                                            "device's batch size), 'time' (per-device steps so all "
                                                            "finish together, from measured rates)"))
    local_samples: int = field(default=0, metadata=described("policy 'samples': samples per device and round "
                                                       "(0: local_steps x batch_size)"))
    time_budget_s: float = field(default=0.0, metadata=described("policy 'time': seconds per round for download + "
                                                           "compute + upload (0: the sampled devices' mean time "
                                                           "for local_steps)"))
    deadline_from_estimates: bool = field(default=False, metadata=described("round deadline from the sampled devices' "
                                                                      "expected times (capped by round_deadline_s)"))
    deadline_safety: float = field(default=3.0, metadata=described("deadline = this x the slowest expected time"))
    deadline_floor_s: float = field(default=60.0, metadata=described("shortest deadline derived from estimates"))
    # LoRA (FFA-LoRA: A frozen at a shared init, only B trained, uploaded and averaged)
    lora_rank: int = field(default=0, metadata=described("LoRA rank r; devices train and upload only the adapters' B "
                                                         "matrices (0: full fine-tuning)"))
    lora_alpha: float = field(default=0.0, metadata=described("LoRA alpha; the adapter adds (alpha / r) B A to its "
                                                              "layer (0: 2 x lora_rank)"))
    lora_targets: str = field(default="q,v", metadata=described("T5 linear layers that get adapters, comma-separated: "
                                                                "q, k, v, o, wi_0, wi_1, wo, lm_head"))
    lora_dropout: float = field(default=0.0, metadata=described("dropout on the adapters' input in local training"))
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
    # security: TLS on every connection unless insecure is set explicitly
    tls_cert: Path | None = field(default=None, metadata=described("server certificate (PEM; `fedserver certs` makes one)"))
    tls_key: Path | None = field(default=None, metadata=described("server private key (PEM)"))
    tls_ca: Path | None = field(default=None, metadata=described("CA of the client certificates: mutual TLS, a device is "
                                                             "who its certificate says"))
    enrollment_tokens: Path | None = field(default=None, metadata=described("TLS without tls_ca: file of 'device_id token' "
                                                                        "lines mapping tokens to devices"))
    revoked: Path | None = field(default=None, metadata=described("file of revoked device ids or certificate serials "
                                                              "(hex), one a line; re-read when it changes"))
    insecure: bool = field(default=False, metadata=described("serve plaintext gRPC without TLS or identities "
                                                         "(loopback experiments only)"))
    # limits on what a device may send
    rate_limit_rps: float = field(default=50.0, metadata=described("requests per second per device (0: no limit)"))
    rate_limit_burst: int = field(default=200, metadata=described("requests a device may send at once above the rate"))
    max_streams_per_device: int = field(default=4, metadata=described("concurrent Download/Upload streams per device"))
    max_message_bytes: int = field(default=16 << 20, metadata=described("largest gRPC message the server accepts"))
    max_chunk_elems: int = field(default=1 << 20, metadata=described("largest chunk an upload may declare (elements)"))
    max_update_bytes: int = field(default=0, metadata=described("wire bytes one upload may send, retries included "
                                                            "(0: 2x the model at fp32)"))
    max_update_chunks: int = field(default=0, metadata=described("chunks one upload may send, retries included "
                                                             "(0: twice the chunks the model needs, plus 16)"))
    max_update_norm: float = field(default=1e4, metadata=described("refuse an update whose L2 norm of (update - global "
                                                               "model) is larger (0: no bound)"))
    clip_update_norm: float = field(default=0.0, metadata=described("scale an update's delta down to this L2 norm "
                                                                "before aggregation (0: no clipping)"))
    metrics_listen: str = field(default="", metadata=described(
        "host:port for Prometheus /metrics, plain HTTP: localhost or a management network only "
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
        if self.round_policy not in ROUND_POLICIES:
            raise ValueError(f"round_policy {self.round_policy!r}: choose one of {', '.join(ROUND_POLICIES)}")
        if self.round_policy != "steps" and self.local_steps <= 0 and self.local_samples <= 0:
            raise ValueError(f"round_policy {self.round_policy!r} needs local_steps > 0 (or local_samples > 0)")
        if self.deadline_safety < 1 or self.deadline_floor_s <= 0 or self.time_budget_s < 0:
            raise ValueError("need deadline_safety >= 1, deadline_floor_s > 0 and time_budget_s >= 0")
        if ":" not in self.listen:
            raise ValueError(f"listen must be host:port, got {self.listen!r}")
        if self.max_message_bytes < self.chunk_elems * 4 + (64 << 10):
            raise ValueError(f"max_message_bytes ({self.max_message_bytes}) cannot carry a chunk of chunk_elems "
                             f"({self.chunk_elems}) fp32 elements")
        if self.max_update_norm < 0 or self.clip_update_norm < 0:
            raise ValueError("max_update_norm and clip_update_norm must be >= 0")
        if self.max_chunk_elems < self.chunk_elems:
            raise ValueError(f"max_chunk_elems ({self.max_chunk_elems}) is below chunk_elems ({self.chunk_elems})")
        if self.metrics_listen:
            split_listen(self.metrics_listen)
        self.validate_lora()
        self.validate_security()

    def validate_lora(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        spec = self.lora_spec()
        if spec is None:
            return
        spec.validate()
        if self.download_payload == "delta":
            raise ValueError("lora_rank > 0 with download_payload = 'delta': after the first download devices "
                             "already receive only the B matrices; set download_payload = 'weights'")
        if self.download_encoding.lower() != "fp32":
            raise ValueError(f"lora_rank > 0 needs download_encoding = 'fp32' (not {self.download_encoding!r}): "
                             f"adapter-only downloads replace B in the model a device holds, which must be the "
                             f"exact version the server sent")

    def lora_spec(self) -> LoraSpec | None:
        """The adapters' settings, or None for full fine-tuning."""
        if self.lora_rank <= 0:
            return None
        return LoraSpec(self.lora_rank, self.lora_alpha or 2.0 * self.lora_rank, parse_targets(self.lora_targets),
                        self.lora_dropout)

    def validate_security(self) -> None:
        if self.insecure:
            return
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("no tls_cert/tls_key: create a fleet's certificates with `fedserver certs --out DIR "
                             "--devices ...` and set tls_cert, tls_key and tls_ca, or set insecure = true for "
                             "plaintext")
        if self.tls_ca is None and self.enrollment_tokens is None:
            raise ValueError("TLS without tls_ca needs enrollment_tokens to know who a device is; set tls_ca for "
                             "mutual TLS, or enrollment_tokens")
        for name in ("tls_cert", "tls_key", "tls_ca", "enrollment_tokens"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{name} {p} does not exist")

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
