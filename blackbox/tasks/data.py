"""The data directory, the k-shot benchmark loader and a loader for user files."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .registry import Task, TaskError, get_task

__all__ = ["ENV_VAR", "SPLITS", "Example", "list_seeds", "load_split", "load_task_file", "resolve_data_dir",
           "stratified_subset"]

ENV_VAR = "BLACKBOX_DATA_DIR"
SUBSET_SALT = 0x7E57  # keeps the subset's draws apart from other uses of the seed
SPLITS = ("train", "dev", "test")

# Sources name the same columns differently (GLUE, LM-BFF, rl-prompt, the SNLI test); first match wins.
_TEXT_A_COLUMNS = ("sentence", "text", "sentence1", "premise", "#1 String")
_TEXT_B_COLUMNS = ("sentence2", "hypothesis", "#2 String")
_LABEL_COLUMNS = ("gold_label", "label", "Quality")
_CSV_QUOTED_FIELD = re.compile(r'"((?:[^"]|"")*)"', re.DOTALL)


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The explicit argument, else $BLACKBOX_DATA_DIR, else ../shared/data beside the repository."""
    if explicit is not None and str(explicit):
        path, source = Path(explicit).expanduser(), "the data_dir argument"
    elif os.environ.get(ENV_VAR):
        path, source = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        path, source = Path(__file__).resolve().parents[2].parent / "shared" / "data", "the default"
    if not path.is_dir():
        raise TaskError(
            f"data directory {path} (from {source}) does not exist; "
            f"pass --data-dir or set the {ENV_VAR} environment variable"
        )
    return path


def list_seeds(task: Task | str, k: int = 16, data_dir: str | os.PathLike | None = None) -> list[int]:
    """Seeds that have a `<k>-<seed>` folder for this task, ascending."""
    task = get_task(task) if isinstance(task, str) else task
    return _seeds(resolve_data_dir(data_dir) / task.folder, k)


def load_split(
    task: Task | str, split: str, seed: int = 13, k: int = 16, data_dir: str | os.PathLike | None = None
) -> list[Example]:
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = resolve_data_dir(data_dir) / task.folder
    if not folder.is_dir():
        raise TaskError(f"no folder {task.folder!r} for task {task.name!r} in {folder.parent}")
    if split == "test" and not task.quirks.test_from_other_seeds:
        return _load_file(task, folder / "test.tsv", split)
    seeds = _seeds(folder, k)
    if seed not in seeds:
        raise TaskError(
            f"no seed folder {folder / f'{k}-{seed}'}; seeds with k={k}: "
            f"{', '.join(map(str, seeds)) or 'none'}"
        )
    if split != "test":
        return _load_file(task, folder / f"{k}-{seed}" / f"{split}.tsv", split)
    rest = [s for s in seeds if s != seed]
    if not rest:
        raise TaskError(f"{task.name} has no test file and no seed besides {seed} to borrow dev files from")
    return [ex for s in rest for ex in _load_file(task, folder / f"{k}-{s}" / "dev.tsv", "dev")]


def stratified_subset(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """At most `limit` of `examples`, each label kept in its share (rounded, at least one
    of a label that has any), drawn with `seed`, in their original order."""
    if limit < 1:
        raise TaskError(f"a subset needs at least one example, got a limit of {limit}")
    if len(examples) <= limit:
        return list(examples)
    by_label: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)
    rng = np.random.default_rng([seed, SUBSET_SALT])
    shares = {label: max(1, round(limit * len(indices) / len(examples))) for label, indices in by_label.items()}
    while sum(shares.values()) > limit:  # rounding up, or many small labels, went over
        largest = max(shares, key=shares.get)
        shares[largest] -= 1
    chosen = [i for label, indices in sorted(by_label.items()) for i in rng.choice(indices, shares[label], replace=False)]
    return [examples[i] for i in sorted(chosen)]


