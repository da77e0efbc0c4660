"""The server's typed config: TOML keys and `fedserver run` flags share these names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcore.config import ConfigError, check_fields, check_preset, check_weights_dir, described
from fedcore.methods import PARTIAL, ZERO_ORDER, FfaLora, FullFineTuning, LayerWise, Method, SelectiveHeads
from fedcore.methods.lora import LoraSpec, parse_targets
from fedcore.methods.zeroorder import T5_SECOND_BLOCK, ZeroOrderSpec
from fedcore.wire import TransferSpec
from fedcore.wire.formats import CODECS, ENCODINGS

STRATEGIES = ("fedavg", "fedadam", "fedadamw", "fedyogi")
METHOD_CHOICES = ("auto", "full", "lora", *ZERO_ORDER, *PARTIAL)
ROUND_POLICIES = ("steps", "samples", "time")
PAYLOADS = ("weights", "delta")
WIRE_ENCODINGS = tuple(e for e in ENCODINGS if e != "raw")
WIRE_CODECS = tuple(CODECS)
INT32 = (1 << 31) - 1  # the wire's TrainingSettings fields are int32
MAX_DEVICES = 1 << 20
MAX_SEED = (1 << 40) - 1  # the seed a device gets is seed x 1000003 + round, a uint64


@dataclass
class ServerConfig:
    listen: str = field(default="0.0.0.0:50051", metadata=described("address:port to serve on", address="listen"))
    out: Path = field(default=Path("runs/server"), metadata=described("run directory: checkpoints, rounds.jsonl, summary.json"))
    # model
    preset: str = field(default="small", metadata=described("model preset: tiny, small, base, large, xl"))
    weights_dir: Path | None = field(default=None, metadata=described("local Hugging Face dir with FLAN-T5 weights"))
    # rounds (defaults reproduce Woisetschläger et al. 2023)
    rounds: int = field(default=20, metadata=described("federated rounds to run", ge=1, le=INT32))
    devices_per_round: int = field(default=3, metadata=described("devices sampled each round", ge=1, le=MAX_DEVICES))
    min_devices: int = field(default=0, metadata=described("devices that must be connected before a round starts "
                                                     "(0: devices_per_round)", ge=0, le=MAX_DEVICES))
    min_updates: int = field(default=1, metadata=described("updates needed to aggregate when the deadline passes",
                                                           ge=1, le=MAX_DEVICES))
    round_deadline_s: float = field(default=3600.0, metadata=described("seconds a round waits for its updates", gt=0))
    seed: int = field(default=0, metadata=described("seed for device sampling and model init", ge=0, le=MAX_SEED))
    # local training sent to the devices
    local_epochs: int = field(default=1, metadata=described("local epochs per round", ge=1, le=INT32))
    local_steps: int = field(default=0, metadata=described("local steps per round (0: use local_epochs)",
                                                           ge=0, le=INT32))
    batch_size: int = field(default=32, metadata=described("local minibatch size", ge=1, le=INT32))
    learning_rate: float = field(default=5e-4, metadata=described("local AdamW learning rate", gt=0))
    weight_decay: float = field(default=0.0, metadata=described("local AdamW weight decay (zero-order methods: "
                                                                "theta -= learning_rate x weight_decay x theta a step)",
                                                                ge=0))
    max_input_tokens: int = field(default=512, metadata=described("dialogue tokens kept", ge=1, le=INT32))
    max_target_tokens: int = field(default=95, metadata=described("summary tokens kept and generated", ge=1, le=INT32))
    # heterogeneous devices (after Szablewski, Sani, Lane)
    round_policy: str = field(default="steps", metadata=described("local work per device: 'steps' (same local_steps "
                                                            "everywhere), 'samples' (same samples: steps follow each "
                                                            "device's batch size), 'time' (per-device steps so all "
                                                            "finish together, from measured rates)",
                                                            choices=ROUND_POLICIES))
    local_samples: int = field(default=0, metadata=described("policy 'samples': samples per device and round "
                                                       "(0: local_steps x batch_size)", ge=0, le=INT32))
    time_budget_s: float = field(default=0.0, metadata=described("policy 'time': seconds per round for download + "
                                                           "compute + upload (0: the sampled devices' mean time "
                                                           "for local_steps)", ge=0))
    deadline_from_estimates: bool = field(default=False, metadata=described("round deadline from the sampled devices' "
                                                                      "expected times (capped by round_deadline_s)"))
    deadline_safety: float = field(default=3.0, metadata=described("deadline = this x the slowest expected time", ge=1))
    deadline_floor_s: float = field(default=60.0, metadata=described("shortest deadline derived from estimates", gt=0))
    method: str = field(default="auto", metadata=described(
        "fine-tuning method: full, lora (FFA-LoRA), mezo, fedkseed or fedspzo (zero-order: forward passes only, "
        "updates of a few KB), layerwise (CAFF: each device its output-side layers, as its budgets allow) or smha "
        "(each device a share of the attention heads); 'auto': lora when lora_rank > 0, else full",
        choices=METHOD_CHOICES))
    # LoRA (FFA-LoRA: A frozen at a shared init, only B trained, uploaded and averaged)
    lora_rank: int = field(default=0, metadata=described("LoRA rank r; devices train and upload only the adapters' B "
                                                         "matrices (0: full fine-tuning)", ge=0, le=4096))
    lora_alpha: float = field(default=0.0, metadata=described("LoRA alpha; the adapter adds (alpha / r) B A to its "
                                                              "layer (0: 2 x lora_rank)", ge=0))
    lora_targets: str = field(default="q,v", metadata=described("T5 linear layers that get adapters, comma-separated: "
                                                                "q, k, v, o, wi_0, wi_1, wo, lm_head"))
    lora_dropout: float = field(default=0.0, metadata=described("dropout on the adapters' input in local training",
                                                                ge=0, lt=1))
    # zero-order methods (docs/explanation/zero-order.md); learning_rate is their step size too
    zo_eps: float = field(default=1e-3, metadata=described("zero-order: perturbation scale eps", gt=0, lt=1))
    zo_perturbations: int = field(default=1, metadata=described(
        "zero-order: directions per local step (fedspzo: of the first block, P1)", ge=1, le=1024))
    zo_pool_size: int = field(default=4096, metadata=described(
        "fedkseed: K, the candidate seeds of the run (the paper's default)", ge=1, le=1 << 24))
    zo_weighted_seeds: bool = field(default=False, metadata=described(
        "fedkseed: FedKSeed-Pro, sample pool seeds with probabilities from their past projected gradients (a softmax "
        "of their min-max normalised mean magnitude; K bytes more in each task)"))
    zo_second_block: str = field(default=",".join(T5_SECOND_BLOCK), metadata=described(
        "fedspzo: tensor-name prefixes of the second block, comma-separated (the first block is the rest: the "
        "encoder and the shared embedding)"))
    zo_second_perturbations: int = field(default=4, metadata=described(
        "fedspzo: directions of the second block per local step (P2)", ge=1, le=1024))
    # selective heads (docs/explanation/partial-training.md)
    smha_fraction: float = field(default=0.25, metadata=described(
        "smha: share of the attention heads a device trains when it states none (less where its budgets need): "
        "0.25, 0.5 or 1", gt=0, le=1))
    smha_full_devices: int = field(default=1, metadata=described(
        "smha: devices a round that train every head and weight (the poster: at least one, for convergence)",
        ge=0, le=1 << 16))
    smha_train_rest: bool = field(default=True, metadata=described(
        "smha: the other weights (feed-forward, norms, embeddings, lm_head) train with the selected heads"))
    # aggregation
    strategy: str = field(default="fedavg", metadata=described("fedavg, fedadam, fedadamw or fedyogi",
                                                               choices=STRATEGIES))
    server_lr: float | None = field(default=None, metadata=described("server learning rate (default: the strategy's)",
                                                                     gt=0))
    beta1: float = field(default=0.9, metadata=described("adaptive strategies: first moment decay", ge=0, lt=1))
    beta2: float = field(default=0.99, metadata=described("adaptive strategies: second moment decay", ge=0, lt=1))
    tau: float = field(default=1e-3, metadata=described("adaptive strategies: adaptivity", gt=0))
    server_weight_decay: float = field(default=1e-2, metadata=described("fedadamw: decoupled weight decay", ge=0))
    # wire
    download_encoding: str = field(default="fp32", metadata=described("full-model downloads: fp32, fp16, bf16, int8, "
                                                                      "nf4 or int4 (fp32 keeps delta downloads possible)",
                                                                      choices=WIRE_ENCODINGS))
    download_codec: str = field(default="none", metadata=described("none, zstd or zstd-bg (byte-grouped zstd)",
                                                                   choices=WIRE_CODECS))
    download_payload: str = field(default="weights", metadata=described(
        "'delta': a device holding a recent version exactly gets the quantized broadcast delta(s) to the new one, "
        "which the server applies to its own model too (with error feedback); 'weights': always the full model",
        choices=PAYLOADS))
    download_delta_encoding: str = field(default="int8", metadata=described("encoding of broadcast deltas: int8, int4, "
                                                                            "nf4, bf16, fp16 or fp32",
                                                                            choices=WIRE_ENCODINGS))
    download_delta_keep: int = field(default=4, metadata=described("broadcast deltas kept to serve recent versions; "
                                                                  "a device further behind gets the full model",
                                                                  ge=1, le=1000))
    upload_encoding: str = field(default="fp32", metadata=described("fp32, fp16, bf16, int8, nf4 or int4",
                                                                    choices=WIRE_ENCODINGS))
    upload_codec: str = field(default="none", metadata=described("none, zstd or zstd-bg (byte-grouped zstd)",
                                                                 choices=WIRE_CODECS))
    upload_payload: str = field(default="weights", metadata=described("'weights' or 'delta' (local minus global)",
                                                                      choices=PAYLOADS))
    error_feedback: bool = field(default=False, metadata=described("delta uploads: devices add their last quantization "
                                                                   "residual to the next delta"))
    # link-aware upload encoding
    link_aware: bool = field(default=False, metadata=described(
        "choose each device's upload encoding from its measured link rates to meet link_target_g or link_byte_budget"))
    link_target_g: float = field(default=1.0, metadata=described("link_aware: wanted G = T_comp / T_comm per device",
                                                                 ge=0))
    link_byte_budget: int = field(default=0, metadata=described("link_aware: most upload bytes per device and round "
                                                                "(0: no budget, use link_target_g)", ge=0))
    link_t_comp_s: float = field(default=0.0, metadata=described("link_aware: T_comp to plan with, e.g. the target "
                                                                 "hardware's (0: the device's last measured)", ge=0))
    link_encodings: str = field(default="fp32,bf16,int8,int4", metadata=described(
        "link_aware: upload encodings to choose from, most precise first"))
    zstd_level: int = field(default=3, metadata=described("zstd level", ge=1, le=22))
    block_size: int = field(default=64, metadata=described("quantization block size (elements)", ge=1, le=1 << 20))
    chunk_elems: int = field(default=1 << 18, metadata=described("elements per chunk", ge=1, le=INT32))
    # evaluation
    eval_data: str = field(default="builtin", metadata=described("held-out set: 'builtin' or a Samsum JSON/JSONL file"))
    eval_size: int = field(default=64, metadata=described("held-out examples evaluated after each round", ge=0))
    eval_batch_size: int = field(default=16, metadata=described("evaluation batch size", ge=1))
    # service
    # A waiting poll costs no thread, and a round's start ends it at once, so a long poll costs no hand-out
    # latency; each poll does cost the server about 1 ms of CPU: N devices make N / poll_seconds calls a second.
    # And a device is out of reach while its next poll is on the way: at 30 s, 10,000 devices kept a 2-core
    # server busy enough after they all joined that a sampled device between polls got its task 1.9-3.1 s late.
    poll_seconds: int = field(default=60, metadata=described(
        "longest a GetTask call is held; a new round answers waiting polls at once", ge=1, le=3600))
    liveness_s: float = field(default=180.0, metadata=described(
        "a device unheard of this long is not sampled (more than poll_seconds)", gt=0))
    # The pool computes (chunk encoding and checks, upload staging): more threads than cores only contend.
    max_workers: int = field(default=16, metadata=described(
        "threads for blocking work: upload and download chunks, status (a waiting poll holds none)", ge=1,
        le=10000))
    max_rpcs: int = field(default=30000, metadata=described(
        "calls open at once, waiting polls included; more are refused with RESOURCE_EXHAUSTED (0: no limit)",
        ge=0, le=10_000_000))
    max_concurrent_uploads: int = field(default=8, metadata=described("uploads staged in memory at once", ge=1))
    checkpoint_keep: int = field(default=3, metadata=described("checkpoints kept on disk", ge=1))
    save_updates: bool = field(default=False, metadata=described("keep every received update under out/updates"))
    threads: int = field(default=0, metadata=described("torch threads (0: torch's default)", ge=0, le=4096))
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
    rate_limit_rps: float = field(default=50.0, metadata=described("requests per second per device (0: no limit)",
                                                                   ge=0))
    rate_limit_burst: int = field(default=200, metadata=described("requests a device may send at once above the rate",
                                                                  ge=1))
    max_streams_per_device: int = field(default=4, metadata=described(
        "concurrent Download/Upload streams per device (0: no limit)", ge=0))
    max_message_bytes: int = field(default=16 << 20, metadata=described("largest gRPC message the server accepts",
                                                                        ge=1, le=1 << 31))
    max_chunk_elems: int = field(default=1 << 20, metadata=described("largest chunk an upload may declare (elements)",
                                                                     ge=1, le=INT32))
    max_update_bytes: int = field(default=0, metadata=described("wire bytes one upload may send, retries included "
                                                            "(0: 2x the model at fp32)", ge=0))
    max_update_chunks: int = field(default=0, metadata=described("chunks one upload may send, retries included "
                                                             "(0: twice the chunks the model needs, plus 16)", ge=0))
    max_update_norm: float = field(default=1e4, metadata=described("refuse an update whose L2 norm of (update - global "
                                                               "model) is larger (0: no bound)", ge=0))
    clip_update_norm: float = field(default=0.0, metadata=described("scale an update's delta down to this L2 norm "
                                                                "before aggregation (0: no clipping)", ge=0))
    metrics_listen: str = field(default="", metadata=described(
        "host:port for Prometheus /metrics, plain HTTP: localhost or a management network only "
        "(e.g. 127.0.0.1:9464; empty: off)", address="listen", empty=True))

    def validate(self) -> None:
        """Every value in its declared range (field metadata), then what depends on more than one field."""
        check_fields(self)
        check_preset(self.preset)
        if self.weights_dir is not None:
            check_weights_dir(self.weights_dir)
        for name in self.link_encoding_list:
            if name not in WIRE_ENCODINGS:
                raise ConfigError(f"link_encodings must list encodings of {', '.join(WIRE_ENCODINGS)}, got "
                                  f"{name!r}", "link_encodings")
        if self.error_feedback and self.upload_payload != "delta":
            raise ConfigError("error_feedback needs upload_payload = 'delta' (the residual is carried between "
                              "deltas)", "error_feedback")
        if self.link_aware and not (self.link_target_g > 0 or self.link_byte_budget > 0):
            raise ConfigError("link_aware needs link_target_g > 0 or link_byte_budget > 0", "link_aware")
        if self.min_updates > self.devices_per_round:
            raise ConfigError(f"min_updates must be 1..devices_per_round ({self.devices_per_round}), got "
                              f"{self.min_updates}", "min_updates")
        if self.min_devices and self.min_devices < self.min_updates:
            raise ConfigError(f"min_devices must be 0 (devices_per_round) or at least min_updates "
                              f"({self.min_updates}): a round started with fewer can never aggregate, got "
                              f"{self.min_devices}", "min_devices")
        if self.liveness_s <= self.poll_seconds:
            raise ConfigError(f"liveness_s must be more than poll_seconds ({self.poll_seconds}): a device waiting "
                              f"in a poll would count as gone, got {self.liveness_s:g}", "liveness_s")
        if self.chunk_elems % self.block_size:
            raise ConfigError(f"chunk_elems must be a multiple of block_size ({self.block_size}), got "
                              f"{self.chunk_elems}", "chunk_elems")
        if self.block_size > self.chunk_elems:
            raise ConfigError(f"block_size must be at most chunk_elems ({self.chunk_elems}), got {self.block_size}",
                              "block_size")
        if self.round_policy != "steps" and self.local_steps <= 0 and self.local_samples <= 0:
            raise ConfigError(f"round_policy {self.round_policy!r} needs local_steps > 0 (or local_samples > 0)",
                              "round_policy")
        if self.max_message_bytes < self.chunk_elems * 4 + (64 << 10):
            raise ConfigError(f"max_message_bytes ({self.max_message_bytes}) cannot carry a chunk of chunk_elems "
                              f"({self.chunk_elems}) fp32 elements", "max_message_bytes")
        if self.max_chunk_elems < self.chunk_elems:
            raise ConfigError(f"max_chunk_elems ({self.max_chunk_elems}) is below chunk_elems ({self.chunk_elems})",
                              "max_chunk_elems")
        if self.deadline_from_estimates and self.deadline_floor_s > self.round_deadline_s:
            raise ConfigError(f"deadline_floor_s must be at most round_deadline_s ({self.round_deadline_s:g}), got "
                              f"{self.deadline_floor_s:g}", "deadline_floor_s")
        self.validate_method()
        self.validate_security()

    def validate_method(self) -> None:
        method = self.build_method()
        try:
            method.validate()
            method.check_transfers(self.download_payload, self.download_encoding)
        except ValueError as exc:
            raise ConfigError(str(exc), "method") from None
        if self.method in ZERO_ORDER:
            self.validate_zero_order()

    def validate_zero_order(self) -> None:
        """Settings a zero-order run cannot honour, refused by name rather than ignored."""
        if self.lora_rank:
            raise ConfigError(f"method {self.method!r} tunes every weight: set lora_rank = 0", "lora_rank")
        if self.strategy != "fedavg" or self.server_lr is not None:
            # An adaptive server step moves each weight by its own factor: no longer a sum of seeded directions,
            # so devices could not replay it from the seeds.
            raise ConfigError(f"method {self.method!r} needs strategy = 'fedavg' without server_lr: devices catch up "
                              f"by replaying the round's seeded steps, which an adaptive server step is not",
                              "strategy")
        moved = [name for name, default in (("upload_encoding", "fp32"), ("upload_payload", "weights"),
                                            ("upload_codec", "none"), ("error_feedback", False),
                                            ("link_aware", False)) if getattr(self, name) != default]
        if moved:
            raise ConfigError(f"method {self.method!r} uploads (seed, scalar) pairs, not tensors: "
                              f"{', '.join(moved)} do not apply; leave them unset", moved[0])

    def build_method(self) -> Method:
        """The fine-tuning method these settings ask for (fedcore.methods)."""
        if self.method in ZERO_ORDER:
            return ZERO_ORDER[self.method](self.zo_spec())
        if self.method in PARTIAL:
            return self.partial_method()
        spec = self.lora_spec()
        if self.method == "lora" and spec is None:
            raise ConfigError("method 'lora' needs lora_rank > 0", "lora_rank")
        if self.method == "full" and spec is not None:
            raise ConfigError(f"method 'full' with lora_rank {self.lora_rank}: set method = 'lora' or 'auto', or "
                              f"lora_rank = 0", "method")
        return FfaLora(spec) if spec is not None else FullFineTuning()

    def partial_method(self) -> Method:
        """layerwise or smha, with their settings."""
        if self.lora_rank:
            raise ConfigError(f"method {self.method!r} trains the model's own weights: set lora_rank = 0", "lora_rank")
        if self.method == "smha":
            return SelectiveHeads(fraction=self.smha_fraction, full_devices=self.smha_full_devices,
                                  train_rest=self.smha_train_rest)
        return LayerWise()

    def zo_spec(self) -> ZeroOrderSpec:
        """The zero-order methods' settings (used when method is one of them)."""
        return ZeroOrderSpec(
            learning_rate=self.learning_rate, weight_decay=self.weight_decay, eps=self.zo_eps,
            perturbations=self.zo_perturbations,
            pool_size=self.zo_pool_size if self.method == "fedkseed" else 0, pool_seed=self.seed,
            weighted_seeds=self.zo_weighted_seeds,
            second_block=parse_targets(self.zo_second_block) if self.method == "fedspzo" else (),
            second_perturbations=self.zo_second_perturbations if self.method == "fedspzo" else 0)

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
                raise ConfigError(f"{name} {p} does not exist", name)

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
