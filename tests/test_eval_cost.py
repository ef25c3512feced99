"""The evaluation-cost estimate DRY_RUN prints (mode/report/cost.py): the data pipeline's own counting rule,
the smoke profile's line against a hand computation, and the figures behind the paper profile's eval cap
and generation batch (docs/evaluation.md, conf/experiment/paper/base.yaml)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, SHARED, needs_shared_sni
from test_reproduce import run

from mode.data.sni import Task
from mode.data.splits import held_in_eval_count, held_in_split
from mode.report.cost import eval_cost, read_manifest
from mode.run.config import compose

DRIVER = [sys.executable, str(REPO / "experiments" / "reproduce.py")]


@pytest.mark.parametrize("n,fraction,expected", [
    (0, 0.1, 0), (1, 0.1, 0), (2, 0.1, 1), (5, 0.1, 1), (15, 0.1, 2), (25, 0.1, 2), (35, 0.1, 4), (100, 0.1, 10),
    (2, 0.5, 1), (3, 0.5, 2), (4, 0.9, 3)])
def test_held_in_count_by_hand(n, fraction, expected):
    """The count the cost estimate and the split share, against hand-computed values: round half to even
    (25 * 0.1 -> 2), at least one, never every instance."""
    task = Task(name="t", definition="", instances=[{"id": str(i)} for i in range(n)])
    assert held_in_eval_count(n, fraction) == expected
    assert len(held_in_split(task, fraction, seed=0)[1]) == expected


@needs_shared_sni
@pytest.mark.parametrize("gpus,batches", [(1, 2), (2, 1)])
def test_smoke_dry_run_prints_the_hand_computed_estimate(tmp_path, gpus, batches):
    # By hand: the case study names 15 tasks, 11 have files here (README of the SNI copy); each keeps 500
    # instances (task672 159), so its held-in tenth is 50 (16), capped by the smoke profile's
    # eval.max_instances_per_task=2: 11 x 2 = 22 instances; x eval.max_new_tokens=4 = 88 tokens; batches of
    # eval.batch_size=16: ceil(22 / 16) = 2 on one process, ceil(11 / 16) = 1 on each of two.
    manifest = read_manifest(str(SHARED / "sni"))
    assert manifest["task672_amazon_and_yelp_summarization_dataset_summarization"]["here"] == 159
    out = run(DRIVER + ["smoke", "--dry-run", "--tables", "table2", "--gpus", str(gpus), "--runs-dir", str(tmp_path)])
    expected = ("evaluation estimate (11 tasks, 4 named tasks not in manifest.tsv): 22 instances x <= 4 new tokens "
                f"= <= 88 tokens; {batches} generation batches of <= 16 on the busiest of {gpus} process(es)")
    lines = [line.strip() for line in out.splitlines() if "evaluation estimate" in line]
    assert lines and all(line.startswith(expected) for line in lines), lines[:1]
    assert len(lines) == sum(line.startswith(("+ ", "[slot")) for line in out.splitlines())  # one per job
    assert "with the full upstream SNI" not in out  # the cap makes both copies equal


@needs_shared_sni
def test_the_paper_profiles_eval_cap_and_batch_follow_from_the_estimate():
    """The figures docs/evaluation.md and conf/experiment/paper/base.yaml quote."""
    overrides = ["experiment=paper/table2", "adapter=paper/lora_64", f"paths.sni_dir={SHARED / 'sni'}"]
    everything = eval_cost(compose("train", overrides + ["eval.max_instances_per_task=null", "eval.batch_size=32"]),
                           world=8)
    assert everything["tasks"] == 678 and len(everything["missing"]) == 78
    assert everything["upstream_instances"] == 200_063 and everything["upstream_batches_per_process"] == 782
    chosen = eval_cost(compose("train", overrides), world=8)  # the profile's cap 100, batch 64
    assert (chosen["upstream_instances"], chosen["batch"], chosen["upstream_batches_per_process"]) == (49_829, 64, 98)
    assert chosen["upstream_new_tokens"] == 49_829 * 128
    # Gemma 2B: 18 layers x 1 KV head x 256 x (K, V) x 2 bytes (bf16) x 64 sequences x 1,024 tokens
    assert chosen["kv_cache_bytes"] == 18 * 1 * 256 * 2 * 2 * 64 * 1024 == pytest.approx(1.1 * 2**30, rel=0.03)


@needs_shared_sni
@pytest.mark.parametrize("filters", [{"categories": ["question_answering"]}, {"categories": ["Question Answering"]},
                                     {"exclude_categories": ["summarization", "POS Tagging"]}])
def test_category_filters_count_the_tasks_the_pipeline_selects(filters):
    """Category names in either spelling select the same tasks in the estimate as in the data pipeline
    (planted: comparing raw names makes the key spelling count no task)."""
    from omegaconf import OmegaConf

    from mode.data.tasksets import resolve_task_sets

    cfg = compose("train", ["experiment=cpu/table6", "adapter=paper/lora_60", f"paths.sni_dir={SHARED / 'sni'}"])
    OmegaConf.set_struct(cfg, False)
    cfg.data.update(filters)
    cost = eval_cost(cfg)
    sets = resolve_task_sets(cfg.data)
    assert 0 < cost["tasks"] == len(sets.eval) < 11
