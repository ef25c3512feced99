"""Held-in splits (mode/data/splits.py through `build_data`, as mode-train builds them from its config): a
task's evaluation and training instances depend on data.split_seed and the task alone, never on the
training seed or on which other tasks are selected (every run of a sweep evaluates the same instances)."""

from __future__ import annotations

from collections import defaultdict

from mode.data.dataset import build_data
from mode.models import byte_tokenizer
from mode.run.config import compose

TASKS = ["task001_add_numbers", "task002_echo_word", "task003_yes_no"]


def split_of(sni_dir, tasks: list[str], *overrides: str) -> dict[str, dict[str, list[str]]]:
    """{task: {"train": ids, "eval": ids}} in the order build_data gives them."""
    cfg = compose("train", ["model=tiny_random", f"data.sni_dir={sni_dir}", f"data.tasks=[{','.join(tasks)}]",
                            "eval.max_instances_per_task=null", *overrides])
    data = build_data(cfg.data, cfg.eval, byte_tokenizer())
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"train": [], "eval": []})
    for part, rows in (("train", data.train), ("eval", data.eval)):
        for row in rows:
            out[row["task"]][part].append(row["id"])
    return dict(out)


def test_the_training_seed_changes_no_split(sni_fixture):
    one = split_of(sni_fixture, TASKS, "seed=1")
    assert set(one) == set(TASKS) and all(s["eval"] and s["train"] for s in one.values())
    for seed in (2, 1234):
        assert split_of(sni_fixture, TASKS, f"seed={seed}") == one, seed


def test_a_tasks_split_does_not_depend_on_the_other_tasks_selected(sni_fixture):
    full = split_of(sni_fixture, TASKS)
    for selection in (["task002_echo_word"], ["task003_yes_no", "task001_add_numbers"],
                      ["task001_add_numbers", "task002_echo_word"]):
        part = split_of(sni_fixture, selection)
        assert set(part) == set(selection)
        for task in selection:
            assert part[task] == full[task], (selection, task)


def test_the_split_seed_does_change_the_split(sni_fixture):
    """Guard for the two tests above: the compared splits are seeded shuffles, not a fixed order."""
    zero, one = split_of(sni_fixture, TASKS), split_of(sni_fixture, TASKS, "data.split_seed=1")
    assert zero["task001_add_numbers"]["eval"] != one["task001_add_numbers"]["eval"]
    for task in TASKS:  # the same instances, divided differently
        assert sorted(zero[task]["train"] + zero[task]["eval"]) == sorted(one[task]["train"] + one[task]["eval"])
        assert len(zero[task]["eval"]) == len(one[task]["eval"])
