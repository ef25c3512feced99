"""What a run's evaluation will cost, from its config alone (no model weights, no task file read):
instances to generate, new tokens (instances x eval.max_new_tokens, an upper bound: generation stops at
the end-of-sequence token), generation batches per process, and the KV cache of one batch.

Instance counts come from `<data.sni_dir>/manifest.tsv` (one row per task file: `instances_kept` counts
the instances in this folder's file, `instances_upstream` those of the full upstream SNI), through the
same rules the data pipeline applies (mode/data/dataset.py `select_instances`, mode/data/splits.py):

    held_in:  per task n_eval = min(n - 1, max(1, round(n * data.eval_fraction))) (0 for n <= 1), then at
              most eval.max_instances_per_task
    held_out: per evaluation task min(n, data.held_out_eval_instances), then at most eval.max_instances_per_task

Evaluation is sharded over processes (example i goes to process i mod world) and each process generates
in batches of eval.batch_size, so the busiest process runs ceil(ceil(N / world) / batch) batches.
`experiments/reproduce.py --dry-run` prints this per job; the paper profile's eval cap and generation
batch were chosen from it (docs/evaluation.md, "Evaluation cost").
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

from mode.data.splits import held_in_eval_count
from mode.errors import ModeError

MANIFEST = "manifest.tsv"
COLUMNS = {"here": "instances_kept", "upstream": "instances_upstream"}


@functools.cache
def read_manifest(sni_dir) -> dict[str, dict] | None:
    """task -> {here, upstream, categories} from `<sni_dir>/manifest.tsv`; None without one (an upstream
    clone has none)."""
    path = Path(str(sni_dir)) / MANIFEST
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return {row["task"]: {"here": int(row[COLUMNS["here"]]), "upstream": int(row[COLUMNS["upstream"]]),
                                  "categories": [c.strip() for c in (row.get("categories") or "").split(";")
                                                 if c.strip()]}
                    for row in csv.DictReader(handle, delimiter="\t")}
    except (KeyError, ValueError, TypeError) as err:
        raise ModeError(f"{path}: not a task manifest (task, instances_upstream, instances_kept columns): {err}") from err


def per_task_counts(data_cfg, eval_cfg, manifest: dict, column: str) -> tuple[dict[str, int], list[str]]:
    """({task: instances to evaluate}, [tasks the config names that the manifest lacks]) for one column."""
    from mode.data.sni import category_key, requested_tasks

    protocol = data_cfg.get("protocol", "held_in")
    names, _ = requested_tasks(data_cfg, "" if protocol == "held_in" else "eval_")
    # Category names compare as the data pipeline compares them ("Question Answering" == "question_answering").
    wanted = {category_key(c) for c in data_cfg.get("categories") or []}
    unwanted = {category_key(c) for c in data_cfg.get("exclude_categories") or []}
    cap = eval_cfg.get("max_instances_per_task")
    counts, missing = {}, []
    for name in dict.fromkeys(names):
        row = manifest.get(name)
        if row is None:
            missing.append(name)
            continue
        categories = {category_key(c) for c in row["categories"]}
        if (wanted and not wanted & categories) or unwanted & categories:
            continue
        n = row[column]
        if protocol == "held_in":
            k = held_in_eval_count(n, data_cfg.get("eval_fraction", 0.1))
        else:
            pool = data_cfg.get("held_out_eval_instances") or 100
            k = min(n, pool)
        counts[name] = min(k, cap) if cap else k
    return counts, missing


def kv_cache_bytes(model_cfg, batch: int, tokens: int) -> int | None:
    """Keys and values of one generation batch: layers x kv heads x head dim x 2 x dtype bytes per token,
    times batch x tokens; None when the architecture cannot be read here."""
    from mode.report.params import architecture

    try:
        config, _ = architecture(model_cfg)
    except (ModeError, OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    layers = getattr(config, "num_hidden_layers", None)
    if not (kv_heads and head_dim and layers):
        return None
    width = {"float32": 4, "float64": 8}.get(str(model_cfg.get("dtype") or "bfloat16"), 2)
    return layers * kv_heads * head_dim * 2 * width * batch * tokens


def eval_cost(cfg, world: int = 1) -> dict | None:
    """The evaluation estimate of a composed train config on `world` processes; None without a manifest.

    Keys: tasks, missing (tasks not in the manifest), instances / upstream_instances, new_tokens /
    upstream_new_tokens, batch, batches_per_process / upstream_batches_per_process (the busiest
    process), curve_instances (training-curve evaluations, all points), kv_cache_bytes (one batch).
    """
    manifest = read_manifest(str(cfg.data.sni_dir))
    if manifest is None:
        return None
    ev, enc = cfg.eval, cfg.data.encoding
    here, missing = per_task_counts(cfg.data, ev, manifest, "here")
    upstream, _ = per_task_counts(cfg.data, ev, manifest, "upstream")
    batch, new = int(ev.batch_size), int(ev.max_new_tokens)

    def busiest(n: int) -> int:
        return math.ceil(math.ceil(n / world) / batch) if n else 0

    n_here, n_up = sum(here.values()), sum(upstream.values())
    curve_cap = ev.get("curve_instances_per_task") or 0
    curves = int(ev.get("curve_points") or 0) * sum(min(k, curve_cap) for k in here.values())
    return {"tasks": len(here), "missing": missing, "instances": n_here, "upstream_instances": n_up,
            "new_tokens": n_here * new, "upstream_new_tokens": n_up * new, "batch": batch, "world": world,
            "batches_per_process": busiest(n_here), "upstream_batches_per_process": busiest(n_up),
            "curve_instances": curves,
            "kv_cache_bytes": kv_cache_bytes(cfg.model, batch, int(enc.max_source_length) + new)}


def cost_lines(cost: dict | None, max_new_tokens: int) -> list[str]:
    """The DRY_RUN lines of one job's estimate."""
    if cost is None:
        return ["evaluation estimate: no manifest.tsv in data.sni_dir (an upstream clone): instances unknown"]
    missing = f", {len(cost['missing'])} named tasks not in manifest.tsv" if cost["missing"] else ""
    kv = cost["kv_cache_bytes"]
    kv_text = "" if kv is None else (f"; KV cache <= {kv / 2**30:.2f} GiB per batch" if kv >= 2**30 else
                                     f"; KV cache <= {kv / 2**20:.0f} MiB per batch")
    lines = [f"evaluation estimate ({cost['tasks']} tasks{missing}): {cost['instances']:,} instances x "
             f"<= {max_new_tokens} new tokens = <= {cost['new_tokens']:,} tokens; {cost['batches_per_process']:,} "
             f"generation batches of <= {cost['batch']} on the busiest of {cost['world']} process(es){kv_text}"]
    if cost["upstream_instances"] != cost["instances"]:
        lines.append(f"  with the full upstream SNI (manifest's instances_upstream): {cost['upstream_instances']:,} "
                     f"instances, <= {cost['upstream_new_tokens']:,} tokens, {cost['upstream_batches_per_process']:,} "
                     "batches on the busiest process")
    if cost["curve_instances"]:
        lines.append(f"  plus {cost['curve_instances']:,} instances for training curves (eval.curve_points)")
    return lines
