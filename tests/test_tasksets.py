"""Task selection and instance splits: protocols, category filters, the English guard, determinism."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_SNI, _task, needs_shared_sni
from omegaconf import OmegaConf

from mode.data.dataset import select_instances
from mode.data.sni import load_task, read_task_list
from mode.data.splits import held_in_split, held_out_eval, held_out_train
from mode.data.tasksets import resolve_task_sets
from mode.errors import ModeError


def cfg(sni_dir, **kw):
    base = {"sni_dir": str(sni_dir), "tasks": None, "task_list_file": "splits/default/train_tasks.txt",
            "allow_missing_tasks": True, "protocol": "held_in", "eval_fraction": 0.1, "split_seed": 0,
            "max_instances_per_task": None}
    return OmegaConf.create({**base, **kw})


HELD_OUT = {"protocol": "held_out", "eval_task_list_file": "splits/default/test_tasks.txt"}
EVAL_ALL = OmegaConf.create({"max_instances_per_task": None})


def add_task(sni_dir, name, **fields):
    body = _task(name, 30, "Translate the sentence", "Translation")
    body.update(fields)
    (sni_dir / "tasks" / f"{name}.json").write_text(json.dumps(body))
    with open(sni_dir / "splits" / "default" / "train_tasks.txt", "a") as f:
        f.write(name + "\n")


def test_held_in_evaluates_the_training_tasks_with_their_own_indices(sni_fixture):
    sets = resolve_task_sets(cfg(sni_fixture))
    assert sets.train == sets.eval == ["task001_add_numbers", "task002_echo_word", "task003_yes_no"]
    assert [sets.task_index(t) for t in sets.eval] == [0, 1, 2]
    train, evaluation = select_instances(sets, cfg(sni_fixture), EVAL_ALL)
    assert {r["task_index"] for r in evaluation} == {0, 1, 2}
    assert not {r["id"] for r in train} & {r["id"] for r in evaluation}


def test_held_out_trains_on_train_tasks_and_evaluates_the_first_100_of_test_tasks(sni_fixture):
    c = cfg(sni_fixture, max_instances_per_task=7, **HELD_OUT)
    sets = resolve_task_sets(c)
    assert sets.eval == ["task900_test_only"] and "task900_test_only" not in sets.train
    # unseen evaluation tasks are numbered after the training tasks: no index names two tasks
    assert sets.task_index("task900_test_only") == len(sets.train) == 3
    train, evaluation = select_instances(sets, c, EVAL_ALL)
    task = load_task(sni_fixture, "task900_test_only")
    assert [r["id"] for r in evaluation] == [i["id"] for i in task.instances[:100]]
    assert {r["task_index"] for r in evaluation} == {3}
    per_task = {t: [r for r in train if r["task"] == t] for t in sets.train}
    assert {t: len(rows) for t, rows in per_task.items()} == {
        "task001_add_numbers": 7, "task002_echo_word": 7, "task003_yes_no": 7}
    # a seeded shuffle, not the file's first 7
    first7 = [i["id"] for i in load_task(sni_fixture, "task001_add_numbers").instances[:7]]
    assert [r["id"] for r in per_task["task001_add_numbers"]] != first7


def test_held_out_eval_cap_samples_the_official_100_deterministically(sni_fixture):
    task = load_task(sni_fixture, "task900_test_only")
    a = held_out_eval(task, pool=100, cap=20, seed=0)
    assert len(a) == 20 and {i["id"] for i in a} <= {i["id"] for i in task.instances[:100]}
    assert a == held_out_eval(task, pool=100, cap=20, seed=0)
    assert a != held_out_eval(task, pool=100, cap=20, seed=1)
    assert a != task.instances[:20]  # a sample of the pool, not its head (the pool is label-balanced)
    ids = [i["id"] for i in a]
    assert ids == sorted(ids, key=lambda x: int(x.rsplit("-", 1)[1]))  # kept in file order


def test_a_task_both_trained_and_evaluated_under_held_out_is_an_error(sni_fixture):
    c = cfg(sni_fixture, protocol="held_out", eval_tasks=["task002_echo_word", "task900_test_only"])
    with pytest.raises(ModeError, match="both training and evaluation tasks.*task002_echo_word"):
        resolve_task_sets(c)


def test_eval_tasks_under_held_in_and_unknown_protocols_are_errors(sni_fixture):
    with pytest.raises(ModeError, match="data.eval_task_list_file is set but data.protocol=held_in"):
        resolve_task_sets(cfg(sni_fixture, eval_task_list_file="splits/default/test_tasks.txt"))
    with pytest.raises(ModeError, match="data.protocol='cross' is not one of"):
        resolve_task_sets(cfg(sni_fixture, protocol="cross"))


def test_absent_evaluation_task_is_reported_like_a_training_one(sni_fixture):
    (sni_fixture / "splits/default/test_tasks.txt").write_text("task900_test_only\ntask999_gone\n")
    c = cfg(sni_fixture, allow_missing_tasks=False, tasks=["task001_add_numbers"], task_list_file=None, **HELD_OUT)
    with pytest.raises(ModeError, match="test_tasks.txt have no file under .*: task999_gone"):
        resolve_task_sets(c)


def test_non_english_tasks_are_refused_unless_allowed(sni_fixture):
    add_task(sni_fixture, "task500_translate_es", Output_language=["Spanish"])
    with pytest.raises(ModeError, match=r"1 selected task\(s\) are not English: task500_translate_es "
                                        r"\(Output_language=\['Spanish'\]\).*data.allow_non_english=true"):
        resolve_task_sets(cfg(sni_fixture))
    sets = resolve_task_sets(cfg(sni_fixture, allow_non_english=True))
    assert "task500_translate_es" in sets.train


def test_category_filters(sni_fixture):
    sets = resolve_task_sets(cfg(sni_fixture, categories=["question_answering", "Text Matching"]))
    assert sets.train == ["task002_echo_word", "task003_yes_no"]
    sets = resolve_task_sets(cfg(sni_fixture, exclude_categories=["Question Answering"]))
    assert sets.train == ["task001_add_numbers", "task002_echo_word"]
    with pytest.raises(ModeError, match="data.categories: 'Poetry' is the category of no selected task"):
        resolve_task_sets(cfg(sni_fixture, categories=["Poetry"]))
    with pytest.raises(ModeError, match="leave no training task"):
        resolve_task_sets(cfg(sni_fixture, categories=["Arithmetic"], exclude_categories=["Arithmetic"]))


def test_malformed_fields_name_the_file_and_the_field(sni_fixture):
    add_task(sni_fixture, "task501_bad_examples", **{"Positive Examples": [{"input": "x"}]})
    with pytest.raises(ModeError, match=r"task501_bad_examples.json: Positive Examples\[0\] needs string 'input' and 'output'"):
        resolve_task_sets(cfg(sni_fixture))
    add_task(sni_fixture, "task502_bad_categories", Categories="Translation")
    with pytest.raises(ModeError, match="task502_bad_categories.json: 'Categories' must be a list of strings"):
        load_task(sni_fixture, "task502_bad_categories")


def test_caps_respected_and_capping_never_moves_evaluation(sni_fixture):
    sets = resolve_task_sets(cfg(sni_fixture))
    full = select_instances(sets, cfg(sni_fixture), EVAL_ALL)
    capped = select_instances(sets, cfg(sni_fixture, max_instances_per_task=5), OmegaConf.create({"max_instances_per_task": 2}))
    assert max(sum(r["task"] == t for r in capped[0]) for t in sets.train) == 5
    assert max(sum(r["task"] == t for r in capped[1]) for t in sets.train) == 2
    assert {r["id"] for r in capped[0]} <= {r["id"] for r in full[0]}
    assert [r["id"] for r in capped[1]] == [r["id"] for r in full[1] if r["id"] in {x["id"] for x in capped[1]}]
    with pytest.raises(ModeError, match="data.max_instances_per_task=0 must be a positive integer"):
        select_instances(sets, cfg(sni_fixture, max_instances_per_task=0), EVAL_ALL)


SPLIT_SCRIPT = """
import json, sys
from mode.data.sni import load_task
from mode.data.splits import held_in_split, held_out_train, held_out_eval
task = load_task(sys.argv[1], "task001_add_numbers")
tr, ev = held_in_split(task, 0.1, 3)
print(json.dumps([[i["id"] for i in tr], [i["id"] for i in ev], [i["id"] for i in held_out_train(task, 9, 3)],
                  [i["id"] for i in held_out_eval(task, 30, 5, 3)]]))
