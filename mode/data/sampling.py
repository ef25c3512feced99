"""Which training examples make up global batch number `step`: a pure function of (seed, step).

Being a function of the step (not of an iterator's history) makes resuming exact: a resumed run asks
for batch `step` and gets the same examples an uninterrupted run would have seen.

Strategies (`data.sampling`), with n_t the number of training examples of task t:
- `proportional`: epochs of seeded permutations over all examples; tasks mix in proportion to n_t and
  every example is seen once per epoch.
- `uniform`: every task equally often, p_t = 1/T.
- `temperature`: p_t ∝ n_t^(1/τ) (`data.sampling_temperature`; τ=1 is proportional, τ→∞ uniform).
- `more`: MoRE's p_t ∝ exp(n_t / Σ n).
The last three draw, for each batch slot, a task from p and then an example of that task uniformly
(with replacement), from a generator seeded by (seed, step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mode.data.splits import stable_seed
from mode.errors import ModeError

STRATEGIES = ("proportional", "uniform", "temperature", "more")


def task_weights(sizes: Sequence[int], strategy: str, temperature: float = 2.0) -> list[float]:
    """The probability of drawing each task (in the order of `sizes`) under a strategy."""
    if strategy not in STRATEGIES:
        raise ModeError(f"data.sampling={strategy!r} is not one of {list(STRATEGIES)}")
    if strategy == "temperature" and (not isinstance(temperature, (int, float)) or temperature <= 0):
        raise ModeError(f"data.sampling_temperature={temperature!r} must be a positive number")
    total = sum(sizes)
    if strategy == "proportional":
        raw = [n / total for n in sizes]
    elif strategy == "uniform":
        raw = [1.0 for _ in sizes]
    elif strategy == "temperature":
        raw = [n ** (1.0 / temperature) for n in sizes]
    else:
        raw = [math.exp(n / total) for n in sizes]
    norm = sum(raw)
    return [w / norm for w in raw]


class MixtureSampler:
    """Global batches of example indices. `task_of_example[i]` is example i's task index; an int n means
    n examples of one task (enough for `proportional`)."""

    def __init__(self, task_of_example: Sequence[int] | int, batch_size: int, seed: int,
                 strategy: str = "proportional", temperature: float = 2.0):
        if isinstance(task_of_example, int):
            task_of_example = [0] * task_of_example
        if not len(task_of_example):
            raise ModeError("no training examples to sample from")
        tasks = torch.as_tensor(list(task_of_example), dtype=torch.long)
        self.n, self.batch_size, self.seed, self.strategy = len(tasks), batch_size, seed, strategy
        # Examples grouped by task: task k (k-th distinct task index) owns order[start[k] : start[k] + size[k]].
        self.task_ids, sizes = torch.unique(tasks, sorted=True, return_counts=True)
        self.order = torch.argsort(tasks, stable=True)
        self.sizes = sizes
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.weights = torch.tensor(task_weights(sizes.tolist(), strategy, temperature), dtype=torch.float64)
        self._perm_epoch, self._perm = -1, None

    def task_probabilities(self) -> dict[int, float]:
        """{task index: probability that a batch slot draws from it}."""
        return {int(t): float(w) for t, w in zip(self.task_ids, self.weights)}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(stable_seed("epoch", self.seed, epoch) % 2**63)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        if self.strategy == "proportional":
            out = []
            for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
                out.append(int(self._permutation(pos // self.n)[pos % self.n]))
            return out
        g = torch.Generator().manual_seed(stable_seed("mixture", self.seed, step) % 2**63)
        task = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        offset = (torch.rand(self.batch_size, generator=g, dtype=torch.float64) * self.sizes[task]).long()
        offset = torch.minimum(offset, self.sizes[task] - 1)
        return self.order[self.starts[task] + offset].tolist()
