"""LoRA: the formula, merge equivalence, strict save/load, and injection rules."""

from __future__ import annotations

import pytest
import torch
from helpers import check_save_load_round_trip
from torch import nn

from mode import adapters
from mode.errors import ModeError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(12, 10, bias=True), "o_proj": nn.Linear(10, 12, bias=False)})
            for _ in range(2)
        )

    def forward(self, x):
        for b in self.blocks:
            x = b["o_proj"](torch.tanh(b["q_proj"](x)))
        return x


def lora_cfg(**kw):
    return {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "o_proj"], **kw}


def randomise_B(model):
    with torch.no_grad():
        for name, t in adapters.adapter_state_dict(model).items():
            if name.endswith("lora_B"):
                t.normal_()


def test_output_equals_formula():
    torch.manual_seed(0)
    model = adapters.apply_adapters(Tiny(), lora_cfg())
    randomise_B(model)
    layer = model.blocks[0]["q_proj"]
    x = torch.randn(3, 5, 12)
    base = layer.base_layer
    expected = x @ base.weight.T + base.bias + (8 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_freezes_base_and_counts_parameters():
    model = adapters.apply_adapters(Tiny(), lora_cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r(P+Q) per layer: q 12->10, o 10->12, two blocks
    assert adapters.count_adapter_parameters(model) == 2 * (4 * (12 + 10) + 4 * (10 + 12))


def test_tensor_names_and_shapes_follow_the_spec():
    state = adapters.adapter_state_dict(adapters.apply_adapters(Tiny(), lora_cfg()))
    assert state["blocks.0.q_proj.lora_A"].shape == (4, 12)
    assert state["blocks.0.q_proj.lora_B"].shape == (10, 4)
    assert len(state) == 8


def test_initial_adapter_is_a_no_op():
    torch.manual_seed(0)
    plain = Tiny()
    x = torch.randn(2, 12)
    expected = plain(x)
    torch.testing.assert_close(adapters.apply_adapters(plain, lora_cfg())(x), expected)


def test_merge_unmerge_equivalence():
    torch.manual_seed(0)
    model = adapters.apply_adapters(Tiny(), lora_cfg())
    randomise_B(model)
    x = torch.randn(4, 12)
    before = model(x)
    adapters.merge_adapters(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    adapters.unmerge_adapters(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = adapters.apply_adapters(Tiny(), lora_cfg())
    randomise_B(model)
    torch.manual_seed(1)  # the fresh copy's adapters start elsewhere: loading must overwrite them
    check_save_load_round_trip(model, lora_cfg(), tmp_path, torch.randn(4, 12))


def test_load_rejects_a_shape_mismatch_naming_the_tensor(tmp_path):
    adapters.save_adapters(adapters.apply_adapters(Tiny(), lora_cfg()), tmp_path)
    other = adapters.apply_adapters(Tiny(), lora_cfg(rank=2))
    with pytest.raises(ModeError, match=r"blocks\.0\.(q|o)_proj\.lora_[AB].*shape"):
        adapters.load_adapters(other, tmp_path)


def test_load_rejects_missing_tensors(tmp_path):
    adapters.save_adapters(adapters.apply_adapters(Tiny(), lora_cfg(target_modules=["q_proj"])), tmp_path)
    with pytest.raises(ModeError, match="missing tensor 'blocks.0.o_proj.lora_A'"):
        adapters.load_adapters(adapters.apply_adapters(Tiny(), lora_cfg()), tmp_path)


@pytest.mark.parametrize("cfg,match", [
    (lora_cfg(target_modules=["nope"]), "matches no nn.Linear"),
    (lora_cfg(target_modules=["q_proj", "gate_proj"]), r"\['gate_proj'\] match no"),
    (lora_cfg(method="unknown"), "adapter.method='unknown'"),
    (lora_cfg(rank=0), "adapter.rank=0"),
    (lora_cfg(rank=4, block_rank=3), "adapter.block_rank=3 must divide adapter.rank=4"),
])
def test_bad_configs_are_clear_errors(cfg, match):
    with pytest.raises(ModeError, match=match):
        adapters.apply_adapters(Tiny(), cfg)


def test_adapter_stays_float32_under_a_bf16_base():
    torch.manual_seed(0)
    model = adapters.apply_adapters(Tiny().to(torch.bfloat16), lora_cfg())
    layer = model.blocks[0]["q_proj"]
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16
