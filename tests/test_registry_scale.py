"""The device registry at fleet scale: an append-only journal that survives restarts and stays O(N) on
disk, paging through devices in id order, and `fedserver status --devices`."""
from __future__ import annotations

import json
import logging

import pytest

from fedcore.clock import FakeClock
from fedserver.registry import Registry, journal_paths
from fedserver.status import MAX_DEVICES_PAGE, device_page, render_status, status_message
from fedtune.v1 import fedtune_pb2 as pb


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_journal_paths_accept_the_old_name_the_new_one_or_a_base(tmp_path):
    for given in ("registry.json", "registry.jsonl", "registry"):
        assert journal_paths(tmp_path / given) == (tmp_path / "registry.jsonl", tmp_path / "registry.json")


def test_devices_and_estimates_survive_a_restart_but_sessions_do_not(tmp_path):
    clock = FakeClock(step=None)
    reg = Registry(60.0, tmp_path / "registry.json", clock)
    a = reg.join("a", 10, {"accelerator": "cuda"})
    reg.join("b", 20, {"accelerator": "cpu"})
    a.estimates.update(step_s=0.5, down_Bps=1e6)
    reg.save()
    reg.join("b", 25, {"accelerator": "cpu"})  # a rejoin: the last record wins
    reg.close()
    assert not (tmp_path / "registry.json").exists(), "the journal replaces the whole-file registry"

    again = Registry(60.0, tmp_path / "registry.json", clock)
    assert sorted(again.devices) == ["a", "b"]
    assert again.devices["a"].estimates == {"step_s": 0.5, "down_Bps": 1e6}
    assert again.devices["a"].capabilities == {"accelerator": "cuda"}
    assert again.devices["b"].num_samples == 25
    assert again.touch("a", a.session_id) is None, "a session does not outlive the server process"
    assert all(d.session_id == "" and d.last_seen == float("-inf") for d in again.devices.values())
    assert again.alive() == [], "known devices are not sampled until they join again"
    assert again.join("a", 10, {}).estimates["step_s"] == 0.5
    assert again.alive() == ["a"]
    # Loading compacted the journal: one line per device, plus the rejoin since.
    assert len(_lines(tmp_path / "registry.jsonl")) == 3


def test_save_journals_only_changed_estimates(tmp_path):
    reg = Registry(60.0, tmp_path / "registry.json")
    devs = [reg.join(f"d{i}", 1, {}) for i in range(5)]
    before = len(_lines(tmp_path / "registry.jsonl"))
    reg.save()
    assert len(_lines(tmp_path / "registry.jsonl")) == before, "nothing changed, nothing written"
    devs[1].estimates["up_Bps"] = 2e6
    devs[3].estimates["up_Bps"] = 3e6
    reg.save()
    reg.save(["d1", "d3", "unknown"])  # no change since: nothing more
    new = [json.loads(x) for x in _lines(tmp_path / "registry.jsonl")[before:]]
    assert [(r["op"], r["device_id"]) for r in new] == [("estimates", "d1"), ("estimates", "d3")]
    devs[4].estimates["step_s"] = 0.1
    reg.save(["d4"])
    reg.close()
    again = Registry(60.0, tmp_path / "registry.jsonl")
    assert {d: again.devices[d].estimates for d in ("d1", "d3", "d4")} == \
        {"d1": {"up_Bps": 2e6}, "d3": {"up_Bps": 3e6}, "d4": {"step_s": 0.1}}


def test_an_old_registry_json_is_still_read(tmp_path):
    old = {"devices": [{"device_id": "orin-1", "session_id": "s1", "num_samples": 7,
                        "capabilities": {"accelerator": "cuda"}, "joined_at": 1.7e9, "last_seen": 0.0,
                        "estimates": {"step_s": 0.25}}]}
    (tmp_path / "registry.json").write_text(json.dumps(old))
    reg = Registry(60.0, tmp_path / "registry.json")
    dev = reg.devices["orin-1"]
    assert (dev.num_samples, dev.estimates, dev.session_id, dev.joined_at) == (7, {"step_s": 0.25}, "", 1.7e9)
    assert not (tmp_path / "registry.json").exists(), "its devices moved into the journal"
    reg.close()
    assert Registry(60.0, tmp_path / "registry.json").devices["orin-1"].estimates == {"step_s": 0.25}


