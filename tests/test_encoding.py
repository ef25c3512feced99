"""Prompt text and tokens: Tk-Instruct's template character for character on real tasks, the token budget
(query and answer never cut), chat template, tokenizer batching and the seq2seq layout."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
from conftest import SHARED_SNI, STORIES, needs_shared_sni, needs_stories

from mode.data.collate import IGNORE_INDEX, collate_seq2seq
from mode.data.encoding import EncodingConfig, PromptEncoder, build_sources
from mode.data.sni import load_task
from mode.errors import ModeError
from mode.models import byte_tokenizer


def tk_instruct_source(task_json: dict, instance: dict, count, max_source_length: int, add_task_name=False,
                       add_task_definition=True, num_pos_examples=2, num_neg_examples=0, add_explanation=False) -> str:
    """Tk-Instruct's DataCollatorForNI source text, ported line by line (before its final truncation)."""
    task_input = ""
    task_input += "Now complete the following example -\n"
    task_input += f"Input: {instance['input'].strip()}"
    if task_input[-1] not in string.punctuation:
        task_input += "."
    task_input += "\n"
    task_input += "Output: "
    task_name = ""
    if add_task_name:
        task_name += task_json["Task"] + ". "
    definition = ""
    if add_task_definition:
        if isinstance(task_json["Definition"], list):
            definition = "Definition: " + task_json["Definition"][0].strip()
        else:
            definition = "Definition: " + task_json["Definition"].strip()
        if definition[-1] not in string.punctuation:
            definition += "."
        definition += "\n\n"
    pos_examples = []
    for idx, pos_example in enumerate(task_json["Positive Examples"][:num_pos_examples]):
        pos_example_str = f" Positive Example {idx+1} -\n"
        pos_example_str += f"Input: {pos_example['input'].strip()}"
        if pos_example_str[-1] not in string.punctuation:
            pos_example_str += "."
        pos_example_str += "\n"
        pos_example_str += f" Output: {pos_example['output'].strip()}"
        if pos_example_str[-1] not in string.punctuation:
            pos_example_str += "."
        pos_example_str += "\n"
        if add_explanation and "explanation" in pos_example:
            pos_example_str += f" Explanation: {pos_example['explanation'].strip()}"
            if pos_example_str[-1] not in string.punctuation:
                pos_example_str += "."
            pos_example_str += "\n"
        pos_example_str += "\n"
        if count(definition + " ".join(pos_examples) + pos_example_str + task_input) <= max_source_length:
            pos_examples.append(pos_example_str)
        else:
            break
    neg_examples = []
    for idx, neg_example in enumerate(task_json["Negative Examples"][:num_neg_examples]):
        neg_example_str = f" Negative Example {idx+1} -\n"
        neg_example_str += f"Input: {neg_example['input'].strip()}"
        if neg_example_str[-1] not in string.punctuation:
            neg_example_str += "."
        neg_example_str += "\n"
        neg_example_str += f" Output: {neg_example['output'].strip()}"
        if neg_example_str[-1] not in string.punctuation:
            neg_example_str += "."
        neg_example_str += "\n"
        if add_explanation and "explanation" in neg_example:
            neg_example_str += f" Explanation: {neg_example['explanation'].strip()}"
            if neg_example_str[-1] not in string.punctuation:
                neg_example_str += "."
            neg_example_str += "\n"
        neg_example_str += "\n"
        if count(definition + " ".join(pos_examples) + " ".join(neg_examples) + neg_example_str + task_input) <= max_source_length:
            neg_examples.append(neg_example_str)
        else:
            break
    return task_name + definition + "".join(pos_examples) + "".join(neg_examples) + task_input


ENCODINGS = [
    dict(num_pos_examples=2),
    dict(num_pos_examples=3, num_neg_examples=2, add_explanation=True, add_task_name=True),
    dict(add_definition=False, num_pos_examples=2),
    dict(num_pos_examples=0),
]


def _real_tasks(k, seed=0):
    files = sorted((SHARED_SNI / "tasks").glob("*.json"))
    return [f.stem for f in random.Random(seed).sample(files, k)]


