"""Padding encoded examples into batches."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def collate_train(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch; labels are -100 on prompt and padding, so the loss covers answers only.

    Masks come from lengths, never from the pad id (SmolLM2's pad token is its end-of-sequence token).
    """
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, e["prompt_length"] : len(ids)] = ids[e["prompt_length"] :]
    task_ids = torch.tensor([e["task_index"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}


def collate_prompts(prompts: list[list[int]], pad_id: int, left: bool = True) -> dict[str, torch.Tensor]:
    """Padded prompts for batched generation: left-padded for a decoder-only model (new tokens follow the
    prompt), right-padded (`left=False`) for an encoder-decoder's encoder, as Tk-Instruct's collator pads."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        input_ids[row, cols] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_seq2seq(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder-decoder batch from the shared row format: the prompt feeds the encoder (right-padded),
    the answer becomes `labels` (-100 on padding); the model builds decoder inputs by shifting labels."""
    sources = [e["input_ids"][: e["prompt_length"]] for e in examples]
    targets = [e["input_ids"][e["prompt_length"] :] for e in examples]
    src_width, tgt_width = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.full((len(examples), src_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), src_width), dtype=torch.long)
    labels = torch.full((len(examples), tgt_width), IGNORE_INDEX, dtype=torch.long)
    for row, (src, tgt) in enumerate(zip(sources, targets)):
        input_ids[row, : len(src)] = torch.tensor(src, dtype=torch.long)
        attention_mask[row, : len(src)] = 1
        labels[row, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    task_ids = torch.tensor([e["task_index"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}
