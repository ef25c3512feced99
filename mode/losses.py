"""Training losses."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mode.data.collate import IGNORE_INDEX


class AnswerLoss(nn.Module):
    """The causal LM plus a summed cross-entropy over answer tokens.

    The output head runs only at answer positions: prompts are long and answers short, so this skips
    most of the [tokens x vocab] logits (the largest matmul of a small model). DDP/FSDP wrap this module,
    so everything the backward pass needs happens inside its forward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        softcap = getattr(self.lm.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets[keep], reduction="sum")
