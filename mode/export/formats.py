"""A finished run's adapter as a PEFT LoRA folder, a merged transformers model, or a Hub-ready folder.

Everything that can be refused is checked before the base model is loaded (format, out, task, a token-
routed mixture), and the folder is built beside `out` under a temporary name, then renamed into place:
an interrupted or refused export leaves nothing half written, and `force=true` replaces an existing
`out` only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mode.adapters import AdapterConfig, adapter_layers, apply_adapters, load_adapters, merge_adapters
from mode.adapters.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_config_path,
    mixture_error,
    read_adapter_config,
    read_adapter_meta,
    save_peft_lora,
)
from mode.adapters.registry import METHODS
from mode.errors import ModeError
from mode.run.fileio import fsync_dir

FORMATS = ("peft", "merged", "hub")
HUB_WEIGHTS = ("peft", "merged", "mode")


@dataclass
class RunInfo:
    """What a finished run holds, read without loading any model."""

    run_dir: Path
    cfg: DictConfig                 # config.yaml
    adapter: AdapterConfig          # the adapter's own config
    meta: dict                      # everything adapter_config.json records (tasks, base model, digest)
    metrics: dict | None = None     # metrics.json (None: the run has none)
    provenance: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.get("tasks") or [])

    @property
    def task_routed(self) -> bool:
        return bool(METHODS[self.adapter.method].task_routed) or getattr(self.adapter, "router_input", "token") == "task"

    @property
    def token_routed(self) -> bool:
        return bool(METHODS[self.adapter.method].token_routed) and not self.task_routed

    @property
    def base_name(self) -> str | None:
        return OmegaConf.select(self.cfg, "model.name_or_path", default=None) or self.meta.get("base_model")


def read_run(run_dir) -> RunInfo:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ModeError(f"run_dir={str(run_dir)!r} has no config.yaml (is it a mode run directory?)")
    adapter_dir = run_dir / "adapter"
    if not adapter_dir.is_dir():
        raise ModeError(f"run_dir={str(run_dir)!r} has no adapter/ folder (is the run finished?)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    metrics = _json(run_dir / "metrics.json")
    provenance = _json(run_dir / "provenance.json") or {}
    return RunInfo(run_dir, cfg, read_adapter_config(adapter_dir), read_adapter_meta(adapter_dir), metrics, provenance)


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModeError(f"{path}: not valid JSON ({err})") from err


def resolve_task(info: RunInfo, task) -> int | None:
    """`task=` as an index: a task-routed adapter needs one (an index or a training task's name); any other
    adapter has one delta for every task and refuses it (a silent ignore would mislabel the export)."""
    if not info.task_routed:
        if task is not None:
            raise ModeError(f"task={task!r}: adapter.method={info.adapter.method!r} has one adapter for every task; "
                            "drop task= (it selects one task of MoRE or of adapter.router_input=task)")
        return None
    names = info.tasks
    count = info.adapter.num_tasks or len(names)
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names[:4])) + (", ..." if len(names) > 4 else "")
    if task is None:
        raise ModeError(f"adapter.method={info.adapter.method!r} holds one adapter per task: pick one with task=<index "
                        f"0..{count - 1} or name> ({listing})")
    if isinstance(task, str) and not task.lstrip("-").isdigit():
        if task not in names:
            raise ModeError(f"task={task!r} is not a training task of this run ({listing})")
        return names.index(task)
    index = int(task)
    if not 0 <= index < count:
        raise ModeError(f"task={index} is out of range: the adapter knows {count} tasks (0..{count - 1}: {listing})")
    return index


def load_run_model(info: RunInfo):
    """The run's base model with its trained adapter (eval mode, CPU) and the tokenizer."""
    from mode.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(info.cfg.model)
    apply_adapters(model, info.adapter)
    load_adapters(model, info.run_dir / "adapter")
    return model.eval(), tokenizer


def strip_adapters(model) -> None:
    """Put the base nn.Linear back in place of every (merged) adapter layer: a plain transformers model."""
    for path, layer in list(adapter_layers(model)):
        if not layer.merged:
            raise ModeError(f"{path}: the adapter is not merged (merge_adapters first)")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    for name in ("adapter_config", "adapter_runtime", "adapter_base_fingerprint"):
        if hasattr(model, name):
            delattr(model, name)


def export_run(run_dir, format: str, out, task=None, *, force: bool = False, weights: str | None = None,
               base_model: str | None = None, push: bool = False, repo_id: str | None = None,
               private: bool = True, token: str | None = None) -> Path:
    """Export a finished run (see the package docstring); returns the folder written."""
    if format not in FORMATS:
        raise ModeError(f"format={format!r} is not one of {list(FORMATS)}")
    if weights is not None and format != "hub":
        raise ModeError(f"weights={weights!r} is for format=hub (which weights go into the Hub folder)")
    weights = weights or ("peft" if format == "hub" else format)
    if weights not in HUB_WEIGHTS:
        raise ModeError(f"weights={weights!r} is not one of {list(HUB_WEIGHTS)}")
    if push and format != "hub":
        raise ModeError("push=true uploads a Hub folder: use format=hub")
    if push and not repo_id:
        raise ModeError("push=true needs repo_id=<user or org>/<name>")
    if out is None or str(out) == "":
        raise ModeError("out=<folder> is missing: where the export goes")
    run_dir, out = Path(run_dir), Path(out)
    info = read_run(run_dir)
    _check_out(out, run_dir, force)
    if weights in ("peft", "merged") and info.token_routed:
        raise mixture_error(info.adapter.method)
    if weights == "mode" and task is not None:
        raise ModeError(f"task={task!r}: weights=mode ships the whole adapter (every task); drop task=")
    index = resolve_task(info, task) if weights != "mode" else None
    base_model = base_model or info.base_name

    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        if weights == "mode":
            shutil.copy2(run_dir / "adapter" / WEIGHTS_FILE, staging / WEIGHTS_FILE)
            shutil.copy2(adapter_config_path(run_dir / "adapter"), staging / CONFIG_FILE)
            exported, auto_class = None, None
        else:
            from mode.models import model_class

            model, tokenizer = load_run_model(info)
            auto_class = model_class(model.config).__name__  # what loads it: causal or encoder-decoder (T5)
            if weights == "peft":
                exported = save_peft_lora(model, staging, index, base_model, metadata={
                    "mode.run": str(run_dir), "mode.task_name": info.tasks[index] if index is not None
                    and index < len(info.tasks) else None})
            else:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # "Writing model shards" for one file
                merge_adapters(model, task=index)
                strip_adapters(model)
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                exported = None
        if format == "hub":
            from mode.export.card import model_card

            (staging / "README.md").write_text(model_card(info, weights, index, exported, base_model, auto_class), encoding="utf-8")
        _swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if push:
        from mode.export.hub import push_folder

        push_folder(out, repo_id, private=private, token=token)
    return out


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents:
        raise ModeError(f"out={str(out)!r} holds the run itself; pick a folder outside run_dir (e.g. {run_dir}/export)")
    if out.exists() and not force:
        raise ModeError(f"out={str(out)!r} exists; force=true replaces it")
    if out.exists() and not out.is_dir():
        raise ModeError(f"out={str(out)!r} is a file, not a folder")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an existing `out` (force=true) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
