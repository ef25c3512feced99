"""Tk-Instruct prompts (definition + k examples + query) and their token encoding.

`build_sources` reproduces Tk-Instruct's `DataCollatorForNI` text character for character, including
its example-budget check (`definition + " ".join(examples so far) + example + query` must fit). It works
on all instances of one task at once so the budget checks go to the tokenizer in batches.
`PromptEncoder` then differs from Tk-Instruct on purpose in one place: when the source does not fit the
token budget, Tk-Instruct cuts its end (the query); we cut the definition/examples instead, so the query
and the answer are never truncated (see README, "Data").

Two layouts share one row format (`input_ids` = prompt + answer, `prompt_length`):
- decoder-only: the final space of "Output: " moves to the start of the answer, so the answer tokenises
  as it does inside running text; the answer ends with end-of-sequence.
- seq2seq (T5 family): source and target are tokenised separately with the tokenizer's own special
  tokens (T5 appends </s> to both), exactly as Tk-Instruct does; `collate_seq2seq` splits the row.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

from mode.data.sni import Task
from mode.errors import ModeError

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
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModeError(f"data.encoding.{unknown[0]} is not an encoding option ({', '.join(cls.__dataclass_fields__)})")
        out = cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})
        for key in ("num_pos_examples", "num_neg_examples", "max_source_length", "max_target_length"):
            value = getattr(out, key)
            minimum = 0 if key.startswith("num_") else 2
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ModeError(f"data.encoding.{key}={value!r} must be an integer >= {minimum}")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def query_text(instance_input: str) -> str:
    return "Now complete the following example -\n" + _close(f"Input: {instance_input.strip()}") + "\n" + "Output: "


def _example_text(kind: str, idx: int, example: dict, add_explanation: bool) -> str:
    text = f" {kind} Example {idx} -\n" + _close(f"Input: {example['input'].strip()}") + "\n"
    text = _close(text + f" Output: {example['output'].strip()}") + "\n"
    if add_explanation and "explanation" in example:
        text = _close(text + f" Explanation: {example['explanation'].strip()}") + "\n"
    return text + "\n"


def build_sources(task: Task, inputs: list[str], cfg: EncodingConfig, count_many) -> list[tuple[str, str]]:
    """(head, query) per input: head = task name + definition + the examples that fit; query = the instance.

    `count_many(texts) -> list[int]` counts tokens (special tokens included) as Tk-Instruct's
    `len(tokenizer(text)["input_ids"])` does; it decides whether each example still fits.
    """
    queries = [query_text(x) for x in inputs]
    name = task.name + ". " if cfg.add_task_name else ""
    definition = _close("Definition: " + task.definition.strip()) + "\n\n" if cfg.add_definition else ""

    def fitting(kind: str, examples: list[dict], before: list[list[str]]) -> list[list[str]]:
        """Per input, the examples of `kind` added one at a time while the check string fits."""
        chosen: list[list[str]] = [[] for _ in inputs]
        alive = list(range(len(inputs)))
        for i, ex in enumerate(examples):
            text = _example_text(kind, i + 1, ex, cfg.add_explanation)
            checks = [definition + " ".join(before[j]) + " ".join(chosen[j]) + text + queries[j] for j in alive]
            counts = count_many(checks) if checks else []
            alive = [j for j, n in zip(alive, counts) if n <= cfg.max_source_length]
            for j in alive:
                chosen[j].append(text)
        return chosen

    pos = fitting("Positive", task.positive_examples[: cfg.num_pos_examples], [[] for _ in inputs])
    neg = fitting("Negative", task.negative_examples[: cfg.num_neg_examples], pos)
    return [(name + definition + "".join(p) + "".join(n), q) for p, n, q in zip(pos, neg, queries)]


def build_source(task: Task, instance_input: str, cfg: EncodingConfig, count_tokens) -> tuple[str, str]:
    """`build_sources` for one input, with a one-text token counter."""
    return build_sources(task, [instance_input], cfg, lambda texts: [count_tokens(t) for t in texts])[0]


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after any text (e.g. [bos], [] or [], [eos])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ModeError(f"cannot tell which special tokens {type(tokenizer).__name__} adds around a text")


class PromptEncoder:
    """Turns (task, instance inputs) into prompt token ids, and answers into answer token ids."""

    def __init__(self, tokenizer, cfg: EncodingConfig, seq2seq: bool = False):
        self.tok = tokenizer
        self.cfg = cfg
        self.seq2seq = seq2seq
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ModeError(f"the tokenizer ({type(tokenizer).__name__}) has no end-of-sequence token")
        self.prefix, self.suffix = special_tokens_around(tokenizer)
        self.chat_pre, self.chat_post = self._chat_wrapper() if cfg.chat_template else ("", "")
        # The tokenizers library encodes batches without per-call Python overhead; same ids (tested).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def _chat_wrapper(self) -> tuple[str, str]:
        """The chat template's text before and after the user message (ends with the assistant cue)."""
        if not getattr(self.tok, "chat_template", None):
            raise ModeError("data.encoding.chat_template=true but the tokenizer has no chat template")
        sentinel = "\x00MODE\x00"
        text = self.tok.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True)
        pre, post = text.split(sentinel)
        bos = self.tok.bos_token
        if bos and self.prefix and pre.startswith(bos):  # the tokenizer adds it already (e.g. Gemma)
            pre = pre[len(bos):]
        return pre, post

    def encode_many(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=special)]
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.encode_many([text], special=True)[0])

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.encode_many(texts, special=True)]

    def prompts(self, task: Task, inputs: list[str]) -> list[tuple[list[int], bool]]:
        """Per input: prompt token ids within the budget, and whether the query alone overflowed it."""
        sources = build_sources(task, inputs, self.cfg, self.count_many)
        heads = [self.chat_pre + head for head, _ in sources]
        tails = [query + self.chat_post for _, query in sources]
        if not self.cfg.chat_template and not self.seq2seq:
            tails = [t[:-1] for t in tails]  # the trailing space of "Output: " goes to the answer
        budget = self.cfg.max_source_length
        out = [(ids, False) for ids in self.encode_many([h + t for h, t in zip(heads, tails)], special=True)]
        long = [i for i, (ids, _) in enumerate(out) if len(ids) > budget]
        if long:
            head_ids = self.encode_many([heads[i] for i in long], special=False)
            tail_ids = self.encode_many([tails[i] for i in long], special=False)
            inner = budget - len(self.prefix) - len(self.suffix)
            for i, head, tail in zip(long, head_ids, tail_ids):
                room = inner - len(tail)
                if room >= 0:  # cut the definition/examples, keep the query whole
                    out[i] = (self.prefix + head[:room] + tail + self.suffix, False)
                else:          # the query alone is too long: keep its end (the "Output:" cue)
                    out[i] = (self.prefix + ((head + tail)[-inner:] if inner > 0 else []) + self.suffix, True)
        return out

    def answers(self, answers: list[str]) -> list[tuple[list[int], bool]]:
        """Per answer: its tokens ending with end-of-sequence, at most max_target_length; and whether it was cut."""
        limit = self.cfg.max_target_length
        if self.seq2seq:  # as Tk-Instruct: the tokenizer's own special tokens (T5: </s>), truncated before them
            end = self.suffix or [self.eos_id]
            texts = answers
        else:
            end = [self.eos_id]
            texts = [a.strip() if self.cfg.chat_template else " " + a.strip() for a in answers]
        out = []
        for ids in self.encode_many(texts, special=False):
            room = limit - len(end)
            out.append((ids[:room] + end, len(ids) > room))
        return out

    def prompt_ids(self, task: Task, instance_input: str) -> tuple[list[int], bool]:
        return self.prompts(task, [instance_input])[0]

    def answer_ids(self, answer: str) -> tuple[list[int], bool]:
        return self.answers([answer])[0]
