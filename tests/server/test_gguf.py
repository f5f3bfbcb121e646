"""Any GGUF file that transformers reads loads as a backbone: dequantised once into a
safetensors folder of its own under the cache directory (keyed by the file's path, size
and modification time), the bundled model through the same function; a missing .gguf or
an unknown name is answered with what to pass instead.

The GGUF here is written by the test from a tiny random Llama (llama.cpp's layout: its
tensor names, query and key rows permuted for its rotary code, a byte-level BPE
vocabulary), so nothing is downloaded."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from backbone_server import models
from backbone_server.errors import NotFound
from backbone_server.models import bundled_model_folder, gguf_folder, load_backbone, model_folder

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS = 4, 2


def _permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a query or key projection (transformers reverses it on load)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_llama_gguf(path):
    """A 2-layer Llama written as an F32 GGUF at `path`; returns the model it holds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e"]
    tokens = byte_tokens + ["Ġt", "he", "<|endoftext|>"]
    end = len(tokens) - 1
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=end, eos_token_id=end,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(64 // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(end)
    writer.add_eos_token_id(end)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        weight = tensor.numpy()
        if module.endswith("q_proj"):
            weight = _permuted(weight, HEADS)
        elif module.endswith("k_proj"):
            weight = _permuted(weight, KV_HEADS)
        writer.add_tensor(f"{names.get_name(module)}.{kind}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("BLACKBOX_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "models" / "tiny-llama.gguf"
    path.parent.mkdir()
    return path, write_tiny_llama_gguf(path)


def test_a_gguf_path_loads_as_the_model_it_holds(tiny_gguf, cache):
    path, source = tiny_gguf
    backbone = load_backbone(str(path), device="cpu", dtype="float32")
    assert backbone.architecture == "causal" and backbone.num_layers == 2 and backbone.max_length == 256
    ids = torch.tensor([[1, 5, 70, 200, 3, 9]])
    with torch.no_grad():
        np.testing.assert_allclose(backbone.model(input_ids=ids).logits.numpy(),
                                   source(input_ids=ids).logits.numpy(), rtol=0, atol=1e-5)
    assert backbone.tokenizer("the")["input_ids"]  # the file's own tokenizer came with it
    folder = model_folder(str(path))
    assert folder.parent == cache and folder.name.startswith("tiny-llama-")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()


def test_each_file_gets_its_own_copy_made_once(tiny_gguf, cache, monkeypatch):
    path, _ = tiny_gguf
    first = gguf_folder(path)
    converted = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        import transformers

        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
        assert gguf_folder(path) == first == gguf_folder(path.parent / ".." / "models" / path.name)
    assert (first / "model.safetensors").stat().st_mtime_ns == converted

    elsewhere = path.parent / "copy.gguf"  # another file, another folder
    shutil.copy(path, elsewhere)
    copy = gguf_folder(elsewhere)
    stat = path.stat()  # the same path, replaced: converted again
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    replaced = gguf_folder(path)
    assert len({first, copy, replaced}) == 3
    assert sorted(cache.iterdir()) == sorted([first, copy, replaced])  # no staging folder left behind


def test_the_bundled_model_goes_through_the_same_conversion(tiny_gguf, cache, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setattr(models, "bundled_gguf_path", lambda: path)
    assert bundled_model_folder() == gguf_folder(path) == model_folder(models.BUNDLED_MODEL)


def test_a_missing_gguf_file_says_so(tmp_path, cache):
    with pytest.raises(NotFound, match="no GGUF file") as caught:
        load_backbone(str(tmp_path / "nowhere.gguf"), device="cpu")
    assert "unknown model" not in str(caught.value)
    assert not cache.exists()


def test_an_unknown_model_says_what_would_load(tmp_path):
    with pytest.raises(NotFound, match="unknown model 'no-such-model'") as caught:
        load_backbone("no-such-model", device="cpu")
    message = str(caught.value)
    assert "tiny-gpt2" in message and "Hugging Face model folder" in message and ".gguf file" in message
    assert model_folder(str(tmp_path)) == tmp_path  # a folder is its own
