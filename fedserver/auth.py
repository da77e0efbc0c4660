"""Who is calling: every RPC passes the Gatekeeper interceptor (grpc.aio) before its handler runs.

The gatekeeper, in one place for every method (new RPCs included):

- finds the caller's identity: the device id in its client certificate's
  ``fedtune://device/<id>`` SAN (mutual TLS), or the device an enrollment
  token maps to (TLS without client certificates), or nobody (plaintext,
  only when the server was started with ``insecure``);
- refuses revoked devices (by id or certificate serial), unknown tokens and
  certificates that name no device (UNAUTHENTICATED / PERMISSION_DENIED);
- limits each identity's request rate and concurrent streams
  (RESOURCE_EXHAUSTED);
- parses the request itself, so a malformed protobuf is INVALID_ARGUMENT
  rather than gRPC's generic INTERNAL;
- checks that a request speaking for a device (a ``device_id`` field, also
  inside an upload's header) speaks for the caller's own device.

Handlers may therefore trust ``request.device_id``.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError, Message

from .certs import ADMIN_URI, DEVICE_URI, serial_hex
from .config import ServerConfig

log = logging.getLogger("fedserver.auth")

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_IDENTITIES = 100_000  # rate buckets kept; the oldest go first


@dataclass(frozen=True)
class Identity:
    kind: str          # "device", "admin" or "anonymous" (plaintext server)
    name: str
    serial: str = ""   # certificate serial (hex), when a certificate said who this is


@dataclass(frozen=True)
class GateLimits:
    rate_limit_rps: float = 50.0
    rate_limit_burst: int = 200
    max_streams_per_device: int = 4


def load_tokens(path: Path) -> dict[str, str]:
    """`device_id token` lines -> {sha256(token): device_id}; '#' starts a comment."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not DEVICE_ID.match(parts[0]) or len(parts[1]) < 16:
            raise ValueError(f"{path}:{n}: expected 'device_id token' with a token of 16+ characters")
        out[_token_key(parts[1])] = parts[0]
    return out


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RevokedList:
    """Device ids and certificate serials (hex) from a file, re-read when it changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime = -1.0
        self.entries: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._refresh()

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = 0.0
        if mtime == self._mtime:
            return
        with self._lock:
            text = self.path.read_text() if mtime else ""
            self.entries = frozenset(w.lower().removeprefix("0x") if _is_hex(w) else w
                                     for w in (ln.split("#", 1)[0].strip() for ln in text.splitlines()) if w)
            self._mtime = mtime
            log.info("revocation list %s: %d entries", self.path, len(self.entries))

    def revoked(self, ident: Identity) -> bool:
        self._refresh()
        return ident.name in self.entries or (bool(ident.serial) and ident.serial in self.entries)


def _is_hex(word: str) -> bool:
    return bool(re.fullmatch(r"(0x)?[0-9a-fA-F]{16,}", word))


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, burst: float) -> None:
        self.tokens, self.at = burst, time.monotonic()


def claimed_device(msg: Message) -> str | None:
    """The device a request speaks for: its `device_id`, or that of a set sub-message (an upload header)."""
    fields = msg.DESCRIPTOR.fields_by_name
    if "device_id" in fields:
        return getattr(msg, "device_id")
    for f in msg.DESCRIPTOR.fields:
        if f.message_type is not None and not f.is_repeated and msg.HasField(f.name) \
                and "device_id" in f.message_type.fields_by_name:
            return getattr(msg, f.name).device_id
    return None


class Gatekeeper(grpc.aio.ServerInterceptor):
    """Identity, revocation, rate and stream limits, and request parsing for every RPC."""

    def __init__(self, mode: str, limits: GateLimits, revoked: RevokedList | None = None,
                 tokens: dict[str, str] | None = None) -> None:
        if mode not in ("mtls", "token", "insecure"):
            raise ValueError(f"unknown gate mode {mode!r}")
        self.mode = mode
        self.limits = limits
        self.revoked = revoked or RevokedList(None)
        self.tokens = tokens or {}
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}
        self._cert_cache: dict[bytes, tuple[str, str]] = {}
        self.refused: dict[str, int] = {}  # reason -> count, for the log and tests
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # method -> its handler behind the checks

    # ------------------------------------------------------------ identity
    def identify(self, context: grpc.aio.ServicerContext) -> Identity:
        if self.mode == "insecure":
            return Identity("anonymous", context.peer())
        if self.mode == "token":
            token = ""
            for k, v in context.invocation_metadata() or ():
                if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
                    token = v[7:]
            dev = self.tokens.get(_token_key(token)) if token else None
            if dev is None:
                self._refuse(grpc.StatusCode.UNAUTHENTICATED, "token",
                             "no valid enrollment token: set enrollment_token in this device's config to its line "
                             "in the server's enrollment_tokens file (fedserver certs writes tokens.txt)")
            return Identity("device", dev)  # type: ignore[arg-type]
        ac = context.auth_context()
        pem = (ac.get("x509_pem_cert") or [b""])[0]
        if not pem:
            # The handshake requires a certificate, so this means the server is misconfigured.
            self._refuse(grpc.StatusCode.UNAUTHENTICATED, "no_cert",
                         "no client certificate on this connection: configure tls_cert and tls_key")
        kind, name, serial = self._from_cert(pem)
        if not kind:
            self._refuse(grpc.StatusCode.UNAUTHENTICATED, "cert_names_nobody",
                         f"the client certificate (serial {serial}) has no {DEVICE_URI}<id> or {ADMIN_URI}<name> "
                         f"SAN: issue device certificates with `fedserver certs`")
        return Identity(kind, name, serial)

    def _from_cert(self, pem: bytes) -> tuple[str, str, str]:
        hit = self._cert_cache.get(pem)
        if hit is None:
            cert = x509.load_pem_x509_certificate(pem)
            kind = name = ""
            try:
                uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                    .get_values_for_type(x509.UniformResourceIdentifier)
            except x509.ExtensionNotFound:
                uris = []
            for uri in uris:
                for k, prefix in (("device", DEVICE_URI), ("admin", ADMIN_URI)):
                    if uri.startswith(prefix) and DEVICE_ID.match(uri[len(prefix):]):
                        kind, name = k, uri[len(prefix):]
            hit = (kind, name, serial_hex(cert))
            with self._lock:
                if len(self._cert_cache) > 10_000:
                    self._cert_cache.clear()
                self._cert_cache[pem] = hit
        return hit[0], hit[1], hit[2]

    def admit(self, context: grpc.aio.ServicerContext) -> Identity:
        ident = self.identify(context)
        if ident.kind != "anonymous" and self.revoked.revoked(ident):
            self._refuse(grpc.StatusCode.PERMISSION_DENIED, "revoked",
                         f"{ident.kind} {ident.name!r} (certificate serial {ident.serial or '-'}) is revoked "
                         f"on this server; ask the operator for a new certificate")
        self._take_token(ident)
        return ident

    def _take_token(self, ident: Identity) -> None:
        lim = self.limits
        if lim.rate_limit_rps <= 0:
            return
        with self._lock:
            b = self._buckets.get(ident.name)
            if b is None:
                if len(self._buckets) >= MAX_IDENTITIES:
                    self._buckets.pop(next(iter(self._buckets)))
                b = self._buckets[ident.name] = _Bucket(lim.rate_limit_burst)
            now = time.monotonic()
            b.tokens = min(float(lim.rate_limit_burst), b.tokens + (now - b.at) * lim.rate_limit_rps)
            b.at = now
            ok = b.tokens >= 1.0
            if ok:
                b.tokens -= 1.0
        if not ok:
            self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate",
                         f"{ident.name!r} exceeded {lim.rate_limit_rps:g} requests/s (burst "
                         f"{lim.rate_limit_burst}); back off and retry")

    def open_stream(self, ident: Identity) -> None:
        """Count a stream against the caller's cap (Refused when full); close_stream gives it back."""
        cap = self.limits.max_streams_per_device
        with self._lock:
            n = self._streams.get(ident.name, 0)
            full = cap > 0 and n >= cap
            if not full:
                self._streams[ident.name] = n + 1
        if full:
            self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, "streams",
                         f"{ident.name!r} already has {cap} streams open; finish one first")

    def close_stream(self, ident: Identity) -> None:
        with self._lock:
            left = self._streams.get(ident.name, 1) - 1
            if left:
                self._streams[ident.name] = left
            else:
                self._streams.pop(ident.name, None)

    def check_claim(self, ident: Identity, msg: Message) -> None:
        if ident.kind == "anonymous":
            return
        claim = claimed_device(msg)
        if claim is None:
            return
        if ident.kind != "device":
            self._refuse(grpc.StatusCode.PERMISSION_DENIED, "admin_as_device",
                         f"{ident.kind} {ident.name!r} may not act for device {claim[:40]!r}")
        if claim != ident.name:
            self._refuse(grpc.StatusCode.PERMISSION_DENIED, "impersonation",
                         f"device_id {claim[:40]!r} in the request is not this caller: its "
                         f"{'certificate' if self.mode == 'mtls' else 'enrollment token'} says {ident.name!r}")

    def _refuse(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        raise Refused(code, message)

    # ----------------------------------------------------------- wrapping
    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        # A method's handler never changes: wrapped once, not at every call (a fleet polls a thousand times a
        # second).
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[details.method] = self._wrap(handler)
        return wrapped

    def _parse(self, deser: Callable[[bytes], Any] | None, raw: Any) -> Any:
        if deser is None:
            return raw
        try:
            return deser(raw)
        except (DecodeError, ValueError, TypeError) as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}"[:300]) from None

    def _admitted(self, deser: Callable[[bytes], Any] | None, raw: Any,
                  context: grpc.aio.ServicerContext) -> tuple[Identity, Any]:
        ident = self.admit(context)
        req = self._parse(deser, raw)
        self.check_claim(ident, req)
        return ident, req

    def _wrap(self, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same handler behind the checks; every behaviour must be a coroutine or an async generator."""
        deser, ser = h.request_deserializer, h.response_serializer
        if h.unary_unary is not None:
            inner_uu = h.unary_unary

            async def unary_unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    _, req = self._admitted(deser, raw, context)
                except Refused as r:
                    await context.abort(r.code, r.message)
                return await inner_uu(req, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, ser)
        if h.unary_stream is not None:
            inner_us = h.unary_stream

            async def opened(raw: Any, context: grpc.aio.ServicerContext) -> tuple[Identity, Any]:
                try:
                    ident, req = self._admitted(deser, raw, context)
                    self.open_stream(ident)
                except Refused as r:
                    await context.abort(r.code, r.message)
                return ident, req

            async def unary_stream(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                ident, req = await opened(raw, context)
                try:
                    # Closed here, not by the garbage collector: its finally blocks run when the call ends.
                    async with contextlib.aclosing(inner_us(req, context)) as messages:
                        async for msg in messages:
                            yield msg
                finally:
                    self.close_stream(ident)

            async def unary_stream_writer(raw: Any, context: grpc.aio.ServicerContext) -> None:
                # A handler that writes with context.write (the health service's Watch) rather than yielding.
                ident, req = await opened(raw, context)
                try:
                    await inner_us(req, context)
                finally:
                    self.close_stream(ident)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer if inspect.iscoroutinefunction(inner_us) else unary_stream, None, ser)

        async def checked(ident: Identity, raw_iter: AsyncIterator[Any],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            first = True
            async for raw in raw_iter:
                try:
                    msg = self._parse(deser, raw)
                    if first:
                        self.check_claim(ident, msg)
                        first = False
                except Refused as r:
                    await context.abort(r.code, r.message)
                yield msg

        if h.stream_unary is not None:
            inner_su = h.stream_unary

            async def stream_unary(raw_iter: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    ident = self.admit(context)
                    self.open_stream(ident)
                except Refused as r:
                    await context.abort(r.code, r.message)
                try:
                    return await inner_su(checked(ident, raw_iter, context), context)
                finally:
                    self.close_stream(ident)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, ser)
        raise TypeError("the gatekeeper has no rule for stream-stream methods; add one before serving one")


class Refused(Exception):
    """A call the gatekeeper turns away; the wrapper aborts it with this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config; client certificates are required when tls_ca is set. None: plaintext."""
    if cfg.insecure:
        return None
    cfg.validate_security()
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    ca = cfg.tls_ca.read_bytes() if cfg.tls_ca is not None else None
    return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def gatekeeper_for(cfg: ServerConfig) -> Gatekeeper:
    mode = "insecure" if cfg.insecure else ("mtls" if cfg.tls_ca is not None else "token")
    tokens = load_tokens(cfg.enrollment_tokens) if mode == "token" and cfg.enrollment_tokens else None
    limits = GateLimits(cfg.rate_limit_rps, cfg.rate_limit_burst, cfg.max_streams_per_device)
    return Gatekeeper(mode, limits, RevokedList(cfg.revoked), tokens)
