"""mode.evaluation.metrics against rouge-score called as the official SNI evaluation calls it."""

from __future__ import annotations

import pytest
from conftest import SHARED_SNI, needs_shared_sni
from rouge_score import rouge_scorer

from mode.evaluation.metrics import category_key, normalize_answer, sni_metrics


def official_rouge_l(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def test_exact_match_normalisation_keeps_articles():
    assert normalize_answer("  The  Cat, sat!! ") == "the cat sat"
    assert sni_metrics(["the answer"], [["answer"]])["exact_match"] == 0.0
    assert sni_metrics(["Answer."], [["answer"]])["exact_match"] == 100.0


def test_rouge_scorer_gets_the_reference_as_target_and_the_prediction_as_prediction(monkeypatch):
    """ROUGE-L F is symmetric, so the reported score cannot show a swapped order; precision and recall can.
    The scorer the project uses is wrapped so that it reports recall (LCS / reference tokens when the
    reference is the target) in place of F: here 2/2 = 100 target-first and 2/8 = 25 if the order were swapped."""
    import mode.evaluation.metrics as metrics_module

    real = metrics_module._SCORER
    calls = []

    class RecallScorer:
        def score(self, target, prediction):
            calls.append((target, prediction))
            s = real.score(target, prediction)["rougeL"]
            return {"rougeL": type(s)(precision=s.precision, recall=s.recall, fmeasure=s.recall)}

    monkeypatch.setattr(metrics_module, "_SCORER", RecallScorer())
    pred, ref = "the cats were sitting on the mat today", "cats sitting"  # stems: cat, sit in both
    assert sni_metrics([pred], [[ref]])["rougeL"] == 100.0
    assert calls == [(ref, pred)]
    # the rouge-score facts the wrapper relies on: recall is over the target's tokens, precision the prediction's
    s = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(target=ref, prediction=pred)["rougeL"]
    assert (s.precision, s.recall) == (0.25, 1.0)


def test_rouge_l_f_is_symmetric_so_the_order_cannot_change_a_reported_score():
    pred, ref = "the cats were sitting on the mat today", "cats sitting"
    assert official_rouge_l(pred, ref) == official_rouge_l(ref, pred) == 0.4
    assert sni_metrics([pred], [[ref]])["rougeL"] == sni_metrics([ref], [[pred]])["rougeL"] == 40.0


def test_max_over_references_and_missing_prediction():
    m = sni_metrics(["blue", None], [["red", "blue"], ["anything"]])
    assert m == {"exact_match": 50.0, "rougeL": 50.0}


def test_non_ascii_tokenises_to_nothing():
    assert sni_metrics(["日本語"], [["日本語"]])["rougeL"] == 0.0
    assert sni_metrics(["日本語"], [["日本語"]])["exact_match"] == 100.0


def test_groups_and_rounding():
    preds = ["a b c", "x", "one two three"]
    refs = [["a b d"], ["y"], ["one two three"]]
    m = sni_metrics(preds, refs, groups=["t1", "t1", "t2"])
    assert m["rougeL_for_t2"] == 100.0 and m["exact_match_for_t1"] == 0.0
    assert m["rougeL_for_t1"] == round(100 * (official_rouge_l("a b c", "a b d") + 0.0) / 2, 4)
    assert m["rougeL"] == round(100 * (official_rouge_l("a b c", "a b d") + 1.0) / 3, 4)


def test_category_key():
    assert category_key("Question Answering") == "question_answering"


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        sni_metrics(["a"], [["a"], ["b"]])


# --- against the official implementation, on real SNI data -------------------------------------------
# A direct port of Tk-Instruct's src/compute_metrics.py (the leaderboard's scorer): a fresh RougeScorer per
# call, `score(prediction=..., target=...)`, SQuAD normalisation without article removal, max over
# references, x100, rounded to 4 decimals; grouped metrics by the same function.

def _official_normalize(s):
    import string as _string

    exclude = set(_string.punctuation)
    return " ".join("".join(ch for ch in s.lower() if ch not in exclude).split())


def _official_compute_metrics(predictions, references):
    exact, rouge = 0, 0
    for pred, gold in zip(predictions, references):
        exact += max(_official_normalize(pred) == _official_normalize(g) for g in gold)
        rouge += max(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(prediction=pred, target=g)["rougeL"].fmeasure
                     for g in gold)
    return {"exact_match": round(100.0 * exact / len(references), 4), "rougeL": round(100.0 * rouge / len(references), 4)}


def _real_pairs(per_task=6):
    """(prediction, references, task) triples from real tasks: exact answers, case/punctuation variants,
    another instance's answer, the input itself, truncations and empty strings."""
    import json
    import random

    rng = random.Random(0)
    files = sorted((SHARED_SNI / "tasks").glob("*.json"))
    triples = []
    for path in rng.sample(files, 60):
        instances = json.loads(path.read_text())["Instances"][:40]
        for k in range(per_task):
            inst = instances[k % len(instances)]
            other = instances[(k * 7 + 3) % len(instances)]
            ref = inst["output"][0]
            candidates = [ref, ref.upper() + "!", other["output"][0], inst["input"][:200],
                          " ".join(ref.split()[: max(1, len(ref.split()) // 2)]), "", "the " + ref]
            triples.append((candidates[k % len(candidates)], inst["output"], path.stem))
    return triples


@needs_shared_sni
def test_sni_metrics_equal_the_official_scorer_on_hundreds_of_real_pairs():
    triples = _real_pairs()
    assert len(triples) >= 300
    preds, refs, tasks = map(list, zip(*triples))
    ours = sni_metrics(preds, refs, groups=tasks)
    official = _official_compute_metrics(preds, refs)
    assert ours["rougeL"] == official["rougeL"] and ours["exact_match"] == official["exact_match"]
    assert 0 < official["exact_match"] < 100 and 0 < official["rougeL"] < 100  # the pairs are not trivial
    for task in set(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        expected = _official_compute_metrics([preds[i] for i in rows], [refs[i] for i in rows])
        assert ours[f"rougeL_for_{task}"] == expected["rougeL"], task
        assert ours[f"exact_match_for_{task}"] == expected["exact_match"], task


def test_exact_match_edge_cases():
    # articles stay, every string.punctuation character goes, whitespace collapses, case folds
    assert normalize_answer("A  (b)\n c-d.") == "a b cd"
    assert sni_metrics(["an apple"], [["apple"]])["exact_match"] == 0.0
    # punctuation outside string.punctuation (typographic quotes) is kept, as upstream keeps it
    assert sni_metrics(["\u2018yes\u2019"], [["yes"]])["exact_match"] == 0.0
    # a whitespace-only prediction equals an empty or punctuation-only reference after normalisation
    assert sni_metrics(["   "], [["..."]])["exact_match"] == 100.0


def test_each_metric_takes_its_own_best_reference():
    pred = "the cat sat on the mat"
    refs = ["The cat sat on the mat!", "cat sat on mat"]
    m = sni_metrics([pred], [refs])
    assert m["exact_match"] == 100.0 and m["rougeL"] == 100.0
    # EM best from one reference, ROUGE-L best from another
    refs = ["dog", "a cat sat on the mat today"]
    m = sni_metrics(["cat sat on the mat"], [refs])
    assert m["exact_match"] == 0.0
    assert m["rougeL"] == round(100 * official_rouge_l("cat sat on the mat", refs[1]), 4)


def test_stemming_is_on():
    assert sni_metrics(["running dogs"], [["run dog"]])["rougeL"] == 100.0


def test_report_tables_agree_with_flat_keys():
    from mode.evaluation.metrics import sni_report

    preds = ["yes", "no", "a b", "x y z", ""]
    refs = [["yes"], ["yes"], ["a b c"], ["x y z"], ["q"]]
    tasks = ["t1", "t1", "t2", "t3", "t3"]
    cats = ["qa", "qa", "qa", "gen", "gen"]
    r = sni_report(preds, refs, tasks, cats)
    assert r["num_instances"] == 5 and r["rougeL"] == sni_metrics(preds, refs)["rougeL"]
    assert r["per_task"]["t1"] == {"rougeL": 50.0, "exact_match": 50.0, "num_instances": 2, "category": "qa"}
    assert r["per_category"]["gen"] == {"rougeL": 50.0, "exact_match": 50.0, "num_instances": 2, "num_tasks": 1}
    assert r["per_category"]["qa"]["num_tasks"] == 2
    for t, row in r["per_task"].items():
        assert r[f"rougeL_for_{t}"] == row["rougeL"]
