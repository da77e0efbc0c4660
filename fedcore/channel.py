"""gRPC channels to the server: the one place a client side (daemon, benches, tests, admin tools) dials from.

Both ends must agree on message size limits and keepalives; every channel is
TLS (with a client certificate for mutual TLS, or an enrollment token in
TLS-only setups) unless plaintext is asked for explicitly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("fedcore.channel")

# A chunk of 2^24 fp32 elements plus framing; anything larger is refused by gRPC itself.
MAX_MESSAGE_BYTES = 80 << 20

KEEPALIVE_MS = 20_000

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Devices sit behind carrier NATs that forget idle flows after 30-120 s
    # (some after 30 s of silence): a ping every 20 s keeps the mapping alive,
    # also between rounds when no call is open, and a dead path is noticed
    # 10 s after an unanswered ping instead of at the next TCP timeout.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Server policy: accept those pings (anything faster than every 10 s
    # without data would be answered with GOAWAY "too_many_pings").
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_pings_without_data", 0),
    # After a link drop, reconnect within seconds of the link's return,
    # not after gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# How long a device waits for its Join. A restarted server takes every device's Join at once (a fleet of
# 10,000 takes about a minute on 2 cores): waiting for the answer costs everyone less than timing out and
# asking again, which adds to the queue.
JOIN_TIMEOUT_S = 120.0

# The metadata key an enrollment token travels in (gRPC's standard bearer form).
TOKEN_METADATA = "authorization"
# An ABORTED upload whose details contain this must be sent again from its first chunk: the server
# says it, the device acts on it (the protocol has no structured reason field).
UPLOAD_RESTART_HINT = "start from the beginning"


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves who it is and checks the server: paths to PEM files."""
    tls_ca: Path | None = None      # CA that signed the server certificate (None: the system roots)
    tls_cert: Path | None = None    # this client's certificate, for mutual TLS
    tls_key: Path | None = None
    enrollment_token: str = ""      # TLS-only servers map it to a device id
    tls_server_name: str = ""       # check the server certificate for this name instead of the dialed host
    insecure: bool = False          # plaintext: only when asked for

    def validate(self) -> None:
        if self.insecure:
            return
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"{name} {p} does not exist")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return Path(p).read_bytes() if p is not None else None

        creds = grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca), private_key=read(self.tls_key),
                                             certificate_chain=read(self.tls_cert))
        if self.enrollment_token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(
                self.enrollment_token))
        return creds


def open_channel(target: str, security: ClientSecurity, options: list[tuple[str, object]] | None = None
                 ) -> grpc.Channel:
    """A channel to target: TLS (mutual when a client certificate is given), plaintext only if insecure."""
    opts = list(CHANNEL_OPTIONS if options is None else options)
    if security.insecure:
        return grpc.insecure_channel(target, options=opts)
    security.validate()
    if security.tls_server_name:
        opts.append(("grpc.ssl_target_name_override", security.tls_server_name))
    return grpc.secure_channel(target, security.credentials(), options=opts)
