"""End to end: the real CLI trains and evaluates, mode-eval reproduces the metrics, losses go down."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_SNI, STORIES, needs_shared_sni, needs_stories

from mode.config import compose
from mode.data.collate import collate_train
from mode.losses import AnswerLoss
from mode.train import train

SPEC_FILES = ["config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
              "predictions.jsonl"]


def cli(module, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def check_run_dir(run_dir, tasks_expected: int):
    for name in SPEC_FILES:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_instances"] == len(rows) > 0
    assert {"id", "task", "prediction", "references"} <= set(rows[0])
    assert len({k for k in metrics if k.startswith("rougeL_for_task")}) == tasks_expected
    assert metrics["trainable_parameters"] > 0 and 0 <= metrics["rougeL"] <= 100
    return metrics


def test_tiny_random_train_then_eval_reproduces(sni_fixture, tmp_path):
    run = tmp_path / "run"
    cli("mode.train", "model=tiny_random", f"data.sni_dir={sni_fixture}", "data.tasks=null",
        "data.task_list_file=splits/default/train_tasks.txt", "train.max_steps=3", "train.batch_size=4",
        "train.micro_batch_size=2", "eval.max_new_tokens=4", "eval.batch_size=3", f"hydra.run.dir={run}")
    metrics = check_run_dir(run, tasks_expected=3)
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["absent_tasks"] == ["task004_absent"] and len(stats["tasks"]) == 3
    out = cli("mode.eval", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'eval'}")
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k != "eval_time_s"} == {
        k: v for k, v in metrics.items() if k in again and k != "eval_time_s"}
    assert "reproduces the run's metrics exactly" in out.stdout
    # a finished run directory is never overwritten, Hydra's record of its command included
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    refused = cli("mode.train", "model=tiny_random", f"data.sni_dir={sni_fixture}", f"hydra.run.dir={run}", check=False)
    assert refused.returncode == 2 and "already holds a finished run" in refused.stderr
    assert all(p.read_bytes() == content for p, content in before.items())


@needs_stories
@needs_shared_sni
def test_stories260k_train_then_eval_reproduces(tmp_path):
    run = tmp_path / "run"
    cli("mode.train", "model=stories260k", f"data.sni_dir={SHARED_SNI}", "train.max_steps=4", "train.batch_size=8",
        "data.max_instances_per_task=40", "eval.max_instances_per_task=3", "eval.max_new_tokens=8",
        f"hydra.run.dir={run}")
    metrics = check_run_dir(run, tasks_expected=11)
    cli("mode.eval", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'eval'}")
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["rougeL"] == metrics["rougeL"] and again["exact_match"] == metrics["exact_match"]


@pytest.mark.parametrize("override,message", [
    ("adapter.rank=0", "adapter.rank=0"),
    ("adapter.target_modules=[nope]", "adapter.target_modules"),
    ("data.sni_dir=/does/not/exist", "data.sni_dir='/does/not/exist'"),
    ("train.batch_size=6", "train.batch_size=6 is not a multiple"),
    ("model=stories260k model.name_or_path=/no/such/model", "model.name_or_path='/no/such/model'"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, sni_fixture, override, message):
    run = tmp_path / "run"
    proc = cli("mode.train", "model=tiny_random", f"data.sni_dir={sni_fixture}", "data.tasks=[task001_add_numbers]",
               *override.split(), f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()


@needs_stories
def test_answer_loss_equals_the_model_loss():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES)
    examples = [{"input_ids": list(range(5, 25)), "prompt_length": 12, "task_index": 0},
                {"input_ids": list(range(30, 44)), "prompt_length": 4, "task_index": 1}]
    batch = collate_train(examples, pad_id=0)
    total = AnswerLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    n_answer = sum(len(e["input_ids"]) - e["prompt_length"] for e in examples)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(total / n_answer, reference, rtol=1e-5, atol=1e-5)


@needs_stories
@needs_shared_sni
def test_stories260k_loss_goes_down(tmp_path, monkeypatch):
    cfg = compose("train", ["model=stories260k", f"data.sni_dir={SHARED_SNI}",
                            "data.tasks=[task114_is_the_given_word_longest,task089_swap_words_verification]",
                            "data.max_instances_per_task=64", "train.max_steps=40", "train.lr=5e-3",
                            "train.batch_size=16", "train.log_every=1", "eval.max_instances_per_task=1",
                            "eval.max_new_tokens=2", "adapter.rank=8"])
    losses = []

    class Recorder:
        def log(self, metrics, step=None):
            losses.append(metrics["train/loss"])

        def summary(self, metrics): ...
        def table(self, *a): ...
        def finish(self): ...

    monkeypatch.setattr("mode.train.make_logger", lambda *a, **k: Recorder())
    train(cfg, str(tmp_path / "run"))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
