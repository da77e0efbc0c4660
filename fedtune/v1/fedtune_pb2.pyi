from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    RAW: _ClassVar[Encoding]
    FP32: _ClassVar[Encoding]
    FP16: _ClassVar[Encoding]
    BF16: _ClassVar[Encoding]
    INT8: _ClassVar[Encoding]
    NF4: _ClassVar[Encoding]
    INT4: _ClassVar[Encoding]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    NONE: _ClassVar[Codec]
    ZSTD: _ClassVar[Codec]
    ZSTD_BG: _ClassVar[Codec]

class Payload(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_UNSPECIFIED: _ClassVar[Payload]
    WEIGHTS: _ClassVar[Payload]
    DELTA: _ClassVar[Payload]
ENCODING_UNSPECIFIED: Encoding
RAW: Encoding
FP32: Encoding
FP16: Encoding
BF16: Encoding
INT8: Encoding
NF4: Encoding
INT4: Encoding
CODEC_UNSPECIFIED: Codec
NONE: Codec
ZSTD: Codec
ZSTD_BG: Codec
PAYLOAD_UNSPECIFIED: Payload
WEIGHTS: Payload
DELTA: Payload

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "encoding", "codec", "block_size", "chunk_elems", "digest", "payload", "wire_bytes", "base_version")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ELEMS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    encoding: Encoding
    codec: Codec
    block_size: int
    chunk_elems: int
    digest: str
    payload: Payload
    wire_bytes: int
    base_version: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., codec: _Optional[_Union[Codec, str]] = ..., block_size: _Optional[int] = ..., chunk_elems: _Optional[int] = ..., digest: _Optional[str] = ..., payload: _Optional[_Union[Payload, str]] = ..., wire_bytes: _Optional[int] = ..., base_version: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor", "dtype", "shape", "offset", "count", "encoding", "codec", "block_size", "scales", "payload", "crc32c", "raw_len")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    RAW_LEN_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    count: int
    encoding: Encoding
    codec: Codec
    block_size: int
    scales: bytes
    payload: bytes
    crc32c: int
    raw_len: int
    def __init__(self, tensor: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., codec: _Optional[_Union[Codec, str]] = ..., block_size: _Optional[int] = ..., scales: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., raw_len: _Optional[int] = ...) -> None: ...

class Position(_message.Message):
    __slots__ = ("tensor_index", "offset")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("accelerator", "memory_bytes", "software_version", "encodings", "codecs", "cpu_count", "budgets")
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    accelerator: str
    memory_bytes: int
    software_version: str
    encodings: _containers.RepeatedScalarFieldContainer[Encoding]
    codecs: _containers.RepeatedScalarFieldContainer[Codec]
    cpu_count: int
    budgets: Budgets
    def __init__(self, accelerator: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., software_version: _Optional[str] = ..., encodings: _Optional[_Iterable[_Union[Encoding, str]]] = ..., codecs: _Optional[_Iterable[_Union[Codec, str]]] = ..., cpu_count: _Optional[int] = ..., budgets: _Optional[_Union[Budgets, _Mapping]] = ...) -> None: ...

class Budgets(_message.Message):
    __slots__ = ("memory_bytes", "compute_flops", "upload_bytes", "memory_source", "head_fraction")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    compute_flops: float
    upload_bytes: int
    memory_source: str
    head_fraction: float
    def __init__(self, memory_bytes: _Optional[int] = ..., compute_flops: _Optional[float] = ..., upload_bytes: _Optional[int] = ..., memory_source: _Optional[str] = ..., head_fraction: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("device_id", "capabilities", "num_samples", "cached_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CACHED_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    capabilities: Capabilities
    num_samples: int
    cached_version: str
    def __init__(self, device_id: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., num_samples: _Optional[int] = ..., cached_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("session_id", "model_preset", "model_config_json", "poll_seconds", "server_version", "base_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    POLL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_preset: str
    model_config_json: str
    poll_seconds: int
    server_version: str
    base_version: str
    def __init__(self, session_id: _Optional[str] = ..., model_preset: _Optional[str] = ..., model_config_json: _Optional[str] = ..., poll_seconds: _Optional[int] = ..., server_version: _Optional[str] = ..., base_version: _Optional[str] = ...) -> None: ...

class TrainingSettings(_message.Message):
    __slots__ = ("local_epochs", "local_steps", "batch_size", "learning_rate", "weight_decay", "max_input_tokens", "max_target_tokens", "seed", "local_samples", "lora", "method", "zero_order", "plan")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ZERO_ORDER_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    max_input_tokens: int
    max_target_tokens: int
    seed: int
    local_samples: int
    lora: LoraSettings
    method: str
    zero_order: ZeroOrderSettings
    plan: TrainPlan
    def __init__(self, local_epochs: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_input_tokens: _Optional[int] = ..., max_target_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., local_samples: _Optional[int] = ..., lora: _Optional[_Union[LoraSettings, _Mapping]] = ..., method: _Optional[str] = ..., zero_order: _Optional[_Union[ZeroOrderSettings, _Mapping]] = ..., plan: _Optional[_Union[TrainPlan, _Mapping]] = ...) -> None: ...

class TrainPlan(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorPart]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorPart, _Mapping]]] = ...) -> None: ...

