"""The tiny models take every built-in task as it is: the longest example of each task's
train, dev and test splits (seed 13), in the task's template with a prompt of the tuner's
default length, fits each tiny model without truncation. (The tiny tokenizer spells a
word outside its small vocabulary letter by letter, so texts run long.)"""

from __future__ import annotations

import dataclasses
import functools

import pytest

from backbone_server.encoding import TemplateEncoder
from backbone_server.models import TINY_MODELS
from backbone_server.tiny import BUILDERS, MAX_LENGTH
from blackbox.tasks import TaskError, get_task, list_tasks, load_split, place_prompt, resolve_data_dir
from blackbox.tune_config import TuneConfig

PROMPT_LENGTH = next(field.default for field in dataclasses.fields(TuneConfig) if field.name == "prompt_length")
SPLITS = ("train", "dev", "test")


def _data_dir():
    try:
        return resolve_data_dir()
    except TaskError as error:
        return pytest.skip(f"no benchmark data: {error}")


@functools.lru_cache(maxsize=None)
def _examples(task: str):
    return [example for split in SPLITS for example in load_split(task, split, seed=13, data_dir=_data_dir())]


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


def test_every_tiny_model_is_built_in_code_and_takes_max_length_tokens(tiny_model):
    assert set(BUILDERS) == set(TINY_MODELS)
    assert tiny_model.max_length == MAX_LENGTH


@pytest.mark.parametrize("task", list_tasks())
def test_every_example_of_the_builtin_tasks_fits_each_tiny_model(tiny_model, task):
    _data_dir()
    definition = get_task(task)
    template = place_prompt(definition.template_for(tiny_model.architecture), "before")
    encoder = TemplateEncoder(tiny_model.tokenizer, template, tiny_model.architecture, PROMPT_LENGTH,
                              tiny_model.max_length)
    # Refused (InvalidArgument, "create the session with truncate=true") if one does not fit.
    longest = max(encoder.encode(example.text_a, example.text_b or "", example.label, False, i).length(PROMPT_LENGTH)
                  for i, example in enumerate(_examples(task)))
    assert longest <= tiny_model.max_length
