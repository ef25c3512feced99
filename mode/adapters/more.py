"""MoRE (Zhang et al. 2025): one LoRA of maximum rank R whose first k ranks form "expert k"; every task
picks its k with a learned selector, so each task's adapter is a plain LoRA B[:, :k_t] A[:k_t].

    p_t = softmax(W e_t + b) over k = 1..R     (e_t: task t's embedding, in this layer's input space with
                                                adapter.task_embedding=per_module; shared: one table for
                                                the model, in its first adapted layer's input space)
    k_t = argmax p_t, trained straight-through
    y   = W0 x + s * B[:, :k_t] A[:k_t] x        for every token of a sequence of task t

Fused: A x once for all R ranks, times a [batch, R] prefix mask, then B: no loop over tasks or experts.
The straight-through estimator: the forward uses the hard one-hot choice c = onehot(k_t), the backward
the gradient of p_t; the rank mask is the reversed cumulative sum of c (slot j is on when k_t > j), so
d loss / d p_t[k] = sum_{j<k} d loss / d mask[j]: how much the ranks up to k help this task.

Contrastive loss (training only): each sequence's mean layer input (real tokens) is pulled toward its
task's embedding and away from the others', cross-entropy over cosine similarities / temperature; the
mean over layers, times `adapter.contrastive_weight`, is added to the objective.

Where this follows the paper rather than the released code (NLPfreshman0/MoRE): the released code fixes
each task's rank from the untrained selector at the first forward and never trains it; here the selector
is trained straight-through. It uses the first token of a T5 encoder input for the contrastive loss and
weights it 0.5; for a decoder-only model the first token is the same for every prompt, so we mean-pool
over real tokens and use the paper's weight 0.1. The later released version also multiplies rank slot j
by (j+1)/R; we do not.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mode.adapters.base import ADAPTER_DTYPE, AdapterLayer
from mode.adapters.registry import register
from mode.errors import ModeError

SHARED_TABLE = "more.task_embedding"         # its key in AdapterRuntime.shared


class TaskRankSelector(nn.Module):
    """Task embeddings [T, E] and a linear selector (weight [R, E], bias [R]) over ranks k = 1..R.

    per_module (`table` None): the selector's own table, E = P. shared: `table` is the model's one table,
    the same nn.Parameter in every selector (E its width), so it is stored and trained once."""

    def __init__(self, num_tasks: int, in_features: int, max_rank: int, device, init_std: float,
                 table: nn.Parameter | None = None):
        super().__init__()
        def make(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=ADAPTER_DTYPE, device=device))
        own = table is None
        self.task_embedding = make(num_tasks, in_features) if own else table
        self.weight = make(max_rank, self.task_embedding.shape[1])
        self.bias = make(max_rank)
        if device != torch.device("meta"):
            if own:  # per_module draws in the order it always did: existing runs keep their init
                nn.init.normal_(self.task_embedding, std=init_std)
            nn.init.normal_(self.weight, std=init_std)

    def probabilities(self) -> torch.Tensor:
        """[T, R] selector probabilities, float32 with autocast off."""
        table = self.task_embedding.to(self.weight.device)  # a shared table may sit on another device
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            return F.linear(table, self.weight, self.bias).softmax(dim=-1)

    def rank_masks(self) -> torch.Tensor:
        """[T, R] masks: exactly 1 on the first k_t slots and 0 after; straight-through gradients."""
        probs = self.probabilities()
        hard = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        choice = hard + probs - probs.detach()
        return choice.flip(-1).cumsum(-1).flip(-1)

    @torch.no_grad()
    def ranks(self) -> torch.Tensor:
        """[T] the rank k_t each task uses now."""
        return self.probabilities().argmax(dim=-1) + 1


@register
class MoRELinear(AdapterLayer):
    method = "more"
    task_routed = True

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not cfg.contrastive_temperature > 0:
            raise ModeError(f"adapter.contrastive_temperature={cfg.contrastive_temperature!r} must be > 0")
        if not cfg.contrastive_weight >= 0:
            raise ModeError(f"adapter.contrastive_weight={cfg.contrastive_weight!r} must be >= 0")

    def __init__(self, base, cfg, runtime=None):
        super().__init__(base, cfg, runtime)
        if not isinstance(cfg.num_tasks, int) or cfg.num_tasks < 1:
            raise ModeError(f"adapter.num_tasks={cfg.num_tasks!r}: adapter.method='more' needs the number of "
                            "tasks (mode-train sets it from the data)")
        R, P, Q = cfg.rank, self.in_features, self.out_features
        self.lora_A = self.new_parameter(R, P)                  # [R, P]
        self.lora_B = self.new_parameter(Q, R, zeros=True)      # [Q, R]
        self.init_down_projection(self.lora_A, cfg)
        table = self.shared_table(cfg) if cfg.task_embedding == "shared" else None
        self.selector = TaskRankSelector(cfg.num_tasks, P, R, self.lora_A.device, cfg.router_init_std, table)
        # tensors every layer holds by reference: adapter_state_dict stores them once, without a module path
        self.shared_names = ("selector.task_embedding",) if table is not None else ()
        self.task_embedding_mode = cfg.task_embedding
        # shared: only layers whose input has the table's width can compare it with their input
        self.contrastive_weight = cfg.contrastive_weight if self.selector.task_embedding.shape[1] == P else 0.0
        self.temperature = cfg.contrastive_temperature

    def shared_table(self, cfg) -> nn.Parameter:
        """adapter.task_embedding=shared: the model's one [T, E] table, made by its first MoRE layer (E = that
        layer's input width, the residual stream for the usual q_proj first) and kept in the runtime every
        layer of the model receives, so later layers take the same nn.Parameter."""
        table = self.runtime.shared.get(SHARED_TABLE)
        if table is None:
            table = self.new_parameter(cfg.num_tasks, self.in_features)
            self.init_normal(table, cfg.router_init_std)
            self.runtime.shared[SHARED_TABLE] = table
        elif table.shape[0] != cfg.num_tasks:
            raise ModeError(f"adapter.num_tasks={cfg.num_tasks}, but the model's shared task embedding has "
                            f"{table.shape[0]} tasks")
        return table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self._check_merged_task()
            return self.base_layer(x)
        if self.training and self.contrastive_weight > 0:
            self._contrastive_loss(x)
        return super().forward(x)

    def branch(self, x: torch.Tensor, route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.runtime.require_task_ids(x.shape[0])
        mask = self.selector.rank_masks()[ids]                                  # [B, R], float32
        h = F.linear(x, self.lora_A)
        h = h * mask.to(h.dtype).view(x.shape[0], *[1] * (x.dim() - 2), -1)
        return h.reshape(-1, h.shape[-1]), self.lora_B

    def _contrastive_loss(self, x: torch.Tensor) -> None:
        ids = self.runtime.require_task_ids(x.shape[0])
        with torch.autocast(device_type=x.device.type, enabled=False):
            seq = x.to(ADAPTER_DTYPE).reshape(x.shape[0], -1, x.shape[-1])       # [B, S, P]
            weights = self.token_weights(seq.shape[0] * seq.shape[1])
            if weights is None:
                pooled = seq.mean(dim=1)
            else:
                weights = weights.view(seq.shape[0], seq.shape[1], 1)
                pooled = (seq * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            logits = F.normalize(pooled, dim=-1) @ F.normalize(self.selector.task_embedding, dim=-1).T
            loss = F.cross_entropy(logits / self.temperature, ids)
        self.runtime.add_aux_loss("contrastive", loss, self.contrastive_weight)

    # -- per-task merging ---------------------------------------------------------------------------
    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        if task is None:
            raise ModeError("adapter.method='more' holds one adapter per task: merge one task at a time, "
                            "merge_adapters(model, task=<task index>)")
        num_tasks = self.selector.task_embedding.shape[0]
        if not 0 <= task < num_tasks:
            raise ModeError(f"task={task} is not a task index of this adapter (0..{num_tasks - 1})")
        k = int(self.selector.ranks()[task])
        return self.lora_B[:, :k] @ self.lora_A[:k]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tasks={self.selector.task_embedding.shape[0]}, "
                f"task_embedding={self.task_embedding_mode}")
