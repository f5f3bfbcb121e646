"""Materialising a tuned delta (one z) as weights, in PEFT's adapter layout where PEFT has the kind.

Pure torch and safetensors (PEFT is needed only to load the result, not to write it).

* `materialise(backbone, config, z)` builds the delta of `config` on `backbone` and returns
  its tensors for the single vector z, keyed as they are stored:
  - "lora": per target Linear `base_model.model.<path>.lora_A.weight` (r x in) and
    `...lora_B.weight` (out x r), PEFT's names, from `delta.parameters(z)`; the update is
    x A^T B^T, PEFT's with lora_alpha = r (scaling 1);
  - "prompt": `prompt_embeddings` (n x h), the soft prompt from `delta.prompts(z)`,
    optionally preceded by the embeddings of the template's constant tokens ahead of it
    (`fold_prefix`, see `prompt_placement`);
  - "bias": per shifted module `base_model.model.<path>.bias_shift` (width,), the vector
    added to that module's output (no PEFT kind; `apply_bias_shift` applies it);
  - "adapter": per adapted module `base_model.model.<path>.adapter_down.weight` (m x h) and
    `...adapter_up.weight` (h x m): the module's output y becomes
    y + adapter_up(gelu(adapter_down(y))) (no PEFT kind; `apply_adapters` applies it);
  - "deep-prompt": `prompt_embeddings` (n x h), the input prompt (as the soft prompt's),
    and `layers.<l>.prompt_offset` (n x h) for every layer l >= 1, added to the hidden
    states at the prompt positions entering layer l (no PEFT kind: `splice_prompt` puts
    the prompt into inputs_embeds, `apply_deep_prompt` adds the offsets);
  - "deep-prompt" with `fold_prefix` (causal models, prompt ahead of the texts): PEFT's
    prefix tuning. In a causal model the prompt's keys and values at every layer depend
    on nothing after them, so for one z they are constants: `prompt_embeddings` (k + n x
    num_layers * 2 * kv_heads * head_dim) holds, per position of (the k constant tokens
    ahead of the prompt, then the n prompt vectors), the keys and values every layer
    computes there with the deep prompt applied, in PEFT's layout (per layer: keys, then
    values). PEFT feeds them as past_key_values ahead of the rest of the input, which
    then sits at the positions it had in the engine.
  `<path>` is the module's name in `backbone.model` (e.g. model.layers.0.self_attn.q_proj).
  "adamixM:KIND" goes out as KIND with the M copies' parameters averaged (AdaMix's merged
  inference form, what the engine scores dev and test with). Combinations ("+") and
  UniPELT gates ("unipelt:") are refused.
* `export_delta(...)` writes a folder: adapter_config.json, adapter_model.safetensors
  (float32) and blackbox_export.json (the run's settings, z's norm, the files, how to load).
* `export_run(run_dir, out, ...)` does it for a finished `blackbox tune` run folder
  (config.json, result.json, best_z.npy), building the DeltaConfig as the tuner does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backbone_server.deltas import build_delta
from backbone_server.deltas.base import DeltaConfig
from backbone_server.deltas.deep_prompt import _hidden_of, _with_hidden, find_layers
from backbone_server.encoding import TemplateEncoder
from backbone_server.errors import InvalidArgument, NotFound
from backbone_server.models import BUNDLED_MODEL, TINY_MODELS, Backbone

EXPORT_FORMAT = 1
EXPORTABLE_KINDS = ("lora", "prompt", "bias", "adapter", "deep-prompt")
PROMPT_KINDS = ("prompt", "deep-prompt")
ADAMIX_KIND = re.compile(r"adamix\d*:(lora|adapter|bias)")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "blackbox_export.json"
BASE_FOLDER = "base"
OUR_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)


@dataclass
class Materialised:
    """One z's delta as named float32 CPU tensors, with what describes it."""

    kind: str
    tensors: dict[str, torch.Tensor]
    modules: list[str] = field(default_factory=list)  # full module paths in backbone.model (weight kinds;
    # deep-prompt: the layers 0 .. num_layers - 1)
    description: str = ""
    rank: int = 0
    num_virtual_tokens: int = 0
    folded_prefix: list[int] = field(default_factory=list)  # token ids whose embeddings lead the prompt
    as_prefix: tuple[int, int] | None = None  # deep prompt as PEFT prefix keys/values: (kv_heads, head_dim)


