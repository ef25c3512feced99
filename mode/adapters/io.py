"""Adapter state dicts and the on-disk formats.

mode's own format (every method, exact): `adapter_config.json` + `adapter_model.safetensors` with our
tensor names (`<module path>.lora_A`, ...). The file name is a contract of the run directory (SPEC), and it
is also PEFT's: so our config is marked (`"format": "mode-adapter"`, and no `peft_type`), which PEFT, vLLM
and transformers refuse with an error instead of misreading; `mode-export format=peft` writes the folder
those tools load. Folders of runs before 0.2 (no marker) still load.

PEFT's LoRA format (what PeftModel.from_pretrained and vLLM's LoRA loader read): `adapter_config.json`
(peft_type LORA, r, lora_alpha, target_modules, rank_pattern, alpha_pattern, ...) + `adapter_model.safetensors`
with `base_model.model.<module path>.lora_A.weight` [r, P] and `.lora_B.weight` [Q, r]; PEFT scales each
module's delta by lora_alpha / r (or its alpha_pattern / rank_pattern entries). `peft_lora` writes it for
any adapter whose delta is one low-rank matrix (per task for task-routed adapters); `load_peft_lora` puts
such a folder into a base model as our LoRA layers (no PEFT needed).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mode.adapters.base import AdapterLayer
from mode.adapters.config import AdapterConfig
from mode.adapters.inject import adapter_layers, base_fingerprint
from mode.adapters.lora import LoRALinear
from mode.adapters.more import MoRELinear
from mode.adapters.runtime import AdapterRuntime
from mode.errors import ModeError
from mode.run.fileio import atomic_path, atomic_write_text

CONFIG_FILE = "adapter_config.json"        # SPEC's name; marked as ours by FORMAT_MARKER
LEGACY_CONFIG_FILE = CONFIG_FILE           # runs before 0.2: the same file without the marker
FORMAT_MARKER = {"format": "mode-adapter", "library_name": "mode"}
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module path>.<tensor>` -> tensor for every adapter tensor (SPEC.md's names and shapes). A tensor
    every layer holds by reference (a layer's `shared_names`: MoRE's adapter.task_embedding=shared) is one
    entry, named without a module path (`selector.task_embedding`): saved once, loaded once."""
    state = {}
    for path, layer in adapter_layers(model):
        shared = getattr(layer, "shared_names", ())
        for name, tensor in layer.state_dict().items():
            if not name.startswith("base_layer."):
                state.setdefault(name if name in shared else f"{path}.{name}", tensor)
    return state


def save_adapters(model: nn.Module, directory, extra: dict | None = None) -> None:
    """Write the adapter (only) atomically: a reader never sees half a file."""
    cfg: AdapterConfig = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ModeError("the model has no adapters to save (call apply_adapters first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**FORMAT_MARKER, **cfg.to_dict(), "base_model": getattr(model, "name_or_path", None) or None,
            "base_fingerprint": getattr(model, "adapter_base_fingerprint", None), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, tmp, metadata={"method": cfg.method})
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModeError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ModeError(f"{path}: not a JSON object")
    return meta


def adapter_config_path(directory) -> Path:
    """The config file of one of our adapter folders. A PEFT folder is refused by name (not our format)."""
    directory = Path(directory)
    legacy = directory / CONFIG_FILE
    if legacy.is_file():
        if "peft_type" in _read_json(legacy):
            raise ModeError(f"{directory}: a PEFT adapter folder, not mode's own format (evaluate it with "
                            f"mode-eval adapter_path={directory} model=..., or load it with PeftModel.from_pretrained)")
        return legacy
    raise ModeError(f"{directory / CONFIG_FILE}: no such file (not an adapter folder)")


def read_adapter_meta(directory) -> dict:
    """Everything one of our adapter folders records: the adapter keys, base model, its digest, the tasks."""
    return _read_json(adapter_config_path(directory))


def read_adapter_config(directory) -> AdapterConfig:
    meta = read_adapter_meta(directory)
    meta = {k: v for k, v in meta.items() if k in AdapterConfig.__dataclass_fields__}
    return AdapterConfig.from_mapping(meta)


# Saved fields that change the function an adapter computes (init and training-only keys do not).
FUNCTION_FIELDS = ("method", "rank", "experts", "block_rank", "alpha", "target_modules", "top_k", "router_temperature",
                   "router_input", "task_embedding")


