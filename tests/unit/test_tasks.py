"""Tests for blackbox.tasks: the real k-shot data, the registry, templates and user files."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blackbox.tasks import (
    Example,
    Task,
    TaskError,
    get_task,
    list_seeds,
    list_tasks,
    load_split,
    load_task_file,
    place_prompt,
    register_task,
    resolve_data_dir,
    validate_template,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR} (default ../shared/data)"
)

BUILTINS = ("sst2", "yelp", "agnews", "dbpedia", "mrpc", "snli", "rte")
PAIR_TASKS = {"mrpc", "snli", "rte"}
TEST_SIZES = {"sst2": 872, "yelp": 64, "agnews": 7600, "dbpedia": 4983, "mrpc": 408, "rte": 277, "snli": 9824}


@pytest.fixture(autouse=True)
def default_data_dir(monkeypatch):
    # The suite must exercise the default resolution, whatever the caller's shell exports.
    monkeypatch.delenv("BLACKBOX_DATA_DIR", raising=False)


def check_examples(task: Task, examples: list[Example]) -> None:
    assert examples
    for ex in examples:
        assert 0 <= ex.label < len(task.labels)
        assert ex.text_a and ex.text_a == ex.text_a.strip()
        if task.is_pair:
            assert ex.text_b and ex.text_b == ex.text_b.strip()
        else:
            assert ex.text_b is None


# ---- real data -------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", BUILTINS)
def test_kshot_splits_have_k_per_class(name):
    task = get_task(name)
    seeds = list_seeds(task)
    assert seeds, f"no 16-<seed> folders for {task.folder}"
    for seed in seeds:
        for split in ("train", "dev"):
            examples = load_split(task, split, seed=seed)
            check_examples(task, examples)
            counts = collections.Counter(ex.label for ex in examples)
            assert counts == {label: 16 for label in range(len(task.labels))}, (seed, split, counts)


@needs_data
@pytest.mark.parametrize("name", BUILTINS)
def test_test_split_size(name):
    task = get_task(name)
    examples = load_split(task, "test")
    assert len(examples) == TEST_SIZES[name]
    check_examples(task, examples)
    assert set(ex.label for ex in examples) == set(range(len(task.labels)))


@needs_data
def test_yelp_test_is_dev_of_the_other_seeds():
    assert list_seeds("yelp") == [13, 21, 42]
    expected = load_split("yelp", "dev", seed=21) + load_split("yelp", "dev", seed=42)
    assert load_split("yelp", "test", seed=13) == expected
    trained_on = {ex.text_a for ex in load_split("yelp", "train", seed=13) + load_split("yelp", "dev", seed=13)}
    assert not trained_on & {ex.text_a for ex in expected}


@needs_data
def test_mrpc_quotes_are_literal():
    # GLUE's MRPC is not CSV-quoted: every text must equal its raw tab-separated field.
    path = DATA_DIR / "MRPC" / "test.tsv"
    raw = [line.split("\t") for line in path.read_text(encoding="utf-8-sig").splitlines()[1:]]
    examples = load_split("mrpc", "test")
    assert [(ex.text_a, ex.text_b, ex.label) for ex in examples] == [
        (a.strip(), b.strip(), int(q)) for q, _, _, a, b in raw
    ]
    assert any(ex.text_a.startswith('"') or ex.text_b.startswith('"') for ex in examples)
    assert examples[0].text_b == '" The foodservice pie business does not fit our long-term growth strategy .'


@needs_data
def test_yelp_escapes_are_undone():
    examples = [ex for seed in list_seeds("yelp") for split in ("train", "dev") for ex in load_split("yelp", split, seed)]
    assert not [ex.text_a for ex in examples if "\\n" in ex.text_a or "\\" in ex.text_a]
    assert not [ex.text_a for ex in examples if ex.text_a.startswith('"') and ex.text_a.endswith('"')]
    assert any('"cheese squares"' in ex.text_a for ex in examples)


@needs_data
def test_csv_quoted_sources_are_unquoted():
    for name, split in (("agnews", "test"), ("agnews", "dev"), ("snli", "test"), ("yelp", "train")):
        for ex in load_split(name, split):
            for text in (ex.text_a, ex.text_b or ""):
                assert '""' not in text, (name, split, text)
    heinz = [ex for ex in load_split("agnews", "dev", seed=21) if ex.text_a.startswith("Heinz Quarterly Profit")]
    assert heinz and 'HREF="http://www.investor.reuters.com' in heinz[0].text_a


@needs_data
def test_dbpedia_text_with_a_tab_is_read_whole():
    task = get_task("dbpedia")
    found = 0
    for seed in list_seeds(task):
        for split in ("train", "dev"):
            path = DATA_DIR / task.folder / f"16-{seed}" / f"{split}.tsv"
            lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")[1:] if line.strip()]
            examples = load_split(task, split, seed=seed)
            assert len(examples) == len(lines)
            for line, ex in zip(lines, examples):
                fields = line.split("\t")
                if len(fields) > 2:
                    found += 1
                    assert ex.label == int(fields[-1])
                    assert "\t" in ex.text_a
                    assert fields[0].strip(' "') in ex.text_a and fields[-2].strip(' "') in ex.text_a
                    assert not ex.text_a.startswith('"')
    assert found >= 1, "expected the README's DBPedia row with a literal tab"


@needs_data
def test_snli_kshot_word_labels_and_wide_rows():
    examples = load_split("snli", "dev", seed=13)
    path = DATA_DIR / "SNLI" / "16-13" / "dev.tsv"
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    assert any(len(row) == 15 for row in rows)
    words = get_task("snli").labels
    assert [(ex.text_a, ex.text_b, words[ex.label]) for ex in examples] == [(r[7], r[8], r[-1]) for r in rows]


# ---- errors ----------------------------------------------------------------------------


def test_unknown_task():
    with pytest.raises(TaskError, match="known tasks: sst2"):
        get_task("imdb")


def test_get_task_aliases():
    assert get_task("SST-2") is get_task("sst2")
    assert get_task("AGNews") is get_task("agnews")
    assert get_task("DBPedia").folder == "DBPedia"
    assert list_tasks()[: len(BUILTINS)] == list(BUILTINS)


@needs_data
def test_unknown_split():
    with pytest.raises(TaskError, match="unknown split 'validation'"):
        load_split("sst2", "validation")


@needs_data
def test_missing_seed_lists_existing_ones():
    with pytest.raises(TaskError, match=r"16-7\b.*seeds with k=16: 13, 21, 42"):
        load_split("rte", "train", seed=7)
    with pytest.raises(TaskError, match="seeds with k=8: none"):
        load_split("rte", "train", k=8)


def test_missing_data_dir(tmp_path, monkeypatch):
    with pytest.raises(TaskError, match="BLACKBOX_DATA_DIR") as err:
        resolve_data_dir(tmp_path / "nowhere")
    assert "--data-dir" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    monkeypatch.setenv("BLACKBOX_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(TaskError, match="gone"):
        load_split("sst2", "train")


def write_sst2(root: Path, body: str, split: str = "train", seed: int = 13) -> Path:
    path = root / "SST-2" / f"16-{seed}" / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def test_malformed_files(tmp_path):
    write_sst2(tmp_path, "sentence\tlabel\ngood film .\t1\nbad film .\t2\n")
    with pytest.raises(TaskError, match=r"train\.tsv:3: label 2 out of range 0\.\.1"):
        load_split("sst2", "train", data_dir=tmp_path)
    write_sst2(tmp_path, "sentence\tlabel\ngood film .\tpositive\nbad film .\tawful\n")
    with pytest.raises(TaskError, match=r"train\.tsv:3: unknown label 'awful'"):
        load_split("sst2", "train", data_dir=tmp_path)
    write_sst2(tmp_path, "sentence\tlabel\ngood film .\t1\nno label here\n")
    with pytest.raises(TaskError, match=r"train\.tsv:3: 1 tab-separated fields"):
        load_split("sst2", "train", data_dir=tmp_path)
    write_sst2(tmp_path, "sentence\tlabel\n  \t1\n")
    with pytest.raises(TaskError, match=r"train\.tsv:2: empty text"):
        load_split("sst2", "train", data_dir=tmp_path)
    write_sst2(tmp_path, "words\tlabel\ngood film .\t1\n")
    with pytest.raises(TaskError, match="has none of the columns"):
        load_split("sst2", "train", data_dir=tmp_path)
    write_sst2(tmp_path, "")
    with pytest.raises(TaskError, match="is empty"):
        load_split("sst2", "train", data_dir=tmp_path)
    with pytest.raises(TaskError, match=r"missing data file .*dev\.tsv"):
        load_split("sst2", "dev", data_dir=tmp_path)


def test_wellformed_tmp_file_with_quirks(tmp_path):
    # A BOM, CRLF endings, label words and a literal quote all survive.
    path = write_sst2(tmp_path, "")
    path.write_bytes('\ufeffsentence\tlabel\r\n" a quote .\tpositive\r\nflat .\t0\r\n'.encode())
    assert load_split("sst2", "train", data_dir=tmp_path) == [Example('" a quote .', None, 1), Example("flat .", None, 0)]


def test_yelp_test_needs_another_seed(tmp_path):
    path = tmp_path / "Yelp" / "16-13" / "dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("text\tlabel\nfine\\n\\nplace\t1\n")
    assert load_split("yelp", "dev", data_dir=tmp_path) == [Example("fine place", None, 1)]
    with pytest.raises(TaskError, match="no seed besides 13"):
        load_split("yelp", "test", data_dir=tmp_path)


def test_duplicate_register():
    with pytest.raises(TaskError, match="already registered"):
        register_task(get_task("sst2"))
    clash = Task("sst-2", "Other", ("a", "b"), ("x", "y"), "{text_a} {mask}", "{text_a} {mask}", False)
    with pytest.raises(TaskError, match="already registered"):
        register_task(clash)


def test_task_definition_is_checked():
    args = dict(name="t", folder="T", labels=("a", "b"), verbalizer=("x", "y"),
                masked_template="{text_a} {mask}", causal_template="{text_a} {mask}", is_pair=False)
    Task(**args)
    for bad in (dict(name="T"), dict(verbalizer=("x",)), dict(causal_template="{mask} {text_a}"),
                dict(masked_template="{text_a}"), dict(is_pair=True)):
        with pytest.raises(TaskError):
            Task(**{**args, **bad})


# ---- data directory --------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("BLACKBOX_DATA_DIR", str(env))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(str(explicit)) == explicit
    assert resolve_data_dir() == env
    monkeypatch.delenv("BLACKBOX_DATA_DIR")
    if DATA_DIR.is_dir():
        assert resolve_data_dir() == DATA_DIR
    else:
        with pytest.raises(TaskError, match=str(DATA_DIR)):
            resolve_data_dir()


# ---- templates -------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_templates(name):
    task = get_task(name)
    assert task.is_pair == (name in PAIR_TASKS)
    assert len(task.verbalizer) == len(task.labels)
    assert all(word.isalpha() for word in task.verbalizer)
    for architecture in ("masked", "causal"):
        template = task.template_for(architecture)
        validate_template(template, task.is_pair)
        assert "{prompt}" not in template
        for placement in ("before", "after"):
            validate_template(place_prompt(template, placement), task.is_pair)
    assert task.causal_template.endswith("{mask}")
    with pytest.raises(TaskError, match="unknown architecture"):
        task.template_for("seq2seq")


def test_place_prompt():
    sst = "{text_a} . It was {mask} ."
    assert place_prompt(sst, "before") == "{prompt}{text_a} . It was {mask} ."
    assert place_prompt(sst, "after") == "{text_a}{prompt} . It was {mask} ."
    pair = "{text_a} ? {mask} , {text_b}"
    assert place_prompt(pair, "after") == "{text_a} ? {mask} , {text_b}{prompt}"
    assert place_prompt("{mask} News: {text_a}", "after") == "{mask} News: {text_a}{prompt}"
    assert place_prompt("{prompt} {text_a} {mask}", "after") == "{prompt} {text_a} {mask}"
    # tail: ahead of the last word or punctuation before {mask}, so that one piece follows.
    assert place_prompt(sst, "tail") == "{text_a} . It{prompt} was {mask} ."
    assert place_prompt("Review: {text_a}\nSentiment: {mask}", "tail") == "Review: {text_a}\nSentiment{prompt}: {mask}"
    assert place_prompt("{text_a} Topic: {mask}", "tail") == "{text_a} Topic{prompt}: {mask}"
    assert place_prompt("{mask} News: {text_a}", "tail") == "{mask} News: {text_a}{prompt}"  # nothing between
    assert place_prompt("{text_a}{mask}", "tail") == "{text_a}{prompt}{mask}"
    with pytest.raises(TaskError, match="unknown prompt placement"):
        place_prompt(sst, "middle")


@pytest.mark.parametrize(
    "template, is_pair, message",
    [
        ("It was {mask} .", False, "needs {text_a}"),
        ("{text_a} {text_a} {mask}", False, "{text_a} appears 2 times"),
        ("{text_a} was good", False, "needs {mask}"),
        ("{text_a} {mask} {mask}", False, "{mask} appears 2 times"),
        ("{text_a} {mask} {text_b}", False, "single-sentence"),
        ("{text_a} ? {mask}", True, "pair template needs {text_b}"),
        ("{text_a} {label} {mask}", False, "unknown placeholder"),
        ("{prompt}{text_a} {prompt} {mask}", False, "{prompt} appears 2 times"),
        ("{text_a} {mask} }", False, "unbalanced"),
    ],
)
def test_validate_template_rejects(template, is_pair, message):
    with pytest.raises(TaskError) as err:
        validate_template(template, is_pair)
    assert message in str(err.value)


def test_validate_template_accepts():
    validate_template("{prompt}{text_a} ? {mask} , {text_b}", True)
    validate_template("{text_a} It was {mask}", False)


# ---- user files ------------------------------------------------------------------------


def test_load_task_file_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('review,stars\n"Great, really ""great"" food",pos\nmeh,neg\n', encoding="utf-8")
    examples = load_task_file(path, text_a="review", label="stars", labels=["neg", "pos"])
    assert examples == [Example('Great, really "great" food', None, 1), Example("meh", None, 0)]
    with pytest.raises(TaskError, match="no value for column 'text'"):
        load_task_file(path, text_a="text", label="stars", labels=["neg", "pos"])
    with pytest.raises(TaskError, match=r"data\.csv:2: unknown label 'pos'"):
        load_task_file(path, text_a="review", label="stars", labels=["bad", "good"])
    with pytest.raises(TaskError, match="pass labels="):
        load_task_file(path, text_a="review", label="stars")


def test_load_task_file_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text('premise\thypothesis\ty\n"A" man .\tA person .\t0\nA dog .\tA cat .\t2\n', encoding="utf-8")
    examples = load_task_file(path, text_a="premise", text_b="hypothesis", label="y")
    assert examples == [Example('"A" man .', "A person .", 0), Example("A dog .", "A cat .", 2)]
    with pytest.raises(TaskError, match="out of range 0..1"):
        load_task_file(path, text_a="premise", label="y", labels=["yes", "no"])


def test_load_task_file_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"t": "good", "l": 1}, {"t": "bad", "l": "negative"}, {"t": "ok", "l": "1"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    examples = load_task_file(path, text_a="t", label="l", labels=("negative", "positive"))
    assert examples == [Example("good", None, 1), Example("bad", None, 0), Example("ok", None, 1)]
    path.write_text('{"t": "good", "l": true}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"data\.jsonl:1: label True"):
        load_task_file(path, text_a="t", label="l")
    path.write_text('{"t": "good", "l": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"data\.jsonl:2: not valid JSON"):
        load_task_file(path, text_a="t", label="l")


def test_load_task_file_bad_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(TaskError, match="unsupported file type '.xlsx'"):
        load_task_file(path, text_a="t", label="l")


def test_package_does_not_import_torch():
    code = "import sys, blackbox.tasks; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_a_stratified_subset_keeps_each_label_in_its_share():
    from blackbox.tasks import stratified_subset

    examples = [Example(f"text {i}", None, 0 if i % 4 else 1) for i in range(400)]  # 300 of label 0, 100 of 1
    subset = stratified_subset(examples, 40, seed=13)
    assert len(subset) == 40 and sum(e.label for e in subset) == 10
    assert subset == stratified_subset(examples, 40, seed=13) != stratified_subset(examples, 40, seed=21)
    assert [examples.index(e) for e in subset] == sorted(examples.index(e) for e in subset)  # original order
    assert stratified_subset(examples, 1000, seed=13) == examples
    rare = [Example("a", None, 0)] * 99 + [Example("b", None, 1)]
    assert {e.label for e in stratified_subset(rare, 10, seed=0)} == {0, 1}  # a label with any keeps one
    with pytest.raises(TaskError, match="at least one"):
        stratified_subset(examples, 0, seed=0)

