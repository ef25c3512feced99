"""Throughput features change speed, not results: length-grouped micro-batches give the full batch's
gradient exactly (answer-token masking survives any padding), micro-batches do not depend on the number
of processes, bf16 autocast stays within bf16's tolerance of fp32, and torch.compile matches eager.
(Gradient checkpointing: tests/test_adapter_training.py; two processes: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES, needs_stories
from test_train_eval import cli

from mode.adapters import apply_adapters
from mode.data.collate import collate_train
from mode.training.distributed import micro_batches
from mode.training.losses import AnswerLoss
from mode.training.throughput import compile_layers

METHODS = {"lora": {"rank": 8, "alpha": 16}, "mode": {"experts": 4, "block_rank": 2},
           "more": {"rank": 8, "alpha": 16, "contrastive_weight": 0.0}}


def examples(n: int = 8, vocab: int = 500) -> list[dict]:
    """Sequences of different lengths and prompt lengths, tasks 0..2."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        length = 6 + (7 * i) % 17
        rows.append({"input_ids": torch.randint(3, vocab, (length,), generator=gen).tolist(),
                     "prompt_length": 2 + i % 4, "task_index": i % 3})
    return rows


def stories(method: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    apply_adapters(model, {"method": method, "rank": 4, "alpha": 8, "init_A": "normal", **METHODS[method]},
                   num_tasks=3)
    with torch.no_grad():  # non-zero B, so every adapter tensor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def gradients(model, batches: list[dict], n_tokens: int, autocast: bool = False) -> tuple[float, dict]:
    """The training loop's step: sum over micro-batches of (summed answer-token loss / global answer tokens)."""
    loss_module = AnswerLoss(model).train()
    total = 0.0
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_module(b["input_ids"], b["attention_mask"], b["labels"], b["task_ids"]) / n_tokens
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return total, grads


def test_micro_batches_are_the_same_for_any_number_of_processes():
    rows = examples(16)
    indices = list(torch.randperm(16, generator=torch.Generator().manual_seed(1)))
    indices = [int(i) for i in indices]
    one = micro_batches(rows, indices, 0, 1, 8, 2)
    two = [micro_batches(rows, indices, r, 2, 4, 2) for r in range(2)]
    four = [micro_batches(rows, indices, r, 4, 2, 2) for r in range(4)]
    assert sorted(map(tuple, one)) == sorted(tuple(g) for share in two for g in share) \
        == sorted(tuple(g) for share in four for g in share)
    assert sorted(i for g in one for i in g) == sorted(indices)                     # a partition of the batch
    widths = [max(len(rows[i]["input_ids"]) for i in g) for g in one]
    assert widths == sorted(widths)                                               # length-grouped
    assert [len(s) for s in two] == [4, 4] and two[0][0] == one[0] and two[1][0] == one[1]  # dealt round-robin
    plain = [indices[k * 2:(k + 1) * 2] for k in range(8)]
    padded = sum(len(g) * max(len(rows[i]["input_ids"]) for i in g) for g in one)
    assert padded < sum(len(g) * max(len(rows[i]["input_ids"]) for i in g) for g in plain)


@needs_stories
@pytest.mark.parametrize("method", list(METHODS))
def test_length_grouped_micro_batches_give_the_full_batch_gradient(method):
    rows = examples()
    full = collate_train(rows, pad_id=0)
    n_tokens = int((full["labels"][:, 1:] != -100).sum())
    groups = micro_batches(rows, list(range(len(rows))), 0, 1, 4, 2)
    model = stories(method)
    loss_full, grads_full = gradients(model, [full], n_tokens)
    loss_micro, grads_micro = gradients(model, [collate_train([rows[i] for i in g], 0) for g in groups], n_tokens)
    assert loss_micro == pytest.approx(loss_full, rel=1e-6)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_micro[name], grad, rtol=1e-4, atol=1e-6)  # float summation order only


