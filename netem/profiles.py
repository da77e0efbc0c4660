"""Link profiles: the rates, delay, jitter and loss of one emulated link.

Conventions, used everywhere in :mod:`netem`:

* ``down_mbit`` / ``up_mbit`` are TCP *goodput* in Mbit/s (10**6 bit/s), the
  figure a speed test reports. The shaper adds the header overhead on top
  (see :mod:`netem.tc`), so a raw TCP transfer measures the profile's number.
* ``delay_ms`` is the ONE-WAY delay added to *each* direction, so the round
  trip time over the link is ``2 * delay_ms``. ``jitter_ms`` is the one-way
  per-packet delay variation (netem's second delay argument), ``loss_pct``
  the random loss per direction in percent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LinkProfile", "PROFILES", "parse_profile", "profile_names"]


@dataclass(frozen=True)
class LinkProfile:
    """One direction-aware link: down = server->device, up = device->server.

    ``delay_ms`` is the one-way delay applied per direction (RTT = 2 x delay).
    """

    name: str
    down_mbit: float
    up_mbit: float
    delay_ms: float = 0
    jitter_ms: float = 0
    loss_pct: float = 0
    source: str = ""

    def __post_init__(self) -> None:
        for field_name in ("down_mbit", "up_mbit"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"profile {self.name!r}: {field_name} must be a positive number, got {value!r}")
        for field_name in ("delay_ms", "jitter_ms", "loss_pct"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"profile {self.name!r}: {field_name} must be >= 0, got {value!r}")
        if self.loss_pct > 100:
            raise ValueError(f"profile {self.name!r}: loss_pct must be <= 100, got {self.loss_pct!r}")

    @property
    def rtt_ms(self) -> float:
        """Round trip time the profile adds (both one-way delays)."""
        return 2 * self.delay_ms

    @property
    def has_impairments(self) -> bool:
        """True when the profile needs more than rate limiting (netem)."""
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.loss_pct > 0

    def describe(self) -> str:
        """One-line human summary."""
        parts = [f"{_fmt(self.down_mbit)}/{_fmt(self.up_mbit)} Mbit/s down/up"]
        if self.delay_ms:
            parts.append(f"delay {_fmt(self.delay_ms)} ms one-way (RTT {_fmt(self.rtt_ms)} ms)")
        if self.jitter_ms:
            parts.append(f"jitter {_fmt(self.jitter_ms)} ms")
        if self.loss_pct:
            parts.append(f"loss {_fmt(self.loss_pct)}%")
        return ", ".join(parts)


def _fmt(value: float) -> str:
    return f"{value:g}"


# ERRANT (Trevisan et al., "ERRANT: Realistic emulation of radio access
# networks", Computer Networks 2020; github.com/marty90/errant profiles.csv)
# reports per-profile speed-test means. Its latency_ms_avg is a ping RTT,
# which ERRANT applies as one netem delay on egress; we split it in halves,
# one per direction. Its latency stdev (~40-60 ms) is the spread *between*
# speed tests, not packet-to-packet variation; netem jitter of that size
# would reorder most packets, so per-packet jitter below is a small value of
# our own choosing and says so.
PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile(
            name="lte",
            down_mbit=40,
            up_mbit=15,
            delay_ms=45,
            jitter_ms=5,
            source=(
                "rates: Woisetschlaeger et al. 2023, 'Federated Fine-Tuning of LLMs on the Very Edge' "
                "(LTE 40/15 Mbit/s); RTT ~90 ms: ERRANT 4G profiles (latency_ms_avg 83-113 ms, mean ~95); "
                "jitter 5 ms one-way: our choice (ERRANT gives no per-packet jitter)"
            ),
        ),
        LinkProfile(
            name="10g",
            down_mbit=10000,
            up_mbit=10000,
            source="wired 10 Gbit/s Ethernet, the datacenter baseline next to LTE in the table1 scenarios; no added delay",
        ),
        LinkProfile(
            name="5g",
            down_mbit=166,
            up_mbit=21,
            delay_ms=25,
            jitter_ms=3,
            source=(
                "rates: Ookla Speedtest Intelligence Q3 2021 global 5G medians (166.13/21.08 Mbit/s, "
                "'Growing and Slowing: The State of 5G Worldwide in 2021'); RTT ~50 ms: Ookla Q2 2023 US "
                "5G median multi-server latency (51 ms, best operator); jitter 3 ms: our choice"
            ),
        ),
        LinkProfile(
            name="3g",
            down_mbit=9.4,
            up_mbit=1.9,
            delay_ms=55,
            jitter_ms=10,
            source=(
                "ERRANT profiles.csv, mean of the five 3G 'medium' profiles: 9.44/1.90 Mbit/s, "
                "RTT ~109 ms; jitter 10 ms one-way: our choice"
            ),
        ),
        LinkProfile(
            name="wifi",
            down_mbit=84,
            up_mbit=38,
            delay_ms=7.5,
            jitter_ms=2,
            source=(
                "home Wi-Fi on fixed broadband: Ookla Q3 2023 global fixed-broadband medians "
                "(83.95/38.32 Mbit/s, 'The State of Worldwide Connectivity in 2023'); RTT ~15 ms: "
                "Ookla Q2 2023 US fixed median multi-server latency (15 ms, best provider); jitter 2 ms: our choice"
            ),
        ),
    )
}

_CUSTOM_KEYS = {
    "down": "down_mbit",
    "up": "up_mbit",
    "delay": "delay_ms",
    "jitter": "jitter_ms",
    "loss": "loss_pct",
}


def profile_names() -> list[str]:
    """Names of the built-in profiles."""
    return list(PROFILES)


def parse_profile(text: str) -> LinkProfile:
    """A built-in profile by name, or ``custom:down=40,up=15,delay=45,jitter=5,loss=0.1``.

    ``down`` and ``up`` (Mbit/s goodput) are required for custom profiles;
    ``delay`` (one-way ms per direction), ``jitter`` (ms) and ``loss`` (%)
    default to 0. Raises ValueError with the accepted forms otherwise.
    """
    if not isinstance(text, str):
        raise ValueError(f"profile must be a string, got {type(text).__name__}")
    spec = text.strip()
    known = ", ".join(PROFILES)
    usage = f"known profiles: {known}; or custom:down=MBIT,up=MBIT[,delay=MS,jitter=MS,loss=PCT]"
    if spec.lower() in PROFILES:
        return PROFILES[spec.lower()]
    if not spec.lower().startswith("custom:"):
        raise ValueError(f"unknown link profile {text!r} ({usage})")
    values: dict[str, float] = {}
    body = spec.split(":", 1)[1]
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _CUSTOM_KEYS:
            raise ValueError(f"bad custom profile item {item!r} in {text!r} (keys: {', '.join(_CUSTOM_KEYS)}; {usage})")
        if _CUSTOM_KEYS[key] in values:
            raise ValueError(f"custom profile {text!r} sets {key!r} twice")
        try:
            number = float(raw.strip())
        except ValueError:
            raise ValueError(f"custom profile {text!r}: {key}={raw.strip()!r} is not a number") from None
        values[_CUSTOM_KEYS[key]] = number
    missing = [k for k in ("down", "up") if _CUSTOM_KEYS[k] not in values]
    if missing:
        raise ValueError(f"custom profile {text!r} is missing {' and '.join(missing)} ({usage})")
    return LinkProfile(name=spec, source="custom", **values)
