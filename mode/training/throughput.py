"""Speed and memory options of a training run: activation checkpointing and regional compilation."""

from __future__ import annotations

import contextlib

import torch

from mode.adapters import checkpoint_context_fn
from mode.errors import ModeError


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer; the context_fn gives recomputed adapters their
    batch's task ids. Non-reentrant checkpoints pass gradients to the adapters inside without any input
    requiring one, so the embeddings' output gets none (transformers asks for it: a wasted backward)."""
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn(model)}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def compile_layers(model) -> None:
    """torch.compile each transformer layer in place (regional compilation: one compiled graph serves every
    layer, so compiling costs one layer's time; module names, and so adapter and checkpoint keys, stay).
    Decoder-only: the decoder's `layers`; encoder-decoder (T5): the encoder's and the decoder's `block`s."""
    stacks = [model.get_encoder(), model.get_decoder()] if getattr(model.config, "is_encoder_decoder", False) \
        else [model.get_decoder()]
    layers = [layer for stack in stacks for layer in (getattr(stack, "layers", None) or getattr(stack, "block", None) or [])]
    if not layers:
        raise ModeError(f"train.compile=true: {type(model).__name__} has no `layers` (or T5 `block`s) to compile")
    import logging

    logging.getLogger(__name__).info("train.compile=true: the first steps compile the %d layers and take "
                                     "much longer than the rest (one graph serves all layers)", len(layers))
    for layer in layers:
        layer.compile()


def eager(compiled: bool):
    """Run compiled layers eagerly (for generation: every KV-cache shape would be one more recompile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if compiled and set_stance else contextlib.nullcontext()
