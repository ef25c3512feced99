"""Mixture sampling: each strategy's task weights, batches as a pure function of (seed, step)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mode.data.sampling import STRATEGIES, MixtureSampler, task_weights
from mode.errors import ModeError

SIZES = {0: 10, 1: 90, 2: 900}
TASKS = [t for t, n in SIZES.items() for _ in range(n)]


def test_task_weights_follow_their_formulas():
    sizes = list(SIZES.values())
    assert task_weights(sizes, "proportional") == pytest.approx([0.01, 0.09, 0.9])
    assert task_weights(sizes, "uniform") == pytest.approx([1 / 3] * 3)
    assert task_weights(sizes, "temperature", 1.0) == pytest.approx(task_weights(sizes, "proportional"))
    root = [n ** 0.5 for n in sizes]
    assert task_weights(sizes, "temperature", 2.0) == pytest.approx([r / sum(root) for r in root])
    more = [math.exp(n / 1000) for n in sizes]
    assert task_weights(sizes, "more") == pytest.approx([m / sum(more) for m in more])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batches_are_a_pure_function_of_seed_and_step(strategy):
    a = MixtureSampler(TASKS, 16, seed=3, strategy=strategy)
    forward = [a.indices(s) for s in range(30)]
    b = MixtureSampler(TASKS, 16, seed=3, strategy=strategy)
    assert [b.indices(s) for s in reversed(range(30))] == forward[::-1]  # any order, fresh object: same batches
    assert MixtureSampler(TASKS, 16, seed=4, strategy=strategy).indices(0) != forward[0]
    assert all(len(batch) == 16 and all(0 <= i < len(TASKS) for i in batch) for batch in forward)


@pytest.mark.parametrize("strategy,temperature", [("uniform", 2.0), ("temperature", 2.0), ("temperature", 5.0),
                                                  ("more", 2.0)])
def test_drawn_task_frequencies_match_the_weights(strategy, temperature):
    sampler = MixtureSampler(TASKS, 64, seed=0, strategy=strategy, temperature=temperature)
    counts = Counter(TASKS[i] for step in range(300) for i in sampler.indices(step))
    n = sum(counts.values())
    for task, p in sampler.task_probabilities().items():
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(counts[task] / n - p) < 5 * sd, (task, counts[task] / n, p)


def test_examples_within_a_task_are_drawn_uniformly():
    sampler = MixtureSampler(TASKS, 64, seed=0, strategy="uniform")
    small = Counter(i for step in range(400) for i in sampler.indices(step) if TASKS[i] == 0)
    assert set(small) == set(range(10))  # every example of the small task is drawn...
    assert max(small.values()) < 2 * min(small.values())  # ...about equally often


def test_proportional_visits_every_example_once_per_epoch():
    sampler = MixtureSampler(TASKS, 10, seed=0)
    epoch = [i for step in range(100) for i in sampler.indices(step)]
    assert sorted(epoch) == list(range(1000))
    assert MixtureSampler(1000, 10, seed=0).indices(7) == sampler.indices(7)  # a plain count still works


def test_bad_strategy_and_temperature_are_errors():
    with pytest.raises(ModeError, match="data.sampling='balanced' is not one of"):
        MixtureSampler(TASKS, 4, 0, "balanced")
    with pytest.raises(ModeError, match="data.sampling_temperature=0 must be a positive number"):
        MixtureSampler(TASKS, 4, 0, "temperature", temperature=0)
