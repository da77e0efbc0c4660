"""10,000 bad inputs against a running server over mutual TLS: expected answers, an unchanged model, honest work goes on."""
from __future__ import annotations

import grpc
import pytest
import torch

from bench.fuzz import finish_round, fuzz_server_config, run_fuzz
from fedserver.storage import RoundLog

from fedhelpers import Fleet, start_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

C = grpc.StatusCode
# What the server may answer to each kind of bad input; anything else (UNKNOWN, INTERNAL, ...) is a bug.
EXPECTED = {
    # Random bytes rarely parse; when they do, the device_id in them is not the caller's.
    "random_bytes": {C.INVALID_ARGUMENT, C.PERMISSION_DENIED},
    # Mutations of valid requests: unparsable, or a field changed into something refused, or still valid (OK).
    "malformed_protobuf": {C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.OK},
    "wrong_ids": {C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.NOT_FOUND, C.INVALID_ARGUMENT},
    "oversized": {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED},
    "bad_checksum": {C.DATA_LOSS},
    "bad_chunk_fields": {C.INVALID_ARGUMENT},
    # The receiver takes chunks in any order; the upload stays incomplete and says where to resume.
    "out_of_order": {C.OK},
    "duplicate_chunks": {C.INVALID_ARGUMENT},
    "truncated_stream": {C.OK, C.INVALID_ARGUMENT},
    "random_stream": {C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.OK},
}


def test_fuzzing_a_running_server(tmp_path, capsys):
    fleet = Fleet(tmp_path / "pki")
    cfg = fuzz_server_config(tmp_path / "srv", fleet.server_settings())
    srv = start_server(cfg)
    try:
        report, ctx = run_fuzz(srv.address, fleet.security("fuzzer"), fleet.security("honest"), 10_000, seed=1,
                               digest=lambda: srv.coord.version, max_message_bytes=cfg.max_message_bytes)
        with capsys.disabled():
            print(f"\n{report.total} inputs in {report.seconds:.1f} s\n{report.render()}")
            print(f"digest before {report.digest_before}\ndigest after  {report.digest_after}")
        assert report.total >= 10_000
        for kind, codes in report.codes.items():
            got = {C[name] for name in codes}
            assert got <= EXPECTED[kind], f"{kind}: unexpected {got - EXPECTED[kind]}"
        assert set(report.inputs) == set(EXPECTED)
        # The bad inputs exercised the checks, not just the parser: every kind's main refusal was seen.
        assert report.codes["bad_checksum"]["DATA_LOSS"] == report.inputs["bad_checksum"]
        assert report.codes["oversized"]["RESOURCE_EXHAUSTED"] > 0
        assert report.codes["wrong_ids"]["NOT_FOUND"] > 0 and report.codes["wrong_ids"]["PERMISSION_DENIED"] > 0
        assert report.digest_after == report.digest_before
        assert report.honest_ok > 0 and report.honest_failed == []
        # Then the round completes: the fuzzer's NaN update is refused, the honest one is the new model.
        honest, code, details = finish_round(ctx)
        assert code == C.INVALID_ARGUMENT and "NaN" in details
        assert srv.wait(300), "round 1 did not complete after the fuzz"
        recs = {r["client"]: r["status"] for r in RoundLog(cfg.out / "rounds.jsonl").read()}
        assert recs == {"honest": "aggregated", "fuzzer": "refused"}
        for k, v in honest.items():
            torch.testing.assert_close(srv.coord.state[k], v, rtol=0, atol=1e-6, msg=k)
    finally:
        srv.close()
