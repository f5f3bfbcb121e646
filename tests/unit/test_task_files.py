"""Tasks of the user's own from a JSON task file: every layout and format, the errors (each
naming the file, the line and the field), `blackbox tasks --check`, and a run on one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from blackbox.cli import main
from blackbox.tasks import Example, FileTask, Task, TaskError, describe_task_file, task_from_file
from blackbox.tune_config import TuneConfig
from blackbox.tuner import load_run_data

SENTIMENT = {"labels": ["neg", "pos"], "verbalizer": ["bad", "great"], "template": "{text_a} It was {mask} ."}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def task_file(at: Path, **spec) -> Path:
    """task.json with one key per line (so that each field has its own line)."""
    return write(at, "task.json", json.dumps({"name": "mine", **spec}, indent=1))


def line_of(path: Path, key: str) -> int:
    return next(no for no, line in enumerate(path.read_text().splitlines(), start=1) if f'"{key}":' in line)


def lm_bff_csv(folder: Path, rows: dict[str, list[tuple[int, str]]]) -> None:
    """LM-BFF's k-shot CSV layout: label,text and no header line."""
    for split, examples in rows.items():
        write(folder, f"{split}.csv", "".join(f'{label},"{text}"\n' for label, text in examples))


LM_BFF_ROWS = {
    "train": [(0, "flat , dull and long"), (1, "a joy , from start to finish")],
    "dev": [(1, "warm and funny"), (0, "tedious")],
    "test": [(0, "a mess"), (1, "lovely"), (1, "sharp, witty and kind")],
}


# ---- formats and layouts ---------------------------------------------------------------


def test_csv_with_a_header(tmp_path):
    for split in ("train", "dev", "test"):
        write(tmp_path / "data", f"{split}.csv", 'stars,review\npos,"Great, really ""great"" food"\nneg,meh\n')
    path = task_file(tmp_path, format="csv", columns={"label": "stars", "text_a": "review"},
                     train="data/train.csv", dev="data/dev.csv", test="data/test.csv", **SENTIMENT)
    task = task_from_file(path)
    assert isinstance(task, Task) and isinstance(task, FileTask)
    assert (task.name, task.labels, task.verbalizer, task.is_pair) == ("mine", ("neg", "pos"), ("bad", "great"), False)
    assert task.template_for("masked") == "{text_a} It was {mask} ."
    assert task.template_for("causal") == "{text_a} It was {mask}"  # a causal template ends with the label word
    several = task_from_file(task_file(tmp_path, format="csv", columns={"label": "stars", "text_a": "review"},
                                       train="data/train.csv", dev="data/dev.csv", test="data/test.csv",
                                       **{**SENTIMENT, "verbalizer": [["bad", "awful"], "great|good"]}))
    assert several.verbalizer == ("bad|awful", "great|good")  # a list or "|": several words for one label
    splits = task.read_splits()
    assert splits["train"] == [Example('Great, really "great" food', None, 1), Example("meh", None, 0)]
    assert splits["dev"] == splits["test"] == splits["train"]
    assert "the k-shot seed does not pick them" in task.test_note and str(tmp_path / "data" / "test.csv") in task.test_note


def test_lm_bff_csv_without_a_header(tmp_path):
    lm_bff_csv(tmp_path, LM_BFF_ROWS)
    path = task_file(tmp_path, format="csv", header=False, columns={"label": 0, "text_a": 1}, train="train.csv",
                     dev="dev.csv", test="test.csv", labels=["0", "1"], verbalizer=["bad", "great"],
                     template="{text_a} It was {mask} .")
    splits = task_from_file(path).read_splits()
    assert splits["train"] == [Example("flat , dull and long", None, 0), Example("a joy , from start to finish", None, 1)]
    assert [e.label for e in splits["test"]] == [0, 1, 1] and splits["test"][2].text_a == "sharp, witty and kind"


def test_labels_are_the_values_of_the_data_not_ids(tmp_path):
    # LM-BFF's Yelp polarity labels are 1 and 2: "1" is the first class, not id 1.
    lm_bff_csv(tmp_path, {split: [(1, "awful"), (2, "fine")] for split in ("train", "dev", "test")})
    path = task_file(tmp_path, header=False, columns={"label": "0", "text_a": "1"}, train="train.csv",
                     dev="dev.csv", test="test.csv", **{**SENTIMENT, "labels": [1, 2]})
    task = task_from_file(path)
    assert task.data_format == "csv"  # from the files' suffix
    assert [e.label for e in task.read_splits()["train"]] == [0, 1]


