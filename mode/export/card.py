"""The model card (README.md) of a Hub folder: the Hub's YAML header, then what was trained and how it scored.

The header carries base_model (a Hub id only: a local path is left out, with a note), library_name,
pipeline_tag, tags and datasets; the body the method and its shape, the trainable parameters, the training
config and the per-task table of the run's metrics.json. Everything comes from the run's own files.
"""

from __future__ import annotations

import os

import yaml
from omegaconf import OmegaConf

# Super-NaturalInstructions on the Hub (the upstream is github.com/allenai/natural-instructions).
SNI_DATASET = "Muennighoff/natural-instructions"
LABELS = {"lora": "LoRA", "molora": "MoLoRA", "molora_sd": "MoLoRA-SD", "mode": "MoDE", "more": "MoRE"}


def is_hub_id(name: str | None) -> bool:
    """'org/name' that is not a local folder or an absolute / relative path."""
    if not name or os.path.isdir(name) or name.startswith((".", "/", "~")):
        return False
    return name.count("/") == 1 and all(part.strip() for part in name.split("/"))


def shape(adapter) -> str:
    m, r, p = adapter.method, adapter.rank, adapter.block_rank
    if m == "lora":
        return f"rank {r}"
    if m == "more":
        return f"maximum rank R = {r}, each task its own k_t <= R per projection"
    if m == "mode":
        return f"{adapter.experts} experts x rank {r}, {r // p} routers of block rank {p}"
    return f"{adapter.experts} experts x rank {r}"


