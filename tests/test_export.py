"""Adapters that leave the framework, and models that come in: PEFT / merged / Hub exports (mode-export),
mode-eval on a base model and on a PEFT LoRA folder, mode's own format under its own file name, and the
transformers.Trainer example.

Most tests build a finished-run folder directly (config.yaml + adapter/ with random, non-zero adapter
tensors + metrics.json), so every term of every delta matters and no training is needed; the reproduction
test trains a real tiny run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, needs_stories
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from mode.adapters import (
    adapter_context,
    adapter_layers,
    adapter_state_dict,
    apply_adapters,
    load_adapters,
    merge_adapters,
    read_adapter_config,
    save_adapters,
)
from mode.adapters.config import AdapterConfig
from mode.adapters.io import CONFIG_FILE, load_peft_lora, save_peft_lora
from mode.errors import ModeError
from mode.export import export_run, load_run_model, read_run
from mode.export.cli import run as export_cli
from mode.models import load_model_and_tokenizer
from mode.run.config import compose

TASKS = ["task001_add_numbers", "task002_echo_word", "task003_yes_no"]
MODELS = ["tiny_random", pytest.param("stories260k", marks=needs_stories)]
def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the logits' scale: float32 rounding (another summation order, a merged weight rounded
    once) grows with the logits, |logit| < 1.2 on tiny_random but ~18 on stories260K."""
    worst = (actual - expected).abs().max().item()
    assert worst <= 1e-5 * max(1.0, expected.abs().max().item()), f"logits differ by {worst:.3g}"