def _module_paths(backbone: Backbone, modules) -> list[str]:
    """The names in `backbone.model` of the (name, module) pairs a delta found under the body."""
    paths = {id(module): name for name, module in backbone.model.named_modules()}
    missing = [name for name, module in modules if id(module) not in paths]
    if missing:
        raise InvalidArgument(f"modules {missing} are not part of the model")
    return [paths[id(module)] for _, module in modules]


def _store(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def prompt_placement(backbone: Backbone, template: str, prompt_length: int) -> dict:
    """Where the run's template puts the soft prompt: its position relative to the texts,
    the tokens ahead of it when those do not depend on the example (the tokenizer's BOS,
    literal text), and whether it is the very first thing of the model's input (the only
    placement PEFT's prompt tuning, which prepends the virtual tokens, reproduces as is)."""
    encoder = TemplateEncoder(backbone.tokenizer, template, backbone.architecture, prompt_length,
                              backbone.max_length)
    before = list(encoder.encode("x", "x", 0, True, 0).before)
    start = encoder.prompt_position == "start"
    return {
        "prompt_position": encoder.prompt_position,
        "tokens_before_prompt": before if start else None,  # None: they depend on the example
        "prompt_first": start and not before,
    }


def materialise(backbone: Backbone, config: DeltaConfig, z: np.ndarray | torch.Tensor,
                fold_prefix: list[int] | None = None) -> Materialised:
    """The delta of `config` on `backbone` for one z (d,), as stored tensors.

    `fold_prefix` (prompt kind only): token ids whose input embeddings are put ahead of
    the prompt vectors, so that PEFT's prompt (prepended to the whole input) equals the
    tokens ahead of {prompt} followed by the prompt.
    """
    adamix = ADAMIX_KIND.fullmatch(config.kind)
    if ("+" in config.kind or ":" in config.kind) and not adamix:
        raise InvalidArgument(f"delta kind {config.kind!r} combines kinds ('+', 'unipelt:'), which cannot be "
                              f"exported; exportable kinds: {', '.join(EXPORTABLE_KINDS)} (one kind each), and "
                              "adamix:KIND (its copies merged)")
    kind = adamix.group(1) if adamix else config.kind
    if kind not in EXPORTABLE_KINDS:
        raise InvalidArgument(f"delta kind {config.kind!r} cannot be exported; exportable kinds: "
                              f"{', '.join(EXPORTABLE_KINDS)}")
    if fold_prefix is not None and kind not in PROMPT_KINDS:
        raise InvalidArgument("only a soft or deep prompt can fold the tokens ahead of it")
    if fold_prefix is not None and config.kind == "deep-prompt" and backbone.architecture != "causal":
        raise InvalidArgument("a deep prompt becomes a PEFT prefix only in a causal model: a masked model reads "
                              "the prompt and the text both ways, so the prompt's keys and values depend on the "
                              "text; export it without --fold-prefix (blackbox's own format, exact)")
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    delta = build_delta(config, backbone)
    if z.shape != (delta.z_dim,) or not torch.isfinite(z).all():
        raise InvalidArgument(f"z must be {delta.z_dim} finite numbers, got shape {tuple(z.shape)}")
    z = z[None].to(backbone.device)
    with torch.no_grad():
        if config.kind == "prompt":
            prompt = delta.prompts(z)[0]  # (n, h) in the model's dtype, as the engine splices it
            if fold_prefix:
                ids = torch.tensor(list(fold_prefix), device=backbone.embeddings.weight.device)
                prompt = torch.cat([backbone.embeddings(ids).to(prompt), prompt])
            return Materialised("prompt", {"prompt_embeddings": _store(prompt)},
                                description=f"soft prompt of {config.prompt_length} vectors",
                                num_virtual_tokens=prompt.shape[0], folded_prefix=list(fold_prefix or []))
        if config.kind == "deep-prompt" and fold_prefix is not None:
            return _deep_prompt_prefix(backbone, delta, z, list(fold_prefix))
        if config.kind == "deep-prompt":
            n, h = config.prompt_length, backbone.hidden_size
            layers = find_layers(backbone.body, backbone.num_layers)
            paths = _module_paths(backbone, [(str(i), layer) for i, layer in enumerate(layers)])
            tensors = {"prompt_embeddings": _store(delta.prompts(z)[0])}
            params = delta.parameters(z)[0]
            for l in range(1, len(layers)):
                tensors[f"layers.{l}.prompt_offset"] = _store(params[(l - 1) * n * h:l * n * h].reshape(n, h))
            return Materialised("deep-prompt", tensors, paths, delta.description, num_virtual_tokens=n)
        params = delta.parameters(z)[0]
        description = delta.description
        if adamix:  # AdaMix's inference form: the copies' parameters averaged into one module
            params = params.view(delta.num_copies, delta.size).mean(dim=0)
            delta, description = delta.copies[0], f"{description}, merged by averaging"
        paths = _module_paths(backbone, delta.modules)
        tensors = {}
        if kind == "lora":
            r = delta.rank
            for path, (_, offset, fan_in, fan_out) in zip(paths, delta.layout):
                a = params[offset:offset + r * fan_in].reshape(r, fan_in)
                b = params[offset + r * fan_in:offset + r * (fan_in + fan_out)].reshape(fan_out, r)
                tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = _store(a)
                tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = _store(b)
            return Materialised("lora", tensors, paths, description, rank=r)
        if kind == "adapter":
            m = delta.size_m
            for path, (_, offset, width) in zip(paths, delta.layout):
                down = params[offset:offset + m * width].reshape(m, width)
                up = params[offset + m * width:offset + 2 * m * width].reshape(width, m)
                tensors[f"{PEFT_PREFIX}{path}.adapter_down.weight"] = _store(down)
                tensors[f"{PEFT_PREFIX}{path}.adapter_up.weight"] = _store(up)
            return Materialised("adapter", tensors, paths, description, rank=m)
        for path, (_, offset, width) in zip(paths, delta.layout):
            tensors[f"{PEFT_PREFIX}{path}.bias_shift"] = _store(params[offset:offset + width])
        return Materialised("bias", tensors, paths, description)


def _deep_prompt_prefix(backbone: Backbone, delta, z: torch.Tensor, ahead: list[int]) -> Materialised:
    """The keys and values of (the tokens `ahead`, then the deep prompt) at every layer,
    in the layout of PEFT's prefix-tuning embedding."""
    device = backbone.embeddings.weight.device
    prompt = delta.prompts(z)  # (1, n, h)
    embeds = torch.cat([backbone.embeddings(torch.tensor(ahead, dtype=torch.long, device=device))[None].to(prompt),
                        prompt], dim=1)
    n, k = prompt.shape[1], len(ahead)
    slots = torch.tensor([[-1] * k + list(range(n))], device=device)
    with delta.patched(delta.parameters(z), slots):
        output = backbone.body(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                                 device=device), use_cache=True)
    rows = []
    for layer in output.past_key_values.layers:  # keys, values: (1, kv_heads, k + n, head_dim)
        for states in (layer.keys, layer.values):
            rows.append(states[0].transpose(0, 1).reshape(k + n, -1))
    _, kv_heads, _, head_dim = output.past_key_values.layers[0].keys.shape
    return Materialised("deep-prompt", {"prompt_embeddings": _store(torch.cat(rows, dim=1))},
                        description=f"{delta.description}, as the keys and values of a {k + n}-token prefix",
                        num_virtual_tokens=k + n, folded_prefix=ahead, as_prefix=(kv_heads, head_dim))


