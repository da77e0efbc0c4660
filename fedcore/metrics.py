"""A tiny Prometheus registry and `/metrics` endpoint (text exposition format 0.0.4).

Metric values are read at scrape time: each :class:`Registry` holds metric
families and collectors (callables that set the families from the live
state), so the exporter never runs ahead of or behind the process it
describes. A sample that has no value (a figure the device does not measure)
is left out, never written as 0.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("fedcore.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KINDS = ("counter", "gauge")

Labels = tuple[tuple[str, str], ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


@dataclass
class Family:
    """One metric name: its kind, help text and labelled samples."""

    name: str
    kind: str
    help: str
    samples: dict[Labels, float] = field(default_factory=dict)

    def set(self, value: float | int | None, **labels: str) -> None:
        """Set a sample; None removes it (no value is not the same as 0)."""
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        if value is None:
            self.samples.pop(key, None)
            return
        self.samples[key] = float(value)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in sorted(self.samples.items()):
            lab = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{self.name}{{{lab}}} {format_value(value)}" if lab else
                         f"{self.name} {format_value(value)}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._collectors: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def family(self, name: str, kind: str, help: str) -> Family:
        if kind not in KINDS:
            raise ValueError(f"metric kind {kind!r}: use one of {KINDS}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = Family(name, kind, help)
        elif fam.kind != kind:
            raise ValueError(f"metric {name} is already a {fam.kind}")
        return fam

    def counter(self, name: str, help: str) -> Family:
        return self.family(name, "counter", help)

    def gauge(self, name: str, help: str) -> Family:
        return self.family(name, "gauge", help)

    def collector(self, fn: Callable[[], None]) -> None:
        """Run fn before every scrape to refresh the families it sets."""
        self._collectors.append(fn)

    def render(self) -> str:
        with self._lock:
            for fn in self._collectors:
                try:
                    fn()
                except Exception:  # one broken collector must not blank the whole page
                    log.exception("metrics collector %s failed", getattr(fn, "__name__", fn))
            return "\n".join(line for fam in self._families.values() for line in fam.render()) + "\n"


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics_listen must be host:port (e.g. 127.0.0.1:9464), got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """`GET /metrics` on a daemon thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, registry: Registry, listen: str) -> None:
        host, port = split_listen(listen)
        reg = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = reg.render().encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes every 15 s are not news
                log.debug("metrics %s: " + format, self.client_address[0], *args)

        if ":" in host:
            import socket

            class Server6(ThreadingHTTPServer):
                address_family = socket.AF_INET6
            self.httpd: ThreadingHTTPServer = Server6((host, port), Handler)
        else:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(registry: Registry, listen: str) -> MetricsServer | None:
    """Start the endpoint when `listen` is set (empty: metrics off)."""
    return MetricsServer(registry, listen) if listen else None


def set_optional(fam: Family, records: Iterable[tuple[dict[str, str], float | int | None]]) -> None:
    """Replace fam's samples with those records whose value is present."""
    fam.samples.clear()
    for labels, value in records:
        if value is not None and not isinstance(value, bool):
            fam.set(value, **labels)


# Figures a device may measure per round (throughput, and power/efficiency
# where the hardware reports them): round-record key (fedcore.records.DeviceRound;
# device_figure reads one) -> (metric suffix, help).
DEVICE_FIGURES: dict[str, tuple[str, str]] = {
    "tokens_per_s": ("tokens_per_second", "training tokens per second in the last round"),
    "mfu": ("mfu", "model FLOPs utilisation in the last round (0..1)"),
    "power_w": ("power_watts", "mean device power while training in the last round"),
    "energy_j": ("energy_joules", "device energy spent training in the last round"),
    "eta_e": ("eta_e", "energy efficiency eta_e of the last round"),
}
