"""Tk-Instruct prompts (definition + k examples + query) and their decoder-only token encoding.

`build_source` reproduces Tk-Instruct's `DataCollatorForNI` text character for character, including
its example-budget check. `encode_prompt` then differs on purpose in one place: when the source does
not fit the token budget, Tk-Instruct cuts its end (the query); we cut the definition/examples instead,
so the query and the answer are never truncated (see README, "Data").
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from mode.data.sni import Task

PUNCT = set(string.punctuation)


def _close(text: str) -> str:
    return text if text and text[-1] in PUNCT else text + "."


@dataclass(frozen=True)
class EncodingConfig:
    add_task_name: bool = False
    add_definition: bool = True
    num_pos_examples: int = 2
    num_neg_examples: int = 0
    add_explanation: bool = False
    chat_template: bool = False       # wrap the source as a user turn of the tokenizer's chat template
    max_source_length: int = 1024     # prompt tokens
    max_target_length: int = 128      # answer tokens, end-of-sequence included

    @classmethod
    def from_mapping(cls, cfg) -> EncodingConfig:
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


def query_text(instance_input: str) -> str:
    return "Now complete the following example -\n" + _close(f"Input: {instance_input.strip()}") + "\n" + "Output: "


def _example_text(kind: str, idx: int, example: dict, add_explanation: bool) -> str:
    text = f" {kind} Example {idx} -\n" + _close(f"Input: {example['input'].strip()}") + "\n"
    text = _close(text + f" Output: {example['output'].strip()}") + "\n"
    if add_explanation and "explanation" in example:
        text = _close(text + f" Explanation: {example['explanation'].strip()}") + "\n"
    return text + "\n"


def build_source(task: Task, instance_input: str, cfg: EncodingConfig, count_tokens) -> tuple[str, str]:
    """(head, query): head = task name + definition + the examples that fit; query = the instance.

    `count_tokens(text) -> int` decides, as in Tk-Instruct, whether each example still fits.
    """
    query = query_text(instance_input)
    name = task.name + ". " if cfg.add_task_name else ""
    definition = _close("Definition: " + task.definition.strip()) + "\n\n" if cfg.add_definition else ""
    pos: list[str] = []
    for i, ex in enumerate(task.positive_examples[: cfg.num_pos_examples]):
        text = _example_text("Positive", i + 1, ex, cfg.add_explanation)
        if count_tokens(definition + " ".join(pos) + text + query) > cfg.max_source_length:
            break
        pos.append(text)
    neg: list[str] = []
    for i, ex in enumerate(task.negative_examples[: cfg.num_neg_examples]):
        text = _example_text("Negative", i + 1, ex, cfg.add_explanation)
        if count_tokens(definition + " ".join(pos) + " ".join(neg) + text + query) > cfg.max_source_length:
            break
        neg.append(text)
    return name + definition + "".join(pos) + "".join(neg), query


class PromptEncoder:
    """Turns (task, instance) into prompt token ids and answer token ids for a decoder-only model."""

    def __init__(self, tokenizer, cfg: EncodingConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.eos_id = tokenizer.eos_token_id
        self.chat_pre, self.chat_post = self._chat_wrapper() if cfg.chat_template else ("", "")

    def _chat_wrapper(self) -> tuple[str, str]:
        """The chat template's text before and after the user message (ends with the assistant cue)."""
        from mode.errors import ModeError

        if not getattr(self.tok, "chat_template", None):
            raise ModeError("data.encoding.chat_template=true but the tokenizer has no chat template")
        sentinel = "\x00MODE\x00"
        text = self.tok.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True)
        pre, post = text.split(sentinel)
        return pre, post

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=True)["input_ids"])

    def prompt_ids(self, task: Task, instance_input: str) -> tuple[list[int], bool]:
        """Prompt token ids within the budget, and whether the query alone overflowed it.

        The source text ends with "Output: "; its final space moves to the start of the answer (see
        `answer_ids`) so the answer tokenises as it would inside running text.
        """
        head, query = build_source(task, instance_input, self.cfg, self.count)
        head, tail = self.chat_pre + head, query + self.chat_post
        if not self.cfg.chat_template:
            tail = tail[:-1]  # the trailing space of "Output: "
        budget = self.cfg.max_source_length
        ids = self.tok(head + tail, add_special_tokens=True)["input_ids"]
        if len(ids) <= budget:
            return ids, False
        head_ids = self.tok(head, add_special_tokens=True)["input_ids"]
        tail_ids = self.tok(tail, add_special_tokens=False)["input_ids"]
        room = budget - len(tail_ids)
        if room >= 0:
            return head_ids[:room] + tail_ids, False
        return (head_ids + tail_ids)[-budget:], True  # the query alone is too long: keep its end

    def answer_ids(self, answer: str) -> tuple[list[int], bool]:
        """Answer tokens + end-of-sequence, at most max_target_length; and whether it was cut."""
        text = answer.strip() if self.cfg.chat_template else " " + answer.strip()
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        limit = self.cfg.max_target_length - 1
        return ids[:limit] + [self.eos_id], len(ids) > limit