def _adapter_config(backbone: Backbone, item: Materialised, base_model: str | None) -> dict:
    causal = backbone.architecture == "causal"
    if item.kind == "lora":
        # task_type None (a plain PeftModel) for masked LMs: PEFT has no masked-LM task.
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
            "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
            "r": item.rank, "lora_alpha": item.rank, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
            "target_modules": item.modules, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }
    if item.kind == "prompt":
        config = backbone.model.config
        # Masked LMs: FEATURE_EXTRACTION prepends the prompt and returns the base model's output.
        return {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM" if causal else "FEATURE_EXTRACTION",
            "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
            "num_virtual_tokens": item.num_virtual_tokens, "token_dim": backbone.hidden_size,
            "num_transformer_submodules": 1, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "modules_to_save": None,
        }
    if item.kind == "adapter":
        return {
            "peft_type": "BLACKBOX_ADAPTER", "task_type": None, "base_model_name_or_path": base_model,
            "bottleneck_size": item.rank, "activation": "gelu", "activation_approximate": "none",
            "target_modules": item.modules,
            "placement": "on the output of each target module (a module returning a tuple: its first element): "
                         "y -> y + adapter_up(gelu(adapter_down(y))), before the model's residual addition "
                         "and norm",
            "description": f"{item.description}: adapter_model.safetensors holds, per module, "
                           "'base_model.model.<module path>.adapter_down.weight' (m x h) and "
                           "'.adapter_up.weight' (h x m), bias-free Linear weights; gelu is the exact (erf) "
                           "GELU. Not a PEFT type: apply it with backbone_server.export.apply_adapters(model, folder).",
        }
    if item.kind == "deep-prompt" and item.as_prefix:
        kv_heads, head_dim = item.as_prefix
        return {
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "revision": None, "inference_mode": True, "num_virtual_tokens": item.num_virtual_tokens,
            "token_dim": kv_heads * head_dim, "num_transformer_submodules": 1, "num_attention_heads": kv_heads,
            "num_layers": backbone.num_layers, "encoder_hidden_size": backbone.hidden_size,
            "prefix_projection": False, "modules_to_save": None,
        }
    if item.kind == "deep-prompt":
        return {
            "peft_type": "BLACKBOX_DEEP_PROMPT", "task_type": None, "base_model_name_or_path": base_model,
            "num_virtual_tokens": item.num_virtual_tokens, "token_dim": backbone.hidden_size,
            "num_layers": len(item.modules), "layer_modules": item.modules,
            "description": f"{item.description}: adapter_model.safetensors holds 'prompt_embeddings' (n x h), the "
                           "input vectors that take the n prompt positions of inputs_embeds (where the template "
                           "says {prompt}), and 'layers.<l>.prompt_offset' (n x h) for l >= 1, added to the "
                           "hidden states at those positions entering layer l (layer_modules[l]). Not a PEFT "
                           "type: build inputs_embeds with backbone_server.export.splice_prompt and add the "
                           "offsets with backbone_server.export.apply_deep_prompt(model, folder, positions).",
        }
    return {
        "peft_type": "BLACKBOX_BIAS", "task_type": None, "base_model_name_or_path": base_model,
        "description": f"{item.description}: adapter_model.safetensors holds, per module, "
                      "'base_model.model.<module path>.bias_shift', a vector added to the module's output "
                      "(for a Linear with a bias, exactly a change of that bias). Not a PEFT type: apply it "
                      "with backbone_server.export.apply_bias_shift(model, folder).",
        "target_modules": item.modules,
    }


