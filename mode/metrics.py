"""SNI metrics exactly as the official evaluation computes them (allenai/natural-instructions
`eval/automatic/evaluation.py`): ROUGE-L F (rouge-score, Porter stemming, default tokenizer) and exact
match after lowercasing, deleting punctuation and collapsing whitespace; each the max over an
instance's references; mean x 100 rounded to 4 decimals; the same per group.
"""

from __future__ import annotations

import string
from collections import defaultdict

from rouge_score import rouge_scorer

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


def _scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    em = rouge = 0.0
    for pred, refs in zip(predictions, references):
        if not isinstance(refs, list) or not refs:
            raise ValueError(f"references must be non-empty lists of strings, got {refs!r}")
        pred = pred or ""  # a missing prediction scores as the empty string
        em += _max_over_references(exact_match, pred, refs)
        rouge += _max_over_references(rouge_l, pred, refs)
    n = len(references)
    return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rouge / n, 4)}


def sni_metrics(predictions: list[str], references: list[list[str]], groups: list[str] | None = None) -> dict:
    """`exact_match`, `rougeL` and, with `groups`, `exact_match_for_<g>` / `rougeL_for_<g>`."""
    out = _scores(predictions, references)
    if groups is not None:
        if len(groups) != len(predictions):
            raise ValueError(f"{len(groups)} groups but {len(predictions)} predictions")
        by_group: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for pred, refs, group in zip(predictions, references, groups):
            by_group[group][0].append(pred)
            by_group[group][1].append(refs)
        for group, (preds, refs) in by_group.items():
            for key, value in _scores(preds, refs).items():
                out[f"{key}_for_{group}"] = value
    return out


def category_key(name: str) -> str:
    """Category names become metric-key groups as upstream does: lowercase, spaces -> underscores."""
    return "_".join(name.lower().split())