def test_an_unreadable_old_registry_json_is_set_aside(tmp_path, caplog):
    (tmp_path / "registry.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, "fedserver.registry"):
        reg = Registry(60.0, tmp_path / "registry.json")
    assert reg.devices == {}
    assert (tmp_path / "registry.json.damaged").exists() and "unreadable" in caplog.text


def test_a_torn_last_line_is_skipped_and_appends_follow_a_clean_line(tmp_path, caplog):
    reg = Registry(60.0, tmp_path / "registry.json")
    reg.join("a", 1, {})
    reg.join("b", 2, {})
    reg.close()
    journal = tmp_path / "registry.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"op":"join","device_id":"c","num_sa')  # the crash came mid-write
    with caplog.at_level(logging.WARNING, "fedserver.registry"):
        again = Registry(60.0, journal)
    assert sorted(again.devices) == ["a", "b"] and "torn last line" in caplog.text
    assert not (tmp_path / "registry.jsonl.damaged").exists(), "a torn tail is no damage worth keeping"
    again.join("d", 4, {})
    again.close()
    assert all(json.loads(x) for x in _lines(journal)), "the next line did not glue onto the torn one"
    assert sorted(Registry(60.0, journal).devices) == ["a", "b", "d"]


def test_a_garbled_line_inside_is_skipped_and_the_journal_kept(tmp_path, caplog):
    journal = tmp_path / "registry.jsonl"
    good = [{"op": "join", "device_id": d, "num_samples": 1, "capabilities": {}, "joined_at": 1.0, "estimates": {}}
            for d in ("a", "b")]
    journal.write_text(json.dumps(good[0]) + "\n\x00garbage\n" + json.dumps({"op": "join", "device_id": 5}) + "\n"
                       + json.dumps({"op": "estimates", "device_id": ["a"], "estimates": {}}) + "\n"
                       + json.dumps(good[1]) + "\n"
                       + json.dumps({"op": "estimates", "device_id": "b", "estimates": {"step_s": 2}}) + "\n")
    with caplog.at_level(logging.WARNING, "fedserver.registry"):
        reg = Registry(60.0, journal)
    assert sorted(reg.devices) == ["a", "b"] and reg.devices["b"].estimates == {"step_s": 2.0}
    assert "skipped 3 unreadable lines" in caplog.text
    assert (tmp_path / "registry.jsonl.damaged").exists()


def test_compaction_keeps_the_journal_bounded_under_rejoins(tmp_path):
    reg = Registry(60.0, tmp_path / "registry.json", compact_floor=50)
    journal = tmp_path / "registry.jsonl"
    for i in range(2000):
        dev = reg.join(f"d{i % 10}", i, {"accelerator": "cpu"})
        dev.estimates["step_s"] = float(i)
        reg.save([dev.device_id])
        assert len(_lines(journal)) <= 50 + 1
    reg.close()
    again = Registry(60.0, journal)
    assert len(_lines(journal)) == 10, "loading compacts to one line per device"
    assert again.devices["d9"].num_samples == 1999 and again.devices["d9"].estimates == {"step_s": 1999.0}


def test_the_compaction_threshold_grows_with_the_fleet(tmp_path):
    reg = Registry(60.0, tmp_path / "registry.json", compact_floor=10)
    for i in range(100):
        reg.join(f"d{i:03d}", 1, {})
    for i in range(300):  # 100 devices: up to 400 lines before a compaction
        reg.join(f"d{i % 100:03d}", 2, {})
    assert len(_lines(tmp_path / "registry.jsonl")) == 400
    reg.join("d000", 3, {})
    assert len(_lines(tmp_path / "registry.jsonl")) == 100


def test_ten_thousand_joins_cost_one_line_each(tmp_path):
    reg = Registry(60.0, tmp_path / "registry.json")
    journal = tmp_path / "registry.jsonl"
    for i in range(10_000):
        reg.join(f"dev-{i:05d}", 100, {"accelerator": "cuda", "peer": "ipv4:198.18.0.1:50000"})
        if i in (0, 9_999):
            per_line = journal.stat().st_size / (i + 1)
    assert len(_lines(journal)) == 10_000
    # Every byte this process wrote went into one line per join: no rewrite of the fleet on a join.
    assert reg.bytes_written == journal.stat().st_size
    assert per_line < 400
    assert len(reg.alive()) == 10_000 and reg.alive()[:2] == ["dev-00000", "dev-00001"]
    reg.close()
    assert len(Registry(60.0, journal).devices) == 10_000


def test_in_memory_registry_writes_nothing(tmp_path):
    reg = Registry(60.0)
    reg.join("a", 1, {}).estimates["x"] = 1.0
    reg.save()
    assert reg.bytes_written == 0 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ paging

def _fleet(n: int, clock=None) -> Registry:
    reg = Registry(60.0, None, clock or FakeClock(step=None))
    for i in reversed(range(n)):  # joined out of order: pages are in id order anyway
        reg.join(f"dev-{i:03d}", i, {"accelerator": "cuda" if i % 2 else "cpu"})
    return reg


def test_pages_walk_every_device_once_in_id_order():
    reg = _fleet(23)
    seen, after, pages = [], "", 0
    while True:
        devs, after = reg.page(after, 10)
        seen += [d.device_id for d in devs]
        pages += 1
        if not after:
            break
        assert after == devs[-1].device_id
    assert seen == sorted(reg.devices) and pages == 3
    assert [d.device_id for d in reg.page("dev-019", 10)[0]] == ["dev-020", "dev-021", "dev-022"]
    assert reg.page("dev-012", 10)[1] == "", "a page that reaches the last device is the last page"
    assert reg.page("dev-011", 10)[1] == "dev-021"


def test_a_cursor_that_is_no_device_starts_after_where_it_would_sort():
    reg = _fleet(5)
    assert [d.device_id for d in reg.page("dev-001x", 2)[0]] == ["dev-002", "dev-003"]
    assert reg.page("zzz", 2) == ([], "")
    assert [d.device_id for d in reg.page("a", 1)[0]] == ["dev-000"]
    assert reg.page("", 0) == ([], "")
    reg.join("dev-0015", 1, {})  # a new id lands in its place
    assert [d.device_id for d in reg.page("dev-001", 1)[0]] == ["dev-0015"]
    with pytest.raises(ValueError):
        reg.page("", -1)


def test_device_page_caps_the_size_and_refuses_a_negative_one():
    clock = FakeClock(step=None)
    reg = _fleet(1500, clock)
    devs, nxt = device_page(reg, "", 5000, clock.monotonic())
    assert len(devs) == MAX_DEVICES_PAGE and nxt == devs[-1].device_id
    assert device_page(reg, "", 0, clock.monotonic()) == ([], "")
    with pytest.raises(ValueError, match="page size"):
        device_page(reg, "", -1, clock.monotonic())
    with pytest.raises(ValueError, match="device id"):
        device_page(reg, "x" * 129, 10, clock.monotonic())


def test_device_info_says_alive_gone_and_never_seen(tmp_path):
    clock = FakeClock(step=None)
    reg = Registry(60.0, tmp_path / "registry.json", clock)
    reg.join("old", 3, {"accelerator": "cuda"}).estimates.update(down_Bps=5e6, up_Bps=2e6, step_s=0.2)
    reg.save()
    reg.close()
    reg = Registry(60.0, tmp_path / "registry.json", clock)  # a restart: "old" not heard from since
    reg.join("live", 1, {"accelerator": "cpu"})
    reg.join("quiet", 2, {})
    clock.advance(50)
    reg.touch("live", reg.devices["live"].session_id)
    clock.advance(20)
    devs, nxt = device_page(reg, "", 10, clock.monotonic())
    info = {d.device_id: d for d in devs}
    assert nxt == "" and list(info) == ["live", "old", "quiet"]
    assert info["live"].alive and info["live"].seconds_since_seen == pytest.approx(20)
    assert not info["quiet"].alive and info["quiet"].seconds_since_seen == pytest.approx(70)
    assert not info["old"].alive and not info["old"].HasField("seconds_since_seen")
    assert (info["old"].down_bytes_per_s, info["old"].up_bytes_per_s, info["old"].step_s) == (5e6, 2e6, 0.2)
    assert not info["live"].HasField("step_s")
    assert info["live"].accelerator == "cpu" and info["old"].num_samples == 3
    assert info["live"].joined_unix == pytest.approx(clock.time() - 70)


def _snapshot(known: int) -> dict:
    return {"phase": "waiting for devices", "round": 0, "round_open": False, "rounds_total": 3,
            "rounds_completed": 0, "devices_connected": 1, "devices_known": known, "deadline_unix": 0.0,
            "model_version": "sha256:" + "0" * 64, "bytes_total": {"down": 0, "up": 0}, "participants": [],
            "transfers": [], "last_round": None}


def test_status_renders_a_page_of_devices_and_the_next_command():
    clock = FakeClock(step=None)
    reg = _fleet(30, clock)
    clock.advance(90)
    reg.touch("dev-001", reg.devices["dev-001"].session_id)
    msg = status_message(_snapshot(30), *device_page(reg, "", 3, clock.monotonic()))
    msg = pb.ServerStatus.FromString(msg.SerializeToString())  # what the client gets
    assert [d.device_id for d in msg.devices] == ["dev-000", "dev-001", "dev-002"]
    assert msg.devices_next_after == "dev-002"
    text = render_status(msg, "127.0.0.1:50051", after="")
    assert "devices dev-000 to dev-002 (3 of 30 known, by id):" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("dev-")}
    assert rows["dev-001"][1:5] == ["alive", "0", "s", "ago"] and rows["dev-000"][1] == "gone"
    assert rows["dev-000"][2:5] == ["90", "s", "ago"]
    assert text.splitlines()[-1] == "next page: fedserver status --devices --after dev-002"

    last = status_message(_snapshot(30), *device_page(reg, "dev-027", 3, clock.monotonic()))
    text = render_status(last, "127.0.0.1:50051", next_command="x", after="dev-027")
    assert "dev-029" in text and "next page" not in text
    empty = status_message(_snapshot(30), *device_page(reg, "dev-029", 3, clock.monotonic()))
    assert render_status(empty, "a:1", after="dev-029").splitlines()[-1] == "devices: none after dev-029"
    plain = render_status(status_message(_snapshot(30)), "a:1")
    assert "by id" not in plain and "next page" not in plain and "none after" not in plain, "no list unless asked"


