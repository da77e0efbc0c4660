"""gRPC channel options both ends must agree on: message size limits and keepalives."""
from __future__ import annotations

# A chunk of 2^24 fp32 elements plus framing; anything larger is refused by gRPC itself.
MAX_MESSAGE_BYTES = 80 << 20

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Devices sit behind carrier NATs that drop idle flows after a few minutes.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