# -- helpers ------------------------------------------------------------------------------------------------
def make_run(path: Path, method="lora", model="tiny_random", *extra, seed=0) -> Path:
    """A finished-run folder: config.yaml, adapter/ (random non-zero tensors), metrics.json."""
    overrides = [f"model={model}", f"adapter={method}", "adapter.rank=4", "adapter.alpha=8",
                 "adapter.target_modules=[q_proj,v_proj,o_proj]", *extra]
    if method in ("molora", "molora_sd", "mode"):
        overrides.append("adapter.experts=2")
    cfg = compose("train", overrides)
    model_, _ = load_model_and_tokenizer(cfg.model)
    apply_adapters(model_, cfg.adapter, num_tasks=len(TASKS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model_).items():
            std = 1.0 if ".selector." in name else 0.03  # MoRE: spread each task's k over 1..R
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    save_adapters(model_, path / "adapter", extra={"base_model": cfg.model.name_or_path, "model_id": cfg.model.id,
                                                   "tasks": TASKS})
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    per_task = {t: {"rougeL": 10.0 * (i + 1), "exact_match": 5.0 * i, "num_instances": 3, "category": "qa"}
                for i, t in enumerate(TASKS)}
    metrics = {"rougeL": 20.0, "exact_match": 5.0, "num_instances": 9, "trainable_parameters": 1234,
               "base_parameters": 99999, "train_loss": 1.5, "per_task": per_task,
               **{f"rougeL_for_{t}": r["rougeL"] for t, r in per_task.items()}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def ids_for(model_name: str) -> torch.Tensor:
    vocab = 259 if model_name == "tiny_random" else 512
    return torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids, task=None) -> torch.Tensor:
    model.eval()
    task_ids = None if task is None else torch.full((ids.shape[0],), task)
    with adapter_context(model, task_ids=task_ids):
        return model(input_ids=ids).logits


def peft_model(run_cfg, folder):
    from peft import PeftModel

    base, _ = load_model_and_tokenizer(run_cfg.model)
    return PeftModel.from_pretrained(base, str(folder)).eval()


def fails(argv, capsys) -> str:
    """mode-export in-process: it must exit 2 with one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        export_cli(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def cli(module, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# -- PEFT format ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", MODELS)
def test_lora_export_loads_in_peft_with_the_same_logits(tmp_path, model_name):
    run = make_run(tmp_path / "run", "lora", model_name)
    out = export_run(run, "peft", tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["rank_pattern"]) == ("LORA", 4, 8, {})
    assert config["target_modules"] == ["q_proj", "v_proj", "o_proj"] and config["task_type"] == "CAUSAL_LM"
    tensors = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    info = read_run(run)
    ours, _ = load_run_model(info)
    ids = ids_for(model_name)
    expected = logits(ours, ids)
    assert_same_logits(logits(peft_model(info.cfg, out), ids), expected)
    base, _ = load_model_and_tokenizer(info.cfg.model)  # the adapter matters: not the base's logits
    assert (logits(base, ids) - expected).abs().max() > 1e-3
    # and back into our own layers (mode-eval adapter_path=...): the same function
    fresh, _ = load_model_and_tokenizer(info.cfg.model)
    loaded = load_peft_lora(fresh, out, info.cfg.model.name_or_path)
    assert loaded["modules"] == 3 * (2 if model_name == "tiny_random" else 5)
    assert_same_logits(logits(fresh, ids), expected)


@pytest.mark.parametrize("model_name", MODELS)
def test_more_task_export_is_the_exact_lora_of_that_task(tmp_path, model_name):
    run = make_run(tmp_path / "run", "more", model_name)
    info = read_run(run)
    ours, _ = load_run_model(info)
    ids = ids_for(model_name)
    patterns = 0
    for task in range(len(TASKS)):
        out = export_run(run, "peft", tmp_path / f"peft{task}", task=task if task else TASKS[0])  # index or name
        config = json.loads((out / "adapter_config.json").read_text())
        ranks = {path: int(layer.selector.ranks()[task]) for path, layer in adapter_layers(ours)}
        assert (config["r"], config["lora_alpha"]) == (4, 8)  # vLLM reads these: scale alpha / R
        assert config["rank_pattern"] == {p: k for p, k in ranks.items() if k != 4}
        for path, k in config["rank_pattern"].items():
            assert config["alpha_pattern"][path] / k == pytest.approx(8 / 4)  # PEFT: alpha / r per module = alpha/R
        patterns += len(config["rank_pattern"])
        routed = logits(ours, ids, task)
        merge_adapters(ours, task=task)
        merged = logits(ours, ids, task)
        from mode.adapters import unmerge_adapters

        unmerge_adapters(ours)
        assert_same_logits(merged, routed)
        assert_same_logits(logits(peft_model(info.cfg, out), ids), routed)
        assert_same_logits(logits(peft_model(info.cfg, out), ids), merged)
    assert patterns > 0  # the selectors chose different ranks, so rank_pattern was exercised


def test_a_foreign_peft_lora_with_rank_alpha_patterns_and_rslora_loads_into_our_layers(tmp_path):
    """A folder PEFT itself wrote (not ours): per-module r and alpha, rsLoRA's alpha / sqrt(r)."""
    from peft import LoraConfig, get_peft_model

    cfg = compose("train", ["model=tiny_random"])
    base, _ = load_model_and_tokenizer(cfg.model)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True,
                          rank_pattern={"model.layers.0.self_attn.q_proj": 2},
                          alpha_pattern={"model.layers.1.mlp.down_proj": 3}, task_type="CAUSAL_LM")
    pm = get_peft_model(base, peft_cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path / "foreign")
    ids = ids_for("tiny_random")
    expected = logits(pm, ids)
    fresh, _ = load_model_and_tokenizer(cfg.model)
    loaded = load_peft_lora(fresh, tmp_path / "foreign")
    assert loaded["ranks"] == [2, 4] and loaded["use_rslora"]
    assert_same_logits(logits(fresh, ids), expected)


def test_any_layer_with_a_per_task_delta_weight_exports_through_its_svd(tmp_path):
    """The hook for adapters the exporter has no exact factors for: delta_weight(task), factored by SVD."""
    from mode.adapters.more import MoRELinear

    class TaskDelta(MoRELinear):  # another class: not LoRA / MoRE to the exporter, only delta_weight(task)
        pass

    run = make_run(tmp_path / "run", "more")
    info = read_run(run)
    ours, _ = load_run_model(info)
    exact = save_peft_lora(ours, tmp_path / "exact", task=1)
    for _, layer in adapter_layers(ours):
        layer.__class__ = TaskDelta
    generic = save_peft_lora(ours, tmp_path / "svd", task=1)
    assert generic["rank_pattern"] == exact["rank_pattern"]  # the SVD finds each module's rank k_t
    ids = ids_for("tiny_random")
    assert_same_logits(logits(peft_model(info.cfg, tmp_path / "svd"), ids),
                       logits(peft_model(info.cfg, tmp_path / "exact"), ids))


