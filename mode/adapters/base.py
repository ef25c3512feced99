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

Routing options of the mixtures (MoLoRA, MoLoRA-SD, MoDE; `route` below, all on float32 logits):
`adapter.router_temperature` T divides the logits; `adapter.top_k` keeps each router's k largest logits
(the others are set to -inf, so the softmax runs over the kept k and the rest get exactly 0: a mask, no
gather, the fused kernel unchanged); `adapter.balance_loss_weight` / `adapter.z_loss_weight` add the
Switch load-balancing loss and the router z-loss through `runtime.add_aux_loss` (`router_losses`);
`adapter.router_input=task` makes the routers read a learned per-task embedding (`task_embedding`
[num_tasks, P]) instead of the token, so the gates depend on the sequence's task alone and the mixture
merges into one LoRA per task (`lora_factors(task)`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mode.adapters.config import ROUTING_KEYS, AdapterConfig
from mode.adapters.runtime import AdapterRuntime
from mode.errors import ModeError

ADAPTER_DTYPE = torch.float32


class AdapterLayer(nn.Module):
    method: ClassVar[str]
    token_routed: ClassVar[bool] = False  # True: the delta depends on each token, so it cannot be merged
    task_routed: ClassVar[bool] = False   # True: the delta depends on the sequence's task id (MoRE)
    mixture: ClassVar[bool] = False       # True: softmax routers over experts (MoLoRA, MoLoRA-SD, MoDE)
    # A mixture's routing options (init_routing sets them per layer from the config; token_routed and
    # task_routed then become instance attributes: adapter.router_input decides them)
    top_k: int | None = None
    router_temperature: float = 1.0
    balance_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    in_decoder: bool = False  # in the decoder of an encoder-decoder model (apply_adapters): its tokens are the target's

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
        self._merged_task: int | None = None  # a task-routed adapter merges one task at a time
        self._weight_before_merge: torch.Tensor | None = None  # merge keeps it for an exact unmerge

    # -- what a method provides -------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: AdapterConfig) -> None:
        """Reject keys that mean nothing for this method (a silent ignore would mislabel the run)."""
        for key in ("experts", "block_rank"):
            if getattr(cfg, key) != 1:
                raise ModeError(f"adapter.{key}={getattr(cfg, key)} has no meaning for adapter.method="
                                f"{cfg.method!r}; leave it at 1")
        for key, default in ROUTING_KEYS.items():  # mixture routing options; LoRA and MoRE have no router
            if getattr(cfg, key) != default:
                raise ModeError(f"adapter.{key}={getattr(cfg, key)!r} has no meaning for adapter.method={cfg.method!r}"
                                f" (no mixture router); leave it at {'null' if default is None else repr(default)}")

    @staticmethod
    def check_routing(cfg: AdapterConfig) -> None:
        """A mixture's routing options against its shape (their ranges are checked in AdapterConfig)."""
        if cfg.top_k is not None and cfg.top_k > cfg.experts:
            raise ModeError(f"adapter.top_k={cfg.top_k} exceeds adapter.experts={cfg.experts}: each router "
                            "chooses among the m experts")

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [N, k], up [Q, k]) for branch input `x` [..., P] (N = its tokens): the unscaled delta is z @ up.T.

        `route` is what routers read (the layer's input before dropout; default `x`)."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled adapter output for input `x` [..., P] -> [..., Q]."""
        z, up = self.branch(x, route)
        return F.linear(z, up.to(z.dtype)).view(*x.shape[:-1], self.out_features)

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

    def token_weights(self, num_tokens: int) -> torch.Tensor | None:
        """This layer's real-token mask [num_tokens] (the encoder's or the target's in a T5), or None."""
        return self.runtime.token_weights(num_tokens, decoder=self.in_decoder)

    # -- mixture routing ----------------------------------------------------------------------------
    def init_routing(self, cfg: AdapterConfig) -> None:
        """A mixture's routing options; with adapter.router_input=task, the per-task embedding the routers read
        (created last, so token-routed layers draw the same random init as before these options existed)."""
        self.top_k, self.router_temperature = cfg.top_k, float(cfg.router_temperature)
        self.balance_loss_weight, self.z_loss_weight = float(cfg.balance_loss_weight), float(cfg.z_loss_weight)
        self.task_routed = cfg.router_input == "task"
        self.token_routed = not self.task_routed
        if self.task_routed:
            if not isinstance(cfg.num_tasks, int) or cfg.num_tasks < 1:
                raise ModeError(f"adapter.num_tasks={cfg.num_tasks!r}: adapter.router_input='task' needs the number "
                                "of tasks (mode-train sets it from the data)")
            # N(0, 1): the scale of a normalised hidden state, so a task-routed router starts where a
            # token-routed one does (logits ~ N(0, router_init_std^2 * P)), not at a saddle near zero
            self.task_embedding = self.new_parameter(cfg.num_tasks, self.in_features)   # [num_tasks, P]
            self.init_normal(self.task_embedding, 1.0)
            self.runtime.num_tasks = cfg.num_tasks  # shared runtime: task ids are range-checked
        else:
            self.register_parameter("task_embedding", None)

    def mixture_gates(self, x: torch.Tensor, route: torch.Tensor | None, router: torch.Tensor,
                      blocks: int) -> torch.Tensor:
        """Gates for the branch input x [..., P] (float32): per token [T, 1, blocks, m], or per sequence
        (router_input=task, B = x.shape[0]) [B, 1, blocks, m]; either broadcasts over the branch viewed as
        [T or B, -1, ...]. `router` is [blocks, m, P] (or [m, P] for one block)."""
        if self.task_routed:
            batch = x.shape[0]
            return self.task_gates(batch, x.numel() // (x.shape[-1] * batch), router, blocks).unsqueeze(1)
        route = (x if route is None else route).reshape(-1, x.shape[-1])
        return self.gates(route, router, blocks).unsqueeze(1)

    def gates(self, x: torch.Tensor, router: torch.Tensor, blocks: int) -> torch.Tensor:
        """Routing weights [T, blocks, m] (float32) for inputs x [T, P], every block's router in one matmul.
        `router` is [blocks, m, P] (or [m, P] for one block); logits are float32 with autocast off.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(torch.float32), router.reshape(-1, router.shape[-1]))
        return self.route(logits.view(x.shape[0], blocks, -1), self.token_weights(x.shape[0]))

    def task_gates(self, batch: int, per_row: int, router: torch.Tensor, blocks: int) -> torch.Tensor:
        """router_input=task: routing weights [B, blocks, m] from each sequence's task embedding."""
        ids = self.runtime.task_ids
        if ids is None:
            raise ModeError("adapter.router_input='task' routes by task id: run the model inside "
                            "`with adapter_context(model, task_ids=...)` (mode-train and mode-eval do)")
        ids = self.runtime.require_task_ids(batch)
        with torch.autocast(device_type=router.device.type, enabled=False):
            logits = F.linear(self.task_embedding[ids], router.reshape(-1, router.shape[-1]))
        weights = self.token_weights(batch * per_row)   # a sequence weighs its real tokens
        weights = (weights.view(batch, per_row).sum(1) if weights is not None
                   else torch.full((batch,), float(per_row), device=logits.device))
        return self.route(logits.view(batch, blocks, -1), weights)

    def gate_function(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / T) over the experts, or over each router's top_k logits (the rest exactly 0)."""
        return self.sparse_softmax(self.tempered(logits))

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.router_temperature if self.router_temperature != 1.0 else logits

    def sparse_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the last axis, over its top_k entries only when top_k is set (the rest exactly 0)."""
        if self.top_k is not None:  # a mask, not a gather: the rest of the kernel stays dense and fused
            keep = logits.detach().topk(self.top_k, dim=-1).indices
            drop = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, keep, False)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(dim=-1)

    def route(self, logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Gates [N, blocks, m] for router logits [N, blocks, m] (rows: tokens, or sequences weighted by their
        real tokens); records routing statistics and, in training, the router's auxiliary losses."""
        logits = self.tempered(logits)
        gates = self.sparse_softmax(logits)
        runtime = self.runtime
        # also during a checkpoint recompute (add_aux_loss then records nothing): non-reentrant checkpointing
        # needs the recompute to save the same tensors as the forward, the aux losses' included
        if self.training and (self.balance_loss_weight > 0 or self.z_loss_weight > 0) and torch.is_grad_enabled():
            balance, z = router_losses(logits, weights)
            if self.balance_loss_weight > 0:
                runtime.add_aux_loss("balance", balance, self.balance_loss_weight)
            if self.z_loss_weight > 0:
                runtime.add_aux_loss("z", z, self.z_loss_weight)
        if runtime.track_routing and not runtime.recomputing:
            self.record_routing(gates.detach(), weights)
        return gates

    @torch.no_grad()
    def record_routing(self, gates: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Accumulate expert usage (mean gate) and routing entropy over real tokens; a few reductions.
        Rows of `gates` [N, blocks, m] are tokens, or sequences (task routing) with `weights` their real tokens."""
        tokens, blocks, experts = gates.shape
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

    # -- task-routed mixtures: one LoRA per task ------------------------------------------------------
    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [Q, k], down [k, P]) with delta_weight(task) = up @ down, for a task-routed mixture."""
        raise NotImplementedError

    def task_gate_values(self, task: int | None, router: torch.Tensor, blocks: int) -> torch.Tensor:
        """[blocks, m] gates of `task` (router_input=task): what every token of its sequences uses."""
        if not self.task_routed:
            raise ModeError(
                f"adapter.method={self.method!r} routes every token to its own mixture of experts, so it "
                "cannot be merged into the base weight (adapter.router_input=task can be merged per task)"
            )
        if task is None:
            raise ModeError("adapter.router_input='task' holds one adapter per task: merge one task at a time, "
                            "merge_adapters(model, task=<task index>)")
        num_tasks = self.task_embedding.shape[0]
        if not 0 <= task < num_tasks:
            raise ModeError(f"task={task} is not a task index of this adapter (0..{num_tasks - 1})")
        logits = self.task_embedding[task] @ router.reshape(-1, router.shape[-1]).T
        return self.gate_function(logits.view(blocks, -1))

    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        """The unscaled delta as a [Q, P] matrix, for merging into the base weight."""
        if self.mixture and self.task_routed:
            up, down = self.lora_factors(task)
            return up @ down
        raise ModeError(
            f"adapter.method={self.method!r} routes every token to its own mixture of experts, so it "
            "cannot be merged into the base weight"
        )

    @property
    def weight(self) -> torch.Tensor:  # code that reads `proj.weight` keeps working on a wrapped layer
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            if self.task_routed:
                self._check_merged_task()
            return out
        x = x.to(ADAPTER_DTYPE)
        z, up = self.branch(self.dropout(x), route=x)
        if z.dtype != out.dtype and not torch.is_autocast_enabled(out.device.type):  # a bf16/fp16 base
            z, up = z.to(out.dtype), up.to(out.dtype)
        # out + s * z @ up.T in one GEMM, for every method and precision
        return torch.addmm(out.reshape(-1, self.out_features), z, up.t(), alpha=self.scale).view(out.shape)

    @torch.no_grad()
    def merge(self, task: int | None = None) -> None:
        """Fold s * delta_weight into the base weight (float32 arithmetic, rounded once to the weight's dtype)
        and stop adding the branch. The weight as it was is kept (a copy in its own dtype, not in the state
        dict) for `unmerge`: round(round(W + s d) - s d) is not W in bf16 (nor always in float32), so
        subtracting the delta again would leave some weights an ulp off. PEFT subtracts and accepts that."""
        if self.merged:
            if self.task_routed and task != self._merged_task:
                raise ModeError(f"task {self._merged_task} is merged already; call unmerge_adapters first")
            return
        weight = self.base_layer.weight
        merged = (weight.float() + self.scale * self.delta_weight(task)).to(weight.dtype)  # raises before a change
        self._weight_before_merge = weight.detach().clone()
        weight.copy_(merged)
        self.merged = True
        self._merged_task = task if self.task_routed else None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the base weight back bit for bit: the copy `merge` kept, not the merged weight minus the delta."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged = False
        self._merged_task = None

    def merged_task(self) -> int | None:
        return self._merged_task

    def _check_merged_task(self) -> None:
        ids = self.runtime.task_ids
        if ids is not None and bool((ids != self._merged_task).any()):
            raise ModeError(f"the adapter of task {self._merged_task} is merged, but the batch has other tasks; "
                            "unmerge_adapters first")

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, scale={self.scale:g}"


def router_losses(logits: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of router logits [N, blocks, m] (already divided by the temperature; all m,
    before top-k), rows weighted by `weights` [N] (real tokens: 0/1 per token, or a sequence's real-token count
    under task routing; None: 1 each). Per router block, then the mean over blocks:

        balance = m * sum_i f_i * P_i     f_i: share of tokens whose top-1 logit is expert i (no gradient)
                                          P_i: mean dense softmax probability of expert i
        z       = mean over tokens of logsumexp(logits)^2

    P uses the dense softmax even under top-k: with top_k=1 the kept gate is the constant 1, which would
    leave the balance loss without a gradient (Switch Transformer uses the router probabilities too).
    Balanced routing gives balance = 1; collapsed onto one expert, m.
    """
    rows, blocks, experts = logits.shape
    if weights is None:
        weights = torch.ones(rows, device=logits.device)
    total = weights.sum().clamp_min(1.0)
    probs = logits.softmax(dim=-1)
    top1 = F.one_hot(logits.detach().argmax(dim=-1), experts).to(probs.dtype)
    f = torch.einsum("n,nbm->bm", weights, top1) / total                    # [blocks, m]
    p = torch.einsum("n,nbm->bm", weights, probs) / total                   # [blocks, m]
    balance = experts * (f * p).sum(-1).mean()
    z = (weights @ logits.logsumexp(dim=-1).square()).mean() / total
    return balance, z
