"""Tasks of the user's own: a JSON task file names its data, its labels, their verbalizer
words and the templates (`task_from_file`); `FileTask.read_splits` reads its splits with
data.py's readers. Every mistake is a TaskError naming the file, the line and the field."""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blackbox.v1.verbalizer import join_label_words, label_words

from .data import SPLITS, Example, _csv_records, _field, jsonl_records, _label_id, _read_tsv, _seeds, _text, read_text
from .registry import PLACEHOLDERS, Task, TaskError, get_task, place_prompt, validate_template

__all__ = ["FORMATS", "FileTask", "describe_task_file", "task_from_file"]

FORMATS = ("csv", "tsv", "jsonl")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_ROLES = ("label", "text_a", "text_b")
_FIELDS = ("name", "format", "header", "columns", "labels", "verbalizer", "template", "templates", "train", "dev",
           "test", "file", "split_column", "folder", "test_note")
_ARCHITECTURES = ("masked", "causal")


@dataclass(frozen=True)
class FileTask(Task):
    """A `Task` read from a task file (`task_from_file`), with where and how its data is stored."""

    source: str = ""  # the task file, absolute
    layout: str = "files"  # "files" (train, dev, test), "split_column" (one file) or "folder" (k-shot seeds)
    data_format: str = "tsv"
    header: bool = True
    columns: tuple[tuple[str, str], ...] = ()  # (role, column): label, text_a, text_b, split_column
    paths: tuple[tuple[str, str], ...] = ()  # (train/dev/test, file, folder) -> absolute path

    def column(self, role: str) -> str | None:
        return dict(self.columns).get(role)

    def seeds(self, k: int = 16) -> list[int]:
        """The seeds of a k-shot folder (`<k>-<seed>` subfolders); none for the other layouts."""
        return _seeds(Path(dict(self.paths)["folder"]), k) if self.layout == "folder" else []

    def split_paths(self, seed: int = 13, k: int = 16) -> dict[str, Path]:
        """The file each split is read from; `seed` and `k` pick the seed folder of the folder
        layout and nothing in the others."""
        paths = {name: Path(path) for name, path in self.paths}
        if self.layout == "files":
            return {split: paths[split] for split in SPLITS}
        if self.layout == "split_column":
            return dict.fromkeys(SPLITS, paths["file"])
        folder, ext = paths["folder"], self.data_format
        seeds = _seeds(folder, k)
        if seed not in seeds:
            raise TaskError(f"{self.source}: no seed folder {folder / f'{k}-{seed}'} for seed {seed} and k {k}; seeds "
                            f"with k={k}: {', '.join(map(str, seeds)) or 'none'}")
        chosen = {split: folder / f"{k}-{seed}" / f"{split}.{ext}" for split in ("train", "dev")}
        test = [paths["test"]] if "test" in paths else [folder / f"{k}-{seed}" / f"test.{ext}", folder / f"test.{ext}"]
        found = [path for path in test if path.is_file()]
        if not found:
            raise TaskError(f"{self.source}: no test file for seed {seed}: looked for {' and '.join(map(str, test))} "
                            "(or give \"test\": PATH)")
        return {**chosen, "test": found[0]}

    def read_splits(self, seed: int = 13, k: int = 16) -> dict[str, list[Example]]:
        """train, dev and test as examples; each split holds at least one."""
        paths = self.split_paths(seed, k)
        if self.layout == "split_column":
            return self._read(paths["train"], by_split=True)
        return {split: self._read(path)[split] for split, path in paths.items()}

    def _read(self, path: Path, by_split: bool = False) -> dict[str | None, list[Example]]:
        """The examples of one data file: under None, or by the split column's value."""
        if self.data_format == "csv":
            records = _csv_records(path, header=self.header)
        elif self.data_format == "tsv":
            names, rows = _read_tsv(path, header=self.header)
            records = [(no, dict(zip(names, fields))) for no, fields in rows]
        else:
            records = jsonl_records(path, arrays=not self.header)
        if not records:
            raise TaskError(f"{path} has no examples")
        columns = dict(self.columns)
        if self.header and self.data_format != "jsonl":
            first = records[0][1]
            for role, column in columns.items():
                if column not in first:
                    raise TaskError(f"{path}:1: no column "
                                    f"{column!r} ({role}) in the header ({', '.join(map(str, first))}); a file "
                                    "without a header line needs \"header\": false and columns by position")
        found: dict[str | None, list[Example]] = {split: [] for split in SPLITS} if by_split else {}
        split_column = columns.get("split_column")
        for no, record in records:
            where = f"{path}:{no}"
            try:
                key = None
                if by_split:
                    key = _text(_field(record, split_column, where, "split_column"),
                                f"{where}: split_column {split_column!r}")
                    if key not in SPLITS:
                        raise TaskError(f"{where}: split_column {split_column!r}: {key!r} is not one of "
                                        f"{', '.join(SPLITS)}")
                raw_label = _field(record, columns["label"], where, "label")
                label_where = f"{where}: label (column {columns['label']!r})"
                if isinstance(raw_label, bool) or not isinstance(raw_label, (int, str)):
                    raise TaskError(f"{label_where}: {raw_label!r} is neither a number nor a word")
                example = Example(
                    _text(_field(record, columns["text_a"], where, "text_a"),
                          f"{where}: text_a (column {columns['text_a']!r})"),
                    _text(_field(record, columns["text_b"], where, "text_b"),
                          f"{where}: text_b (column {columns['text_b']!r})") if "text_b" in columns else None,
                    _label_id(str(raw_label), self.labels, label_where, exact=True),
                )
            except TaskError as error:
                if not self.header and no == records[0][0] and self.data_format != "jsonl":
                    raise TaskError(f"{error} (if line {no} is a header, set \"header\": true in {self.source})") from None
                raise
            found.setdefault(key, []).append(example)
        for split, examples in found.items():
            if not examples:
                raise TaskError(f"{path}: no rows with {split!r} in split_column {split_column!r}")
        if not by_split:
            found = dict.fromkeys(SPLITS, found[None])
        return found


