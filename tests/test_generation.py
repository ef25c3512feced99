"""Batched, left-padded greedy generation (`mode.evaluation.generate`, what mode-train and mode-eval score)
gives the same predictions as generating each prompt alone: padding, the attention mask, the longest-first
batching order and the per-prompt task ids change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, needs_stories

from mode.adapters import apply_adapters
from mode.evaluation import generate

TEXTS = ["Once upon a time, there was a little girl named Lily.", "The dog",
         "Tom and his mom went to the park to play on the swings. They saw a big red ball and", "Sara was sad.",
         "One day, a bird flew", "The sun was hot and the children wanted to swim in the"]
TASKS = [0, 1, 2, 1, 0, 2]


@pytest.fixture(scope="module")
def stories_more():
    """stories260K with a MoRE adapter (non-zero B), so each prompt's task id changes its continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    torch.manual_seed(0)
    apply_adapters(model, {"method": "more", "rank": 4, "alpha": 8, "init_A": "normal"}, num_tasks=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model, tokenizer


@needs_stories
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(stories_more):
    model, tokenizer = stories_more
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # every batch pads
    alone = [generate(model, tokenizer, [p], 1, 16, "cpu", task_ids=[t])[0] for p, t in zip(prompts, TASKS)]
    assert len(set(alone)) == len(alone) and all(alone)    # real, distinct continuations
    for batch_size in (4, 6):
        assert generate(model, tokenizer, prompts, batch_size, 16, "cpu", task_ids=TASKS) == alone, batch_size


@needs_stories
def test_the_task_ids_reach_their_own_prompts(stories_more):
    """Guard for the test above: the adapter's task routing matters here, so a batch whose task ids were
    dealt to the wrong rows (prompts are reordered longest first) would be seen."""
    model, tokenizer = stories_more
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    right = generate(model, tokenizer, prompts, 6, 16, "cpu", task_ids=TASKS)
    shifted = generate(model, tokenizer, prompts, 6, 16, "cpu", task_ids=TASKS[1:] + TASKS[:1])
    assert shifted != right
