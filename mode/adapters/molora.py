"""MoLoRA (Zadouri et al. 2024): m full LoRA experts mixed per token by a dense softmax router.

    g = softmax(router x);  y = W0 x + s * sum_i g_i B_i A_i x

Fused: the experts' A are stacked into one [m*r, P] matmul, each expert's r slots are scaled by its
gate, and one [Q, m*r] matmul sums the experts. No loop over experts, no [T, m, Q] tensor.
Routing options (base.py): top_k, router_temperature, the balance and z losses; with router_input=task
the router reads the task's embedding, g depends on the task alone, and task t merges into one LoRA of
rank m*r: up = [g_1 B_1 | ... | g_m B_m], down = [A_1; ...; A_m].
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
    mixture = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.block_rank != 1:
            raise ModeError(f"adapter.block_rank={cfg.block_rank} is for adapter.method='mode' only; leave it at 1")
        cls.check_routing(cfg)

    def __init__(self, base, cfg, runtime=None):
        super().__init__(base, cfg, runtime)
        m, r, P, Q = cfg.experts, cfg.rank, self.in_features, self.out_features
        self.experts = m
        self.lora_A = self.new_parameter(m, r, P)             # [m, r, P]
        self.lora_B = self.new_parameter(m, Q, r, zeros=True)  # [m, Q, r]
        self.router = self.new_parameter(m, P)                 # [m, P], no bias
        self.init_down_projection(self.lora_A, cfg)
        self.init_normal(self.router, cfg.router_init_std)
        self.init_routing(cfg)                                 # router_input=task: task_embedding [T, P]

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m, Q, r = self.lora_B.shape
        h = F.linear(x.reshape(-1, x.shape[-1]), self.lora_A.reshape(m * r, -1))  # [T, m*r], expert-major
        g = self.mixture_gates(x, route, self.router, blocks=1).to(h.dtype)      # [T or B, 1, 1, m]
        z = (h.view(g.shape[0], -1, m, r) * g.view(-1, 1, m, 1)).reshape(-1, m * r)
        return z, self.lora_B.permute(1, 0, 2).reshape(Q, m * r)               # z @ up.T sums (expert, slot)

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, Q, r = self.lora_B.shape
        g = self.task_gate_values(task, self.router, blocks=1).view(m)
        up = self.lora_B.permute(1, 0, 2).reshape(Q, m * r) * g.repeat_interleave(r)   # [Q, m*r]
        return up, self.lora_A.reshape(m * r, -1)                                       # [m*r, P]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.experts}{routing_repr(self)}"


def routing_repr(layer: AdapterLayer) -> str:
    parts = [f"top_k={layer.top_k}" if layer.top_k is not None else "",
             f"router_temperature={layer.router_temperature:g}" if layer.router_temperature != 1.0 else "",
             "router_input=task" if layer.task_routed else ""]
    return "".join(f", {p}" for p in parts if p)
