"""Issue 14, configuration: every value is checked where it is read, in one line naming the key and the file
(or the flag), on both sides; nothing is accepted that fails later or never."""
from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from fedclient.config import BenchConfig, ClientConfig
from fedcore import config as cfgmod
from fedcore.config import ConfigError, from_mapping
from fedserver.cli import build_parser
from fedserver.config import ServerConfig
from fedlab.simulate import SimulateConfig

CONFIGS = [ServerConfig, ClientConfig, SimulateConfig, BenchConfig]
# What a class needs besides its defaults to load on this machine (no certificates in these tests).
BASE = {ServerConfig: {"insecure": True}, ClientConfig: {"insecure": True}, SimulateConfig: {}, BenchConfig: {}}


def _fields(cls, *kinds):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = cfgmod._base_type(hints[f.name])
        item = (typing.get_args(tp) or (str,))[0] if typing.get_origin(tp) in (list, tuple) else tp
        if item in kinds:
            yield f, item


def _load_toml(cls, tmp_path: Path, text: str):
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return cfgmod.resolve(cls, argparse.Namespace(), path), path


def _refused(cls, tmp_path: Path, key: str, toml_value: str) -> str:
    """The one-line message for `key = toml_value` in a TOML file; it names the key and the file."""
    base = "".join(f"{k} = {str(v).lower()}\n" for k, v in BASE[cls].items() if k != key)
    with pytest.raises(ConfigError) as err:
        _load_toml(cls, tmp_path, f"{base}{key} = {toml_value}\n")
    msg = str(err.value)
    assert key in msg and str(tmp_path / "settings.toml") in msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ the issue's values
@pytest.mark.parametrize("key, value", [
    ("learning_rate", "nan"), ("learning_rate", "inf"), ("learning_rate", "0"), ("learning_rate", "-1e-3"),
    ("rounds", "true"), ("round_deadline_s", "0"), ("round_deadline_s", "-5"), ("min_devices", "-1"),
    ("liveness_s", "0"), ("max_concurrent_uploads", "0"), ("listen", '"127.0.0.1:99999"'),
])
def test_config_issue_values_are_refused_naming_key_and_file(tmp_path, key, value):
    _refused(ServerConfig, tmp_path, key, value)


@pytest.mark.parametrize("flag, value, key", [
    ("--learning-rate", "nan", "learning_rate"), ("--rounds", "true", "rounds"),
    ("--listen", "127.0.0.1:99999", "listen"), ("--liveness-s", "0", "liveness_s"),
])
def test_config_flags_are_checked_like_keys_and_named_as_flags(tmp_path, flag, value, key):
    ap, _ = build_parser()
    args = ap.parse_args(["run", "--insecure", flag, value])
    with pytest.raises(ConfigError) as err:
        cfgmod.resolve(ServerConfig, args, None)
    assert str(err.value).startswith(flag + " "), str(err.value)