def test_tsv_pairs_with_and_without_a_header(tmp_path):
    pair = {"labels": ["entailment", "not_entailment"], "verbalizer": ["Yes", "No"],
            "templates": {"masked": "{text_a} ? {mask} , {text_b}", "causal": "{text_a}\nQuestion: {text_b} True?\n"
                                                                             "Answer: {mask}"}}
    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.tsv", 'id\tpremise\thypothesis\tlabel\n7\t"A" man sleeps .\tA man rests .\tentailment\n'
                                        '8\tA dog .\tA cat .\tnot_entailment\n')
    path = task_file(tmp_path, format="tsv", columns={"label": "label", "text_a": "premise", "text_b": "hypothesis"},
                     train="train.tsv", dev="dev.tsv", test="test.tsv", **pair)
    task = task_from_file(path)
    assert task.is_pair and task.template_for("masked") == "{text_a} ? {mask} , {text_b}"
    assert task.read_splits()["dev"] == [Example('"A" man sleeps .', "A man rests .", 0), Example("A dog .", "A cat .", 1)]

    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.tsv", "A man sleeps .\tA man rests .\tentailment\n")
    path = task_file(tmp_path, format="tsv", header=False, columns={"label": 2, "text_a": 0, "text_b": 1},
                     train="train.tsv", dev="dev.tsv", test="test.tsv", **pair)
    assert task_from_file(path).read_splits()["test"] == [Example("A man sleeps .", "A man rests .", 0)]


def test_jsonl_objects_and_arrays(tmp_path):
    write(tmp_path, "train.jsonl", '{"t": "good", "y": 1}\n\n{"t": "bad", "y": 0}\n')
    write(tmp_path, "dev.jsonl", '{"t": "fine", "y": 1}\n')
    write(tmp_path, "test.jsonl", '{"t": "poor", "y": 0, "extra": [1, 2]}\n')
    path = task_file(tmp_path, format="jsonl", columns={"label": "y", "text_a": "t"}, train="train.jsonl",
                     dev="dev.jsonl", test="test.jsonl", **{**SENTIMENT, "labels": [0, 1]})
    splits = task_from_file(path).read_splits()
    assert splits["train"] == [Example("good", None, 1), Example("bad", None, 0)]
    assert splits["test"] == [Example("poor", None, 0)]
    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.jsonl", '["pos", "good"]\n')
    path = task_file(tmp_path, format="jsonl", header=False, columns={"label": 0, "text_a": 1}, train="train.jsonl",
                     dev="dev.jsonl", test="test.jsonl", **SENTIMENT)
    assert task_from_file(path).read_splits()["dev"] == [Example("good", None, 1)]


def test_one_file_with_a_split_column(tmp_path):
    write(tmp_path, "all.csv", "text,label,split\ngood,pos,train\nbad,neg,train\nok,pos,dev\nawful,neg,test\n"
                               "nice,pos,test\n")
    path = task_file(tmp_path, file="all.csv", split_column="split", columns={"label": "label", "text_a": "text"},
                     **SENTIMENT)
    task = task_from_file(path)
    splits = task.read_splits()
    assert {split: len(examples) for split, examples in splits.items()} == {"train": 2, "dev": 1, "test": 2}
    assert splits["test"] == [Example("awful", None, 0), Example("nice", None, 1)]
    assert "split" in task.test_note and "seed does not pick it" in task.test_note
    # Without a header the split column is a position too.
    write(tmp_path, "all.csv", "pos,good,train\npos,ok,dev\nneg,bad,test\n")
    path = task_file(tmp_path, file="all.csv", split_column=2, header=False, columns={"label": 0, "text_a": 1},
                     **SENTIMENT)
    assert task_from_file(path).read_splits()["dev"] == [Example("ok", None, 1)]


