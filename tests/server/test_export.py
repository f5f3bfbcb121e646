"""Exporting a tuned z as adapter weights: PEFT loads the LoRA and soft-prompt exports and
reproduces the engine's verbalizer logits; the bias, adapter and deep-prompt exports
reproduce them through `apply_bias_shift`, `apply_adapters` and `apply_deep_prompt`;
`blackbox export` turns a run folder into a loadable adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backbone_server.deltas.base import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    apply_adapters,
    apply_bias_shift,
    apply_deep_prompt,
    load_prompt,
    splice_prompt,
    export_delta,
    materialise,
    prompt_placement,
)
from backbone_server.errors import InvalidArgument
from backbone_server.tiny import build_tiny_llama, build_tiny_roberta
from blackbox.client import DeltaSpec
from blackbox.export import delta_spec_of_run
from blackbox.runlog import RunDirError
from tests.server.test_engine import EXAMPLES, VERBALIZER, template_for

peft = pytest.importorskip("peft")

DIM = 6


def fresh_model(backbone):
    """A new copy of the tiny backbone's base model (same seed, same weights)."""
    build = build_tiny_llama if backbone.architecture == "causal" else build_tiny_roberta
    return build()[0].eval()


def random_z(seed=1, scale=2.0):
    return (np.random.default_rng(seed).normal(size=DIM) * scale).astype(np.float32)


def engine_logits(backbone, config, z, template=None):
    engine = Engine(backbone)
    session = engine.create_session({"train": EXAMPLES}, template or template_for(backbone), VERBALIZER, config)
    scores = engine.evaluate(session.id, "train", z[None])
    return session, scores.logits[0]


def model_logits(model, session, ids_of, offset=0):
    """Verbalizer logits of an ordinary forward of `ids_of(example)` for each example,
    read at the engine's position plus `offset`."""
    rows = []
    for example in session.splits["train"]:
        ids = torch.tensor([ids_of(example)])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, example.read + offset]
        rows.append(logits[session.verbalizer_ids])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("rank", [0, 2])
def test_lora_export_loads_in_peft_and_reproduces_the_engine(tiny_backbone, tmp_path, rank):
    config = DeltaConfig("lora", prompt_length=0, intrinsic_dim=DIM, seed=3, projection_scale=2.0, rank=rank)
    z = random_z()
    session, expected = engine_logits(tiny_backbone, config, z)
    manifest = export_delta(tiny_backbone, config, z, tmp_path / "adapter", base_model="tiny")
    assert manifest["kind"] == "lora" and manifest["reproduces_engine"]
    assert manifest["z_norm"] == pytest.approx(float(np.linalg.norm(z)))
    adapter = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == adapter["lora_alpha"] == (rank or 4)

    model = peft.PeftModel.from_pretrained(fresh_model(tiny_backbone), tmp_path / "adapter").eval()
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 2 * tiny_backbone.num_layers
    tuned = model_logits(model, session, lambda e: list(e.before) + list(e.after))
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)
    # ... and the adapter does change the model.
    plain = model_logits(fresh_model(tiny_backbone), session, lambda e: list(e.before) + list(e.after))
    assert np.abs(plain - expected).max() > 1e-3


def test_lora_tensors_follow_the_layout(tiny_llama):
    config = DeltaConfig("lora", prompt_length=0, intrinsic_dim=DIM, rank=2, targets=("o_proj",))
    item = materialise(tiny_llama, config, random_z())
    assert item.modules == [f"model.layers.{i}.self_attn.o_proj" for i in range(tiny_llama.num_layers)]
    assert item.tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (2, 64)
    assert item.tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (64, 2)
    assert all(t.dtype == torch.float32 for t in item.tensors.values())