@needs_stories
@needs_shared_sni
@pytest.mark.parametrize("options", ENCODINGS, ids=["def+2pos", "name+def+3pos+2neg+expl", "2pos-only", "def-only"])
def test_source_text_equals_tk_instruct_on_real_tasks(options):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    count = lambda text: len(tok(text)["input_ids"])  # noqa: E731 - exactly Tk-Instruct's check
    budgets = [300, 700, 10**6]  # tight budgets drop examples for many tasks (a 512-token vocabulary)
    compared = dropped = 0
    for i, name in enumerate(_real_tasks(25)):
        task = load_task(SHARED_SNI, name)
        raw = json.loads((SHARED_SNI / "tasks" / f"{name}.json").read_text()) | {"Task": name}
        instances = task.instances[:8]
        budget = budgets[i % len(budgets)]
        cfg = EncodingConfig(max_source_length=budget, **options)
        ours = build_sources(task, [x["input"] for x in instances], cfg, lambda ts: [count(t) for t in ts])
        tk_options = {("add_task_definition" if k == "add_definition" else k): v for k, v in options.items()}
        for inst, (head, query) in zip(instances, ours):
            expected = tk_instruct_source(raw, inst, count, budget, **tk_options)
            assert head + query == expected, (name, inst["id"])
            compared += 1
            dropped += options.get("num_pos_examples", 2) > 0 and "Positive Example 1" not in head
    assert compared == 200
    if options.get("num_pos_examples"):
        assert dropped > 0  # the budget check was exercised


@needs_stories
@needs_shared_sni
def test_truncation_never_cuts_the_query_or_the_answer_on_real_tasks():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    cfg = EncodingConfig(num_pos_examples=2, max_source_length=160, max_target_length=64)
    enc = PromptEncoder(tok, cfg)
    fits = cut_heads = overflowed = cut_answers = 0
    for name in _real_tasks(30, seed=1):
        task = load_task(SHARED_SNI, name)
        instances = task.instances[:10]
        prompts = enc.prompts(task, [x["input"] for x in instances])
        sources = build_sources(task, [x["input"] for x in instances], cfg, enc.count_many)
        for (ids, overflow), (head, query) in zip(prompts, sources):
            assert len(ids) <= 160 and ids[0] == tok.bos_token_id
            tail_ids = tok(query[:-1], add_special_tokens=False)["input_ids"]  # "...Output:" (space -> answer)
            if overflow:  # the query alone is over budget: its end, with the "Output:" cue, is kept
                overflowed += 1
                assert ids[-20:] == tail_ids[-20:] and len(tail_ids) > 159
            elif len(tok(head + query[:-1])["input_ids"]) > 160:  # cut: the definition/examples lose their end
                cut_heads += 1
                assert ids[-len(tail_ids):] == tail_ids
                head_ids = tok(head, add_special_tokens=False)["input_ids"]
                assert ids[1 : len(ids) - len(tail_ids)] == head_ids[: 159 - len(tail_ids)]
            else:
                fits += 1
                assert ids == tok(head + query[:-1])["input_ids"]
        for inst in instances:
            ids, cut = enc.answer_ids(inst["output"][0])
            whole = tok(" " + inst["output"][0].strip(), add_special_tokens=False)["input_ids"]
            assert ids[-1] == tok.eos_token_id and len(ids) <= 64
            assert ids[:-1] == whole[:63] and cut == (len(whole) > 63)
            cut_answers += cut
    assert fits and cut_heads and overflowed, (fits, cut_heads, overflowed)  # every branch was exercised