def task_from_file(path: str | Path) -> FileTask:
    """The task a JSON task file describes, its data files checked for existence (their
    rows are read by `FileTask.read_splits`)."""
    source = Path(path).expanduser().resolve()
    text = read_text(source, "task file")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskError(f"{source}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{source}:1: a task file holds a JSON object {{\"name\": ..., ...}}, not a "
                        f"{type(spec).__name__}")
    return _Reader(source, text, spec).task()


class _Reader:
    """One task file's fields, checked one by one; errors name the file, line and field."""

    def __init__(self, source: Path, text: str, spec: dict[str, Any]):
        self.source, self.text, self.spec = source, text, spec

    def line(self, field: str) -> int:
        """The line where `field` ("columns.label") is written, else that of its parent."""
        at, line = 0, 1
        for part in field.split("."):
            match = re.compile(rf'"{re.escape(part)}"\s*:').search(self.text, at)
            if match is None:
                break
            at, line = match.start(), self.text.count("\n", 0, match.start()) + 1
        return line

    def error(self, field: str, message: str) -> TaskError:
        return TaskError(f"{self.source}:{self.line(field)}: field {field!r}: {message}")

    def get(self, field: str, kind: type | tuple[type, ...], required: bool = True, within: dict | None = None) -> Any:
        spec = self.spec if within is None else within
        key = field.rsplit(".", 1)[-1]
        if key not in spec:
            if required:
                raise self.error(field, "missing")
            return None
        value = spec[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(field, f"{value!r} is not a {names.replace('str', 'string').replace('dict', 'JSON object')}")
        return value

    def task(self) -> FileTask:
        for key in self.spec:
            if key not in _FIELDS:
                close = difflib.get_close_matches(key, _FIELDS, n=1)
                raise self.error(key, f"unknown field{f' (did you mean {close[0]!r}?)' if close else ''}; a task file "
                                      f"takes {', '.join(_FIELDS)}")
        name = self.get("name", str).strip()
        if not name or name != name.lower():
            raise self.error("name", f"{name!r}: a task's name is lowercase and not empty (it names its results)")
        if _is_builtin(name):
            raise self.error("name", f"{name!r} is a built-in task's name; give yours another")
        header = self.get("header", bool, required=False) is not False  # default: a header line
        layout, paths = self.layout()
        data_format = self.data_format(paths)
        columns = self.columns(header, layout)
        labels = self.labels()
        verbalizer = self.verbalizer(labels)
        is_pair = "text_b" in dict(columns)
        masked, causal = self.templates(is_pair)
        note = self.get("test_note", str, required=False) or ""
        try:
            return FileTask(
                name=name, folder=str(paths.get("folder", self.source.parent)), labels=labels,
                verbalizer=verbalizer, masked_template=masked, causal_template=causal, is_pair=is_pair,
                test_note="; ".join(part for part in (note, self.test_note(layout, paths, data_format)) if part),
                source=str(self.source), layout=layout, data_format=data_format, header=header, columns=columns,
                paths=tuple((key, str(path)) for key, path in paths.items()),
            )
        except TaskError as error:
            raise TaskError(f"{self.source}: {error}") from None

    def layout(self) -> tuple[str, dict[str, Path]]:
        given = {"files": [key for key in SPLITS if key in self.spec and not ("folder" in self.spec and key == "test")],
                 "split_column": [key for key in ("file", "split_column") if key in self.spec],
                 "folder": [key for key in ("folder",) if key in self.spec]}
        used = [layout for layout, keys in given.items() if keys]
        if not used:
            raise TaskError(f"{self.source}:1: no data: give \"train\", \"dev\" and \"test\" files, or one \"file\" "
                            "with a \"split_column\", or a k-shot \"folder\" of <k>-<seed> folders")
        if len(used) > 1:
            keys = [given[layout][0] for layout in used]
            raise self.error(keys[1], f"give the data one way: {' and '.join(repr(key) for key in keys)} exclude "
                                      "each other")
        layout = used[0]
        needed = {"files": SPLITS, "split_column": ("file", "split_column"), "folder": ("folder",)}[layout]
        for key in needed:
            self.get(key, (str, int) if key == "split_column" else str)  # present, of the right type
        paths = {key: self.path(key, folder=key == "folder") for key in (*needed, "test")
                 if key in self.spec and key != "split_column"}
        return layout, paths

    def path(self, key: str, folder: bool = False) -> Path:
        path = (self.source.parent / Path(self.get(key, str)).expanduser()).resolve()
        if folder and not path.is_dir():
            raise self.error(key, f"no folder {path}")
        if not folder and not path.is_file():
            raise self.error(key, f"missing data file {path}" if not path.exists() else f"{path} is not a file")
        return path

    def data_format(self, paths: dict[str, Path]) -> str:
        given = self.get("format", str, required=False)
        if given is None:
            guessed = {_SUFFIX_FORMATS.get(path.suffix.lower()) for key, path in paths.items() if key != "folder"}
            if len(guessed) == 1 and None not in guessed:
                return guessed.pop()
            raise self.error("format", f"missing: give \"format\": one of {', '.join(FORMATS)}")
        if given.lower() not in FORMATS:
            raise self.error("format", f"unknown format {given!r}; expected one of {', '.join(FORMATS)}")
        return given.lower()

    def columns(self, header: bool, layout: str) -> tuple[tuple[str, str], ...]:
        columns = self.get("columns", dict)
        for role in columns:
            if role not in _ROLES:
                raise self.error(f"columns.{role}", f"unknown role; columns name {', '.join(_ROLES)} "
                                                    "(text_b for pairs)")
        found = {}
        roles = [("label", True), ("text_a", True), ("text_b", False)]
        for role, required in roles + ([("split_column", True)] if layout == "split_column" else []):
            field = role if role == "split_column" else f"columns.{role}"
            value = self.get(field, (str, int), required, within=None if role == "split_column" else columns)
            if value is None:
                continue
            if header:
                if not isinstance(value, str) or not value.strip():
                    raise self.error(field, f"{value!r}: with a header line, give the column's name (or set "
                                            "\"header\": false to give 0-based positions)")
                value = value.strip()
            else:
                if not re.fullmatch(r"\d+", str(value).strip()):
                    raise self.error(field, f"{value!r}: without a header line (\"header\": false), give the "
                                            "column's 0-based position")
                value = str(int(value))
            if value in found.values():
                raise self.error(field, f"column {value!r} is given twice")
            found[role] = value
        return tuple(found.items())

    def labels(self) -> tuple[str, ...]:
        labels = self.get("labels", list)
        words = []
        for value in labels:
            if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                raise self.error("labels", f"{value!r}: each label is a value of the data's label column (a word "
                                           "or a number)")
            words.append(str(value).strip())
        if len(words) < 2 or len(set(words)) != len(words):
            raise self.error("labels", f"{labels!r}: give two or more distinct labels, in class order")
        return tuple(words)

    def verbalizer(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """One entry per label: a word, or several (a list, or "great|good"), kept as "great|good"."""
        entries = self.get("verbalizer", list)
        if len(entries) != len(labels):
            raise self.error("verbalizer", f"{len(entries)} entries for {len(labels)} labels ({', '.join(labels)}): "
                                           "give one word (or a list of words) per label, in the order of \"labels\"")
        classes = [label_words(entry) if isinstance(entry, str) else entry for entry in entries]
        if not all(isinstance(words, list) and words and all(isinstance(w, str) and w.strip() for w in words)
                   for words in classes):
            raise self.error("verbalizer", f"{entries!r}: each entry is a non-empty word, or a list of them")
        flat = [word.strip() for words in classes for word in words]
        if len(set(flat)) != len(flat):
            raise self.error("verbalizer", f"{entries!r}: a word appears twice, which cannot tell labels apart")
        return tuple(join_label_words([word.strip() for word in words]) for words in classes)

    def templates(self, is_pair: bool) -> tuple[str, str]:
        """The masked and the causal template: "templates" per architecture, else "template";
        a causal template ends with {mask}, so "template" is cut after it for causal models."""
        plain = self.get("template", str, required=False)
        per = self.get("templates", dict, required=False) or {}
        for key in per:
            if key not in _ARCHITECTURES:
                raise self.error(f"templates.{key}", f"unknown architecture; templates are given for "
                                                     f"{' and '.join(_ARCHITECTURES)}")
        given = {arch: self.get(f"templates.{arch}", str, required=False, within=per) for arch in _ARCHITECTURES}
        if plain is None and given["masked"] is None and given["causal"] is None:
            raise self.error("template", "missing: give \"template\" (e.g. \"{text_a} It was {mask} .\") or "
                                         "\"templates\": {\"masked\": ..., \"causal\": ...}")
        # Each architecture's own, else "template", else the other architecture's.
        fields = {arch: f"templates.{arch}" if given[arch] is not None else "template" if plain is not None
                  else f"templates.{other}" for arch, other in zip(_ARCHITECTURES, _ARCHITECTURES[::-1])}
        masked = given["masked"] if given["masked"] is not None else plain if plain is not None else given["causal"]
        causal = given["causal"] if given["causal"] is not None else _causal_cut(masked if plain is None else plain)
        for arch, template in (("masked", masked), ("causal", causal)):
            try:
                validate_template(template, is_pair)
            except TaskError as error:
                hint = "" if is_pair or "{text_b}" not in template else " (\"columns\" has no text_b)"
                raise self.error(fields[arch], f"{error}{hint}") from None
        if not causal.endswith("{mask}"):
            raise self.error(fields["causal"], f"{causal!r}: a causal model scores the label word as what follows the "
                                               "text, so the causal template ends with {mask}: move it, or give "
                                               "\"templates\": {\"causal\": ...}")
        return masked, causal

    def test_note(self, layout: str, paths: dict[str, Path], data_format: str) -> str:
        if layout == "files":
            return f"test = {paths['test']} (the task file's own train, dev and test files: the k-shot seed does not " \
                   "pick them)"
        if layout == "split_column":
            return (f"test = the rows of {paths['file']} marked test in {self.spec['split_column']!r} (the task file's "
                    "own split: the k-shot seed does not pick it)")
        if "test" in paths:
            return f"test = {paths['test']} for every seed"
        return (f"test = test.{data_format} of the seed's folder in {paths['folder']}, else the folder's own "
                f"test.{data_format}")


def _causal_cut(template: str) -> str:
    """`template` ending at its {mask} when nothing but literal text follows it (". It was
    {mask} ." -> ". It was {mask}"); otherwise unchanged, for the check to refuse."""
    end = template.find("{mask}") + len("{mask}")
    rest = template[end:] if end >= len("{mask}") else "{mask}"
    return template if any("{" + name + "}" in rest for name in PLACEHOLDERS) else template[:end]


def _is_builtin(name: str) -> bool:
    try:
        return get_task(name) is not None
    except TaskError:
        return False


def _fill(template: str, example: Example) -> str:
    values = {"text_a": example.text_a, "text_b": example.text_b or "", "prompt": "<prompt>", "mask": "<mask>"}
    return re.sub(r"\{(text_a|text_b|prompt|mask)\}", lambda match: values[match.group(1)], template)


def describe_task_file(path: str | Path, seed: int = 13, k: int = 16, placement: str = "before") -> list[str]:
    """What `blackbox tasks --check` prints: the task, its splits' sizes per label, and its
    templates filled in with the first train example. TaskError for any mistake."""
    task = task_from_file(path)
    splits = task.read_splits(seed=seed, k=k)
    paths = task.split_paths(seed=seed, k=k)
    layout = {"files": "train, dev and test files",
              "split_column": f"one file split by column {task.column('split_column')!r}",
              "folder": f"k-shot folder, seed {seed} and k {k} of seeds {', '.join(map(str, task.seeds(k)))}"}
    lines = [
        f"task {task.name!r} from {task.source}: {len(task.labels)} classes, "
        f"{'text pairs' if task.is_pair else 'single texts'}, {task.data_format}"
        f"{'' if task.data_format == 'jsonl' else ' with a header line' if task.header else ' without a header line'}"
        f", {layout[task.layout]}",
        "labels (class order; value in the data -> verbalizer word): "
        + ", ".join(f"{label!r} -> {word!r}" for label, word in zip(task.labels, task.verbalizer)),
    ]
    for split in SPLITS:
        counts = Counter(example.label for example in splits[split])
        lines.append(f"{split:5s} {len(splits[split]):6d} examples ("
                     + ", ".join(f"{task.labels[i]!r}: {counts.get(i, 0)}" for i in range(len(task.labels)))
                     + f") from {paths[split]}")
    lines.append(f"test note: {task.test_note}")
    first = splits["train"][0]
    lines.append(f"first train example, label {task.labels[first.label]!r} (<mask> -> "
                 f"{task.verbalizer[first.label]!r}), prompt --placement {placement}:")
    templates = {arch: place_prompt(task.template_for(arch), placement) for arch in _ARCHITECTURES}
    if templates["masked"] == templates["causal"]:
        lines.append(f"  masked and causal: {_fill(templates['masked'], first)!r}")
    else:
        lines += [f"  {arch}: {_fill(template, first)!r}" for arch, template in templates.items()]
    return lines