def model_card(info, weights: str, task: int | None, peft_config: dict | None, base_model: str | None,
               auto_class: str | None = None) -> str:
    a, cfg, metrics = info.adapter, info.cfg, info.metrics or {}
    label = LABELS.get(a.method, a.method)
    hub_base = base_model if is_hub_id(base_model) else None
    tags = ["mode", a.method, "super-natural-instructions", "multi-task"]
    tags += {"peft": ["peft", "lora"], "merged": ["merged"], "mode": []}[weights]
    header = {"base_model": hub_base, "library_name": {"peft": "peft", "merged": "transformers"}.get(weights),
              "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tags)), "datasets": [SNI_DATASET]}
    header = {k: v for k, v in header.items() if v is not None}
    task_name = info.tasks[task] if task is not None and task < len(info.tasks) else None
    what = {"peft": "A PEFT LoRA adapter", "merged": "The base model with the adapter merged into its weights",
            "mode": "The adapter in mode's own format"}[weights]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {label} on Super-NaturalInstructions ({len(info.tasks) or '?'} tasks)"
             + (f": task {task} ({task_name})" if task is not None else ""), "",
             f"{what}, trained with mode (MoDE and its baselines for multi-task adapters on "
             f"Super-NaturalInstructions) on the base model `{base_model or 'unknown'}`"
             + (" (a local path, not a Hub id: pass base_model=<hub id> to mode-export to name it in the header)"
                if base_model and not hub_base else "") + "."]
    if task is not None:
        lines += ["", f"{label} holds one adapter per task; this folder is task {task} ({task_name}) alone: a plain "
                      "LoRA with each projection's own rank (rank_pattern) and the run's scale alpha / R."]

    lines += ["", "## Method and shape", "", "| key | value |", "|---|---|",
              f"| method | {label} (`adapter.method={a.method}`) |", f"| shape | {shape(a)} |",
              f"| alpha | {a.alpha:g} (scale alpha / rank = {a.scale:g}) |",
              f"| target modules | {', '.join(a.target_modules)} |", f"| dropout | {a.dropout:g} |"]
    if peft_config is not None:
        ranks = sorted({peft_config["r"], *peft_config["rank_pattern"].values()} if peft_config["rank_pattern"]
                       else {peft_config["r"]})
        lines.append(f"| exported as | PEFT LoRA, r = {peft_config['r']}, lora_alpha = {peft_config['lora_alpha']:g}"
                     + (f", per-module ranks {ranks} ({len(peft_config['rank_pattern'])} modules in rank_pattern)"
                        if peft_config["rank_pattern"] else "") + " |")

    lines += ["", "## Trainable parameters", ""]
    trainable = metrics.get("trainable_parameters")
    lines.append(f"{trainable:,} adapter parameters trained" if isinstance(trainable, int) else "not recorded")
    if metrics.get("base_parameters"):
        lines[-1] += f" on a base of {metrics['base_parameters']:,} (frozen)"
    lines[-1] += "."

    lines += ["", "## Training", "", "| key | value |", "|---|---|"]
    for key in ("model.id", "model.dtype", "data.protocol", "data.max_instances_per_task", "data.sampling",
                "data.encoding.num_pos_examples", "data.encoding.max_source_length", "data.encoding.max_target_length",
                "train.max_steps", "train.batch_size", "train.lr", "train.optimizer", "train.lr_scheduler",
                "train.warmup_ratio", "train.weight_decay", "train.precision", "seed"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            lines.append(f"| {key} | {value} |")
    if metrics.get("train_loss") is not None:
        lines.append(f"| final training loss | {metrics['train_loss']:.4g} |")
    if info.tasks:
        lines += ["", "Training tasks: " + ", ".join(f"`{t}`" for t in info.tasks) + "."]
    commit = info.provenance.get("commit") if isinstance(info.provenance, dict) else None
    if commit:
        lines += ["", f"mode commit: `{commit}`."]

    lines += ["", "## Evaluation", ""]
    if not metrics:
        lines.append("The run has no metrics.json.")
    else:
        lines.append(f"Greedy decoding, official SNI metrics (ROUGE-L and exact match, x 100) on "
                     f"{metrics.get('num_instances', '?')} evaluation instances: ROUGE-L **{metrics.get('rougeL', 0):.2f}**, "
                     f"exact match **{metrics.get('exact_match', 0):.2f}**"
                     + (" (the whole run, every task with its own adapter)" if task is not None else "") + ".")
        per_task = metrics.get("per_task") or {}
        if per_task:
            lines += ["", "| task | ROUGE-L | exact match | instances |", "|---|---|---|---|"]
            for name, row in per_task.items():
                mark = " (this folder)" if name == task_name else ""
                lines.append(f"| {name}{mark} | {row.get('rougeL', 0):.2f} | {row.get('exact_match', 0):.2f} | "
                             f"{row.get('num_instances', '')} |")

    rank = peft_config["r"] if peft_config else a.rank
    lines += ["", "## Use", ""] + usage(weights, base_model or "<base model>", rank, auto_class or "AutoModelForCausalLM")
    return "\n".join(lines) + "\n"


def usage(weights: str, base: str, rank: int, auto_class: str = "AutoModelForCausalLM") -> list[str]:
    if weights == "peft":
        return ["```python", "from peft import PeftModel", f"from transformers import {auto_class}",
                "", f'base = {auto_class}.from_pretrained("{base}")',
                'model = PeftModel.from_pretrained(base, "<this repo or folder>")', "```", "",
                f"vLLM: `LLM(model=..., enable_lora=True, max_lora_rank=<{rank} or more>)` and "
                "`LoRARequest(\"adapter\", 1, \"<this folder>\")`. Evaluate it on SNI with mode: "
                f"`mode-eval model.name_or_path={base} adapter_path=<this folder> out=<folder>`."]
    if weights == "merged":
        return ["```python", f"from transformers import {auto_class}, AutoTokenizer", "",
                f'model = {auto_class}.from_pretrained("<this repo or folder>")',
                'tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")', "```"]
    return ["```python", "from mode.adapters import apply_adapters, load_adapters, read_adapter_config", "",
            "config = read_adapter_config(folder)", "apply_adapters(model, config)  # the base model named above",
            "load_adapters(model, folder)", "```"]
