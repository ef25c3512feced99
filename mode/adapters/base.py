"""The one wrapper every method shares: a frozen `nn.Linear` plus a trainable low-rank delta.

    y = base(x) + s * delta(dropout(x))

Subclasses (one module per method) define their parameters, `delta` and, where the delta does not
depend on the token, `delta_weight` for merging. Adapter parameters stay float32 under a bf16/fp16
base (the input is cast up, the delta cast back), as PEFT does.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from mode.adapters.config import AdapterConfig
from mode.errors import ModeError

ADAPTER_DTYPE = torch.float32


class AdapterLayer(nn.Module):
    method: ClassVar[str]
    token_routed: ClassVar[bool] = False  # True: the delta depends on each token, so it cannot be merged

    def __init__(self, base: nn.Linear, cfg: AdapterConfig):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = cfg.rank
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False

    # -- what a method provides -------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled adapter output for input `x` [..., P] -> [..., Q]."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The unscaled delta as a [Q, P] matrix, for merging into the base weight."""
        raise ModeError(
            f"adapter.method={self.method!r} routes every token to its own mixture of experts, so it "
            "cannot be merged into the base weight"
        )

    # -- shared machinery ---------------------------------------------------------------------------
    def new_parameter(self, *shape: int, zeros: bool = False) -> nn.Parameter:
        """A float32 parameter on the base layer's device (the meta device when sizing models)."""
        make = torch.zeros if zeros else torch.empty
        return nn.Parameter(make(*shape, dtype=ADAPTER_DTYPE, device=self.base_layer.weight.device))

    @staticmethod
    def init_down_projection(weight: torch.Tensor, cfg: AdapterConfig) -> None:
        """Init of A: PEFT's LoRA default (Kaiming-uniform) or N(0, init_std) (MoLoRA reference)."""
        if weight.is_meta:
            return
        if cfg.init_A == "kaiming_uniform":
            for matrix in weight.view(-1, *weight.shape[-2:]):  # each expert's A like a fresh nn.Linear
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
        else:
            nn.init.normal_(weight, std=cfg.init_std)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `proj.weight` keeps working on a wrapped layer
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        delta = self.delta(self.dropout(x).to(ADAPTER_DTYPE))
        return out + (self.scale * delta).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s * delta_weight into the base weight (float32 arithmetic) and stop adding the branch."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.scale * self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.scale * self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, scale={self.scale:g}"
