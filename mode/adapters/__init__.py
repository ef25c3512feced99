"""The adapter family: one shared wrapper (base.py), one module per method, injection and save/load.

Public API (SPEC.md): apply_adapters, adapter_state_dict, save_adapters, load_adapters,
count_adapter_parameters, merge_adapters, unmerge_adapters.
"""

from mode.adapters import lora  # noqa: F401  (registers the method)
from mode.adapters.base import AdapterLayer
from mode.adapters.config import AdapterConfig
from mode.adapters.inject import (
    adapter_layers,
    apply_adapters,
    count_adapter_parameters,
    merge_adapters,
    unmerge_adapters,
)
from mode.adapters.io import adapter_state_dict, load_adapters, read_adapter_config, save_adapters
from mode.adapters.registry import METHODS

__all__ = [
    "METHODS", "AdapterConfig", "AdapterLayer", "adapter_layers", "adapter_state_dict", "apply_adapters",
    "count_adapter_parameters", "load_adapters", "merge_adapters", "read_adapter_config", "save_adapters",
    "unmerge_adapters",
]
