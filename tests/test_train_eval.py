"""End to end: the real CLI trains and evaluates, mode-eval reproduces the metrics, losses go down."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_SNI, STORIES, needs_shared_sni, needs_stories

from mode.data.collate import collate_train
from mode.errors import ModeError
from mode.run.config import compose
from mode.train import train
from mode.training.losses import AnswerLoss

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


EVALUATION_KEYS = ("num_instances", "per_task", "per_category")


def evaluation_metrics(metrics: dict) -> dict:
    """The evaluation results of a run's metrics.json (what mode-eval writes again): overall, per-task and
    per-category ROUGE-L / exact match, the instance count and the two tables; training keys left out."""
    return {k: v for k, v in metrics.items() if k.startswith(("rougeL", "exact_match")) or k in EVALUATION_KEYS}


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
    # every evaluation key of the run, and nothing else: a key mode-eval drops (or adds) fails here
    assert again == evaluation_metrics(metrics)
    assert {"rougeL_for_task001_add_numbers", "per_task", "per_category"} <= set(again)
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
    case_study = compose("train", [f"data.sni_dir={SHARED_SNI}"]).data.tasks  # 11 of its 15 in the bundled copy
    present = [t for t in case_study if (SHARED_SNI / "tasks" / f"{t}.json").is_file()]
    metrics = check_run_dir(run, tasks_expected=len(present))
    cli("mode.eval", f"run_dir={run}", f"hydra.run.dir={tmp_path / 'eval'}")
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again == evaluation_metrics(metrics)


def SLOW(*case):  # noqa: N802 - reads as a marker in the table below
    """A case whose code path another default case already takes through the CLI: in the slow suite (CI)."""
    return pytest.param(*case, marks=pytest.mark.slow)


# One subprocess each (~5-10 s): the default suite keeps one case per kind of failure (override parse, unknown
# key, unknown group option, config check, data path, a refusal after tokenising, model path).
@pytest.mark.parametrize("override,message", [
    SLOW("adapter.rank=0", "adapter.rank=0"),
    # data.cache=false: tokenising runs first (target modules are checked when the adapters are applied); the
    # refusal is still the one error line, last, after the tokenising bars
    ("adapter.target_modules=[nope] data.cache=false", "adapter.target_modules"),
    ("data.sni_dir=/does/not/exist", "data.sni_dir='/does/not/exist'"),
    SLOW("train.batch_size=6 train.micro_batch_size=4", "train.batch_size=6 is not a multiple"),
    SLOW("+train.max_step=3", "train.max_step is not a config key (did you mean train.max_steps?)"),
    ("train.max_step=3", "train.max_step is not a config key (did you mean train.max_steps?)"),
    SLOW("+adapter.block_rnak=2", "adapter.block_rnak is not a config key (did you mean adapter.block_rank?)"),
    ("adapter=moe", "Could not find 'adapter/moe' (options: lora, mode, molora, molora_sd, more)"),
    ("train.lr=x=1", "cannot parse the override 'train.lr=x=1'"),
    ("train.optimizer=sgd", "train.optimizer='sgd' is not one of ['adamw', 'adafactor']"),
    SLOW("train.lr_scheduler=nope", "train.lr_scheduler='nope' is not one of ['linear'"),
    SLOW("data.sampling=nope", "data.sampling='nope' is not one of"),
    SLOW("data.protocol=nope", "data.protocol='nope' is not one of"),
    SLOW("adapter.rank=100000", "adapter.rank=100000 exceeds both dimensions of the adapted layer"),
    SLOW("model.max_length=64", "exceed the model's context window (model.max_length=64) in training"),
    ("model=stories260k model.name_or_path=/no/such/model", "model.name_or_path='/no/such/model'"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, sni_fixture, override, message):
    run = tmp_path / "run"
    proc = cli("mode.train", "model=tiny_random", f"data.sni_dir={sni_fixture}", "data.tasks=[task001_add_numbers]",
               *override.split(), f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr  # one line, last
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()


def test_train_batch_size_alone_works_and_checks_run_before_any_loading(sni_fixture, monkeypatch, tmp_path):
    """SPEC's train.batch_size alone is enough (micro-batch null = the whole batch of each process); a bad
    optimizer is refused before the model is loaded."""
    from mode.training.checks import validate_config
    from mode.training.distributed import accumulation_steps, micro_batch_size

    cfg = compose("train", ["model=tiny_random", f"data.sni_dir={sni_fixture}", "train.batch_size=4"])
    validate_config(cfg)
    assert micro_batch_size(cfg.train, 1) == 4 and accumulation_steps(cfg.train, 1) == 1
    assert micro_batch_size(cfg.train, 2) == 2 and accumulation_steps(cfg.train, 2) == 1
    monkeypatch.setattr("mode.training.session.load_model_and_tokenizer", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ModeError, match="train.optimizer='sgd'"):
        train(compose("train", ["model=tiny_random", f"data.sni_dir={sni_fixture}", "train.optimizer=sgd"]),
              str(tmp_path / "run"))


def test_help_lists_groups_options_and_main_keys():
    out = cli("mode.train", "--help").stdout
    assert "adapter    lora, mode, molora, molora_sd, more, paper/..." in out
    assert "experiment cpu/..." in out and "adapter.rank / .experts / .block_rank" in out and "train.precision" in out


@pytest.mark.parametrize("args,message", [
    ((), "mode-eval needs run_dir=<a run directory of mode-train>"),
    (("run_dir={missing}",), "has no config.yaml (is it a mode run directory?)"),
    (("run_dir={run}", "data.split_seed=1"), "data.split_seed cannot be overridden"),
    (("run_dir={run}", "adapter.alpha=2"), "adapter.alpha cannot be overridden"),
    (("run_dir={run}", "adapter=mode"), "adapter cannot be overridden"),
])
def test_mode_eval_refusals_are_one_line_and_leave_no_folder(tmp_path, args, message):
    run, missing = tmp_path / "run", tmp_path / "missing"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    proc = cli("mode.eval", *(a.format(run=run, missing=missing) for a in args), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (run / "evals").exists() and not missing.exists()


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

    monkeypatch.setattr("mode.training.session.make_logger", lambda *a, **k: Recorder())
    train(cfg, str(tmp_path / "run"))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