def test_a_k_shot_folder_picks_the_seed(tmp_path):
    for seed in (13, 21):
        for split in ("train", "dev"):
            write(tmp_path / "kshot" / f"16-{seed}", f"{split}.tsv", f"sentence\tlabel\n{split} {seed}\t1\nmeh\t0\n")
    write(tmp_path / "kshot", "test.tsv", "sentence\tlabel\nshared test\t0\n")
    path = task_file(tmp_path, format="tsv", folder="kshot", columns={"label": "label", "text_a": "sentence"},
                     **{**SENTIMENT, "labels": ["0", "1"]})
    task = task_from_file(path)
    assert task.seeds() == [13, 21] and task.seeds(k=8) == []
    assert task.read_splits(seed=21)["train"][0] == Example("train 21", None, 1)
    assert task.read_splits(seed=13)["dev"][0] == Example("dev 13", None, 1)
    assert task.read_splits(seed=13)["test"] == [Example("shared test", None, 0)]
    assert "k-shot folder, seed 21 and k 16 of seeds 13, 21" in describe_task_file(path, seed=21)[0]
    with pytest.raises(TaskError, match=r"task\.json: no seed folder .*16-42.*seeds with k=16: 13, 21"):
        task.read_splits(seed=42)
    # A seed's own test file (LM-BFF's per-seed layout) comes before the folder's.
    write(tmp_path / "kshot" / "16-21", "test.tsv", "sentence\tlabel\nseed test\t1\n")
    assert task.read_splits(seed=21)["test"] == [Example("seed test", None, 1)]
    assert task.read_splits(seed=13)["test"] == [Example("shared test", None, 0)]
    # ... and an explicit "test" comes before both.
    write(tmp_path, "other_test.tsv", "sentence\tlabel\nexplicit\t0\n")
    path = task_file(tmp_path, format="tsv", folder="kshot", test="other_test.tsv",
                     columns={"label": "label", "text_a": "sentence"}, **{**SENTIMENT, "labels": ["0", "1"]})
    assert task_from_file(path).read_splits(seed=21)["test"] == [Example("explicit", None, 0)]
    (tmp_path / "kshot" / "test.tsv").unlink()
    path = task_file(tmp_path, format="tsv", folder="kshot", columns={"label": "label", "text_a": "sentence"},
                     **{**SENTIMENT, "labels": ["0", "1"]})
    with pytest.raises(TaskError, match=r"no test file for seed 13: looked for .*16-13/test\.tsv and .*kshot/test\.tsv"):
        task_from_file(path).read_splits(seed=13)


def test_per_architecture_templates(tmp_path):
    lm_bff_csv(tmp_path, LM_BFF_ROWS)
    base = dict(header=False, columns={"label": 0, "text_a": 1}, train="train.csv", dev="dev.csv", test="test.csv",
                labels=["0", "1"], verbalizer=["bad", "great"])
    task = task_from_file(task_file(tmp_path, **base, template="{mask} review: {text_a}",
                                    templates={"causal": "Review: {text_a}\nSentiment: {mask}"}))
    assert task.template_for("masked") == "{mask} review: {text_a}"
    assert task.template_for("causal") == "Review: {text_a}\nSentiment: {mask}"
    task = task_from_file(task_file(tmp_path, **base, templates={"masked": "[ {mask} ] {text_a}",
                                                                 "causal": "{text_a} Verdict: {mask}"}))
    assert (task.masked_template, task.causal_template) == ("[ {mask} ] {text_a}", "{text_a} Verdict: {mask}")
    task = task_from_file(task_file(tmp_path, **base, templates={"causal": "{text_a} Verdict: {mask}"}))
    assert task.masked_template == task.causal_template == "{text_a} Verdict: {mask}"


# ---- errors: each names the file, the line and the field -------------------------------


@pytest.fixture
def valid(tmp_path):
    """A valid task (csv with a header) and a function writing it with changes."""
    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.csv", "review,stars\ngood,pos\nbad,neg\n")
    spec = dict(format="csv", columns={"label": "stars", "text_a": "review"}, train="train.csv", dev="dev.csv",
                test="test.csv", **SENTIMENT)

    def make(drop=(), **changes):
        return task_file(tmp_path, **{key: value for key, value in {**spec, **changes}.items() if key not in drop})

    task_from_file(make())
    return make


