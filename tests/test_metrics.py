"""mode.metrics against rouge-score called as the official SNI evaluation calls it."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from mode.metrics import category_key, normalize_answer, sni_metrics


def official_rouge_l(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def test_exact_match_normalisation_keeps_articles():
    assert normalize_answer("  The  Cat, sat!! ") == "the cat sat"
    assert sni_metrics(["the answer"], [["answer"]])["exact_match"] == 0.0
    assert sni_metrics(["Answer."], [["answer"]])["exact_match"] == 100.0


def test_rouge_argument_order_matters_and_is_target_first():
    pred, ref = "the cats were sitting on the mat today", "cats sitting"
    expected = round(100 * official_rouge_l(pred, ref), 4)
    assert sni_metrics([pred], [[ref]])["rougeL"] == expected


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
