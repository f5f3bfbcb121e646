"""`--device-map auto`: a model folder placed by accelerate scores exactly like a plain
load (on a CPU-only machine everything lands on the CPU), and a model split across
devices hands its outputs back to the device of its input embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server.deltas.base import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument
from backbone_server.models import load_backbone, wrap_backbone
from backbone_server.tiny import build_tiny_llama

EXAMPLES = [
    ("the movie was great and the music was very good", "", 1),
    ("a terrible film", "", 0),
    ("not good", "", 0),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny_llama()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def scores(backbone, template="{text_a}{prompt} It was {mask}"):
    engine = Engine(backbone)
    delta = DeltaConfig("prompt", prompt_length=3, intrinsic_dim=5, seed=1)
    session = engine.create_session({"train": EXAMPLES}, template, ["bad", "great"], delta)
    z = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    return engine.evaluate(session.id, "train", z)


@pytest.mark.parametrize("template", ["{text_a}{prompt} It was {mask}", "{prompt}{text_a} It was {mask}"])
def test_device_map_auto_scores_like_a_plain_load(folder, template):
    plain = load_backbone(str(folder), device="cpu", dtype="float32")
    mapped = load_backbone(str(folder), dtype="float32", device_map="auto")
    expected_device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert mapped.device == mapped.embeddings.weight.device == expected_device
    if not torch.cuda.is_available():
        assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    a, b = scores(plain, template), scores(mapped, template)
    np.testing.assert_allclose(b.logits, a.logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b.ce_loss, a.ce_loss, rtol=0, atol=1e-5)


def test_a_split_model_hands_outputs_back_to_the_input_device():
    """A map over several devices (faked here: all of it is on the CPU) wraps the body and
    the head so that the engine gets their outputs on the embeddings' device."""
    model, tokenizer = build_tiny_llama()
    plain = wrap_backbone("tiny", model, tokenizer, "causal", torch.device("cpu"), torch.float32)
    split_model, _ = build_tiny_llama()
    split_model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": 0, "lm_head": 0}
    split = wrap_backbone("tiny", split_model, tokenizer, "causal", None, torch.float32)
    assert split.device == torch.device("cpu") and split.body is not split_model.base_model
    a, b = scores(plain), scores(split)
    np.testing.assert_allclose(b.logits, a.logits, rtol=0, atol=1e-5)


def test_a_map_onto_one_device_keeps_the_plain_modules():
    model, tokenizer = build_tiny_llama()
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "lm_head": "cpu"}
    backbone = wrap_backbone("tiny", model, tokenizer, "causal", None, torch.float32)
    assert backbone.body is model.base_model and isinstance(backbone.head, torch.nn.Linear)


def test_device_and_device_map_exclude_each_other(folder):
    with pytest.raises(InvalidArgument, match="exclude each other"):
        load_backbone(str(folder), device="cpu", device_map="auto")