@needs_stories
@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_autocast_stays_within_bf16_tolerance_of_fp32(method):
    """What `train.precision=bf16` does on a CPU (accelerate: torch.autocast with bfloat16)."""
    rows = examples()
    batch = collate_train(rows, pad_id=0)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    model = stories(method)
    loss32, grads32 = gradients(model, [batch], n_tokens)
    loss16, grads16 = gradients(model, [batch], n_tokens, autocast=True)
    assert loss16 == pytest.approx(loss32, rel=2e-2) and loss16 != loss32           # bf16 did run
    for name, g32 in grads32.items():
        g16 = grads16[name]
        assert g16.dtype == torch.float32                                            # adapters stay float32
        cosine = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
        assert g16.norm() == pytest.approx(float(g32.norm()), rel=0.1), name


@pytest.mark.parametrize("method", ["lora", "mode"])
def test_compiled_layers_match_eager(method):
    from mode.models import load_model_and_tokenizer
    from mode.run.config import compose

    rows = examples(4, vocab=200)
    batch = collate_train(rows, pad_id=0)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for compiled in (False, True):
        model, _ = load_model_and_tokenizer(compose("train", ["model=tiny_random"]).model)
        torch.manual_seed(0)
        apply_adapters(model, {"method": method, "rank": 4, "alpha": 8, "init_A": "normal", **METHODS[method]},
                       num_tasks=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        if compiled:
            compile_layers(model)
        results.append(gradients(model, [batch], n_tokens))
    (loss, grads), (loss_c, grads_c) = results
    assert loss_c == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5)


def train_losses(run) -> list[float]:
    return [p["train/loss"] for p in json.loads((run / "curves.json").read_text())["train"]]


# bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); the loss is ~5.6 nats, so one ulp is ~0.02
BF16_LOSS_TOLERANCE = 0.02


@pytest.mark.slow  # minutes of subprocesses: CI runs it (make test-all)
def test_throughput_options_through_the_cli(sni_fixture, tmp_path):
    """bf16 + gradient checkpointing + compiled layers in one real run (evaluation runs eagerly), against the
    same run in fp32 without them: every step's training loss within BF16_LOSS_TOLERANCE. The learning rate is
    high enough that four steps lower the loss by over ten times that tolerance, so a run whose adapters stop
    learning under these options (no gradient through the checkpointed layers, a lost update) fails."""
    common = ["model=tiny_random", "adapter=mode", f"data.sni_dir={sni_fixture}", "data.tasks=[task001_add_numbers]",
              "train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
              "train.lr=0.02", "eval.max_instances_per_task=2", "eval.max_new_tokens=3"]
    run, reference = tmp_path / "run", tmp_path / "fp32"
    out = cli("mode.train", *common, "train.precision=bf16", "train.gradient_checkpointing=true",
              "train.compile=true", f"hydra.run.dir={run}")
    assert (run / "metrics.json").exists(), out.stderr[-2000:]
    cli("mode.train", *common, f"hydra.run.dir={reference}")
    provenance = json.loads((run / "provenance.json").read_text())["attempts"][-1]
    assert provenance["precision"] == "bf16"
    ours, fp32 = train_losses(run), train_losses(reference)
    assert len(ours) == len(fp32) == 4
    assert fp32[0] - fp32[-1] > 10 * BF16_LOSS_TOLERANCE, fp32                     # the tolerance can see a stall
    assert ours != fp32                                                            # bf16 did run
    for step, (a, b) in enumerate(zip(ours, fp32), 1):
        assert abs(a - b) <= BF16_LOSS_TOLERANCE, (step, ours, fp32)
    metrics, metrics32 = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    assert abs(metrics["train_loss"] - metrics32["train_loss"]) <= BF16_LOSS_TOLERANCE
    assert "recompile_limit" not in out.stderr
    bad = cli("mode.train", "train.compile=yes", f"data.sni_dir={sni_fixture}", f"hydra.run.dir={tmp_path / 'bad'}",
              check=False)
    assert bad.returncode == 2 and "train.compile='yes' must be true or false" in bad.stderr
    bad = cli("mode.train", "train.device=gpu", f"data.sni_dir={sni_fixture}", f"hydra.run.dir={tmp_path / 'bad'}",
              check=False)
    assert bad.returncode == 2 and "train.device='gpu' is not one of ['auto', 'cpu', 'cuda', 'cuda:N']" in bad.stderr