class TensorPart(_message.Message):
    __slots__ = ("name", "axis", "head_size", "heads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    axis: int
    head_size: int
    heads: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., axis: _Optional[int] = ..., head_size: _Optional[int] = ..., heads: _Optional[_Iterable[int]] = ...) -> None: ...

class ZeroOrderSettings(_message.Message):
    __slots__ = ("eps", "perturbations", "second_perturbations", "second_block", "pool_size", "pool_seed", "seed_weights", "directions")
    EPS_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    SECOND_PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    SECOND_BLOCK_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    POOL_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    eps: float
    perturbations: int
    second_perturbations: int
    second_block: _containers.RepeatedScalarFieldContainer[str]
    pool_size: int
    pool_seed: int
    seed_weights: bytes
    directions: str
    def __init__(self, eps: _Optional[float] = ..., perturbations: _Optional[int] = ..., second_perturbations: _Optional[int] = ..., second_block: _Optional[_Iterable[str]] = ..., pool_size: _Optional[int] = ..., pool_seed: _Optional[int] = ..., seed_weights: _Optional[bytes] = ..., directions: _Optional[str] = ...) -> None: ...

class SeedUpdate(_message.Message):
    __slots__ = ("seeds", "values", "blocks", "steps")
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    def __init__(self, seeds: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., blocks: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ...) -> None: ...

class SeedReplay(_message.Message):
    __slots__ = ("base_version", "rounds", "second_block", "directions")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SECOND_BLOCK_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    base_version: str
    rounds: _containers.RepeatedCompositeFieldContainer[SeedRound]
    second_block: _containers.RepeatedScalarFieldContainer[str]
    directions: str
    def __init__(self, base_version: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[SeedRound, _Mapping]]] = ..., second_block: _Optional[_Iterable[str]] = ..., directions: _Optional[str] = ...) -> None: ...

class SeedRound(_message.Message):
    __slots__ = ("round", "version", "seeds", "values", "blocks", "scale")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    round: int
    version: str
    seeds: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    scale: float
    def __init__(self, round: _Optional[int] = ..., version: _Optional[str] = ..., seeds: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., blocks: _Optional[_Iterable[int]] = ..., scale: _Optional[float] = ...) -> None: ...

class LoraSettings(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules", "dropout")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dropout: float
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., dropout: _Optional[float] = ...) -> None: ...

