"""What several adapter test files build the same way: a tiny two-projection model with random adapters, the
merge round trip, the bf16 GEMM counter, and a few training steps of stories260K on one batch (the batch
itself is conftest's `stories_batch` fixture)."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES
from torch import nn

from mode.adapters import (
    adapter_context,
    adapter_state_dict,
    apply_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
    unmerge_adapters,
)
from mode.errors import ModeError

P, Q = 12, 10


class Tiny(nn.Module):
    """Two adapted projections with different in/out sizes, so P and Q never get swapped unnoticed."""

    def __init__(self, p: int = P, q: int = Q):
        super().__init__()
        self.q_proj = nn.Linear(p, q, bias=True)
        self.o_proj = nn.Linear(q, p, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def cfg(method, **kw):
    base = {"method": method, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj"]}
    base.update({"lora": {}, "more": {"num_tasks": 3}}.get(method, {"experts": 3}))
    return {**base, **kw}


def adapted(method, seed=0, **kw):
    """A Tiny model with random (non-zero) adapter tensors, so every term of every formula matters."""
    torch.manual_seed(seed)
    model = apply_adapters(Tiny(), cfg(method, **kw))
    with torch.no_grad():
        for t in adapter_state_dict(model).values():
            t.normal_(std=0.5)
    return model


ADAPTER_KEYS = ("lora_", "router", "selector", "task_embedding")


def check_save_load_round_trip(model, config, folder, x: torch.Tensor, task_ids=None) -> None:
    """Saved adapters loaded into a fresh model of the same class (built without arguments), with the same base
    weights and config, give the same outputs bit for bit (under `task_ids` when given)."""
    save_adapters(model, folder)
    fresh = type(model)()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if not any(part in k for part in ADAPTER_KEYS)})
    fresh = load_adapters(apply_adapters(fresh, config), folder)
    ids = None if task_ids is None else torch.tensor(task_ids)
    with adapter_context(model, task_ids=ids):
        expected = model(x)
    with adapter_context(fresh, task_ids=ids):
        assert torch.equal(fresh(x), expected)


def check_merge_round_trip(model, x: torch.Tensor, tasks=range(3)) -> None:
    """For each task alone in a batch: merging it changes no output, unmerging gives the outputs back."""
    for task in tasks:
        with adapter_context(model, task_ids=torch.tensor([task] * x.shape[0])):
            before = model(x)
            merge_adapters(model, task=task)
            assert model.q_proj.merged
            after = model(x)
            unmerge_adapters(model)
            again = model(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, before, rtol=1e-5, atol=1e-5)


def check_one_task_merged(model, x: torch.Tensor) -> None:
    """With task 1 merged, a batch with other tasks and a second merge are refused."""
    merge_adapters(model, task=1)
    with pytest.raises(ModeError, match="adapter of task 1 is merged, but the batch has other tasks"):
        with adapter_context(model, task_ids=torch.tensor([1, 2])):
            model(x)
    with pytest.raises(ModeError, match="task 1 is merged already"):
        merge_adapters(model, task=2)


def check_task_id_refusals(model) -> None:
    """A task-routed adapter refuses a task id it does not know and a task_ids tensor of the wrong length."""
    x = torch.randn(2, 3, P)
    with pytest.raises(ModeError, match="task id 3 is out of range: the adapter knows 3 tasks"):
        with adapter_context(model, task_ids=torch.tensor([0, 3])):
            model(x)
    with pytest.raises(ModeError, match="2 task ids for a batch of 3"):
        with adapter_context(model, task_ids=torch.tensor([0, 1])):
            model(torch.randn(3, 3, P))


def count_addmm(monkeypatch) -> list[tuple]:
    """Record (output dtype, z dtype) of every torch.addmm call from now on: the fused adapter GEMM."""
    calls = []
    real_addmm = torch.addmm

    def counting_addmm(out, z, up, **kwargs):
        calls.append((out.dtype, z.dtype))
        return real_addmm(out, z, up, **kwargs)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    return calls


# -- stories260K ------------------------------------------------------------------------------------------
STORIES_METHODS = {"lora": {"rank": 8, "alpha": 16}, "molora": {"experts": 4}, "molora_sd": {"experts": 4},
                   "mode": {"experts": 4, "block_rank": 2}, "more": {"rank": 8, "alpha": 16}}


def stories_batch_of_four():
    """Four short prompt/answer pairs of three tasks, collated as training sees them."""
    from transformers import AutoTokenizer

    from mode.data.collate import collate_train

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    pairs = [("Answer yes or no. Input: Is the sky blue? Output:", " yes"),
             ("Repeat the word. Input: apple Output:", " apple apple"),
             ("Count the words. Input: one two three Output:", " three"),
             ("Answer yes or no. Input: Is fire cold? Output:", " no")]
    examples = []
    for i, (prompt, answer) in enumerate(pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": p + a, "prompt_length": len(p), "task_index": i % 3})
    return collate_train(examples, pad_id=0)


def stories_with(method: str, **kw):
    """stories260K with `method` at its STORIES_METHODS shape (kw override), random A, 3 tasks, seed 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    return apply_adapters(model, {"method": method, "rank": 4, "alpha": 8, "init_A": "normal",
                                  **STORIES_METHODS[method], **kw}, num_tasks=3)


def answer_loss(loss_module, batch) -> torch.Tensor:
    """The loss per answer token (AnswerLoss sums it)."""
    n = (batch["labels"][:, 1:] != -100).sum()
    return loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task_ids"]) / n


def fit(model, batch, steps: int = 12, lr: float = 1e-2):
    """(loss before, loss after, the AnswerLoss module) of `steps` AdamW steps on one batch; the losses are
    generation losses (eval mode: no dropout, no auxiliary terms)."""
    from mode.training.losses import AnswerLoss

    loss_module = AnswerLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def generation_loss():
        with torch.no_grad():
            return answer_loss(loss_module.eval(), batch).item()

    before = generation_loss()
    loss_module.train()
    for _ in range(steps):
        loss = answer_loss(loss_module, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, generation_loss(), loss_module
