"""The committed gRPC stubs are exactly what scripts/gen_protos.py makes from the .proto file."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

GENERATED = ("unmask_pb2.py", "unmask_pb2.pyi", "unmask_pb2_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    for name in GENERATED:
        fresh = (tmp_path / "unmask" / "v1" / name).read_text(encoding="utf-8")
        committed = (REPO / "src" / "unmask" / "v1" / name).read_text(encoding="utf-8")
        assert fresh == committed, (
            f"src/unmask/v1/{name} is stale: run `python scripts/gen_protos.py` and commit it"
        )


def test_stubs_import_without_torch():
    probe = "import sys, unmask.v1.unmask_pb2_grpc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
