"""The files a finished evaluation leaves in a run (or evals/<time>/) folder; metrics.json is written last."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mode.run.fileio import atomic_write_text

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
