"""The checked-in gRPC code under fedtune/v1/ is exactly what protos/ generates."""
from __future__ import annotations

import difflib
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install -e .[dev]); "
                                         "cannot regenerate the gRPC code to compare")

from fedcore import protogen  # noqa: E402


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    generated = protogen.generate(tmp_path)
    assert generated, "protogen generated nothing"
    stale = []
    for path in generated:
        rel = path.relative_to(tmp_path)
        checked_in = protogen.ROOT / rel
        fresh = path.read_bytes()
        if not checked_in.exists():
            stale.append(f"{rel}: missing from the repository")
        elif checked_in.read_bytes() != fresh:
            diff = difflib.unified_diff(checked_in.read_text(errors="replace").splitlines(),
                                        fresh.decode(errors="replace").splitlines(),
                                        f"checked-in {rel}", f"generated {rel}", lineterm="", n=1)
            stale.append(f"{rel} differs:\n" + "\n".join(list(diff)[:20]))
    assert not stale, ("generated gRPC code is stale; run python -m fedcore.protogen\n" + "\n".join(stale))


def test_every_generated_file_is_listed() -> None:
    """protogen.GENERATED names every checked-in generated module, so none escapes the comparison."""
    on_disk = {str(p.relative_to(protogen.ROOT)) for p in (protogen.ROOT / "fedtune" / "v1").glob("*_pb2*")}
    assert on_disk == set(protogen.GENERATED), "run python -m fedcore.protogen"
