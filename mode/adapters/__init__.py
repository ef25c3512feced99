"""The adapter family: one shared wrapper (base.py), one module per method, injection and save/load.

Public API (SPEC.md): apply_adapters, adapter_state_dict, save_adapters, load_adapters,
count_adapter_parameters, merge_adapters, unmerge_adapters; adapter_context gives the layers per-batch
task ids (MoRE) and collects auxiliary losses.
"""

from mode.adapters import dyadic, lora, molora, molora_sd, more  # noqa: F401  (each registers its method)
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
from mode.adapters.runtime import AdapterRuntime, adapter_context, checkpoint_context_fn

__all__ = [
    "METHODS", "AdapterConfig", "AdapterLayer", "AdapterRuntime", "adapter_context", "adapter_layers",
    "adapter_state_dict", "apply_adapters", "checkpoint_context_fn", "count_adapter_parameters", "load_adapters",
    "merge_adapters", "read_adapter_config", "save_adapters", "unmerge_adapters",
]