@pytest.mark.parametrize("changes, drop, field, message", [
    ({}, ("labels",), "labels", "missing"),
    ({"format": "xlsx"}, (), "format", "unknown format 'xlsx'; expected one of csv, tsv, jsonl"),
    ({"dev": "nope.csv"}, (), "dev", "missing data file .*nope.csv"),
    ({"template": "It was {mask} ."}, (), "template", r"needs \{text_a\}"),
    ({"template": "{text_a} It was good ."}, (), "template", r"needs \{mask\}"),
    ({"template": "{text_a} and {text_b} {mask}"}, (), "template", r"\{text_b\} in a single-sentence.*no text_b"),
    ({"template": "{mask} : {text_a}"}, (), "template", r"ends with \{mask\}.*\"causal\""),
    ({"templates": {"causal": "{text_a} {mask} ."}}, (), "templates.causal", r"ends with \{mask\}"),
    ({"templates": {"gpt": "{text_a} {mask}"}}, (), "templates.gpt", "unknown architecture"),
    ({"verbalizer": ["bad"]}, (), "verbalizer", "1 entries for 2 labels"),
    ({"verbalizer": ["bad", "bad"]}, (), "verbalizer", "a word appears twice"),
    ({"verbalizer": ["bad", ["great", "bad"]]}, (), "verbalizer", "a word appears twice"),
    ({"verbalizer": ["bad", []]}, (), "verbalizer", "a non-empty word, or a list of them"),
    ({"verbalizer": ["bad", "great|"]}, (), "verbalizer", "a non-empty word, or a list of them"),
    ({"labels": ["pos"], "verbalizer": ["great"]}, (), "labels", "two or more distinct labels"),
    ({"verbaliser": ["x", "y"]}, (), "verbaliser", "unknown field .did you mean 'verbalizer'"),
    ({"name": "Mine"}, (), "name", "lowercase"),
    ({"name": "sst2"}, (), "name", "built-in task's name"),
    ({"header": "yes"}, (), "header", "'yes' is not a bool"),
    ({"columns": {"label": "stars"}}, (), "columns.text_a", "missing"),
    ({"columns": {"label": "stars", "text_a": "review", "text_c": "x"}}, (), "columns.text_c", "unknown role"),
    ({"columns": {"label": "stars", "text_a": 1}}, (), "columns.text_a", "give the column's name"),
    ({"header": False, "columns": {"label": 1, "text_a": "review"}}, (), "columns.text_a", "0-based position"),
    ({"columns": {"label": "stars", "text_a": "stars"}}, (), "columns.text_a", "given twice"),
    ({"file": "train.csv", "split_column": "s"}, (), "file", "give the data one way"),
    ({}, ("test",), "test", "missing"),
    ({}, ("format",), None, None),  # inferred from the suffix: valid
])
def test_task_file_errors_name_the_file_line_and_field(valid, changes, drop, field, message):
    path = valid(drop=drop, **changes)
    if field is None:
        assert task_from_file(path).data_format == "csv"
        return
    with pytest.raises(TaskError) as caught:
        task_from_file(path)
    text = str(caught.value)
    line = line_of(path, field.split(".")[0]) if f'"{field.split(".")[0]}":' in path.read_text() else 1
    if "." in field and f'"{field.split(".")[1]}":' in path.read_text():
        line = line_of(path, field.split(".")[1])
    assert text.startswith(f"{path}:{line}: field '{field}': "), text
    assert re.search(message, text), text


def test_broken_json_and_missing_task_file(tmp_path):
    path = write(tmp_path, "task.json", '{\n "name": "mine",\n "format": ,\n}')
    with pytest.raises(TaskError, match=rf"^{path}:3: not valid JSON"):
        task_from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(TaskError, match=rf"^{path}:1: a task file holds a JSON object"):
        task_from_file(path)
    with pytest.raises(TaskError, match=f"missing task file {tmp_path / 'nope.json'}"):
        task_from_file(tmp_path / "nope.json")
    path = task_file(tmp_path, **SENTIMENT, columns={"label": "y", "text_a": "t"})
    with pytest.raises(TaskError, match=rf"^{path}:1: no data: give \"train\""):
        task_from_file(path)


@pytest.mark.parametrize("train, message", [
    ("review,stars\ngood,pos\njust text\n", r"train\.csv:3: no value for column 'stars' \(label\)"),
    ("review,stars\ngood,pos\nbad,meh\n", r"train\.csv:3: label \(column 'stars'\): unknown label 'meh'; expected one "
                                          r"of 'neg', 'pos'"),
    ("review,stars\ngood,pos\n  ,neg\n", r"train\.csv:3: text_a \(column 'review'\): empty text"),
    ("text,stars\ngood,pos\n", r"train\.csv:1: no column 'review' \(text_a\) in the header \(text, stars\).*"
                               r"\"header\": false"),
    ("review,stars\n", r"train\.csv has no examples"),
    ('review,stars\n"good,pos\n', r"train\.csv:2: no value for column 'stars'"),  # a quote left open
    ('review,stars\n"two\nlines",pos\n\nbad,meh\n', r"train\.csv:5: label .*'meh'"),  # lines of the row's start
])
def test_data_errors_name_the_file_line_and_column(valid, tmp_path, train, message):
    path = valid()
    write(tmp_path, "train.csv", train)
    with pytest.raises(TaskError, match=message):
        task_from_file(path).read_splits()


