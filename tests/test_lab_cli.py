"""The lab's commands are reached from the installed scripts and `python -m fedlab`, never from the product's own CLIs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fedlab.cli import fedserver_main, netem_main
from fedserver import cli as server_cli
from netem import cli as netem_cli

LAB_SERVER, LAB_NETEM = {"simulate", "report"}, {"run", "policies", "report"}


def _commands(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_product_clis_know_no_lab_command(capsys):
    ap, _ = server_cli.build_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["simulate"])
    assert "invalid choice: 'simulate'" in capsys.readouterr().err
    assert netem_cli.main(["run", "hetero"]) == 2
    assert "invalid choice: 'run'" in capsys.readouterr().err


def test_installed_scripts_add_the_lab_commands(capsys):
    assert all(c in _commands(fedserver_main, [], capsys) for c in LAB_SERVER | {"run", "certs", "status"})
    assert netem_main(["--help"]) == 0  # netem's main turns argparse's exit into a status
    out = capsys.readouterr().out
    assert all(c in out for c in LAB_NETEM | {"profiles", "apply", "check"})
    assert "--no-insecure" in _commands(fedserver_main, ["simulate"], capsys)


def test_python_m_fedlab_is_both_scripts():
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedlab", *argv], capture_output=True, text=True, timeout=120)

    sim = run("simulate", "--rounds", "0")
    assert sim.returncode == 2 and sim.stderr.strip().startswith("fedserver: error: --rounds must be >= 1"), sim.stderr
    scen = run("netem", "run", "no-such-scenario")
    assert scen.returncode == 2 and "ready scenarios: " in scen.stderr and "hetero" in scen.stderr, scen.stderr


def test_netem_run_set_overrides_any_setting_by_name():
    from fedcore.config import ConfigError
    from fedlab.cli import settings
    from fedlab.runner import load_scenario

    assert settings(["method=mezo", "learning_rate=1e-2", "insecure=true", 'zo_second_block="decoder."']) == {
        "method": "mezo", "learning_rate": 1e-2, "insecure": True, "zo_second_block": "decoder."}
    cfg = load_scenario("zero-order-lte", settings(["lora_rank=8", "learning_rate=1e-2"]))
    assert cfg.server.build_method().name == "lora" and cfg.server.learning_rate == 1e-2
    assert load_scenario("zero-order-lte", settings(["method=fedkseed"])).server.build_method().name == "fedkseed"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        settings(["method"])
    with pytest.raises(ConfigError, match="unknown setting"):
        load_scenario("zero-order-lte", settings(["no_such_key=1"]))