def test_prompt_placement(tiny_llama, tiny_roberta):
    # The tiny tokenizers put a BOS (<s>) ahead of {prompt}: PEFT's prompt would precede it.
    bos = tiny_llama.tokenizer.bos_token_id
    start = prompt_placement(tiny_llama, template_for(tiny_llama), 4)
    assert start == {"prompt_position": "start", "tokens_before_prompt": [bos], "prompt_first": False}
    after = prompt_placement(tiny_llama, template_for(tiny_llama, "after"), 4)
    assert after["prompt_position"] == "end" and after["tokens_before_prompt"] is None
    assert prompt_placement(tiny_roberta, template_for(tiny_roberta), 4)["tokens_before_prompt"] == [bos]


def test_prompt_export_folds_the_prefix_by_default_and_reproduces_the_engine(tiny_backbone, tmp_path):
    """PEFT prepends the virtual tokens to the whole input. With the constant tokens ahead
    of {prompt} (the BOS) folded into the virtual tokens, by default, and the rest fed as
    input ids, PEFT's input is exactly the engine's."""
    config = DeltaConfig("prompt", prompt_length=4, intrinsic_dim=DIM, seed=3)
    z = random_z()
    template = template_for(tiny_backbone)
    session, expected = engine_logits(tiny_backbone, config, z, template)
    bos = tiny_backbone.tokenizer.bos_token_id
    manifest = export_delta(tiny_backbone, config, z, tmp_path / "folded", template=template)
    assert manifest["reproduces_engine"] and manifest["why_not_reproduced"] is None and not manifest["warnings"]
    assert manifest["prompt"]["folded_prefix"] == manifest["prompt"]["tokens_before_prompt"] == [bos]
    adapter = json.loads((tmp_path / "folded" / ADAPTER_CONFIG).read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 5

    model = peft.PeftModel.from_pretrained(fresh_model(tiny_backbone), tmp_path / "folded").eval()
    # Positions: the engine's read position counts the BOS and the prompt, as PEFT's output does.
    tuned = model_logits(model, session, lambda e: list(e.after))
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)
    assert export_delta(tiny_backbone, config, z, tmp_path / "asked", template=template,
                        fold_prefix=True)["tensors"] == manifest["tensors"]

    # Not folded (--no-fold-prefix): the prompt as tuned (n vectors), flagged with the reason.
    plain = export_delta(tiny_backbone, config, z, tmp_path / "plain", template=template, fold_prefix=False)
    assert not plain["reproduces_engine"] and not plain["prompt"]["prompt_first"]
    assert "--no-fold-prefix" in plain["why_not_reproduced"] and plain["why_not_reproduced"] in plain["warnings"][0]
    folded_tensor = materialise(tiny_backbone, config, z, template=template)
    unfolded_tensor = materialise(tiny_backbone, config, z, template=template, fold_prefix=False)
    torch.testing.assert_close(folded_tensor.tensors["prompt_embeddings"][1:],
                               unfolded_tensor.tensors["prompt_embeddings"], rtol=0, atol=0)
    peft.PeftModel.from_pretrained(fresh_model(tiny_backbone), tmp_path / "plain")  # loads


def test_a_prompt_after_the_text_says_peft_cannot_reproduce_it_and_how_to(tiny_llama, tmp_path):
    """`--placement after` (or tail): PEFT's prepended prompt can never stand where the
    run's did. The export says so, without pointing at --fold-prefix, and splicing the
    vectors at {prompt} as it says reproduces the engine."""
    n = 3
    config = DeltaConfig("prompt", prompt_length=n, intrinsic_dim=DIM, seed=3)
    z = random_z()
    template = template_for(tiny_llama, "after")
    session, expected = engine_logits(tiny_llama, config, z, template)
    manifest = export_delta(tiny_llama, config, z, tmp_path / "after", template=template)
    why = manifest["why_not_reproduced"]
    assert not manifest["reproduces_engine"] and manifest["prompt"]["folded_prefix"] == []
    assert "after the text" in why and "--placement after or tail" in why and "splice_prompt" in why
    assert manifest["warnings"] == [f"loaded as how_to_load says, this export does not reproduce the run's scores: "
                                    f"{why}"]
    assert "fold-prefix" not in json.dumps(manifest)

    model = fresh_model(tiny_llama)
    rows = []
    for example in session.splits["train"]:
        at = list(range(len(example.before), len(example.before) + n))
        embeds = splice_prompt(model, list(example.before) + [0] * n + list(example.after),
                               load_prompt(tmp_path / "after"), at)
        with torch.no_grad():
            rows.append(model(inputs_embeds=embeds).logits[0, example.read, session.verbalizer_ids])
    np.testing.assert_allclose(torch.stack(rows).numpy(), expected, rtol=0, atol=1e-5)


