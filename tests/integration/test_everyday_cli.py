"""The frictions of a user's first hour with `blackbox`: waiting on a dead address, slow
test passes, texts too long, resuming with other flags, options the CLI did not reach,
checks done late. Each test fails on the tree before these fixes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blackbox.cli import build_parser, main
from blackbox.tasks import resolve_data_dir
from tests.integration.test_cli import TINY_RUN

EMBEDDED_STARTS = "starting an embedded backbone server"


def _run(tmp_path: Path, *extra: str, name: str = "run") -> tuple[int, Path]:
    out = tmp_path / name
    return main(TINY_RUN + ["--out", str(out), *extra]), out


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ a server that is not there

def test_a_server_that_does_not_answer_is_one_error_within_the_timeout(tmp_path, capsys):
    import time

    started = time.monotonic()
    code = main(["tune", "--server", "127.0.0.1:9", "--timeout", "1.5", "--quiet", "--out", str(tmp_path / "run")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 15
    assert "connecting to the backbone at 127.0.0.1:9" in err and "waiting: no answer yet" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "127.0.0.1:9" in errors[0] and "--timeout" in errors[0]
    assert not (tmp_path / "run").exists()


def test_info_waits_with_the_same_timeout(capsys):
    assert main(["info", "--server", "127.0.0.1:9", "--timeout", "1"]) == 2
    assert "error: no backbone server ready at 127.0.0.1:9 after 1 s" in capsys.readouterr().err


def test_options_of_the_embedded_server_are_refused_with_a_server(tmp_path, capsys):
    for option in (["--model", "tiny-llama"], ["--device-map", "auto"], ["--dtype", "float32"]):
        assert main(["tune", "--server", "127.0.0.1:9", *option, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"{option[0]} sets up the embedded server" in err and "connecting" not in err
    assert main(TINY_RUN + ["--timeout", "5", "--out", str(tmp_path / "run")]) == 2
    assert "--timeout bounds the wait for --server" in capsys.readouterr().err


# ---------------------------------------------------------------------------- phases and time

def test_quiet_runs_still_say_each_phase(tmp_path, capsys):
    code, out = _run(tmp_path)
    assert code == 0
    err = capsys.readouterr().err
    for phase in ("zero-shot test: 277 test examples", "search (cma): up to 2 generations of 4 API calls",
                  "search stopped by budget after 2 generations", "test (best z): 277 test examples",
                  "test (best z): done in"):
        assert phase in err, phase


def test_no_zero_shot_skips_the_first_test_pass(tmp_path, capsys):
    code, out = _run(tmp_path, "--no-zero-shot", "--test-limit", "30")
    assert code == 0
    err, printed = capsys.readouterr()[::-1]
    assert "zero-shot test:" not in err and "test (best z): 30 test examples" in err
    result = _result(out)
    assert result["zero_shot_test_acc"] is None and result["test_examples"] == 30
    assert "zero-shot test acc not scored" in printed


# ---------------------------------------------------------------------------- texts too long

def _data_with_a_long_test_text(tmp_path: Path, words: int) -> Path:
    """A copy of the RTE seed-13 files whose first test premise is `words` words long."""
    source = resolve_data_dir() / "RTE"
    target = tmp_path / "data" / "RTE"
    (target / "16-13").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (target / "16-13" / name).write_text((source / "16-13" / name).read_text())
    header, first, *rest = (source / "test.tsv").read_text().splitlines()
    fields = first.split("\t")
    fields[1] = " ".join(["lengthy"] * words)
    (target / "test.tsv").write_text("\n".join([header, "\t".join(fields), *rest]) + "\n")
    return tmp_path / "data"


def test_a_text_too_long_names_the_flag_the_split_and_the_example(tmp_path, capsys):
    from backbone_server.tiny import MAX_LENGTH

    data = _data_with_a_long_test_text(tmp_path, MAX_LENGTH + 50)
    run = [a for a in TINY_RUN if a != "--truncate"]
    assert main(run + ["--data-dir", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "split 'test', example 0 (\"lengthy lengthy" in err and "pass --truncate" in err
    assert main(run + ["--data-dir", str(data), "--out", str(tmp_path / "run"), "--truncate"]) == 0


# ------------------------------------------------------------------------------------ resume

def test_resume_refuses_changed_settings_with_the_list_of_differences(tmp_path, capsys):
    code, out = _run(tmp_path)
    assert code == 0
    before = _result(out)
    capsys.readouterr()
    assert main(["tune", "--out", str(out), "--resume", "--delta", "lora", "--popsize", "8", "--budget", "16"]) == 2
    err = capsys.readouterr().err
    assert "popsize 4 -> 8" in err and "delta 'prefix' -> 'lora'" in err and EMBEDDED_STARTS not in err
    assert _result(out) == before  # nothing lost


def test_resume_refuses_a_budget_below_the_calls_spent_or_one_with_nothing_left(tmp_path, capsys):
    code, out = _run(tmp_path)
    assert code == 0
    before = _result(out)
    capsys.readouterr()
    assert main(["tune", "--out", str(out), "--resume", "--budget", "4"]) == 2
    assert "below the 8 API calls" in capsys.readouterr().err
    assert main(["tune", "--out", str(out), "--resume"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert _result(out) == before


def test_resume_takes_new_limits_and_the_runs_own_model(tmp_path, capsys):
    code, out = _run(tmp_path)
    assert code == 0
    # No --model: the embedded server loads the run's (tiny-llama), not the default.
    assert main(["tune", "--out", str(out), "--resume", "--budget", "16", "--patience", "9", "--quiet"]) == 0
    assert "starting an embedded backbone server with tiny-llama" in capsys.readouterr().err
    result = _result(out)
    assert result["api_calls"] == 16 and result["model"] == "tiny-llama"
    # The same value as the run's own is no change.
    assert main(["tune", "--out", str(out), "--resume", "--budget", "24", "--popsize", "4", "--quiet"]) == 0


# ------------------------------------------------------------------------- optimizer options

def test_optimizer_options_reach_the_optimizer(tmp_path):
    code, out = _run(tmp_path, "--optimizer", "mezo", "--optimizer-option", "lr=0.5",
                     "--optimizer-option", "eps=0.01")
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer_options"] == {"lr": 0.5, "eps": 0.01}
    code, other = _run(tmp_path, "--optimizer", "mezo", "--optimizer-option", "lr=0.05",
                       "--optimizer-option", "eps=0.01", name="other")
    assert code == 0
    assert [r["train_loss"] for r in _log(out)][1] != [r["train_loss"] for r in _log(other)][1]


@pytest.mark.parametrize("option, message", [
    (["--optimizer", "mezo", "--optimizer-option", "lrr=3"], "did you mean: 'lrr' -> 'lr'"),
    (["--optimizer", "mezo", "--optimizer-option", "lr=-1"], "mezo option 'lr'"),
    (["--optimizer-option", "CMA_active=Flase"], "pycma cannot read the option value(s) \"Flase\""),
    (["--optimizer-option", "CMA_diagonal"], "takes KEY=VALUE"),
])
def test_bad_optimizer_options_are_refused_before_the_model_loads(tmp_path, capsys, option, message):
    assert main(["tune", "--quiet", "--out", str(tmp_path / "run"), *option]) == 2
    err = capsys.readouterr().err
    assert message in err and EMBEDDED_STARTS not in err


def test_cma_options_change_the_search(tmp_path):
    code, plain = _run(tmp_path, "--budget", "16", name="plain")
    code_diag, diagonal = _run(tmp_path, "--budget", "16", "--optimizer-option", "CMA_diagonal=True",
                               "--optimizer-option", "CMA_active=False", name="diagonal")
    assert code == code_diag == 0
    assert [r["train_loss"] for r in _log(plain)][2:] != [r["train_loss"] for r in _log(diagonal)][2:]


def test_optimizers_lists_each_optimizers_options(capsys):
    assert main(["optimizers"]) == 0
    printed = capsys.readouterr().out
    assert "mezo:" in printed and "    lr = " in printed and "CMA_active" in printed and "method = 'adam'" in printed
    sep_cma = printed.split("sep-cma:")[1].split("\n", 1)[1].split(":\n")[0]
    assert "CMA_diagonal" not in sep_cma.split("ng:")[0]  # sep-cma fixes it


# ------------------------------------------------------------------------------- help, checks

def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--popsize POPSIZE candidates per generation" in text and "(default: 20)" in text
    assert "(default: cma)" in text and "(default: 30.0)" in text


@pytest.mark.parametrize("arguments, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--seed", "7"], "seeds with k=16: 13, 21, 42"),
    (["--optimizer", "nope"], "unknown optimizer 'nope'"),
])
def test_mistakes_are_found_before_the_model_loads(tmp_path, capsys, arguments, message):
    """The default model takes seconds to load: none of these may wait for it."""
    assert main(["tune", "--quiet", "--out", str(tmp_path / "run"), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and EMBEDDED_STARTS not in err


def test_a_reader_that_stops_early_is_no_error():
    """`blackbox info ... | head`: the pipe's reader is gone before the output is written."""
    script = ("import os; read, write = os.pipe(); os.close(read); os.dup2(write, 1); "
              "from blackbox.cli import main; raise SystemExit(main(['optimizers']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "BrokenPipe" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------- seeds

def test_search_seed_varies_the_search_on_one_split(tmp_path):
    code, default = _run(tmp_path, name="default")
    code_same, same = _run(tmp_path, "--search-seed", "13", name="same")
    code_other, other = _run(tmp_path, "--search-seed", "99", name="other")
    assert code == code_same == code_other == 0
    losses = {name: [r["train_loss"] for r in _log(out)] for name, out in
              (("default", default), ("same", same), ("other", other))}
    assert losses["default"] == losses["same"] != losses["other"]
    # The k-shot split stays the seed's: the same examples, drawn once.
    assert _result(default)["seed"] == _result(other)["seed"] == 13 and _result(other)["search_seed"] == 99
    assert json.loads((other / "config.json").read_text())["search_seed"] == 99


def test_budget_zero_scores_the_starting_point_alone(tmp_path):
    code, out = _run(tmp_path, "--budget", "0", "--delta", "bias")
    assert code == 0
    result = _result(out)
    assert result["api_calls"] == 0 and result["generations"] == 0 and result["stop_reason"] == "budget"
    assert result["test_acc"] == result["zero_shot_test_acc"]


# ------------------------------------------------------------------------ demonstrations

def test_demonstrations_go_into_the_template_and_out_of_the_train_split(tmp_path):
    from blackbox.tune_config import TuneConfig
    from blackbox.tuner import load_run_data

    code, out = _run(tmp_path, "--demonstrations", "1")
    assert code == 0 and _result(out)["demonstrations"] == 1
    template = json.loads((out / "config.json").read_text())["template"]
    data = load_run_data(TuneConfig(task="rte", demonstrations=1))
    plain = load_run_data(TuneConfig(task="rte"))
    assert sorted(e.label for e in data.demonstrations) == [0, 1]
    assert len(data.splits["train"]) == len(plain.splits["train"]) - 2
    assert not set(data.demonstrations) & set(data.splits["train"])
    for example in data.demonstrations:
        assert f"{example.text_b} True? Yes or No?\nAnswer: {('Yes', 'No')[example.label]}\n\n" in template
    assert template.endswith("Question: {text_b}{prompt} True? Yes or No?\nAnswer: {mask}")


def test_more_demonstrations_than_train_examples_are_refused_before_the_model_loads(tmp_path, capsys):
    assert main(["tune", "--quiet", "--out", str(tmp_path / "run"), "--demonstrations", "16"]) == 2
    err = capsys.readouterr().err
    assert "16 demonstration(s) per class need more than 16" in err and EMBEDDED_STARTS not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- calibration

def test_a_calibrated_run_scores_test_with_the_offsets_it_keeps(tmp_path):
    """Recomputed from the server's own logits of the best z: the result's test accuracy
    is that of the logits shifted by the result's label_bias."""
    import dataclasses

    import numpy as np

    from blackbox.calibration import score_with_bias
    from blackbox.client import BackboneClient
    from blackbox.embedded import embedded_server
    from blackbox.tune_config import TuneConfig, delta_spec
    from blackbox.tuner import load_run_data

    code, out = _run(tmp_path, "--calibrate", "--budget", "12")
    assert code == 0
    result = _result(out)
    bias = np.array(result["label_bias"])
    assert result["calibrate"] is True and bias.shape == (2,) and abs(bias.sum()) < 1e-6
    stored = json.loads((out / "config.json").read_text())
    config = TuneConfig(**{f.name: stored[f.name] for f in dataclasses.fields(TuneConfig)})
    data = load_run_data(config)
    with embedded_server("tiny-llama", device="cpu") as address, BackboneClient(address) as client:
        spec = delta_spec(config, client.get_info().kinds)
        session = client.create_session(data.splits, stored["template"], data.task.verbalizer, spec, truncate=True)
        best_z = np.load(out / "best_z.npy")
        logits = session.evaluate("test", best_z[None, :], return_logits=True).logits
    labels = np.array([e.label for e in data.splits["test"]])
    _, accuracy = score_with_bias(logits, labels, bias[None, :])
    assert result["test_acc"] == pytest.approx(float(accuracy[0]), abs=1e-9)


@pytest.mark.parametrize("arguments, message", [
    (["--loss", "hinge"], "does not go with --loss hinge"),
    (["--optimizer", "gradient"], "cannot follow its gradients"),
])
def test_calibration_refuses_what_it_cannot_serve(tmp_path, capsys, arguments, message):
    assert main(["tune", "--quiet", "--out", str(tmp_path / "run"), "--calibrate", *arguments]) == 2
    assert message in capsys.readouterr().err


# -------------------------------------------------------------------------------- recipes

def _config_of(argv: list[str]):
    from blackbox.cli import _config_from_args, _given_options

    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = _given_options(parser, argv, args)
    return _config_from_args(args, args.optimizer)


def test_the_default_recipe_is_the_suites_and_bbt_is_one_flag_away():
    ours = _config_of(["tune"])
    assert (ours.delta, ours.placement, ours.dim, ours.prompt_length, ours.prompt_init) == (
        "prefix", "tail", 100, 10, "labels")
    assert ours.calibrated and ours.calibrate is None
    bbt = _config_of(["tune", "--recipe", "bbt"])
    assert (bbt.delta, bbt.placement, bbt.dim, bbt.prompt_length, bbt.prompt_init, bbt.calibrated) == (
        "prompt", "before", 500, 50, "random", False)
    assert bbt.budget == 8000 and bbt.popsize == 20
    typed = _config_of(["tune", "--recipe", "bbt", "--dim", "20", "--calibrate"])
    assert typed.dim == 20 and typed.calibrated and typed.delta == "prompt"
    assert not _config_of(["tune", "--optimizer", "gradient"]).calibrated


# ------------------------------------------------------------------------------- ensembles

def test_an_ensemble_scores_test_with_its_members_probabilities_averaged(tmp_path):
    """Recomputed from the server's logits of the stored members: the result's test
    accuracy is that of their calibrated class probabilities averaged."""
    import dataclasses

    import numpy as np

    from blackbox.client import BackboneClient
    from blackbox.embedded import embedded_server
    from blackbox.tune_config import TuneConfig, delta_spec
    from blackbox.tuner import load_run_data

    code, out = _run(tmp_path, "--ensemble", "3", "--budget", "16")
    assert code == 0
    result = _result(out)
    ensemble = result["ensemble"]
    assert ensemble["members"] == 3 and ensemble["member_dev_acc"] == sorted(ensemble["member_dev_acc"], reverse=True)
    members = np.load(out / ensemble["z_file"])
    assert members.shape == (3, 6) and np.array_equal(members[0], np.load(out / "best_z.npy"))
    stored = json.loads((out / "config.json").read_text())
    config = TuneConfig(**{f.name: stored[f.name] for f in dataclasses.fields(TuneConfig)})
    data = load_run_data(config)
    with embedded_server("tiny-llama", device="cpu") as address, BackboneClient(address) as client:
        spec = delta_spec(config, client.get_info().kinds, stored["init_text"])
        session = client.create_session(data.splits, stored["template"], data.task.verbalizer, spec, truncate=True)
        logits = session.evaluate("test", members, return_logits=True).logits.astype(np.float64)
    logits += np.array(ensemble["member_label_bias"])[:, None, :]
    probabilities = np.exp(logits - logits.max(axis=2, keepdims=True))
    probabilities /= probabilities.sum(axis=2, keepdims=True)
    labels = np.array([e.label for e in data.splits["test"]])
    expected = float((probabilities.sum(axis=0).argmax(axis=1) == labels).mean())
    assert result["test_acc"] == pytest.approx(expected, abs=1e-9)


def test_the_ensemble_keeps_the_best_members_on_dev():
    import numpy as np

    from blackbox.tuner import RunState, keep_leader

    state = RunState(config={}, model="m", optimizer=b"", zero_shot={}, best_z=np.zeros(2), best_dev_acc=0,
                     best_dev_loss=0)
    for number, (acc, loss) in enumerate([(0.5, 1.0), (0.7, 0.9), (0.7, 0.8), (0.5, 0.5), (0.7, 0.8)]):
        keep_leader(state, np.full(2, number), None, acc, loss, size=3)
    assert [int(member["z"][0]) for member in state.leaders] == [2, 4, 1]
