"""What a kind's export of one z is (`Exported`), what it is asked for (`ExportRequest`),
and the pieces the kinds' exports share. Each kind writes its own tensors and adapter
config (`Delta.export`, in the kind's module); `backbone_server.export` writes the folder.

Tensors are named as PEFT names them: `base_model.model.<module path>.<role>.weight`
for a module's weights (`peft_key`), with the path in `backbone.model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backbone_server.deltas.layout import Segment
from backbone_server.encoding import TemplateEncoder
from backbone_server.errors import InvalidArgument

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExportRequest:
    """What an export is for: the backbone it was tuned on, the base model the adapter
    names (base_model_name_or_path), the run's template and where it puts the prompt
    (`prompt_placement`, for prompt kinds; None when not known), and whether a prompt
    kind folds the template's constant tokens ahead of the prompt (a BOS) into its
    virtual tokens (`tokens_to_fold`): True: fold, or refuse where it cannot; None (the
    default): fold wherever it can, since only then does PEFT's prompt, which comes
    before the whole input, reproduce the engine's; False: never."""

    backbone: object
    base_model: str | None = None
    template: str | None = None
    placement: dict | None = None
    fold_prefix: bool | None = None


@dataclass
class Exported:
    """One z's delta as named float32 CPU tensors, with its adapter_config.json and how
    to load it."""

    kind: str
    tensors: dict[str, torch.Tensor]
    adapter_config: dict
    how_to_load: str
    description: str = ""
    modules: list[str] = field(default_factory=list)  # the module paths it changes (deep prompt: its layers)
    # Why loading it as `how_to_load` says does not give the engine's scores, and what
    # would; None: it does.
    why_not_reproduced: str | None = None
    prompt: dict | None = None  # prompt kinds: where the prompt goes (the manifest's "prompt")

    @property
    def reproduces_engine(self) -> bool:
        return self.why_not_reproduced is None


def store(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def peft_key(segment: Segment, suffix: str = ".weight") -> str:
    return f"{PEFT_PREFIX}{segment.module}.{segment.role}{suffix}"


def model_class(backbone) -> str:
    return "AutoModelForCausalLM" if backbone.architecture == "causal" else "AutoModelForMaskedLM"


def plain_load(backbone) -> str:
    return f"model = transformers.{model_class(backbone)}.from_pretrained(BASE)"


def peft_load(backbone) -> str:
    return f"peft.PeftModel.from_pretrained(transformers.{model_class(backbone)}.from_pretrained(BASE), THIS_FOLDER)"


# Where `prompt_placement`'s prompt_position puts the prompt, in words for the user.
POSITION_WORDS = {"start": "ahead of the texts", "middle": "between the texts",
                  "end": "after the text, as --placement after or tail put it"}


def tokens_to_fold(request: ExportRequest, cannot_fold: str = "") -> tuple[int, ...] | None:
    """The ids of the template's constant tokens ahead of the prompt that a prompt kind's
    export folds in (maybe none: `()`), or None when it does not fold. `cannot_fold` is
    the kind's own reason it cannot fold here ("": it can); True in `request.fold_prefix`
    turns any reason into a refusal."""
    placement = request.placement
    if placement is None:
        cannot_fold = "it needs the run's template, which was not given"
    elif placement["tokens_before_prompt"] is None:
        cannot_fold = (f"the run's template puts text ahead of the prompt (the prompt is "
                       f"{POSITION_WORDS[placement['prompt_position']]})")
    if request.fold_prefix is False:
        return None
    if cannot_fold:
        if request.fold_prefix:
            raise InvalidArgument(f"cannot fold the tokens ahead of the prompt into the export: {cannot_fold}")
        return None
    return tuple(placement["tokens_before_prompt"])


def folded_prefix_note(fold_prefix: tuple[int, ...], what: str) -> str:
    return (f"the first {len(fold_prefix)} virtual tokens are the {what} of the template's tokens ahead of the "
            f"prompt ({list(fold_prefix)}): feed the rest of the template's tokens without them "
            "(add_special_tokens=False for a BOS)")


def prefix_tuning(kind: str, states: list[tuple[torch.Tensor, torch.Tensor]], request: ExportRequest,
                  ahead: list[int], description: str) -> Exported:
    """PEFT's PREFIX_TUNING of per-layer (1, kv_heads, k, head_dim) keys and values, the
    first len(`ahead`) of them those of the template's tokens `ahead` of the prompt: the
    prefix embedding holds, per virtual token, every layer's keys then values."""
    backbone = request.backbone
    _, kv_heads, k, head_dim = states[0][0].shape
    rows = [state[0].transpose(0, 1).reshape(k, -1) for pair in states for state in pair]
    adapter = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": request.base_model,
        "revision": None, "inference_mode": True, "num_virtual_tokens": k,
        "token_dim": kv_heads * head_dim, "num_transformer_submodules": 1, "num_attention_heads": kv_heads,
        "num_layers": backbone.num_layers, "encoder_hidden_size": backbone.hidden_size,
        "prefix_projection": False, "modules_to_save": None,
    }
    how = f"{peft_load(backbone)}; {folded_prefix_note(tuple(ahead), 'keys and values')}" if ahead \
        else peft_load(backbone)
    return Exported(kind, {"prompt_embeddings": store(torch.cat(rows, dim=1))}, adapter, how, description,
                    prompt={**(request.placement or {}), "folded_prefix": list(ahead)})


def prompt_placement(backbone, template: str, prompt_length: int) -> dict:
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
