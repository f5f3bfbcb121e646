"""Soft prompt from the intrinsic subspace (BBT): prompt = A z + p0."""

from __future__ import annotations

import functools
import re

import torch

from backbone_server.deltas.base import Delta, DeltaConfig, register_delta
from backbone_server.errors import InvalidArgument
from backbone_server.projection import make_projection


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


def initial_prompt_token_ids(tokenizer, vocab_size: int, length: int, seed: int) -> list[int]:
    """p0's tokens: `length` word tokens of the vocabulary drawn with `seed` (BBT's init).

    Only tokens that decode to a word are drawn: large BPE vocabularies are full of code
    and byte fragments, which as a prompt cost the bundled SmolLM2 up to 25 points of
    zero-shot SST-2 accuracy.
    """
    candidates = _word_token_ids(tokenizer, vocab_size)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    picks = torch.randint(len(candidates), (length,), generator=generator)
    return candidates[picks].tolist()


@register_delta("prompt")
class SoftPrompt(Delta):
    def __init__(self, config: DeltaConfig, backbone):
        if config.prompt_length < 1:
            raise InvalidArgument("a soft prompt needs prompt_length >= 1")
        if config.rank or config.targets:
            raise InvalidArgument("a soft prompt takes no rank or targets (those are for weight kinds)")
        self.config = config
        self.prompt_length = config.prompt_length
        self.hidden_size = backbone.hidden_size
        embeddings = backbone.embeddings.weight
        self.initial_token_ids = initial_prompt_token_ids(
            backbone.tokenizer, embeddings.shape[0], config.prompt_length, config.seed
        )
        ids = torch.tensor(self.initial_token_ids, device=embeddings.device)
        # p0 in fp32: the sum A z + p0 is formed before casting to the model's dtype.
        self.initial_prompt = embeddings[ids].detach().float()
        std = config.projection_scale * embeddings.float().std().item() / config.intrinsic_dim ** 0.5
        self.projection = make_projection(
            config.projection,
            in_dim=config.intrinsic_dim,
            out_dim=config.prompt_length * backbone.hidden_size,
            seed=config.seed,
            std=std,
            device=embeddings.device,
        )
        self.dtype = backbone.dtype

    def prompts(self, z: torch.Tensor) -> torch.Tensor:
        population = z.shape[0]
        offsets = self.projection(z).view(population, self.prompt_length, -1)
        return (offsets + self.initial_prompt).to(self.dtype)
