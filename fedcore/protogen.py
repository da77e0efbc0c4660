"""Regenerate the gRPC Python code from protos/: ``python -m fedcore.protogen``.

The generated modules are checked in under ``fedtune/v1/`` so that an install
needs no code generation; tests/test_protogen.py regenerates into a temporary
directory and fails when the checked-in copy is stale.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTOS = ["fedtune/v1/fedtune.proto"]
GENERATED = ["fedtune/v1/fedtune_pb2.py", "fedtune/v1/fedtune_pb2.pyi", "fedtune/v1/fedtune_pb2_grpc.py"]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on PROTOS, writing under out_dir."""
    from grpc_tools import protoc  # imported late: only needed by developers

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out_dir / g for g in GENERATED]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            dest = args.out / path.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