@pytest.mark.skipif("router_input" not in AdapterConfig.__dataclass_fields__,
                    reason="task-routed mixtures (adapter.router_input=task) are not in this tree yet")
def test_a_task_routed_mixture_exports_one_lora_per_task(tmp_path):
    run = make_run(tmp_path / "run", "molora", "tiny_random", "++adapter.router_input=task")
    info = read_run(run)
    ours, _ = load_run_model(info)
    out = export_run(run, "peft", tmp_path / "peft", task=2)
    ids = ids_for("tiny_random")
    assert_same_logits(logits(peft_model(info.cfg, out), ids), logits(ours, ids, 2))


# -- merged models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method,task", [("lora", None), ("more", 1)])
def test_merged_export_reloads_with_automodel_and_matches(tmp_path, model_name, method, task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(tmp_path / "run", method, model_name)
    out = export_run(run, "merged", tmp_path / "merged", task=task)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    ours, tokenizer = load_run_model(read_run(run))
    ids = ids_for(model_name)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_logits(logits(reloaded, ids), logits(ours, ids, task))
    text = "Is 7 larger than 3?"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tokenizer(text).input_ids


# -- the Hub folder -----------------------------------------------------------------------------------------
def card_header(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_hub_folder_has_the_adapter_and_a_model_card_and_push_uploads_it(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "more")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return "https://huggingface.co/me/x/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = export_run(run, "hub", tmp_path / "hub", task=1, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                     push=True, repo_id="me/more-task1")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    readme = (out / "README.md").read_text()
    header = card_header(readme)
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and header["library_name"] == "peft"
    assert {"mode", "more", "peft", "lora"} <= set(header["tags"]) and header["datasets"]
    assert "| task002_echo_word (this folder) | 20.00 | 5.00 | 3 |" in readme
    assert "1,234 adapter parameters" in readme and "| train.max_steps |" in readme and "maximum rank R = 4" in readme
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == header["base_model"]
    assert calls[1] == ("create_repo", {"repo_id": "me/more-task1", "repo_type": "model", "private": True,
                                        "exist_ok": True})
    assert calls[2][0] == "upload_folder" and calls[2][1]["folder_path"] == str(out)
    assert calls[2][1]["repo_id"] == "me/more-task1"


def test_hub_folder_of_a_mixture_in_our_own_format_and_of_a_merged_model(tmp_path):
    run = make_run(tmp_path / "run", "molora")
    out = export_run(run, "hub", tmp_path / "hub", weights="mode")
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "adapter_model.safetensors", CONFIG_FILE])
    assert "library_name" not in card_header((out / "README.md").read_text())  # tiny_random: no Hub base either
    model, _ = load_model_and_tokenizer(read_run(run).cfg.model)
    apply_adapters(model, read_adapter_config(out))
    load_adapters(model, out)
    merged = export_run(make_run(tmp_path / "lora", "lora"), "hub", tmp_path / "hub2", weights="merged")
    assert card_header((merged / "README.md").read_text())["library_name"] == "transformers"
    assert (merged / "model.safetensors").is_file()


# -- mode's own format ----------------------------------------------------------------------------------------
def test_our_folder_is_marked_so_no_tool_mistakes_it_for_peft_and_old_folders_still_load(tmp_path):
    """SPEC fixes the name adapter/adapter_config.json, which is also PEFT's: our config carries a format
    marker and no peft_type, so PEFT refuses it with an error instead of misreading it."""
    peft_lib = pytest.importorskip("peft")
    run = make_run(tmp_path / "run", "lora")
    adapter = run / "adapter"
    meta = json.loads((adapter / CONFIG_FILE).read_text())
    assert meta["format"] == "mode-adapter" and "peft_type" not in meta
    with pytest.raises(Exception):  # noqa: B017 - whichever error PEFT raises, it does not load it
        peft_lib.PeftConfig.from_pretrained(str(adapter))
    ours, _ = load_run_model(read_run(run))
    (adapter / CONFIG_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k not in ("format", "library_name")}))
    old, _ = load_run_model(read_run(run))  # a run of an earlier version: no marker
    ids = ids_for("tiny_random")
    assert torch.equal(logits(old, ids), logits(ours, ids))
    peft = export_run(run, "peft", tmp_path / "peft")
    with pytest.raises(ModeError, match="a PEFT adapter folder, not mode's own format"):
        read_adapter_config(peft)


