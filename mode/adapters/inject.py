"""Put adapter layers into a base model, and find them again."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from mode.adapters.base import AdapterLayer
from mode.adapters.config import AdapterConfig
from mode.adapters.registry import METHODS
from mode.adapters.runtime import AdapterRuntime
from mode.errors import ModeError


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def apply_adapters(model: nn.Module, config, num_tasks: int | None = None) -> nn.Module:
    """Wrap every nn.Linear whose module name ends with a target suffix; freeze every base parameter.

    `num_tasks` (the training data's task count) sizes MoRE's per-task selector; other methods record it.
    """
    cfg = AdapterConfig.from_mapping(config)
    if num_tasks is not None:
        if cfg.num_tasks is not None and cfg.num_tasks != num_tasks:
            raise ModeError(f"adapter.num_tasks={cfg.num_tasks} but the data has {num_tasks} tasks")
        cfg = dataclasses.replace(cfg, num_tasks=num_tasks)
    layer_cls = METHODS[cfg.method]
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ModeError("the model already has adapters; load a fresh base model")
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, cfg.target_modules)
    ]
    if not targets:
        raise ModeError(
            f"adapter.target_modules={cfg.target_modules} matches no nn.Linear in {type(model).__name__}"
        )
    unmatched = [s for s in cfg.target_modules if not any(_matches(n, [s]) for n, _ in targets)]
    if unmatched:
        raise ModeError(f"adapter.target_modules entries {unmatched} match no nn.Linear in {type(model).__name__}")
    for name, linear in targets:
        if cfg.rank > max(linear.in_features, linear.out_features):  # above min() is only wasteful (smoke runs)
            raise ModeError(f"adapter.rank={cfg.rank} exceeds both dimensions of the adapted layer {name} "
                            f"({linear.in_features} -> {linear.out_features}): it adds parameters, not capacity")
    # Shared by reference (see runtime.py); task ids are range-checked only where they route.
    runtime = AdapterRuntime(num_tasks=cfg.num_tasks if layer_cls.task_routed else None)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = layer_cls(linear, cfg, runtime)
        # a T5 decoder layer's tokens are the target's: its real-token mask is the decoder's (runtime.py)
        layer.in_decoder = encoder_decoder and (name.startswith("decoder.") or ".decoder." in name)
        setattr(parent, child, layer)
    model.adapter_config = cfg
    model.adapter_runtime = runtime
    model.adapter_base_fingerprint = base_fingerprint(targets)
    return model


def base_fingerprint(targets: list[tuple[str, nn.Linear]]) -> str | None:
    """A digest of the first adapted base weight, rounded to bfloat16 (so an fp32 base and its bf16 copy
    agree): an adapter loaded into another base of the same shapes would silently compute something else."""
    name, linear = targets[0]
    weight = linear.weight
    if weight.is_meta:
        return None
    import hashlib

    data = weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(name.encode() + str(tuple(weight.shape)).encode() + data).hexdigest()[:16]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(module path, layer) for every adapter layer, with any DDP/FSDP/compile wrapper prefix removed."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield _strip_wrappers(name), module


def _strip_wrappers(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def count_adapter_parameters(model: nn.Module) -> int:
    """Trainable adapter parameters (base weights excluded); a tensor several layers share (MoRE's
    adapter.task_embedding=shared) counts once."""
    unique = {id(p): p for _, layer in adapter_layers(model)
              for n, p in layer.named_parameters() if not n.startswith("base_layer.") and p.requires_grad}
    return sum(p.numel() for p in unique.values())


def merge_adapters(model: nn.Module, task: int | None = None) -> None:
    """Fold the adapters into the base weights (no extra inference cost). Task-routed adapters (MoRE, and
    mixtures with adapter.router_input=task) merge one task's adapter (`task` = its index); token-routed
    mixtures cannot be merged and raise before any weight changes."""
    for _, layer in adapter_layers(model):
        layer.merge(task)


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()