class TransferSettings(_message.Message):
    __slots__ = ("encoding", "codec", "zstd_level", "block_size", "chunk_elems", "payload", "error_feedback")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ZSTD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ELEMS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    encoding: Encoding
    codec: Codec
    zstd_level: int
    block_size: int
    chunk_elems: int
    payload: Payload
    error_feedback: bool
    def __init__(self, encoding: _Optional[_Union[Encoding, str]] = ..., codec: _Optional[_Union[Codec, str]] = ..., zstd_level: _Optional[int] = ..., block_size: _Optional[int] = ..., chunk_elems: _Optional[int] = ..., payload: _Optional[_Union[Payload, str]] = ..., error_feedback: _Optional[bool] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("device_id", "session_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    session_id: str
    def __init__(self, device_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "task_id", "model_version", "training", "upload", "deadline_unix", "retry_after_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        SHUTDOWN: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    WAIT: Task.Kind
    TRAIN: Task.Kind
    SHUTDOWN: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    task_id: str
    model_version: str
    training: TrainingSettings
    upload: TransferSettings
    deadline_unix: float
    retry_after_ms: int
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., model_version: _Optional[str] = ..., training: _Optional[_Union[TrainingSettings, _Mapping]] = ..., upload: _Optional[_Union[TransferSettings, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("device_id", "session_id", "model_version", "start", "encoding", "codec", "base_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    session_id: str
    model_version: str
    start: Position
    encoding: Encoding
    codec: Codec
    base_version: str
    def __init__(self, device_id: _Optional[str] = ..., session_id: _Optional[str] = ..., model_version: _Optional[str] = ..., start: _Optional[_Union[Position, _Mapping]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., codec: _Optional[_Union[Codec, str]] = ..., base_version: _Optional[str] = ...) -> None: ...

class DownloadMessage(_message.Message):
    __slots__ = ("manifest", "chunk", "replay")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    chunk: Chunk
    replay: SeedReplay
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., replay: _Optional[_Union[SeedReplay, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("device_id", "session_id", "task_id", "round", "base_version", "num_samples", "manifest", "start", "seeds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    session_id: str
    task_id: str
    round: int
    base_version: str
    num_samples: int
    manifest: Manifest
    start: Position
    seeds: SeedUpdate
    def __init__(self, device_id: _Optional[str] = ..., session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[str] = ..., num_samples: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., start: _Optional[_Union[Position, _Mapping]] = ..., seeds: _Optional[_Union[SeedUpdate, _Mapping]] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("complete", "chunks_received", "bytes_received", "next", "digest")
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    complete: bool
    chunks_received: int
    bytes_received: int
    next: Position
    digest: str
    def __init__(self, complete: _Optional[bool] = ..., chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ..., next: _Optional[_Union[Position, _Mapping]] = ..., digest: _Optional[str] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("device_id", "session_id", "task_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    session_id: str
    task_id: str
    def __init__(self, device_id: _Optional[str] = ..., session_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("known", "next", "complete")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    known: bool
    next: Position
    complete: bool
    def __init__(self, known: _Optional[bool] = ..., next: _Optional[_Union[Position, _Mapping]] = ..., complete: _Optional[bool] = ...) -> None: ...

class StepTimes(_message.Message):
    __slots__ = ("batch_loading_s", "forward_s", "loss_s", "backward_s", "optimizer_step_s", "steps")
    BATCH_LOADING_S_FIELD_NUMBER: _ClassVar[int]
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    LOSS_S_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_S_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    batch_loading_s: float
    forward_s: float
    loss_s: float
    backward_s: float
    optimizer_step_s: float
    steps: int
    def __init__(self, batch_loading_s: _Optional[float] = ..., forward_s: _Optional[float] = ..., loss_s: _Optional[float] = ..., backward_s: _Optional[float] = ..., optimizer_step_s: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class RoundMetrics(_message.Message):
    __slots__ = ("device_id", "session_id", "task_id", "round", "t_down_s", "t_up_s", "t_wait_s", "t_comp_s", "bytes_down", "bytes_up", "tokens", "train_loss", "step_times", "num_samples", "download_cached", "extra", "power_source", "hardware")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    T_DOWN_S_FIELD_NUMBER: _ClassVar[int]
    T_UP_S_FIELD_NUMBER: _ClassVar[int]
    T_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    T_COMP_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_CACHED_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    POWER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    session_id: str
    task_id: str
    round: int
    t_down_s: float
    t_up_s: float
    t_wait_s: float
    t_comp_s: float
    bytes_down: int
    bytes_up: int
    tokens: int
    train_loss: float
    step_times: StepTimes
    num_samples: int
    download_cached: bool
    extra: _containers.ScalarMap[str, float]
    power_source: str
    hardware: str
    def __init__(self, device_id: _Optional[str] = ..., session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., t_down_s: _Optional[float] = ..., t_up_s: _Optional[float] = ..., t_wait_s: _Optional[float] = ..., t_comp_s: _Optional[float] = ..., bytes_down: _Optional[int] = ..., bytes_up: _Optional[int] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., step_times: _Optional[_Union[StepTimes, _Mapping]] = ..., num_samples: _Optional[int] = ..., download_cached: _Optional[bool] = ..., extra: _Optional[_Mapping[str, float]] = ..., power_source: _Optional[str] = ..., hardware: _Optional[str] = ...) -> None: ...

class MetricsAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("devices_page_size", "devices_after")
    DEVICES_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_AFTER_FIELD_NUMBER: _ClassVar[int]
    devices_page_size: int
    devices_after: str
    def __init__(self, devices_page_size: _Optional[int] = ..., devices_after: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "alive", "seconds_since_seen", "num_samples", "accelerator", "joined_unix", "down_bytes_per_s", "up_bytes_per_s", "step_s")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    JOINED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DOWN_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    UP_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    alive: bool
    seconds_since_seen: float
    num_samples: int
    accelerator: str
    joined_unix: float
    down_bytes_per_s: float
    up_bytes_per_s: float
    step_s: float
    def __init__(self, device_id: _Optional[str] = ..., alive: _Optional[bool] = ..., seconds_since_seen: _Optional[float] = ..., num_samples: _Optional[int] = ..., accelerator: _Optional[str] = ..., joined_unix: _Optional[float] = ..., down_bytes_per_s: _Optional[float] = ..., up_bytes_per_s: _Optional[float] = ..., step_s: _Optional[float] = ...) -> None: ...

class TransferProgress(_message.Message):
    __slots__ = ("device_id", "direction", "round", "bytes_done", "bytes_total", "rate_bytes_per_s", "seconds", "active")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    direction: str
    round: int
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    seconds: float
    active: bool
    def __init__(self, device_id: _Optional[str] = ..., direction: _Optional[str] = ..., round: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., rate_bytes_per_s: _Optional[float] = ..., seconds: _Optional[float] = ..., active: _Optional[bool] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("device_id", "status", "reported")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    status: str
    reported: bool
    def __init__(self, device_id: _Optional[str] = ..., status: _Optional[str] = ..., reported: _Optional[bool] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "g", "t_comm_s", "t_comp_s", "bytes_down", "bytes_up", "rouge_l", "eval_loss", "participants")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    T_COMM_S_FIELD_NUMBER: _ClassVar[int]
    T_COMP_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    ROUGE_L_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    g: float
    t_comm_s: float
    t_comp_s: float
    bytes_down: int
    bytes_up: int
    rouge_l: float
    eval_loss: float
    participants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., g: _Optional[float] = ..., t_comm_s: _Optional[float] = ..., t_comp_s: _Optional[float] = ..., bytes_down: _Optional[int] = ..., bytes_up: _Optional[int] = ..., rouge_l: _Optional[float] = ..., eval_loss: _Optional[float] = ..., participants: _Optional[_Iterable[str]] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("phase", "round", "round_open", "rounds_total", "rounds_completed", "participants", "devices_connected", "devices_known", "deadline_unix", "model_version", "transfers", "last_round", "bytes_down_total", "bytes_up_total", "server_version", "devices", "devices_next_after")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_OPEN_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    DEVICES_KNOWN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    phase: str
    round: int
    round_open: bool
    rounds_total: int
    rounds_completed: int
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    devices_connected: int
    devices_known: int
    deadline_unix: float
    model_version: str
    transfers: _containers.RepeatedCompositeFieldContainer[TransferProgress]
    last_round: RoundSummary
    bytes_down_total: int
    bytes_up_total: int
    server_version: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    devices_next_after: str
    def __init__(self, phase: _Optional[str] = ..., round: _Optional[int] = ..., round_open: _Optional[bool] = ..., rounds_total: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., devices_connected: _Optional[int] = ..., devices_known: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., model_version: _Optional[str] = ..., transfers: _Optional[_Iterable[_Union[TransferProgress, _Mapping]]] = ..., last_round: _Optional[_Union[RoundSummary, _Mapping]] = ..., bytes_down_total: _Optional[int] = ..., bytes_up_total: _Optional[int] = ..., server_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., devices_next_after: _Optional[str] = ...) -> None: ...
