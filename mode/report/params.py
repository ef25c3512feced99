"""Trainable-parameter table: `python -m mode.report.params [hydra overrides]`, e.g.

    python -m mode.report.params model=gemma_2b adapter=mode adapter.experts=16 adapter.rank=4

The base model is built from its config on the meta device, so no weights are read or downloaded; the
adapter is applied as training would apply it, and the table shows its trainable parameters per target
module and as a percentage of the base model's non-embedding parameters (the MoDE paper's "Add. Params").
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from mode.errors import ModeError, exit_on_user_error
from mode.models import non_embedding_parameters


def architecture(model_cfg):
    """The transformers config of a `conf/model/*.yaml` node, without weights.

    A local folder's config.json; else `model.architecture` (an embedded copy, for models whose hub
    config needs a network or a licence); else the hub.
    """
    from transformers import AutoConfig

    if model_cfg.get("random_init"):
        from mode.models.loading import random_init_config

        return random_init_config(model_cfg), "model.random_init"
    path = str(model_cfg.get("name_or_path") or "")
    if path and (Path(path).expanduser() / "config.json").is_file():
        return AutoConfig.from_pretrained(str(Path(path).expanduser())), path
    if model_cfg.get("architecture"):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(model_cfg.architecture, resolve=True)
        return AutoConfig.for_model(**spec), "model.architecture"
    if not path:
        raise ModeError("model.name_or_path is empty and model.architecture is not set")
    try:
        return AutoConfig.from_pretrained(path), path
    except OSError as err:
        raise ModeError(f"model.name_or_path={path!r}: config not reachable ({str(err).splitlines()[0]}); "
                        "add a model.architecture block to the model config") from err


def meta_model(model_cfg):
    """The base model with every tensor on the meta device: shapes only, no memory, no download."""
    from mode.models import model_class

    config, source = architecture(model_cfg)
    with torch.device("meta"):
        model = model_class(config).from_config(config)  # causal or encoder-decoder (T5), as the config says
    return model, source


def parameter_table(cfg) -> dict:
    """Apply cfg.adapter to cfg.model's meta-device base; rows grouped by target module and shape."""
    from mode.adapters import apply_adapters, count_adapter_parameters
    from mode.adapters.inject import adapter_layers

    model, source = meta_model(cfg.model)
    base_total = sum(p.numel() for p in model.parameters())
    base = non_embedding_parameters(model)
    num_tasks = None
    by_task = cfg.adapter.method == "more" or cfg.adapter.get("router_input", "token") == "task"
    if by_task and cfg.adapter.get("num_tasks") is None:
        num_tasks = len(training_tasks(cfg.data))
    apply_adapters(model, cfg.adapter, num_tasks=num_tasks)
    rows: dict[tuple, dict] = {}
    shared: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        key = (path.rsplit(".", 1)[-1], layer.in_features, layer.out_features)
        names = getattr(layer, "shared_names", ())
        n = sum(p.numel() for name, p in layer.named_parameters(remove_duplicate=False)
                if not name.startswith("base_layer.") and name not in names)
        shared.update((name, p) for name, p in layer.named_parameters(remove_duplicate=False) if name in names)
        row = rows.setdefault(key, {"module": key[0], "in": key[1], "out": key[2], "layers": 0, "per_layer": n})
        row["layers"] += 1
    trainable = count_adapter_parameters(model)
    return {"model": cfg.model.id, "source": source, "adapter": model.adapter_config, "base_parameters": base_total,
            "base_non_embedding": base, "rows": list(rows.values()), "trainable": trainable,
            "percent": 100.0 * trainable / base, "split": parameter_split(model),
            "shared": {name: list(p.shape) for name, p in shared.items()}}


# The roles of adapter tensors, by their name in the layer: what a budget is spent on.
SPLIT_ROLES = {"lora_A": "lora", "lora_B": "lora", "task_embedding": "task_embedding"}
SPLIT_LABELS = {"lora": "LoRA part", "routing": "routers", "task_embedding": "task embeddings"}


def parameter_split(model) -> dict[str, int]:
    """Trainable adapter parameters by role: `lora` (A and B), `routing` (mixture routers, MoRE's selectors)
    and `task_embedding` (per-task tables); a tensor several layers share counts once. MoRE with
    adapter.task_embedding=per_module spends most of its budget on task embeddings (a [T, P] table per
    projection), so a total alone does not compare it with the other methods."""
    from mode.adapters.inject import adapter_layers

    seen, split = set(), {"lora": 0, "routing": 0, "task_embedding": 0}
    for _, layer in adapter_layers(model):
        for name, p in layer.named_parameters(remove_duplicate=False):
            if name.startswith("base_layer.") or not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            split[SPLIT_ROLES.get(name.rsplit(".", 1)[-1], "routing")] += p.numel()
    return split


