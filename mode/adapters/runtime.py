"""Per-forward information the adapter layers share: task ids, the attention mask, auxiliary losses.

`apply_adapters` creates one `AdapterRuntime` per model and hands it to every adapter layer by reference.
Callers set it for one forward pass with `adapter_context(model, task_ids=..., attention_mask=...)`;
layers read it (MoRE routes by task id) and write to it (MoRE's contrastive loss, routing statistics).
Methods that need none of it ignore it, so LoRA and the token-routed mixtures run the same with or
without a context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from mode.errors import ModeError


@dataclass
class AdapterRuntime:
    task_ids: torch.Tensor | None = None         # [batch] task index of each sequence
    attention_mask: torch.Tensor | None = None   # [batch, seq]: 1 on real tokens (pooling, statistics)
    decoder_attention_mask: torch.Tensor | None = None  # encoder-decoder: [batch, target] for decoder layers
    num_tasks: int | None = None                 # tasks the adapter knows (MoRE); task ids are checked
    recomputing: bool = False                    # a gradient-checkpoint recompute: record nothing twice
    track_routing: bool = False                  # accumulate routing statistics (diagnostics.py)
    routing_tasks: int = 0                       # > 0: also per task id (0 .. routing_tasks - 1)
    aux: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # this forward's auxiliary losses
    aux_weights: dict[str, float] = field(default_factory=dict)        # name -> weight in the objective
    aux_history: dict[str, list[float]] = field(default_factory=dict)  # detached values, for logging
    shared: dict[str, torch.Tensor] = field(default_factory=dict)     # tensors all layers hold (MoRE's shared table)

    # -- written by layers ---------------------------------------------------------------------------
    def add_aux_loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Record one layer's auxiliary loss; the objective adds `weight` x the mean over layers."""
        if self.recomputing or not torch.is_grad_enabled():
            return
        self.aux.setdefault(name, []).append(value)
        self.aux_weights[name] = weight

    def token_weights(self, num_tokens: int, decoder: bool = False) -> torch.Tensor | None:
        """[num_tokens] float mask of real tokens when the attention mask matches the layer's input.
        `decoder`: a layer in the decoder of an encoder-decoder model, whose tokens are the target's."""
        mask = self.decoder_attention_mask if decoder else self.attention_mask
        if mask is None or mask.numel() != num_tokens:
            return None  # e.g. one decoding step of generation: every row is a real token
        return mask.reshape(-1).to(torch.float32)

    def require_task_ids(self, batch_size: int) -> torch.Tensor:
        ids = self.task_ids
        if ids is None:
            raise ModeError(
                "adapter.method='more' selects each task's rank from its task id: run the model inside "
                "`with adapter_context(model, task_ids=...)` (mode-train and mode-eval do)"
            )
        if ids.numel() != batch_size:
            raise ModeError(f"adapter_context has {ids.numel()} task ids for a batch of {batch_size} sequences")
        return ids

    # -- read by the loss ------------------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        """Sum over names of weight x (mean over layers) of this forward's auxiliary losses."""
        if not self.aux:
            return None
        terms = {name: torch.stack(values).mean() for name, values in self.aux.items()}
        for name, value in terms.items():
            self.aux_history.setdefault(name, []).append(value.item())
        return sum(self.aux_weights[name] * value for name, value in terms.items())

    # -- context plumbing --------------------------------------------------------------------------------
    def _swap(self, **values) -> dict:
        old = {key: getattr(self, key) for key in values}
        for key, value in values.items():
            setattr(self, key, value)
        return old


def runtime_of(model) -> AdapterRuntime | None:
    runtime = getattr(model, "adapter_runtime", None)
    if runtime is None and hasattr(model, "module"):  # DDP / accelerate wrappers
        runtime = getattr(model.module, "adapter_runtime", None)
    return runtime


@contextlib.contextmanager
def adapter_context(model, task_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    decoder_attention_mask: torch.Tensor | None = None):
    """Give the adapter layers of `model` this batch's task ids (and masks) for the enclosed forward pass.

    Encoder-decoder models: `attention_mask` is the encoder's, `decoder_attention_mask` the target's
    (None in generation, whose decoder steps hold real tokens only).

    Yields the runtime (None for a model without adapters). Auxiliary losses recorded inside the block
    are read with `runtime.aux_loss()` before it ends; everything is restored on exit.
    """
    runtime = runtime_of(model)
    if runtime is None:
        yield None
        return
    if task_ids is not None and runtime.num_tasks is not None and task_ids.numel():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= runtime.num_tasks:
            raise ModeError(f"task id {low if low < 0 else high} is out of range: the adapter knows "
                            f"{runtime.num_tasks} tasks (adapter.num_tasks)")
    old = runtime._swap(task_ids=task_ids, attention_mask=attention_mask,
                        decoder_attention_mask=decoder_attention_mask, aux={})
    try:
        yield runtime
    finally:
        runtime._swap(**old)


def checkpoint_context_fn(model):
    """`context_fn` for torch.utils.checkpoint (non-reentrant): a recompute during backward runs outside
    `adapter_context`, so give it the task ids and mask its forward saw, and let it record nothing."""

    def context_fn():
        runtime = runtime_of(model)
        if runtime is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        saved = {"task_ids": runtime.task_ids, "attention_mask": runtime.attention_mask,
                 "decoder_attention_mask": runtime.decoder_attention_mask}

        @contextlib.contextmanager
        def recompute():
            old = runtime._swap(**saved, recomputing=True)
            try:
                yield
            finally:
                runtime._swap(**old)

        return contextlib.nullcontext(), recompute()

    return context_fn

