"""The files of an export folder (PEFT's adapter layout, plus blackbox's manifest)."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "blackbox_export.json"
BASE_FOLDER = "base"  # the base model, for models built in code
OUR_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)
