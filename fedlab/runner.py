"""Federated runs behind emulated links: `netem run SCENARIO` and `fedserver simulate --link`.

The server runs in the topology's server namespace and every daemon in its
own device namespace, so each model transfer crosses that device's shaped
link, and T_comm is what the protocol measured on it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.config import ConfigError, from_mapping, load_toml
from . import simulate
from .simulate import Launcher, SimulateConfig

from netem.profiles import LinkProfile, parse_profile
from netem.topology import Topology, require_namespaces

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SERVER_PORT = 50051


def link_profiles(link: str | Sequence[str], devices: int) -> list[LinkProfile]:
    """One profile per device from 'lte', 'lte,5g,...' or a list; a single one serves all."""
    names = _split_links(link) if isinstance(link, str) else [s.strip() for s in link if s.strip()]
    if not names:
        raise ValueError("no link profile given")
    profiles = [parse_profile(n) for n in names]
    if len(profiles) == 1:
        return profiles * devices
    if len(profiles) != devices:
        raise ValueError(f"{len(profiles)} link profiles for {devices} devices: give one, or one per device")
    return profiles


def _split_links(text: str) -> list[str]:
    """'lte,custom:down=20,up=10' -> ['lte', 'custom:down=20,up=10']: key=value parts stay with their custom."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and out and out[-1].startswith("custom:"):
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def simulate_with_links(cfg: SimulateConfig) -> int:
    """`fedserver simulate` with every device behind its link profile; needs root."""
    assert cfg.link
    profiles = link_profiles(cfg.link, cfg.devices)
    require_namespaces()
    with Topology(profiles) as topo:
        links = {
            "backend": topo.backend,
            "warnings": topo.warnings,
            "tcp_settings": topo.tcp_settings(),
            "devices": [{"device": f"dev-{d.index:02d}", "ip": d.ip, "profile": d.profile.name,
                         "down_mbit": d.profile.down_mbit, "up_mbit": d.profile.up_mbit,
                         "delay_ms": d.profile.delay_ms, "jitter_ms": d.profile.jitter_ms,
                         "loss_pct": d.profile.loss_pct} for d in topo.devices],
        }
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "links.json").write_text(json.dumps(links, indent=2) + "\n")
        print(f"netem: {len(topo.devices)} devices behind {', '.join(sorted({p.name for p in profiles}))} "
              f"({topo.backend} backend); TCP: " +
              ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(topo.tcp_settings().items())), flush=True)
        launcher = Launcher(
            server_host=topo.server_ip, listen_host="0.0.0.0", port=SERVER_PORT,
            wrap_server=lambda argv: topo.exec_argv(topo.server_ns, argv),
            wrap_device=lambda i, argv: topo.exec_argv(topo.devices[i].ns, argv))
        return simulate.run(cfg, launcher)


def scenario_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    candidate = SCENARIOS / f"{name}.toml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(s.stem for s in SCENARIOS.glob("*.toml")))
    raise ConfigError(f"no scenario {name!r}; ready scenarios: {known} (or give a .toml path)")


def load_scenario(name: str, overrides: dict[str, Any] | None = None) -> SimulateConfig:
    data = load_toml(scenario_path(name))
    data.pop("description", None)
    links = data.pop("links", None)
    if links is not None:
        data["link"] = links if isinstance(links, str) else ",".join(links)
    data.setdefault("out", f"runs/{Path(name).stem}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(SimulateConfig, data, source=str(scenario_path(name)))


def describe(name: str) -> str:
    return str(load_toml(scenario_path(name)).get("description", ""))


def run_scenario(name: str, overrides: dict[str, Any] | None = None) -> int:
    cfg = load_scenario(name, overrides)
    print(f"netem run {name}: {describe(name)}", flush=True)
    if not cfg.link:
        return simulate.run(cfg)
    return simulate_with_links(cfg)


__all__ = ["link_profiles", "simulate_with_links", "load_scenario", "run_scenario"]
