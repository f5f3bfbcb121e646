"""Task definitions (labels, verbalizers, prompt templates) and the task registry."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DataQuirks",
    "PLACEHOLDERS",
    "Task",
    "TaskError",
    "get_task",
    "list_tasks",
    "place_prompt",
    "register_task",
    "validate_template",
]

PLACEHOLDERS = ("text_a", "text_b", "mask", "prompt")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
ARCHITECTURES = ("masked", "causal")
PLACEMENTS = ("before", "after", "tail")


class TaskError(ValueError):
    """A bad task name, template, data file or data directory."""


def validate_template(template: str, is_pair: bool) -> None:
    """Raise TaskError unless `template` is usable for a single-sentence or pair task."""
    names = _PLACEHOLDER.findall(template)
    unknown = sorted(set(names) - set(PLACEHOLDERS))
    if unknown:
        raise TaskError(
            f"template {template!r}: unknown placeholder(s) "
            f"{', '.join('{' + n + '}' for n in unknown)}; allowed: "
            f"{', '.join('{' + n + '}' for n in PLACEHOLDERS)}"
        )
    # Callers fill templates with str.format-like substitution, where a stray brace breaks.
    if re.search(r"[{}]", _PLACEHOLDER.sub("", template)):
        raise TaskError(f"template {template!r}: unbalanced '{{' or '}}'")
    allowed = {"text_a": (1, 1), "mask": (1, 1), "prompt": (0, 1),
               "text_b": (1, 1) if is_pair else (0, 0)}
    for name, (low, high) in allowed.items():
        count = names.count(name)
        if count < low:
            kind = "pair" if name == "text_b" else "a"
            raise TaskError(f"template {template!r}: {kind} template needs {{{name}}}")
        if count > high:
            if high == 0:
                raise TaskError(f"template {template!r}: {{{name}}} in a single-sentence template")
            raise TaskError(f"template {template!r}: {{{name}}} appears {count} times, at most once")


def place_prompt(template: str, placement: str) -> str:
    """Insert the {prompt} placeholder: at the start ("before"), right after the last text
    placeholder ("after"), or ahead of the last word or punctuation before {mask}
    ("tail": "...Sentiment{prompt}: {mask}"), so that in a causal model only that one
    piece of the template follows the prompt."""
    if placement not in PLACEMENTS:
        raise TaskError(f"unknown prompt placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    if "{prompt}" in template:
        return template
    validate_template(template, is_pair="{text_b}" in template)
    if placement == "before":
        return "{prompt}" + template
    end = max(template.find(p) + len(p) for p in ("{text_a}", "{text_b}") if p in template)
    if placement == "tail":
        literal = template[end:template.index("{mask}")].rstrip()
        last = re.search(r"(\s*\w+|[^\w\s]+)$", literal)
        if last is not None:
            at = end + last.start()
            return template[:at] + "{prompt}" + template[at:]
    return template[:end] + "{prompt}" + template[end:]


@dataclass(frozen=True)
class DataQuirks:
    """How a task's published files deviate from a plain header line plus tab-separated fields."""

    # Splits written by pandas: a field holding '"' is wrapped in quotes with inner ones doubled.
    csv_quoted: frozenset[str] = frozenset()
    # Texts spell line breaks as the two characters \n and quotes as \" (Yelp's JSON origin).
    backslash_escapes: bool = False
    # No test.tsv: the test set is the dev files of the seeds one does not train on.
    test_from_other_seeds: bool = False


@dataclass(frozen=True)
class Task:
    name: str
    folder: str
    labels: tuple[str, ...]
    verbalizer: tuple[str, ...]
    masked_template: str
    causal_template: str
    is_pair: bool
    test_note: str = ""
    quirks: DataQuirks = DataQuirks()

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower():
            raise TaskError(f"task name {self.name!r} must be non-empty and lowercase")
        if len(self.labels) < 2 or len(self.verbalizer) != len(self.labels):
            raise TaskError(
                f"task {self.name!r}: need >= 2 labels and one verbalizer word per label "
                f"(got {len(self.labels)} labels, {len(self.verbalizer)} words)"
            )
        validate_template(self.masked_template, self.is_pair)
        validate_template(self.causal_template, self.is_pair)
        # A causal LM scores the label word as the continuation, so nothing may follow it.
        if not self.causal_template.endswith("{mask}"):
            raise TaskError(f"task {self.name!r}: causal template must end with {{mask}}")

    def template_for(self, architecture: str) -> str:
        if architecture == "masked":
            return self.masked_template
        if architecture == "causal":
            return self.causal_template
        raise TaskError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")