def _how_to_load(backbone: Backbone, item: Materialised, placement: dict | None) -> str:
    auto = "AutoModelForCausalLM" if backbone.architecture == "causal" else "AutoModelForMaskedLM"
    if item.kind == "bias":
        return (f"model = transformers.{auto}.from_pretrained(BASE); "
                "backbone_server.export.apply_bias_shift(model, THIS_FOLDER)")
    if item.kind == "adapter":
        return (f"model = transformers.{auto}.from_pretrained(BASE); "
                "backbone_server.export.apply_adapters(model, THIS_FOLDER)")
    if item.kind == "deep-prompt" and not item.as_prefix:
        return (f"model = transformers.{auto}.from_pretrained(BASE); encode each row as the template says with "
                f"{item.num_virtual_tokens} placeholder ids (any valid id) where {{prompt}} is, at positions P; "
                "with backbone_server.export.apply_deep_prompt(model, THIS_FOLDER, P): "
                "model(inputs_embeds=backbone_server.export.splice_prompt(model, ids, "
                "backbone_server.export.load_prompt(THIS_FOLDER), P), attention_mask=...)")
    load = f"peft.PeftModel.from_pretrained(transformers.{auto}.from_pretrained(BASE), THIS_FOLDER)"
    if item.kind == "lora":
        return load
    if item.folded_prefix:
        what = "keys and values" if item.as_prefix else "embeddings"
        return (f"{load}; the first {len(item.folded_prefix)} virtual tokens are the {what} of the "
                f"template's tokens ahead of the prompt ({item.folded_prefix}): feed the rest of the "
                "template's tokens without them (add_special_tokens=False for a BOS)")
    if placement and not placement["prompt_first"]:
        return (f"{load}; PEFT puts the virtual tokens before the whole input, while the run's template had "
                f"{'tokens ' + str(placement['tokens_before_prompt']) if placement['tokens_before_prompt'] else 'text'}"
                " ahead of the prompt, so the PEFT model does not reproduce the tuned scores exactly "
                "(export with --fold-prefix where the prompt precedes the texts)")
    return load


