"""Merging adapters into a bf16 base (`merge_adapters` / `unmerge_adapters`): the merged model's outputs stay
within bf16 tolerance of the unmerged one (and of the float32 model), and unmerging gives back the base
weights bit for bit. The merge is done in float32 and rounded once to bf16, so the merged weights differ from
the exact sum by at most half a bf16 ulp; subtracting the delta again would round a second time (a few percent
of the weights came back one ulp off), so `merge` keeps the weight it replaced and `unmerge` restores it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Tiny

from mode.adapters import adapter_context, apply_adapters, merge_adapters, unmerge_adapters

P, Q = 64, 48
# the mergeable methods: name -> (method, extra adapter keys, task merged); task-routed ones merge task 1
CASES = {"lora": ("lora", {}, None), "more": ("more", {}, 1),
         "mode_task": ("mode", {"experts": 3, "router_input": "task", "top_k": 2}, 1)}


def adapted(case: str, dtype: torch.dtype):
    method, extra, _ = CASES[case]
    torch.manual_seed(0)
    base = Tiny(P, Q)
    model = apply_adapters(copy.deepcopy(base).to(dtype), {"method": method, "rank": 4, "alpha": 8,
                                                           "target_modules": ["q_proj", "o_proj"], "init_A": "normal",
                                                           **extra},
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
    task = CASES[method][2]
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("method", list(CASES))
def test_unmerge_gives_back_the_base_weights_exactly(method, dtype):
    """Bit for bit, and merging again gives the same merged weights (the kept copy is released and retaken)."""
    model = adapted(method, dtype)
    task = CASES[method][2]
    before = base_weights(model)
    merge_adapters(model, task=task)
    merged = base_weights(model)
    assert any(not torch.equal(merged[n], before[n]) for n in before)  # the merge did something
    unmerge_adapters(model)
    assert not model.q_proj.merged
    for name, weight in base_weights(model).items():
        assert weight.dtype == dtype and torch.equal(weight, before[name]), name
    merge_adapters(model, task=task)
    assert all(torch.equal(w, merged[n]) for n, w in base_weights(model).items())
    unmerge_adapters(model)
    assert all(torch.equal(w, before[n]) for n, w in base_weights(model).items())


def test_subtracting_the_delta_would_not_give_the_bf16_weights_back():
    """Why unmerge restores a copy: round(round(W + s d) - s d) != W for some bf16 weights of this model, so a
    test of exact restoration can tell the copy from the subtraction."""
    model = adapted("lora", torch.bfloat16)
    layer = model.q_proj
    weight = layer.base_layer.weight.detach()
    delta = layer.scale * layer.delta_weight().detach()
    subtracted = ((weight.float() + delta).bfloat16().float() - delta).bfloat16()
    assert not torch.equal(subtracted, weight)
