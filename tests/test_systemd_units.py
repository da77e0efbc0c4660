"""The unit files under systemd/ pass `systemd-analyze verify`, and the hardening they claim holds."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
INSTALL_BIN = "/opt/fedtune/bin"
# Templates are verified as an instance, as systemd would load them.
INSTANCES = {"fedserver.service": "fedserver.service", "fedclient@.service": "fedclient@orin-07.service",
             "netem-link@.service": "netem-link@eth1.service"}


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key, []).append(value)
    return out


def test_every_unit_is_listed_and_installable():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(INSTANCES)
    for name in INSTANCES:
        unit = _unit(name)
        assert set(unit) == {"Unit", "Service", "Install"}, name
        assert unit["Install"]["WantedBy"] == ["multi-user.target"], name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd); .ci/run installs it")
def test_systemd_analyze_verify_is_clean(tmp_path):
    # verify checks that ExecStart's program exists: point the install path at stand-ins.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for cmd in ("fedserver", "fedclient", "netem"):
        (bin_dir / cmd).write_text("#!/bin/sh\n")
        (bin_dir / cmd).chmod(0o755)
    for name, instance in INSTANCES.items():
        text = (UNITS / name).read_text()
        assert INSTALL_BIN in text, f"{name} no longer runs from {INSTALL_BIN}: update docs/how-to/systemd.md and this test"
        (tmp_path / name).write_text(text.replace(INSTALL_BIN, str(bin_dir)))
    r = subprocess.run(["systemd-analyze", "verify", *INSTANCES.values()], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_exec_start_runs_the_installed_console_scripts():
    sys.path.insert(0, str(ROOT))
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, cmd in (("fedserver.service", "fedserver"), ("fedclient@.service", "fedclient"),
                      ("netem-link@.service", "netem")):
        starts = _unit(name)["Service"]["ExecStart"]
        assert cmd in scripts and all(s.startswith(f"{INSTALL_BIN}/{cmd} ") for s in starts), starts


@pytest.mark.parametrize("name", ["fedserver.service", "fedclient@.service"])
def test_long_running_units_notify_with_a_watchdog_and_drop_every_capability(name):
    svc = _unit(name)["Service"]
    assert svc["Type"] == ["notify"] and int(svc["WatchdogSec"][0]) > 0
    assert svc["CapabilityBoundingSet"] == [""] and svc["NoNewPrivileges"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"] and svc["ProtectHome"] == ["yes"]
    assert svc["User"] == ["fedtune"] and "SystemCallFilter" in svc and "StateDirectory" in svc
    assert "CacheDirectory" in svc and any(e.startswith("-/etc/fedtune/") for e in svc["EnvironmentFile"])
    assert set(svc["RestrictAddressFamilies"][0].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_netem_unit_keeps_only_net_admin_and_clears_on_stop():
    svc = _unit("netem-link@.service")["Service"]
    assert svc["Type"] == ["oneshot"] and svc["RemainAfterExit"] == ["yes"]
    assert svc["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert svc["ExecStop"] == [f"{INSTALL_BIN}/netem clear %i"]
    # 'auto' probes sch_netem in a new network namespace, which RestrictNamespaces forbids.
    assert "--backend ${NETEM_BACKEND}" in svc["ExecStart"][0] and svc["RestrictNamespaces"] == ["yes"]


def _setpriv_in_netns_reason() -> str:
    from test_netem_topology import _namespaces_usable

    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return _namespaces_usable()


@pytest.mark.root
def test_netem_apply_and_clear_need_nothing_but_cap_net_admin():
    """What netem-link@.service keeps (CAP_NET_ADMIN, no new privileges) is enough, and needed."""
    reason = _setpriv_in_netns_reason()
    if reason:
        pytest.skip(reason)
    ns = f"fdt-{os.getpid()}-caps"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                       check=True)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "v0", "up"], check=True)

        def netem(caps: str, *args: str) -> subprocess.CompletedProcess:
            drop = ["setpriv", f"--bounding-set=-all{caps}", f"--inh-caps=-all{caps}", f"--ambient-caps=-all{caps}",
                    "--no-new-privs"]
            return subprocess.run(["ip", "netns", "exec", ns, *drop, sys.executable, "-m", "netem", *args],
                                  capture_output=True, text=True, timeout=120)

        bare = netem("", "apply", "v0", "--profile", "lte", "--backend", "htb")
        assert bare.returncode != 0 and "Operation not permitted" in bare.stderr, bare.stderr
        applied = netem(",+net_admin", "apply", "v0", "--profile", "lte", "--backend", "htb")
        assert applied.returncode == 0, applied.stderr
        shown = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "v0"], capture_output=True,
                               text=True).stdout
        assert "htb" in shown and "ingress" in shown, shown
        cleared = netem(",+net_admin", "clear", "v0")
        assert cleared.returncode == 0, cleared.stderr
        shown = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "v0"], capture_output=True,
                               text=True).stdout
        assert "htb" not in shown and "ingress" not in shown, shown
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE: Linux 6.3+


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or not _mdwe_supported(),
                    reason="kernel lacks PR_SET_MDWE (Linux < 6.3): cannot emulate MemoryDenyWriteExecute")
def test_torch_trains_and_generates_with_write_xor_execute_enforced(tmp_path):
    """The units set MemoryDenyWriteExecute=yes: torch must not need writable+executable memory."""
    script = f"""
import ctypes, mmap, sys
sys.path.insert(0, {str(ROOT)!r})
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(65, 1, 0, 0, 0) == 0, "PR_SET_MDWE failed"  # PR_MDWE_REFUSE_EXEC_GAIN
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W+X mapping was allowed: MDWE is not in force")
except PermissionError:
    pass
import torch, zstandard, grpc
from fedcore.models import build_model, get_preset
torch.manual_seed(0)
m = build_model(get_preset("tiny"), None, seed=0)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randint(0, 200, (2, 32))
y = torch.randint(0, 200, (2, 8))
for _ in range(2):
    loss = m(input_ids=x, labels=y).loss
    loss.backward(); opt.step(); opt.zero_grad()
out = m.generate(input_ids=x, max_new_tokens=4)
assert zstandard.ZstdCompressor().compress(b"x" * 1000)
print("ok", float(loss), tuple(out.shape))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr[-3000:]