# -- refusals: one line, nothing written ----------------------------------------------------------------------
@pytest.mark.parametrize("method,args,message", [
    ("molora", ["format=peft"], "adapter.method='molora' routes every token to its own mixture of experts, so it is not one LoRA"),
    ("mode", ["format=merged"], "share it in mode's own format"),
    ("more", ["format=peft", "task=3"], "task=3 is out of range: the adapter knows 3 tasks (0..2"),
    ("more", ["format=peft", "task=task999_nope"], "task='task999_nope' is not a training task of this run"),
    ("more", ["format=peft"], "holds one adapter per task: pick one with task=<index 0..2 or name>"),
    ("lora", ["format=peft", "task=1"], "has one adapter for every task; drop task="),
    ("lora", ["format=gguf"], "format='gguf' is not one of ['peft', 'merged', 'hub']"),
    ("lora", ["format=hub", "push=true"], "push=true needs repo_id="),
    ("lora", ["format=peft", "taks=1"], "taks is not a mode-export key (did you mean task?)"),
])
def test_bad_exports_are_one_line_and_write_nothing(tmp_path, capsys, method, args, message):
    run = make_run(tmp_path / "run", method)
    out = tmp_path / "out"
    err = fails([f"run_dir={run}", f"out={out}", *args], capsys)
    assert message in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_existing_out_folder_is_refused_unless_force_and_then_replaced_whole(tmp_path, capsys):
    run = make_run(tmp_path / "run", "lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "out=" in fails([f"run_dir={run}", "format=peft", f"out={out}"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert "holds the run itself" in fails([f"run_dir={run}", "format=peft", f"out={tmp_path}", "force=true"], capsys)
    export_cli([f"run_dir={run}", "format=peft", f"out={out}", "force=true"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_no_half_written_folder(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mode.export.formats.save_peft_lora", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, "peft", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and leftovers(tmp_path) == []


def test_a_peft_folder_of_another_base_or_other_target_modules_is_refused(tmp_path):
    run = make_run(tmp_path / "run", "lora")
    out = export_run(run, "peft", tmp_path / "peft")
    other = compose("train", ["model=tiny_random", "model.random_init.seed=1"])  # same shapes, other weights
    model, _ = load_model_and_tokenizer(other.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModeError, match="trained on another base model"):
        load_peft_lora(model, out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    assert not any("lora" in n for n, _ in model.named_modules())
    # target_modules that name modules without tensors, or tensors of modules the base does not have
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj", "o_proj",
                                                                                      "k_proj"]}))
    base, _ = load_model_and_tokenizer(compose("train", ["model=tiny_random"]).model)
    with pytest.raises(ModeError, match="names model.layers.0.self_attn.k_proj of this base model, but the folder"):
        load_peft_lora(base, out)
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(out / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, out / "adapter_model.safetensors")
    with pytest.raises(ModeError, match=r"targets model.layers.7.self_attn.\w+_proj, which this base model"):
        load_peft_lora(base, out)
    # a foreign folder (no weights digest) naming another base than the one evaluated
    save_file(tensors, out / "adapter_model.safetensors")  # without our metadata
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))
    with pytest.raises(ModeError, match="base_model_name_or_path='org/other-model', but the base model is"):
        load_peft_lora(base, out, "HuggingFaceTB/SmolLM2-135M")


# -- mode-eval: any model, any PEFT LoRA ----------------------------------------------------------------------
EVAL_DATA = ["data.tasks=[task001_add_numbers,task002_echo_word]", "eval.max_instances_per_task=3",
             "eval.max_new_tokens=4", "eval.batch_size=8"]
RESULT_KEYS = ("rougeL", "exact_match", "num_instances", "per_task", "per_category")


