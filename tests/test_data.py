"""SNI reading, splits, Tk-Instruct encoding and truncation, on a fixture and on the real files."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_SNI, needs_shared_sni
from omegaconf import OmegaConf

from mode.data.collate import IGNORE_INDEX, collate_prompts, collate_train
from mode.data.dataset import build_data
from mode.data.encoding import EncodingConfig, PromptEncoder, build_source
from mode.data.sni import load_task, read_task_list, select_tasks
from mode.data.splits import held_in_split
from mode.errors import ModeError
from mode.models import byte_tokenizer


def data_cfg(sni_dir, **kw):
    enc = {"add_task_name": False, "add_definition": True, "num_pos_examples": 2, "num_neg_examples": 0,
           "add_explanation": False, "chat_template": False, "max_source_length": 400, "max_target_length": 16}
    enc.update(kw.pop("encoding", {}))
    base = {"sni_dir": str(sni_dir), "tasks": None, "task_list_file": "splits/default/train_tasks.txt",
            "allow_missing_tasks": True, "protocol": "held_in", "eval_fraction": 0.1, "split_seed": 0,
            "max_instances_per_task": None, "sampling": "proportional", "encoding": enc}
    return OmegaConf.create({**base, **kw})


EVAL = OmegaConf.create({"max_instances_per_task": None})


def test_reads_the_fixture_task(sni_fixture):
    task = load_task(sni_fixture, "task002_echo_word")
    assert task.definition == "Repeat the word." and task.categories == ["Text Matching"]
    assert len(task.instances) == 25 and task.instances[3]["output"] == ["word 3", "Word 3!"]
    assert read_task_list(sni_fixture / "splits/default/train_tasks.txt")[-1] == "task004_absent"


def test_absent_tasks_error_lists_all_of_them(sni_fixture):
    with pytest.raises(ModeError, match="1 task.*task004_absent"):
        select_tasks(sni_fixture, ["task001_add_numbers", "task004_absent"], allow_missing=False)
    present, absent = select_tasks(sni_fixture, ["task001_add_numbers", "task004_absent"], allow_missing=True)
    assert present == ["task001_add_numbers"] and absent == ["task004_absent"]


def test_a_name_no_split_file_knows_is_always_an_error(sni_fixture):
    with pytest.raises(ModeError, match="not SNI tasks.*task001_add_numbrs"):
        select_tasks(sni_fixture, ["task001_add_numbrs"], allow_missing=True)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"Definition": ["x"]}), "missing key 'Instances'"),
    (json.dumps({"Definition": ["x"], "Instances": [{"id": "a", "input": "q"}]}), "instance a lacks 'input' or 'output'"),
    (json.dumps({"Definition": ["x"], "Instances": [{"id": "a", "input": "q", "output": []}]}), "instance a has no output"),
])
def test_malformed_task_files_name_file_and_problem(sni_fixture, content, match):
    (sni_fixture / "tasks" / "task001_add_numbers.json").write_text(content)
    with pytest.raises(ModeError, match=f"task001_add_numbers.json: .*{match}"):
        load_task(sni_fixture, "task001_add_numbers")


def test_held_in_split_is_disjoint_deterministic_and_90_10(sni_fixture):
    task = load_task(sni_fixture, "task001_add_numbers")
    train, evaluation = held_in_split(task, 0.1, seed=0)
    assert len(evaluation) == 4 and len(train) == 36
    assert not {i["id"] for i in train} & {i["id"] for i in evaluation}
    again = held_in_split(load_task(sni_fixture, "task001_add_numbers"), 0.1, seed=0)
    assert [i["id"] for i in again[1]] == [i["id"] for i in evaluation]
    assert [i["id"] for i in held_in_split(task, 0.1, seed=1)[1]] != [i["id"] for i in evaluation]


def test_source_matches_the_tk_instruct_template_character_for_character(sni_fixture):
    task = load_task(sni_fixture, "task001_add_numbers")
    cfg = EncodingConfig(num_pos_examples=2, num_neg_examples=1, add_explanation=True, add_task_name=True)
    head, query = build_source(task, " question number 1? ", cfg, count_tokens=len)
    assert head == (
        "task001_add_numbers. "
        "Definition: Add the two numbers.\n\n"
        " Positive Example 1 -\nInput: 2 + 2.\n Output: 4.\n Explanation: Two plus two is four.\n\n"
        " Positive Example 2 -\nInput: 3 + 4.\n Output: 7.\n Explanation: Sum.\n\n"
        " Negative Example 1 -\nInput: 1 + 1.\n Output: 3.\n Explanation: Wrong sum.\n\n"
    )
    assert query == "Now complete the following example -\nInput: question number 1?\nOutput: "


def test_examples_are_added_only_while_they_fit(sni_fixture):
    task = load_task(sni_fixture, "task001_add_numbers")
    query_len = len("Now complete the following example -\nInput: q.\nOutput: ")
    definition_len = len("Definition: Add the two numbers.\n\n")
    one_example = len(" Positive Example 1 -\nInput: 2 + 2.\n Output: 4.\n\n")
    cfg = EncodingConfig(num_pos_examples=2, max_source_length=definition_len + one_example + query_len)
    head, _ = build_source(task, "q", cfg, count_tokens=len)
    assert "Positive Example 1" in head and "Positive Example 2" not in head


@needs_shared_sni
def test_real_task_source_is_the_template():
    task = load_task(SHARED_SNI, "task114_is_the_given_word_longest")
    inst = task.instances[0]
    head, query = build_source(task, inst["input"], EncodingConfig(num_pos_examples=2, max_source_length=10**6), len)
    expected = "Definition: " + task.definition.strip()
    expected += "" if expected[-1] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" else "."
    expected += "\n\n"
    for i, ex in enumerate(task.positive_examples[:2], 1):
        inp = f"Input: {ex['input'].strip()}"
        out = f" Output: {ex['output'].strip()}"
        expected += f" Positive Example {i} -\n" + inp + ("" if inp[-1] in ".?!'\")" else ".") + "\n"
        expected += out + ("" if out[-1] in ".?!'\")" else ".") + "\n\n"
    assert head == expected
    assert query.startswith("Now complete the following example -\nInput: ") and query.endswith("\nOutput: ")


def test_truncation_cuts_the_definition_never_the_query_or_answer(sni_fixture):
    tok = byte_tokenizer()
    task = load_task(sni_fixture, "task001_add_numbers")
    task.definition = "Add the two numbers " * 40
    enc = PromptEncoder(tok, EncodingConfig(num_pos_examples=2, max_source_length=120, max_target_length=16))
    ids, overflow = enc.prompt_ids(task, "question number 7?")
    text = tok.decode(ids)
    assert not overflow and len(ids) == 120
    assert text.endswith("Now complete the following example -\nInput: question number 7?\nOutput:")
    assert text.startswith("Definition: Add the two")
    answer, cut = enc.answer_ids("answer 7")
    assert tok.decode(answer) == " answer 7</s>" and not cut


def test_a_query_longer_than_the_budget_is_flagged(sni_fixture):
    enc = PromptEncoder(byte_tokenizer(), EncodingConfig(max_source_length=30))
    ids, overflow = enc.prompt_ids(load_task(sni_fixture, "task001_add_numbers"), "a very long input " * 5)
    assert overflow and len(ids) == 30


def test_build_data_records_tasks_and_masks_only_answers(sni_fixture):
    data = build_data(data_cfg(sni_fixture, max_instances_per_task=10), EVAL, byte_tokenizer())
    assert data.tasks == ["task001_add_numbers", "task002_echo_word", "task003_yes_no"]
    assert data.absent_tasks == ["task004_absent"]
    assert data.stats["task001_add_numbers"]["train"] == 10 and data.stats["task001_add_numbers"]["eval"] == 4
    assert data.stats["task003_yes_no"]["eval"] == 1
    batch = collate_train(data.train[:3], pad_id=0)
    for row, ex in enumerate(data.train[:3]):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == ex["input_ids"][ex["prompt_length"]:]
        assert kept[-1] == byte_tokenizer().eos_token_id
    prompts = collate_prompts([e["prompt_ids"] for e in data.eval[:3]], pad_id=0)
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left padding


def test_capping_training_never_changes_the_evaluation_instances(sni_fixture):
    full = build_data(data_cfg(sni_fixture), EVAL, byte_tokenizer())
    capped = build_data(data_cfg(sni_fixture, max_instances_per_task=3), EVAL, byte_tokenizer())
    assert [e["id"] for e in full.eval] == [e["id"] for e in capped.eval]
    assert not {e["id"] for e in full.train} & {e["id"] for e in full.eval}


@needs_shared_sni
@pytest.mark.bundled_sni
def test_reads_every_bundled_case_study_task_and_reports_absent_ones():
    from mode.run.config import compose

    cfg = compose("train", [f"data.sni_dir={SHARED_SNI}"])
    present, absent = select_tasks(SHARED_SNI, list(cfg.data.tasks), allow_missing=True)
    assert len(present) + len(absent) == 15
    absent_listed = set(read_task_list(SHARED_SNI / "absent_tasks.txt"))
    assert set(absent) <= absent_listed
    for name in present:
        assert load_task(SHARED_SNI, name).instances
