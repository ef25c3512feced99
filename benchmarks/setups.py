"""What the benchmark compares: the frozen base (the floor), PEFT's LoRA, our methods and the per-expert
loop, each built on the SAME frozen base weights, and one training step as mode-train takes it. Variants of
the same setups measured in the same run: top-k routing (`adapter.top_k`) against the dense mixture, and
bf16 autocast (`train.precision=bf16`: fp32 weights, bf16 matmuls) against fp32."""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass, field

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NUM_TASKS = 8  # MoRE's task count; the batches cycle through the tasks


@dataclass(frozen=True)
class Setup:
    name: str
    label: str
    kind: str                      # floor | peft | ours | loop
    adapter: dict = field(default_factory=dict)
    precision: str = "fp32"        # fp32 | bf16 (autocast, as train.precision=bf16: the weights stay fp32)


def _ours(name, label, method, rank, experts=1, block_rank=1, kind="ours", top_k=None, precision="fp32"):
    adapter = {"method": method, "rank": rank, "experts": experts, "block_rank": block_rank, "alpha": 2 * rank,
               "target_modules": TARGETS, **({"top_k": top_k} if top_k is not None else {})}
    return Setup(name, label, kind, adapter, precision)


SETUPS = [
    Setup("floor", "frozen base (floor)", "floor"),
    Setup("peft_lora16", "PEFT LoRA r16", "peft", {"rank": 16}),
    _ours("lora16", "LoRA r16", "lora", 16),
    Setup("peft_lora64", "PEFT LoRA r64", "peft", {"rank": 64}),
    _ours("lora64", "LoRA r64", "lora", 64),
    _ours("molora16x4", "MoLoRA 16x4", "molora", 4, 16),
    _ours("molora_sd16x4", "MoLoRA-SD 16x4", "molora_sd", 4, 16),
    _ours("mode16x4x1", "MoDE 16x4x1", "mode", 4, 16, 1),
    _ours("mode16x4x4", "MoDE 16x4x4", "mode", 4, 16, 4),
    _ours("mode8x4x1", "MoDE 8x4x1", "mode", 4, 8, 1),
    _ours("mode4x4x1", "MoDE 4x4x1", "mode", 4, 4, 1),
    _ours("mode12x16x8", "MoDE 12x16x8", "mode", 16, 12, 8),
    _ours("more8", "MoRE R8", "more", 8),
    _ours("loop_molora16x4", "per-expert loop MoLoRA 16x4", "molora", 4, 16, kind="loop"),
    _ours("loop_mode16x4x1", "per-expert loop MoDE 16x4x1", "mode", 4, 16, 1, kind="loop"),
    # top-k routing: the same mixtures with each router keeping its k largest gates (dense: no top_k)
    _ours("molora16x4_top2", "MoLoRA 16x4 top-2", "molora", 4, 16, top_k=2),
    _ours("molora16x4_top1", "MoLoRA 16x4 top-1", "molora", 4, 16, top_k=1),
    _ours("mode16x4x1_top2", "MoDE 16x4x1 top-2", "mode", 4, 16, 1, top_k=2),
    _ours("mode16x4x1_top1", "MoDE 16x4x1 top-1", "mode", 4, 16, 1, top_k=1),
    # bf16 autocast: the forward under torch.autocast(bfloat16), as mode-train's train.precision=bf16
    Setup("floor_bf16", "frozen base (floor) bf16", "floor", precision="bf16"),
    _ours("lora64_bf16", "LoRA r64 bf16", "lora", 64, precision="bf16"),
    _ours("mode16x4x1_bf16", "MoDE 16x4x1 bf16", "mode", 4, 16, 1, precision="bf16"),
]
BY_NAME = {s.name: s for s in SETUPS}
# Generation: the goal's pair and one of each family (decoding is slow enough that fewer setups pay off).
GENERATE = ["floor", "peft_lora64", "lora64", "molora16x4", "molora_sd16x4", "mode16x4x1", "more8",
            "loop_mode16x4x1"]


def load_base(model_name: str, layers: int | None):
    """The frozen base model (a conf/model name) with its first `layers` decoder layers (None: all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mode.models import load_model_and_tokenizer, resolve_model_path
    from mode.run.config import compose

    cfg = compose("train", [f"model={model_name}"]).model
    if cfg.get("random_init") or not layers:
        model, tokenizer = load_model_and_tokenizer(cfg)
    else:
        from transformers.utils import logging

        path = resolve_model_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(path)
        logging.set_verbosity_error()  # the dropped layers' weights are "unexpected", as intended
        model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=layers, dtype=torch.float32)
        logging.set_verbosity_warning()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model, tokenizer


def shared_copy(base):
    """A copy of `base` whose modules are new but whose (frozen) weights are the same tensors."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def build(base, setup: Setup, targets: list[str] = TARGETS):
    """The model of one setup; its base weights are shared with every other setup's."""
    model = shared_copy(base)
    adapter = {**setup.adapter, "target_modules": targets}
    if setup.kind == "floor":  # backward through every layer down to the embeddings: the floor of any adapter
        if hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    elif setup.kind == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        rank = setup.adapter["rank"]
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets),
                                model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    elif setup.kind == "loop":
        from benchmarks.loops import apply_loop_adapters

        apply_loop_adapters(model, adapter)
    else:
        from mode.adapters import apply_adapters

        apply_adapters(model, adapter, num_tasks=NUM_TASKS)
    if setup.kind in ("ours", "loop"):  # routing statistics on, as mode-train runs them
        from mode.adapters.diagnostics import AdapterDiagnostics

        AdapterDiagnostics(model).start()
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def synthetic_batch(batch: int, seq: int, answer: int, vocab: int, pad_id: int) -> dict:
    """`batch` sequences of `seq` tokens whose last `answer` are the answer, through the real collate."""
    from mode.data.collate import collate_train

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, vocab, (seq,), generator=gen).tolist(), "prompt_length": seq - answer,
             "task_index": i % NUM_TASKS} for i in range(batch)]
    return collate_train(rows, pad_id)


def autocast(precision: str):
    """The forward's precision context: bf16 autocast as accelerate applies it for train.precision=bf16 on a
    CPU (the backward runs outside it, as there), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimizer step of mode.train's loop: summed answer-token loss / answer tokens, backward, clip, AdamW."""

    def __init__(self, model, batch, lr: float = 1e-4, precision: str = "fp32"):
        from mode.training.losses import AnswerLoss

        self.loss = AnswerLoss(model).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr) if self.params else None
        self.batch, self.precision = batch, precision
        self.n_tokens = int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self) -> None:
        b = self.batch
        with autocast(self.precision):
            loss = self.loss(b["input_ids"], b["attention_mask"], b["labels"], b["task_ids"])
        (loss / self.n_tokens).backward()
        if self.optimizer is not None:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class OneLayer(torch.nn.Module):
    """One projection of the base (frozen weights), as the model of the layer benchmark."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.q_proj = linear

    def forward(self, x):
        return self.q_proj(x)


class LayerStep:
    """Forward + backward of one adapted projection inside a network: its input needs a gradient too."""

    def __init__(self, model, x: torch.Tensor, task_ids: torch.Tensor, precision: str = "fp32"):
        self.model, self.x, self.task_ids, self.precision = model, x, task_ids, precision
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self) -> None:
        from mode.adapters import adapter_context

        with adapter_context(self.model, task_ids=self.task_ids), autocast(self.precision):
            out = self.model(self.x)
        out.backward(torch.ones_like(out))
        self.x.grad = None
        for p in self.params:
            p.grad = None
