"""Template rules: where the prompt, the mask and the read position land."""

from __future__ import annotations

import pytest

from backbone_server.encoding import TemplateEncoder, parse_template
from backbone_server.errors import InvalidArgument


def encoder(backbone, template, prompt_length=3):
    return TemplateEncoder(backbone.tokenizer, template, backbone.architecture, prompt_length, backbone.max_length)


def test_causal_reads_the_token_before_the_mask(tiny_llama):
    tok = tiny_llama.tokenizer
    example = encoder(tiny_llama, "{text_a}{prompt} It was {mask} .").encode("good film", "", 1, False, 0)
    assert list(example.before) == [tok.bos_token_id] + tok("good film", add_special_tokens=False)["input_ids"]
    assert list(example.after) == tok(" It was", add_special_tokens=False)["input_ids"]  # nothing after {mask}
    assert example.read == len(example.before) + 3 + len(example.after) - 1


def test_masked_reads_at_the_mask_and_keeps_special_tokens(tiny_roberta):
    tok = tiny_roberta.tokenizer
    example = encoder(tiny_roberta, "{text_a} . It was {mask} .").encode("good film", "", 1, False, 0)
    assert example.before == (tok.bos_token_id,)  # no {prompt}: it goes first
    sequence = list(example.before) + [None] * 3 + list(example.after)
    assert sequence[example.read] == tok.mask_token_id
    assert sequence[-1] == tok.eos_token_id


def test_pair_templates_and_whitespace_before_texts(tiny_llama):
    enc = encoder(tiny_llama, "{text_a}\nQuestion: {text_b} Yes or No?\nAnswer: {mask}")
    example = enc.encode("a cat sat", "the cat sat", 0, False, 0)
    assert example.after[-1] == tiny_llama.tokenizer(":", add_special_tokens=False)["input_ids"][-1]
    with pytest.raises(InvalidArgument, match="text_b"):
        enc.encode("a cat sat", "", 0, False, 3)


@pytest.mark.parametrize("template, message", [
    ("{text_a} It was", "mask"),
    ("{text_a} {mask} {mask}", "mask"),
    ("{txt} {mask}", "unknown placeholder"),
    ("{prompt}{text_a}{prompt} {mask}", "prompt"),
])
def test_bad_templates(template, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_template(template)


def test_causal_mask_before_prompt_is_refused(tiny_llama):
    with pytest.raises(InvalidArgument, match="before"):
        encoder(tiny_llama, "{text_a} {mask}{prompt}")


def test_verbalizer_first_tokens(tiny_llama):
    enc = encoder(tiny_llama, "{text_a} It was {mask}")
    first = {w: tiny_llama.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("bad", "great", "good")}
    assert enc.verbalizer_ids(["bad", "great"]) == ([first["bad"], first["great"]], [0, 1])
    assert enc.verbalizer_ids(["bad", "great|good"]) == ([first["bad"], first["great"], first["good"]], [0, 1, 1])
    with pytest.raises(InvalidArgument, match="tokenises to nothing"):
        enc.verbalizer_ids(["bad", "great|"])
    with pytest.raises(InvalidArgument, match="share first tokens"):
        enc.verbalizer_ids(["zebra", "zoo"])  # both start with the piece "z"
    with pytest.raises(InvalidArgument, match="at least two"):
        enc.verbalizer_ids(["great"])
