"""Training losses: the summed answer cross-entropy of a causal LM or of an encoder-decoder (T5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mode.adapters.runtime import adapter_context
from mode.data.collate import IGNORE_INDEX


class AnswerLoss(nn.Module):
    """The causal LM plus a summed cross-entropy over answer tokens.

    The output head runs only at answer positions: prompts are long and answers short, so this skips
    most of the [tokens x vocab] logits (the largest matmul of a small model). DDP/FSDP wrap this module,
    so everything the backward pass needs happens inside its forward. `task_ids` reach the adapters
    (MoRE routes by task); adapter auxiliary losses are added to the sum.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels, task_ids=None):
        with adapter_context(self.lm, task_ids=task_ids, attention_mask=attention_mask) as adapters:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            aux = adapters.aux_loss() if adapters is not None else None
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        softcap = getattr(self.lm.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        if aux is not None:  # a mean (MoRE's contrastive term): scaled by this batch's answer tokens, so the
            loss = loss + aux * keep.sum()  # caller's division by answer tokens gives L_gen + aux
        return loss


class Seq2SeqAnswerLoss(nn.Module):
    """An encoder-decoder LM plus a summed cross-entropy over target tokens (as Tk-Instruct trains T5).

    The source feeds the encoder; the decoder reads the labels shifted right (the model's own
    `prepare_decoder_input_ids_from_labels`, so T5 starts from its pad token). Every target position is an
    answer token, so the full logits are needed. Decoder-side adapters see the target's mask.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels, task_ids=None):
        keep = labels != IGNORE_INDEX
        decoder_input_ids = self.lm.prepare_decoder_input_ids_from_labels(labels=labels)
        with adapter_context(self.lm, task_ids=task_ids, attention_mask=attention_mask,
                             decoder_attention_mask=keep.long()) as adapters:
            # no decoder mask, as HF's labels= path: padding follows the target, and the decoder is causal
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                             use_cache=False).logits
            aux = adapters.aux_loss() if adapters is not None else None
        loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
        if aux is not None:
            loss = loss + aux * keep.sum()
        return loss


def answer_loss(lm: nn.Module) -> nn.Module:
    """The loss module for this base: Seq2SeqAnswerLoss for encoder-decoder models, AnswerLoss otherwise."""
    return Seq2SeqAnswerLoss(lm) if getattr(lm.config, "is_encoder_decoder", False) else AnswerLoss(lm)