def test_mode_eval_on_a_base_model_alone_writes_the_usual_files(tmp_path, sni_fixture):
    out = tmp_path / "zero_shot"
    proc = cli("mode.eval", "model=tiny_random", f"data.sni_dir={sni_fixture}", *EVAL_DATA, f"out={out}")
    assert "base model alone" in proc.stdout
    for name in ("metrics.json", "predictions.jsonl", "config.yaml", "timings.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_instances"] == len(rows) > 0 and metrics["trainable_parameters"] == 0
    assert {"rougeL_for_task001_add_numbers", "rougeL_for_task002_echo_word"} <= set(metrics)
    assert yaml.safe_load((out / "config.yaml").read_text())["adapter"] is None
    again = cli("mode.eval", "model=tiny_random", f"data.sni_dir={sni_fixture}", *EVAL_DATA, f"out={out}", check=False)
    assert again.returncode == 2 and "force=true replaces them" in again.stderr and again.stderr.count("\n") == 1


def test_importing_an_exported_peft_lora_reproduces_the_runs_metrics_exactly(tmp_path, sni_fixture):
    from tiny_runs import TINY, tiny_cfg

    from mode.train import train

    run = tmp_path / "run"
    metrics = train(tiny_cfg(sni_fixture, "adapter.alpha=64"), str(run))  # a large scale: the adapter matters
    export_run(run, "peft", tmp_path / "peft")
    data = [o for o in TINY if o.startswith(("model=", "data.", "eval."))]
    out = tmp_path / "imported"
    proc = cli("mode.eval", f"data.sni_dir={sni_fixture}", *data, f"adapter_path={tmp_path / 'peft'}", f"out={out}")
    assert "base + peft adapter" in proc.stdout
    imported = json.loads((out / "metrics.json").read_text())
    assert {k: imported[k] for k in RESULT_KEYS} == {k: metrics[k] for k in RESULT_KEYS}
    assert imported["trainable_parameters"] == metrics["trainable_parameters"]
    assert yaml.safe_load((out / "config.yaml").read_text())["adapter"]["source"] == "peft"
    base = tmp_path / "base"
    cli("mode.eval", f"data.sni_dir={sni_fixture}", *data, f"out={base}")
    def predictions(folder):
        return [json.loads(line)["prediction"] for line in (folder / "predictions.jsonl").read_text().splitlines()]

    assert predictions(out) == predictions(run) != predictions(base)  # the adapter, not the base, reproduces it
    compared = cli("mode.report.compare", str(run), str(out), "--json", "--bootstrap", "100")
    pair = json.loads(compared.stdout)["pairs"][0]
    assert (pair["tasks"], pair["ties"]) == (2, 2), pair  # every task scores the same: the same model


def test_mode_eval_refuses_a_mismatched_peft_folder_in_one_line_and_leaves_no_folder(tmp_path, sni_fixture):
    run = make_run(tmp_path / "run", "lora")
    export_run(run, "peft", tmp_path / "peft")
    out = tmp_path / "out"
    proc = cli("mode.eval", "model=tiny_random", "model.random_init.seed=1", f"data.sni_dir={sni_fixture}",
               *EVAL_DATA, f"adapter_path={tmp_path / 'peft'}", f"out={out}", check=False)
    assert proc.returncode == 2 and "trained on another base model" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and not out.exists()
    proc = cli("mode.eval", "model=tiny_random", f"adapter_path={tmp_path / 'peft'}", "adapter.rank=2",
               f"out={out}", check=False)
    assert proc.returncode == 2 and "adapter.rank means nothing here" in proc.stderr and not out.exists()


# -- the transformers.Trainer example -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "more"])
def test_the_hf_trainer_example_trains_a_mode_adapter(tmp_path, method):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import hf_trainer
    finally:
        sys.path.remove(str(REPO / "examples"))
    result = hf_trainer.main(["--method", method, "--steps", "8", "--out", str(tmp_path / "out")])
    assert result["losses"][-1] < result["losses"][0], result["losses"]
    assert (tmp_path / "out" / "adapter" / CONFIG_FILE).is_file()
    if method == "more":
        assert result["aux"].get("contrastive")  # task ids reached the adapter through the batch
    else:
        assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()

