"""The `blackbox` command: an embedded server end to end, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blackbox.cli import main

TINY_RUN = ["tune", "--model", "tiny-llama", "--device", "cpu", "--task", "rte", "--budget", "8", "--popsize", "4",
            "--dim", "6", "--prompt-length", "2", "--placement", "after", "--truncate", "--quiet"]


def test_tune_with_an_embedded_server(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot test acc" in printed and str(out / "result.json") in printed
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "rte" and result["model"] == "tiny-llama" and result["api_calls"] == 8
    assert result["test_examples"] == 277

    # A finished run is never overwritten by accident.
    assert main(TINY_RUN + ["--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "result.json").read_text()) == result


def test_a_model_that_does_not_load_is_one_error_line_and_no_traceback(tmp_path):
    """The embedded server's loader thread logs real failures with their traceback; a
    user's mistake must reach the terminal as the CLI's one `error:` line alone."""
    import subprocess
    import sys

    command = ["tune", "--model", "no-such-model", "--quiet", "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", f"from blackbox.cli import main; raise SystemExit(main({command!r}))"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if not line.startswith("starting an embedded")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown model 'no-such-model'" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_test_limit_scores_a_stratified_subset(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--test-limit", "40"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["test_examples"] == 40 and result["test_limit"] == 40


@pytest.mark.parametrize("arguments, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--budget", "2"], "smaller than one generation"),
    (["--optimizer", "sgd-please"], "sgd-please"),
    (["--data-dir", "/nonexistent"], "BLACKBOX_DATA_DIR"),
    (["--delta", "adapterz"], "unknown delta kind 'adapterz'"),
    (["--delta", "lora", "--targets", "nope"], "match no Linear"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, arguments, message):
    assert main(TINY_RUN + ["--out", str(tmp_path / "run")] + arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "result.json").exists()


def test_resume_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    assert main(["tune", "--model", "tiny-llama", "--device", "cpu", "--quiet", "--out", str(out),
                 "--resume", "--budget", "16"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "rte" and result["api_calls"] == 16 and result["generations"] == 4
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert main(["tune", "--quiet", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_compare_writes_a_table_and_a_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    arguments = ["compare", "--model", "tiny-llama", "--device", "cpu", "--task", "rte", "--budget", "8",
                 "--popsize", "4", "--dim", "6", "--prompt-length", "2", "--placement", "after", "--truncate",
                 "--quiet", "--optimizers", "cma,mezo,ng:NGOpt,gradient", "--out", str(out)]
    assert main(arguments) == 0
    lines = (out / "compare.csv").read_text().splitlines()
    assert lines[0].startswith("optimizer,best_dev_acc,test_acc")
    assert [line.split(",")[0] for line in lines[1:]] == ["cma", "mezo", "ng:NGOpt", "gradient"]
    # One starting point, scored once for the calibrated gradient-free runs; the gradient
    # run cannot be calibrated and scores it plain.
    zero_shot = {line.split(",")[3] for line in lines[1:-1]}
    assert len(zero_shot) == 1
    results = {name: json.loads((out / folder / "result.json").read_text())
               for name, folder in (("cma", "cma"), ("gradient", "gradient"))}
    assert results["cma"]["calibrate"] is True and results["gradient"]["calibrate"] is False
    assert (out / "compare.png").stat().st_size > 1000 and (out / "ng-NGOpt" / "result.json").exists()
    assert "| cma |" in capsys.readouterr().out
    assert main(arguments) == 2  # never clobbers a finished comparison
    assert main(arguments[:-4] + ["--optimizers", "cma,gradient-please", "--out", str(tmp_path / "x")]) == 2
    assert "gradient-please" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("delta", [["--delta", "lora", "--lora-rank", "2"], ["--delta", "bias"],
                                   ["--delta", "adapter", "--adapter-size", "4"]])
def test_weight_deltas_tune_end_to_end(tmp_path, delta):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)] + delta) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["delta"] == delta[1] and result["prompt_length"] == 0 and result["api_calls"] == 8
    assert not result["prefix_reuse"]  # the delta changes the text's keys and values too


def test_prefix_tunes_end_to_end_layer_by_layer_and_exports(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--delta", "prefix"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["delta"] == "prefix" and result["prompt_length"] == 2 and result["prefix_reuse"]
    layered = tmp_path / "layered"
    before = [a if a != "after" else "before" for a in TINY_RUN]
    assert main(before + ["--out", str(layered), "--delta", "prefix", "--strategy", "divide-and-conquer"]) == 0
    assert json.loads((layered / "result.json").read_text())["z_blocks"] == [
        {"name": f"layer{l}", "size": 6} for l in range(2)]
    assert main(["export", "--run", str(layered), "--out", str(tmp_path / "adapter"), "--model", "tiny-llama"]) == 0
    manifest = json.loads((tmp_path / "adapter" / "blackbox_export.json").read_text())
    assert manifest["peft_type"] == "PREFIX_TUNING" and manifest["reproduces_engine"]
    # Calibrated (tune's default): the offsets travel in the manifest, with a word on them.
    bias = json.loads((layered / "result.json").read_text())["label_bias"]
    assert manifest["label_bias"] == bias and len(bias) == 2
    assert any("label_bias[c]" in warning for warning in manifest["warnings"])


def test_exporting_a_prompt_after_the_text_says_why_peft_differs(tmp_path, capsys):
    """TINY_RUN puts the prompt after the text: no PEFT prompt reproduces it, and the hint
    says so instead of suggesting --fold-prefix; a prompt before the text is exact."""
    for placement in ("after", "before"):
        run, adapter = tmp_path / placement, tmp_path / f"{placement}-adapter"
        tune = [a if a != "after" else placement for a in TINY_RUN]
        assert main(tune + ["--out", str(run), "--delta", "prompt"]) == 0
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--out", str(adapter), "--model", "tiny-llama"]) == 0
        printed = capsys.readouterr()
        manifest = json.loads((adapter / "blackbox_export.json").read_text())
        if placement == "after":
            assert not manifest["reproduces_engine"] and "after the text" in manifest["why_not_reproduced"]
            assert "warning: loaded as how_to_load says, this export does not reproduce" in printed.err
            assert "after the text" in printed.err and "fold-prefix" not in printed.err + printed.out
        else:
            assert manifest["reproduces_engine"] and manifest["prompt"]["folded_prefix"]
            assert "does not reproduce" not in printed.err


def test_deep_prompt_tunes_end_to_end_with_prefix_reuse(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--delta", "deep-prompt"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["delta"] == "deep-prompt" and result["prompt_length"] == 2 and result["prefix_reuse"]


@pytest.mark.parametrize("arguments, kind, prompt_length", [
    (["--delta", "prompt+lora"], "prompt+lora", 2),
    (["--delta", "lora+adapter", "--mix", "unipelt", "--dim", "12"], "unipelt:lora+adapter", 0),
    (["--delta", "adapter", "--mix", "adamix", "--adamix-copies", "2"], "adamix2:adapter", 0),
])
def test_combined_and_mixed_deltas_tune_end_to_end(tmp_path, arguments, kind, prompt_length):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)] + arguments) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["delta"] == kind and result["prompt_length"] == prompt_length


def test_adamix_reports_routed_and_merged_scores(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--delta", "lora", "--mix", "adamix", "--adamix-copies", "3"]) == 0
    result = json.loads((out / "result.json").read_text())
    scores = result["adamix"]
    assert set(scores) == {"train_acc_routed", "train_acc_merged", "test_acc_routed", "test_acc_merged"}
    assert scores["test_acc_merged"] == result["test_acc"]
    assert all(0.0 <= value <= 1.0 for value in scores.values())


def test_a_mix_of_unknown_parts_is_a_clear_error(tmp_path, capsys):
    assert main(TINY_RUN + ["--out", str(tmp_path / "run"), "--delta", "lora+nope", "--mix", "unipelt"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_divide_and_conquer_tunes_a_deep_prompt_layer_by_layer(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--delta", "deep-prompt", "--strategy", "divide-and-conquer",
                            "--turn-generations", "1", "--budget", "16"]) == 0
    result = json.loads((out / "result.json").read_text())
    layers = 2  # tiny-llama
    assert result["strategy"] == "divide-and-conquer" and result["z_dim"] == 6 * layers
    assert result["z_blocks"] == [{"name": f"layer{l}", "size": 6} for l in range(layers)]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["block"] for record in log] == ["layer0", "layer1"] * 2
    assert np.load(out / "best_z.npy").shape == (6 * layers,)
    # Resumed, the turns go on where they stopped.
    assert main(["tune", "--model", "tiny-llama", "--device", "cpu", "--quiet", "--out", str(out),
                 "--resume", "--budget", "24"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["block"] for record in log] == ["layer0", "layer1"] * 3
    # The per-layer z exports like any deep prompt.
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "adapter"), "--model", "tiny-llama"]) == 0
    manifest = json.loads((tmp_path / "adapter" / "blackbox_export.json").read_text())
    assert manifest["z_dim"] == 6 * layers


def test_divide_and_conquer_over_the_parts_of_a_combination(tmp_path):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--delta", "prompt+lora", "--strategy", "divide-and-conquer",
                            "--turn-generations", "2", "--budget", "16"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["block"] for record in log] == ["prompt", "prompt", "lora", "lora"]


def test_declared_part_dims_reach_the_server(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out), "--delta", "prompt+lora", "--part-dims", "4,2"]) == 0
    assert json.loads((out / "result.json").read_text())["z_blocks"] == [{"name": "prompt", "size": 4},
                                                                         {"name": "lora", "size": 2}]
    assert main(TINY_RUN + ["--out", str(tmp_path / "bad"), "--delta", "prompt+lora", "--part-dims", "4,4"]) == 2
    assert "summing to intrinsic_dim 6" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(TINY_RUN + ["--out", str(tmp_path / "bad"), "--delta", "lora", "--part-dims", "6"]) == 2
    assert "parts of a combination" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--delta", "lora", "--strategy", "divide-and-conquer"], "needs z in several blocks"),
    (["--delta", "deep-prompt", "--strategy", "divide-and-conquer", "--optimizer", "gradient"],
     "population-based method per block"),
    (["--delta", "deep-prompt", "--strategy", "divide-and-conquer", "--turn-generations", "0"],
     "turn-generations must be >= 1"),
])
def test_divide_and_conquer_refuses_what_it_cannot_split(tmp_path, capsys, arguments, message):
    assert main(TINY_RUN + ["--out", str(tmp_path / "run")] + arguments) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