def test_data_errors_in_other_formats(tmp_path):
    write(tmp_path, "train.tsv", "review\tstars\ngood\tpos\nno label\n")
    for split in ("dev", "test"):
        write(tmp_path, f"{split}.tsv", "review\tstars\ngood\tpos\n")
    path = task_file(tmp_path, columns={"label": "stars", "text_a": "review"}, train="train.tsv", dev="dev.tsv",
                     test="test.tsv", **SENTIMENT)
    with pytest.raises(TaskError, match=r"train\.tsv:3: 1 tab-separated fields, the header has 2 \(no field 'stars'\)"):
        task_from_file(path).read_splits()
    # A header line taken for data is said so.
    for split in ("train", "dev", "test"):
        write(tmp_path, f"{split}.tsv", "stars\treview\npos\tgood\n")
    path = task_file(tmp_path, header=False, columns={"label": 0, "text_a": 1}, train="train.tsv", dev="dev.tsv",
                     test="test.tsv", **SENTIMENT)
    with pytest.raises(TaskError, match=r"train\.tsv:1: label \(column '0'\): unknown label 'stars'.*if line 1 is a "
                                        r"header, set \"header\": true"):
        task_from_file(path).read_splits()
    write(tmp_path, "train.jsonl", '{"t": "good", "y": "pos"}\n{"t": "bad", "y": true}\n')
    for split in ("dev", "test"):
        write(tmp_path, f"{split}.jsonl", '{"t": "good", "y": "pos"}\n')
    path = task_file(tmp_path, columns={"label": "y", "text_a": "t"}, train="train.jsonl", dev="dev.jsonl",
                     test="test.jsonl", **SENTIMENT)
    with pytest.raises(TaskError, match=r"train\.jsonl:2: label \(column 'y'\): True is neither a number nor a word"):
        task_from_file(path).read_splits()
    write(tmp_path, "all.csv", "text,label,split\ngood,pos,train\nbad,neg,validation\n")
    path = task_file(tmp_path, file="all.csv", split_column="split", columns={"label": "label", "text_a": "text"},
                     **SENTIMENT)
    with pytest.raises(TaskError, match=r"all\.csv:3: split_column 'split': 'validation' is not one of train, dev, test"):
        task_from_file(path).read_splits()
    write(tmp_path, "all.csv", "text,label,split\ngood,pos,train\nbad,neg,test\n")
    with pytest.raises(TaskError, match=r"all\.csv: no rows with 'dev' in split_column 'split'"):
        task_from_file(path).read_splits()


# ---- the command line ------------------------------------------------------------------


def test_tasks_check_says_what_the_file_holds(valid, tmp_path, capsys):
    path = valid()
    assert main(["tasks", "--check", str(path), "--placement", "before"]) == 0
    out = capsys.readouterr().out
    assert "task 'mine'" in out and "2 classes" in out and "csv with a header line" in out
    assert "'neg' -> 'bad', 'pos' -> 'great'" in out
    assert f"train      2 examples ('neg': 1, 'pos': 1) from {tmp_path / 'train.csv'}" in out
    assert "first train example, label 'pos' (<mask> -> 'great')" in out
    assert "masked: '<prompt>good It was <mask> .'" in out and "causal: '<prompt>good It was <mask>'" in out
    assert "a valid task file" in out

    path = valid(templates={"masked": "{mask} : {text_a}", "causal": "Review: {text_a} Verdict: {mask}"})
    assert main(["tasks", "--check", str(path), "--placement", "after"]) == 0
    out = capsys.readouterr().out
    assert "masked: '<mask> : good<prompt>'" in out and "causal: 'Review: good<prompt> Verdict: <mask>'" in out
    assert describe_task_file(path, placement="tail")[-1] == "  causal: 'Review: good Verdict<prompt>: <mask>'"
    path = valid(template="{text_a} Verdict: {mask}")
    assert main(["tasks", "--check", str(path), "--placement", "before"]) == 0
    assert "masked and causal: '<prompt>good Verdict: <mask>'" in capsys.readouterr().out
    assert main(["tasks", "--check", str(path)]) == 0  # tune's default placement: ahead of the last word
    assert "masked and causal: 'good Verdict<prompt>: <mask>'" in capsys.readouterr().out


