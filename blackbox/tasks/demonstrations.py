"""In-context demonstrations (GPT-3, LM-BFF): labelled train examples written into the
template ahead of each text, filled with their label words.

The demonstrations are the same for every example, so a causal server keeps their keys
and values with the rest of the text ahead of the prompt. They are taken out of the
train split the search scores: an example whose own answer sits in its context would
teach the search nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from blackbox.v1.verbalizer import label_words

from .data import Example
from .registry import TaskError

__all__ = ["DEMONSTRATION_SEPARATOR", "pick_demonstrations", "with_demonstrations"]

DEMONSTRATION_SALT = 0xDE30  # keeps the draw apart from the other uses of the seed
DEMONSTRATION_SEPARATOR = "\n\n"


def pick_demonstrations(train: Sequence[Example], per_class: int, seed: int,
                        num_classes: int) -> tuple[list[Example], list[Example]]:
    """(`per_class` examples of each label drawn with `seed`, in a shuffled order; the
    rest of `train` in its order). Every label must keep at least one example to train on."""
    if per_class < 0:
        raise TaskError(f"demonstrations per class must be >= 0, got {per_class}")
    if per_class == 0:
        return [], list(train)
    by_label: dict[int, list[int]] = {label: [] for label in range(num_classes)}
    for index, example in enumerate(train):
        by_label.setdefault(example.label, []).append(index)
    short = {label: len(indices) for label, indices in by_label.items() if len(indices) <= per_class}
    if short:
        counts = ", ".join(f"label {label}: {count}" for label, count in sorted(short.items()))
        raise TaskError(f"{per_class} demonstration(s) per class need more than {per_class} train examples "
                        f"of every label, so that some are left to train on ({counts})")
    rng = np.random.default_rng([seed, DEMONSTRATION_SALT])
    chosen = [int(i) for label in sorted(by_label) for i in rng.choice(by_label[label], per_class, replace=False)]
    order = rng.permutation(len(chosen))
    taken = set(chosen)
    return [train[chosen[i]] for i in order], [e for i, e in enumerate(train) if i not in taken]


def with_demonstrations(template: str, demonstrations: Sequence[Example], verbalizer: Sequence[str]) -> str:
    """`template` with the demonstrations ahead of it, each the template filled with its
    texts and its label word (no prompt), one blank line apart."""
    if not demonstrations:
        return template
    # A class of several words ("great|good") answers with its first.
    filled = [_fill(template, example, label_words(verbalizer[example.label])[0]) for example in demonstrations]
    return DEMONSTRATION_SEPARATOR.join(filled) + DEMONSTRATION_SEPARATOR + template


def _fill(template: str, example: Example, word: str) -> str:
    values = {"text_a": example.text_a, "text_b": example.text_b or "", "mask": word, "prompt": ""}
    # Placeholder by placeholder, so that a text holding "{mask}" is not filled again.
    pieces, rest = [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        name, _, rest = after.partition("}")
        pieces += [before, _literal(values[name])]
    return "".join(pieces) + rest


def _literal(text: str) -> str:
    # The template's placeholders are braces, and a template holds no others.
    return text.replace("{", "(").replace("}", ")")
