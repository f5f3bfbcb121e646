"""The outside-client checks of scripts/ in small versions: load_test.py (tenants at once,
no errors, no crosstalk between their scores) and fuzz_server.py (malformed requests over
every method: no crash, no hang, no INTERNAL, the server unchanged afterwards). Each
script starts its own tiny-llama server as a subprocess and ends with one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, timeout: float = 150) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, (result.stdout[-2000:], result.stderr[-2000:])
    return json.loads(lines[0]), result.stderr


def test_two_tenants_under_load_see_no_errors_and_no_crosstalk():
    report, log = run_script("load_test.py", "--tenants", "2", "--seconds", "5", "--popsize", "4", "--samples", "8")
    assert report["errors"] == 0, (report["errors_by_code"], log[-3000:])
    assert report["crosstalk"] == 0, log[-3000:]
    assert report["crosstalk_checked"] >= 2
    assert all(tenant["requests"] > 0 for tenant in report["per_tenant"]), report["per_tenant"]
    assert report["calls_per_s"] > 0 and report["latency_ms_p99"] >= report["latency_ms_p50"] > 0
    assert report["rss_mb_before"] > 0 and report["rss_mb_peak"] >= report["rss_mb_before"]
    assert report["rss_mb_after"] > 0


def test_fuzzing_every_method_neither_crashes_hangs_nor_fails_internally():
    report, log = run_script("fuzz_server.py", "--requests", "300", "--seed", "0", "--max-seconds", "60")
    assert report["requests"] == 300, report.get("stopped_early")
    assert {"GetInfo", "CreateSession", "Evaluate", "CloseSession"} <= set(report["by_method"])
    assert report["crashes"] == 0, json.dumps(report["crash_examples"], indent=1)
    assert report["hangs"] == 0, json.dumps(report["hang_examples"], indent=1)
    assert report["alive_after"], report["alive_after_detail"]
    assert report["auth_failures"] == 0, json.dumps(report["auth_examples"], indent=1)
    assert report["internal"] == 0, json.dumps(report["internal_examples"], indent=1)


@pytest.mark.parametrize("script", ["load_test.py", "fuzz_server.py"])
def test_the_scripts_refuse_a_server_off_this_machine(script):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--server", "10.1.2.3:50051"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "loopback" in result.stderr
    assert result.stdout == ""