def load_task_file(
    path: str | os.PathLike,
    text_a: str,
    label: str,
    text_b: str | None = None,
    labels: Sequence[str] | None = None,
) -> list[Example]:
    """Read user data from .csv (standard quoting), .tsv (plain tab split) or .jsonl."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _csv_records(path)
    elif suffix == ".tsv":
        header, rows = _read_tsv(path)
        records = [(no, dict(zip(header, fields))) for no, fields in rows]
    elif suffix in (".jsonl", ".ndjson"):
        records = jsonl_records(path)
    else:
        raise TaskError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv, .tsv or .jsonl")
    labels = list(labels) if labels is not None else None
    examples = []
    for no, record in records:
        where = f"{path}:{no}"
        raw_label = _field(record, label, where)
        if isinstance(raw_label, bool) or not isinstance(raw_label, (int, str)):
            raise TaskError(f"{where}: label {raw_label!r} is neither an integer nor a word")
        examples.append(Example(
            _text(_field(record, text_a, where), where),
            _text(_field(record, text_b, where), where) if text_b is not None else None,
            _label_id(str(raw_label), labels, where),
        ))
    if not examples:
        raise TaskError(f"{path} has no examples")
    return examples


def _seeds(folder: Path, k: int) -> list[int]:
    if not folder.is_dir():
        return []
    found = (re.fullmatch(rf"{k}-(\d+)", p.name) for p in folder.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file's text (a BOM dropped), or a TaskError naming the `what` and why."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskError(f"missing {what} {path}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{what} {path} is not UTF-8: {err}") from None
    except OSError as err:
        raise TaskError(f"cannot read {what} {path}: {err}") from None


def _read_tsv(path: Path, header: bool = True) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) rows; quotes are left alone, CRLF and a BOM are not.
    Without a header line the header is the positions of the first row's fields ("0", "1", ...)."""
    content = read_text(path, "data file")
    # Split on "\n" only: str.splitlines would also break texts at \x0b, \x1c, \u2028 and the like.
    lines = [(no, line.removesuffix("\r")) for no, line in enumerate(content.split("\n"), start=1)]
    lines = [(no, line) for no, line in lines if line.strip()]
    if not lines:
        raise TaskError(f"{path} is empty")
    if header:
        names, lines = [name.strip() for name in lines[0][1].split("\t")], lines[1:]
    else:
        names = [str(position) for position in range(len(lines[0][1].split("\t")))]
    rows = []
    for no, line in lines:
        fields = line.split("\t")
        if len(fields) > len(names) >= 2:
            # The label is the last field; the surplus belongs to the field before it
            # (a literal tab in a DBPedia text, SNLI's extra annotator labels before gold_label).
            cut = len(names) - 2
            fields = fields[:cut] + ["\t".join(fields[cut:-1]), fields[-1]]
        if len(fields) != len(names):
            missing = f" (no field {names[len(fields)]!r})" if len(fields) < len(names) else ""
            raise TaskError(f"{path}:{no}: {len(fields)} tab-separated fields, "
                            f"{'the header has' if header else 'the first row has'} {len(names)}{missing}")
        rows.append((no, fields))
    if not rows:
        raise TaskError(f"{path} has a header but no examples")
    return names, rows


def _load_file(task: Task, path: Path, split: str) -> list[Example]:
    header, rows = _read_tsv(path)
    a = _column(header, _TEXT_A_COLUMNS, path)
    b = _column(header, _TEXT_B_COLUMNS, path) if task.is_pair else None
    y = _column(header, _LABEL_COLUMNS, path)
    quoted = split in task.quirks.csv_quoted
    escapes = task.quirks.backslash_escapes
    examples = []
    for no, fields in rows:
        where = f"{path}:{no}"
        examples.append(Example(
            _text(fields[a], where, quoted, escapes),
            _text(fields[b], where, quoted, escapes) if b is not None else None,
            _label_id(fields[y], task.labels, where),
        ))
    return examples


