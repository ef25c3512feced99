"""MoDE m x r x p (Ning et al. 2025): a shared down-projection A and, for every rank slot j, m alternative
up-projection columns b_j^1..b_j^m ("dyadic experts" b_j^i a_j^T), mixed per token.

    h = A x;  G[k] = softmax(router[k] x) for each block k of p consecutive slots
    y = W0 x + s * sum_j h_j * sum_i G[j // p][i] * B[i][:, j]

Fused: h once ([T, r]); all r/p routers in one matmul; z = h (x) G laid out [T, r*m] without expanding
the blocks; one [Q, r*m] matmul. MoDE 1 x r x r is LoRA, MoDE m x r x r is MoLoRA-SD, exactly.
Routing options (base.py): top_k (per block), router_temperature, the balance and z losses; with
router_input=task every block's router reads the task's embedding, G depends on the task alone, and
task t merges into one LoRA of rank r (A is shared): up[:, j] = sum_i G[j // p][i] B[i][:, j], down = A.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mode.adapters.base import AdapterLayer
from mode.adapters.molora import routing_repr
from mode.adapters.registry import register


def dyadic_mixture(layer: AdapterLayer, x: torch.Tensor, route: torch.Tensor | None,
                   block_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused MoDE branch (z [T, r*m], up [Q, r*m]) for x [..., P] with lora_A [r, P], lora_B [m, Q, r],
    router [(r/p), m, P] reading `route` (default x), or the task embedding: the delta is z @ up.T."""
    m, Q, r = layer.lora_B.shape
    blocks = r // block_rank
    h = F.linear(x.reshape(-1, x.shape[-1]), layer.lora_A)                     # [T, r]
    g = layer.mixture_gates(x, route, layer.router, blocks=blocks).to(h.dtype)  # [T or B, 1, r/p, m]
    z = (h.view(g.shape[0], -1, blocks, block_rank, 1) * g.unsqueeze(3)).reshape(-1, r * m)  # slot-major (j, i)
    return z, layer.lora_B.permute(1, 2, 0).reshape(Q, r * m)                  # column (j, i) = B[i][:, j]


@register
class MoDELinear(AdapterLayer):
    method = "mode"
    token_routed = True
    mixture = True

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_routing(cfg)  # every (experts, rank, block_rank) with block_rank | rank is valid (AdapterConfig)

    def __init__(self, base, cfg, runtime=None):
        super().__init__(base, cfg, runtime)
        self.experts, self.block_rank = cfg.experts, self.block_rank_for(cfg)
        m, r, P, Q = cfg.experts, cfg.rank, self.in_features, self.out_features
        self.lora_A = self.new_parameter(r, P)                   # [r, P], shared by all experts
        self.lora_B = self.new_parameter(m, Q, r, zeros=True)     # [m, Q, r]
        self.router = self.new_parameter(*self.router_shape(cfg), P)
        self.init_down_projection(self.lora_A, cfg)
        self.init_normal(self.router, cfg.router_init_std)
        self.init_routing(cfg)                                    # router_input=task: task_embedding [T, P]

    @staticmethod
    def block_rank_for(cfg) -> int:
        return cfg.block_rank

    @staticmethod
    def router_shape(cfg) -> tuple[int, ...]:
        return (cfg.rank // cfg.block_rank, cfg.experts)        # [r/p, m, P]

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dyadic_mixture(self, x, route, self.block_rank)

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, Q, r = self.lora_B.shape
        G = self.task_gate_values(task, self.router, blocks=r // self.block_rank)   # [r/p, m]
        slot_gates = G.repeat_interleave(self.block_rank, dim=0)                     # [r, m]: slot j's gates
        return torch.einsum("iqj,ji->qj", self.lora_B, slot_gates), self.lora_A      # [Q, r], [r, P]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.experts}, block_rank={self.block_rank}{routing_repr(self)}"
