"""SNI metrics exactly as the official evaluation computes them (allenai/natural-instructions
`eval/automatic/evaluation.py`): ROUGE-L F (rouge-score, Porter stemming, default tokenizer) and exact
match after lowercasing, deleting punctuation and collapsing whitespace; each the max over an
instance's references; mean x 100 rounded to 4 decimals; the same per group.
"""

from __future__ import annotations

import string
from collections import defaultdict

from rouge_score import rouge_scorer

from mode.data.sni import category_key  # noqa: F401  (metric-key groups; public here too)

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop every string.punctuation character, collapse whitespace (articles are kept)."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCT).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def rouge_l(prediction: str, reference: str) -> float:
    return _SCORER.score(target=reference, prediction=prediction)["rougeL"].fmeasure  # target first!


def _max_over_references(metric, prediction: str, references: list[str]) -> float:
    return max(metric(prediction, ref) for ref in references)


def instance_scores(predictions: list[str], references: list[list[str]]) -> list[tuple[float, float]]:
    """(exact match, ROUGE-L F) of each instance, each the max over its references (0/1 and 0..1)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    out = []
    for pred, refs in zip(predictions, references):
        if not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(f"references must be non-empty lists of strings, got {refs!r}")
        pred = pred or ""  # a missing prediction scores as the empty string
        out.append((float(_max_over_references(exact_match, pred, refs)), _max_over_references(rouge_l, pred, refs)))
    return out


def aggregate(scores: list[tuple[float, float]]) -> dict[str, float]:
    """Mean x 100 rounded to 4 decimals, summed in instance order as the official script does."""
    em = rouge = 0.0
    for e, r in scores:
        em += e
        rouge += r
    n = len(scores)
    return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rouge / n, 4)}


def _by_group(scores: list, groups: list[str]) -> dict[str, list]:
    if len(groups) != len(scores):
        raise ValueError(f"{len(groups)} groups but {len(scores)} predictions")
    out: dict[str, list] = defaultdict(list)
    for score, group in zip(scores, groups):
        out[group].append(score)
    return out


def sni_metrics(predictions: list[str], references: list[list[str]], groups: list[str] | None = None) -> dict:
    """`exact_match`, `rougeL` and, with `groups`, `exact_match_for_<g>` / `rougeL_for_<g>`."""
    scores = instance_scores(predictions, references)
    out = aggregate(scores)
    if groups is not None:
        for group, group_scores in _by_group(scores, groups).items():
            for key, value in aggregate(group_scores).items():
                out[f"{key}_for_{group}"] = value
    return out


def sni_report(predictions: list[str], references: list[list[str]], tasks: list[str],
               categories: list[str]) -> dict:
    """Overall, per-task and per-category metrics, each instance scored once.

    Flat keys as `sni_metrics` (`rougeL_for_<task>`, `rougeL_for_<category>`, ...) plus two tables:
    `per_task` {task: {rougeL, exact_match, num_instances, category}} and `per_category`
    {category: {rougeL, exact_match, num_instances, num_tasks}}; `categories[i]` is instance i's
    category key (the first category of its task, as Tk-Instruct groups them).
    """
    scores = instance_scores(predictions, references)
    out = aggregate(scores)
    out["num_instances"] = len(scores)
    per_task, per_category = {}, {}
    task_category = dict(zip(tasks, categories))
    for table, groups in ((per_task, tasks), (per_category, categories)):
        for group, group_scores in _by_group(scores, groups).items():
            metrics = aggregate(group_scores)
            out.update({f"{key}_for_{group}": value for key, value in metrics.items()})
            table[group] = {**metrics, "num_instances": len(group_scores)}
    for task, row in per_task.items():
        row["category"] = task_category[task]
    for category, row in per_category.items():
        row["num_tasks"] = sum(1 for t in per_task.values() if t["category"] == category)
    out["per_task"], out["per_category"] = per_task, per_category
    return out