def _column(header: list[str], candidates: Sequence[str], path: Path) -> int:
    for name in candidates:
        if name in header:
            return header.index(name)
    raise TaskError(f"{path}: header {header} has none of the columns {', '.join(candidates)}")


def _field(record: dict, column: str, where: str, role: str = "") -> Any:
    if record.get(column) is None:
        raise TaskError(f"{where}: no value for column {column!r}{f' ({role})' if role else ''} "
                        f"(columns: {', '.join(map(str, record))})")
    return record[column]


def _text(raw: Any, where: str, quoted: bool = False, escapes: bool = False) -> str:
    if not isinstance(raw, str):
        raise TaskError(f"{where}: text {raw!r} is not a string")
    if quoted and (match := _CSV_QUOTED_FIELD.fullmatch(raw)):
        raw = match.group(1).replace('""', '"')
    if escapes:
        raw = re.sub(r'\\"+', '"', raw)
        raw = re.sub(r"\s*(?:\\n\s*)+", " ", raw)
    text = raw.strip()
    if not text:
        raise TaskError(f"{where}: empty text")
    return text


def _label_id(raw: str, labels: Sequence[str] | None, where: str, exact: bool = False) -> int:
    """The class id of a label: an id 0..n-1 or one of `labels`; `exact`: only one of
    `labels`, spelled as there (a task file's labels are the values of its data, digits too)."""
    raw = raw.strip()
    if exact:
        if labels is None or raw not in labels:
            raise TaskError(f"{where}: unknown label {raw!r}; expected one of {', '.join(map(repr, labels or ()))}")
        return list(labels).index(raw)
    if re.fullmatch(r"-?\d+", raw):
        label = int(raw)
        if label < 0 or (labels is not None and label >= len(labels)):
            top = len(labels) - 1 if labels is not None else "n"
            raise TaskError(f"{where}: label {label} out of range 0..{top}")
        return label
    if labels is None:
        raise TaskError(f"{where}: label {raw!r} is a word; pass labels=[...] to map words to ids")
    if raw not in labels:
        raise TaskError(f"{where}: unknown label {raw!r}; expected one of {', '.join(labels)} or 0..{len(labels) - 1}")
    return list(labels).index(raw)


def _csv_records(path: Path, header: bool = True) -> Iterable[tuple[int, dict]]:
    """(line number where the row starts, record) per row, standard CSV quoting; a record
    maps the header's names, or without a header the positions "0", "1", ..., to the row's
    fields (None where a row is short)."""
    reader, start = None, 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            names, records, end = None, [], 0
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # a blank line
                    continue
                if header and names is None:
                    names = row
                    continue
                if not header:
                    records.append((start, {str(position): field for position, field in enumerate(row)}))
                    continue
                if len(row) > len(names):
                    raise TaskError(f"{path}:{start}: more fields than the header has")
                records.append((start, {name: row[i] if i < len(row) else None for i, name in enumerate(names)}))
            return records
    except FileNotFoundError:
        raise TaskError(f"missing data file {path}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not UTF-8: {err}") from None
    except csv.Error as err:
        raise TaskError(f"{path}:{start}: not readable as CSV ({err})") from None
    except OSError as err:
        raise TaskError(f"cannot read {path}: {err}") from None


def jsonl_records(path: Path, arrays: bool = False) -> Iterable[tuple[int, dict]]:
    """(line number, record) per JSON object; with `arrays`, JSON arrays as records of
    their positions ("0", "1", ...) instead."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except FileNotFoundError:
        raise TaskError(f"missing data file {path}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not UTF-8: {err}") from None
    except OSError as err:
        raise TaskError(f"cannot read {path}: {err}") from None
    records = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}:{no}: not valid JSON ({err.msg})") from None
        if arrays and isinstance(record, list):
            record = {str(position): value for position, value in enumerate(record)}
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{no}: expected a JSON {'array or ' if arrays else ''}object, "
                            f"got {type(record).__name__}")
        records.append((no, record))
    return records
