"""Adapter state dicts and the on-disk format: adapter_config.json + adapter_model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mode.adapters.config import AdapterConfig
from mode.adapters.inject import adapter_layers
from mode.errors import ModeError
from mode.run.fileio import atomic_path, atomic_write_text

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module path>.<tensor>` -> tensor for every adapter tensor (SPEC.md's names and shapes)."""
    state = {}
    for path, layer in adapter_layers(model):
        for name, tensor in layer.state_dict().items():
            if not name.startswith("base_layer."):
                state[f"{path}.{name}"] = tensor
    return state


def save_adapters(model: nn.Module, directory, extra: dict | None = None) -> None:
    """Write the adapter (only) atomically: a reader never sees half a file."""
    cfg: AdapterConfig = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ModeError("the model has no adapters to save (call apply_adapters first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**cfg.to_dict(), "base_model": getattr(model, "name_or_path", None) or None,
            "base_fingerprint": getattr(model, "adapter_base_fingerprint", None), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"method": cfg.method})
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")


def read_adapter_config(directory) -> AdapterConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise ModeError(f"{path}: no such file (not an adapter folder)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModeError(f"{path}: not valid JSON ({err})") from err
    meta = {k: v for k, v in meta.items() if k in AdapterConfig.__dataclass_fields__}
    return AdapterConfig.from_mapping(meta)


# Saved fields that change the function an adapter computes (init and training-only keys do not).
FUNCTION_FIELDS = ("method", "rank", "experts", "block_rank", "alpha", "target_modules")


def load_adapters(model: nn.Module, directory) -> nn.Module:
    """Load saved adapter tensors into a model that already has the same adapters; strict, never partial.

    Refused, naming the field: another method, shape, scale (alpha) or target modules than the model's
    adapters, or another base model than the one the adapter was trained on (a digest of its weights).
    """
    directory = Path(directory)
    saved = read_adapter_config(directory)
    current: AdapterConfig | None = getattr(model, "adapter_config", None)
    if current is None:
        raise ModeError(f"{directory}: the model has no adapters; call apply_adapters(model, config) first")
    saved_base = json.loads((directory / CONFIG_FILE).read_text()).get("base_fingerprint")
    current_base = getattr(model, "adapter_base_fingerprint", None)
    weights = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError as err:
        raise ModeError(f"{weights}: no such file") from err
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ModeError(f"{weights}: unreadable ({err})") from err
    expected = adapter_state_dict(model)
    problem = _first_mismatch(expected, tensors)
    if saved.method != current.method:
        raise ModeError(f"{directory}: adapter method is {saved.method!r} but the model has {current.method!r}"
                        + (f" ({problem})" if problem else ""))
    if problem:
        raise ModeError(f"{weights}: {problem}")
    for key in FUNCTION_FIELDS:
        if getattr(saved, key) != getattr(current, key):
            raise ModeError(f"{directory / CONFIG_FILE}: adapter.{key}={getattr(saved, key)!r}, but the model's "
                            f"adapters have adapter.{key}={getattr(current, key)!r}")
    if saved_base and current_base and saved_base != current_base:
        raise ModeError(f"{directory / CONFIG_FILE}: trained on another base model (weights digest {saved_base}, "
                        f"this model's {current_base}); load the base it names in base_model")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    return model


def _first_mismatch(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str | None:
    """The first missing, unexpected or wrongly shaped tensor, named; None when the sets agree."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        return f"missing tensor {missing[0]!r} ({len(missing)} missing in all)"
    if unexpected:
        return f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            return f"tensor {key!r} has shape {list(tensors[key].shape)}, the model expects {list(target.shape)}"
    return None
