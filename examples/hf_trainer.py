"""Train a mode adapter (any method) inside transformers.Trainer, then save it and export it for PEFT.

    python examples/hf_trainer.py --method more --steps 30     # seconds on the tiny random model
    python examples/hf_trainer.py --method mode --model stories260k

What Trainer needs to know about mode's adapters:
1. `apply_adapters(model, {...})` before Trainer sees the model: it freezes the base, so only the
   adapter's parameters train (Trainer's optimizer takes the parameters that require gradients).
2. MoRE (and mixtures with adapter.router_input=task) route by task: every batch carries `task_ids`, and
   `ModeTrainer.compute_loss` runs the forward inside `adapter_context(model, task_ids=...,
   attention_mask=...)`, then adds the adapter's auxiliary loss (MoRE's contrastive loss; the mixtures'
   balance / z losses) to the language-model loss. The other methods ignore task ids, so the same Trainer
   serves every method. (With gradient checkpointing, pass `checkpoint_context_fn(model)` as the
   checkpoint's context_fn, as mode-train does, so the recomputed forward sees the same task ids.)

The data are two toy tasks made up here (copy a word, reverse it) in mode's row format: `input_ids`,
`prompt_length` (the loss covers the answer only) and `task_index`. Rows of SNI come the same way from
`mode.data.dataset.build_data(cfg.data, cfg.eval, tokenizer).train`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from transformers import Trainer, TrainingArguments

from mode.adapters import adapter_context, apply_adapters, save_adapters
from mode.adapters.io import save_peft_lora
from mode.data.collate import collate_train
from mode.models import load_model_and_tokenizer
from mode.run.config import compose

TASKS = ["copy_word", "reverse_word"]


class ModeTrainer(Trainer):
    """Trainer whose forward passes see the batch's task ids and whose loss includes the adapter's own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        task_ids = inputs.pop("task_ids", None)
        with adapter_context(model, task_ids=task_ids, attention_mask=inputs.get("attention_mask")) as runtime:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            aux = runtime.aux_loss() if runtime is not None else None  # read before the context ends
        if aux is not None:
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss


def toy_rows(tokenizer, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = i % len(TASKS)
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        prompt = tokenizer(f"{'Copy' if task == 0 else 'Reverse'}: {word} ->").input_ids
        answer = tokenizer(" " + (word if task == 0 else word[::-1])).input_ids + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "prompt_length": len(prompt), "task_index": task})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=["lora", "molora", "molora_sd", "mode", "more"])
    parser.add_argument("--model", default="tiny_random", help="a conf/model option (tiny_random, stories260k, ...)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    model, tokenizer = load_model_and_tokenizer(compose("train", [f"model={args.model}"]).model)
    adapter = {"method": args.method, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    if args.method in ("molora", "molora_sd", "mode"):
        adapter["experts"] = 2
    apply_adapters(model, adapter, num_tasks=len(TASKS))

    out = Path(args.out)
    trainer = ModeTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
                               learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                               save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                               remove_unused_columns=False,  # keep task_ids and prompt_length for the collator
                               dataloader_num_workers=0, seed=0),
        train_dataset=toy_rows(tokenizer, 64),
        data_collator=lambda rows: collate_train(rows, tokenizer.pad_token_id),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    save_adapters(model, out / "adapter", extra={"tasks": TASKS})  # mode's format: load_adapters, mode-eval
    if args.method in ("lora", "more"):  # one LoRA (MoRE: per task): PeftModel.from_pretrained, vLLM
        save_peft_lora(model, out / "peft", task=0 if args.method == "more" else None)
    print(f"{args.method}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps; adapter -> {out}")
    return {"losses": losses, "aux": dict(model.adapter_runtime.aux_history)}


if __name__ == "__main__":
    main(sys.argv[1:])
