"""The simulate config is composed of the server's and the devices' configs, not a copy of their fields."""
from __future__ import annotations

import pytest

from fedclient.config import ClientConfig
from fedcore import config as cfgmod
from fedlab.cli import fedserver_parser
from fedlab.simulate import LAB_SERVER_DEFAULTS, SimulateConfig
from fedserver.config import ServerConfig


def resolve(argv: list[str], path=None) -> SimulateConfig:
    return cfgmod.resolve(SimulateConfig, fedserver_parser().parse_args(["simulate", *argv]), path)


def test_defaults_are_the_servers_and_devices_except_the_labs_stated_ones():
    cfg = resolve([])
    assert isinstance(cfg.server, ServerConfig) and isinstance(cfg.client, ClientConfig)
    for k, v in LAB_SERVER_DEFAULTS.items():
        assert getattr(cfg.server, k) == v
    untouched = {"batch_size", "strategy", "local_epochs", "max_input_tokens", "upload_payload", "lora_targets"}
    assert all(getattr(cfg.server, k) == getattr(ServerConfig(), k) for k in untouched)
    assert cfg.client.data == ClientConfig().data and cfg.client.alpha == ClientConfig().alpha


def test_flags_of_the_same_names_reach_their_part_and_shorthands_fill_both_directions():
    cfg = resolve(["--rounds", "3", "--lora-rank", "8", "--data-size", "60", "--insecure", "--encoding", "int8",
                   "--download-encoding", "fp32", "--devices", "4"])
    assert (cfg.server.rounds, cfg.server.lora_rank, cfg.server.insecure, cfg.devices) == (3, 8, True, 4)
    assert cfg.client.data_size == 60
    assert (cfg.server.upload_encoding, cfg.server.download_encoding) == ("int8", "fp32"), "given direction kept"
    assert cfg.server.min_updates == cfg.server.devices_per_round, "a lab round waits for all it sampled"


def test_toml_tables_flags_win_and_errors_name_the_table_key_and_file(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('devices = 4\ncodec = "zstd"\n\n[server]\nrounds = 5\nlearning_rate = 0.01\n\n'
                    '[client]\nstall_timeout_s = 9.5\n')
    cfg = resolve(["--rounds", "2"], path)
    assert (cfg.devices, cfg.server.rounds, cfg.server.learning_rate) == (4, 2, 0.01)
    assert (cfg.server.upload_codec, cfg.server.download_codec, cfg.client.stall_timeout_s) == ("zstd", "zstd", 9.5)
    path.write_text("[server]\nrounds = 0\n")
    with pytest.raises(cfgmod.ConfigError, match=rf"^{path}: \[server\] rounds must be >= 1"):
        resolve([], path)
    with pytest.raises(cfgmod.ConfigError, match=r"^--batch-size must be >= 1"):
        resolve(["--batch-size", "0"])
    path.write_text("[server]\nnot_a_key = 1\n")
    with pytest.raises(cfgmod.ConfigError, match=r"unknown setting\(s\) in \[server\]: not_a_key"):
        resolve([], path)


def test_what_every_daemon_would_refuse_at_start_is_refused_at_load(tmp_path):
    """The seed is each device's data_seed (at most 2**32 - 1), and [client] settings that only conflict with
    each other (retry_max_s below retry_initial_s) are checked when the config loads, not when daemons die."""
    with pytest.raises(cfgmod.ConfigError, match=r"^--seed must be <= 4294967295 \(it is each device's"):
        resolve(["--seed", str(1 << 32)])
    assert resolve(["--seed", str((1 << 32) - 1)]).server.seed == (1 << 32) - 1
    path = tmp_path / "sim.toml"
    path.write_text("[client]\nretry_initial_s = 10\n")
    with pytest.raises(cfgmod.ConfigError, match=r"retry_max_s must be at least retry_initial_s \(10\)"):
        resolve([], path)
    with pytest.raises(cfgmod.ConfigError, match=r"^flags: unknown hardware 'no-such-board'"):
        resolve(["--hardware", "no-such-board"])


def test_the_launcher_passes_the_devices_their_part():
    cfg = SimulateConfig.of(devices=2, devices_per_round=2, data_size=60,
                            client={"power_hz": 2.0, "stay_after_shutdown": True},
                            seed=7, insecure=True)
    args = cfg.client_args(1, "127.0.0.1:5")
    assert args[args.index("--data-size") + 1] == "60" and args[args.index("--power-hz") + 1] == "2.0"
    assert "--stay-after-shutdown" in args and args[args.index("--data-seed") + 1] == "7"
    assert args[args.index("--partition") + 1] == "1" and args[args.index("--server") + 1] == "127.0.0.1:5"
    scfg = cfg.server_config(tmp := cfg.out, 0)
    assert scfg.out == tmp and scfg.eval_data == cfg.client.data and scfg.seed == 7


def test_what_the_launcher_sets_is_refused_in_a_table_not_silently_overwritten(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('[server]\nlisten = "0.0.0.0:50051"\n\n[client]\ndevice_id = "orin-1"\n')
    with pytest.raises(cfgmod.ConfigError, match=rf"^{path}: \[server\] listen: set by the launcher"):
        resolve([], path)
    path.write_text('[client]\ndevice_id = "orin-1"\n')
    with pytest.raises(cfgmod.ConfigError, match=r"\[client\] device_id: set by the launcher"):
        resolve([], path)
