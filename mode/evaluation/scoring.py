"""Generate for evaluation examples (sharded over processes) and score them with the official SNI metrics."""

from __future__ import annotations

import time

from mode.evaluation.generation import generate
from mode.evaluation.metrics import category_key, sni_report


def evaluate(model, tokenizer, examples: list[dict], eval_cfg, accelerator=None) -> tuple[dict, list[dict]]:
    """Generate for every example (sharded over processes) and score; returns (metrics, prediction rows)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    start = time.perf_counter()
    mine = examples[rank::world]
    texts = generate(model, tokenizer, [e["prompt_ids"] for e in mine], eval_cfg.batch_size,
                     eval_cfg.max_new_tokens, device, task_ids=[e["task_index"] for e in mine])
    rows = [{"id": e["id"], "task": e["task"], "prediction": t, "references": e["references"]}
            for e, t in zip(mine, texts)]
    if world > 1:
        from accelerate.utils import gather_object

        gathered = gather_object(rows)
        by_id = {r["id"]: r for r in gathered}
        rows = [by_id[e["id"]] for e in examples]
    metrics = score(rows, {e["id"]: e.get("categories") or [] for e in examples})
    metrics["eval_time_s"] = round(time.perf_counter() - start, 1)
    return metrics, rows


def score(rows: list[dict], categories: dict[str, list[str]] | None = None) -> dict:
    """Overall, per-task and per-category SNI metrics of prediction rows (category = a task's first),
    with `per_task` / `per_category` tables (see `mode.evaluation.metrics.sni_report`)."""
    categories = categories or {}
    cats = [category_key(categories[r["id"]][0]) if categories.get(r["id"]) else "uncategorised" for r in rows]
    return sni_report([r["prediction"] for r in rows], [r["references"] for r in rows], [r["task"] for r in rows], cats)