def load_adapters(model: nn.Module, directory) -> nn.Module:
    """Load saved adapter tensors into a model that already has the same adapters; strict, never partial.

    Refused, naming the field: another method, shape, scale (alpha) or target modules than the model's
    adapters, or another base model than the one the adapter was trained on (a digest of its weights).
    """
    directory = Path(directory)
    config_path = adapter_config_path(directory)
    saved = read_adapter_config(directory)
    current: AdapterConfig | None = getattr(model, "adapter_config", None)
    if current is None:
        raise ModeError(f"{directory}: the model has no adapters; call apply_adapters(model, config) first")
    saved_base = _read_json(config_path).get("base_fingerprint")
    current_base = getattr(model, "adapter_base_fingerprint", None)
    weights = directory / WEIGHTS_FILE
    tensors = _load_tensors(weights)
    expected = adapter_state_dict(model)
    problem = _first_mismatch(expected, tensors)
    if saved.method != current.method:
        raise ModeError(f"{directory}: adapter method is {saved.method!r} but the model has {current.method!r}"
                        + (f" ({problem})" if problem else ""))
    if saved.task_embedding != current.task_embedding:  # before the tensor names, which it changes
        raise ModeError(f"{config_path}: adapter.task_embedding={saved.task_embedding!r}, but the model's adapters "
                        f"have adapter.task_embedding={current.task_embedding!r}")
    if problem:
        raise ModeError(f"{weights}: {problem}")
    for key in FUNCTION_FIELDS:
        if getattr(saved, key) != getattr(current, key):
            raise ModeError(f"{config_path}: adapter.{key}={getattr(saved, key)!r}, but the model's "
                            f"adapters have adapter.{key}={getattr(current, key)!r}")
    if saved_base and current_base and saved_base != current_base:
        raise ModeError(f"{config_path}: trained on another base model (weights digest {saved_base}, "
                        f"this model's {current_base}); load the base it names in base_model")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    return model


def _load_tensors(weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights))
    except FileNotFoundError as err:
        raise ModeError(f"{weights}: no such file") from err
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ModeError(f"{weights}: unreadable ({err})") from err


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


# -- one LoRA per layer (and per task): the factors every exported format starts from -----------------------
def is_task_routed(layer: AdapterLayer) -> bool:
    return bool(getattr(layer, "task_routed", False))


def is_token_routed(layer: AdapterLayer) -> bool:
    return bool(getattr(layer, "token_routed", False)) and not is_task_routed(layer)


def mixture_error(method: str) -> ModeError:
    return ModeError(f"adapter.method={method!r} routes every token to its own mixture of experts, so it is not "
                     "one LoRA (PEFT, vLLM and merging need one low-rank delta per layer): share it in mode's own "
                     "format, the run's adapter/ folder (load_adapters), e.g. mode-export format=hub weights=mode")


def lora_factors(layer: AdapterLayer, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [Q, k], down [k, P]) with the layer's unscaled delta (for `task`, if it routes by task) equal to
    up @ down; the layer adds `layer.scale * up @ down @ x`.

    LoRA: (B, A). MoRE: task t's first k_t ranks, (B[:, :k_t], A[:k_t]). A layer that defines
    `lora_factors(task)` (task-routed mixtures, adapter.router_input=task) gives its own; any other layer
    whose `delta_weight(task)` is one matrix is factored by an SVD at its numerical rank. Token-routed
    mixtures have no such factors: a one-line error says so.
    """
    if is_token_routed(layer):
        raise mixture_error(layer.method)
    if is_task_routed(layer) and task is None:
        raise ModeError(f"adapter.method={layer.method!r} holds one adapter per task: pick one, task=<index or name>")
    with torch.no_grad():
        if type(layer) is LoRALinear:
            return layer.lora_B.detach(), layer.lora_A.detach()
        if type(layer) is MoRELinear:
            layer.delta_weight(task)  # range-checks the task
            k = int(layer.selector.ranks()[task])
            return layer.lora_B[:, :k].detach(), layer.lora_A[:k].detach()
        own = getattr(type(layer), "lora_factors", None)
        if own is not None and own is not getattr(AdapterLayer, "lora_factors", None):
            up, down = own(layer, task)
            return up.detach(), down.detach()
        return svd_factors(layer.delta_weight(task))


def svd_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [Q, k], down [k, P]) with up @ down = delta up to rounding, k its numerical rank (at least 1)."""
    U, S, Vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    tol = (S[0] * max(delta.shape) * torch.finfo(delta.dtype).eps) if S.numel() and S[0] > 0 else 0.0
    k = max(1, int((S > tol).sum()))
    root = S[:k].sqrt()
    return (U[:, :k] * root).to(delta.dtype), (root[:, None] * Vh[:k]).to(delta.dtype)


