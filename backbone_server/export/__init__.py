"""Tuned deltas as adapter folders: `writer` (one z to PEFT's layout, each kind's tensors
coming from its own `Delta.export`) and `runtime` (applying blackbox's own formats to a
plain model). A run folder's glue (which model, which z) is the client's:
`blackbox.export`."""

from backbone_server.export.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FOLDER, MANIFEST
from backbone_server.export.runtime import (
    DeepPromptHooks,
    Hooks,
    apply_adapters,
    apply_bias_shift,
    apply_deep_prompt,
    load_prompt,
    splice_prompt,
)
from backbone_server.export.writer import EXPORT_FORMAT, export_delta, materialise, save_base, write_manifest
from backbone_server.deltas.exported import Exported, prompt_placement

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_FOLDER", "EXPORT_FORMAT", "MANIFEST", "DeepPromptHooks",
           "Exported", "Hooks", "apply_adapters", "apply_bias_shift", "apply_deep_prompt", "export_delta",
           "load_prompt", "materialise", "prompt_placement", "save_base", "splice_prompt", "write_manifest"]