def _prepare_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InvalidArgument(f"{out} is not empty; choose another folder or pass --overwrite")
        for name in OUR_FILES:
            (out / name).unlink(missing_ok=True)
        if (out / BASE_FOLDER / "config.json").exists():
            shutil.rmtree(out / BASE_FOLDER)
    out.mkdir(parents=True, exist_ok=True)


def export_delta(backbone: Backbone, config: DeltaConfig, z: np.ndarray, out: str | Path, *,
                 template: str | None = None, run_config: dict | None = None, base_model: str | None = None,
                 fold_prefix: bool = False, overwrite: bool = False) -> dict:
    """Writes the delta of `config` for z as an adapter folder; returns the manifest.

    `template` (the run's) is needed for a soft prompt's placement and for `fold_prefix`;
    `base_model` is recorded as base_model_name_or_path.
    """
    from safetensors.torch import save_file

    z = np.asarray(z, dtype=np.float32)
    placement = prompt_placement(backbone, template, config.prompt_length) \
        if config.kind in PROMPT_KINDS and template else None
    folded = None
    if fold_prefix:
        if placement is None:
            raise InvalidArgument("folding the tokens ahead of the prompt needs a soft or deep prompt and its "
                                  "template")
        if placement["tokens_before_prompt"] is None:
            raise InvalidArgument("the run's template puts text ahead of the prompt; only the constant tokens "
                                  "of a prompt that precedes the texts can be folded into it")
        folded = placement["tokens_before_prompt"]
    item = materialise(backbone, config, z, fold_prefix=folded)
    out = Path(out)
    _prepare_folder(out, overwrite)
    save_file(item.tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "blackbox_kind": item.kind})
    adapter = _adapter_config(backbone, item, base_model)
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2) + "\n")
    if item.kind == "prompt":
        exact = bool(placement and (placement["prompt_first"] or folded is not None))
    else:  # weight kinds, and the deep prompt in our format or as a prefix of everything ahead of the texts
        exact = True
    manifest = {
        "format": EXPORT_FORMAT,
        "kind": item.kind,
        "peft_type": adapter["peft_type"],
        "description": item.description,
        "model": backbone.name,
        "architecture": backbone.architecture,
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "base_model": base_model,
        "delta_config": dataclasses.asdict(config),
        "run_config": run_config,
        "z_dim": int(z.shape[0]),
        "z_norm": float(np.linalg.norm(z)),
        "tensors": {name: list(tensor.shape) for name, tensor in item.tensors.items()},
        "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST],
        "prompt": _prompt_manifest(item, placement, template),
        "reproduces_engine": exact,
        "how_to_load": _how_to_load(backbone, item, placement),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _prompt_manifest(item: Materialised, placement: dict | None, template: str | None) -> dict | None:
    if item.kind == "prompt" or item.as_prefix:
        return {**(placement or {}), "folded_prefix": item.folded_prefix}
    if item.kind == "deep-prompt":
        return {**(placement or {}), "template": template, "prompt_length": item.num_virtual_tokens,
                "prompt_positions": "in each encoded row, the n positions len(tokens ahead of {prompt}) .. "
                                    "len(tokens ahead of {prompt}) + n - 1"}
    return None


class Hooks:
    """The hooks an `apply_*` function installed: iterable handles; `remove()` (or leaving
    a `with` block) takes them all off the model again."""

    def __init__(self, handles: list | None = None):
        self.handles = list(handles or [])

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self):
        return iter(self.handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _read_export(folder: str | Path, peft_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    if adapter.get("peft_type") != peft_type:
        raise InvalidArgument(f"{folder} holds a {adapter.get('peft_type')} adapter, not {peft_type}")
    return adapter, load_file(str(folder / ADAPTER_WEIGHTS))


def apply_bias_shift(model: torch.nn.Module, folder: str | Path) -> Hooks:
    """Adds the shifts of a BLACKBOX_BIAS export to `model`'s module outputs (forward
    hooks); returns the hooks (`remove()` or a `with` block undoes it)."""
    _, tensors = _read_export(folder, "BLACKBOX_BIAS")
    hooks = Hooks()
    try:  # a module the model lacks leaves it as it was, like apply_adapters
        for key, shift in tensors.items():
            path = key.removeprefix(PEFT_PREFIX).removesuffix(".bias_shift")
            module = model.get_submodule(path)

            def hook(module, args, output, shift=shift):
                return output + shift.to(device=output.device, dtype=output.dtype)

            hooks.handles.append(module.register_forward_hook(hook))
    except Exception:
        hooks.remove()
        raise
    return hooks


def apply_adapters(model: torch.nn.Module, folder: str | Path) -> Hooks:
    """Installs the bottleneck adapters of a BLACKBOX_ADAPTER export on `model` (a forward
    hook per target module: y -> y + W_up gelu(W_down y), on the first element of a
    module's tuple output); returns the hooks (`remove()` or a `with` block undoes it)."""
    adapter, tensors = _read_export(folder, "BLACKBOX_ADAPTER")
    if adapter.get("activation") != "gelu":
        raise InvalidArgument(f"unknown adapter activation {adapter.get('activation')!r}")
    hooks = Hooks()
    try:
        for path in adapter["target_modules"]:
            down = tensors[f"{PEFT_PREFIX}{path}.adapter_down.weight"]
            up = tensors[f"{PEFT_PREFIX}{path}.adapter_up.weight"]
            hooks.handles.append(model.get_submodule(path).register_forward_hook(_adapter_hook(down, up)))
    except Exception:
        hooks.remove()
        raise
    return hooks


def _adapter_hook(down: torch.Tensor, up: torch.Tensor):
    def hook(module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        d, u = down.to(device=y.device, dtype=y.dtype), up.to(device=y.device, dtype=y.dtype)
        y = y + F.gelu(y @ d.T) @ u.T
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return hook


def load_prompt(folder: str | Path) -> torch.Tensor:
    """The input prompt vectors (n x h, float32) of a BLACKBOX_DEEP_PROMPT export."""
    return _read_export(folder, "BLACKBOX_DEEP_PROMPT")[1]["prompt_embeddings"]


def _prompt_positions(positions, rows: int, n: int, device) -> torch.Tensor:
    """`positions` ((n,) for every row, or (rows, n)) as a (rows, n) long tensor."""
    if not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
    positions = positions.to(device=device, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions[None].expand(rows, -1)
    if positions.shape != (rows, n):
        raise InvalidArgument(f"prompt positions must be {n} per row (shape ({n},) or ({rows}, {n})), "
                              f"got shape {tuple(positions.shape)}")
    return positions


def splice_prompt(model: torch.nn.Module, input_ids, prompt: torch.Tensor, positions) -> torch.Tensor:
    """inputs_embeds for `model`: the input embeddings of `input_ids` ((L,) or (B, L); the
    ids at the prompt positions are placeholders, any valid id) with the prompt vectors
    (n x h) in place of those at `positions` ((n,) for every row or (B, n))."""
    embeddings = model.get_input_embeddings()
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=embeddings.weight.device)
    if ids.dim() == 1:
        ids = ids[None]
    embeds = embeddings(ids)
    n = prompt.shape[0]
    where = _prompt_positions(positions, ids.shape[0], n, embeds.device)
    rows = torch.arange(ids.shape[0], device=embeds.device)[:, None]
    values = prompt.to(device=embeds.device, dtype=embeds.dtype)[None].expand(ids.shape[0], -1, -1)
    return embeds.index_put((rows, where), values)


class DeepPromptHooks(Hooks):
    """The pre-hooks of `apply_deep_prompt`; `positions` (settable) says where the prompt
    sits in the rows of the next forward."""

    def __init__(self, positions, prompt_length: int):
        super().__init__()
        self.prompt_length = prompt_length
        self.positions = positions


def apply_deep_prompt(model: torch.nn.Module, folder: str | Path, prompt_positions) -> DeepPromptHooks:
    """Adds the per-layer offsets of a BLACKBOX_DEEP_PROMPT export to the hidden states
    entering each layer l >= 1 (forward pre-hooks) at `prompt_positions`: (n,) positions
    for every row, or (B, n) per row; `hooks.positions = ...` changes them between
    forwards. The input prompt is the caller's: build inputs_embeds with `splice_prompt`
    at the same positions. A forward whose hidden states do not reach the last position
    (a decoding step with a KV cache, where the prompt is in the cache) is left alone.
    Returns the hooks (`remove()` or a `with` block undoes it)."""
    adapter, tensors = _read_export(folder, "BLACKBOX_DEEP_PROMPT")
    n = int(adapter["num_virtual_tokens"])
    hooks = DeepPromptHooks(prompt_positions, n)
    try:
        for l, path in enumerate(adapter["layer_modules"]):
            if l == 0:
                continue
            offset = tensors[f"layers.{l}.prompt_offset"]
            hooks.handles.append(model.get_submodule(path).register_forward_pre_hook(
                _deep_prompt_hook(offset, hooks), with_kwargs=True))
    except Exception:
        hooks.remove()
        raise
    return hooks


def _deep_prompt_hook(offset: torch.Tensor, hooks: DeepPromptHooks):
    def hook(module, args, kwargs):
        hidden = _hidden_of(args, kwargs)
        where = _prompt_positions(hooks.positions, hidden.shape[0], hooks.prompt_length, hidden.device)
        if where.numel() == 0 or int(where.max()) >= hidden.shape[1]:
            return None
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        values = offset.to(device=hidden.device, dtype=hidden.dtype)[None].expand(hidden.shape[0], -1, -1)
        return _with_hidden(args, kwargs, hidden.index_put((rows, where), values, accumulate=True))

    return hook


def delta_config_from_run(config: dict) -> DeltaConfig:
    """The DeltaConfig a `blackbox tune` run's config.json describes: the tuner's own
    DeltaSpec, rebuilt from the stored settings."""
    import dataclasses

    from blackbox.tuner import TuneConfig, delta_spec

    fields = {f.name for f in dataclasses.fields(TuneConfig)}
    for key in ("delta", "dim", "seed"):
        if key not in config:
            raise InvalidArgument(f"the run's config.json lacks {key!r}")
    try:
        spec = delta_spec(TuneConfig(**{k: v for k, v in config.items() if k in fields}))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"the run's config.json does not describe a run: {error}") from None
    return DeltaConfig(**spec.__dict__)


def save_base(backbone: Backbone, folder: str | Path) -> None:
    """The base model and tokenizer as a Hugging Face folder (for models built in code)."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)


def export_run(run_dir: str | Path, out: str | Path, model: str | None = None, device: str = "cpu",
               dtype: str | None = None, fold_prefix: bool = False, overwrite: bool = False) -> dict:
    """Exports the best z of a finished run folder; returns the manifest.

    The model is the run's (or `model`), loaded in the run's dtype unless `dtype` says
    otherwise (the delta's scales are taken from the weights as loaded). A model built in
    code (tiny-llama, tiny-roberta) is saved in `out/base` so the export loads on its own.
    """
    from backbone_server.models import _bundled_model_folder, load_backbone

    run_dir, out = Path(run_dir), Path(out)
    try:
        run_config = json.loads((run_dir / "config.json").read_text())
        z = np.load(run_dir / "best_z.npy")
    except FileNotFoundError as error:
        raise NotFound(f"{run_dir} holds no finished run ({Path(error.filename).name} is missing)") from None
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    config = delta_config_from_run(run_config)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # early, before loading the model
        raise InvalidArgument(f"{out} is not empty; choose another folder or pass --overwrite")
    name = model or run_config.get("model") or BUNDLED_MODEL
    backbone = load_backbone(name, device=device, dtype=dtype or result.get("dtype") or "float32")
    if name in TINY_MODELS:
        base_model = str((out / BASE_FOLDER).resolve())
    elif name == BUNDLED_MODEL:
        base_model = str(_bundled_model_folder())
    else:
        base_model = str(Path(name).expanduser().resolve())
    manifest = export_delta(backbone, config, z, out, template=run_config.get("template"), run_config=run_config,
                            base_model=base_model, fold_prefix=fold_prefix, overwrite=overwrite)
    manifest.update(run=str(run_dir.resolve()), run_model=run_config.get("model"))
    if name in TINY_MODELS:
        save_base(backbone, out / BASE_FOLDER)
        manifest["files"].append(BASE_FOLDER + "/")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