# -- PEFT's LoRA format -------------------------------------------------------------------------------------
def peft_lora(model: nn.Module, task: int | None = None,
              base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of the model's adapter as one PEFT LoRA (task `task` of a task-routed one).

    Every module's scale is our config's alpha / rank (s). A module whose LoRA has another rank k than the
    folder's `r` (MoRE: each projection's own k_t) gets rank_pattern = k and alpha_pattern = s * k, so PEFT's
    lora_alpha / r per module is s again; loaders that read only `r` and `lora_alpha` (vLLM) get s from
    those, with `r` >= every module's rank.
    """
    cfg: AdapterConfig | None = getattr(model, "adapter_config", None)
    layers = list(adapter_layers(model))
    if cfg is None or not layers:
        raise ModeError("the model has no adapters to export (apply_adapters and load_adapters first)")
    if any(layer.merged for _, layer in layers):
        raise ModeError("the adapters are merged into the base weights; unmerge_adapters before exporting them")
    tensors, ranks = {}, {}
    for path, layer in layers:
        up, down = lora_factors(layer, task)
        if not math.isclose(layer.scale, cfg.scale, rel_tol=1e-12):
            raise ModeError(f"{path}: scale {layer.scale} differs from the adapter's alpha / rank = {cfg.scale}")
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = down.float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = up.float().contiguous().cpu()
        ranks[path] = int(down.shape[0])
    r = max(cfg.rank, *ranks.values())
    lora_alpha = cfg.alpha if r == cfg.rank else cfg.scale * r
    rank_pattern = {path: k for path, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, list(ranks), cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {path: lora_alpha * k / r for path, k in rank_pattern.items()},
        "use_rslora": False,
        "use_dora": False,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "auto_mapping": None,
    }
    return tensors, config


def peft_target_modules(model: nn.Module, paths: list[str], suffixes: list[str]) -> list[str]:
    """Our suffixes when PEFT's matching (name == s or name ends with '.s', any module type) selects exactly
    the adapted modules of the base model; otherwise the adapted modules' full paths."""
    adapted = set(paths)
    inner = tuple(p + "." for p in adapted)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inner)]
    return list(suffixes) if {n for n in names if _matches(n, suffixes)} == adapted else sorted(adapted)


def save_peft_lora(model: nn.Module, directory, task: int | None = None, base_model: str | None = None,
                   metadata: dict | None = None) -> dict:
    """Write `directory`/adapter_config.json + adapter_model.safetensors in PEFT's LoRA format; returns the
    config. The safetensors metadata carry the base weights' digest (load_peft_lora checks it)."""
    tensors, config = peft_lora(model, task, base_model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "mode.method": model.adapter_config.method,
            "mode.base_fingerprint": getattr(model, "adapter_base_fingerprint", None),
            "mode.task": None if task is None else str(task), **(metadata or {})}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items() if v is not None})
    atomic_write_text(directory / PEFT_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return config


def is_peft_folder(directory) -> bool:
    path = Path(directory) / PEFT_CONFIG_FILE
    return path.is_file() and "peft_type" in _read_json(path)


# PEFT options a LoRA folder may use that our LoRA layer does not compute: refused by name.
PEFT_UNSUPPORTED = ("use_dora", "modules_to_save", "layer_replication", "lora_bias", "trainable_token_indices",
                    "target_parameters", "alora_invocation_tokens", "use_qalora", "fan_in_fan_out")
PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")


def load_peft_lora(model: nn.Module, directory, base_name: str | None = None) -> dict:
    """Put a PEFT LoRA folder into `model` as our LoRA layers (per-module rank and scale from rank_pattern /
    alpha_pattern, rsLoRA's alpha / sqrt(r)); nothing of the model changes when it is refused.

    Refused in one line: not a LoRA, an option our layers do not compute (DoRA, modules_to_save, ...), a
    tensor for a module the model does not have or of another shape, target_modules that do not name the
    adapted modules, and another base model than the folder names (the weights' digest our exports
    record; else the name in base_model_name_or_path against `base_name`). Returns what was loaded.
    """
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG_FILE
    if not config_path.is_file():
        raise ModeError(f"{config_path}: no such file (not a PEFT adapter folder)")
    config = _read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise ModeError(f"{config_path}: peft_type={config.get('peft_type')!r}; only LoRA adapters (LORA) can be loaded")
    for key in PEFT_UNSUPPORTED:
        if config.get(key) and config.get(key) != "none":
            raise ModeError(f"{config_path}: {key}={config[key]!r} is a PEFT option mode's LoRA does not compute")
    if config.get("bias", "none") != "none":
        raise ModeError(f"{config_path}: bias={config['bias']!r}; only bias 'none' LoRA adapters can be loaded")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ModeError("the model already has adapters; load a fresh base model")
    weights = directory / WEIGHTS_FILE
    tensors = _load_tensors(weights)
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata() or {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key)
        if not match:
            raise ModeError(f"{weights}: tensor {key!r} is not a LoRA weight (base_model.model.<module>.lora_A/B.weight)")
        factors.setdefault(match["path"], {})[match["which"]] = tensor
    if not factors:
        raise ModeError(f"{weights}: no LoRA tensors")
    modules = dict(model.named_modules())
    for path, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ModeError(f"{weights}: module {path} has lora_{'B' if 'A' in pair else 'A'} missing")
        linear = modules.get(path)
        if linear is None:
            raise ModeError(f"{weights}: the adapter targets {path}, which this base model ({type(model).__name__}) "
                            f"does not have: another base model (base_model_name_or_path="
                            f"{config.get('base_model_name_or_path')!r})?")
        if not isinstance(linear, nn.Linear):
            raise ModeError(f"{weights}: the adapter targets {path}, a {type(linear).__name__} in this base model "
                            "(mode's LoRA adapts nn.Linear only)")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[1] != linear.in_features \
                or B.shape[0] != linear.out_features:
            raise ModeError(f"{weights}: {path} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but this base "
                            f"model's {path} is {linear.in_features} -> {linear.out_features}: another base model "
                            f"(base_model_name_or_path={config.get('base_model_name_or_path')!r})?")
    ordered = [n for n in modules if n in factors]  # the model's order: its first adapted layer is digested
    _check_targets(config, config_path, ordered, modules)
    _check_base(config, config_path, metadata, model, [(ordered[0], modules[ordered[0]])], base_name)
    r, lora_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    runtime = AdapterRuntime()
    layers = []
    for path in ordered:
        A, B = factors[path]["A"], factors[path]["B"]
        rank = rank_pattern.get(_pattern_key(rank_pattern, path), r)
        alpha = alpha_pattern.get(_pattern_key(alpha_pattern, path), lora_alpha)
        if rank != A.shape[0]:
            raise ModeError(f"{config_path}: r={rank} for {path}, but its tensors have rank {A.shape[0]}")
        if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r); our layer by alpha / rank
            alpha = alpha * math.sqrt(rank)
        cfg = AdapterConfig(method="lora", rank=rank, alpha=alpha, dropout=0.0, target_modules=[path])
        layers.append((path, LoRALinear(modules[path], cfg, runtime), A, B))
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        for path, layer, A, B in layers:
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.adapter_runtime = runtime
    ranks = sorted({layer.rank for _, layer, _, _ in layers})
    return {"source": "peft", "path": str(directory), "method": "lora", "r": r, "lora_alpha": lora_alpha,
            "ranks": ranks, "modules": len(layers), "target_modules": config.get("target_modules"),
            "use_rslora": bool(config.get("use_rslora")), "base_model_name_or_path": config.get("base_model_name_or_path")}


