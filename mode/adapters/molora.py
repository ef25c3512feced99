"""MoLoRA (Zadouri et al. 2024): m full LoRA experts mixed per token by a dense softmax router.

    g = softmax(router x);  y = W0 x + s * sum_i g_i B_i A_i x

Fused: the experts' A are stacked into one [m*r, P] matmul, each expert's r slots are scaled by its
gate, and one [Q, m*r] matmul sums the experts. No loop over experts, no [T, m, Q] tensor.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mode.adapters.base import AdapterLayer
from mode.adapters.registry import register
from mode.errors import ModeError


@register
class MoLoRALinear(AdapterLayer):
    method = "molora"
    token_routed = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.block_rank != 1:
            raise ModeError(f"adapter.block_rank={cfg.block_rank} is for adapter.method='mode' only; leave it at 1")

    def __init__(self, base, cfg, runtime=None):
        super().__init__(base, cfg, runtime)
        m, r, P, Q = cfg.experts, cfg.rank, self.in_features, self.out_features
        self.experts = m
        self.lora_A = self.new_parameter(m, r, P)             # [m, r, P]
        self.lora_B = self.new_parameter(m, Q, r, zeros=True)  # [m, Q, r]
        self.router = self.new_parameter(m, P)                 # [m, P], no bias
        self.init_down_projection(self.lora_A, cfg)
        self.init_normal(self.router, cfg.router_init_std)

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m, Q, r = self.lora_B.shape
        flat = x.reshape(-1, x.shape[-1])
        route = flat if route is None else route.reshape(-1, x.shape[-1])
        h = F.linear(flat, self.lora_A.reshape(m * r, -1))                       # [T, m*r], expert-major
        g = self.gates(route, self.router, blocks=1).view(-1, m, 1).to(h.dtype)  # [T, m, 1]
        z = (h.view(-1, m, r) * g).reshape(-1, m * r)
        return z, self.lora_B.permute(1, 0, 2).reshape(Q, m * r)               # z @ up.T sums (expert, slot)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.experts}"