def test_fold_prefix_is_refused_when_text_precedes_the_prompt(tiny_llama, tmp_path):
    config = DeltaConfig("prompt", prompt_length=2, intrinsic_dim=DIM)
    with pytest.raises(InvalidArgument, match="text ahead of the prompt"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "x", template=template_for(tiny_llama, "after"),
                     fold_prefix=True)
    assert not (tmp_path / "x").exists()


def test_bias_export_reproduces_the_engine(tiny_backbone, tmp_path):
    config = DeltaConfig("bias", prompt_length=0, intrinsic_dim=DIM, seed=3)
    z = random_z()
    session, expected = engine_logits(tiny_backbone, config, z)
    manifest = export_delta(tiny_backbone, config, z, tmp_path / "bias")
    assert manifest["peft_type"] == "BLACKBOX_BIAS"
    adapter = json.loads((tmp_path / "bias" / ADAPTER_CONFIG).read_text())
    assert adapter["target_modules"] and "bias_shift" in adapter["description"]
    model = fresh_model(tiny_backbone)
    handles = apply_bias_shift(model, tmp_path / "bias")
    assert len(handles) == len(adapter["target_modules"])
    tuned = model_logits(model, session, lambda e: list(e.before) + list(e.after))
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["bias", "adapter"])
def test_applying_to_a_model_without_a_target_installs_nothing(tiny_llama, tmp_path, kind):
    config = DeltaConfig(kind, prompt_length=0, intrinsic_dim=DIM, seed=3)
    export_delta(tiny_llama, config, random_z(), tmp_path / kind)
    model = fresh_model(tiny_llama)
    del model.model.layers[-1]  # the export's last targets are gone
    with pytest.raises(AttributeError):
        (apply_bias_shift if kind == "bias" else apply_adapters)(model, tmp_path / kind)
    assert not any(module._forward_hooks for module in model.modules())


def test_adapter_export_reproduces_the_engine(tiny_backbone, tmp_path):
    config = DeltaConfig("adapter", prompt_length=0, intrinsic_dim=DIM, seed=3, projection_scale=2.0, rank=4)
    z = random_z()
    session, expected = engine_logits(tiny_backbone, config, z)
    manifest = export_delta(tiny_backbone, config, z, tmp_path / "adapter")
    assert manifest["kind"] == "adapter" and manifest["peft_type"] == "BLACKBOX_ADAPTER"
    assert manifest["reproduces_engine"] and "apply_adapters" in manifest["how_to_load"]
    assert json.loads((tmp_path / "adapter" / MANIFEST).read_text())["peft_type"] == "BLACKBOX_ADAPTER"
    adapter = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert adapter["peft_type"] == "BLACKBOX_ADAPTER" and adapter["activation"] == "gelu"
    assert adapter["bottleneck_size"] == 4 and len(adapter["target_modules"]) == 2 * tiny_backbone.num_layers
    first = adapter["target_modules"][0]
    h = tiny_backbone.hidden_size
    assert manifest["tensors"][f"base_model.model.{first}.adapter_down.weight"] == [4, h]
    assert manifest["tensors"][f"base_model.model.{first}.adapter_up.weight"] == [h, 4]

    model = fresh_model(tiny_backbone)
    ids_of = lambda e: list(e.before) + list(e.after)  # noqa: E731
    with apply_adapters(model, tmp_path / "adapter") as hooks:
        assert len(hooks) == len(adapter["target_modules"])
        tuned = model_logits(model, session, ids_of)
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)
    # The adapter changes the model, and leaving the block takes it off again.
    plain = model_logits(model, session, ids_of)
    np.testing.assert_allclose(plain, model_logits(fresh_model(tiny_backbone), session, ids_of), rtol=0, atol=0)
    assert np.abs(plain - expected).max() > 1e-3


