"""The held-out protocol and a non-default mixture through the real CLI (tiny random model, fixture SNI)."""

from __future__ import annotations

import json

from test_train_eval import cli


def test_held_out_run_trains_on_train_tasks_and_reports_unseen_test_tasks(sni_fixture, tmp_path):
    run = tmp_path / "run"
    cli("mode.train", "model=tiny_random", "data=sni_held_out", f"data.sni_dir={sni_fixture}",
        "data.max_instances_per_task=5", "data.sampling=temperature", "data.encoding.max_source_length=300",
        "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4", "eval.max_instances_per_task=6",
        "eval.max_new_tokens=3", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}")
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["protocol"] == "held_out" and stats["eval_tasks"] == ["task900_test_only"]
    assert stats["tasks"] == ["task001_add_numbers", "task002_echo_word", "task003_yes_no"]
    assert stats["per_task"]["task001_add_numbers"]["train"] == 5 and stats["per_task"]["task900_test_only"]["eval"] == 6
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["per_task"]) == ["task900_test_only"] and metrics["num_instances"] == 6
    assert metrics["per_task"]["task900_test_only"]["category"] == "question_answering"
    assert metrics["per_category"]["question_answering"]["num_tasks"] == 1
    assert any((tmp_path / "cache" / "sni").iterdir())  # tokenised data went to paths.cache_dir


def test_more_refuses_held_out_before_training(sni_fixture, tmp_path):
    """MoRE routes by training task: unseen evaluation tasks have no task embedding, so refuse up front."""
    run = tmp_path / "run"
    proc = cli("mode.train", "model=tiny_random", "data=sni_held_out", "adapter=more", f"data.sni_dir={sni_fixture}",
               "data.max_instances_per_task=5", "train.max_steps=2", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2 and "routes by training task" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "adapter").exists()
