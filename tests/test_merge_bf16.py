"""Merging adapters into a bf16 base (`merge_adapters` / `unmerge_adapters`): the merged model's outputs stay
within bf16 tolerance of the unmerged one (and of the float32 model), and unmerging gives back the base
weights. The merge is done in float32 and rounded once to bf16, so the merged weights differ from the exact
sum by at most half a bf16 ulp."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mode.adapters import adapter_context, apply_adapters, merge_adapters, unmerge_adapters

P, Q = 64, 48
CASES = {"lora": None, "more": 1}  # the mergeable methods; MoRE merges one task (index 1 here)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(P, Q, bias=True)
        self.o_proj = nn.Linear(Q, P, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def adapted(method: str, dtype: torch.dtype):
    torch.manual_seed(0)
    base = Tiny()
    model = apply_adapters(copy.deepcopy(base).to(dtype), {"method": method, "rank": 4, "alpha": 8,
                                                           "target_modules": ["q_proj", "o_proj"], "init_A": "normal"},
                           num_tasks=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}


@pytest.mark.parametrize("method", list(CASES))
def test_merged_bf16_outputs_stay_within_bf16_tolerance(method):
    task = CASES[method]
    model, reference = adapted(method, torch.bfloat16), adapted(method, torch.float32)
    assert model.q_proj.base_layer.weight.dtype == torch.bfloat16 and model.q_proj.lora_A.dtype == torch.float32
    x = torch.randn(2, 5, P)
    ids = torch.full((2,), task if task is not None else 0)
    with adapter_context(model, task_ids=ids), adapter_context(reference, task_ids=ids), torch.no_grad():
        unmerged, fp32 = model(x.bfloat16()), reference(x)
        merge_adapters(model, task=task)
        assert model.q_proj.merged and model.q_proj.base_layer.weight.dtype == torch.bfloat16
        merged = model(x.bfloat16())
    assert merged.dtype == torch.bfloat16
    delta = (fp32 - reference.o_proj.base_layer(torch.tanh(reference.q_proj.base_layer(x)))).abs().max()
    assert delta > 0.05  # the adapters change the output by far more than the tolerance below
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(merged.float(), fp32, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("method", list(CASES))
def test_unmerge_gives_back_the_bf16_weights_within_bf16_rounding(method):
    """W -> round(W + s d) -> round(round(W + s d) - s d): each rounding is at most half an ulp of the value
    rounded, so the weight comes back within one bf16 eps times the larger of |W| and |W + s d|."""
    model = adapted(method, torch.bfloat16)
    before = base_weights(model)
    merge_adapters(model, task=CASES[method])
    merged = base_weights(model)
    assert any(not torch.equal(merged[n], before[n]) for n in before)  # the merge did something
    unmerge_adapters(model)
    eps = torch.finfo(torch.bfloat16).eps
    for name, weight in base_weights(model).items():
        bound = eps * torch.maximum(before[name].float().abs(), merged[name].float().abs())
        assert weight.dtype == torch.bfloat16
        assert ((weight.float() - before[name].float()).abs() <= bound).all(), name


@pytest.mark.xfail(strict=True, reason="bug in mode/adapters/base.py: unmerge() subtracts s * delta from the "
                                       "bf16-rounded merged weight, so W + d - d rounds twice and a few percent of "
                                       "the base weights come back one bf16 ulp off (keep the original weight at merge)")
@pytest.mark.parametrize("method", list(CASES))
def test_unmerge_gives_back_the_bf16_weights_exactly(method):
    model = adapted(method, torch.bfloat16)
    before = base_weights(model)
    merge_adapters(model, task=CASES[method])
    unmerge_adapters(model)
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, before[name]), name
