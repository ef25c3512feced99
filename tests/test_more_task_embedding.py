"""MoRE's task embedding: `adapter.task_embedding=per_module` (a [T, P] table per projection, the released
code's choice and the default) against `shared` (one [T, E] table for the whole model, one nn.Parameter):
parameter counts against hand formulas, identity and training of the shared table, save/load (and older
files), per-task merging and export, and the per_module output against a reference computed before the
option existed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES, needs_stories
from helpers import answer_loss, stories_with
from safetensors.torch import load_file
from test_train_eval import cli
from torch import nn

from mode import adapters
from mode.adapters.config import AdapterConfig
from mode.adapters.io import CONFIG_FILE, lora_factors, peft_lora
from mode.errors import ModeError

P, Q, R, T = 12, 10, 4, 3


class Tiny(nn.Module):
    """q_proj 12 -> 10 and o_proj 10 -> 12: the shared table (width 12, q_proj's input) is narrower than
    neither, wider than o_proj's input, so a wrong width is caught."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(P, Q)
        self.o_proj = nn.Linear(Q, P, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def tiny(mode: str, seed: int = 0) -> nn.Module:
    """A Tiny MoRE model (the same base for every seed) with every adapter tensor random (non-zero B, drawn
    from `seed`), so each term of the delta matters."""
    torch.manual_seed(0)
    model = adapters.apply_adapters(Tiny(), {"method": "more", "rank": R, "alpha": 8, "num_tasks": T,
                                    "target_modules": ["q_proj", "o_proj"], "task_embedding": mode})
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in adapters.adapter_state_dict(model).values():
            tensor.normal_(std=0.5)
    return model


def run(model, x, ids):
    with adapters.adapter_context(model, task_ids=torch.tensor(ids)):
        return model(x)


# -- parameter counts -----------------------------------------------------------------------------------
def test_counts_equal_the_hand_formulas():
    # per_module, per layer: R(P+Q) + T*P + R*P + R;  q: 4*22 + 3*12 + 4*12 + 4 = 176, o: 4*22 + 3*10 + 4*10 + 4 = 162
    assert adapters.count_adapter_parameters(tiny("per_module")) == 176 + 162
    # shared: T*E once (E = 12, q_proj's input) + per layer R(P+Q) + R*E + R = 4*22 + 4*12 + 4 = 140, twice
    assert adapters.count_adapter_parameters(tiny("shared")) == 3 * 12 + 140 + 140


@pytest.mark.parametrize("mode,total,embeddings", [
    # Gemma 2B q,k,v,o, 18 layers, 756 tasks, R 8: q, o are 2048 -> 2048; k, v 2048 -> 256
    ("per_module", 18 * (8 * 12800 + 4 * (756 * 2048) + 4 * (8 * 2048 + 8)), 72 * 756 * 2048),
    ("shared", 756 * 2048 + 18 * (8 * 12800 + 4 * (8 * 2048 + 8)), 756 * 2048),
])
def test_gemma_2b_split_lora_selectors_task_embedding(mode, total, embeddings):
    from mode.report.params import format_table, parameter_table
    from mode.run.config import compose

    table = parameter_table(compose("train", ["model=gemma_2b", "adapter=paper/more_8", "adapter.num_tasks=756",
                                              f"adapter.task_embedding={mode}"]))
    split = {"lora": 18 * 8 * (4096 + 2304 + 2304 + 4096), "routing": 72 * (8 * 2048 + 8),
             "task_embedding": embeddings}
    assert table["split"] == split and table["trainable"] == total == sum(split.values())
    text = format_table(table)
    assert (f"split: LoRA part {split['lora']:,} + selectors {split['routing']:,} + task embeddings "
            f"{embeddings:,} (task_embedding={mode})") in text
    assert ("shared: selector.task_embedding [756, 2048]" in text) == (mode == "shared")
    # the table's rows add up to the total (the shared table is its own row, counted once)
    rows = sum(r["layers"] * r["per_layer"] for r in table["rows"])
    assert rows + (embeddings if mode == "shared" else 0) == total


# -- one tensor, trained ----------------------------------------------------------------------------------
def test_shared_is_one_parameter_held_by_every_layer():
    model = tiny("shared")
    tables = [layer.selector.task_embedding for _, layer in adapters.adapter_layers(model)]
    assert all(t is tables[0] for t in tables) and isinstance(tables[0], nn.Parameter)
    assert sum(p is tables[0] for p in model.parameters()) == 1  # an optimizer sees it once
    state = adapters.adapter_state_dict(model)
    assert [k for k in state if k.endswith("task_embedding")] == ["selector.task_embedding"]
    assert state["selector.task_embedding"].data_ptr() == tables[0].data_ptr()
    # every selector reads the table (width 12); only q_proj's input has that width, so only it compares
    layers = dict(adapters.adapter_layers(model))
    assert layers["o_proj"].selector.weight.shape == (R, P)
    assert layers["q_proj"].contrastive_weight == 0.1 and layers["o_proj"].contrastive_weight == 0.0
    # per_module keeps one table per layer, in the layer's input space
    per = dict(adapters.adapter_layers(tiny("per_module")))
    assert per["q_proj"].selector.task_embedding is not per["o_proj"].selector.task_embedding
    assert per["o_proj"].selector.task_embedding.shape == (T, Q)


@needs_stories
def test_shared_table_trains_on_stories260k(stories_batch):
    from mode.adapters.runtime import runtime_of
    from mode.training.losses import AnswerLoss

    model = stories_with("more", task_embedding="shared")
    layers = [layer for _, layer in adapters.adapter_layers(model)]
    table = layers[0].selector.task_embedding
    assert len(layers) == 20 and all(layer.selector.task_embedding is table for layer in layers)
    start = table.detach().clone()
    loss_module = AnswerLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = stories_batch

    def generation_loss():
        with torch.no_grad():
            return answer_loss(loss_module.eval(), batch).item()

    before = generation_loss()
    loss_module.train()
    for _ in range(12):
        loss = answer_loss(loss_module, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = generation_loss()
    assert after < 0.5 * before, (before, after)
    assert runtime_of(model).aux_history["contrastive"]
    assert not torch.equal(table.detach(), start)  # the one table was trained ...
    assert all(layer.selector.task_embedding is table for layer in layers)  # ... and is still the one


# -- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip_stores_the_table_once(tmp_path):
    model, x = tiny("shared", seed=1), torch.randn(3, 5, P)
    expected = run(model, x, [0, 2, 1])
    adapters.save_adapters(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(k for k in tensors if "task_embedding" in k) == ["selector.task_embedding"]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["task_embedding"] == "shared"
    fresh = tiny("shared", seed=2)
    assert not torch.allclose(run(fresh, x, [0, 2, 1]), expected)
    adapters.load_adapters(fresh, tmp_path)
    torch.testing.assert_close(run(fresh, x, [0, 2, 1]), expected, rtol=0, atol=0)
    layers = [layer for _, layer in adapters.adapter_layers(fresh)]
    assert layers[0].selector.task_embedding is layers[1].selector.task_embedding  # loading kept the sharing
    with pytest.raises(ModeError, match=r"adapter\.task_embedding='shared', but the model's adapters have "
                                        r"adapter\.task_embedding='per_module'"):
        adapters.load_adapters(tiny("per_module"), tmp_path)


def test_older_adapter_files_load_as_per_module(tmp_path):
    """Folders written before the option have no task_embedding key and per-layer tables."""
    model, x = tiny("per_module", seed=1), torch.randn(2, 5, P)
    adapters.save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    del meta["task_embedding"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    assert {"q_proj.selector.task_embedding", "o_proj.selector.task_embedding"} <= set(
        load_file(str(tmp_path / "adapter_model.safetensors")))
    fresh = adapters.load_adapters(tiny("per_module", seed=3), tmp_path)
    torch.testing.assert_close(run(fresh, x, [1, 2]), run(model, x, [1, 2]), rtol=0, atol=0)


# -- merging and export, per task -------------------------------------------------------------------------
def test_shared_merges_and_exports_per_task():
    model, x = tiny("shared"), torch.randn(2, 5, P)
    ranks = {t for _, layer in adapters.adapter_layers(model) for t in layer.selector.ranks().tolist()}
    assert len(ranks) > 1  # the tasks use different ranks, so a wrong task would show
    for task in range(T):
        before = run(model, x, [task, task])
        adapters.merge_adapters(model, task=task)
        merged = run(model, x, [task, task])
        adapters.unmerge_adapters(model)
        torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
        tensors, config = peft_lora(model, task=task)  # mode-export format=peft
        for path, layer in adapters.adapter_layers(model):
            up, down = lora_factors(layer, task)
            k = int(layer.selector.ranks()[task])
            assert up.shape == (layer.out_features, k)
            torch.testing.assert_close(tensors[f"base_model.model.{path}.lora_B.weight"], up)
    with pytest.raises(ModeError, match="one task at a time"):
        adapters.merge_adapters(model)


# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,message", [
    ({"method": "more", "num_tasks": 2, "task_embedding": "global"},
     "adapter.task_embedding='global' is not one of ['per_module', 'shared']"),
    ({"method": "lora", "task_embedding": "shared"},
     "adapter.task_embedding='shared' is a MoRE option (adapter.method='more'), not one of adapter.method='lora'"),
])
def test_bad_values_are_refused_in_one_line_naming_the_key(cfg, message):
    with pytest.raises(ModeError) as err:
        AdapterConfig.from_mapping(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_params_cli_refuses_a_bad_value_in_one_line():
    bad = cli("mode.report.params", "model=gemma_2b", "adapter=more", "adapter.num_tasks=4",
              "adapter.task_embedding=shraed", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith(
        "adapter.task_embedding='shraed' is not one of ['per_module', 'shared']")


# -- per_module: unchanged ------------------------------------------------------------------------------
# Computed with the code before adapter.task_embedding existed (commit 3177f65), same script as below.
REFERENCE = {
    "init_digest": "f0bc269ff74ad384",
    "delta_sum": 23948.055027276278, "delta_abs": 59237.868608772755, "aux": 0.3197647035121918,
    "ranks": [[3, 1, 2, 1, 4], [1, 4, 2, 1, 1], [4, 1, 3, 1, 2], [1, 1, 2, 1, 1], [3, 4, 2, 2, 4],
              [1, 4, 1, 4, 1], [2, 2, 2, 1, 3], [4, 1, 1, 2, 4], [3, 2, 2, 1, 2], [4, 4, 2, 2, 2],
              [4, 1, 2, 4, 4], [1, 1, 2, 1, 4], [3, 3, 2, 1, 4], [2, 4, 2, 3, 4], [2, 3, 4, 3, 4],
              [2, 2, 1, 2, 3], [2, 2, 1, 1, 3], [4, 1, 1, 1, 1], [3, 2, 2, 4, 2], [4, 3, 1, 1, 1]],
}


@needs_stories
def test_per_module_is_unchanged_against_the_reference():
    import hashlib

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    torch.manual_seed(1234)
    adapters.apply_adapters(model, {"method": "more", "rank": 4, "alpha": 8, "num_tasks": 5})  # the default: per_module
    digest = hashlib.sha256()
    for key, tensor in sorted(adapters.adapter_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    assert digest.hexdigest()[:16] == REFERENCE["init_digest"]  # same names, shapes, init draws
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, tensor in adapters.adapter_state_dict(model).items():
            if key.endswith("lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
    ids = torch.randint(3, 500, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    task_ids = torch.tensor([0, 3, 4])
    model.train()
    with adapters.adapter_context(model, task_ids=task_ids, attention_mask=mask) as runtime:
        out = model(input_ids=ids, attention_mask=mask).logits
        aux = runtime.aux_loss()
    with torch.no_grad():
        for key, tensor in adapters.adapter_state_dict(model).items():
            if key.endswith("lora_B"):
                tensor.zero_()
        with adapters.adapter_context(model, task_ids=task_ids, attention_mask=mask):
            base = model(input_ids=ids, attention_mask=mask).logits
    delta = (out - base).detach().double()
    assert float(delta.sum()) == pytest.approx(REFERENCE["delta_sum"], rel=1e-6)
    assert float(delta.abs().sum()) == pytest.approx(REFERENCE["delta_abs"], rel=1e-6)
    assert float(aux.detach()) == pytest.approx(REFERENCE["aux"], rel=1e-6)
    assert [layer.selector.ranks().tolist() for _, layer in adapters.adapter_layers(model)] == REFERENCE["ranks"]


# -- reports ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,embeddings", [("per_module", 8 * 3 * 64), ("shared", 3 * 64)])
def test_aggregate_tables_state_mores_parameter_split(tmp_path, mode, embeddings):
    """A MoRE row's table (md and tex) names its LoRA part, selectors and task embeddings; tiny_random: 2
    layers of q, o 64 -> 64 and k, v 64 -> 32, R 8, 3 tasks."""
    from omegaconf import OmegaConf

    from mode.report.aggregate import Cell, table_rows, to_latex, to_markdown
    from mode.run.config import compose

    run_dir = tmp_path / "more" / "seed1"
    run_dir.mkdir(parents=True)
    cfg = compose("train", ["model=tiny_random", "adapter=paper/more_8", f"adapter.task_embedding={mode}"])
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    (run_dir / "data_stats.json").write_text(json.dumps({"tasks": ["a", "b", "c"]}))
    metrics = {"rougeL": 20.0, "trainable_parameters": 7168 + 4160 + embeddings}
    cell = Cell("paper/more_8", ("more", 1, 8, 1), [1], "MoRE R8", None, {1: run_dir}, {1: metrics})
    rows = table_rows([cell])
    note = (f"Trainable parameters of MoRE R8: LoRA part 7,168 + selectors 4,160 + task embeddings "
            f"{embeddings:,} (task_embedding={mode}).")
    assert note in to_markdown(rows, "Table")
    assert f"task embeddings {embeddings:,} (task\\_embedding={mode.replace('_', chr(92) + '_')})" in to_latex(rows, "Table")
    lora = Cell("paper/lora_64", ("lora", 1, 64, 1), [1], "LoRA 64", None, {1: run_dir}, {1: metrics})
    assert "Trainable parameters of" not in to_markdown(table_rows([lora]), "Table")  # MoRE rows only


def test_old_more_runs_resume_without_the_new_key():
    """A MoRE run's config.yaml from before adapter.task_embedding ran per_module: not a difference."""
    from mode.run.config import compose, to_container
    from mode.run.resume import config_differences

    resolved = to_container(compose("train", ["model=tiny_random", "adapter=more"]))
    saved = json.loads(json.dumps(resolved))
    del saved["adapter"]["task_embedding"]
    assert config_differences(resolved, saved) == []
    saved["adapter"]["task_embedding"] = "shared"
    assert [k for k, _, _ in config_differences(resolved, saved)] == ["adapter.task_embedding"]
