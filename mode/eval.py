"""Evaluation: batched greedy generation + official SNI metrics.

`python -m mode.eval run_dir=<run>` (`mode-eval`) reloads the run's base model and saved adapter,
rebuilds the same evaluation instances and writes metrics.json + predictions.jsonl under
`<run>/evals/<time>/`, then says whether they reproduce the run's own metrics.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mode import config as mode_config
from mode.adapters.runtime import adapter_context
from mode.data.collate import collate_prompts
from mode.errors import ModeError, exit_on_user_error
from mode.fileio import atomic_write_text
from mode.metrics import category_key, sni_report

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             device, desc: str = "evaluating", task_ids: list[int] | None = None,
             min_new_tokens: int = 0) -> list[str]:
    """Greedy continuations of token-id prompts (left padding, KV cache), in the prompts' order.

    Prompts are batched longest first, so batches hold similar lengths and the largest comes first.
    `task_ids` (one per prompt) reach the adapters of each batch (MoRE routes by task).
    `min_new_tokens` suppresses end-of-sequence before that many tokens (benchmarks: equal work per model).
    """
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        batch = collate_prompts([prompts[i] for i in rows], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        tasks = torch.tensor([task_ids[i] for i in rows], device=device) if task_ids is not None else None
        with adapter_context(model, task_ids=tasks, attention_mask=batch["attention_mask"]):
            generated = model.generate(**batch, generation_config=gen_cfg)
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    model.train(was_training)
    return outputs


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
    with `per_task` / `per_category` tables (see `mode.metrics.sni_report`)."""
    categories = categories or {}
    cats = [category_key(categories[r["id"]][0]) if categories.get(r["id"]) else "uncategorised" for r in rows]
    return sni_report([r["prediction"] for r in rows], [r["references"] for r in rows], [r["task"] for r in rows], cats)


TIMING_KEYS = ("train_time_s", "eval_time_s")


def write_results(out_dir, metrics: dict, rows: list[dict], routing: dict | None = None,
                  curves: dict | None = None) -> None:
    """predictions.jsonl, routing.json (mixtures: routing statistics of the evaluation), curves.json
    (training: loss, routing and subset ROUGE-L over steps), timings.json and metrics.json, last: its
    presence marks a finished run.

    Wall-clock times go to timings.json so that metrics.json is a function of config and seed alone:
    the same run repeated on CPU writes an identical file.
    """
    out_dir = Path(out_dir)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(out_dir / "predictions.jsonl", lines)
    if routing:  # indented, with each list of numbers on one line
        text = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                      json.dumps(routing, indent=2))
        atomic_write_text(out_dir / "routing.json", text + "\n")
    if curves is not None:
        atomic_write_text(out_dir / "curves.json", json.dumps(curves, indent=1) + "\n")
    timings = {k: v for k, v in metrics.items() if k in TIMING_KEYS}
    atomic_write_text(out_dir / "timings.json", json.dumps(timings, indent=2, sort_keys=True) + "\n")
    results = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2, sort_keys=True) + "\n")


def _run_config(cfg: DictConfig) -> DictConfig:
    """The run's own resolved config, with this command's overrides (except run_dir) applied on top."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(str(cfg.run_dir))
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ModeError(f"run_dir={str(run_dir)!r} has no config.yaml (is it a mode run directory?)")
    run_cfg = OmegaConf.load(path)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("run_dir=")]
    groups = [o for o in overrides if o.split("=", 1)[0] in ("model", "adapter", "data", "train", "logger")]
    if groups:
        raise ModeError(f"mode-eval takes the run's model/adapter/data; cannot override {groups[0]!r}")
    return OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(overrides))


def evaluate_run(cfg: DictConfig, out_dir: str) -> dict:
    from mode.adapters import apply_adapters, load_adapters, read_adapter_config
    from mode.adapters.diagnostics import AdapterDiagnostics
    from mode.data.dataset import build_data
    from mode.models import load_model_and_tokenizer

    run_cfg = _run_config(cfg)
    run_dir = Path(str(cfg.run_dir))
    adapter_dir = run_dir / "adapter"
    saved = read_adapter_config(adapter_dir)
    model, tokenizer = load_model_and_tokenizer(run_cfg.model)
    apply_adapters(model, saved)
    load_adapters(model, adapter_dir)
    device = torch.device(run_cfg.eval.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    data = build_data(run_cfg.data, run_cfg.eval, tokenizer, need_train=False,
                      cache_dir=OmegaConf.select(run_cfg, "paths.cache_dir", default=None))
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("tasks")
    if saved.method == "more" and trained_on is not None and trained_on != data.tasks:
        raise ModeError(f"{adapter_dir}: the MoRE adapter was trained on other tasks (or another order) than "
                        f"data.tasks gives now ({len(trained_on)} vs {len(data.tasks)}); task ids would not match")
    diagnostics = AdapterDiagnostics(model)
    diagnostics.start()
    metrics, rows = evaluate(model, tokenizer, data.eval, run_cfg.eval)
    write_results(out_dir, metrics, rows, diagnostics.summary(tasks=data.tasks))
    print(f"ROUGE-L {metrics['rougeL']:.2f}  exact match {metrics['exact_match']:.2f}  "
          f"({metrics['num_instances']} instances) -> {out_dir}", flush=True)
    original = run_dir / "metrics.json"
    if original.is_file():
        before = json.loads(original.read_text())
        keys = [k for k in metrics if k.startswith(("rougeL", "exact_match")) or k == "num_instances"]
        differ = [k for k in keys if before.get(k) != metrics[k]]
        print("reproduces the run's metrics exactly" if not differ else
              f"differs from the run's metrics.json in {len(differ)} key(s), e.g. {differ[0]}: "
              f"{before.get(differ[0])} -> {metrics[differ[0]]}", flush=True)
    return metrics


@hydra.main(config_path=str(mode_config.CONF_DIR), config_name="eval", version_base="1.3")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return evaluate_run(cfg, HydraConfig.get().runtime.output_dir)["rougeL"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()


if __name__ == "__main__":
    main()
