"""LoRA (Hu et al. 2021): y = W0 x + s * B A x."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mode.adapters.base import AdapterLayer
from mode.adapters.registry import register


@register
class LoRALinear(AdapterLayer):
    method = "lora"

    def __init__(self, base, cfg, runtime=None):
        super().__init__(base, cfg, runtime)
        self.lora_A = self.new_parameter(cfg.rank, self.in_features)                # [r, P]
        self.lora_B = self.new_parameter(self.out_features, cfg.rank, zeros=True)   # [Q, r]
        self.init_down_projection(self.lora_A, cfg)

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(x.reshape(-1, self.in_features), self.lora_A), self.lora_B

    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        return self.lora_B @ self.lora_A
