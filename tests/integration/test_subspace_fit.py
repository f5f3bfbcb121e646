"""`blackbox subspace fit` end to end on a tiny model: runs of some tasks -> a subspace file
-> a run on a held-out task through it; and a SAID run through `tune`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backbone_server.subspace import load_subspace
from blackbox.cli import main
from blackbox.runlog import RunDirError
from blackbox.subspace_fit import find_runs

TINY = ["--model", "tiny-llama", "--device", "cpu"]
FAST = ["--delta", "prompt", "--prompt-length", "2", "--placement", "after", "--budget", "12", "--popsize", "4",
        "--no-zero-shot", "--test-limit", "20", "--quiet"]


@pytest.fixture(scope="module")
def tuned_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for task, seed in (("rte", 13), ("mrpc", 13), ("mrpc", 21), ("sst2", 13)):
        assert main(["tune", *TINY, *FAST, "--task", task, "--seed", str(seed), "--dim", "6",
                     "--out", str(root / f"{task}-{seed}")]) == 0
    return root


def test_a_fitted_subspace_spans_the_runs_and_serves_a_held_out_task(tuned_runs, tmp_path, capsys):
    path = tmp_path / "sub.npz"
    assert main(["subspace", "fit", "--runs", str(tuned_runs), "--exclude-task", "sst2", "--out", str(path),
                 "--model", "tiny-llama"]) == 0
    assert "from 3 runs of mrpc, rte" in capsys.readouterr().out
    subspace = load_subspace(path)
    assert subspace.dim == 3 and subspace.delta_size == 2 * 64 and subspace.meta["tasks"] == ["mrpc", "rte"]
    np.testing.assert_allclose(subspace.basis @ subspace.basis.T, np.eye(3), atol=1e-5)  # orthonormal
    assert subspace.meta["explained_total"] == pytest.approx(1.0)  # 3 runs, 3 directions: all of them

    out = tmp_path / "held-out"
    assert main(["tune", *TINY, *FAST, "--task", "sst2", "--dim", "2", "--projection", "subspace:learned",
                 "--subspace", f"learned={path}", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["projection"] == "subspace:learned" and result["z_dim"] == 2 and result["delta_size"] == 128


def test_fitting_refuses_runs_of_different_deltas_and_empty_folders(tuned_runs, tmp_path, capsys):
    assert main(["tune", *TINY, *FAST, "--task", "rte", "--dim", "6", "--prompt-length", "3",
                 "--out", str(tmp_path / "longer")]) == 0
    assert main(["subspace", "fit", "--runs", str(tuned_runs / "rte-13"), str(tmp_path / "longer"), "--out",
                 str(tmp_path / "s.npz")]) == 2
    assert "the runs differ in prompt_length" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="no finished run"):
        find_runs([tmp_path / "longer"], exclude_tasks=["rte"])


def test_a_said_run_has_one_scale_per_layer_after_z(tmp_path):
    out = tmp_path / "said"
    assert main(["tune", *TINY, *FAST, "--task", "rte", "--dim", "4", "--said", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["said"] is True
    assert result["z_blocks"] == [{"name": "z", "size": 4}, {"name": "said_scales", "size": 1}]
    assert result["z_dim"] == 5
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "adapter")]) == 2  # said plainly, not half-done
    assert not (tmp_path / "adapter").exists()
