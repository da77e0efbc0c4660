"""netem without root: profiles, the tc command lines each backend builds, scenarios, CLI input errors."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from netem import cli, tc
from netem.measure import CheckRow, _steady_window
from netem.profiles import PROFILES, parse_profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    tomllib = pytest.importorskip("tomli")

SCENARIOS = Path(__file__).resolve().parent.parent / "fedlab" / "scenarios"
LTE = PROFILES["lte"]
# 1448 payload bytes per 1514-byte frame at MTU 1500 with TCP timestamps.
L2_PER_GOODPUT = 1514 / 1448


# ------------------------------------------------------------------ profiles


def test_lte_matches_the_study_and_errant():
    assert (LTE.down_mbit, LTE.up_mbit) == (40, 15)
    assert LTE.delay_ms == 45 and LTE.rtt_ms == 90  # one-way per direction
    assert 0 < LTE.jitter_ms <= 10
    assert "Woisetschl" in LTE.source and "ERRANT" in LTE.source


def test_10g_has_no_impairments():
    p = PROFILES["10g"]
    assert (p.down_mbit, p.up_mbit) == (10000, 10000)
    assert not p.has_impairments


def test_every_builtin_profile_names_its_source():
    assert {"lte", "10g", "5g", "3g", "wifi"} <= set(PROFILES)
    for name, p in PROFILES.items():
        assert p.name == name
        assert p.source.strip(), name
        assert p.down_mbit >= p.up_mbit > 0


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LTE.down_mbit = 1  # type: ignore[misc]


@pytest.mark.parametrize("text", ["lte", "LTE", " 5g "])
def test_parse_builtin_names(text):
    assert parse_profile(text) is PROFILES[text.strip().lower()]


def test_parse_custom_full():
    p = parse_profile("custom:down=40,up=15,delay=45,jitter=5,loss=0.1")
    assert (p.down_mbit, p.up_mbit, p.delay_ms, p.jitter_ms, p.loss_pct) == (40, 15, 45, 5, 0.1)
    assert p.source == "custom"


def test_parse_custom_defaults_to_rate_only():
    p = parse_profile("custom:down=20,up=10")
    assert (p.down_mbit, p.up_mbit, p.delay_ms, p.jitter_ms, p.loss_pct) == (20, 10, 0, 0, 0)


def test_unknown_name_lists_known_profiles():
    with pytest.raises(ValueError) as err:
        parse_profile("edge")
    for name in PROFILES:
        assert name in str(err.value)
    assert "custom:" in str(err.value)


@pytest.mark.parametrize("text, fragment", [
    ("custom:down=40", "missing up"),
    ("custom:up=4", "missing down"),
    ("custom:down=40,up=x", "not a number"),
    ("custom:down=40,up=15,lag=3", "bad custom profile item"),
    ("custom:down=40,up=15,up=3", "twice"),
    ("custom:down=-1,up=15", "positive"),
    ("custom:down=40,up=15,loss=150", "<= 100"),
    ("custom:down=40,up=15,delay=-5", ">= 0"),
])
def test_bad_custom_profiles_say_why(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_profile(text)


def test_describe_states_one_way_delay():
    assert "45 ms one-way (RTT 90 ms)" in LTE.describe()


# ------------------------------------------------------------ command lines


def test_rates_are_raised_by_the_header_overhead():
    assert tc.l2_rate_bit(40) == pytest.approx(40e6 * L2_PER_GOODPUT, abs=1)
    assert tc.l2_rate_bit(40, mtu=9000) < tc.l2_rate_bit(40)


def test_htb_backend_commands():
    cmds = tc.egress_commands("vd0", 40, LTE, "htb", netns="ns1", max_packet=17 * 1514)
    h = tc.htb_params(40, max_packet=17 * 1514)
    rate = f"{tc.l2_rate_bit(40)}bit"
    assert cmds == [
        ["tc", "-n", "ns1", "qdisc", "add", "dev", "vd0", "root", "handle", "1:", "htb", "default", "1"],
        ["tc", "-n", "ns1", "class", "add", "dev", "vd0", "parent", "1:", "classid", "1:1", "htb",
         "rate", rate, "ceil", rate, "burst", f"{h.burst_bytes}b", "cburst", f"{h.burst_bytes}b", "quantum", "1514"],
        ["tc", "-n", "ns1", "qdisc", "add", "dev", "vd0", "parent", "1:1", "handle", "10:",
         "pfifo", "limit", str(h.queue_packets)],
    ]
    joined = " ".join(" ".join(c) for c in cmds)
    assert "netem" not in joined and "delay" not in joined


def test_htb_bucket_holds_the_largest_packet_and_a_millisecond():
    small = tc.htb_params(2, max_packet=1514)
    assert small.burst_bytes >= 2 * 1514
    fast = tc.htb_params(1000, max_packet=1514)
    assert fast.burst_bytes >= tc.l2_rate_bit(1000) / 8 * 0.001
    assert tc.htb_params(15).burst_bytes > tc.GSO_MAX  # unknown device: a whole GSO packet


def test_gso_segments_follow_the_rate():
    assert tc.gso_segments(2) == 1
    assert 1 < tc.gso_segments(40) < tc.gso_segments(166) <= 64
    assert tc.gso_segments(10000) == 64


def test_netem_backend_commands():
    p = parse_profile("custom:down=40,up=15,delay=45,jitter=5,loss=0.1")
    (cmd,) = tc.egress_commands("eth0", 15, p, "netem")
    assert cmd[:9] == ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem"]
    text = " ".join(cmd)
    assert "delay 45ms 5ms" in text
    assert "loss random 0.1%" in text
    assert f"rate {tc.l2_rate_bit(15)}bit" in text
    limit = int(cmd[cmd.index("limit") + 1])
    assert limit >= 1000


def test_netem_backend_without_impairments_sets_only_the_rate():
    (cmd,) = tc.egress_commands("eth0", 10000, PROFILES["10g"], "netem")
    assert "delay" not in cmd and "loss" not in cmd and "rate" in cmd


def test_apply_shapes_egress_up_and_ingress_down_through_ifb():
    cmds = tc.apply_commands("eth1", LTE, "htb", "fdt-ifb7", netns="dev")
    text = [" ".join(c) for c in cmds]
    up, down = f"rate {tc.l2_rate_bit(15)}bit", f"rate {tc.l2_rate_bit(40)}bit"
    assert any("dev eth1 parent 1:" in t and up in t for t in text)
    assert any("dev fdt-ifb7 parent 1:" in t and down in t for t in text)
    assert "ip -n dev link add fdt-ifb7 type ifb" in text
    assert "tc -n dev qdisc add dev eth1 handle ffff: ingress" in text
    assert any("parent ffff:" in t and "mirred egress redirect dev fdt-ifb7" in t for t in text)
    # The IFB must exist and be up before traffic is redirected to it.
    assert text.index("ip -n dev link set dev fdt-ifb7 up") < text.index(
        next(t for t in text if "mirred" in t))


def test_clear_commands_remove_both_directions_and_the_ifb():
    text = [" ".join(c) for c in tc.clear_commands("eth1", "fdt-ifb7")]
    assert text == ["tc qdisc del dev eth1 root", "tc qdisc del dev eth1 ingress", "ip link del fdt-ifb7"]


def test_htb_backend_warns_about_what_it_cannot_apply():
    warning = tc.backend_warning(parse_profile("custom:down=4,up=2,delay=45,jitter=5,loss=1"), "htb")
    assert warning is not None
    assert "NOT applied" in warning and "delay 45 ms" in warning and "jitter 5 ms" in warning and "loss 1%" in warning
    assert tc.backend_warning(PROFILES["10g"], "htb") is None
    assert tc.backend_warning(LTE, "netem") is None


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        tc.egress_commands("eth0", 1, LTE, "cake")


def test_runner_logs_each_exact_command_and_can_dry_run():
    lines: list[str] = []
    runner = tc.Runner(log=lines.append, dry_run=True)
    for argv in tc.egress_commands("eth0", 15, LTE, "htb", netns="a b"):
        runner.run(argv)
    assert len(runner.history) == len(lines) == 3
    assert lines[0] == "+ tc -n 'a b' qdisc add dev eth0 root handle 1: htb default 1"


# ----------------------------------------------------------------- measuring


def test_steady_window_counts_segments_not_in_order_bytes():
    # Repairs after a loss release two segments per retransmission in the
    # in-order byte count; the window works from arrived segments instead.
    samples = [(0.0 + i * 0.01, 100 + i * 10) for i in range(101)]
    n_bytes, seconds = _steady_window(samples, final_bytes=1448 * 1110, final_segs=1110)
    assert seconds == pytest.approx(1.0)
    assert n_bytes == 1000 * 1448


def test_steady_window_ignores_samples_after_the_last_segment():
    samples = [(0.0, 0), (1.0, 100), (2.0, 100)]
    assert _steady_window(samples, final_bytes=100, final_segs=100) == (0, 0.0)


def test_check_row_ratio_and_tolerance():
    assert CheckRow("d0", "lte", "down", 40, 38.5).ok
    assert not CheckRow("d0", "lte", "up", 15, 14.0).ok
    assert CheckRow("d0", "lte", "up", 15, 15.3).ratio == pytest.approx(1.02)


# ----------------------------------------------------------------- scenarios

def flat_scenario(name: str) -> dict:
    """A scenario file's keys in one dict: its own, its [server] table's and its [client] table's.

    The tables hold exactly what the server's and the devices' configs
    hold, each key in its own table."""
    from dataclasses import fields

    from fedclient.config import ClientConfig
    from fedserver.config import ServerConfig

    data = tomllib.loads((SCENARIOS / f"{name}.toml").read_text())
    server, client = data.pop("server", {}), data.pop("client", {})
    assert set(server) <= {f.name for f in fields(ServerConfig)}, set(server)
    assert set(client) <= {f.name for f in fields(ClientConfig)}, set(client)
    assert not set(data) & ({f.name for f in fields(ServerConfig)} - {"out"}), "server keys go in [server]"
    return {**data, **server, **client}


SCENARIO_KEYS = {"description", "preset", "rounds", "devices", "devices_per_round", "encoding", "codec",
                 "strategy", "links"}  # required; any other `fedserver simulate` setting may be added


@pytest.mark.parametrize("name", ["table1-lte", "table1-10g", "mixed-fleet"])
def test_scenario_files_parse_and_name_known_profiles(name):
    data = flat_scenario(name)
    from fedcore.config import flag_owners
    from fedlab.simulate import SimulateConfig

    assert SCENARIO_KEYS <= set(data)
    assert set(data) - SCENARIO_KEYS <= set(flag_owners(SimulateConfig)), "every key a simulate setting"
    links = data["links"]
    if isinstance(links, str):
        links = [links] * data["devices"]
    assert len(links) == data["devices"]
    for link in links:
        parse_profile(link)
    assert 1 <= data["devices_per_round"] <= data["devices"]


def test_table1_scenarios_match_the_study_setup():
    for name, link in (("table1-lte", "lte"), ("table1-10g", "10g")):
        data = flat_scenario(name)
        assert (data["preset"], data["rounds"], data["devices"], data["devices_per_round"]) == ("small", 1, 3, 3)
        assert (data["encoding"], data["codec"]) == ("fp32", "none")
        links = data["links"] if isinstance(data["links"], list) else [data["links"]] * 3
        assert set(links) == {link}


def test_mixed_fleet_scenario():
    data = flat_scenario("mixed-fleet")
    assert (data["preset"], data["rounds"], data["devices"], data["devices_per_round"]) == ("tiny", 3, 4, 2)
    assert sorted(data["links"]) == sorted(["lte", "5g", "wifi", "3g"])


# ----------------------------------------------------------------------- CLI


def test_cli_profiles_table(capsys):
    assert cli.main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in PROFILES:
        assert f"\n{name} " in out
    assert "ERRANT" in out


def test_cli_bad_profile_is_exit_2_in_one_line(capsys):
    assert cli.main(["check", "--profile", "edge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netem: error:") and "lte" in err and "\n" not in err


def test_cli_usage_errors_are_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["apply", "eth0"]) == 2  # --profile missing
    assert cli.main(["check", "--devices", "0"]) == 2


def test_cli_run_takes_a_scenario_and_refuses_unknown_ones(capsys):
    from fedlab import cli as lab_cli

    args = lab_cli.netem_parser().parse_args(["run", "mixed-fleet", "--rounds", "2"])
    assert args.func is lab_cli.cmd_run and args.scenario == "mixed-fleet" and args.rounds == 2
    assert lab_cli.netem_main(["run", "no-such-scenario"]) == 2
    err = capsys.readouterr().err
    assert "table1-lte" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["table1-lte", "table1-10g", "mixed-fleet"])
def test_ready_scenarios_load_into_simulate_configs(name):
    from fedlab.runner import link_profiles, load_scenario

    cfg = load_scenario(name, {"rounds": 1})
    assert cfg.server.rounds == 1 and cfg.link
    profiles = link_profiles(cfg.link, cfg.devices)
    assert len(profiles) == cfg.devices


def test_link_profiles_one_for_all_or_one_each():
    from fedlab.runner import link_profiles

    assert [p.name for p in link_profiles("lte", 3)] == ["lte"] * 3
    assert [p.name for p in link_profiles("lte,5g", 2)] == ["lte", "5g"]
    mixed = link_profiles("lte,custom:down=20,up=10,delay=5,3g", 3)
    assert [(p.down_mbit, p.up_mbit) for p in mixed] == [(40, 15), (20, 10), (9.4, 1.9)]
    with pytest.raises(ValueError, match="one per device"):
        link_profiles("lte,5g", 3)


@pytest.mark.parametrize("argv", [["check"], ["apply", "eth0", "--profile", "lte"], ["cleanup"]])
def test_cli_without_root_says_so(argv, monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "needs root" in err and err.count("\n") == 1
