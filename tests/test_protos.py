"""The committed gRPC code matches protos/ (regenerate with scripts/gen_protos.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is a dev dependency")
def test_generated_code_is_up_to_date(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_protos import generate
    finally:
        sys.path.pop(0)
    for fresh in generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run scripts/gen_protos.py"
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run scripts/gen_protos.py"


def test_client_imports_without_torch():
    import subprocess

    code = ("import sys, blackbox.client, blackbox.tuner, blackbox.cli, blackbox.export, blackbox.v1.delta_spec; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