def deep_prompt_logits(model, session, folder, n, batched=False):
    """Verbalizer logits of plain forwards of the encoded rows, with n placeholder ids
    where {prompt} is, the exported prompt spliced into inputs_embeds there and the
    layers' offsets added at the same positions."""
    prompt = load_prompt(folder)
    examples = session.splits["train"]
    rows = [list(e.before) + [0] * n + list(e.after) for e in examples]
    positions = [list(range(len(e.before), len(e.before) + n)) for e in examples]
    with torch.no_grad(), apply_deep_prompt(model, folder, positions[0]) as hooks:
        if batched:  # one right-padded batch, positions per row
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            hooks.positions = positions
            logits = model(inputs_embeds=splice_prompt(model, ids, prompt, positions), attention_mask=mask).logits
            out = [logits[i, e.read] for i, e in enumerate(examples)]
        else:
            out = []
            for row, where, example in zip(rows, positions, examples):
                hooks.positions = where
                embeds = splice_prompt(model, row, prompt, where)
                logits = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
                out.append(logits.logits[0, example.read])
    return torch.stack(out)[:, session.verbalizer_ids].numpy()


@pytest.mark.parametrize("placement", ["before", "after"])
def test_deep_prompt_export_reproduces_the_engine(tiny_backbone, tmp_path, placement):
    if placement == "after" and tiny_backbone.architecture != "causal":
        pytest.skip("the masked-LM test template has no 'after' placement")
    n = 4
    config = DeltaConfig("deep-prompt", prompt_length=n, intrinsic_dim=DIM, seed=3)
    z = random_z()
    template = template_for(tiny_backbone, placement)
    session, expected = engine_logits(tiny_backbone, config, z, template)
    # By default, PEFT's prefix tuning where it is exact (test_deep_prompt_as_a_peft_prefix_...).
    causal_before = tiny_backbone.architecture == "causal" and placement == "before"
    assert materialise(tiny_backbone, config, z, template=template).adapter_config["peft_type"] == \
        ("PREFIX_TUNING" if causal_before else "BLACKBOX_DEEP_PROMPT")
    folder = tmp_path / "deep"
    manifest = export_delta(tiny_backbone, config, z, folder, template=template, fold_prefix=False)
    assert manifest["peft_type"] == "BLACKBOX_DEEP_PROMPT" and manifest["reproduces_engine"]
    assert json.loads((folder / MANIFEST).read_text())["kind"] == "deep-prompt"
    assert manifest["prompt"]["template"] == template and manifest["prompt"]["prompt_length"] == n
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    layers = tiny_backbone.num_layers
    assert adapter["peft_type"] == "BLACKBOX_DEEP_PROMPT" and adapter["num_virtual_tokens"] == n
    assert len(adapter["layer_modules"]) == layers
    h = tiny_backbone.hidden_size
    assert manifest["tensors"] == {"prompt_embeddings": [n, h],
                                   **{f"layers.{l}.prompt_offset": [n, h] for l in range(1, layers)}}
    # The input prompt is the soft prompt's with the same settings.
    soft = materialise(tiny_backbone, DeltaConfig("prompt", prompt_length=n, intrinsic_dim=DIM, seed=3), z)
    torch.testing.assert_close(load_prompt(folder), soft.tensors["prompt_embeddings"], rtol=0, atol=0)

    model = fresh_model(tiny_backbone)
    tuned = deep_prompt_logits(model, session, folder, n)
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)
    if tiny_backbone.architecture == "causal":
        np.testing.assert_allclose(deep_prompt_logits(model, session, folder, n, batched=True), expected,
                                   rtol=0, atol=1e-5)
    # The layer offsets matter: the input prompt alone scores differently.
    _, soft_expected = engine_logits(tiny_backbone, DeltaConfig("prompt", prompt_length=n, intrinsic_dim=DIM, seed=3),
                                     z, template)
    assert np.abs(soft_expected - expected).max() > 1e-3
    with pytest.raises(InvalidArgument, match="prompt positions"):
        deep_prompt_logits(model, session, folder, n - 1)


