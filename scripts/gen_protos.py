"""Regenerates the committed gRPC code from protos/ (run after editing a .proto file).

    python scripts/gen_protos.py            # writes blackbox/v1/backbone_pb2*.py
    python scripts/gen_protos.py --out DIR  # writes under DIR instead (the staleness test)

The proto package `blackbox.v1` maps onto the Python package `blackbox.v1`, so the
generated imports (`from blackbox.v1 import backbone_pb2`) work without path tricks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = ["blackbox/v1/backbone.proto"]


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every proto file and returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        status = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ])
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {status})")
    return [
        out_dir / proto.replace(".proto", suffix)
        for proto in PROTO_FILES
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