def split_text(split: dict[str, int], method: str, task_embedding: str | None = None) -> str:
    """One line: 'LoRA part 1,769,472 + selectors 1,180,224 + task embeddings 111,476,736 (per_module)'."""
    labels = {**SPLIT_LABELS, "routing": "selectors" if method == "more" else "routers"}
    parts = [f"{labels[k]} {v:,}" for k, v in split.items() if v or k == "lora"]
    return " + ".join(parts) + (f" (task_embedding={task_embedding})" if method == "more" and task_embedding else "")


def run_parameter_split(run_dir) -> dict | None:
    """{"split", "method", "task_embedding", "tasks"} of a finished run (or its light record), its adapter
    rebuilt on the meta device from config.yaml with data_stats.json's training tasks; None when the base
    model's architecture cannot be read here (a hub model offline) or the files are missing."""
    import json

    from omegaconf import OmegaConf

    from mode.adapters import apply_adapters

    run_dir = Path(run_dir)
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        tasks = json.loads((run_dir / "data_stats.json").read_text(encoding="utf-8"))["tasks"]
        model, _ = meta_model(cfg.model)
        apply_adapters(model, cfg.adapter, num_tasks=len(tasks) if cfg.adapter.get("num_tasks") is None else None)
    except (OSError, ValueError, KeyError, TypeError, ModeError):
        return None
    a = model.adapter_config
    return {"split": parameter_split(model), "method": a.method, "task_embedding": a.task_embedding,
            "tasks": a.num_tasks}


def training_tasks(data_cfg) -> list[str]:
    """The tasks a run would train on (MoRE's selector has one embedding per task)."""
    from mode.data.sni import requested_tasks, select_tasks

    names, source = requested_tasks(data_cfg)
    if not Path(str(data_cfg.sni_dir)).is_dir():
        return names  # no SNI copy here: count what the config asks for
    return select_tasks(data_cfg.sni_dir, names, bool(data_cfg.get("allow_missing_tasks", False)), source)[0]


def describe(adapter) -> str:
    shapes = {"lora": f"r={adapter.rank}",
              "more": f"R={adapter.rank}, tasks={adapter.num_tasks}, task_embedding={adapter.task_embedding}",
              "mode": f"{adapter.experts}x{adapter.rank}x{adapter.block_rank}"}
    return f"{adapter.method} {shapes.get(adapter.method, f'{adapter.experts}x{adapter.rank}')}"


def format_table(t: dict) -> str:
    lines = [f"{describe(t['adapter'])} on {t['model']} ({t['source']}), targets {t['adapter'].target_modules}",
             f"base: {t['base_parameters']:,} parameters, {t['base_non_embedding']:,} non-embedding", ""]
    header = f"{'module':<12}{'in':>8}{'out':>8}{'layers':>8}{'per layer':>14}{'trainable':>16}{'% non-emb':>11}"
    lines += [header, "-" * len(header)]
    for r in t["rows"]:
        n = r["layers"] * r["per_layer"]
        lines.append(f"{r['module']:<12}{r['in']:>8}{r['out']:>8}{r['layers']:>8}{r['per_layer']:>14,}{n:>16,}"
                     f"{100 * n / t['base_non_embedding']:>10.2f}%")
    for shape in t.get("shared", {}).values():  # one tensor for the whole model: in = its width, out = T
        n = math.prod(shape)
        lines.append(f"{'shared':<12}{shape[1]:>8}{'T=' + str(shape[0]):>8}{'1':>8}{n:>14,}{n:>16,}"
                     f"{100 * n / t['base_non_embedding']:>10.2f}%")
    lines += ["-" * len(header),
              f"{'total':<12}{'':>8}{'':>8}{sum(r['layers'] for r in t['rows']):>8}{'':>14}"
              f"{t['trainable']:>16,}{t['percent']:>10.2f}%"]
    if t.get("split") and (t["split"]["routing"] or t["split"]["task_embedding"]):
        lines += ["", "split: " + split_text(t["split"], t["adapter"].method, t["adapter"].task_embedding)]
    lines += [f"shared: {name} {shape}, one tensor every layer holds" for name, shape in t.get("shared", {}).items()]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from mode.run.config import compose

    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__.strip())
        return {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = compose("train", overrides)
    except Exception as err:  # Hydra's override/composition errors: one line, not a traceback
        raise ModeError(f"bad override: {str(err).splitlines()[0]}") from err
    table = parameter_table(cfg)
    print(format_table(table))
    return table


def run() -> None:
    """Console script `mode-params`: exit status 0 after the table (main returns it for callers)."""
    main()


if __name__ == "__main__":
    main()
