"""Mutual TLS, device identity, limits and update validation against a running server over loopback."""
from __future__ import annotations

import os
import stat
import threading
import time

import grpc
import pytest
import torch
from cryptography import x509

from bench.fuzz import join_and_wait
from fedcore.channel import ClientSecurity, open_channel
from fedcore.wire import unique_tensors
from fedserver.certs import DEVICE_URI
from fedserver.cli import main as fedserver_main
from fedcore.wire import clone_tied
from fedserver.storage import RoundLog
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from fedhelpers import Fleet, start_server, tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_certs_command_writes_a_fleet_with_private_keys_0600(tmp_path, capsys):
    out = tmp_path / "pki"
    assert fedserver_main(["certs", "--out", str(out), "--devices", "orin-01,orin-02",
                           "--server-names", "fed.example.org,10.0.0.5"]) == 0
    assert "tls_ca" in capsys.readouterr().out
    for key in [out / "ca.key", out / "server.key", out / "admin.key", out / "tokens.txt",
                *(out / "devices").glob("*.key")]:
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fed.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    dev = x509.load_pem_x509_certificate((out / "devices" / "orin-02.pem").read_bytes())
    assert dev.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "orin-02"
    assert dev.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [DEVICE_URI + "orin-02"]
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    dev.verify_directly_issued_by(ca)
    assert fedserver_main(["certs", "--out", str(out), "--devices", "bad id"]) == 2


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    """One server for the identity tests: round 1 samples the first device that joins."""
    root = tmp_path_factory.mktemp("mtls")
    fleet = Fleet(root / "pki")
    cfg = tiny_server_config(root / "srv", fleet, rounds=1, devices_per_round=1, eval_size=0,
                             round_deadline_s=3600, revoked=root / "revoked.txt", rate_limit_rps=5,
                             rate_limit_burst=20)
    srv = start_server(cfg)
    yield srv
    srv.close()


def _join(stub: pbg.FederationStub, device_id: str) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(device_id=device_id, num_samples=5), timeout=30)


def test_device_without_a_valid_certificate_is_refused_at_the_handshake(mtls, tmp_path):
    fleet = mtls.fleet
    stranger = Fleet(tmp_path / "other-ca")  # a certificate from a CA the server does not trust
    attempts = {
        "no client certificate": ClientSecurity(tls_ca=fleet.root / "ca.pem"),
        "certificate of another CA": ClientSecurity(tls_ca=fleet.root / "ca.pem",
                                                    tls_cert=stranger.security("eve").tls_cert,
                                                    tls_key=stranger.security("eve").tls_key),
        "plaintext": ClientSecurity(insecure=True),
    }
    for what, security in attempts.items():
        with open_channel(mtls.address, security) as ch:
            with pytest.raises(grpc.RpcError) as e:
                _join(pbg.FederationStub(ch), "eve")
            # No RPC ever reaches the service: the TLS handshake (or the HTTP/2 preface) fails.
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, what
    assert "eve" not in mtls.coord.registry.devices
    # The same device with its own certificate from the fleet's CA gets in.
    assert _join(mtls.stub("eve"), "eve").session_id


def test_revoked_devices_are_refused_by_id_and_by_serial(mtls):
    revoked = mtls.coord.cfg.revoked
    stub_a, stub_b = mtls.stub("lost-a"), mtls.stub("lost-b")
    assert _join(stub_a, "lost-a").session_id and _join(stub_b, "lost-b").session_id
    revoked.write_text(f"lost-a\n{mtls.fleet.serials['lost-b']}  # stolen\n")
    try:
        for stub, dev in ((stub_a, "lost-a"), (stub_b, "lost-b")):
            with pytest.raises(grpc.RpcError) as e:
                _join(stub, dev)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in e.value.details()
    finally:
        revoked.write_text("")


