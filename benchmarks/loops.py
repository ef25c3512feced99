"""The "what people use today" reference: mixture layers that loop over experts in Python.

Typical MoLoRA code (e.g. the for-ai reference and most LoRA-MoE repositories) computes every expert's
full output and sums them, `for i in range(m): out += g[..., i] * B_i(A_i(x))`: m small matmuls and m
[tokens, Q] tensors per layer, each kept for the backward pass. These classes compute exactly the same
function as our fused layers (same parameters, same init, tested equal) in that style, so the benchmark
isolates the cost of the loop. Used only by the benchmark.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mode.adapters import AdapterLayer, apply_adapters
from mode.adapters.dyadic import MoDELinear
from mode.adapters.inject import adapter_layers
from mode.adapters.molora import MoLoRALinear


class _Loop:
    """y = base(x) + s * delta(dropout(x)), the delta summed expert by expert (the usual code's forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + (self.scale * self.delta(self.dropout(x))).to(out.dtype)


class LoopMoLoRA(_Loop, MoLoRALinear):
    """MoLoRA m x r, one expert at a time: out += g_i * B_i A_i x."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        g = self.gates(flat, self.router, blocks=1)[:, 0]                       # [T, m]
        out = 0
        for i in range(self.experts):
            out = out + g[:, i : i + 1] * F.linear(F.linear(flat, self.lora_A[i]), self.lora_B[i])
        return out.view(*x.shape[:-1], -1)


class LoopMoDE(_Loop, MoDELinear):
    """MoDE m x r x p, one expert at a time (A x shared, as MoDE prescribes): out += B_i (h * G_i)."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        blocks = self.rank // self.block_rank
        h = F.linear(flat, self.lora_A)                                         # [T, r]
        g = self.gates(flat, self.router, blocks=blocks).repeat_interleave(self.block_rank, dim=1)  # [T, r, m]
        out = 0
        for i in range(self.experts):
            out = out + F.linear(h * g[:, :, i], self.lora_B[i])
        return out.view(*x.shape[:-1], -1)


LOOPS = {"molora": LoopMoLoRA, "mode": LoopMoDE}


def apply_loop_adapters(model, config: dict):
    """`apply_adapters`, then swap each layer's class for its per-expert-loop twin (same parameters)."""
    apply_adapters(model, config)
    for _, layer in adapter_layers(model):
        assert isinstance(layer, AdapterLayer)
        layer.__class__ = LOOPS[config["method"]]
    return model
