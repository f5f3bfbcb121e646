"""Tiny random models and their tokenizer, built entirely in code (tests and smoke runs).

No file is downloaded: the tokenizer is a WordPiece vocabulary of common English words
(every verbalizer and template word of the built-in tasks among them) plus single
characters, so any text tokenizes and each verbalizer word is a single token.

Three architectures, one per way the delta kinds find and hook modules: a Llama (Linear
projections without biases, RMSNorm, rotary positions), a RoBERTa masked LM (biased
Linear modules, LayerNorm, learned positions offset by the padding index) and a GPT-2
(Conv1D projections with their weights stored (in, out), a fused c_attn).
"""

from __future__ import annotations

import string
import threading

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]

# Tokens every tiny model takes. The tokenizer spells a word outside its vocabulary letter
# by letter, so the built-in tasks' texts run long: the longest (a DBPedia test text) is
# about 3,050 tokens, RTE's 860, SST-2's 180; 4096 leaves room for a prompt.
MAX_LENGTH = 4096

# Weights are drawn from torch's global generator (the model classes offer no other), so
# two servers loading tiny models at once in one process would interleave their draws.
_BUILD_LOCK = threading.Lock()


def _seeded(build, seed: int):
    """build() with the global generator seeded, one at a time, and the caller's state kept."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()

_WORDS = """
the a an and or but of to in on at for with by from as is was were be been it its this that
these those there here he she they we you i his her their our your my not no yes maybe true
false same meaning question answer topic category news it was great bad good terrible movie
film book story world sports business tech company education artist athlete office
transportation building natural village animal plant album written science politics game
team market stock price school university music band player player president minister car
ship train river mountain town species tree song novel play love hate best worst very really
too so all one two three new old first last more most some any what which who when where why
how do does did have has had will would can could should may might must about after before
over under up down out into than then just also only even still well much many time year day
people man woman men women child children life work way part place case point group number fact
""".split()


def build_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A deterministic WordPiece tokenizer; `kind` picks the special-token layout."""
    characters = list(string.ascii_letters + string.digits + string.punctuation)
    vocab_list = SPECIAL_TOKENS + characters + [f"##{c}" for c in characters]
    vocab_list += [w for w in dict.fromkeys(_WORDS + [w.capitalize() for w in _WORDS]) if w not in vocab_list]
    vocab = {token: index for index, token in enumerate(vocab_list)}

    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=50))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    if kind == "causal":
        # Like Llama: a BOS token starts every sequence, nothing closes it.
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def build_tiny_llama(seed: int = 0):
    """A 2-layer Llama (grouped-query attention, tied embeddings) with random weights."""
    tokenizer = build_tokenizer("causal")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed), tokenizer


def build_tiny_roberta(seed: int = 0):
    """A 2-layer RoBERTa masked LM with random weights."""
    tokenizer = build_tokenizer("masked")
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        # RoBERTa's positions start after the padding index: pad_token_id + 1 of them are never used.
        max_position_embeddings=MAX_LENGTH + tokenizer.pad_token_id + 1,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(lambda: RobertaForMaskedLM(config), seed), tokenizer


def build_tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D projections, learned positions, tied embeddings) with random weights."""
    tokenizer = build_tokenizer("causal")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_inner=128,
        n_layer=2,
        n_head=4,
        n_positions=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(lambda: GPT2LMHeadModel(config), seed), tokenizer


BUILDERS = {"tiny-llama": build_tiny_llama, "tiny-roberta": build_tiny_roberta, "tiny-gpt2": build_tiny_gpt2}


def build_tiny(name: str, seed: int = 0):
    """(model, tokenizer) of the tiny model `name` (one of backbone_server.models.TINY_MODELS)."""
    return BUILDERS[name](seed)