@pytest.mark.parametrize("per_layer_z", [False, True])
def test_deep_prompt_as_a_peft_prefix_reproduces_the_engine(tiny_llama, tmp_path, per_layer_z):
    """Causal model, prompt ahead of the texts: the prompt's keys and values at every
    layer are constants, and PEFT's prefix tuning (the BOS folded in), the default export
    there, reproduces the engine."""
    n = 4
    config = DeltaConfig("deep-prompt", prompt_length=n, intrinsic_dim=DIM, seed=3, per_layer_z=per_layer_z)
    layers = tiny_llama.num_layers
    z = random_z() if not per_layer_z else np.concatenate([random_z(seed=l) for l in range(layers)])
    template = template_for(tiny_llama)
    session, expected = engine_logits(tiny_llama, config, z, template)
    folder = tmp_path / "prefix"
    manifest = export_delta(tiny_llama, config, z, folder, template=template)
    bos = tiny_llama.tokenizer.bos_token_id
    assert manifest["peft_type"] == "PREFIX_TUNING" and manifest["reproduces_engine"]
    assert manifest["prompt"]["folded_prefix"] == [bos] and "keys and values" in manifest["how_to_load"]
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    model_config = tiny_llama.model.config
    kv_heads = model_config.num_key_value_heads
    head_dim = model_config.hidden_size // model_config.num_attention_heads
    assert adapter["num_virtual_tokens"] == n + 1 and adapter["num_layers"] == layers
    assert manifest["tensors"] == {"prompt_embeddings": [n + 1, layers * 2 * kv_heads * head_dim]}

    model = peft.PeftModel.from_pretrained(fresh_model(tiny_llama), folder).eval()
    # A prefix is past keys and values: the output has no rows for the n + 1 virtual tokens.
    tuned = model_logits(model, session, lambda e: list(e.after), offset=-(n + 1))
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)
    # Not just the input prompt: PEFT's prompt tuning of the same input vectors scores otherwise.
    soft = tmp_path / "soft"
    export_delta(tiny_llama, DeltaConfig("prompt", prompt_length=n, intrinsic_dim=DIM, seed=3),
                 z[:DIM], soft, template=template)
    soft_logits = model_logits(peft.PeftModel.from_pretrained(fresh_model(tiny_llama), soft).eval(), session,
                               lambda e: list(e.after))
    assert np.abs(soft_logits - expected).max() > 1e-3


@pytest.mark.parametrize("per_layer_z", [False, True])
def test_prefix_export_loads_in_peft_and_reproduces_the_engine(tiny_llama, tmp_path, per_layer_z):
    """The prefix kind's keys and values, with the BOS ahead of them folded in, are PEFT's
    prefix tuning as they are: no --fold-prefix needed."""
    n = 3
    config = DeltaConfig("prefix", prompt_length=n, intrinsic_dim=DIM, seed=3, per_layer_z=per_layer_z)
    layers = tiny_llama.num_layers
    z = random_z() if not per_layer_z else np.concatenate([random_z(seed=l) for l in range(layers)])
    template = template_for(tiny_llama)
    session, expected = engine_logits(tiny_llama, config, z, template)
    folder = tmp_path / "prefix"
    manifest = export_delta(tiny_llama, config, z, folder, template=template)
    assert manifest["kind"] == "prefix" and manifest["peft_type"] == "PREFIX_TUNING" and manifest["reproduces_engine"]
    assert manifest["prompt"]["folded_prefix"] == [tiny_llama.tokenizer.bos_token_id]
    model = peft.PeftModel.from_pretrained(fresh_model(tiny_llama), folder).eval()
    tuned = model_logits(model, session, lambda e: list(e.after), offset=-(n + 1))
    np.testing.assert_allclose(tuned, expected, rtol=0, atol=1e-5)


