"""The tenant benchmark runs and ends with its one JSON line (its figures are not asserted:
speed is measured by the script, never by a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_bench_tenants_prints_its_json_line():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_tenants.py"), "--model", "tiny-roberta",
                             "--tenants", "2", "--popsize", "2", "--seconds", "1", "--delta", "lora"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"merged_vs_serial", "rows_per_forward", "p99_ms"} <= set(report)
    assert report["merged"]["generations_per_s"] > 0 and report["serial"]["merged_chunks"] == 0


def test_bench_tenants_measures_generate_streams_too():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_tenants.py"), "--model", "tiny-llama",
                             "--tenants", "2", "--popsize", "2", "--seconds", "1", "--workload", "generate",
                             "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["workload"] == "generate" and report["merged"]["new_tokens_per_s"] > 0
    assert report["serial"]["merged_chunks"] == 0


def test_bench_forward_sizes_prints_its_curve():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_forward_sizes.py"), "--model", "tiny-llama",
                             "--reps", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["curve"]) == 8 and report["knee_tokens"] in [point["tokens"] for point in report["curve"]]
