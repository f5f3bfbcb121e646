"""Soft prompt from the intrinsic subspace (BBT): prompt = A z + p0.

Export: PEFT's PROMPT_TUNING, `prompt_embeddings`: the prompt as the engine splices it
(n x h), after the embeddings of the template's constant tokens ahead of it (a BOS),
folded in by default. PEFT prepends the virtual tokens to the whole input, so that
reproduces the engine exactly; a prompt after the text (`--placement after`, `tail`)
never does, and goes out unfolded with the reason and the exact way (`splice_prompt`).
"""

from __future__ import annotations

import functools
import re

import torch

from backbone_server.deltas.base import Delta, DeltaConfig, register_delta
from backbone_server.deltas.exported import (
    POSITION_WORDS,
    Exported,
    ExportRequest,
    folded_prefix_note,
    peft_load,
    store,
    tokens_to_fold,
)
from backbone_server.deltas.budget import (
    FLOAT_BYTES,
    current_budget,
    delta_bytes_estimate,
    reserved_projection,
)
from backbone_server.errors import InvalidArgument, shown
from backbone_server.projection import seeded_generator

WORD_TOKEN = re.compile(r"^ ?[A-Za-z]{3,}$")


@functools.lru_cache(maxsize=8)
def _word_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids of the tokens that decode to a word, once per tokenizer (decoding a 49k
    vocabulary takes ~0.4 s, which every session would otherwise pay again)."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    return torch.tensor([
        i for i, text in enumerate(texts) if i not in special and WORD_TOKEN.match(text)
    ] or [i for i in range(vocab_size) if i not in special])


def initial_prompt_token_ids(tokenizer, vocab_size: int, length: int, seed: int, text: str = "") -> list[int]:
    """p0's tokens: `text`'s tokens repeated or cut to `length` (initialisation from task
    words, as prompt tuning initialises from the class labels); without text, `length`
    word tokens of the vocabulary drawn with `seed` (BBT's init).

    Only tokens that decode to a word are drawn: large BPE vocabularies are full of code
    and byte fragments, which as a prompt cost the bundled SmolLM2 up to 25 points of
    zero-shot SST-2 accuracy.
    """
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidArgument(f"init_text {text[:40]!r} has no tokens")
        return [ids[i % len(ids)] for i in range(length)]
    candidates = _word_token_ids(tokenizer, vocab_size)
    generator = seeded_generator(seed)
    picks = torch.randint(len(candidates), (length,), generator=generator)
    return candidates[picks].tolist()


@register_delta
class SoftPrompt(Delta):
    name = "prompt"
    summary = "a soft prompt A z + p0 of prompt_length vectors at {prompt} (BBT)"
    takes_prompt = True
    peft_type = "PROMPT_TUNING"

    def __init__(self, config: DeltaConfig, backbone):
        super().__init__(config, backbone)
        embeddings = backbone.embeddings.weight
        size = config.prompt_length * backbone.hidden_size
        # Its projection and p0 (D float32 values), checked before either is allocated.
        budget = current_budget()
        budget.check(delta_bytes_estimate(config.projection, config.intrinsic_dim, size, vectors=1),
                     f"a soft prompt of {config.prompt_length:,} vectors (D = {size:,}) through a "
                     f"{shown(config.projection)} projection from d = {config.intrinsic_dim:,}")
        budget.reserve(size * FLOAT_BYTES, f"p0, {config.prompt_length:,} vectors")
        self.initial_token_ids = initial_prompt_token_ids(
            backbone.tokenizer, embeddings.shape[0], config.prompt_length, config.seed, config.init_text
        )
        ids = torch.tensor(self.initial_token_ids, device=embeddings.device)
        # p0 in fp32: the sum A z + p0 is formed before casting to the model's dtype.
        self.initial_prompt = embeddings[ids].detach().float()
        std = config.projection_scale * embeddings.float().std().item() / config.intrinsic_dim ** 0.5
        self.projection = reserved_projection(
            config.projection,
            in_dim=config.intrinsic_dim,
            out_dim=size,
            seed=config.seed,
            std=std,
            device=embeddings.device,
        )
        self.description = f"soft prompt of {config.prompt_length} vectors"

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        population = z.shape[0]
        offsets = self.projection(z).view(population, self.prompt_length, -1)
        return (offsets + self.initial_prompt).to(self.dtype)

    def export(self, z: torch.Tensor, request: ExportRequest) -> Exported:
        backbone = request.backbone
        fold = tokens_to_fold(request)
        prompt = self.prompts(z)[0]  # (n, h) in the model's dtype, as the engine splices it
        if fold:
            ids = torch.tensor(list(fold), device=backbone.embeddings.weight.device)
            prompt = torch.cat([backbone.embeddings(ids).to(prompt), prompt])
        config = backbone.model.config
        causal = backbone.architecture == "causal"
        # Masked LMs: FEATURE_EXTRACTION prepends the prompt and returns the base model's output.
        adapter = {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM" if causal else "FEATURE_EXTRACTION",
            "base_model_name_or_path": request.base_model, "revision": None, "inference_mode": True,
            "num_virtual_tokens": prompt.shape[0], "token_dim": backbone.hidden_size,
            "num_transformer_submodules": 1, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "modules_to_save": None,
        }
        load = peft_load(backbone)
        return Exported(
            self.name, {"prompt_embeddings": store(prompt)}, adapter,
            f"{load}; {folded_prefix_note(fold, 'embeddings')}" if fold else load, self.description,
            why_not_reproduced=None if fold is not None else _why_not_reproduced(request),
            prompt={**(request.placement or {}), "folded_prefix": list(fold or [])},
        )


def _why_not_reproduced(request: ExportRequest) -> str | None:
    """Why PEFT's prompt tuning of the unfolded prompt differs from the engine: it puts the
    virtual tokens before the whole input, the engine where the template says {prompt}."""
    placement = request.placement
    splice = ("to score as the run did, put the vectors where the template says {prompt} yourself: "
              "model(inputs_embeds=backbone_server.export.splice_prompt(model, ids, "
              "backbone_server.export.load_prompt(THIS_FOLDER), P)), with n placeholder ids at those positions P")
    if placement is None:
        return f"the run's template was not given, so where the run put the prompt is not known; {splice}"
    if placement["prompt_first"]:
        return None
    if placement["tokens_before_prompt"] is None:
        return (f"PEFT puts the virtual tokens before the whole input, but the run's prompt was "
                f"{POSITION_WORDS[placement['prompt_position']]}, which no PEFT prompt reproduces; {splice}")
    return (f"exported without the template's tokens ahead of the prompt ({placement['tokens_before_prompt']}), "
            "so PEFT puts the vectors before them and scores differ from the run's; export again without "
            "--no-fold-prefix for the exact form")