def _matches(name: str, suffixes: list[str]) -> bool:
    """PEFT's (and apply_adapters') rule: the module name is a suffix or ends with '.' + a suffix."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _pattern_key(pattern: dict, name: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches the end of the name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _check_targets(config: dict, config_path: Path, adapted: list[str], modules: dict) -> None:
    """target_modules must name every module that has tensors and (unless layers are restricted) no other
    nn.Linear of the model: a mismatch means the folder and the base model disagree."""
    targets = config.get("target_modules")
    if targets is None:
        return
    if isinstance(targets, str):  # PEFT: a regex that the full module name must match
        def named(n):
            return re.fullmatch(targets, n) is not None
    else:
        def named(n):
            return _matches(n, list(targets))
    outside = [p for p in adapted if not named(p)]
    if outside:
        raise ModeError(f"{config_path}: target_modules={targets!r} does not name {outside[0]}, which has LoRA "
                        "tensors: the folder's config and weights disagree")
    if config.get("layers_to_transform") is None and config.get("exclude_modules") is None:
        unadapted = [n for n, m in modules.items() if isinstance(m, nn.Linear) and named(n) and n not in set(adapted)]
        if unadapted:
            raise ModeError(f"{config_path}: target_modules={targets!r} names {unadapted[0]} of this base model, "
                            "but the folder has no LoRA tensors for it: another base model?")


def _check_base(config: dict, config_path: Path, metadata: dict, model: nn.Module, first, base_name) -> None:
    saved = metadata.get("mode.base_fingerprint")
    if saved:
        current = base_fingerprint(first)
        if current is not None and current != saved:
            raise ModeError(f"{config_path}: trained on another base model (weights digest {saved}, this model's "
                            f"{current}; base_model_name_or_path={config.get('base_model_name_or_path')!r})")
        return
    named = config.get("base_model_name_or_path")
    if named and base_name and _model_name(named) != _model_name(base_name):
        raise ModeError(f"{config_path}: base_model_name_or_path={named!r}, but the base model is {base_name!r}; "
                        "evaluate it on the base it was trained on (model.name_or_path=...)")


def _model_name(name_or_path: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M' and '/models/SmolLM2-135M/' name the same model."""
    return str(name_or_path).rstrip("/").rsplit("/", 1)[-1].lower()