def test_config_error_reaches_the_operator_as_one_line(tmp_path):
    toml = tmp_path / "server.toml"
    toml.write_text('insecure = true\nmax_concurrent_uploads = 0\n')
    r = subprocess.run([sys.executable, "-m", "fedserver", "run", "--config", str(toml), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"fedserver: error: {toml}: max_concurrent_uploads must be >= 1, got 0"), r.stderr


def test_config_the_file_and_the_flag_are_told_apart(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("insecure = true\nrounds = 0\n")
    ap, _ = build_parser()
    with pytest.raises(ConfigError, match=rf"^{path}: rounds must be >= 1"):
        cfgmod.resolve(ServerConfig, ap.parse_args(["run"]), path)
    with pytest.raises(ConfigError, match=r"^--rounds must be >= 1"):
        cfgmod.resolve(ServerConfig, ap.parse_args(["run", "--rounds", "-3"]), path)
    assert cfgmod.resolve(ServerConfig, ap.parse_args(["run", "--rounds", "4"]), path).rounds == 4, "flags win"


# ------------------------------------------------------------------ the class
@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_every_numeric_key_declares_a_range(cls):
    bare = [f.name for f, _ in _fields(cls, int, float) if not {"ge", "gt", "le", "lt"} & set(f.metadata)]
    assert not bare, f"{cls.__name__}: numeric keys without a declared range: {bare}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_a_bool_is_never_a_number_nor_a_number_a_bool(cls, tmp_path):
    for f, kind in _fields(cls, int, float):
        msg = _refused(cls, tmp_path, f.name, "[true]" if typing.get_origin(
            typing.get_type_hints(cls)[f.name]) is list else "true")
        assert "boolean" in msg, msg
    for f, _ in _fields(cls, bool):
        for number in ("1", "0", "2.0"):
            assert "true or false" in _refused(cls, tmp_path, f.name, number)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_floats_are_finite(cls, tmp_path):
    floats = [f for f, kind in _fields(cls, float)]
    assert floats
    for f in floats:
        is_list = typing.get_origin(typing.get_type_hints(cls)[f.name]) is list
        for bad in ("nan", "inf", "-inf"):
            assert "finite" in _refused(cls, tmp_path, f.name, f"[{bad}]" if is_list else bad)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_values_outside_the_declared_range_are_refused(cls, tmp_path):
    tried = 0
    for f, kind in _fields(cls, int, float):
        is_list = typing.get_origin(typing.get_type_hints(cls)[f.name]) is list
        m = f.metadata
        for bound, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            if bound not in m:
                continue
            value = m[bound] + step
            if kind is int:
                value = int(value)
            text = repr(value) if kind is float else str(value)
            _refused(cls, tmp_path, f.name, f"[{text}]" if is_list else text)
            tried += 1
    assert tried >= len(list(_fields(cls, int, float))), "every numeric key has a bound to step over"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_enumerated_strings_are_checked_against_their_choices(cls, tmp_path):
    named = [f for f in dataclasses.fields(cls) if "choices" in f.metadata]
    assert named
    for f in named:
        assert "must be one of" in _refused(cls, tmp_path, f.name, '"bogus"')
        for choice in f.metadata["choices"]:
            try:
                from_mapping(cls, {**BASE[cls], f.name: choice})
            except ConfigError as e:  # a valid choice may still clash with another default, never with its list
                assert "must be one of" not in str(e), e


def test_config_enumerations_cover_what_the_code_knows():
    from fedcore.wire.formats import CODECS, ENCODINGS

    meta = {f.name: f.metadata for f in dataclasses.fields(ServerConfig)}
    assert set(meta["upload_encoding"]["choices"]) == set(ENCODINGS) - {"raw"}
    assert set(meta["download_codec"]["choices"]) == set(CODECS)
    assert meta["round_policy"]["choices"] == ("steps", "samples", "time")
    assert "link_encodings must list" in _refused_plain(ServerConfig, link_encodings="fp32,int3")


def _refused_plain(cls, **values) -> str:
    with pytest.raises(ConfigError) as err:
        from_mapping(cls, {**BASE[cls], **values}, source="x.toml")
    return str(err.value)


@pytest.mark.parametrize("cls, key, good, bad", [
    (ServerConfig, "listen", ["0.0.0.0:50051", "127.0.0.1:0", "[::]:50051", ":50051"],
     ["127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:", "localhost", "127.0.0.1:5x", "127.0.0.1: 80"]),
    (ServerConfig, "metrics_listen", ["", "127.0.0.1:9464"], ["127.0.0.1:70000", "9464"]),
    (ClientConfig, "server", ["fedserver.example.org:50051", "[::1]:50051"],
     ["127.0.0.1:0", ":50051", "127.0.0.1:65536", "fedserver.example.org"]),
    (ClientConfig, "metrics_listen", ["", "127.0.0.1:9465"], ["127.0.0.1:99999"]),
])
def test_config_addresses_are_host_and_a_real_port(cls, key, good, bad):
    for value in good:
        assert getattr(from_mapping(cls, {**BASE[cls], key: value}), key) == value
    for value in bad:
        assert key in _refused_plain(cls, **{key: value}), value


@pytest.mark.parametrize("cls, values, key", [
    (ServerConfig, dict(devices_per_round=3, min_updates=2, min_devices=1), "min_devices"),
    (ServerConfig, dict(devices_per_round=2, min_updates=3), "min_updates"),
    (ServerConfig, dict(poll_seconds=10, liveness_s=5), "liveness_s"),
    (ServerConfig, dict(chunk_elems=100, block_size=64), "chunk_elems"),
    (ServerConfig, dict(deadline_from_estimates=True, round_deadline_s=30, deadline_floor_s=60), "deadline_floor_s"),
    (ClientConfig, dict(retry_initial_s=10, retry_max_s=5), "retry_max_s"),
    (ClientConfig, dict(partitions=4, partition=4), "partition"),
    (SimulateConfig, dict(devices=2, devices_per_round=3), "devices_per_round"),
])
def test_config_fields_that_depend_on_each_other_are_checked_together(cls, values, key):
    msg = _refused_plain(cls, **values)
    assert msg.startswith(f"x.toml: {key} "), msg


def test_config_the_device_side_is_checked_the_same_way(tmp_path):
    for key, value in (("server", '"127.0.0.1:99999"'), ("power_hz", "nan"), ("retry_initial_s", "0"),
                       ("insecure", "1"), ("transfer_retries", "true"), ("stall_timeout_s", "-1")):
        _refused(ClientConfig, tmp_path, key, value)


def test_config_simulate_settings_are_checked_by_their_own_names(tmp_path):
    for key, value in (("learning_rate", "nan"), ("encoding", '"int3"'), ("devices", "true"),
                       ("metrics_port", "70000"), ("compute_slowdown", "[0.5]")):
        _refused(SimulateConfig, tmp_path, key, value)


def test_config_documented_settings_still_load(tmp_path):
    """The documented settings and the shipped scenarios pass the stricter checks (tests/test_docs.py checks that
    every key in the docs' TOML examples is a real setting)."""
    from fedlab.runner import SCENARIOS, load_scenario

    for path in sorted(SCENARIOS.glob("*.toml")):
        load_scenario(str(path))
    cfg, _ = _load_toml(ServerConfig, tmp_path, 'insecure = true\nlisten = "0.0.0.0:50051"\nround_deadline_s = 3600\n'
                                                'link_t_comp_s = 0\nlora_alpha = 16\nupload_codec = "zstd-bg"\n')
    assert cfg.round_deadline_s == 3600.0 and isinstance(cfg.round_deadline_s, float)
    ap, _ = build_parser()
    args = ap.parse_args(["run", "--insecure", "--no-error-feedback", "--rounds", "3"])
    assert cfgmod.resolve(ServerConfig, args, None).rounds == 3


# ------------------------------------------------------------------ weights_dir
@pytest.mark.parametrize("cls", [ServerConfig, ClientConfig, SimulateConfig], ids=lambda c: c.__name__)
def test_config_weights_dir_that_does_not_exist_is_refused_at_load(cls, tmp_path):
    msg = _refused(cls, tmp_path, "weights_dir", f'"{tmp_path / "flan-t5-small"}"')
    assert "does not exist" in msg and "Repo id" not in msg, msg
    (tmp_path / "file").write_text("")
    assert "is not a directory" in _refused(cls, tmp_path, "weights_dir", f'"{tmp_path / "file"}"')


def test_load_missing_weights_dir_says_the_directory_does_not_exist(tmp_path):
    from fedcore.models import build_model, load_tokenizer

    missing = tmp_path / "models" / "flan-t5-small"
    for load in (lambda: build_model("small", missing), lambda: load_tokenizer(missing)):
        with pytest.raises(ValueError) as err:
            load()
        assert str(err.value).startswith(f"weights_dir {missing} does not exist"), str(err.value)
        assert "Repo id" not in str(err.value)


def test_config_a_finite_check_holds_for_every_float_default():
    """The defaults themselves are inside their declared ranges (the metadata does not refuse the defaults)."""
    for cls in CONFIGS:
        obj = from_mapping(cls, dict(BASE[cls]))
        for f, _ in _fields(obj.__class__, float):
            v = getattr(obj, f.name)
            assert v is None or all(math.isfinite(x) for x in (v if isinstance(v, list) else [v]))


def test_config_booleans_are_flags_and_no_flags_and_toml_keys(tmp_path):
    """Issue 15 part 4: --name / --no-name on the command line, name = true/false in a file; flags win."""
    ap, _ = build_parser()
    assert cfgmod.resolve(ServerConfig, ap.parse_args(["run", "--insecure", "--save-updates"]), None).save_updates
    path = tmp_path / "server.toml"
    path.write_text('insecure = true\nerror_feedback = true\nupload_payload = "delta"\n')
    cfg = cfgmod.resolve(ServerConfig, ap.parse_args(["run", "--no-error-feedback"]), path)
    assert cfg.insecure is True and cfg.error_feedback is False
    assert cfgmod.resolve(ServerConfig, ap.parse_args(["run"]), path).error_feedback is True, "unset flag: the file"
    with pytest.raises(SystemExit):
        ap.parse_args(["run", "--insecure", "true"])  # a boolean flag takes no value
