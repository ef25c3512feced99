"""Batched greedy generation with a KV cache: padded prompts, longest first, task ids to the adapters.

Decoder-only models continue left-padded prompts; encoder-decoder models (T5) encode right-padded
sources and decode from their start token.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mode.adapters.runtime import adapter_context
from mode.data.collate import collate_prompts


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             device, desc: str = "evaluating", task_ids: list[int] | None = None,
             min_new_tokens: int = 0) -> list[str]:
    """Greedy continuations of token-id prompts (left padding, KV cache), in the prompts' order.

    Prompts are batched longest first, so batches hold similar lengths and the largest comes first.
    `task_ids` (one per prompt) reach the adapters of each batch (MoRE routes by task).
    `min_new_tokens` suppresses end-of-sequence before that many tokens (benchmarks: equal work per model).
    """
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        batch = collate_prompts([prompts[i] for i in rows], tokenizer.pad_token_id, left=not seq2seq)
        batch = {k: v.to(device) for k, v in batch.items()}
        tasks = torch.tensor([task_ids[i] for i in rows], device=device) if task_ids is not None else None
        with adapter_context(model, task_ids=tasks, attention_mask=batch["attention_mask"]):
            generated = model.generate(**batch, generation_config=gen_cfg)
        # a decoder-only model returns prompt + continuation; an encoder-decoder, start token + continuation
        new_tokens = generated[:, 1:] if seq2seq else generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    model.train(was_training)
    return outputs
