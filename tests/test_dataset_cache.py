"""build_data end to end: datasets-based tokenisation, its cache key, parallel encoding, held-out rows."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from test_data import EVAL, data_cfg

import mode.data.dataset as dataset_module
from mode.data.dataset import Rows, build_data
from mode.errors import ModeError
from mode.models import byte_tokenizer


def entries(cache_dir):
    return sorted(p.name for p in (cache_dir / "sni").iterdir() if p.is_dir() and not p.name.startswith("."))


def rows(data):
    return [(r["id"], r["input_ids"], r["prompt_length"]) for r in data.train], [
        (r["id"], r["prompt_ids"], r["references"], r["categories"]) for r in data.eval]


def test_second_build_loads_the_cache_and_anything_that_changes_tokens_changes_the_key(sni_fixture, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=cache)
    assert len(entries(cache)) == 2  # train + eval

    def no_encoding(*a, **k):
        raise AssertionError("tokenised again instead of loading the cache")

    with monkeypatch.context() as m:
        m.setattr(dataset_module, "_encode", no_encoding)
        again = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=cache)
    assert rows(again) == rows(first) and again.stats == first.stats
    assert len(entries(cache)) == 2

    chat = byte_tokenizer()
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    variants = [
        (data_cfg(sni_fixture, encoding={"num_pos_examples": 1}), byte_tokenizer()),   # encoding option
        (data_cfg(sni_fixture, split_seed=1), byte_tokenizer()),                        # split
        (data_cfg(sni_fixture, max_instances_per_task=5), byte_tokenizer()),            # cap (train part only)
        (data_cfg(sni_fixture), chat),                                                  # tokenizer
    ]
    seen = set(entries(cache))
    for cfg, tok in variants:
        build_data(cfg, EVAL, tok, cache_dir=cache)
        new = set(entries(cache)) - seen
        assert new, cfg
        seen |= new
    # editing a task file changes its fingerprint, hence both keys
    path = sni_fixture / "tasks" / "task001_add_numbers.json"
    body = json.loads(path.read_text())
    body["Definition"] = ["Add the two numbers, please"]
    path.write_text(json.dumps(body))
    before = set(entries(cache))
    edited = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=cache)
    assert len(set(entries(cache)) - before) == 2 and rows(edited) != rows(first)


def test_parallel_encoding_equals_serial(sni_fixture):
    serial = build_data(data_cfg(sni_fixture, num_proc=1), EVAL, byte_tokenizer())
    parallel = build_data(data_cfg(sni_fixture, num_proc=2), EVAL, byte_tokenizer())
    assert rows(parallel) == rows(serial) and parallel.stats == serial.stats


def test_held_out_rows_and_record(sni_fixture, tmp_path):
    cfg = data_cfg(sni_fixture, protocol="held_out", eval_task_list_file="splits/default/test_tasks.txt",
                   max_instances_per_task=6)
    data = build_data(cfg, OmegaConf.create({"max_instances_per_task": None}), byte_tokenizer(), cache_dir=tmp_path)
    assert data.tasks == ["task001_add_numbers", "task002_echo_word", "task003_yes_no"]
    assert data.eval_tasks == ["task900_test_only"]
    assert len(data.train) == 18 and {r["task_index"] for r in data.train} == {0, 1, 2}
    assert len(data.eval) == 100 and {r["task_index"] for r in data.eval} == {3}
    record = data.record()
    assert record["protocol"] == "held_out" and record["eval_tasks"] == ["task900_test_only"]
    assert record["per_task"]["task900_test_only"]["eval"] == 100 and record["per_task"]["task001_add_numbers"]["train"] == 6
    only_eval = build_data(cfg, OmegaConf.create({"max_instances_per_task": 10}), byte_tokenizer(),
                           cache_dir=tmp_path, need_train=False)
    assert len(only_eval.train) == 0 and len(only_eval.eval) == 10


def test_rows_read_like_a_list_of_dicts(sni_fixture):
    data = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer())
    first = data.train[0]
    assert set(first) == {"id", "task", "task_index", "input_ids", "prompt_length", "length"}
    assert first["length"] == len(first["input_ids"]) and data.train[-1] == data.train[len(data.train) - 1]
    assert data.train[1:3] == [data.train[1], data.train[2]] and data.eval[::3][1] == data.eval[3]
    assert data.train.column("length") == [len(r["input_ids"]) for r in data.train]
    with pytest.raises(IndexError):
        data.train[len(data.train)]
    picked = Rows(data.train.dataset.select([5, 0, 3]))  # an indices mapping, as after dropping rows
    assert picked.column("task_index") == [r["task_index"] for r in picked] and picked.column("id") == [
        data.train[i]["id"] for i in (5, 0, 3)]


def test_overlong_training_instances_are_dropped_and_counted(sni_fixture):
    # the query "Now complete the following example -\nInput: question number N?\nOutput:" is 70 bytes for
    # a one-digit N and 71 for two digits: with a 70-token budget only N < 10 fits
    cfg = data_cfg(sni_fixture, tasks=["task001_add_numbers"], task_list_file=None,
                   encoding={"num_pos_examples": 0, "add_definition": False, "max_source_length": 70})
    data = build_data(cfg, EVAL, byte_tokenizer())
    s = data.stats["task001_add_numbers"]
    kept = {r["id"] for r in data.train}
    assert kept and all(int(i.rsplit("-", 1)[1]) < 10 for i in kept)
    assert s["train"] == len(kept) and s["train_dropped_overlong"] == 36 - len(kept)
    assert s["train_answers_truncated"] == 0
    # every answer cut ("answer N" is longer than 2 byte tokens): only the kept rows count as cut
    cfg.encoding.max_target_length = 2
    s = build_data(cfg, EVAL, byte_tokenizer()).stats["task001_add_numbers"]
    assert s["train_dropped_overlong"] == 36 - len(kept) > 0 and s["train_answers_truncated"] == len(kept)
    long_eval = [r for r in data.eval if int(r["id"].rsplit("-", 1)[1]) >= 10]
    assert s["eval_prompts_truncated"] == len(long_eval) > 0  # evaluation keeps them, cut to the budget
    assert all(len(r["prompt_ids"]) == 70 for r in long_eval)


def test_an_unreadable_cache_entry_is_a_clear_error(sni_fixture, tmp_path):
    build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=tmp_path)
    for entry in entries(tmp_path):
        (tmp_path / "sni" / entry / "state.json").write_text("{broken")
    with pytest.raises(ModeError, match="unreadable tokenised-data cache entry .*delete the folder"):
        build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=tmp_path)


def test_a_part_with_no_instances_is_an_empty_table_not_an_error(sni_fixture, tmp_path):
    from test_tasksets import add_task

    add_task(sni_fixture, "task503_single", Instances=[{"id": "only", "input": "x", "output": ["y"]}])
    cfg = data_cfg(sni_fixture, tasks=["task503_single"], task_list_file=None)
    for _ in range(2):  # built, then loaded from the cache
        data = build_data(cfg, EVAL, byte_tokenizer(), cache_dir=tmp_path)
        assert len(data.train) == 1 and len(data.eval) == 0 and data.eval.column("id") == []


def test_a_change_to_the_encoding_code_changes_the_key_without_any_version_bump(sni_fixture, tmp_path, monkeypatch):
    """A stale cache cannot be read: the key follows the source of the modules that produce the tokens.
    (Planted: a copy of encoding.py with one changed line stands in for an edit nobody versioned.)"""
    import shutil

    import mode.data.cache as cache_module

    cache = tmp_path / "cache"
    build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=cache)
    before = set(entries(cache))
    edited = tmp_path / "src"
    shutil.copytree(cache_module.Path(cache_module.__file__).parent, edited)
    source = edited / "encoding.py"
    source.write_text(source.read_text() + "\n# an edit that may change tokens\n")
    monkeypatch.setattr(cache_module, "__file__", str(edited / "cache.py"))
    cache_module.code_digest.cache_clear()
    try:
        build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=cache)
    finally:
        cache_module.code_digest.cache_clear()
    assert len(set(entries(cache)) - before) == 2  # both parts encoded again, under new keys
    assert set(cache_module.TOKEN_SOURCES) <= {p.name for p in edited.iterdir()}


def test_equal_cache_keys_always_mean_equal_rows(sni_fixture):
    """The key is computed from the selection values and the task files, not from the records: across
    configurations that change the records of one part or the other, two equal keys must never hold
    different records, and different records must never share a key (planted: a key without the split
    seed, or without the evaluation cap, fails here)."""
    from test_tasksets import add_task

    from mode.data.encoding import EncodingConfig, PromptEncoder
    from mode.data.tasksets import resolve_task_sets

    add_task(sni_fixture, "task504_more", Instances=[{"id": f"m{i}", "input": f"x {i}", "output": [f"y {i}", f"z {i}"]}
                                                      for i in range(40)])
    variants = [{}, {"split_seed": 1}, {"eval_fraction": 0.2}, {"max_instances_per_task": 5},
                {"max_instances_per_task": 5, "split_seed": 1}, {"tasks": ["task504_more", "task001_add_numbers"],
                                                                  "task_list_file": None},
                {"tasks": ["task001_add_numbers", "task504_more"], "task_list_file": None},
                {"protocol": "held_out", "tasks": ["task001_add_numbers"], "task_list_file": None,
                 "eval_tasks": ["task504_more"]},
                {"protocol": "held_out", "tasks": ["task001_add_numbers"], "task_list_file": None,
                 "eval_tasks": ["task504_more"], "held_out_eval_instances": 10},
                {"protocol": "held_out", "tasks": ["task001_add_numbers", "task002_echo_word"], "task_list_file": None,
                 "eval_tasks": ["task504_more"]}]
    evals = [EVAL, OmegaConf.create({"max_instances_per_task": 2})]
    encoder = PromptEncoder(byte_tokenizer(), EncodingConfig.from_mapping(data_cfg(sni_fixture).encoding))
    seen: dict[str, str] = {}
    for variant in variants:
        cfg = data_cfg(sni_fixture, **variant)
        sets = resolve_task_sets(cfg)
        for eval_cfg in evals:
            chosen = dataset_module.selection(sets, cfg, eval_cfg)
            for part in ("train", "eval"):
                records = json.dumps(list(dataset_module.iter_records(sets, chosen, part)), sort_keys=True)
                key = dataset_module._cache_name(part, sets, chosen, encoder)
                assert seen.setdefault(key, records) == records, (part, variant, eval_cfg)
    by_records: dict[str, set] = {}
    for key, records in seen.items():
        by_records.setdefault(records, set()).add(key)
    assert len(seen) >= 16 and all(len(keys) == 1 for keys in by_records.values()), "a needless key change"


def test_building_reads_one_task_at_a_time_and_a_changed_file_is_an_error(sni_fixture, tmp_path, monkeypatch):
    """Bounded memory at full SNI size: task sets hold headers only, and records are streamed task by task
    (at most one task with instances alive while the part is written; planted: building every record
    list up front keeps them all)."""
    import gc
    import weakref

    from mode.data.tasksets import TaskSets, resolve_task_sets

    assert all(not t.instances for t in resolve_task_sets(data_cfg(sni_fixture)).tasks.values())
    alive: list[weakref.ref] = []
    peak = [0]
    load = TaskSets.load

    def tracked(self, name):
        gc.collect()
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        task = load(self, name)
        alive.append(weakref.ref(task))
        return task

    monkeypatch.setattr(TaskSets, "load", tracked)
    data = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer(), cache_dir=tmp_path / "cache")
    assert len(data.train) > 0 and len(alive) >= 2 * len(data.tasks) and peak[0] <= 1

    path = sni_fixture / "tasks" / "task002_echo_word.json"
    sets = resolve_task_sets(data_cfg(sni_fixture))
    path.write_text(path.read_text().replace("Repeat the word.", "Repeat the word twice."))
    with pytest.raises(ModeError, match=r"task002_echo_word.json: changed while the data were being read"):
        sets.load("task002_echo_word")