def test_tasks_check_of_a_bad_file_is_one_error_line(valid, tmp_path, capsys):
    path = valid(verbalizer=["bad"])
    assert main(["tasks", "--check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: {path}:{line_of(path, 'verbalizer')}: field 'verbalizer': 1 entries "
                                         "for 2 labels (neg, pos): give one word (or a list of words) per label, in "
                                         "the order of \"labels\""]
    write(tmp_path, "dev.csv", "review,stars\ngood,great\n")
    assert main(["tasks", "--check", str(valid())]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'dev.csv'}:2: label")
    assert main(["tasks", "--check", str(tmp_path / "none.json")]) == 2
    assert "missing task file" in capsys.readouterr().err


def test_tasks_without_check_lists_the_builtins(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sst2 ") and "rte " in out
    assert main(["tasks", "--seed", "21"]) == 2
    assert "only with --check" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["tune", "compare"])
def test_task_and_task_file_exclude_each_other(valid, tmp_path, capsys, command):
    arguments = [command, "--model", "tiny-llama", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")]
    assert main(arguments + ["--task-file", str(valid()), "--task", "sst2"]) == 2
    err = capsys.readouterr().err
    assert "--task and --task-file exclude each other" in err and "starting an embedded" not in err
    assert main(arguments + ["--task-file", str(valid(verbalizer=["x"]))]) == 2  # refused before any model loads
    err = capsys.readouterr().err
    assert "field 'verbalizer'" in err and "starting an embedded" not in err
    assert not (tmp_path / "run").exists()


def test_the_config_keeps_an_absolute_task_file_and_load_run_data_reads_it(valid, tmp_path, monkeypatch):
    path = valid()
    monkeypatch.chdir(tmp_path)
    config = TuneConfig(task_file="task.json", budget=20, test_limit=1)
    assert config.task_file == str(path.resolve())
    data = load_run_data(config)
    assert data.task.name == "mine" and len(data.splits["train"]) == 2 and len(data.splits["test"]) == 1
    assert TuneConfig().task_file is None


def test_tune_and_resume_on_a_task_file(tmp_path, monkeypatch, capsys):
    texts = ["good fun", "bad idea", "great cast", "dull plot", "fine work", "poor show", "nice pace", "weak end"]
    rows = {split: [(i % 2 ^ 1, f"{text} {split}") for i, text in enumerate(texts)] for split in ("train", "dev")}
    rows["test"] = [(i % 2 ^ 1, f"{text} again") for i, text in enumerate(texts + texts[:4])]
    lm_bff_csv(tmp_path / "data", rows)
    task_file(tmp_path, name="reviews", header=False, columns={"label": 0, "text_a": 1}, train="data/train.csv",
              dev="data/dev.csv", test="data/test.csv", labels=["0", "1"], verbalizer=["bad", "great"],
              template="{text_a} It was {mask} .")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["tune", "--task-file", "task.json", "--model", "tiny-llama", "--device", "cpu", "--budget", "8",
                 "--popsize", "4", "--dim", "6", "--prompt-length", "2", "--quiet", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "reviews" and result["api_calls"] == 8 and result["test_examples"] == 12
    assert "the k-shot seed does not pick them" in result["test_note"]
    config = json.loads((out / "config.json").read_text())
    assert config["task_file"] == str((tmp_path / "task.json").resolve()) and config["task"] == "reviews"
    assert capsys.readouterr().out.startswith("reviews seed 13 on tiny-llama")

    monkeypatch.chdir(tmp_path / "data")  # the run finds its task file from anywhere
    assert main(["tune", "--device", "cpu", "--quiet", "--out", str(out), "--resume", "--budget", "12"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "reviews" and result["api_calls"] == 12 and result["generations"] == 3
    # Naming it again, by another relative path, is the same file; another file is refused.
    assert main(["tune", "--task-file", "../task.json", "--device", "cpu", "--quiet", "--out", str(out), "--resume",
                 "--budget", "16"]) == 0
    other = write(tmp_path, "other.json", (tmp_path / "task.json").read_text())
    assert main(["tune", "--task-file", str(other), "--quiet", "--out", str(out), "--resume", "--budget", "20"]) == 2
    assert "task-file" in capsys.readouterr().err
    assert os.path.exists(out / "checkpoint.pkl")