def test_a_device_cannot_speak_for_another(mtls):
    stub = mtls.stub("mallory")
    j = _join(stub, "mallory")
    for call in (lambda: _join(stub, "victim"),
                 lambda: stub.GetTask(pb.TaskRequest(device_id="victim", session_id=j.session_id), timeout=30),
                 lambda: list(stub.Download(pb.DownloadRequest(device_id="victim"), timeout=30)),
                 lambda: stub.Upload(iter([pb.UploadMessage(header=pb.UploadHeader(device_id="victim"))]),
                                     timeout=30)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "certificate says 'mallory'" in e.value.details()


def test_a_device_uploading_out_of_turn_is_refused(mtls):
    _join(mtls.stub("first"), "first")  # the round starts as soon as one device is there
    while mtls.coord.current is None:
        time.sleep(0.1)
    (first,) = mtls.coord.current.assignments  # whichever device the round sampled
    sampled = mtls.stub(first)
    sid, task = join_and_wait(sampled, first)
    late = mtls.stub("late")
    j = _join(late, "late")
    assert late.GetTask(pb.TaskRequest(device_id="late", session_id=j.session_id), timeout=30).kind == pb.Task.WAIT
    # Its own id, the round's number and version, the sampled device's task id: not its turn.
    hdr = pb.UploadHeader(device_id="late", session_id=j.session_id, task_id=task.task_id, round=task.round,
                          base_version=task.model_version, num_samples=5)
    with pytest.raises(grpc.RpcError) as e:
        late.Upload(iter([pb.UploadMessage(header=hdr)]), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'late' was not sampled in round 1" in e.value.details()
    # Nor in the sampled device's name.
    hdr.device_id, hdr.session_id = first, sid
    with pytest.raises(grpc.RpcError) as e:
        late.Upload(iter([pb.UploadMessage(header=hdr)]), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    st = sampled.UploadStatus(pb.UploadStatusRequest(device_id=first, session_id=sid, task_id=task.task_id))
    assert not st.known and not st.complete


def test_request_rate_is_limited_per_device(mtls):
    stub = mtls.stub("chatty")
    j = _join(stub, "chatty")
    req = pb.UploadStatusRequest(device_id="chatty", session_id=j.session_id, task_id="t")
    futures = [stub.UploadStatus.future(req, timeout=30) for _ in range(80)]
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) < 80
    # Another device is not slowed by this one.
    assert _join(mtls.stub("quiet"), "quiet").session_id


def test_enrollment_token_names_the_device_on_tls_without_client_certificates(tmp_path):
    fleet = Fleet(tmp_path / "pki")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# device token\nkiosk-1 0123456789abcdef0123\n")
    cfg = tiny_server_config(tmp_path / "srv", fleet, tls_ca=None, enrollment_tokens=tokens, eval_size=0,
                             round_deadline_s=3600)
    srv = start_server(cfg)
    try:
        ca = fleet.root / "ca.pem"
        with open_channel(srv.address, ClientSecurity(tls_ca=ca, enrollment_token="0123456789abcdef0123")) as ch:
            stub = pbg.FederationStub(ch)
            assert _join(stub, "kiosk-1").session_id
            with pytest.raises(grpc.RpcError) as e:
                _join(stub, "kiosk-2")
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "enrollment token" in e.value.details()
        for token in ("", "wrong-token-wrong-token"):
            with open_channel(srv.address, ClientSecurity(tls_ca=ca, enrollment_token=token)) as ch:
                with pytest.raises(grpc.RpcError) as e:
                    _join(pbg.FederationStub(ch), "kiosk-1")
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "enrollment_token" in e.value.details()
    finally:
        srv.close()


@pytest.mark.parametrize("payload", ["weights", "delta"])
def test_nan_and_oversized_updates_are_refused_and_the_round_goes_on(tmp_path, payload):
    """Four sampled devices: an honest one, a NaN update, one over max_update_norm, one clipped.

    The norm bounded is that of update - global for WEIGHTS uploads and of the delta itself for DELTA ones.
    """
    fleet = Fleet(tmp_path / "pki")
    cfg = tiny_server_config(tmp_path / "srv", fleet, rounds=1, devices_per_round=4, min_updates=1, eval_size=0,
                             round_deadline_s=3600, max_update_norm=100.0, clip_update_norm=0.5)
    srv = start_server(cfg)
    try:
        base = clone_tied(srv.coord.state)  # ties kept, as a device's state dict has them
        version = srv.coord.version

        devs = ["honest", "nan", "huge", "big"]
        chans = {d: srv.channel(d) for d in devs}
        joined: dict[str, tuple[str, pb.Task]] = {}
        threads = [threading.Thread(target=lambda d=d: joined.__setitem__(
            d, join_and_wait(pbg.FederationStub(chans[d]), d))) for d in devs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        canon = [e.name for e in unique_tensors(base)]
        g = torch.Generator().manual_seed(1)
        noise = {k: torch.randn(base[k].shape, generator=g) for k in canon if base[k].is_floating_point()}
        norm = float(torch.sqrt(sum(n.double().pow(2).sum() for n in noise.values())))

        def plus(scale: float) -> dict[str, torch.Tensor]:
            offset = {k: base[k] for k in canon} if payload == "weights" else {k: 0.0 for k in canon}
            return {k: offset[k] + scale * noise[k] / norm if k in noise else base[k] for k in canon}

        updates = {"honest": plus(0.2), "nan": plus(0.2), "huge": plus(1000.0), "big": plus(5.0)}
        updates["nan"][canon[0]].view(-1)[3] = float("nan")
        codes = {}
        for d in ["nan", "huge", "big", "honest"]:
            sid, task = joined[d]
            try:
                _upload(chans[d], d, sid, task, updates[d], base, payload)
                codes[d] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                codes[d] = exc.code()
                assert "update refused" in exc.details()
        assert codes == {"nan": grpc.StatusCode.INVALID_ARGUMENT, "huge": grpc.StatusCode.INVALID_ARGUMENT,
                         "big": grpc.StatusCode.OK, "honest": grpc.StatusCode.OK}
        assert srv.wait(300), "the round did not complete with the valid updates"
        recs = {r["client"]: r for r in RoundLog(cfg.out / "rounds.jsonl").read()}
        assert {d: r["status"] for d, r in recs.items()} == {"honest": "aggregated", "nan": "refused",
                                                            "huge": "refused", "big": "aggregated"}
        assert "NaN or Inf" in recs["nan"]["reason"]
        assert "exceeds max_update_norm 100" in recs["huge"]["reason"]
        assert srv.coord.version != version
        # FedAvg of equal weights: honest's delta (norm 0.2) and big's delta clipped from 5.0 to 0.5.
        for k in noise:
            expected = base[k] + (0.2 + 0.5) / 2 * noise[k] / norm
            torch.testing.assert_close(srv.coord.state[k], expected, rtol=0, atol=1e-6, msg=k)
    finally:
        srv.close()


def _upload(ch: grpc.Channel, dev: str, sid: str, task: pb.Task, canonical: dict[str, torch.Tensor],
            like: dict[str, torch.Tensor], payload: str = "weights") -> pb.UploadReply:
    from fedclient.transfer import Limits, upload
    from fedcore.wire import TransferSpec, codec_name, encoding_name

    state = {}
    for e in unique_tensors(like):
        for n in (e.name, *e.aliases):
            state[n] = canonical[e.name]
    state = {k: state[k] for k in like}
    up = task.upload
    spec = TransferSpec(encoding_name(up.encoding), codec_name(up.codec), block_size=up.block_size,
                        chunk_elems=up.chunk_elems, payload=payload)
    hdr = pb.UploadHeader(device_id=dev, session_id=sid, task_id=task.task_id, round=task.round,
                          base_version=task.model_version, num_samples=10)

    def no_retry(_a: int) -> None:
        raise AssertionError("no retries expected")

    reply, _ = upload(pbg.FederationStub(ch), hdr, state, spec, Limits(retries=0, stall_s=120), no_retry)
    return reply


def test_status_command_dials_with_an_operator_certificate(tmp_path, capsys):
    fleet = Fleet(tmp_path / "pki")
    srv = start_server(tiny_server_config(tmp_path / "srv", fleet, round_deadline_s=3600))
    try:
        admin = fleet.admin_security()
        assert fedserver_main(["status", "--server", srv.address, "--tls-ca", str(admin.tls_ca),
                               "--tls-cert", str(admin.tls_cert), "--tls-key", str(admin.tls_key)]) == 0
        assert f"server {srv.address}" in capsys.readouterr().out
        # No certificate: refused before dialing, with what to pass.
        assert fedserver_main(["status", "--server", srv.address]) == 2
        assert "--insecure" in capsys.readouterr().err
        # Plaintext against a TLS server: no answer.
        assert fedserver_main(["status", "--server", srv.address, "--insecure", "--timeout", "5"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        srv.close()