_TASKS: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}  # normalised name or folder -> registry name


def _key(name: str) -> str:
    # "SST-2", "sst_2" and "sst2" all mean the same task.
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_task(task: Task) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    if task.name in _TASKS or _key(task.name) in _ALIASES:
        raise TaskError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    _ALIASES[_key(task.name)] = task.name
    _ALIASES.setdefault(_key(task.folder), task.name)


def list_tasks() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> Task:
    registered = _ALIASES.get(_key(name)) if isinstance(name, str) else None
    if registered is None:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return _TASKS[registered]


# Templates follow BBT (Sun et al. 2022, Table 1) for masked LMs; causal variants end in {mask}.
# The sentiment one is phrased the way instruction-tuned causal LMs read reviews: on the
# bundled SmolLM2 it scores 78% of the first 200 SST-2 test examples with no soft prompt,
# against 58% for BBT's "{text_a} It was {mask}".
_SENTIMENT = dict(
    verbalizer=("bad", "great"),
    masked_template="{text_a} . It was {mask} .",
    causal_template="Review: {text_a}\nSentiment: {mask}",
    is_pair=False,
)
_PAIR_MASKED = "{text_a} ? {mask} , {text_b}"
_ALL_SPLITS_QUOTED = frozenset({"train", "dev", "test"})

for _task in (
    Task("sst2", "SST-2", ("negative", "positive"), test_note="test = GLUE dev set", **_SENTIMENT),
    Task(
        "yelp", "Yelp", ("negative", "positive"),
        test_note="no test file: test = dev files of the other seeds",
        quirks=DataQuirks(csv_quoted=_ALL_SPLITS_QUOTED, backslash_escapes=True, test_from_other_seeds=True),
        **_SENTIMENT,
    ),
    Task(
        "agnews", "AGNews", ("World", "Sports", "Business", "Sci/Tech"),
        verbalizer=("World", "Sports", "Business", "Tech"),
        masked_template="{mask} News: {text_a}",
        causal_template="{text_a} Topic: {mask}",
        is_pair=False,
        test_note="official test set",
        quirks=DataQuirks(csv_quoted=_ALL_SPLITS_QUOTED),
    ),
    Task(
        "dbpedia", "DBPedia",
        ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
         "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
         "Album", "Film", "WrittenWork"),
        verbalizer=("Company", "Education", "Artist", "Athlete", "Office", "Transportation",
                    "Building", "Natural", "Village", "Animal", "Plant", "Album", "Film", "Written"),
        masked_template="[ Category: {mask} ] {text_a}",
        causal_template="{text_a} Category: {mask}",
        is_pair=False,
        test_note="held-out 4,983-example split of DBpedia-14, not the official test set",
        quirks=DataQuirks(csv_quoted=frozenset({"train", "dev"})),
    ),
    Task(
        "mrpc", "MRPC", ("not_equivalent", "equivalent"),
        verbalizer=("No", "Yes"),
        masked_template=_PAIR_MASKED,
        causal_template="{text_a}\nQuestion: {text_b} Same meaning? Yes or No?\nAnswer: {mask}",
        is_pair=True,
        test_note="test = GLUE dev set",
    ),
    Task(
        "snli", "SNLI", ("entailment", "neutral", "contradiction"),
        verbalizer=("Yes", "Maybe", "No"),
        masked_template=_PAIR_MASKED,
        causal_template="{text_a}\nQuestion: {text_b} True? Yes, Maybe or No?\nAnswer: {mask}",
        is_pair=True,
        test_note="official test set, unlabelled rows dropped",
        quirks=DataQuirks(csv_quoted=frozenset({"test"})),
    ),
    Task(
        "rte", "RTE", ("entailment", "not_entailment"),
        verbalizer=("Yes", "No"),
        masked_template=_PAIR_MASKED,
        causal_template="{text_a}\nQuestion: {text_b} True? Yes or No?\nAnswer: {mask}",
        is_pair=True,
        test_note="test = GLUE dev set",
    ),
):
    register_task(_task)
del _task
