"""The one wrapper every method shares: a frozen `nn.Linear` plus a trainable low-rank delta.

    y = base(x) + s * delta(dropout(x)),   routers (mixtures) read x itself

Subclasses (one module per method) define their parameters, `branch` and, where the delta does not
depend on the token, `delta_weight` for merging. Every method's delta ends in one matmul, `z @ up.T`
(`branch` returns z and up), so the wrapper adds `s * z @ up.T` onto the base output inside that GEMM
(`addmm`): no [tokens, Q] delta, scaled copy or sum is materialised (PEFT's LoRA makes all three).
Adapter parameters stay float32 under a bf16/fp16 base, as PEFT does. Router logits and their softmax are
float32 with autocast off, so mixed precision never touches the routing decision; the gates (and MoRE's
rank mask) are then cast to the branch's dtype, so under autocast z stays bf16 and the final GEMM stays
one `addmm`. With a bf16/fp16 base and no autocast, z and up are cast to the base output's dtype for
that GEMM (what autocast would do), never the [tokens, Q] output up to float32.
Routers read the layer's input x, not dropout(x) (SPEC, the papers): dropout regularises the expert
branch only, so routing is the same function in training and evaluation.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mode.adapters.config import AdapterConfig
from mode.adapters.runtime import AdapterRuntime
from mode.errors import ModeError

ADAPTER_DTYPE = torch.float32


class AdapterLayer(nn.Module):
    method: ClassVar[str]
    token_routed: ClassVar[bool] = False  # True: the delta depends on each token, so it cannot be merged
    task_routed: ClassVar[bool] = False   # True: the delta depends on the sequence's task id (MoRE)

    def __init__(self, base: nn.Linear, cfg: AdapterConfig, runtime: AdapterRuntime | None = None):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = cfg.rank
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.runtime = runtime if runtime is not None else AdapterRuntime()  # shared by all layers of a model
        self.merged = False
        self.routing_sums: torch.Tensor | None = None  # diagnostics.py: usage, entropy and token sums
        self.task_routing_sums: torch.Tensor | None = None  # [tasks, blocks*m + 1]: usage and tokens per task

    # -- what a method provides -------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: AdapterConfig) -> None:
        """Reject keys that mean nothing for this method (a silent ignore would mislabel the run)."""
        for key in ("experts", "block_rank"):
            if getattr(cfg, key) != 1:
                raise ModeError(f"adapter.{key}={getattr(cfg, key)} has no meaning for adapter.method="
                                f"{cfg.method!r}; leave it at 1")

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [N, k], up [Q, k]) for branch input `x` [..., P] (N = its tokens): the unscaled delta is z @ up.T.

        `route` is what routers read (the layer's input before dropout; default `x`)."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled adapter output for input `x` [..., P] -> [..., Q]."""
        z, up = self.branch(x, route)
        return F.linear(z, up.to(z.dtype)).view(*x.shape[:-1], self.out_features)

    def delta_weight(self, task: int | None = None) -> torch.Tensor:
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

    @staticmethod
    def init_normal(weight: torch.Tensor, std: float) -> None:
        """Routers and selectors: N(0, std) (MoLoRA reference: 0.02). Never zero, or experts stay identical."""
        if not weight.is_meta:
            nn.init.normal_(weight, std=std)

    def gates(self, x: torch.Tensor, router: torch.Tensor, blocks: int) -> torch.Tensor:
        """Softmax routing weights [T, blocks, m] (float32) for inputs x [T, P], every block's router in one
        matmul. `router` is [blocks, m, P] (or [m, P] for one block); logits are float32 with autocast off.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(torch.float32), router.reshape(-1, router.shape[-1]))
        gates = logits.view(x.shape[0], blocks, -1).softmax(dim=-1)
        if self.runtime.track_routing and not self.runtime.recomputing:
            self.record_routing(gates.detach())
        return gates

    @torch.no_grad()
    def record_routing(self, gates: torch.Tensor) -> None:
        """Accumulate expert usage (mean gate) and routing entropy over real tokens; a few reductions."""
        tokens, blocks, experts = gates.shape
        weights = self.runtime.token_weights(tokens)
        if weights is None:
            weights = torch.ones(tokens, device=gates.device)
        entropy = -(gates * gates.clamp_min(1e-30).log()).sum(-1)                 # [T, blocks]
        usage = torch.einsum("t,tbm->bm", weights, gates)                          # [blocks, m]
        sums = torch.cat([usage.reshape(-1), (weights @ entropy).reshape(-1), weights.sum().reshape(1)])
        self.routing_sums = sums if self.routing_sums is None else self.routing_sums + sums
        slots, ids = self.runtime.routing_tasks, self.runtime.task_ids
        if slots and ids is not None and ids.numel() and tokens % ids.numel() == 0:  # per task: one index_add
            per_token = ids.to(gates.device).repeat_interleave(tokens // ids.numel())
            rows = torch.cat([(gates * weights.view(-1, 1, 1)).reshape(tokens, -1), weights.view(-1, 1)], dim=1)
            task_sums = rows.new_zeros(slots, rows.shape[1]).index_add_(0, per_token, rows)
            self.task_routing_sums = task_sums if self.task_routing_sums is None else self.task_routing_sums + task_sums

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
        x = x.to(ADAPTER_DTYPE)
        z, up = self.branch(self.dropout(x), route=x)
        if z.dtype != out.dtype and not torch.is_autocast_enabled(out.device.type):  # a bf16/fp16 base
            z, up = z.to(out.dtype), up.to(out.dtype)
        # out + s * z @ up.T in one GEMM, for every method and precision
        return torch.addmm(out.reshape(-1, self.out_features), z, up.t(), alpha=self.scale).view(out.shape)

    @torch.no_grad()
    def merge(self, task: int | None = None) -> None:
        """Fold s * delta_weight into the base weight (float32 arithmetic) and stop adding the branch."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.scale * self.delta_weight(task)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.scale * self.delta_weight(self.merged_task())).to(weight.dtype))
        self.merged = False

    def merged_task(self) -> int | None:
        return None

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, scale={self.scale:g}"
