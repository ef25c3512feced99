"""MoLoRA-SD: MoLoRA with one down-projection A shared by all experts.

    g = softmax(router x);  y = W0 x + s * sum_i g_i B_i A x

This is MoDE with one router for all r slots (block_rank = r), so it runs MoDE's fused kernel; only the
router's stored shape differs ([m, P], as SPEC.md fixes it). The routing options (top_k, temperature, aux
losses, router_input=task with its per-task merge into one rank-r LoRA) come with it.
"""

from __future__ import annotations

from mode.adapters.dyadic import MoDELinear
from mode.adapters.registry import register
from mode.errors import ModeError


@register
class MoLoRASDLinear(MoDELinear):
    method = "molora_sd"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.block_rank != 1:
            raise ModeError(f"adapter.block_rank={cfg.block_rank} is for adapter.method='mode' only "
                            "(MoLoRA-SD is MoDE with block_rank = rank); leave it at 1")
        cls.check_routing(cfg)

    @staticmethod
    def block_rank_for(cfg) -> int:
        return cfg.rank

    @staticmethod
    def router_shape(cfg) -> tuple[int, ...]:
        return (cfg.experts,)                                   # [m, P]
