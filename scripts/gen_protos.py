"""Regenerate the gRPC stubs in src/unmask/v1 from proto/unmask/v1/unmask.proto.

    python scripts/gen_protos.py            # writes src/unmask/v1/unmask_pb2{,_grpc}.py{,i}
    python scripts/gen_protos.py --out DIR  # writes DIR/unmask/v1/... (the staleness test)

Reproducible: the output depends only on the .proto file and the grpcio-tools version, which the
dev extra pins exactly (`grpcio-tools==` in pyproject.toml). The script refuses to run with
another version, so two machines never disagree about what "up to date" means.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PROTOS = ("unmask/v1/unmask.proto",)
GENERATED = ("unmask_pb2.py", "unmask_pb2.pyi", "unmask_pb2_grpc.py")  # in <out>/unmask/v1/


def pinned_tools_version() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'"grpcio-tools==([^"]+)"', text)
    if m:
        return m.group(1)
    raise SystemExit("pyproject.toml does not pin grpcio-tools exactly (grpcio-tools==X.Y.Z)")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency; the runtime never needs it

    installed = metadata.version("grpcio-tools")
    pinned = pinned_tools_version()
    if installed != pinned:
        raise SystemExit(f"grpcio-tools {installed} installed, {pinned} pinned: install the pin")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    # protoc resolves the .proto paths against -I; run from the proto root so they match.
    cwd = os.getcwd()
    os.chdir(PROTO_ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    return [out / "unmask" / "v1" / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "src", help="output root (default: src)")
    args = p.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
