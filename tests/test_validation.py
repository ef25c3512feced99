"""Bad configs and bad data: one line naming the key, file or value at fault, and nothing written.

The command-line side (exit status 2, `error: ...`, no traceback) is covered in test_train_eval.py;
these run `train()` in-process to check the message and that the run directory stays empty.
"""

from __future__ import annotations

import json

import pytest
from tiny_runs import tiny_cfg

from mode.errors import ModeError
from mode.run.resume import check_resumable
from mode.train import train
from mode.training.checks import validate_config


def written(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []


@pytest.mark.parametrize("override,message", [
    ("adapter.method=nope", "adapter.method='nope' is not one of"),
    ("adapter.rank=6 adapter.block_rank=4", "adapter.block_rank=4 must divide adapter.rank=6"),
    ("adapter.rank=0", "adapter.rank=0 must be an integer >= 1"),
    ("adapter.experts=0", "adapter.experts=0 must be an integer >= 1"),
    ("data.tasks=[]", r"data.tasks=\[\] is empty"),
    ("train.save_every=-1", "train.save_every=-1 must be an integer >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be an integer >= 1"),
    ("train.lr=0", "train.lr=0 must be a positive number"),
    ("train.max_steps=1.5", "train.max_steps=1.5 must be an integer"),
    ("data.max_instances_per_task=0", "data.max_instances_per_task=0 must be an integer >= 1 or null"),
    ("resume=yes", "resume='yes' must be true or false"),
])
def test_cheap_config_checks(sni_fixture, override, message):
    with pytest.raises(ModeError, match=message) as err:
        validate_config(tiny_cfg(sni_fixture, *override.split()))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("data.sni_dir=/no/such/sni", "data.sni_dir='/no/such/sni': no such folder"),
    ("adapter.target_modules=[q_proj,nope]", r"adapter.target_modules entries \['nope'\] match no nn.Linear"),
    ("model=stories260k model.name_or_path=/no/such/model", "model.name_or_path='/no/such/model'"),
    ("data.tasks=[task001_add_numbers,task0x_typo]", "task0x_typo"),
    ("train.optimizer=sgd", "train.optimizer='sgd'"),
])
def test_config_errors_found_while_loading_write_nothing(sni_fixture, tmp_path, override, message):
    run = tmp_path / "run"
    with pytest.raises(ModeError, match=message) as err:
        train(tiny_cfg(sni_fixture, *override.split()), str(run))
    assert "\n" not in str(err.value)
    assert written(run) == []


def edit_task(sni_dir, name: str, edit) -> None:
    path = sni_dir / "tasks" / f"{name}.json"
    task = json.loads(path.read_text())
    edit(task)
    path.write_text(json.dumps(task, ensure_ascii=False))


def test_malformed_json_names_the_file(sni_fixture, tmp_path):
    (sni_fixture / "tasks" / "task002_echo_word.json").write_text('{"Definition": ["x"], "Instances": [')
    run = tmp_path / "run"
    with pytest.raises(ModeError, match=r"task002_echo_word.json: not valid JSON"):
        train(tiny_cfg(sni_fixture), str(run))
    assert written(run) == []


def test_instance_without_output_names_file_and_instance(sni_fixture, tmp_path):
    edit_task(sni_fixture, "task001_add_numbers", lambda t: t["Instances"][7].pop("output"))
    run = tmp_path / "run"
    with pytest.raises(ModeError, match=r"task001_add_numbers.json: instance task001_add_numbers-7 lacks 'input' or "
                                        r"'output'"):
        train(tiny_cfg(sni_fixture), str(run))
    assert written(run) == []


def test_empty_outputs_list_is_an_error(sni_fixture, tmp_path):
    edit_task(sni_fixture, "task001_add_numbers", lambda t: t["Instances"][3].update(output=[]))
    with pytest.raises(ModeError, match="instance task001_add_numbers-3 has no output strings"):
        train(tiny_cfg(sni_fixture), str(tmp_path / "run"))


def test_non_ascii_empty_and_overlong_inputs_are_handled_and_counted(sni_fixture, tmp_path):
    def edit(task):
        instances = task["Instances"]
        for inst in instances:
            inst["input"] = "Übersetze ins Japanische: Katze → ?"
            inst["output"] = ["猫 (ねこ)", ""]            # an empty reference string beside a real one
        instances[0]["input"] = ""                       # kept: the query is just "Input: ."
        instances[1]["input"] = "lorem ipsum " * 400     # longer than any prompt budget

    edit_task(sni_fixture, "task002_echo_word", edit)
    run = tmp_path / "run"
    train(tiny_cfg(sni_fixture, "data.max_instances_per_task=null", "eval.max_instances_per_task=null",
                   "data.encoding.max_source_length=256"), str(run))
    stats = json.loads((run / "data_stats.json").read_text())["per_task"]["task002_echo_word"]
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    echo = [r for r in rows if r["task"] == "task002_echo_word"]
    assert echo and all(r["references"] == ["猫 (ねこ)", ""] for r in echo)  # non-ASCII survives the round trip
    overlong_in_train = stats["train_dropped_overlong"] == 1
    overlong_in_eval = stats["eval_prompts_truncated"] == 1
    assert overlong_in_train != overlong_in_eval  # the instance is counted on whichever side it fell
    assert stats["train"] + stats["eval"] + stats["train_dropped_overlong"] == 25
    assert stats["train_empty_inputs"] + stats["eval_empty_inputs"] == 1  # the empty input is kept and counted
    assert stats["eval_empty_references"] == stats["eval"] == len(echo) > 0


def test_resume_check_names_the_first_differing_key(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 1\ntrain:\n  lr: 0.001\n  save_every: 5\nresume: false\n")
    check_resumable({"seed": 1, "train": {"lr": 0.001, "save_every": 7}, "resume": True}, tmp_path)
    with pytest.raises(ModeError, match=r"resume=true but seed=2 differs from the run's .*config.yaml \(1\)"):
        check_resumable({"seed": 2, "train": {"lr": 0.001, "save_every": 5}, "resume": True}, tmp_path)
    with pytest.raises(ModeError, match=r"train.warmup=3 differs .*\('<absent>'\)"):
        check_resumable({"seed": 1, "train": {"lr": 0.001, "warmup": 3}, "resume": True}, tmp_path)
    # a key added since the run started counts as its default there (train.compile: false)
    check_resumable({"seed": 1, "train": {"lr": 0.001, "save_every": 5, "compile": False}, "resume": True}, tmp_path)
    with pytest.raises(ModeError, match=r"train.compile=True differs .*\(False\)"):
        check_resumable({"seed": 1, "train": {"lr": 0.001, "save_every": 5, "compile": True}, "resume": True}, tmp_path)


def test_a_prompt_longer_than_the_models_context_is_refused_before_any_work():
    """stories260K has a 512-token context; the held-out protocol's prompts are up to 896 tokens."""
    from mode.run.config import compose
    from mode.training.checks import check_context

    cfg = compose("train", ["model=stories260k", "data=sni_held_out"])
    with pytest.raises(ModeError, match=r"max_source_length \+ data.encoding.max_target_length = 1024 tokens exceed "
                                        r"the model's context window \(model.max_length=512\)"):
        check_context(cfg, cfg.model.max_length)
    check_context(compose("train", ["model=stories260k"]), 512)  # the case study's 248 tokens fit
