"""Routing diagnostics: what users of mixtures ask first — do the routers use their experts, or collapse?

Mixture layers (MoLoRA, MoLoRA-SD, MoDE, token- or task-routed, any top_k) add running sums to themselves
inside the forward they run anyway (base.py `record_routing`: a few reductions of the gates, no extra
forward): per router block, the gate mass each expert received and the routing entropy, over real
(unpadded) tokens. MoRE's routing is per task, so its summary is the rank each task currently selects in
each layer. The routers' auxiliary losses (MoRE's contrastive loss; the mixtures' load-balancing and z
losses) are logged as `train/<name>_loss` (`train/balance_loss`, `train/z_loss`): the unweighted mean
over the window's forwards of each forward's mean over layers.

    diagnostics = AdapterDiagnostics(model); diagnostics.start()
    ... forward passes ...
    logger.log(diagnostics.scalars())          # per-layer scalars for W&B; starts a new window
    write(diagnostics.summary(tasks=names))    # the full record (routing.json)

With several processes, pass `reduce` (e.g. `lambda t: accelerator.reduce(t, "sum")`); every process
must then call it, as with any collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mode.adapters.inject import adapter_layers
from mode.adapters.runtime import runtime_of

Reduce = Callable[[torch.Tensor], torch.Tensor] | None


class AdapterDiagnostics:
    def __init__(self, model):
        self.runtime = runtime_of(model)
        layers = list(adapter_layers(model))
        self.routed = [(path, layer) for path, layer in layers if layer.mixture]
        self.task_routed = [(path, layer) for path, layer in layers if hasattr(layer, "selector")]

    def start(self, tasks: int | None = None) -> None:
        """Accumulate routing statistics from now on (until `stop`); with `tasks`, also per task id
        (task ids 0 .. tasks-1 reach the layers through `adapter_context`)."""
        if self.runtime is not None and self.routed:
            self.runtime.track_routing = True
            if tasks is not None:
                self.runtime.routing_tasks = tasks

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.track_routing = False

    def reset(self) -> None:
        for _, layer in self.routed:
            layer.routing_sums = layer.task_routing_sums = None
        if self.runtime is not None:
            self.runtime.aux_history.clear()

    # -- reading ----------------------------------------------------------------------------------
    def _sums(self, reduce: Reduce) -> list[torch.Tensor]:
        """Each routed layer's [blocks*m usage, blocks entropy, 1 tokens] sums, then (when tracked per task)
        its [tasks x (blocks*m usage, 1 tokens)] sums, reduced over processes."""
        parts = []
        slots = self.runtime.routing_tasks if self.runtime is not None else 0
        for _, layer in self.routed:
            blocks, experts = routing_shape(layer)
            sums = layer.routing_sums
            if sums is None:
                sums = torch.zeros(blocks * experts + blocks + 1, device=layer.lora_A.device)
            parts.append(sums)
        for _, layer in self.routed if slots else ():
            blocks, experts = routing_shape(layer)
            sums = layer.task_routing_sums
            if sums is None or sums.shape[0] != slots:
                sums = torch.zeros(slots, blocks * experts + 1, device=layer.lora_A.device)
            parts.append(sums.reshape(-1))
        if not parts:
            return []
        flat = torch.cat(parts)
        if reduce is not None:
            flat = reduce(flat)
        return list(flat.detach().cpu().split([p.numel() for p in parts]))

    def summary(self, reduce: Reduce = None, tasks: list[str] | None = None) -> dict:
        """Per-layer routing record since the last reset: JSON-ready (routing.json)."""
        out: dict = {}
        if self.routed:
            layers = {}
            parts = self._sums(reduce)
            per_task = parts[len(self.routed):] or [None] * len(self.routed)
            for (path, layer), sums, task_sums in zip(self.routed, parts, per_task):
                blocks, experts = routing_shape(layer)
                tokens = float(sums[-1])
                usage = sums[: blocks * experts].view(blocks, experts) / max(tokens, 1.0)
                entropy = float(sums[blocks * experts : -1].mean()) / max(tokens, 1.0)
                layers[path] = {
                    "tokens": int(round(tokens)),
                    "entropy": round(entropy, 6),  # nats, mean over tokens and router blocks
                    "normalized_entropy": round(entropy / math.log(experts), 6) if experts > 1 else 0.0,
                    "max_usage": round(float(usage.max(dim=-1).values.mean()), 6),  # 1/m balanced .. 1 collapsed
                    "usage": [[round(float(u), 6) for u in row] for row in usage],   # [block][expert]
                }
                if task_sums is not None:  # {task: [block][expert]} mean gates over that task's real tokens
                    layers[path]["task_usage"] = task_usage(task_sums, blocks, experts, tasks)
            out["routed_layers"] = layers
            out["mean_normalized_entropy"] = round(
                sum(v["normalized_entropy"] for v in layers.values()) / len(layers), 6)
            out["mean_max_usage"] = round(sum(v["max_usage"] for v in layers.values()) / len(layers), 6)
        if self.task_routed:
            ranks = {path: layer.selector.ranks().cpu().tolist() for path, layer in self.task_routed}
            names = tasks or [str(t) for t in range(len(next(iter(ranks.values()))))]
            out["task_ranks"] = {path: dict(zip(names, r)) for path, r in ranks.items()}
            out["mean_rank"] = round(sum(sum(r) for r in ranks.values()) / sum(len(r) for r in ranks.values()), 4)
        return out

    def scalars(self, reduce: Reduce = None) -> dict[str, float]:
        """Flat per-layer scalars for the experiment logger over the window since the last call; resets it."""
        summary = self.summary(reduce)
        out: dict[str, float] = {}
        if "routed_layers" in summary:
            out["routing/normalized_entropy"] = summary["mean_normalized_entropy"]
            out["routing/max_usage"] = summary["mean_max_usage"]
            for path, record in summary["routed_layers"].items():
                out[f"routing/normalized_entropy/{path}"] = record["normalized_entropy"]
                out[f"routing/max_usage/{path}"] = record["max_usage"]
        if "task_ranks" in summary:
            out["routing/mean_rank"] = summary["mean_rank"]
        if self.runtime is not None:
            for name, values in self.runtime.aux_history.items():
                if values:
                    out[f"train/{name}_loss"] = sum(values) / len(values)
        self.reset()
        return out


def task_usage(sums: torch.Tensor, blocks: int, experts: int, tasks: list[str] | None) -> dict:
    """{task name: [block][expert] mean gate} for the tasks that routed any token (4 decimals: it is big)."""
    rows = sums.view(-1, blocks * experts + 1)
    out = {}
    for t, row in enumerate(rows):
        tokens = float(row[-1])
        if tokens > 0:
            name = tasks[t] if tasks and t < len(tasks) else str(t)
            usage = (row[:-1] / tokens).view(blocks, experts)
            out[name] = [[round(float(u), 4) for u in block] for block in usage]
    return out


def routing_shape(layer) -> tuple[int, int]:
    """(router blocks, experts) of a token-routed layer."""
    experts = layer.experts
    return layer.router.numel() // (experts * layer.in_features), experts
