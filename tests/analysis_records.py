"""Synthetic run records of the cpu profile (no model): what `mode-aggregate cpu` reads, for fast tests.

Each run gets config.yaml, metrics.json (the official metrics of its predictions), predictions.jsonl,
curves.json, data_stats.json, provenance.json, timings.json and, for mixtures, routing.json. A method's
quality sets how many reference words its predictions keep; routing.json's `task_usage` makes one layer
(SPECIALISED) route tasks to different experts and the others route every task alike.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import yaml

from mode.evaluation.metrics import sni_report

TASKS = ["task024_cosmosqa_answer_generation", "task089_swap_words_verification",
         "task114_is_the_given_word_longest", "task155_count_nouns_verbs"]
PER_TASK = 8
SHAPES = {  # preset -> (method, experts, rank, block_rank), quality (share of reference words kept)
    "paper/lora_60": (("lora", 1, 60, 1), 0.50),
    "paper/mode_14x4x1": (("mode", 14, 4, 1), 0.62),
    "paper/lora_4": (("lora", 1, 4, 1), 0.45),
    "paper/molora_sd_24x8": (("molora_sd", 24, 8, 1), 0.55),
    "paper/molora_12x4": (("molora", 12, 4, 1), 0.50),
}
LAYERS = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in ("q", "v")]
SPECIALISED = "model.layers.2.self_attn.v_proj"
BLOCKS = 2


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _predictions(preset: str, seed: int, quality: float) -> list[dict]:
    rows = []
    shift = _rng("seed", preset, seed).normal(0, 0.03)
    for task in TASKS:
        for i in range(PER_TASK):
            words = [f"w{k}" for k in _rng("ref", task, i).integers(0, 50, size=6)]
            keep = _rng("pred", preset, seed, task, i).random(len(words)) < quality + shift
            pred = " ".join(w if k else f"zz{j}" for j, (w, k) in enumerate(zip(words, keep)))
            rows.append({"id": f"{task.split('_')[0]}-{i:04d}", "task": task, "prediction": pred,
                         "references": [" ".join(words)]})
    return rows


def _routing(shape: tuple, seed: int, with_tasks: bool) -> dict:
    experts = shape[1]
    layers = {}
    for path in LAYERS:
        rng = _rng("routing", shape, seed, path)
        task_usage = {}
        for t, task in enumerate(TASKS):
            u = np.full((BLOCKS, experts), 1.0) + rng.random((BLOCKS, experts)) * 0.05
            if path == SPECIALISED:
                u[:, (t + seed) % experts] += 3 * experts      # expert ids differ between seeds
            task_usage[task] = np.round(u / u.sum(axis=1, keepdims=True), 4).tolist()
        usage = np.mean([task_usage[t] for t in TASKS], axis=0)
        entropy = float(-(usage * np.log(usage)).sum(axis=1).mean())
        layers[path] = {"tokens": 1000, "entropy": round(entropy, 6),
                        "normalized_entropy": round(entropy / np.log(experts), 6),
                        "max_usage": round(float(usage.max(axis=1).mean()), 6), "usage": np.round(usage, 6).tolist()}
        if with_tasks:
            layers[path]["task_usage"] = task_usage
    mean = sum(v["normalized_entropy"] for v in layers.values()) / len(layers)
    return {"routed_layers": layers, "mean_normalized_entropy": round(mean, 6), "mean_max_usage": 0.1}


def _curves(preset: str, seed: int, steps: int, final: float, mixture: bool) -> dict:
    rng = _rng("curves", preset, seed, steps)
    train = []
    for step in range(1, steps + 1):
        row = {"step": step, "train/loss": round(2.5 * np.exp(-step / 40) + 0.8 + rng.normal(0, 0.1), 6),
               "train/lr": 1e-3 * (1 - step / steps), "train/step_time_s": 1.0}
        if mixture:
            row["routing/normalized_entropy"] = round(0.99 - 0.1 * step / steps + rng.normal(0, 0.002), 6)
        train.append(row)
    points = [steps // 4, steps // 2, 3 * steps // 4, steps]
    evals = [{"step": s, "rougeL": round(final * (0.6 + 0.4 * s / steps) + rng.normal(0, 1), 4), "exact_match": 0.0,
              "num_instances": len(TASKS) * 5} for s in points]
    return {"train": train, "eval": evals}


def write_run(path: Path, preset: str, seed: int, steps: int = 150, lr: float = 1e-3,
              task_usage: bool = True) -> dict:
    """One finished run's record at `path`; returns its metrics."""
    shape, quality = SHAPES[preset]
    quality += {1e-3: 0.0, 3e-4: -0.05, 3e-3: -0.1}[lr] + (0.03 if steps > 150 else 0.0)
    path.mkdir(parents=True, exist_ok=True)
    rows = _predictions(f"{preset}-{lr}-{steps}", seed, quality)
    metrics = sni_report([r["prediction"] for r in rows], [r["references"] for r in rows], [r["task"] for r in rows],
                         ["synthetic"] * len(rows))
    metrics.update({"trainable_parameters": 1000 * shape[2] * shape[1], "base_non_embedding_parameters": 106203456})
    method = shape[0]
    config = {"model": {"id": "synthetic/SmolLM2-135M"}, "seed": seed,
              "adapter": dict(zip(("method", "experts", "rank", "block_rank"), shape)),
              "train": {"max_steps": steps, "lr": lr}, "eval": {"curve_points": 3}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (path / "data_stats.json").write_text(json.dumps({"tasks": TASKS}))
    (path / "timings.json").write_text(json.dumps({"train_time_s": 1.0, "eval_time_s": 1.0}))
    (path / "provenance.json").write_text(json.dumps({"attempts": [{"commit": "0" * 40, "cpu": "synthetic",
                                                                    "precision": "fp32"}]}))
    (path / "curves.json").write_text(json.dumps(_curves(preset, seed, steps, metrics["rougeL"], method != "lora")))
    if method != "lora":
        (path / "routing.json").write_text(json.dumps(_routing(shape, seed, task_usage)))
    return metrics


def write_cpu_profile(runs_dir: Path, records: Path) -> None:
    """Records of the cpu profile's tables under `runs_dir` (sweep dirs) and `records` (committed records):
    table6 with seeds 1-3 and table6_seeds' seeds 4-5 (of 4-7) in the sweep dir, lr_3e-4 and long in the
    sweep dir, lr_3e-3 as committed records. MoLoRA 12x4's routing.json predates task_usage."""
    root = Path(runs_dir) / "reproduce" / "cpu"
    for preset in SHAPES:
        for seed in (1, 2, 3):
            write_run(root / preset / f"seed{seed}", preset, seed, task_usage=preset != "paper/molora_12x4")
    for preset in ("paper/lora_60", "paper/mode_14x4x1"):
        for seed in (4, 5):
            write_run(root / preset / f"seed{seed}", preset, seed)
        write_run(root / "long" / preset / "seed1", preset, 1, steps=450)
    for preset in ("paper/lora_60", "paper/mode_14x4x1", "paper/lora_4"):
        write_run(root / "lr_3e-4" / preset / "seed1", preset, 1, lr=3e-4)
        write_run(Path(records) / "lr_3e-3" / preset / "seed1", preset, 1, lr=3e-3)