"""


def test_splits_are_identical_across_processes(sni_fixture):
    task = load_task(sni_fixture, "task001_add_numbers")
    tr, ev = held_in_split(task, 0.1, 3)
    here = [[i["id"] for i in tr], [i["id"] for i in ev], [i["id"] for i in held_out_train(task, 9, 3)],
            [i["id"] for i in held_out_eval(task, 30, 5, 3)]]
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, str(sni_fixture)], cwd=REPO, capture_output=True,
                             text=True, check=True, env={"PYTHONHASHSEED": hash_seed, "PATH": ""})
        assert json.loads(out.stdout) == here


@needs_shared_sni
@pytest.mark.bundled_sni
def test_held_in_splits_of_every_bundled_train_task_are_disjoint_and_90_10():
    names = [n for n in read_task_list(SHARED_SNI / "splits/default/train_tasks.txt")
             if (SHARED_SNI / "tasks" / f"{n}.json").is_file()]
    assert len(names) == 678
    for name in names:
        task = load_task(SHARED_SNI, name)
        train, evaluation = held_in_split(task, 0.1, 0)
        ids_train, ids_eval = {i["id"] for i in train}, {i["id"] for i in evaluation}
        assert not ids_train & ids_eval, name
        assert len(train) + len(evaluation) == len(task.instances), name
        assert abs(len(evaluation) - 0.1 * len(task.instances)) <= 1, name


@needs_shared_sni
@pytest.mark.bundled_sni
def test_bundled_held_out_config_selects_disjoint_train_and_test_tasks():
    from mode.run.config import compose

    c = compose("train", ["data=sni_held_out", f"data.sni_dir={SHARED_SNI}"]).data
    sets = resolve_task_sets(c)
    assert (len(sets.train), len(sets.eval)) == (678, 104)
    assert not set(sets.train) & set(sets.eval)
    assert len(sets.absent) == (756 - 678) + (119 - 104)
