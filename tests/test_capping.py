"""The power cap in the daemon: a federated round on the EMULATED Orin records its choice and energy."""
from __future__ import annotations

import pytest

from fedclient.cli import main as fedclient_main
from fedclient.emulated import ORIN_GPU_HZ

from fedhelpers import start_daemon, start_server, stop, tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_capped_round_on_the_emulated_orin_records_its_choice_and_energy(tmp_path):
    # The server's default: one local epoch (no local_steps), so the progress is the device's 24 examples.
    srv = start_server(tiny_server_config(tmp_path / "run", insecure=True, rounds=1, eval_size=0, local_steps=0,
                                          local_epochs=1, batch_size=8))
    log = tmp_path / "dev.log"
    proc = start_daemon(srv.address, "orin", log, "--power-cap-w", "25", "--emulate", "agx-orin-64gb",
                        "--state-dir", str(tmp_path / "state"))
    try:
        assert srv.wait(180), "the round did not complete"
        extra = srv.coord.last_records[0]["extra"]
        assert extra["cap_power_cap_w"] == 25.0
        assert extra["cap_predicted_w"] <= 25.0  # the choice is under the cap
        assert extra["cap_emulated_w"] <= 25.0 and extra["cap_emulated_energy_j"] > 0
        assert extra["batch_size"] == extra["cap_batch_size"] and extra["steps"] == extra["cap_steps"]
        assert extra["cap_batch_size"] <= 8 and 1 < extra["cap_steps"] and extra["cap_samples"] <= 24
        assert extra["cap_predicted_s"] <= extra["cap_baseline_predicted_s"]
        assert int(extra["cap_gpu_hz"]) in ORIN_GPU_HZ
        text = log.read_text()
        assert "gradient noise scale B_simple" in text and "EMULATED" in text
        assert list((tmp_path / "state" / "power-profiles").glob("power-profile-*.json")), "the profile is cached"
    finally:
        stop([proc])
        srv.close()


def test_a_cap_without_a_clock_to_control_is_one_clear_line(tmp_path, capsys):
    # No Jetson GPU here (nor on CI): naming it must fail before anything runs, in one line.
    code = fedclient_main(["run", "--server", "127.0.0.1:1", "--device-id", "d", "--insecure", "--data-size", "4",
                           "--power-cap-w", "10", "--clock-control", "jetson-gpu",
                           "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "fedclient:" in err and "GPU" in err
    code = fedclient_main(["run", "--server", "127.0.0.1:1", "--device-id", "d", "--insecure", "--data-size", "4",
                           "--power-cap-w", "10"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "set state_dir" in err, "a real cap keeps its clock journal in the state dir"