def test_old_clients_get_what_they_got():
    """An empty StatusRequest (every client before paging) asks for no device list."""
    req = pb.StatusRequest()
    reg = _fleet(3)
    devs, nxt = device_page(reg, req.devices_after, req.devices_page_size, 0.0)
    assert (devs, nxt) == ([], "")
    assert len(status_message(_snapshot(3), devs, nxt).devices) == 0


@pytest.mark.parametrize("argv, complaint", [
    (["--devices", "--page-size", "0"], "--page-size must be 1 to 1000"),
    (["--devices", "--page-size", "1001"], "--page-size must be 1 to 1000"),
    (["--after", "dev-1"], "add --devices"),
    (["--devices", "--after", "x" * 200], "device id"),
])
def test_status_cli_refuses_bad_paging_in_one_line(argv, complaint, capsys):
    from fedserver.cli import EXIT_UNUSABLE, main

    assert main(["status", "--insecure", *argv]) == EXIT_UNUSABLE
    err = capsys.readouterr().err
    assert complaint in err and err.count("\n") == 1


@pytest.fixture
def paging_server():
    """A gRPC server whose Status pages through a registry as fedserver's does (nothing else of it)."""
    from concurrent import futures

    import grpc

    from fedtune.v1 import fedtune_pb2_grpc as pbg

    clock = FakeClock(step=None)
    reg = _fleet(2345, clock)

    class Status(pbg.FederationServicer):
        def Status(self, request, context):
            try:
                page = device_page(reg, request.devices_after, request.devices_page_size, clock.monotonic())
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return status_message(_snapshot(len(reg.devices)), *page)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_FederationServicer_to_server(Status(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", reg
    server.stop(None)


def test_status_cli_pages_and_follows_the_cursor(paging_server, capsys):
    from fedserver.cli import main

    address, reg = paging_server
    assert main(["status", "--insecure", "--server", address, "--devices", "--page-size", "7",
                 "--after", "dev-100"]) == 0
    out = capsys.readouterr().out
    ids = sorted(reg.devices)  # string order: dev-1000 comes before dev-101
    expect = ids[ids.index("dev-100") + 1:][:7]
    assert [line.split()[0] for line in out.splitlines() if line.startswith("dev-")] == expect
    assert expect[:2] == ["dev-1000", "dev-1001"]
    assert out.splitlines()[-1] == f"next page: fedserver status --devices --page-size 7 --after {expect[-1]}"

    assert main(["status", "--insecure", "--server", address, "--devices"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("dev-") for line in out.splitlines()) == 50
    assert out.splitlines()[-1] == "next page: fedserver status --devices --after dev-049"

    assert main(["status", "--insecure", "--server", address, "--all-devices", "--json"]) == 0
    msg = json.loads(capsys.readouterr().out)
    assert [d["device_id"] for d in msg["devices"]] == sorted(reg.devices) and msg["devices_next_after"] == ""

    assert main(["status", "--insecure", "--server", address]) == 0
    assert "dev-000" not in capsys.readouterr().out


def test_a_negative_page_size_is_invalid_argument(paging_server):
    import grpc

    from fedcore.channel import ClientSecurity, open_channel
    from fedtune.v1 import fedtune_pb2_grpc as pbg

    address, _ = paging_server
    with open_channel(address, ClientSecurity(insecure=True)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pbg.FederationStub(ch).Status(pb.StatusRequest(devices_page_size=-1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page size" in err.value.details()
