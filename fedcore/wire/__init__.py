"""The wire codec: tensors -> verified, optionally quantized and compressed chunks -> tensors.

No gRPC and no torch.nn here: the services call these pure functions.
"""
from .delta import ErrorFeedback, apply_delta, as_received, subtract
from .formats import CODECS, ENCODINGS, WireError, codec_id, codec_name, encoding_id, encoding_name
from .manifest import check_manifest, clone_tied, digest, layout_of, state_digest, tensor_wire_bytes, unique_tensors
from .stream import (DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_ELEMS, FrozenStream, StateEncoder, StateReceiver,
                     TransferSpec, encode_state)

__all__ = [
    "ErrorFeedback", "apply_delta", "as_received", "subtract",
    "CODECS", "ENCODINGS", "WireError", "codec_id", "codec_name", "encoding_id", "encoding_name",
    "check_manifest", "clone_tied", "digest", "layout_of", "state_digest", "tensor_wire_bytes", "unique_tensors",
    "DEFAULT_BLOCK_SIZE", "DEFAULT_CHUNK_ELEMS", "FrozenStream", "StateEncoder", "StateReceiver", "TransferSpec",
    "encode_state",
]
