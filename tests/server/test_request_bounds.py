"""Bounds on what one request can make the server allocate or compute: the sizes of a delta
(rank, intrinsic_dim, prompt_length, the memory its projection pins), the seed, the texts
and template of a session, and the shapes of tensors on the wire. Each is refused with a
short message that states the bound and what to do, before anything large is allocated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backbone_server import projection as projection_module
from backbone_server.deltas import build_delta
from backbone_server.deltas.base import DeltaConfig
from backbone_server.encoding import TemplateEncoder, parse_template
from backbone_server.errors import InvalidArgument, ResourceExhausted
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1.wire import WireError, array_to_tensor, tensor_to_array

SHORT = 400  # no refusal here may be longer: none echoes a long input


def short(error) -> str:
    message = str(error.value)
    assert len(message) < SHORT, f"{len(message)} characters: {message[:200]}..."
    return message


# ---------------------------------------------------------------------------------------
# The sizes of a delta.

def test_lora_rank_above_the_narrowest_target_is_invalid(tiny_llama):
    # tiny-llama: q_proj 64 -> 64, v_proj 64 -> 32 (2 kv heads x 16): a rank above 32 is no low rank of v_proj.
    build_delta(DeltaConfig("lora", prompt_length=0, intrinsic_dim=4, rank=32), tiny_llama)
    with pytest.raises(InvalidArgument) as caught:
        build_delta(DeltaConfig("lora", prompt_length=0, intrinsic_dim=4, rank=33), tiny_llama)
    message = short(caught)
    assert "rank 33" in message and "32" in message and "v_proj" in message


def test_lora_rank_far_above_the_model_is_invalid_not_allocated(tiny_llama):
    with pytest.raises(InvalidArgument) as caught:
        build_delta(DeltaConfig("lora", prompt_length=0, intrinsic_dim=4, rank=20_000), tiny_llama)
    assert "rank 20000" in short(caught)


def test_adapter_bottleneck_above_the_width_is_invalid(tiny_llama):
    build_delta(DeltaConfig("adapter", prompt_length=0, intrinsic_dim=4, rank=64), tiny_llama)
    with pytest.raises(InvalidArgument) as caught:
        build_delta(DeltaConfig("adapter", prompt_length=0, intrinsic_dim=4, rank=65), tiny_llama)
    message = short(caught)
    assert "bottleneck size 65" in message and "64" in message


def test_a_dense_projection_over_the_memory_bound_is_refused_before_it_is_drawn(tiny_llama, monkeypatch):
    """d = 400,000 for a 50-vector soft prompt (D = 3,200): a 5.1 GB dense matrix."""
    def drawn(*args, **kwargs):
        raise AssertionError("the dense matrix was drawn before the bound was checked")

    monkeypatch.setattr(projection_module.DenseProjection, "__init__", drawn)
    with pytest.raises(ResourceExhausted) as caught:
        build_delta(DeltaConfig("prompt", prompt_length=50, intrinsic_dim=400_000), tiny_llama)
    message = short(caught)
    assert "512 MiB" in message and "fastfood" in message and "intrinsic_dim" in message


def test_the_memory_bound_is_an_argument_of_build_delta(tiny_llama):
    from backbone_server.deltas.budget import MAX_DELTA_BYTES, delta_bytes_estimate

    config = DeltaConfig("lora", prompt_length=0, intrinsic_dim=100)
    delta = build_delta(config, tiny_llama)  # D = 2 layers x 4 x (64 + 64 + 64 + 32) = 1,792: 0.7 MB dense
    assert delta.layout.size == 1792
    expected = delta_bytes_estimate("normal", 100, 1792, vectors=2)
    assert expected == 100 * 1792 * 4 + 2 * 1792 * 4 and expected < MAX_DELTA_BYTES
    build_delta(config, tiny_llama, max_bytes=expected)
    with pytest.raises(ResourceExhausted) as caught:
        build_delta(config, tiny_llama, max_bytes=expected - 1)
    assert f"{expected - 1:,} bytes" in short(caught)


def test_sparse_fastfood_and_identity_projections_are_counted_by_what_they_store(tiny_llama):
    from backbone_server.deltas.budget import MAX_DELTA_BYTES
    from backbone_server.projection import make_projection, projection_bytes

    cpu = torch.device("cpu")
    for kind, d, big in [("identity", 115_200, 115_200), ("fastfood", 115_200, 4_000_000),
                         ("sparse", 500, 1_000_000)]:
        assert projection_bytes(kind, d, big) < MAX_DELTA_BYTES < projection_bytes("normal", d, big)
    assert projection_bytes("identity", 115_200, 115_200) == 0
    for kind, d, size in [("normal", 7, 30), ("uniform", 5, 64), ("sparse", 50, 300), ("sparse", 8, 40),
                          ("fastfood", 5, 20), ("fastfood", 64, 300), ("identity", 9, 9)]:
        built = make_projection(kind, d, size, seed=1, std=0.1, device=cpu)
        if kind == "sparse":
            built(torch.zeros(2, d, requires_grad=True)).sum().backward()  # A^T is built and kept
        assert projection_bytes(kind, d, size) >= built.nbytes, kind
    # The identity reference of a whole soft prompt (d = D = 1,800 x 64 = 115,200) and a
    # fastfood projection of the same d build; the dense one is refused.
    for kind in ("identity", "fastfood"):
        build_delta(DeltaConfig("prompt", prompt_length=1800, intrinsic_dim=115_200, projection=kind), tiny_llama)
    with pytest.raises(ResourceExhausted):
        build_delta(DeltaConfig("prompt", prompt_length=1800, intrinsic_dim=115_200), tiny_llama)


def test_a_combination_and_adamix_copies_count_against_one_bound(tiny_llama):
    from backbone_server.deltas.budget import delta_bytes_estimate

    one = delta_bytes_estimate("normal", 100, 1792, vectors=2)  # one LoRA copy, as above
    build_delta(DeltaConfig("adamix2:lora", prompt_length=0, intrinsic_dim=100), tiny_llama, max_bytes=2 * one)
    with pytest.raises(ResourceExhausted) as caught:
        build_delta(DeltaConfig("adamix3:lora", prompt_length=0, intrinsic_dim=100), tiny_llama,
                    max_bytes=2 * one)
    assert "3 copies" in short(caught)
    with pytest.raises(ResourceExhausted):
        build_delta(DeltaConfig("prompt+lora", prompt_length=4, intrinsic_dim=200), tiny_llama, max_bytes=one)


def test_intrinsic_dim_above_the_ceiling_is_invalid():
    from backbone_server.deltas.budget import MAX_INTRINSIC_DIM

    DeltaConfig("prompt", intrinsic_dim=MAX_INTRINSIC_DIM, projection="identity")
    with pytest.raises(InvalidArgument) as caught:
        DeltaConfig("prompt", intrinsic_dim=MAX_INTRINSIC_DIM + 1)
    assert f"{MAX_INTRINSIC_DIM:,}" in short(caught)


def test_prompt_length_above_the_model_length_is_invalid(tiny_llama):
    too_long = tiny_llama.max_length + 1
    with pytest.raises(InvalidArgument) as caught:
        build_delta(DeltaConfig("prompt", prompt_length=too_long, intrinsic_dim=4), tiny_llama)
    assert f"prompt_length {too_long}" in short(caught) and str(tiny_llama.max_length) in str(caught.value)
    with pytest.raises(InvalidArgument) as caught:
        TemplateEncoder(tiny_llama.tokenizer, "{text_a} It was {mask}", "causal", too_long, tiny_llama.max_length)
    assert str(tiny_llama.max_length) in short(caught)


@pytest.mark.parametrize("fields, words", [
    ({"part_dims": (1,) * 100_000}, "part_dims"),
    ({"part_dims": (0,) * 5}, "part_dims"),
    ({"kind": "lora+" + "x" * 100_000}, "kind"),
    ({"projection": "y" * 100_000}, "projection"),
    ({"targets": ("z" * 100_000,)}, "targets"),
    ({"targets": tuple(f"t{i}" for i in range(100_000))}, "targets"),
    ({"targets": tuple(f"t{i}" for i in range(1_000))}, "targets"),  # within MAX_TARGETS: none matches
    ({"kind": "adamix" + "9" * 150 + ":lora", "prompt_length": 0}, "copies"),
])
def test_long_client_values_are_refused_without_being_echoed(tiny_llama, fields, words):
    base = {"kind": "prompt+lora", "prompt_length": 4, "intrinsic_dim": 8}
    with pytest.raises(InvalidArgument) as caught:
        build_delta(DeltaConfig(**{**base, **fields}), tiny_llama)
    assert words in short(caught)


def test_seeds_up_to_the_top_of_uint64_build_every_layer_and_part(tiny_llama):
    top = 2**64 - 1  # the wire's largest seed: layer and part seeds derived from it wrap around
    for kind, n in [("prefix", 3), ("deep-prompt", 3), ("lora+prompt", 3), ("adamix2:lora", 0), ("lora", 0)]:
        build_delta(DeltaConfig(kind, prompt_length=n, intrinsic_dim=8, seed=top), tiny_llama)
    # A seed that fit before keeps its projections: layer l's is still drawn with seed + l * stride.
    from backbone_server.deltas.prefix import LAYER_SEED_STRIDE
    from backbone_server.projection import make_projection

    delta = build_delta(DeltaConfig("prefix", prompt_length=3, intrinsic_dim=8, seed=5), tiny_llama)
    again = make_projection("normal", 8, delta.layer_projections[1].out_dim, seed=5 + LAYER_SEED_STRIDE,
                            std=1.0 / 8 ** 0.5, device=torch.device("cpu"))
    assert torch.equal(delta.layer_projections[1].matrix_t, again.matrix_t)


@pytest.mark.parametrize("seed", [2**64, -1, 10**30])
def test_seeds_outside_uint64_are_invalid(seed):
    with pytest.raises(InvalidArgument) as caught:
        DeltaConfig("prompt", prompt_length=2, intrinsic_dim=4, seed=seed)
    assert "2**64 - 1" in short(caught)


@pytest.mark.parametrize("field", ["intrinsic_dim", "prompt_length", "rank", "seed"])
def test_sizes_must_be_integers(field):
    with pytest.raises(InvalidArgument) as caught:
        DeltaConfig("prompt", **{"prompt_length": 2, "intrinsic_dim": 4, field: 2.5})
    assert field in short(caught)


def test_an_engine_refuses_an_impossible_rank_as_invalid_argument(tiny_llama):
    from backbone_server.engine import Engine

    engine = Engine(tiny_llama)
    config = DeltaConfig("lora", prompt_length=0, intrinsic_dim=4, rank=2**31 - 1)
    with pytest.raises(InvalidArgument):
        engine.create_session({"train": [("good", "", 1)]}, "{text_a} It was {mask}", ["bad", "great"], config)


# ---------------------------------------------------------------------------------------
# Texts and templates.

class RecordingTokenizer:
    """The tiny tokenizer, recording the length of every text it is given."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def recording_encoder(backbone, template="{text_a} It was {mask}", prompt_length=3):
    tokenizer = RecordingTokenizer(backbone.tokenizer)
    encoder = TemplateEncoder(tokenizer, template, backbone.architecture, prompt_length, backbone.max_length)
    return encoder, tokenizer