def test_prefix_export_is_refused_where_peft_differs(tiny_llama, tiny_roberta, tmp_path):
    config = DeltaConfig("prefix", prompt_length=2, intrinsic_dim=DIM)
    with pytest.raises(InvalidArgument, match="text ahead of the prefix"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "a", template=template_for(tiny_llama, "after"))
    with pytest.raises(InvalidArgument, match="only in a causal model"):
        export_delta(tiny_roberta, config, random_z(), tmp_path / "b", template=template_for(tiny_roberta))
    with pytest.raises(InvalidArgument, match="needs the run's template"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "c")
    with pytest.raises(InvalidArgument, match="drop --no-fold-prefix"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "d", template=template_for(tiny_llama),
                     fold_prefix=False)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_deep_prompt_prefix_is_refused_where_it_cannot_be_exact(tiny_llama, tiny_roberta, tmp_path):
    config = DeltaConfig("deep-prompt", prompt_length=2, intrinsic_dim=DIM)
    with pytest.raises(InvalidArgument, match="text ahead of the prompt"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "a", template=template_for(tiny_llama, "after"),
                     fold_prefix=True)
    with pytest.raises(InvalidArgument, match="only in a causal model"):
        export_delta(tiny_roberta, config, random_z(), tmp_path / "b", template=template_for(tiny_roberta),
                     fold_prefix=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_adamix_exports_its_merged_copies_as_the_base_kind(tiny_backbone, tmp_path):
    # AdaMix's inference form: what the engine scores every split but "train" with.
    config = DeltaConfig("adamix3:lora", prompt_length=0, intrinsic_dim=DIM, seed=3, projection_scale=2.0)
    z = random_z()
    engine = Engine(tiny_backbone)
    session = engine.create_session({"train": EXAMPLES, "dev": EXAMPLES}, template_for(tiny_backbone), VERBALIZER,
                                    config)
    merged = engine.evaluate(session.id, "dev", z[None]).logits[0]
    routed = engine.evaluate(session.id, "train", z[None]).logits[0]
    manifest = export_delta(tiny_backbone, config, z, tmp_path / "adamix")
    assert manifest["kind"] == "lora" and manifest["peft_type"] == "LORA" and "merged" in manifest["description"]
    assert manifest["delta_config"]["kind"] == "adamix3:lora"
    model = peft.PeftModel.from_pretrained(fresh_model(tiny_backbone), tmp_path / "adamix").eval()
    tuned = model_logits(model, session, lambda e: list(e.before) + list(e.after))
    np.testing.assert_allclose(tuned, merged, rtol=0, atol=1e-5)
    assert np.abs(tuned - routed).max() > 1e-4  # not the routed copies


@pytest.mark.parametrize("kind", ["lora+prompt", "unipelt:lora+adapter", "unipelt:lora"])
def test_combined_kinds_are_refused(tiny_llama, tmp_path, kind):
    config = DeltaConfig(kind, prompt_length=0, intrinsic_dim=DIM)
    with pytest.raises(InvalidArgument, match="combines kinds.*exportable kinds: lora, prompt, bias, "
                                              "adapter, deep-prompt"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_deep_prompt_hooks_leave_decoding_steps_alone(tiny_llama, tmp_path):
    """With a KV cache, a later step's hidden states do not reach the prompt positions
    (the prompt is in the cache): the hooks leave them as they are."""
    n = 2
    config = DeltaConfig("deep-prompt", prompt_length=n, intrinsic_dim=DIM, seed=3)
    export_delta(tiny_llama, config, random_z(), tmp_path / "deep")
    model = fresh_model(tiny_llama)
    prompt = load_prompt(tmp_path / "deep")
    ids = [tiny_llama.tokenizer.bos_token_id, 0, 0, 5, 6, 7]
    with torch.no_grad(), apply_deep_prompt(model, tmp_path / "deep", [1, 2]):
        full = model(inputs_embeds=splice_prompt(model, ids, prompt, [1, 2])).logits[0, -1]
        first = model(inputs_embeds=splice_prompt(model, ids[:-1], prompt, [1, 2]), use_cache=True)
        step = model(input_ids=torch.tensor([ids[-1:]]), cache=first.cache).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, prompt_length, says", [("lora", 0, "the adapter changes nothing"),
                                                       ("prompt", 2, "the untuned initial prompt")])