@needs_stories
@needs_shared_sni
def test_batched_backend_tokenisation_equals_the_tokenizer_call():
    from transformers import AutoTokenizer

    texts = [x["input"] for name in _real_tasks(5, seed=2) for x in load_task(SHARED_SNI, name).instances[:5]]
    for tok in (AutoTokenizer.from_pretrained(STORIES), byte_tokenizer()):
        enc = PromptEncoder(tok, EncodingConfig())
        for special in (True, False):
            assert enc.encode_many(texts, special) == [tok(t, add_special_tokens=special)["input_ids"] for t in texts]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_wraps_the_source_and_the_answer_has_no_leading_space(sni_fixture):
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    task = load_task(sni_fixture, "task001_add_numbers")
    enc = PromptEncoder(tok, EncodingConfig(num_pos_examples=1, chat_template=True, max_source_length=400))
    ids, _ = enc.prompt_ids(task, "question number 1?")
    assert tok.decode(ids) == ("<|im_start|>user\nDefinition: Add the two numbers.\n\n"
                               " Positive Example 1 -\nInput: 2 + 2.\n Output: 4.\n\n"
                               "Now complete the following example -\nInput: question number 1?\nOutput: <|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert tok.decode(enc.answer_ids(" answer 1 ")[0]) == "answer 1</s>"
    plain = PromptEncoder(tok, EncodingConfig(num_pos_examples=0))
    assert tok.decode(plain.prompt_ids(task, "q")[0]).endswith("Output:")
    assert tok.decode(plain.answer_ids("answer 1")[0]) == " answer 1</s>"


def test_chat_template_without_a_template_is_an_error():
    with pytest.raises(ModeError, match="chat_template=true but the tokenizer has no chat template"):
        PromptEncoder(byte_tokenizer(), EncodingConfig(chat_template=True))


def test_bad_encoding_options_name_the_key():
    with pytest.raises(ModeError, match="data.encoding.num_pos_examples=-1 must be an integer >= 0"):
        EncodingConfig.from_mapping({"num_pos_examples": -1})
    with pytest.raises(ModeError, match="data.encoding.num_pos is not an encoding option"):
        EncodingConfig.from_mapping({"num_pos": 2})


def t5_style_tokenizer():
    """The byte tokenizer with T5's convention: no BOS, </s> appended to every sequence."""
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    eos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return tok


def test_seq2seq_layout_keeps_output_cue_and_appends_eos_to_source_and_target(sni_fixture):
    tok = t5_style_tokenizer()
    task = load_task(sni_fixture, "task001_add_numbers")
    task.definition = "Add the two numbers " * 30
    enc = PromptEncoder(tok, EncodingConfig(num_pos_examples=2, max_source_length=100, max_target_length=6),
                        seq2seq=True)
    ids, overflow = enc.prompt_ids(task, "question number 7?")
    assert not overflow and len(ids) == 100 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]).endswith("Input: question number 7?\nOutput: ")  # Tk-Instruct's exact source end
    answer, cut = enc.answer_ids("answer 7")
    assert cut and answer == tok("answe", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    short, cut = enc.answer_ids("ab")
    assert not cut and tok.decode(short) == "ab</s>"


def test_seq2seq_collation_trains_a_t5_model(sni_fixture):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = t5_style_tokenizer()
    task = load_task(sni_fixture, "task002_echo_word")
    enc = PromptEncoder(tok, EncodingConfig(num_pos_examples=1, max_source_length=120, max_target_length=12),
                        seq2seq=True)
    rows = []
    for inst in task.instances[:3]:
        prompt, _ = enc.prompt_ids(task, inst["input"])
        answer, _ = enc.answer_ids(inst["output"][0])
        rows.append({"input_ids": prompt + answer, "prompt_length": len(prompt), "task_index": 1})
    batch = collate_seq2seq(rows, pad_id=tok.pad_token_id)
    for row, r in enumerate(rows):
        src, tgt = r["input_ids"][: r["prompt_length"]], r["input_ids"][r["prompt_length"]:]
        assert batch["input_ids"][row, : len(src)].tolist() == src and batch["attention_mask"][row].sum() == len(src)
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == tgt and tgt[-1] == tok.eos_token_id
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    keep = batch["labels"] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(out.logits[keep], batch["labels"][keep])
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_example_budget_check_keeps_tk_instructs_join_quirk(sni_fixture):
    """Tk-Instruct checks `definition + " ".join(examples so far) + example + query`: from the third
    example on, the check counts separators the final source does not contain. We reproduce that."""
    task = load_task(sni_fixture, "task001_add_numbers")
    task.positive_examples = task.positive_examples + [{"input": "5 + 5", "output": "10"}]
    cfg = EncodingConfig(num_pos_examples=3, max_source_length=10**6)
    head, query = build_sources(task, ["q"], cfg, lambda ts: [len(t) for t in ts])[0]
    assert head.count("Positive Example") == 3
    exact = EncodingConfig(num_pos_examples=3, max_source_length=len(head + query))  # fits, but the check is 1 longer
    head, _ = build_sources(task, ["q"], exact, lambda ts: [len(t) for t in ts])[0]
    assert head.count("Positive Example") == 2
    assert tk_instruct_source({"Definition": [task.definition], "Positive Examples": task.positive_examples,
                               "Negative Examples": []}, {"input": "q"}, len, exact.max_source_length,
                              num_pos_examples=3).count("Positive Example") == 2