def test_a_huge_text_is_cut_before_it_is_tokenised_and_encodes_as_before(tiny_llama):
    from backbone_server.encoding import CHARS_PER_TOKEN

    encoder, tokenizer = recording_encoder(tiny_llama)
    bound = tiny_llama.max_length * CHARS_PER_TOKEN
    huge = "good " * (bound // 5 * 3)  # three times the bound
    fitting = "good " * (tiny_llama.max_length + 10)  # long enough to be truncated, short enough to tokenise
    cut = encoder.encode(huge, "", 1, True, 0)
    assert max(tokenizer.lengths) <= bound
    assert cut == encoder.encode(fitting, "", 1, True, 0) and cut.truncated
    assert cut.length(3) == tiny_llama.max_length


def test_two_long_texts_are_truncated_as_their_whole_texts_would_be(tiny_llama):
    """text_a is cut to the character bound, text_b (one letter a token) is not and then holds
    more tokens than text_a's cut: text_a is still cut first, as its whole text is longer."""
    from backbone_server.encoding import CHARS_PER_TOKEN

    bound = tiny_llama.max_length * CHARS_PER_TOKEN
    encoder, tokenizer = recording_encoder(tiny_llama, "{text_a} ? {text_b} It was {mask}")
    whole, _ = recording_encoder(tiny_llama, "{text_a} ? {text_b} It was {mask}")
    whole.max_chars = 10**9  # the encoder as it was: every text tokenised whole
    text_a, text_b = "good " * (bound // 5 * 3), "a " * (bound // 3)
    cut = encoder.encode(text_a, text_b, 0, True, 0)
    assert max(tokenizer.lengths) <= bound
    assert cut == whole.encode(text_a, text_b, 0, True, 0)


def test_a_huge_text_without_truncate_is_refused_before_it_is_tokenised(tiny_llama):
    from backbone_server.encoding import CHARS_PER_TOKEN

    encoder, tokenizer = recording_encoder(tiny_llama)
    bound = tiny_llama.max_length * CHARS_PER_TOKEN
    with pytest.raises(InvalidArgument) as caught:
        encoder.encode("good " * (bound // 5 + 2), "", 1, False, 7)
    message = short(caught)
    assert message.startswith('example 7 ("good good') and "truncate=true" in message and f"{bound:,}" in message
    assert max(tokenizer.lengths, default=0) < 100  # only the template's pieces


def test_a_huge_second_text_is_named_too(tiny_llama):
    encoder, _ = recording_encoder(tiny_llama, "{text_a} ? {text_b} It was {mask}")
    with pytest.raises(InvalidArgument) as caught:
        encoder.encode("a short premise", "x" * 10**6, 1, False, 2)
    message = short(caught)
    assert 'example 2 ("a short premise' in message and "text_b" in message


def test_the_opening_words_of_a_too_long_text_are_capped(tiny_llama):
    encoder, _ = recording_encoder(tiny_llama)
    long_words = ("a" * 60 + " ") * (tiny_llama.max_length + 10)  # 60-letter words: one <unk> token each
    with pytest.raises(InvalidArgument) as caught:
        encoder.encode(long_words, "", 1, False, 0)
    message = short(caught)
    assert f"more than the model's {tiny_llama.max_length}" in message and "truncate=true" in message


def test_the_template_length_is_bounded(tiny_llama):
    from backbone_server.encoding import MAX_TEMPLATE_CHARS

    fits = "{text_a} It was {mask}" + " ." * 100
    parse_template(fits)
    with pytest.raises(InvalidArgument) as caught:
        parse_template("{text_a} It was {mask}" + " ." * MAX_TEMPLATE_CHARS)
    assert f"{MAX_TEMPLATE_CHARS:,}" in short(caught)
    with pytest.raises(InvalidArgument) as caught:
        parse_template("{text_a} {" + "w" * 5_000 + "} {mask}")
    short(caught)


# ---------------------------------------------------------------------------------------
# Tensors on the wire.

def tensor(shape, values=0) -> pb.Tensor:
    return pb.Tensor(data=b"\0\0\0\0" * values, shape=shape, dtype="float32")


@pytest.mark.parametrize("shape, values", [
    ([2**32, 2**32], 0),  # 2**64 values: int64 wraps to 0
    ([2**63 - 1, 2], 0),  # wraps to -2
    ([2**63 - 1, 2**63 - 1, 2**63 - 1], 3),
    ([0, 2**62], 0),  # no values, yet more than numpy's largest array
    ([3, 5], 14),
])
def test_shapes_the_data_cannot_hold_are_refused(shape, values):
    with pytest.raises(WireError) as caught:
        tensor_to_array(tensor(shape, values))
    message = short(caught)
    assert "-" not in message.replace("float32", "")  # no wrapped, negative size


def test_more_than_eight_dimensions_are_refused_and_long_shapes_not_echoed():
    with pytest.raises(WireError, match="at most 8"):
        tensor_to_array(tensor([1] * 9, 1))
    with pytest.raises(WireError) as caught:
        tensor_to_array(tensor([1] * 100_000, 1))
    assert "100000" in short(caught)


def test_valid_tensors_still_round_trip():
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 5), np.float32),
                  np.ones((1, 1, 1, 1, 1, 1, 1, 2), np.float32)):
        back = tensor_to_array(array_to_tensor(array))
        assert back.shape == array.shape and np.array_equal(back, array)