def test_a_zero_z_is_flagged_as_exporting_nothing_tuned(tiny_llama, tmp_path, kind, prompt_length, says):
    """A run that never beat zero-shot keeps z = 0: the export is its untuned start."""
    config = DeltaConfig(kind, prompt_length=prompt_length, intrinsic_dim=DIM, seed=3)
    manifest = export_delta(tiny_llama, config, np.zeros(DIM, np.float32), tmp_path / "zero",
                            template=template_for(tiny_llama))
    assert manifest["z_norm"] == 0 and manifest["reproduces_engine"]
    assert len(manifest["warnings"]) == 1 and "z is all zeros" in manifest["warnings"][0]
    assert says in manifest["warnings"][0]
    assert not export_delta(tiny_llama, config, random_z(), tmp_path / "tuned",
                            template=template_for(tiny_llama))["warnings"]


def test_refusals(tiny_llama, tmp_path):
    config = DeltaConfig("lora", prompt_length=0, intrinsic_dim=DIM)
    with pytest.raises(InvalidArgument, match="6 finite numbers"):
        materialise(tiny_llama, config, np.zeros(5, np.float32))
    with pytest.raises(InvalidArgument, match="only a soft or deep prompt can fold"):
        materialise(tiny_llama, config, random_z(), fold_prefix=True)
    assert materialise(tiny_llama, config, random_z(), fold_prefix=False).reproduces_engine  # nothing to fold
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not empty"):
        export_delta(tiny_llama, config, random_z(), tmp_path / "full")
    export_delta(tiny_llama, config, random_z(), tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # only our own files are replaced
    assert {p.name for p in (tmp_path / "full").iterdir()} == {"keep.txt", ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST}


def test_delta_spec_of_run_matches_the_tuner():
    run = {"delta": "lora", "prompt_length": 50, "dim": 8, "projection": "sparse", "seed": 21, "alpha": 2.0,
           "sigma": 0.5, "rank": 2, "targets": "q_proj, o_proj"}
    assert delta_spec_of_run(run) == DeltaSpec("lora", prompt_length=0, intrinsic_dim=8, projection="sparse",
                                               seed=21, projection_scale=4.0, rank=2, targets=("q_proj", "o_proj"))
    assert delta_spec_of_run({**run, "delta": "prompt", "rank": 0, "targets": ""}).prompt_length == 50
    with pytest.raises(RunDirError, match="lacks 'dim'"):
        delta_spec_of_run({"delta": "lora", "seed": 1})


def test_cli_exports_a_tuned_run(tmp_path, capsys):
    from blackbox.cli import main
    from tests.integration.test_cli import TINY_RUN

    run = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(run), "--delta", "lora", "--lora-rank", "2"]) == 0
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out), "--model", "tiny-llama"]) == 0
    assert "exported the lora delta" in capsys.readouterr().out
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, "base/config.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["run_config"]["delta"] == "lora" and manifest["delta_config"]["rank"] == 2
    assert manifest["z_norm"] == pytest.approx(float(np.linalg.norm(np.load(run / "best_z.npy"))))

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = peft.PeftModel.from_pretrained(base, out)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules()) == 4

    # An export is never overwritten by accident; a run folder without a run is a clear error.
    assert main(["export", "--run", str(run), "--out", str(out), "--model", "tiny-llama"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(out), "--model", "tiny-llama", "--overwrite"]) == 0
    assert main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "e2")]) == 2
    assert "holds no finished run" in capsys.readouterr().err

    # A run that never beat its zero-shot start exports z = 0: the command says so.
    np.save(run / "best_z.npy", np.zeros_like(np.load(run / "best_z.npy")))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "zero"), "--model", "tiny-llama"]) == 0
    printed = capsys.readouterr()
    assert "warning: z is all zeros" in printed.err and "the adapter changes nothing" in printed.err
    assert "warning" not in printed.out
