"""Which training examples make up global batch number `step`: a pure function of (seed, step).

Being a function of the step (not of an iterator's history) makes resuming exact: a resumed run asks
for batch `step` and gets the same examples an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch

from mode.data.splits import stable_seed
from mode.errors import ModeError

STRATEGIES = ("proportional",)


class MixtureSampler:
    """`proportional`: epochs of seeded permutations over all examples (tasks mix in proportion to size)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, strategy: str = "proportional"):
        if strategy not in STRATEGIES:
            raise ModeError(f"data.sampling={strategy!r} is not one of {list(STRATEGIES)}")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(stable_seed("epoch", self.seed, epoch) % 2**63)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out
